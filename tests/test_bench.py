"""The study behind ``pydmabuf bench``: what each cell counts, and that a
run leaves the model machine as it found it."""

from __future__ import annotations

import json

import numpy as np
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
        for s in ("sg_iommu", "link_pages", "link_runs", "dmabuf_static", "dmabuf_dynamic", "dmabuf_ranges",
                  "dmabuf_pal"):
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
            assert line.split("|")[2].strip().rstrip("~").endswith("(1.00)")
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
        c["ratio_to_baseline"] = c["ratio_ci"] = None  # no paired ratio to fall back on
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


# ------------------------------------------------------------ timing, kept


def _groups(result):
    out = {}
    for c in result["cells"]:
        out.setdefault((c["layout"], c["npages"], c["baseline"]), []).append(c)
    return out


def test_every_cell_keeps_its_samples_one_per_round(study):
    _, _, result = study
    for (lay, npages, base), cells in _groups(result).items():
        # Interleaved: every strategy of a group ran in the same rounds.
        assert len({c["repeats"] for c in cells}) == 1, (lay, npages)
        for c in cells:
            assert len(c["samples_ns"]) == c["repeats"] >= 3
            assert all(isinstance(x, int) and x >= 0 for x in c["samples_ns"])
            if c["strategy"] in bench.MAPPING_STRATEGIES:
                assert len(c["samples_map_ns"]) == c["repeats"]
                assert all(m <= t for m, t in zip(c["samples_map_ns"], c["samples_ns"]))
            else:
                assert "samples_map_ns" not in c


def test_the_work_counted_does_not_depend_on_how_long_earlier_groups_ran():
    """Each group maps on a machine of its own, so the counts of a cell
    follow from its input alone, not from the groups before it nor from
    the number of rounds the adaptive timing gave them."""
    first = bench.run_study(["contiguous", "scattered"], [16, 256], quick=True, progress=False)
    again = bench.run_study(["scattered", "contiguous"], [256, 16], quick=True, progress=False)

    def counts(result):
        return {(c["layout"], c["npages"], c["strategy"]): bench._work_key(c) for c in result["cells"]}

    assert counts(again) == counts(first)


def test_every_cell_has_a_sane_interval(study):
    _, _, result = study
    for c in result["cells"]:
        lo, hi = c["ns_per_page_ci"]
        assert 0 <= lo <= c["ns_per_page"] <= hi
        assert c["ci_level"] == 0.95 and 0.0 < c["ci_coverage"] <= 1.0
        assert isinstance(c["wide_ci"], bool)
        if c["ci_coverage"] < 0.95:  # too few rounds for a 95% interval: not to be trusted
            assert c["wide_ci"]
        if c["strategy"] == c["baseline"]:
            assert c["ratio_to_baseline"] == 1.0 and c["ratio_ci"] == [1.0, 1.0]
        else:
            rlo, rhi = c["ratio_ci"]
            assert 0 < rlo <= c["ratio_to_baseline"] <= rhi
    assert {c["baseline"] for c in result["cells"]} == {"sg_iommu", "c_floor"}


def test_the_median_interval_takes_the_textbook_ranks():
    """The distribution-free interval of the median: for n = 10, 20, 100
    the 95% ranks are the 2nd/9th, 6th/15th and 40th/61st order statistics
    (Binomial(n, 1/2) tables); below 6 samples it is the whole range."""
    from pydmabuf import _stats

    for n, (j, k) in {10: (2, 9), 20: (6, 15), 100: (40, 61)}.items():
        x = list(range(1000, 1000 + n))
        med, lo, hi = _stats.median_ci(x[::-1])
        assert (lo, hi) == (x[j - 1], x[k - 1])
        assert _stats.coverage(n) >= 0.95
    assert _stats.median_ci([5, 1, 3]) == (3.0, 1.0, 5.0)
    assert _stats.coverage(3) == 0.75
    with pytest.raises(ValueError):
        _stats.median_ci([])


def test_interleaving_runs_every_plan_once_a_round_rotating_with_gc_off():
    import gc

    from pydmabuf import _stats

    calls = []
    gc_state = []

    def plan(name):
        def step():
            calls.append(name)
            gc_state.append(gc.isenabled())
            return name

        return step, lambda h: None

    ticks = iter(range(0, 10**9, 100))
    samples, info = _stats.interleave({n: plan(n) for n in "abc"}, baseline="a", min_rounds=4, max_rounds=4,
                                      warmup=1, clock=lambda: next(ticks), overhead_ns=0)
    assert calls == list("abc" + "abc" "bca" "cab" "abc")  # warm-up round, then rotating starts
    assert not any(gc_state) and gc.isenabled()
    assert info["rounds"] == 4 and all(len(s) == 4 and len(u) == 4 for s, u in samples.values())


def test_interleaving_stops_early_once_the_intervals_are_tight():
    from pydmabuf import _stats

    ticks = iter(range(0, 10**12, 1000))  # every interval the same: as tight as it gets
    samples, info = _stats.interleave({"a": (lambda: None, lambda h: None), "b": (lambda: None, lambda h: None)},
                                      baseline="a", min_rounds=8, max_rounds=500, budget_s=60.0,
                                      clock=lambda: next(ticks), overhead_ns=0)
    assert info["stopped"] == "tight" and info["rounds"] == 8


def test_unit_costs_divide_each_loop_by_its_operations():
    from pydmabuf import _floors, _stats

    pfns = np.arange(1 << 12, dtype=np.uint64)
    out = _floors.floor_buffer(len(pfns), 8)
    costs = _stats.unit_costs({"pte": (lambda: _floors.floor_pte(pfns, out), len(pfns)),
                               "pte_twice": (lambda: (_floors.floor_pte(pfns, out), _floors.floor_pte(pfns, out)),
                                             len(pfns))}, min_rounds=5, budget_s=0.05)
    for name, (v, lo, hi) in costs.items():
        assert 0 <= lo <= v <= hi, name
    with pytest.raises(ValueError, match="positive whole number"):
        _stats.unit_costs({"x": (lambda: None, 0)})


def test_interleaving_sets_takes_them_in_turn_pooling_their_samples():
    """Sets of the same plans on fresh inputs: round r runs set r mod m,
    starting at plan (r div m) mod k, so every set meets every order; a
    warm-up round for each set; the samples of all sets pooled per plan."""
    from pydmabuf import _stats

    calls = []

    def plan(s, name):
        return (lambda: calls.append((s, name)), lambda h: None)

    sets = [{n: plan(s, n) for n in "ab"} for s in range(3)]
    ticks = iter(range(0, 10**9, 100))
    samples, info = _stats.interleave(sets, baseline="a", min_rounds=6, max_rounds=6, warmup=1,
                                      clock=lambda: next(ticks), overhead_ns=0)
    warm, timed = calls[:6], calls[6:]
    assert warm == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert timed == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b"),
                     (0, "b"), (0, "a"), (1, "b"), (1, "a"), (2, "b"), (2, "a")]
    assert info["sets"] == 3 and info["rounds"] == 6
    assert all(len(st) == 6 and len(un) == 6 for st, un in samples.values())


def test_interleaving_sets_stops_only_after_a_whole_turn(monkeypatch):
    """A budget or cap reached mid-turn lets the turn finish, so every set
    gives as many rounds."""
    import time

    from pydmabuf import _stats

    now = [0.0]
    per_set = {0: 0, 1: 0, 2: 0}

    def slow(s):
        def step():
            now[0] += 1.0
            per_set[s] += 1
        return step

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    sets = [{"a": (slow(s), lambda h: None)} for s in range(3)]
    samples, info = _stats.interleave(sets, min_rounds=15, max_rounds=100, budget_s=0.5, cap_s=3.0, warmup=0,
                                      overhead_ns=0)
    assert info["stopped"] == "cap" and info["rounds"] == 6 and per_set == {0: 2, 1: 2, 2: 2}
    samples, info = _stats.interleave(sets, min_rounds=1, max_rounds=100, budget_s=0.5, warmup=0, overhead_ns=0)
    assert info["stopped"] == "budget" and info["rounds"] == 3


def test_interleaving_sets_must_name_the_same_plans():
    from pydmabuf import _stats

    p = (lambda: None, lambda h: None)
    with pytest.raises(ValueError, match="same plans"):
        _stats.interleave([{"a": p, "b": p}, {"a": p}], min_rounds=1, max_rounds=1)
    with pytest.raises(ValueError, match="at least one set"):
        _stats.interleave([], min_rounds=1, max_rounds=1)
    with pytest.raises(ValueError, match="baseline"):
        _stats.interleave([{"a": p}, {"a": p}], baseline="b", min_rounds=1, max_rounds=1)


def test_a_group_is_timed_on_several_machines_and_counted_on_the_first():
    """The mapping part on a list of machines: the strategies run on each
    machine in turn (samples pooled, a whole number of turns), and the
    counts are those of one machine, the same as with a single machine."""
    from pydmabuf import workloads

    pfns = workloads.layout("scattered", 16, 1)[0]
    timing = {"min_rounds": 4, "max_rounds": 4, "budget_s": 5.0, "target": 0.0, "warmup": 1, "sets": 2}
    groups: list = []
    pooled = bench._mapping_cells([bench._Bench(), bench._Bench()], "scattered", 16, pfns, timing,
                                  ("sg_iommu", "link_pages"), groups=groups)
    single = bench._mapping_cells(bench._Bench(), "scattered", 16, pfns, dict(timing, sets=1),
                                  ("sg_iommu", "link_pages"))
    assert groups[0]["sets"] == 2 and groups[0]["rounds"] == 4
    assert [len(c.samples_ns) for c in pooled] == [4, 4]
    assert [(c.strategy, c.kernel_work, c.counters["segments"]) for c in pooled] == \
        [(c.strategy, c.kernel_work, c.counters["segments"]) for c in single]


def test_sets_on_one_given_machine_leave_it_as_they_found_it():
    """With a machine of the caller's, every set maps on that machine (fresh
    arrays and buffers each): nothing stays mapped or allocated after."""
    from pydmabuf import workloads

    m = Machine.default()
    before = _live(m)
    b = bench._Bench(m)
    groups: list = []
    cells = bench._mapping_cells([b, b, b], "scattered", 16, workloads.layout("scattered", 16, 1)[0],
                                 {"min_rounds": 6, "max_rounds": 6, "budget_s": 5.0, "target": 0.0, "warmup": 1},
                                 bench.MAPPING_STRATEGIES, groups=groups)
    assert groups[0]["sets"] == 3 and {len(c.samples_ns) for c in cells} == {6}
    assert _live(m) == before


def test_the_walk_is_timed_on_fresh_copies_of_its_input():
    from pydmabuf import workloads

    pfns = workloads.layout("fragmented", 64, 1)[0]
    groups: list = []
    cells = bench._sg_cells("fragmented", 64, pfns, {"min_rounds": 6, "max_rounds": 6, "budget_s": 5.0,
                                                     "target": 0.0, "warmup": 1, "sets": 3}, groups)
    assert groups[0]["sets"] == 3 and all(len(c.samples_ns) == 6 for c in cells)
    assert {c.strategy: c.counters["segments"] for c in cells}["sg_from_pages"] == \
        len(workloads.numpy_coalesce(pfns)[1])


def test_the_default_run_pools_fresh_sets_and_quick_does_not():
    assert bench.TIMING["mapping"]["sets"] >= 2 and bench.TIMING["sg_walk"]["sets"] >= 2
    assert bench.QUICK_TIMING["mapping"].get("sets", 1) == 1


def test_big_groups_take_the_big_budget_and_the_loop_gets_only_its_arguments():
    t = {"min_rounds": 3, "budget_s": 0.5, "sets": 3, "big_pages": 1024, "big_budget_s": 2.0}
    assert bench._group_timing(t, 1023) == {"min_rounds": 3, "budget_s": 0.5}
    assert bench._group_timing(t, 1024) == {"min_rounds": 3, "budget_s": 2.0}
    assert bench._group_timing({"budget_s": 0.5}, 1 << 20) == {"budget_s": 0.5}
    for part in ("mapping", "sg_walk"):
        d = bench.TIMING[part]
        assert d["big_budget_s"] > d["budget_s"]  # the time moved to the groups of few, long rounds


def test_unit_costs_come_from_calibration_rounds_spread_over_the_run(monkeypatch):
    """The host's unit costs are calibrated at the start, after every group
    and at the end, and each unit is the least of all those rounds (here
    the quietest round comes after the first group)."""
    calls = []
    base = {"walk_write": 10.0, "map_call": 20.0, "pte_write": 1.0, "entry_visit": 2.0, "alloc_4k": 100.0,
            "tree_pair": 300.0, "magazine_pair": 16.0}

    def fake_calibrate(rounds=7, into=None):
        calls.append(rounds)
        scale = 0.5 if len(calls) == 2 else 1.0  # the quiet moment
        raw = {k: [v * scale] * rounds for k, v in base.items()}
        if into is None:
            return raw
        for k, v in raw.items():
            into.setdefault(k, []).extend(v)
        return into

    monkeypatch.setattr(kernel_work, "calibrate", fake_calibrate)
    monkeypatch.setitem(bench.CAL_ROUNDS, "quick", (5, 2))
    result = bench.run_study(["contiguous"], [1, 16, 256], quick=True, progress=False, parts=["sg_walk"])
    start, between = 5, 2
    assert calls == [start, between, between, between, start]
    u = result["unit_costs"]
    assert u["entry_visit"]["ns"] == 1.0 and u["metadata_byte"]["ns"] == pytest.approx(50.0 / 4096)
    assert len(u["entry_visit"]["samples"]) == 2 * start + 3 * between
    calls.clear()
    monkeypatch.setitem(bench.CAL_ROUNDS, "quick", (5, 0))  # none between the groups
    bench.run_study(["contiguous"], [1, 16], quick=True, progress=False, parts=["sg_walk"])
    assert calls == [5, 5]
    # every cell is costed with the final units
    (c,) = [c for c in result["cells"] if c["strategy"] == "sg_from_pages" and c["npages"] == 16]
    assert {t["unit"]: t["unit_ns"] for t in c["kernel_est_terms"]}["entry_visit"] == 1.0


def test_a_time_cap_ends_a_group_of_long_calls_before_min_rounds(monkeypatch):
    import time

    from pydmabuf import _stats

    now = [0.0]

    def slow():
        now[0] += 1.0  # each call "takes" a second of wall time

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    samples, info = _stats.interleave({"a": (slow, lambda h: None)}, min_rounds=15, max_rounds=100,
                                      budget_s=0.5, cap_s=3.0, warmup=0, overhead_ns=0)
    assert info["stopped"] == "cap" and info["rounds"] == 5 and len(samples["a"][0]) == 5


# ------------------------------------------------------------ compare


def _synthetic(scale=None, seed=0, n=60, spread=0.01, floor=False):
    """A two-strategy study from synthetic samples: sg_iommu about 1000 ns
    a call, link_pages about 500 ns, times ``scale[strategy]``; with
    ``floor``, pte_floor about 50 ns as well."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scale = scale or {}
    cells = []
    base = None
    for name, ns in (("sg_iommu", 1000.0), ("link_pages", 500.0)) + ((("pte_floor", 50.0),) if floor else ()):
        t = ns * scale.get(name, 1.0) * (1 + spread * rng.standard_normal(n))
        if base is None:
            base = t
        c = bench.Cell("scattered", 16, name, [float(x) for x in t], samples_map_ns=[float(x) / 2 for x in t])
        c.counters = {"map_ns_per_page": 0.0, "unmap_ns_per_page": 0.0, "segments": 1,
                      "metadata_bytes_per_page": 0.0, "pte_writes_per_page": 2.0, "iotlb_invalidations": 1}
        c.baseline = "sg_iommu"
        c.ratio = (1.0, 1.0, 1.0) if name == "sg_iommu" else bench._stats.paired_ratio_ci(t, base)
        cells.append(c.as_dict())
    return {"cells": cells}


def test_compare_of_identical_samples_finds_nothing_significant():
    a = _synthetic()
    out = bench.compare(a, json.loads(json.dumps(a)))
    assert "significant differences: 0 of 2 cells, 0 of 1 ratios" in out
    assert not any(line.endswith("*") for line in out.splitlines())
    assert "ratio cells (strategy / sg_iommu): 1/1 = 100.0%" in out
    assert "ns/page cells: 2/2 = 100.0%" in out


def test_compare_of_independent_runs_of_the_same_costs_finds_nothing_significant():
    out = bench.compare(_synthetic(seed=1), _synthetic(seed=2))
    assert "significant differences: 0 of 2 cells, 0 of 1 ratios" in out


def test_compare_flags_a_doubling_with_tight_samples():
    out = bench.compare(_synthetic(), _synthetic({"link_pages": 2.0}, seed=3))
    assert "significant differences: 1 of 2 cells, 1 of 1 ratios" in out
    flagged = [line for line in out.splitlines() if line.endswith("*")]
    assert len(flagged) == 2 and all("link_pages" in line for line in flagged)
    assert "ratio cells (strategy / sg_iommu): 0/1 = 0.0%" in out
    assert "ns/page cells: 1/2 = 50.0%" in out
    # --all lists the unchanged cell too, unmarked.
    every = bench.compare(_synthetic(), _synthetic({"link_pages": 2.0}, seed=3), show_all=True)
    assert any("sg_iommu" in line and not line.endswith("*") for line in every.splitlines()
               if line.startswith("scattered"))


def test_compare_does_not_flag_a_shift_below_the_minimum_effect_nor_one_the_noise_hides():
    # 1% slower with very tight samples: real, but below the 2% that matters.
    out = bench.compare(_synthetic(spread=0.001, n=400), _synthetic({"link_pages": 1.01}, spread=0.001, n=400))
    assert "significant differences: 0 of 2 cells" in out
    # 20% slower inside +-60% noise over 7 samples: not shown significant.
    out = bench.compare(_synthetic(spread=0.6, n=7), _synthetic({"link_pages": 1.2}, seed=5, spread=0.6, n=7))
    assert "significant differences: 0 of 2 cells" in out


def test_compare_counts_kernel_estimates_when_both_runs_have_them():
    a, b = _synthetic(), _synthetic()
    for c, k in zip(a["cells"], (10.0, 4.0)):
        c["kernel_est_ns_per_page"] = k
    for c, k in zip(b["cells"], (10.5, 5.0)):
        c["kernel_est_ns_per_page"] = k
    assert "kernel_est_ns_per_page cells: 1/2 = 50.0%" in bench.compare(a, b)
    assert "kernel_est_ns_per_page cells: none in both results" in bench.compare(_synthetic(), _synthetic())


@pytest.mark.parametrize("content", ["[1, 2]", "not json at all", '{"tool": "other"}', '{"cells": {}}'])
def test_compare_refuses_a_file_that_is_not_a_study(tmp_path, capsys, content):
    from pydmabuf import cli

    good = tmp_path / "good.json"
    good.write_text(json.dumps(_synthetic()))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert cli.main(["bench", "--compare", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert "bad.json: not a pydmabuf bench study" in err and "Traceback" not in err
    assert cli.main(["bench", "--compare", str(good), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


# ------------------------------------------------------------ resources


def test_a_failing_strategy_is_skipped_and_the_others_kept(monkeypatch):
    from pydmabuf import errors

    def refuse(*a, **k):
        raise errors.OutOfMemory("no memory for the DMA-only table")

    monkeypatch.setattr(bench, "dma_buf_phys_vec_to_sgt", refuse)  # the name the study calls
    m = Machine.default()
    before = _live(m)
    result = bench.run_study(["contiguous"], [16, 256], quick=True, progress=False, machine=m)
    got = {(c["npages"], c["strategy"]) for c in result["cells"]}
    for npages in (16, 256):
        assert (npages, "ranges_to_table") not in got
        assert {(npages, s) for s in bench.MAPPING_STRATEGIES if s != "ranges_to_table"} <= got
    assert [(s["npages"], s["strategy"]) for s in result["skipped"]] == [(16, "ranges_to_table"),
                                                                         (256, "ranges_to_table")]
    assert all("no memory for the DMA-only table" in s["reason"] for s in result["skipped"])
    assert "note: contiguous 64 KiB ranges_to_table skipped: [ENOMEM] no memory" in bench.format_table(result)
    assert _live(m) == before


def test_a_failing_group_is_skipped_and_the_run_goes_on(monkeypatch):
    from pydmabuf import page_alloc

    real = page_alloc.random_runs

    def fail_big(npages, *a, **k):
        if npages == 256:
            raise MemoryError
        return real(npages, *a, **k)

    monkeypatch.setattr(page_alloc, "random_runs", fail_big)
    result = bench.run_study(["scattered", "contiguous"], [16, 256], quick=True, progress=False)
    got = {(c["layout"], c["npages"]) for c in result["cells"]}
    assert got == {("scattered", 16), ("contiguous", 16), ("contiguous", 256)}
    assert result["skipped"] == [{"layout": "scattered", "npages": 256, "strategy": None,
                                  "reason": "out of memory (MemoryError)"}]
    assert "scattered 1 MiB skipped: out of memory (MemoryError)" in result["notes"]


def _vm_flags(addr):
    """The VmFlags of the mapping of this process holding ``addr``."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                cur = lo <= addr < hi
            elif cur and line.startswith("VmFlags:"):
                return line.split()[1:]
    return None


@pytest.mark.parametrize("npages, huge", [(16, False), (1023, False), (1024, True)])
def test_a_real_buffer_is_a_fresh_private_mapping_on_a_huge_page_boundary(npages, huge):
    """The pagemap layout's buffer never reuses heap memory: it is a private
    anonymous mapping of its own starting on a huge-page boundary, advised
    to take huge pages from 4 MiB up (as NumPy advises its arrays), so what
    backs it does not depend on where an earlier allocation left the heap."""
    from pydmabuf import errors, workloads

    try:
        pfns, keep = workloads.real_pages(npages)
    except errors.NotPermitted:
        pytest.skip("this host's PFNs cannot be read")
    addr = keep.__array_interface__["data"][0]
    assert len(pfns) == npages and keep.nbytes == npages * 4096
    assert addr % workloads.HUGE_PAGE_SIZE == 0
    flags = _vm_flags(addr)
    if flags is None:
        pytest.skip("no /proc/self/smaps")
    assert "sh" not in flags  # private, not shmem
    assert ("hg" in flags) == huge


def test_big_real_memory_buffers_are_opt_in(monkeypatch):
    from pydmabuf import workloads

    made = []

    def fake_real_pages(npages):
        made.append(npages)
        return workloads.contiguous(npages), None

    monkeypatch.setattr(workloads, "real_pages", fake_real_pages)
    result = bench.run_study(["pagemap"], [16, 64], quick=True, progress=False, parts=["sg_walk"],
                             max_real_pages=16)
    assert made == [16]
    (sk,) = result["skipped"]
    assert sk["npages"] == 64 and "opt-in" in sk["reason"] and "--sizes" in sk["reason"]
    made.clear()
    bench.run_study(["pagemap"], [16, 64], quick=True, progress=False, parts=["sg_walk"], max_real_pages=None)
    assert made == [16, 64]
    # The default run's 4 GiB size is above the default cap.
    assert max(bench.DEFAULT_SIZES) > bench.DEFAULT_MAX_REAL_PAGES
    assert bench.DEFAULT_MAX_REAL_PAGES * 4096 <= 256 << 20


def _interrupt_the_second_group(monkeypatch):
    """Ctrl-C as the study's second scatterlist group starts."""
    real = bench._sg_cells
    seen = []

    def interrupt_second(layout, npages, *a):
        seen.append(npages)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(layout, npages, *a)

    monkeypatch.setattr(bench, "_sg_cells", interrupt_second)


def test_an_interrupted_run_keeps_what_it_measured(monkeypatch):
    _interrupt_the_second_group(monkeypatch)
    out: dict = {}
    with pytest.raises(KeyboardInterrupt):
        bench.run_study(["contiguous"], [16, 256, 4096], quick=True, progress=False, parts=["sg_walk"], result=out)
    assert out["interrupted"] is True
    assert {c["npages"] for c in out["cells"]} == {16}
    assert "interrupted during contiguous 1 MiB" in out["notes"][-1]
    json.loads(bench.to_json(out))
    assert "interrupted" in bench.format_table(out)


def test_the_cli_writes_what_was_measured_when_interrupted(monkeypatch, tmp_path, capsys):
    from pydmabuf import cli

    _interrupt_the_second_group(monkeypatch)
    path = tmp_path / "partial.json"
    rc = cli.main(["bench", "--quick", "--layouts", "contiguous", "--sizes", "64K,1M", "--json", str(path),
                   "--no-progress"])
    assert rc == 130
    saved = json.loads(path.read_text())
    assert saved["interrupted"] and {c["npages"] for c in saved["cells"]} == {16}
    assert "interrupted" in capsys.readouterr().err


def test_the_run_reports_its_duration_and_peak_memory(study):
    _, _, result = study
    res = result["resources"]
    assert res["seconds"] > 0 and res["peak_rss_bytes"] > 1 << 20
    assert result["timing"]["interleaved"] and result["timing"]["gc_disabled"]
    assert f"peak RSS {res['peak_rss_bytes'] / (1 << 20):.0f} MiB" in bench.format_table(result)


def test_quick_json_round_trip_through_the_cli(tmp_path, capsys):
    from pydmabuf import cli

    path = tmp_path / "quick.json"
    assert cli.main(["bench", "--quick", "--layouts", "scattered", "--sizes", "64K", "--json", str(path),
                     "--no-progress"]) == 0
    saved = json.loads(path.read_text())
    assert saved["quick"] and saved["skipped"] == [] and not saved["interrupted"]
    assert {c["strategy"] for c in saved["cells"]} == set(bench.MAPPING_STRATEGIES) | {"sg_from_pages", "c_floor",
                                                                                      "numpy"}
    assert bench.format_table(saved) and bench.format_markdown(saved)
    capsys.readouterr()
    assert cli.main(["bench", "--compare", str(path), str(path)]) == 0
    out = capsys.readouterr().out
    assert "significant differences: 0 of 13 cells, 0 of 11 ratios" in out
    assert "ratio cells (strategy / sg_iommu): 8/8 = 100.0%" in out
    assert "floor ratio cells (pte_floor / sg_iommu): 1/1 = 100.0%" in out


def test_a_wide_interval_is_marked_in_the_table(study):
    _, _, result = study
    r = json.loads(json.dumps(result))
    for c in r["cells"]:
        c["wide_ci"] = c["strategy"] == "link_pages"
    lines = [ln for ln in bench.format_table(r).splitlines() if " link_pages " in ln]
    assert lines and all("~" in ln for ln in lines)
    assert not any("~" in ln for ln in bench.format_table(r).splitlines() if " link_runs " in ln)


# ------------------------------------------------------------ plot


def test_the_plot_draws_the_estimate_and_model_time_for_cells_without_one(study, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, result = study
    maps = [c for c in result["cells"] if c["strategy"] in bench.MAPPING_STRATEGIES]
    assert bench.plot_quantity(maps)[0] == "kernel_est_ns_per_page"
    written = bench.plot(result, str(tmp_path / "study.png"))
    assert written == [str(tmp_path / "study.png"), str(tmp_path / "study-work.png")]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Kernel CPU estimate" in bench.format_markdown(result)
    # A result written before the estimate existed: the model's time, said so.
    r = json.loads(json.dumps(result))
    for c in r["cells"]:
        c.pop("kernel_est_ns_per_page")
        c.pop("kernel_work")
    assert bench.plot_quantity([c for c in r["cells"] if c["strategy"] in bench.MAPPING_STRATEGIES]) == \
        ("ns_per_page", "model CPU time")
    assert "Model CPU time" in bench.format_markdown(r)
    assert len(bench.plot(r, str(tmp_path / "model.png"))) == 2


def test_the_stale_iotlb_window_each_unmap_leaves_is_counted():
    """gpu0's domain is lazy (flush queue): every unmap through it queues
    its IOVA with the PTEs cleared and the IOTLB not yet invalidated
    (iommu_dma_free_iova -> queue_iova), so the whole buffer stays
    reachable through a cached translation until the flush; dma-direct
    (sg_direct) and the floor leave nothing behind."""
    r = bench.run_study(["fragmented"], [16], quick=True, progress=False, parts=("mapping",))
    by = {c["strategy"]: c["counters"] for c in r["cells"]}
    for name in ("sg_iommu", "link_pages", "link_runs", "dmabuf_static", "dmabuf_dynamic", "dmabuf_ranges",
                 "dmabuf_pal"):
        assert (by[name]["stale_window_unmaps"], by[name]["stale_window_bytes"]) == (1, 16 * 4096), name
    for name in ("sg_direct", "pte_floor"):
        assert (by[name]["stale_window_unmaps"], by[name]["stale_window_bytes"]) == (0, 0), name
    assert "stale window" in bench.format_table(r)


def test_a_strict_domain_leaves_no_stale_window():
    from pydmabuf import Machine

    r = bench.run_study(["fragmented"], [16], quick=True, progress=False, parts=("mapping",),
                        machine=Machine.default(flush_timer=False, strict=True))
    assert all(c["counters"]["stale_window_bytes"] == 0 for c in r["cells"])


def test_compare_counts_the_floor_ratios_apart_from_the_strategies():
    """pte_floor / sg_iommu is a floor's ratio, not a strategy's: --compare
    reports its agreement on its own line, and a floor that moves does not
    count against the strategies (nor a strategy that moves for the floor)."""
    out = bench.compare(_synthetic(floor=True), _synthetic({"pte_floor": 1.5}, seed=4, floor=True))
    assert "ratio cells (strategy / sg_iommu): 1/1 = 100.0%" in out
    assert "floor ratio cells (pte_floor / sg_iommu): 0/1 = 0.0%" in out
    out = bench.compare(_synthetic(floor=True), _synthetic({"link_pages": 1.5}, seed=4, floor=True))
    assert "ratio cells (strategy / sg_iommu): 0/1 = 0.0%" in out
    assert "floor ratio cells (pte_floor / sg_iommu): 1/1 = 100.0%" in out
