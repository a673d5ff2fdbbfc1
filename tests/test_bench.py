"""The study behind ``pydmabuf bench``: what each cell counts, and that a
run leaves the model machine as it found it."""

from __future__ import annotations

import json

import pytest

from pydmabuf import Machine, bench, kernel_work


@pytest.fixture(scope="module")
def study():
    m = Machine.default()
    before = _live(m)
    result = bench.run_study(["contiguous", "scattered"], [16, 256], quick=True, progress=False, machine=m)
    return m, before, result


def _live(m):
    out = {}
    for name in ("gpu0", "direct0"):
        d = m.device(name).domain
        if d is not None:
            d.flush()
            s = d.stats
            out[name] = (s["iova_live_ranges"], s["mapped_nbytes"])
    out["pages"] = m.pages.allocated_pages
    return out


def _cells(result, **match):
    return [c for c in result["cells"] if all(c[k] == v for k, v in match.items())]


def test_every_strategy_is_measured_for_every_cell(study):
    _, _, result = study
    for layout in ("contiguous", "scattered"):
        for npages in (16, 256):
            got = {c["strategy"] for c in _cells(result, layout=layout, npages=npages)}
            assert set(bench.MAPPING_STRATEGIES) | {"sg_from_pages", "c_floor", "numpy"} == got


def test_the_study_leaves_nothing_mapped(study):
    m, before, _ = study
    assert _live(m) == before


def test_counters_mean_what_they_say(study):
    _, _, result = study

    def one(**kw):
        (c,) = _cells(result, **kw)
        return c["counters"]

    for npages in (16, 256):
        assert one(layout="scattered", npages=npages, strategy="pte_floor")["pte_writes_per_page"] == 1.0
        assert one(layout="scattered", npages=npages, strategy="sg_direct")["pte_writes_per_page"] == 0.0
        # dma-direct on scattered pages: one DMA segment per page.
        assert one(layout="scattered", npages=npages, strategy="sg_direct")["segments"] == npages
        # The IOMMU merges scattered pages into one IOVA segment.
        assert one(layout="scattered", npages=npages, strategy="sg_iommu")["segments"] == 1
        # Linking page by page: one range per page; runs: one per run.
        assert one(layout="scattered", npages=npages, strategy="link_pages")["segments"] == npages
        assert one(layout="contiguous", npages=npages, strategy="link_runs")["segments"] == 1
        # Over one map and its unmap, every IOMMU path writes each leaf PTE
        # twice (set, clear) below a whole table page, plus the upper-level
        # entries the first map creates.
        for s in ("sg_iommu", "link_pages", "link_runs", "dmabuf_static", "dmabuf_dynamic", "dmabuf_ranges"):
            k = one(layout="scattered", npages=npages, strategy=s)
            assert 2.0 <= k["pte_writes_per_page"] <= 2.0 + 4.0 / npages, (s, k)
            assert k["iotlb_invalidations"] >= 1
    # A scatterlist costs 32 bytes per entry: one entry per scattered page.
    assert one(layout="scattered", npages=256, strategy="sg_iommu")["metadata_bytes_per_page"] >= 32.0
    assert one(layout="contiguous", npages=256, strategy="link_runs")["metadata_bytes_per_page"] < 1.0


def test_outputs_round_trip(study, tmp_path):
    _, _, result = study
    again = json.loads(bench.to_json(result))
    assert again["cells"] == json.loads(json.dumps(result["cells"]))
    csv_lines = bench.to_csv(result).splitlines()
    assert len(csv_lines) == 1 + len(result["cells"])
    table = bench.format_table(result)
    assert "Scatterlist walk" in table and "Mapping a buffer" in table
    md = bench.format_markdown(result)
    assert md.startswith("Measured with `pydmabuf bench`")
    assert "| layout | " + " | ".join(bench.MAPPING_STRATEGIES) + " |" in md
    # Two mapping tables (one per size) and the walk table.
    assert md.count("| scattered |") == 3 and "**64 KiB**" in md and "**1 MiB**" in md
    assert "| layout | segments | core | C floor | NumPy |" in md
    # Every baseline cell of the mapping tables reads (1.00) against itself,
    # its estimate first, the model's time after it.
    mapping = md.split("**Scatterlist walk**")[0]
    for line in mapping.splitlines():
        if line.startswith("| contiguous") or line.startswith("| scattered"):
            assert "(1.00) · model " in line.split("|")[2]
    # CSV: the kernel's counts flattened, the estimate and its terms.
    header = csv_lines[0].split(",")
    assert {f"kernel_{k}" for k in kernel_work.KEYS} <= set(header)
    assert "kernel_est_ns_per_page" in header and "kernel_est_ns_pt_walks" in header
    assert "kernel est" in table and "model map" in table


def test_compare_of_a_result_with_itself_is_one(study):
    _, _, result = study
    out = bench.compare(result, result)
    assert "geometric mean new/old = 1.000" in out
    assert bench.compare(result, {"cells": []}) == "no cells in common"


def test_zero_times_have_no_ratio(study):
    """A result with zero times (hand-edited or truncated: a measured time
    never is) still formats: its ratios are "-", nothing divides by zero."""
    _, _, result = study
    zero = json.loads(json.dumps(result))
    for c in zero["cells"]:
        c["ns_per_page"] = 0.0
        if "map_ns_per_page" in c["counters"]:
            c["counters"]["map_ns_per_page"] = 0.0
        if c.get("kernel_est_ns_per_page") is not None:
            c["kernel_est_ns_per_page"] = 0.0
    table = bench.format_table(zero)
    assert " - " in table
    assert "(-)" in bench.format_markdown(zero)
    assert bench.to_csv(zero).count("\n") == len(zero["cells"]) + 1
    assert "geometric mean new/old = -" in bench.compare(result, zero)
    assert "geometric mean new/old = -" in bench.compare(zero, result)


def test_unreadable_pfns_skip_the_pagemap_layout_with_a_note(monkeypatch):
    """Where the process may not read PFNs (no CAP_SYS_ADMIN), the real-page
    layout is skipped and the study says so instead of failing."""
    from pydmabuf import errors, workloads

    def refuse(npages):
        raise errors.NotPermitted("reading PFNs from /proc/self/pagemap needs CAP_SYS_ADMIN")

    monkeypatch.setattr(workloads, "real_pages", refuse)
    result = bench.run_study(["pagemap", "contiguous"], [16], quick=True, progress=False)
    assert {c["layout"] for c in result["cells"]} == {"contiguous"}
    (note,) = result["notes"]
    assert "pagemap" in note and "CAP_SYS_ADMIN" in note
    assert "note: layout 'pagemap' skipped" in bench.format_table(result)


def test_every_kernel_path_cell_carries_its_kernel_work_and_estimate(study):
    _, _, result = study
    for c in result["cells"]:
        if c["strategy"] in ("c_floor", "numpy"):  # references, no kernel path
            assert c["kernel_work"] is None and c["kernel_est_ns_per_page"] is None
            continue
        w = c["kernel_work"]
        assert tuple(w) == kernel_work.KEYS and all(type(v) is int for v in w.values())
        assert c["kernel_est_ns_per_page"] > 0
        assert sum(t["ns"] for t in c["kernel_est_terms"]) / c["npages"] == pytest.approx(c["kernel_est_ns_per_page"])
        # what kernel_work says for the same pages and device mode
        assert c["layout"] and c["npages"] and c["strategy"] and "counters" in c and "ns_per_page" in c
    # every unit cost says where it came from
    for u, v in result["unit_costs"].items():
        assert v["ns"] >= 0 and v["source"], u
    assert result["unit_costs"]["walk"]["source"].startswith("measured on this host")
    assert "default.toml" in result["unit_costs"]["iotlb_invalidation"]["source"]


def test_kernel_work_is_the_same_from_run_to_run():
    a = bench.run_study(["fragmented"], [256], quick=True, progress=False, parts=("mapping",))
    b = bench.run_study(["fragmented"], [256], quick=True, progress=False, parts=("mapping",))
    assert [c["kernel_work"] for c in a["cells"]] == [c["kernel_work"] for c in b["cells"]]


def test_scattered_pages_make_one_map_call_per_run_by_list_or_by_link():
    """The issue's example: scattered 4 KiB pages through gpu0's IOMMU make
    as many iommu_map calls with a scatterlist as linked page by page."""
    r = bench.run_study(["scattered"], [4096], quick=True, progress=False, parts=("mapping",))
    by = {c["strategy"]: c for c in r["cells"]}
    runs = by["link_runs"]["kernel_work"]["iommu_map_calls"]
    assert by["sg_iommu"]["kernel_work"]["iommu_map_calls"] == runs
    assert by["link_pages"]["kernel_work"]["iommu_map_calls"] == 4096
    # the estimate's gap between the two is the list: its visits and metadata
    text = bench.explain(r, "scattered:4096:sg_iommu")
    assert "sg_entry_visits" in text and "model CPU time" in text and "kernel estimate:" in text
    with pytest.raises(ValueError, match="not in this result"):
        bench.explain(r, "thp:4096:sg_iommu")


def test_cli_explain_and_cost_profile(tmp_path, capsys):
    from pydmabuf import cli

    assert cli.main(["bench", "--quick", "--no-progress", "--explain", "contiguous:16:link_pages"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("contiguous:16:link_pages") and "iommu_map_calls" in out and "x" in out
    # several cells of one run, with the same unit costs
    assert cli.main(["bench", "--quick", "--no-progress", "--explain", "scattered:16:sg_iommu",
                     "--explain", "scattered:16:link_pages"]) == 0
    out = capsys.readouterr().out
    assert out.count("kernel estimate:") == 2 and "scattered:16:link_pages" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[iotlb_invalidation]\nns = -5\nsource = 'x'\n")
    assert cli.main(["bench", "--quick", "--no-progress", "--cost-profile", str(bad)]) == 2
    assert "ns must be a number" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--no-progress", "--explain", "contiguous:16"]) == 2
    assert "LAYOUT:PAGES:STRATEGY" in capsys.readouterr().err
