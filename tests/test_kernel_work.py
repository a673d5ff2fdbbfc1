"""Kernel work, counted: the counts of pydmabuf.kernel_work pinned on small
inputs worked out by hand from the kernel's algorithm (iommu_dma_map_sg,
iommu_map_sg, __finalise_sg, iommu_pgsize + io-pgtable-arm, dma_iova_*,
lib/scatterlist.c), and the estimate and its cost profile."""

from __future__ import annotations

import numpy as np
import pytest

from pydmabuf import kernel_work as kw

A = 0x100000  # pfn of 4 GiB: 1 GiB aligned (so 2 MiB aligned too)
B = 0x200123  # a pfn far from A, not 2 MiB aligned


def pfns(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.uint64)


def test_chunk_bytes_follow_get_next_sg() -> None:
    # <= 128 entries: one kmalloc_array(n, 32) in its slab class; 128: a page
    assert kw.sg_chunk_bytes(1) == 32
    assert kw.sg_chunk_bytes(3) == 96
    assert kw.sg_chunk_bytes(5) == 192        # 160 bytes -> kmalloc-192
    assert kw.sg_chunk_bytes(128) == 4096
    # 129: a full chunk (127 entries + the chain link) and a chunk of 2 (64 B)
    assert kw.sg_chunk_bytes(129) == 4096 + 64
    # 255: 127 + 128 -> two pages; 256: 127 + 127 + 2 -> two pages + 64 B
    assert kw.sg_chunk_bytes(255) == 2 * 4096
    assert kw.sg_chunk_bytes(256) == 2 * 4096 + 64


def test_contiguous_pages_through_the_iommu() -> None:
    w = kw.kernel_work("sg_iommu", pfns(A, A + 1, A + 2, A + 3), detail=True)
    # one run -> one entry, one iommu_map_nosync of 16 KiB: iommu_pgsize
    # picks 4 KiB (16K < 2M), count 4 (the 2 MiB boundary is out of reach),
    # one descent writes 4 leaves.  Unmap: one iommu_unmap_fast, one
    # descent, 4 leaves cleared.  Lazy domain: one queued invalidation.
    assert w["iommu_map_calls"] == 1 and w["iommu_unmap_calls"] == 1
    assert w["pt_walks"] == 1 + 1
    assert w["pte_writes"] == 4 + 4
    assert w["iotlb_invalidations"] == 1 and w["_queued"] == 1
    assert w["iova_allocs"] == 1 and w["iova_frees"] == 1 and w["iotlb_sync_map"] == 1
    assert w["sg_entries"] == 1
    # visits: build 1 + layout pass 1 + iommu_map_sg (i = 0..nents) 2
    # + __finalise_sg 1 + unmap (first loop 1, second loop 1 segment) 2 = 7
    assert w["sg_entry_visits"] == 1 + 1 + 2 + 1 + 1 + 1
    assert w["metadata_bytes"] == 32


def test_two_runs_sg_and_page_links() -> None:
    p = pfns(A, A + 1, B, B + 1)
    sg = kw.kernel_work("sg_iommu", p)
    # 2 entries, one map call per run, 2 descents + 1 for the unmap;
    # 4 leaves set, 4 cleared
    assert (sg["sg_entries"], sg["iommu_map_calls"], sg["pt_walks"], sg["pte_writes"]) == (2, 2, 3, 8)
    # build 2 + layout 2 + map_sg 3 + finalise 2 + unmap: 1 + 1 segment
    # + the first empty entry after it (count 1 < nents 2) = 12
    assert sg["sg_entry_visits"] == 2 + 2 + 3 + 2 + 1 + 1 + 1
    assert sg["metadata_bytes"] == 64
    lp = kw.kernel_work("link_pages", p)
    # one dma_iova_link (-> iommu_map_nosync) per page, one descent each
    assert (lp["iommu_map_calls"], lp["pt_walks"], lp["pte_writes"]) == (4, 5, 8)
    assert (lp["sg_entries"], lp["sg_entry_visits"], lp["metadata_bytes"]) == (0, 0, 16)
    lr = kw.kernel_work("link_runs", p)
    assert (lr["iommu_map_calls"], lr["pt_walks"], lr["pte_writes"]) == (2, 3, 8)


def test_scattered_pages_make_as_many_map_calls_either_way() -> None:
    p = pfns(A, A + 2, A + 4)
    sg = kw.kernel_work("sg_iommu", p)
    lp = kw.kernel_work("link_pages", p)
    # no two pages touch: iommu_map_sg makes one call per entry, like the links
    assert sg["iommu_map_calls"] == lp["iommu_map_calls"] == 3
    assert sg["pt_walks"] == lp["pt_walks"] == 3 + 1
    # build 3 + layout 3 + map_sg 4 + finalise 3 + unmap 1 + 1 + 1 = 16
    assert sg["sg_entry_visits"] == 16 and lp["sg_entry_visits"] == 0


def test_aligned_2m_run_takes_a_huge_leaf() -> None:
    p = np.arange(A, A + 512, dtype=np.uint64)
    lr = kw.kernel_work("link_runs", p, detail=True)
    # one 2 MiB call, IOVA and phys both 2 MiB aligned: iommu_pgsize picks
    # 2 MiB (the 1 GiB boundary is out of reach: count 1): one L2 leaf, one
    # descent; the unmap clears that leaf at L2 in one descent.
    assert lr["_leaves_2m"] == 1 and lr["_leaves_4k"] == 0
    assert (lr["pt_walks"], lr["pte_writes"], lr["iotlb_invalidations"]) == (2, 2, 1)
    lp = kw.kernel_work("link_pages", p, detail=True)
    # page by page: 512 leaves, 512 descents.  The unmap of the whole
    # aligned 2 MiB picks the 2 MiB size, finds a table there, clears it
    # (once in the non-leaf loop, once with the rest), flushes the walk
    # cache and frees the table, which the next map installs again (1).
    assert lp["_leaves_4k"] == 512 and lp["_tables_installed"] == 1 and lp["_tables_cleared"] == 1
    assert lp["pt_walks"] == 512 + 1
    assert lp["pte_writes"] == 512 + 1 + 1 + 1
    assert lp["iotlb_invalidations"] == 1 + 1   # the walk flush, the queued one
    strict = kw.kernel_work("link_pages", p, strict=True, detail=True)
    # strict: the walk flush and one iommu_iotlb_sync of the gather
    assert strict["iotlb_invalidations"] == 2 and strict["_queued"] == 0


def test_misaligned_run_stays_in_4k_leaves_and_walks_per_table() -> None:
    # 1024 contiguous pages starting 1 page into a 2 MiB block: IOVA is
    # 2 MiB aligned, phys is not -> (iova ^ paddr) & (2M - 1) != 0, so only
    # 4 KiB leaves; each descent stops at the end of its L3 table: 2 MiB
    # of IOVA per table -> 2 descents for 4 MiB.
    p = np.arange(A + 1, A + 1 + 1024, dtype=np.uint64)
    w = kw.kernel_work("link_runs", p, detail=True)
    assert w["_leaves_4k"] == 1024 and w["_map_walks"] == 2
    # the unmap takes both 2 MiB blocks at L2 in one descent; both hold
    # tables: 2 cleared twice each, 2 installed again by the map
    assert w["_unmap_walks"] == 1 and w["_tables_cleared"] == 2 and w["_tables_installed"] == 2
    assert w["pte_writes"] == 1024 + 2 + (2 + 2)


def test_run_split_at_max_segment() -> None:
    # 1048577 contiguous pages: sg_alloc_table_from_pages splits at
    # max_segment 0xFFFFF000 (1048575 pages): 2 entries.  iommu_map_sg
    # joins them again (physically contiguous): 1 map call.  4 GiB + 4 KiB
    # from a 1 GiB-aligned pfn at a 1 GiB-aligned IOVA: 4 x 1 GiB leaves in
    # one descent, then one 4 KiB leaf in another.  __finalise_sg: the second
    # entry (8 KiB) does not fit after 0xFFFFF000 bytes under UINT_MAX: 2
    # segments.
    p = np.arange(A, A + 1048577, dtype=np.uint64)
    w = kw.kernel_work("sg_iommu", p, detail=True)
    assert w["sg_entries"] == 2 and w["iommu_map_calls"] == 1 and w["_segments"] == 2
    assert (w["_leaves_1g"], w["_leaves_4k"], w["_map_walks"], w["_unmap_walks"]) == (4, 1, 2, 2)
    assert w["pte_writes"] == 5 + 5
    # build 2 + layout 2 + map_sg 3 + finalise 2 + unmap 1 + 2 segments = 12
    assert w["sg_entry_visits"] == 12
    assert w["metadata_bytes"] == 64


def test_direct_path_counts_passes_only() -> None:
    w = kw.kernel_work("sg_direct", pfns(A, A + 1, B))
    # 2 entries: written by the builder, one dma_direct_map_sg pass, one unmap pass
    assert w == {**{k: 0 for k in kw.KEYS}, "sg_entries": 2, "sg_entry_visits": 6, "metadata_bytes": 64}


def test_ranges_to_table_links_every_range_and_fills_one_entry() -> None:
    rows = np.array([[0x4800000000, 8192], [0x4800100000, 4096]], dtype=np.uint64)
    w = kw.kernel_work("ranges_to_table", pfns(A, A + 1, B), bar_ranges=rows)
    # THRU_HOST_BRIDGE: one dma_iova_link per range, one sync, one sg entry
    # (12 KiB < MAX_SG_ENT_SZ); dma_buf_dma (32) + state (16) + 1 entry (32)
    assert (w["iommu_map_calls"], w["iotlb_sync_map"], w["sg_entries"], w["sg_entry_visits"]) == (2, 1, 1, 1)
    assert w["metadata_bytes"] == 32 + 16 + 32
    bus = kw.kernel_work("ranges_to_table", pfns(A), bar_ranges=rows, p2p_iova=False)
    assert bus["iommu_map_calls"] == 0 and bus["sg_entries"] == 2 and bus["metadata_bytes"] == 32 + 64


def test_counts_are_exact_ints_with_exactly_the_issue_keys() -> None:
    from pydmabuf import workloads

    p, _ = workloads.layout("fragmented", 4096, seed=3)
    for strat in kw.PATHS:
        if strat == "ranges_to_table":
            continue
        w = kw.kernel_work(strat, p)
        assert tuple(w) == kw.KEYS
        assert all(type(v) is int and v >= 0 for v in w.values())
        assert w == kw.kernel_work(strat, p.copy())


def test_unknown_strategy_and_segment_boundary_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        kw.kernel_work("sg_magic", pfns(A))
    with pytest.raises(ValueError, match="segment boundary"):
        kw.kernel_work("sg_iommu", pfns(A), seg_boundary=0xFFFF)
    with pytest.raises(ValueError, match="max segment"):
        kw.kernel_work("sg_iommu", np.arange(A, A + 32, dtype=np.uint64), max_segment_size=0x10000)


# ------------------------------------------------------------------ estimate


def test_profile_shipped_has_every_unit_with_a_source() -> None:
    prof = kw.load_profile()
    for u in kw.PROFILE_UNITS:
        assert prof[u]["ns"] >= 0 and "default.toml" in prof[u]["source"]


@pytest.mark.parametrize("text, match", [
    ("not toml [", "not TOML"),
    ("[bogus]\nns = 1.0\nsource = 'x'\n", "unknown unit"),
    ("[iotlb_invalidation]\nns = -1\nsource = 'x'\n", "ns must be a number"),
    ("[iotlb_invalidation]\nns = 1\n", "needs a source"),
    ("[iotlb_invalidation]\nns = 1\nsource = 'x'\n", "missing"),
    ("[iotlb_invalidation]\nns = 1\nsource = 'x'\nextra = 2\n", "unknown keys"),
])
def test_bad_profiles_are_refused(tmp_path, text: str, match: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        kw.load_profile(str(f))


def test_profile_can_pin_measured_units_and_estimate_sums_terms(tmp_path) -> None:
    body = "".join(f"[{u}]\nns = {i + 1}.0\nsource = 'test value'\n"
                   for i, u in enumerate(kw.PROFILE_UNITS + tuple(kw.MEASURED_UNITS)))
    f = tmp_path / "all.toml"
    f.write_text(body)
    units = kw.unit_costs(kw.load_profile(str(f)))   # nothing left to measure
    assert all("test value" in units[u]["source"] for u in units)
    w = kw.kernel_work("sg_iommu", pfns(A, A + 1, B, B + 1), detail=True)
    terms = kw.estimate_terms(w, units)
    assert sum(t["ns"] for t in terms) == pytest.approx(4 * kw.estimate_ns_per_page(terms, 4))
    by = {t["count_of"]: t for t in terms}
    assert by["pt_walks"]["count"] == 3 and by["pt_walks"]["ns"] == 3 * units["walk"]["ns"]
    assert by["iotlb_invalidations (queued)"]["count"] == 1
    # 4 granules: alloc_iova_fast serves it from the per-CPU rcache; 64: the tree
    assert by["iova_allocs"]["unit"] == "iova_rcache_alloc" and by["iova_frees"]["unit"] == "iova_rcache_free"
    big = kw.estimate_terms(kw.kernel_work("link_runs", np.arange(A, A + 64, dtype=np.uint64), detail=True), units)
    assert {t["count_of"]: t["unit"] for t in big}["iova_allocs"] == "iova_alloc"
    with pytest.raises(ValueError, match="detail"):
        kw.estimate_terms(kw.kernel_work("sg_iommu", pfns(A, A + 1, B, B + 1)), units)


def test_measured_units_are_positive_with_spread() -> None:
    pytest.importorskip("pydmabuf._calibrate")
    m = kw.measure_units(rounds=3)
    for u, v in m.items():
        assert 0 < v["ns"] == min(v["samples"]) and v["q1"] <= v["median"] <= v["q3"] and len(v["samples"]) == 3
        assert v["source"].startswith("measured on this host")


def test_calibration_rounds_accumulate_and_units_take_the_least() -> None:
    pytest.importorskip("pydmabuf._calibrate")
    raw = kw.calibrate(2)
    assert set(raw) == {"walk_write", "map_call", "pte_write", "entry_visit", "alloc_4k", "tree_pair",
                        "magazine_pair"} and all(len(v) == 2 for v in raw.values())
    assert kw.calibrate(1, into=raw) is raw and all(len(v) == 3 for v in raw.values())


def test_units_from_raw_rounds_follow_the_stated_rules() -> None:
    """Hand-made rounds: a walk is a descent + write less the least write;
    a call less the least descent + write (never below 0); a metadata byte
    a 4 KiB allocation over 4096; the IOVA units half a pair; each unit the
    least of its rounds."""
    raw = {"walk_write": [12.0, 10.0], "map_call": [30.0, 9.0], "pte_write": [2.0, 1.0],
           "entry_visit": [3.0, 4.0], "alloc_4k": [4096.0, 8192.0], "tree_pair": [500.0, 400.0],
           "magazine_pair": [40.0, 30.0]}
    u = kw.units_from_raw(raw)
    assert u["walk"]["ns"] == 9.0 and u["walk"]["samples"] == [11.0, 9.0]
    assert u["iommu_map_call"]["samples"] == [20.0, 0.0] and u["iommu_unmap_call"]["ns"] == 0.0
    assert u["pte_write"]["ns"] == 1.0 and u["entry_visit"]["ns"] == 3.0 and u["metadata_byte"]["ns"] == 1.0
    assert u["iova_alloc"]["ns"] == u["iova_free"]["ns"] == 200.0 and u["iova_rcache_alloc"]["ns"] == 15.0
    assert "least of 2 rounds" in u["walk"]["source"]
    with pytest.raises(ValueError, match="at least one round"):
        kw.units_from_raw(dict(raw, alloc_4k=[]))
    assert not kw.needs_calibration({m: {} for m in kw.MEASURED_UNITS}) and kw.needs_calibration({})


@pytest.mark.parametrize("text, want", [
    ("scattered:65536:sg_iommu", ("scattered", 65536, "sg_iommu")),
    ("thp:256M:link_pages", ("thp", 65536, "link_pages")),
    ("contiguous:4K:link_runs", ("contiguous", 1, "link_runs")),
])
def test_cell_syntax(text: str, want: tuple[str, int, str]) -> None:
    assert kw.parse_cell(text) == want


@pytest.mark.parametrize("text", ["scattered:65536", "a:b:c", "x:0:sg_iommu", "x:5K:sg_iommu", "::"])
def test_bad_cells_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        kw.parse_cell(text)


def test_4g_of_runs_takes_1g_leaves_and_a_table_under_the_last() -> None:
    # 4 GiB contiguous from a 1 GiB-aligned pfn, linked as the study's runs:
    # numpy_coalesce cuts at 0xFFFFF pages -> runs of 4 GiB - 4 KiB and 4 KiB.
    p = np.arange(A, A + (1 << 20), dtype=np.uint64)
    w = kw.kernel_work("link_runs", p, detail=True)
    # run 1: 3 x 1 GiB (one descent), 511 x 2 MiB (the cut at the 1 GiB
    # boundary is out of reach: count = (1G - 4K) >> 21 = 511, one descent),
    # 511 x 4 KiB (one descent); run 2: 1 x 4 KiB (one descent)
    assert (w["_leaves_1g"], w["_leaves_2m"], w["_leaves_4k"], w["_map_walks"]) == (3, 511, 512, 4)
    # unmap of 4 GiB: 4 x 1 GiB entries in one descent; the 4th holds a
    # table (no 1 GiB leaf there): cleared twice, the L2 table freed with
    # its one L3 table; the next map installs both again (1 + 512 - 511)
    assert (w["_unmap_walks"], w["_tables_cleared"], w["_tables_installed"]) == (1, 1, 2)
    assert w["pte_writes"] == (3 + 511 + 512 + 2) + (4 + 1)
    assert w["iotlb_invalidations"] == 1 + 1


def test_strict_unmap_syncs_again_when_the_leaf_size_changes() -> None:
    # 513 contiguous pages from a 2 MiB-aligned pfn: one 2 MiB leaf and one
    # 4 KiB leaf, each its own descent; the unmap clears them in two
    # descents.  Strict: the gather holds the 2 MiB page; adding the 4 KiB
    # page changes the size, so iommu_iotlb_gather_add_page syncs first
    # (1), and iommu_iotlb_sync at the end issues the second (2).
    p = np.arange(A, A + 513, dtype=np.uint64)
    w = kw.kernel_work("link_runs", p, strict=True, detail=True)
    assert (w["_leaves_2m"], w["_leaves_4k"], w["_map_walks"], w["_unmap_walks"]) == (1, 1, 2, 2)
    assert w["iotlb_invalidations"] == 2 and w["pte_writes"] == 2 + 2
    # lazy: nothing gathered, one flush-queue entry
    assert kw.kernel_work("link_runs", p)["iotlb_invalidations"] == 1


def test_ranges_to_table_splits_entries_at_max_sg_ent_sz() -> None:
    five_g = 5 << 30
    rows = np.array([[0x4800000000, five_g]], dtype=np.uint64)
    # calc_sg_nents: DIV_ROUND_UP(5 GiB, 0xFFFFF000) = 2 entries on either route
    w = kw.kernel_work("ranges_to_table", pfns(A), bar_ranges=rows, detail=True)
    assert w["sg_entries"] == 2 and w["sg_entry_visits"] == 2
    assert w["metadata_bytes"] == 32 + 16 + 64
    # one dma_iova_link of 5 GiB at a 1 GiB-aligned phys: 5 x 1 GiB leaves, one descent
    assert (w["iommu_map_calls"], w["_leaves_1g"], w["_map_walks"]) == (1, 5, 1)
    bus = kw.kernel_work("ranges_to_table", pfns(A), bar_ranges=rows, p2p_iova=False)
    assert bus["sg_entries"] == 2 and bus["iommu_map_calls"] == 0


def test_the_pal_path_is_the_link_of_the_runs_plus_the_list() -> None:
    """dmabuf_pal: the importer links the PAL entries as link_runs does
    (one dma_iova_link -> iommu_map_nosync per entry), and the exporter's
    map_phys kvmalloc's a struct dma_buf_phys_list: an 8-byte count and
    16 bytes ({paddr, len}) per entry."""
    p = pfns(A, A + 1, A + 2, A + 40)          # two runs
    pal = kw.kernel_work("dmabuf_pal", p)
    lr = kw.kernel_work("link_runs", p)
    assert {k: pal[k] for k in kw.KEYS if k != "metadata_bytes"} == \
        {k: lr[k] for k in kw.KEYS if k != "metadata_bytes"}
    # dma_iova_state 16 + kmalloc(8 + 2 * 16 = 40) -> the 64-byte cache
    assert lr["metadata_bytes"] == 16 and pal["metadata_bytes"] == 16 + 64
    assert (pal["iommu_map_calls"], pal["sg_entries"]) == (2, 0)
