"""Replaying DMA traces: the parser, the reconstruction, the replay, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydmabuf import Machine, kernel_work, replay
from pydmabuf.cli import main

DATA = Path(__file__).parent / "data" / "traces"
SAMPLES = ("nvme-lazy.trace", "gpu-strict.report")


@pytest.fixture(scope="module")
def geometry() -> dict[str, replay.DeviceGeometry]:
    return replay.geometry_from_machine(Machine.from_toml(DATA / "machine.toml"))


@pytest.fixture(scope="module")
def units() -> dict:
    # every unit pinned, so the estimate is a pure function of the counts
    prof = kernel_work.load_profile()
    for u in kernel_work.MEASURED_UNITS:
        prof[u] = {"ns": 1.0, "source": "test"}
    return prof


# ------------------------------------------------------------------ parsing

TRACEFS_MAP = ("     kworker/1:1-41     [001] d.h1.   101.000110: dma_map_page: 0000:05:00.0 dir=TO_DEVICE "
               "dma_addr=7c001200 size=1500 phys_addr=17c001200 attrs=SKIP_CPU_SYNC|WEAK_ORDERING")


def test_parse_tracefs_header_and_map_fields() -> None:
    ev = replay.parse_line(TRACEFS_MAP, 7)
    assert isinstance(ev, replay.Event)
    assert (ev.task, ev.pid, ev.cpu, ev.ts, ev.name, ev.lineno) == ("kworker/1:1", 41, 1, 101.00011, "dma_map_page", 7)
    assert ev.fields == {"device": "0000:05:00.0", "dir": "TO_DEVICE", "attrs": "SKIP_CPU_SYNC|WEAK_ORDERING",
                         "dma_addr": 0x7C001200, "size": 1500, "phys_addr": 0x17C001200}


@pytest.mark.parametrize("head", [
    "  Web Content-12345 [003]  5.5: ",                  # trace-cmd report: comm with a space, no flags
    "  <...>-7 (    7) [000] .N..  5.5: ",              # tgid column, 4-character flags
    "  irq/12-foo-bar-99 [010] dnh2. 5.5: ",            # dashes in the comm
    "  kworker/u8:2-1234  [001]  5.500000: dma:",       # system-qualified name ("dma:dma_map_phys")
])
def test_parse_header_variants(head: str) -> None:
    line = head + ("" if head.endswith(":") else "") + \
        ("dma_map_phys: " if not head.endswith("dma:") else "dma_map_phys: ") + \
        "dev0 dir=FROM_DEVICE dma_addr=1000 size=4096 phys_addr=2000 attrs="
    ev = replay.parse_line(line)
    assert isinstance(ev, replay.Event), ev
    assert ev.name == "dma_map_phys" and ev.fields["dma_addr"] == 0x1000 and ev.fields["phys_addr"] == 0x2000


def test_parse_map_sg_truncated_and_its_reconstruction() -> None:
    n, e = 200, 150
    phys = [0x10000000 + 0x2000 * i for i in range(128)]
    dmas = [0xF0000000 + 0x1000 * i for i in range(128)]
    line = (f"  x-1 [000] ..... 1.0: dma_map_sg: d0 dir=TO_DEVICE nents=128/{n} ents=128/{e} [TRUNCATED] "
            f"dma_addrs={{{','.join(hex(x) for x in dmas)}}} sizes={{{','.join(['0x1000'] * 128)}}} "
            f"phys_addrs={{{','.join(hex(x) for x in phys)}}} attrs=")
    ev = replay.parse_line(line)
    assert isinstance(ev, replay.Event)
    assert ev.fields["truncated"] and ev.fields["full_nents"] == n and ev.fields["full_ents"] == e
    stats = replay.TraceStats()
    (op,) = list(replay.rebuild_ops([ev], stats))
    assert len(op.phys) == n and len(op.lens) == n
    # the 22 untraced segments at the traced mean (4 KiB)
    assert op.nbytes == e * 4096 == int(op.lens.sum())
    assert "sg_truncated" in op.assumed and "sg_lengths_to_page_end" in op.assumed
    # untraced entries do not touch each other or the traced ones
    assert len(np.unique(op.phys)) == n


def test_parse_map_sg_612_format_without_counts() -> None:
    line = ("  x-1 [000] 1.0: dma_map_sg: d0 dir=TO_DEVICE dma_addrs={0x100000,0x200000} sizes={0x1000,0x2000} "
            "phys_addrs={0x5000,0x9000} attrs=")
    ev = replay.parse_line(line)
    assert isinstance(ev, replay.Event)
    (op,) = list(replay.rebuild_ops([ev], replay.TraceStats()))
    assert op.lens.tolist() == [0x1000, 0x2000] and op.assumed == ("sg_lengths_from_segments",)


@pytest.mark.parametrize("line", [
    "  x-1 [000] ..... 1.0: map: IOMMU: iova=0x00000000fe000000 - 0x00000000fe001000 paddr=0x0000000123456000 size=4096",
    "  x-1 [000] ..... 1.0: unmap: IOMMU: iova=0x00000000fe000000 - 0x00000000fe001000 size=4096 unmapped_size=4096",
    "  x-1 [000] ..... 1.0: io_page_fault: IOMMU:nvme 0000:03:00.0 iova=0x00000000deadb000 flags=0x0020",
    "  x-1 [000] ..... 1.0: swiotlb_bounced: dev_name: 0000:05:00.0 dma_mask=ffffffff dev_addr=17f000200 size=1500",
    "  x-1 [000] ..... 1.0: swiotlb_bounced: dev_name: 0000:05:00.0 dma_mask=ffffffff dev_addr=17f000200 size=1500 FORCE",
    "  x-1 [000] ..... 1.0: dma_unmap_sg: d0 dir=BIDIRECTIONAL phys_addrs={0x1000} attrs=",
    "  x-1 [000] ..... 1.0: dma_map_sg_err: d0 dir=BIDIRECTIONAL dma_addrs={0x1000,0x3000} err=-12 attrs=",
    "  x-1 [000] ..... 1.0: dma_sync_sg_for_cpu: d0 dir=FROM_DEVICE dma_addrs={0x1000} sizes={0x200}",
    "  x-1 [000] ..... 1.0: dma_alloc: d0 dir=BIDIRECTIONAL dma_addr=fff00000 size=8192 virt_addr=00000000a1b2c3d4 "
    "flags=GFP_KERNEL attrs=",
    "  x-1 [000] ..... 1.0: dma_free_sgt: d0 dir=TO_DEVICE dma_addr=fff00000 size=8192 phys_addrs={0x1000,0x2000}",
])
def test_parse_every_event_class(line: str) -> None:
    ev = replay.parse_line(line)
    assert isinstance(ev, replay.Event) and ev.fields, ev


def test_unknown_events_skipped_by_name_and_malformed_lines_numbered() -> None:
    text = [
        "# tracer: nop\n",
        "cpus=2\n",
        "  x-1 [000] ..... 1.0: sched_switch: prev_comm=a prev_pid=0 ==> next_comm=b next_pid=1\n",
        "  x-1 [000] ..... 1.1: dma_map_phys: d0 dir=TO_DEVICE dma_addr=zz size=4096 phys_addr=1000 attrs=\n",
        "garbage that is no event\n",
        "  x-1 [000] ..... 1.2: dma_map_phys: d0 dir=TO_DEVICE dma_addr=2000 size=4096 phys_addr=1000 attrs=\n",
        "  x-1 [000] ..... 1.3: sched_switch: x\n",
        "  x-1 [000] ..... 1.4: dma_unmap_phys: d0 dir=TO_DEVICE dma_addr=2000 size=4096 attrs=\n",
    ]
    res = replay.replay(text, strategies=["traced"])
    assert res["skipped"] == {"sched_switch": 2}
    assert res["malformed"] == [4, 5]
    d = res["devices"]["d0"]
    assert (d["maps"], d["unmaps"], d["bytes_mapped"]) == (1, 1, 4096)


# ------------------------------------------------------------- replaying


def test_replayed_single_mapping_counts_are_kernel_work_of_its_pages() -> None:
    phys, size = 0x123456100, 3 * 4096
    text = [f"  x-1 [000] ..... 1.0: dma_map_phys: 0000:01:00.0 dir=TO_DEVICE dma_addr=fff00100 size={size} "
            f"phys_addr={phys:x} attrs=\n",
            "  x-1 [000] ..... 1.1: dma_unmap_phys: 0000:01:00.0 dir=TO_DEVICE dma_addr=fff00100 size=12288 attrs=\n"]
    res = replay.replay(text, strategies=["traced", "sg_iommu:strict", "link_runs:lazy"])
    s = res["devices"]["0000:01:00.0"]["strategies"]
    pfns = np.arange(phys >> 12, ((phys + size - 1) >> 12) + 1, dtype=np.uint64)   # 4 pages touched
    link = kernel_work.kernel_work("link_runs", pfns, strict=False)
    assert s["link_runs:lazy"]["kernel_work"] == link
    # __iommu_dma_map: the same calls without the dma_iova_state
    assert s["traced"]["kernel_work"] == {**link, "metadata_bytes": 0}
    assert s["sg_iommu:strict"]["kernel_work"] == kernel_work.kernel_work("sg_iommu", pfns, strict=True)


def _ref_4k(call_pages: list[int], strict: bool) -> dict[str, int]:
    """Page by page: a descent starts at each call's first page and at
    every 512-entry table boundary."""
    walks, iova = 0, 0
    for n in call_pages:
        for k in range(n):
            if k == 0 or (iova + k) % 512 == 0:
                walks += 1
        iova += n
    total = iova
    uwalks = sum(1 for p in range(total) if p == 0 or p % 512 == 0)
    return {"pte_writes": 2 * total, "pt_walks": walks + uwalks, "iotlb_invalidations": 1}


@given(st.lists(st.integers(1, 1500), min_size=1, max_size=8), st.booleans())
@settings(max_examples=60, deadline=None)
def test_pagetable_work_4k_matches_a_page_by_page_count(calls: list[int], strict: bool) -> None:
    got = replay.pagetable_work_4k(np.array(calls), strict=strict)
    assert {k: got[k] for k in ("pte_writes", "pt_walks", "iotlb_invalidations")} == _ref_4k(calls, strict)
    assert got["_queued"] == int(not strict)


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_replays_on_every_strategy(sample: str, geometry: dict, units: dict) -> None:
    res = replay.replay(DATA / sample, geometry=geometry, units=units)
    assert res["malformed"] == [] and res["skipped"] == {"sched_switch": 1}
    for name, d in res["devices"].items():
        assert set(d["strategies"]) == set(replay.STRATEGIES)
        if not d["maps"]:
            continue
        s = d["strategies"]
        for st_ in replay.STRATEGIES:
            kw = s[st_]["kernel_work"]
            assert kw["iova_allocs"] in (0, d["maps"]) and kw["iova_frees"] == kw["iova_allocs"]
            assert s[st_]["kernel_est_ns"] is not None and s[st_]["kernel_est_ns"] >= 0
        for path in ("sg_iommu", "link_runs"):
            lazy, strict = s[f"{path}:lazy"], s[f"{path}:strict"]
            assert lazy["kernel_work"]["pte_writes"] == strict["kernel_work"]["pte_writes"]
            # an issued invalidation costs more than a queued one
            assert strict["kernel_est_ns"] > lazy["kernel_est_ns"]
            # 4 KiB leaves only: never fewer entries written than with huge leaves
            assert s[f"{path}:lazy:4k"]["kernel_work"]["pte_writes"] >= lazy["kernel_work"]["pte_writes"]
        # the list-free link carries no scatterlist, only a dma_iova_state per mapping
        assert s["link_runs:lazy"]["kernel_work"]["sg_entries"] == 0
        assert s["link_runs:lazy"]["kernel_work"]["metadata_bytes"] == 16 * d["maps"]
    total = res["total"]["strategies"]["traced"]["kernel_work"]["iommu_map_calls"]
    assert total == sum(d["strategies"]["traced"]["kernel_work"]["iommu_map_calls"] for d in res["devices"].values())


def test_sample_trace_reports_truncation_swiotlb_faults_and_iommu_calls(geometry: dict) -> None:
    res = replay.replay(DATA / "nvme-lazy.trace", geometry=geometry, strategies=["traced"])
    nvme = res["devices"]["0000:03:00.0"]
    assert nvme["assumed"]["sg_truncated"] >= 1
    assert nvme["io_page_faults"] == 1 and nvme["syncs"] == 1
    nic = res["devices"]["0000:05:00.0"]
    assert nic["swiotlb"] == {"bounces": 1, "bytes": 1500}
    # a device of the machine file without an IOMMU: dma-direct, no IOMMU work, no IOVA
    assert nic["strategies"]["traced"]["kernel_work"] == {k: 0 for k in kernel_work.KEYS}
    assert nic["strategies"]["traced"]["iova"] is None
    assert res["iommu_events"] == {"map": 1, "map_bytes": 4096, "unmap": 1, "unmap_bytes": 4096}
    calls = res["total"]["strategies"]["traced"]["kernel_work"]["iommu_map_calls"]
    assert f"iommu:map events in the trace: 1 (every domain and device); the model's 'traced' " \
           f"iommu_map_calls for the DMA-API mappings read: {calls}" in replay.format_table(res)
    # Lazy domain: every unmap went through the flush queue, so its bytes
    # stayed reachable through a cached translation until a flush; the
    # strict domain leaves no window.
    lazy = nvme["stale_iotlb"]["lazy"]
    assert lazy["queued_unmaps"] == nvme["unmaps"] - nvme["unmatched_unmaps"] > 0
    assert lazy["queued_bytes"] >= lazy["peak_queued_bytes"] > 0
    both = replay.replay(DATA / "nvme-lazy.trace", geometry=geometry, strategies=["sg_iommu:strict"])
    assert both["devices"]["0000:03:00.0"]["stale_iotlb"]["strict"] == {
        "queued_unmaps": 0, "queued_bytes": 0, "peak_queued_bytes": 0, "flushes": 0, "queued_at_end_bytes": 0}


def test_device_and_limit_select_what_is_replayed() -> None:
    res = replay.replay(DATA / "gpu-strict.report", device="0000:06:00.0", strategies=["traced"])
    assert list(res["devices"]) == ["0000:06:00.0"]
    res = replay.replay(DATA / "gpu-strict.report", limit=5, strategies=["traced"])
    assert sum(d["maps"] + d["unmaps"] + d["unmatched_unmaps"] for d in res["devices"].values()) == 5


def test_replay_streams_an_endless_trace() -> None:
    """A generator of lines that never ends: --limit stops it, so nothing
    reads the whole input first."""
    def endless():
        for i in itertools.count():
            yield (f"  x-1 [000] ..... {i}.0: dma_map_phys: d0 dir=TO_DEVICE dma_addr={0x100000 + i * 0x1000:x} "
                   f"size=4096 phys_addr={0x5000 + i * 0x1000:x} attrs=\n")
    res = replay.replay(endless(), limit=300, strategies=["traced"])
    assert res["devices"]["d0"]["maps"] == 300
    assert res["devices"]["d0"]["live_at_end"] == 300


# ----------------------------------------------------------- IOVA agreement


@pytest.mark.parametrize("flavour", ["trace", "report"])
@pytest.mark.parametrize("strict", [False, True])
def test_iova_choices_agree_with_a_trace_of_the_models_allocator(flavour: str, strict: bool) -> None:
    geo = {"0000:03:00.0": replay.DeviceGeometry("g", strict, 48, 2, 0.01, (1 << 64) - 1, True)}
    text = list(replay.synthesize_trace(ops=150, seed=5, flavour=flavour, strict=strict, ncpus=2))
    res = replay.replay(text, geometry=geo, strategies=["traced"])
    ag = res["devices"]["0000:03:00.0"]["iova_agreement"]
    assert ag["compared"] == 150 and ag["agree"] == 150
    assert res["devices"]["0000:03:00.0"]["assumed"].get("sg_truncated", 0) >= 1


def test_iova_agreement_detects_a_wrong_geometry() -> None:
    text = list(replay.synthesize_trace(ops=150, seed=5, strict=False, ncpus=2))
    # the trace was made with a 32-bit-preferring PCI device; a non-PCI device
    # allocates from the top of the 48-bit aperture instead
    wrong = {"0000:03:00.0": replay.DeviceGeometry("g", False, 48, 2, 0.01, (1 << 64) - 1, False)}
    ag = replay.replay(text, geometry=wrong, strategies=["traced"])["devices"]["0000:03:00.0"]["iova_agreement"]
    assert ag["compared"] == 150 and ag["agree"] == 0 and ag["first_disagreement_line"] is not None


def test_sample_traces_agree_with_their_machine(geometry: dict) -> None:
    for sample, dev in zip(SAMPLES, ("0000:03:00.0", "0000:04:00.0")):
        ag = replay.replay(DATA / sample, geometry=geometry, strategies=["traced"])["devices"][dev]["iova_agreement"]
        assert ag["agree"] == ag["compared"] > 0


def test_iova_high_water_mark_lazy_holds_more_than_strict(geometry: dict) -> None:
    res = replay.replay(DATA / "nvme-lazy.trace", geometry=geometry,
                        strategies=["link_runs:lazy", "link_runs:strict"])
    s = res["devices"]["0000:03:00.0"]["strategies"]
    lazy, strict = s["link_runs:lazy"]["iova"], s["link_runs:strict"]["iova"]
    assert lazy["peak_nbytes"] >= strict["peak_nbytes"] > 0
    assert 0.0 <= strict["fragmentation_max"] <= 1.0
    assert lazy["held_at_end_nbytes"] == 0


# -------------------------------------------------------------- fuzzing


@given(st.lists(st.text(max_size=300), max_size=30))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_any_text_never_crashes_the_replay(lines: list[str]) -> None:
    res = replay.replay([ln + "\n" for ln in lines], strategies=["traced", "link_runs:strict:4k"])
    assert res["malformed_count"] == len(res["malformed"]) <= len(lines)


_SAMPLE_LINES = [ln for s in SAMPLES for ln in (DATA / s).read_bytes().splitlines(keepends=True)
                 if not ln.startswith(b"#")]


@given(st.lists(st.tuples(st.sampled_from(_SAMPLE_LINES), st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["flip", "insert", "delete"])),
    max_size=6)), min_size=1, max_size=12))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_sample_lines_never_crash_the_replay(picks: list) -> None:
    out = []
    for line, muts in picks:
        b = bytearray(line)
        for pos, byte, how in muts:
            if not b:
                break
            i = pos % len(b)
            if how == "flip":
                b[i] = byte
            elif how == "insert":
                b.insert(i, byte)
            else:
                del b[i]
        out.append(bytes(b))
    res = replay.replay(out, strategies=["traced", "sg_iommu:lazy"])
    lines = sum(1 for x in out for _ in x.splitlines()) or 1
    assert len(res["malformed"]) <= lines


def test_parse_never_accepts_a_line_longer_than_the_limit() -> None:
    got = replay.parse_line(TRACEFS_MAP + " " * replay.MAX_LINE)
    assert isinstance(got, replay.Malformed)


# ------------------------------------------------------------------ CLI


def test_cli_replay_json_has_the_issue_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    csv = tmp_path / "r.csv"
    md = tmp_path / "r.md"
    rc = main(["replay", str(DATA / "nvme-lazy.trace"), "--machine", str(DATA / "machine.toml"), "--no-progress",
               "--strategies", "traced,link_runs:lazy", "--json", str(out), "--csv", str(csv), "--markdown", str(md)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert {"devices", "skipped", "malformed"} <= set(r)
    d = r["devices"]["0000:03:00.0"]
    assert {"events", "maps", "unmaps", "bytes_mapped", "assumed", "strategies"} <= set(d)
    assert set(d["strategies"]) == {"traced", "link_runs:lazy"}
    assert set(d["strategies"]["traced"]["kernel_work"]) == set(kernel_work.KEYS)
    assert d["strategies"]["traced"]["kernel_est_ns"] > 0
    assert d["events"]["dma_map_sg"] >= 1
    assert csv.read_text().count("\n") == 1 + 2 * len(r["devices"])
    assert "IOVA agreement" in md.read_text()
    assert "0000:03:00.0" in capsys.readouterr().out


def test_cli_replay_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(DATA / "nvme-lazy.trace"), "--strategies", "nope"]) == 2
    assert "unknown strategy nope" in capsys.readouterr().err
    assert main(["replay", str(DATA / "missing.trace")]) == 2
    assert main(["replay", str(DATA / "nvme-lazy.trace"), "--limit", "-1"]) == 2


_HEXNUM = st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1, (1 << 64) - 1, (1 << 64) - 4096, 1 << 63]))


@given(st.lists(st.tuples(st.sampled_from(["dma_map_phys", "dma_unmap_phys", "dma_map_sg", "dma_unmap_sg"]),
                          _HEXNUM, _HEXNUM, st.integers(0, (1 << 64) - 1), st.integers(0, 300), st.integers(0, 300)),
                max_size=12))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_well_formed_events_with_extreme_values(evs: list) -> None:
    """Addresses near 2**64, sizes of 2**64 - 1, nents far beyond the
    arrays: parsed or refused, counted, never a crash or a huge allocation."""
    lines = []
    for name, a, b, size, n, full in evs:
        if name == "dma_map_phys":
            t = f"d0 dir=TO_DEVICE dma_addr={a:x} size={size} phys_addr={b:x} attrs="
        elif name == "dma_unmap_phys":
            t = f"d0 dir=TO_DEVICE dma_addr={a:x} size={size} attrs="
        elif name == "dma_map_sg":
            k = min(n, 128)
            t = (f"d0 dir=TO_DEVICE nents={k}/{max(full, k)} ents={k}/{max(full, k)}"
                 f"{' [TRUNCATED]' if full > k else ''} dma_addrs={{{','.join([hex(a)] * k)}}} "
                 f"sizes={{{','.join([hex(size & 0xFFFFFFFF)] * k)}}} phys_addrs={{{','.join([hex(b)] * k)}}} attrs=")
        else:
            t = f"d0 dir=TO_DEVICE phys_addrs={{{hex(b)}}} attrs="
        lines.append(f"  x-1 [000] ..... 1.0: {name}: {t}\n")
    res = replay.replay(lines, strategies=["traced", "sg_iommu:strict:4k", "link_runs:lazy"])
    assert res["malformed_count"] <= len(lines)


def test_progress_line_on_stderr_for_long_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "long.trace"
    p.write_text("#\n" * 70000 + TRACEFS_MAP + "\n")
    res = replay.replay(p, progress=True, strategies=["traced"])
    err = capsys.readouterr().err
    assert "replay: 65,536 lines" in err and "%" in err
    assert res["devices"]["0000:05:00.0"]["maps"] == 1
    replay.replay(p, progress=False, strategies=["traced"])
    assert capsys.readouterr().err == ""


def test_same_key_mapped_twice_pairs_first_in_first_out() -> None:
    m = "  x-1 [000] ..... 1.{}: dma_map_phys: d0 dir=TO_DEVICE dma_addr=5000 size=4096 phys_addr=5000 attrs=\n"
    u = "  x-1 [000] ..... 1.{}: dma_unmap_phys: d0 dir=TO_DEVICE dma_addr=5000 size=4096 attrs=\n"
    res = replay.replay([m.format(1), m.format(2), u.format(3), u.format(4), u.format(5)], strategies=["traced"])
    d = res["devices"]["d0"]
    assert (d["maps"], d["unmaps"], d["unmatched_unmaps"], d["live_at_end"]) == (2, 2, 1, 0)
    assert d["assumed"] == {"direct_by_address": 2}
