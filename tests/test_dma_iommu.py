"""dma_map_sgtable through an IOMMU: iommu_dma_map_sg, against the kernel's
rules and a literal Python model of its three
passes (layout, iommu_map_sg runs, __finalise_sg)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydmabuf
from pydmabuf import DmaDirection, SgTable, dma_map_sgtable, dma_unmap_sgtable, errors

from machines import iommu_device, machine, make_table

G = 4096
U64 = 2**64 - 1
BIDI = DmaDirection.BIDIRECTIONAL


def ref_map_sg(rows, seg_mask, max_seg):
    """The kernel's iommu_dma_map_sg() on (pfn, offset, length) rows.

    Returns (iova_len, runs, finalise) where runs are the iommu_map calls
    as (iova offset, phys, nbytes) and finalise(base) gives the DMA
    segments for an IOVA base."""
    ents = [{"page": pfn * G, "offset": off, "length": ln} for pfn, off, ln in rows]
    iova_len = 0
    prev = None
    for e in ents:
        s_off = e["offset"] & (G - 1)
        s_len = e["length"]
        pad = (seg_mask - iova_len + 1) & seg_mask
        e["stash_off"], e["stash_len"] = s_off, s_len
        e["offset"] -= s_off
        s_len = (s_len + s_off + G - 1) & ~(G - 1)
        e["length"] = s_len
        if pad and pad < s_len - 1:
            prev["length"] += pad
            iova_len += pad
        iova_len += s_len
        prev = e
    runs, mapped, run, start = [], 0, 0, 0
    n = len(ents)
    i = 0
    while i <= n:
        e = ents[min(i, n - 1)]
        s_phys = e["page"] + e["offset"]
        if run and s_phys != start + run:
            runs.append((mapped, start, run))
            mapped += run
            run = 0
        if run:
            run += e["length"]
        else:
            run, start = e["length"], s_phys
        i += 1

    def finalise(base):
        segs = []
        cur_len = 0
        dma = base
        for e in ents:
            s_off, s_len, s_iova_len = e["stash_off"], e["stash_len"], e["length"]
            # unsigned int arithmetic, as in the kernel: once a segment is
            # longer than max_seg the difference wraps and merging goes on.
            if cur_len and not s_off and (dma & seg_mask) and (max_seg - cur_len) % 2**32 >= s_len:
                cur_len = (cur_len + s_len) % 2**32
                segs[-1][1] = cur_len
            else:
                cur_len = s_len
                segs.append([dma + s_off, cur_len])
            dma += s_iova_len
            if s_len + s_off < s_iova_len:
                cur_len = 0
        return [tuple(s) for s in segs]

    return iova_len, runs, finalise


def check_against_model(dev, t, rows, seg_mask, max_seg):
    before_cpu = t.cpu_ranges().tolist()
    nents = dma_map_sgtable(dev, t, BIDI)
    iova_len, runs, finalise = ref_map_sg(rows, seg_mask, max_seg)
    m = t.mapping
    assert m.iova_nbytes == iova_len
    base = m.iova
    assert [tuple(r) for r in t.dma_ranges().tolist()] == finalise(base)
    assert nents == t.nents == len(finalise(base))
    # The CPU side is restored exactly after the in-place layout.
    assert t.cpu_ranges().tolist() == before_cpu
    # Every page of every run is mapped where the kernel maps it.
    iovas, expect = [], []
    for off, phys, n in runs:
        for k in range(0, n, G):
            iovas.append(base + off + k)
            expect.append(phys + k)
    got = dev.domain.pgtable.iova_to_phys_many(np.array(iovas, dtype=np.uint64))
    assert got.tolist() == expect
    assert dev.domain.stats["mapped_nbytes"] == iova_len
    assert dev.domain.stats["sync_map_calls"] >= 1
    dma_unmap_sgtable(dev, t, BIDI)
    assert dev.domain.stats["mapped_nbytes"] == 0
    assert t.nents == t.orig_nents and t.mapping is None
    assert (t.entries["dma_length"] == 0).all()


# ------------------------------------- merging, segment limits, untrusted


def test_unaligned_entries_merge_into_one_segment():
    m, d = iommu_device(max_segment_size=0x10000)
    t = make_table([(100, 0x100, 0x1F00), (300, 0, 0x1000), (500, 0, 0x800)])
    assert dma_map_sgtable(d, t, BIDI) == 1
    x = t.mapping.iova
    assert t.mapping.iova_nbytes == 4 * G
    assert t.dma_ranges().tolist() == [[x + 0x100, 0x3700]]
    # The IOMMU maps whole granules: the first entry's two pages, then one
    # page for each of the others.
    pt = d.domain.pgtable
    assert [pt.iova_to_phys(x + k * G) for k in range(4)] == [100 * G, 101 * G, 300 * G, 500 * G]
    dma_unmap_sgtable(d, t, BIDI)


def test_an_unaligned_end_blocks_merging():
    m, d = iommu_device(max_segment_size=0x10000)
    t = make_table([(100, 0, 0x800), (300, 0, 0x1000)])
    assert dma_map_sgtable(d, t, BIDI) == 2
    x = t.mapping.iova
    assert t.dma_ranges().tolist() == [[x, 0x800], [x + 0x1000, 0x1000]]
    dma_unmap_sgtable(d, t, BIDI)


def test_an_offset_starts_a_new_segment():
    m, d = iommu_device(max_segment_size=0x10000)
    t = make_table([(100, 0, 0x1000), (300, 0x200, 0x800)])
    assert dma_map_sgtable(d, t, BIDI) == 2
    x = t.mapping.iova
    assert t.dma_ranges().tolist() == [[x, 0x1000], [x + 0x1000 + 0x200, 0x800]]
    dma_unmap_sgtable(d, t, BIDI)


def test_max_segment_size_cuts_segments():
    m, d = iommu_device(max_segment_size=0x2000)
    t = make_table([(100, 0, G), (300, 0, G), (500, 0, G)])
    assert dma_map_sgtable(d, t, BIDI) == 2
    x = t.mapping.iova
    assert t.dma_ranges().tolist() == [[x, 0x2000], [x + 0x2000, 0x1000]]
    dma_unmap_sgtable(d, t, BIDI)


def test_segment_boundary_pads_the_previous_entry():
    m, d = iommu_device(seg_boundary_mask=0xFFFF, max_segment_size=0x10000)
    t = make_table([(1000, 0, 0xC000), (5000, 0, 0x8000)])
    assert dma_map_sgtable(d, t, BIDI) == 2
    x = t.mapping.iova
    assert t.mapping.iova_nbytes == 0x18000
    # 24 pages are allocated as 32 (sizes under 32 pages round up to a power
    # of two) and aligned to 128 KiB.
    assert x % 0x20000 == 0
    assert d.domain.iovad.find(x >> 12) == (x >> 12, (x >> 12) + 31)
    assert t.dma_ranges().tolist() == [[x, 0xC000], [x + 0x10000, 0x8000]]
    # The pad maps the 16 KiB that follow the first entry's buffer.
    pt = d.domain.pgtable
    assert pt.iova_to_phys(x + 0xC000) == 1000 * G + 0xC000
    assert pt.iova_to_phys(x + 0xF000) == 1000 * G + 0xF000
    assert pt.iova_to_phys(x + 0x10000) == 5000 * G
    dma_unmap_sgtable(d, t, BIDI)


def test_default_max_segment_is_64k():
    m, d = iommu_device()
    assert d.dma_get_max_seg_size() == 0x10000
    t = SgTable.from_pages(np.arange(32, dtype=np.uint64) * 2 + 1000)  # discontiguous pages
    assert dma_map_sgtable(d, t, BIDI) == 2
    assert t.dma_ranges()[:, 1].tolist() == [0x10000, 0x10000]
    dma_unmap_sgtable(d, t, BIDI)


def test_untrusted_device_maps_each_entry_alone_and_bounces_sub_granule_ones():
    m = machine({"name": "ext", "iommu": "strict", "untrusted": True})
    d = m.device("ext")
    t = make_table([(100, 0, G), (101, 0, G), (300, 0x10, 0x100)])
    assert dma_map_sgtable(d, t, BIDI) == 3
    assert t.nents == t.orig_nents == 3
    assert int(t.entries["dma_flags"][0]) & pydmabuf._core.SG_DMA_SWIOTLB
    # The sub-granule entry went through a bounce buffer.
    pool = m.swiotlb_pools["swiotlb"]
    assert pool.mappings == 1
    dma_unmap_sgtable(d, t, BIDI)
    assert pool.mappings == 0 and pool.slots_used == 0
    assert d.domain.stats["mapped_nbytes"] == 0


def test_out_of_iova_is_enomem_and_restores_the_table():
    m, d = iommu_device(dma_mask=32)
    d.domain.iovad.reserve(1, (1 << 20) - 1)  # nothing left below 4 GiB
    t = make_table([(100, 0x100, 0x1F00), (300, 0, 0x1000)])
    before = t.entries.copy()
    with pytest.raises(errors.OutOfMemory):
        dma_map_sgtable(d, t, BIDI)
    assert (t.entries == before).all()
    assert t.mapping is None and t.nents == 2
    assert d.domain.stats["mapped_nbytes"] == 0


def test_first_iova_is_below_4g_and_top_down():
    m, d = iommu_device()
    t1 = make_table([(100, 0, G)])
    t2 = make_table([(200, 0, G)])
    dma_map_sgtable(d, t1, BIDI)
    dma_map_sgtable(d, t2, BIDI)
    assert t1.dma_ranges()[0, 0] == 0xFFFFF000
    assert t2.dma_ranges()[0, 0] == 0xFFFFE000
    dma_unmap_sgtable(d, t2, BIDI)
    dma_unmap_sgtable(d, t1, BIDI)


def test_physically_contiguous_entries_map_with_one_call_and_big_leaves():
    m, d = iommu_device(max_segment_size=0xFFFFFFFF)
    # 4 MiB of 2 MiB-aligned contiguous memory as 1024 one-page entries.
    rows = [(0x80000 + k, 0, G) for k in range(1024)]
    t = make_table(rows)
    dma_map_sgtable(d, t, BIDI)
    leaves = d.domain.pgtable.leaves()
    # One run, and the IOVA (4 MiB aligned) lets 2 MiB blocks be used.
    assert len(leaves) == 2 and set(leaves[:, 2].tolist()) == {0x200000}
    assert t.nents == 1
    dma_unmap_sgtable(d, t, BIDI)


def test_lazy_domain_defers_invalidation_and_iova():
    m, d = iommu_device("lazy")
    t = make_table([(100, 0, G)])
    dma_map_sgtable(d, t, BIDI)
    iova = int(t.dma_ranges()[0, 0])
    dma_unmap_sgtable(d, t, BIDI)
    s = d.domain.stats
    assert s["iotlb_invalidations"] == 0 and s["fq_pending"] == 1
    assert d.domain.iovad.find(iova >> 12) is not None  # not reusable yet
    d.domain.flush()
    assert d.domain.stats["iotlb_full_flushes"] == 1 and d.domain.stats["fq_pending"] == 0


def test_strict_domain_invalidates_once_per_unmap():
    m, d = iommu_device("strict")
    t = SgTable.from_pages(np.arange(100, 164, dtype=np.uint64))
    dma_map_sgtable(d, t, BIDI)
    dma_unmap_sgtable(d, t, BIDI)
    assert d.domain.stats["iotlb_range_invalidations"] == 1


@pytest.mark.parametrize("mode", ["strict", "lazy"])
@pytest.mark.parametrize("dup", [(0, 0), (1, 2)])
def test_unmap_many_with_a_range_named_twice_changes_nothing(mode, dup):
    # All or nothing: a batch whose rows name one live range twice must
    # fail as a row that is not live does, before anything is unmapped
    # (the second unmap would find the range gone, or queue it twice).
    from pydmabuf.dma import PhysBatch, dma_map_phys_many, dma_unmap_phys_many

    m, d = iommu_device(mode)
    batch = dma_map_phys_many(d, [(100 * G, G), (300 * G + 0x10, 0x2000), (500 * G, 3 * G)], BIDI)
    assert batch.kind == "iommu"
    rows = batch.dma_ranges
    first, second = dup
    bad = np.concatenate([rows, rows[first:first + 1]]) if first == second else \
        np.concatenate([rows[:second], rows[first:first + 1], rows[second:]])
    before = (d.domain.stats, d.domain.iovad.ranges(with_state=True).copy(),
              d.domain.pgtable.leaves().copy())
    forged = PhysBatch(d, batch.direction, batch.attrs, bad, "iommu")
    with pytest.raises(errors.NotFound) as exc:
        dma_unmap_phys_many(forged)
    assert exc.value.errno == 2  # ENOENT, as for a row that is not live
    # The same errno as a row naming no live range at all.
    gone = np.concatenate([rows, np.array([[0x1000, G]], dtype=np.uint64)])
    ghost = PhysBatch(d, batch.direction, batch.attrs, gone, "iommu")
    with pytest.raises(errors.NotFound):
        dma_unmap_phys_many(ghost)
    after = (d.domain.stats, d.domain.iovad.ranges(with_state=True), d.domain.pgtable.leaves())
    assert after[0] == before[0]
    assert (after[1] == before[1]).all() and (after[2] == before[2]).all()
    d.domain.iovad.check()  # no scratch mark left behind
    assert forged.live and ghost.live  # the failed unmaps did not retire them
    # The forgeries own nothing: retire them by hand, or they would warn
    # (ResourceWarning) as leaked mappings when collected.
    forged.live = ghost.live = False
    dma_unmap_phys_many(batch)
    d.domain.flush()
    assert d.domain.stats["iova_live_ranges"] == 0 and d.domain.stats["mapped_nbytes"] == 0
    d.domain.iovad.check()


def test_rules_of_the_api():
    m, d = iommu_device()
    m2, other = iommu_device()
    t = make_table([(100, 0, G)])
    with pytest.raises(errors.LifetimeError):
        dma_unmap_sgtable(d, t, BIDI)
    dma_map_sgtable(d, t, BIDI)
    with pytest.raises(errors.Busy):
        dma_map_sgtable(d, t, BIDI)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_sgtable(other, t, BIDI)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_sgtable(d, t, DmaDirection.TO_DEVICE)
    with pytest.raises(errors.Busy):
        t.append_pages([1])
    dma_unmap_sgtable(d, t, BIDI)
    with pytest.raises(errors.InvalidArgument):
        dma_map_sgtable(d, t, 7)
    with pytest.raises(errors.InvalidArgument):
        dma_map_sgtable(d, SgTable.from_ranges([[0x1000, 0x1000]]), BIDI)


def test_quirk_a_segment_past_max_len_keeps_merging():
    # An entry longer than max_segment_size makes max_len - cur_len wrap
    # (unsigned int in __finalise_sg): the next aligned entry merges into it.
    m, d = iommu_device(max_segment_size=G)
    t = make_table([(1003, 0x800, 0x2800), (2000, 0, 1)])
    assert dma_map_sgtable(d, t, BIDI) == 1
    assert t.dma_ranges()[0, 1] == 0x2801
    dma_unmap_sgtable(d, t, BIDI)


def test_prot_follows_direction():
    from pydmabuf import IommuProt

    m, d = iommu_device()
    for direction, want in [(DmaDirection.TO_DEVICE, IommuProt.READ), (DmaDirection.FROM_DEVICE, IommuProt.WRITE),
                            (BIDI, IommuProt.READ | IommuProt.WRITE)]:
        t = make_table([(100, 0, G)])
        dma_map_sgtable(d, t, direction)
        prot = int(d.domain.pgtable.leaves()[0, 3])
        assert prot & 3 == int(want)
        assert prot & IommuProt.CACHE
        dma_unmap_sgtable(d, t, direction)


# ------------------------------------------------------ against the model


@st.composite
def sg_rows(draw):
    n = draw(st.integers(1, 40))
    rows = []
    pfn = draw(st.integers(1000, 2000))
    for _ in range(n):
        off = draw(st.sampled_from([0, 0, 0, 0x10, 0x800, 0xFFF]))
        ln = draw(st.integers(1, 3 * G - off))
        if draw(st.integers(0, 2)) == 0 or not rows:
            pfn = draw(st.integers(1000, 200000))
        else:  # continue where the previous entry's pages end
            ppfn, poff, pln = rows[-1]
            pfn = ppfn + (poff + pln + G - 1) // G
        rows.append((pfn, off, ln))
    return rows


@settings(max_examples=150, deadline=None)
@given(sg_rows(), st.sampled_from([U64, 0xFFFF, 0x1FFFF, 0xFFFFF]),
       st.sampled_from([G, 0x2000, 0x10000, 0x30000, 0xFFFFFFFF]))
def test_map_sg_matches_the_kernel_model(rows, seg_mask, max_seg):
    m, d = iommu_device(seg_boundary_mask=seg_mask, max_segment_size=max_seg)
    t = make_table(rows)
    check_against_model(d, t, rows, seg_mask, max_seg)
    s = d.domain.stats
    assert s["iova_live_ranges"] == 0


def test_a_phys_batch_closes_like_dma_unmap_phys_many():
    """PhysBatch is an Owner: close() (or leaving a with block) is
    dma_unmap_phys_many with its own direction and attributes, once."""
    from pydmabuf._lifecycle import Owner
    from pydmabuf.dma import dma_map_phys_many

    m, d = iommu_device("strict")
    batch = dma_map_phys_many(d, [(100 * G, G), (300 * G, 2 * G)], BIDI)
    assert isinstance(batch, Owner) and batch.live
    batch.close()
    assert not batch.live and d.domain.stats["mapped_nbytes"] == 0
    batch.close()  # idempotent
    with dma_map_phys_many(d, [(100 * G, G)], BIDI) as b2:
        assert d.domain.stats["mapped_nbytes"] == G
    assert not b2.live and d.domain.stats["mapped_nbytes"] == 0
    with pytest.raises(errors.LifetimeError):
        pydmabuf.dma.dma_unmap_phys_many(b2)


@st.composite
def whole_granule_rows(draw):
    """Entries that start on a granule and are whole granules (the map's
    one-pass layout), over chained chunks, some physically contiguous."""
    n = draw(st.integers(1, 300))
    rows = []
    for _ in range(n):
        ln = G * draw(st.sampled_from([1, 1, 1, 2, 3, 16]))
        if rows and draw(st.integers(0, 3)) == 0:
            ppfn, _, pln = rows[-1]
            pfn = ppfn + pln // G
        else:
            pfn = draw(st.integers(1000, 200000))
        rows.append((pfn, 0, ln))
    return rows


@settings(max_examples=80, deadline=None)
@given(whole_granule_rows(), st.sampled_from([U64, 0xFFFF, 0x1FFFF, 0xFFFFF]),
       st.sampled_from([G, 0x2000, 0x10000, 0x30000, 0xFFFFFFFF]))
def test_map_sg_of_whole_granule_entries_matches_the_kernel_model(rows, seg_mask, max_seg):
    m, d = iommu_device(seg_boundary_mask=seg_mask, max_segment_size=max_seg)
    t = make_table(rows)
    check_against_model(d, t, rows, seg_mask, max_seg)
    assert d.domain.stats["iova_live_ranges"] == 0


@pytest.mark.parametrize("after", [0, 1, 2])
def test_map_sg_failing_halfway_restores_the_table_and_unmaps(after):
    # 1100 scattered pages need three new level-3 tables: the page table
    # refusing one leaves the table as it was and nothing mapped.
    m, d = iommu_device()
    rows = [(1000 + 3 * i, 0, G) for i in range(1100)]
    t = make_table(rows)
    before = t.entries.copy()
    d.domain.pgtable._fail_alloc_after(after)
    with pytest.raises(errors.OutOfMemory):
        dma_map_sgtable(d, t, BIDI)
    assert (t.entries == before).all()
    assert t.mapping is None and t.nents == t.orig_nents == 1100
    s = d.domain.stats
    assert s["mapped_nbytes"] == 0 and s["iova_live_ranges"] == 0
    d.domain.pgtable._fail_alloc_after(None)
    check_against_model(d, t, rows, U64, 0x10000)


# ------------------------------------- the layout hint of a repeated map
#
# A map records what its layout pass found in the table; the next map of
# the unchanged table skips that pass.  It must leave exactly what a map
# of a fresh copy of the table leaves, counters included; a table changed
# through a view gets no hint; a hint that no longer describes the table
# (entries written behind the struct's back) is caught and the map is
# still right.


def _map_outcome(dev, t):
    """Everything a map leaves that a user can see, or the error."""
    try:
        n = dma_map_sgtable(dev, t, BIDI)
    except errors.DmaBufError as exc:
        return ("raised", type(exc), exc.errno, t.cpu_ranges().tolist(), t.mapping)
    mp = t.mapping
    pages = np.arange(mp.iova, mp.iova + mp.iova_nbytes, G, dtype=np.uint64)
    return (n, t.dma_ranges().tolist(), mp.iova, mp.iova_nbytes, t.cpu_ranges().tolist(),
            dev.domain.pgtable.iova_to_phys_many(pages).tolist())


@settings(max_examples=60, deadline=None)
@given(whole_granule_rows(), st.sampled_from([U64, 0xFFFF, 0x1FFFF, 0xFFFFF, 0x3FFF]),
       st.sampled_from([G, 0x2000, 0x10000, 0xFFFFFFFF]))
def test_a_repeated_map_leaves_what_a_map_of_a_fresh_table_leaves(rows, seg_mask, max_seg):
    from pydmabuf import _core_dma

    (m1, d1), (m2, d2) = (iommu_device(seg_boundary_mask=seg_mask, max_segment_size=max_seg)
                          for _ in range(2))
    t = make_table(rows)
    got, want = [], []
    for _ in range(3):
        got.append(_map_outcome(d1, t))
        hint = _core_dma.sg_layout_hint(t)
        assert hint is None or hint[0] == t.mapping.iova_nbytes and hint[4] == len(rows)
        dma_unmap_sgtable(d1, t, BIDI)
        fresh = make_table(rows)
        want.append(_map_outcome(d2, fresh))
        dma_unmap_sgtable(d2, fresh, BIDI)
    assert got == want
    assert d1.domain.stats == d2.domain.stats


def test_a_map_records_a_hint_and_a_view_or_a_builder_clears_it():
    from pydmabuf import _core_dma

    m, d = iommu_device()
    t = SgTable.from_pages([0x100000, 0x100002, 0x100003])
    assert _core_dma.sg_layout_hint(t) is None
    dma_map_sgtable(d, t, BIDI)
    # (IOVA length, lowest start, highest start, longest entry, entries)
    assert _core_dma.sg_layout_hint(t) == (3 * G, 0x100000 * G, 0x100002 * G, 2 * G, 2)
    dma_unmap_sgtable(d, t, BIDI)
    assert _core_dma.sg_layout_hint(t) is not None
    e = t.entries
    assert _core_dma.sg_layout_hint(t) is None
    dma_map_sgtable(d, t, BIDI)  # while a view lives no hint is recorded
    assert _core_dma.sg_layout_hint(t) is None
    dma_unmap_sgtable(d, t, BIDI)
    del e
    dma_map_sgtable(d, t, BIDI)
    dma_unmap_sgtable(d, t, BIDI)
    assert _core_dma.sg_layout_hint(t) is not None
    # Appending to an append table changes its entries: the hint goes.
    a = SgTable()
    a.append_pages([0x100000, 0x100001], left_pages=1)
    dma_map_sgtable(d, a, BIDI)
    dma_unmap_sgtable(d, a, BIDI)
    assert _core_dma.sg_layout_hint(a) is not None
    a.append_pages([0x100002])
    assert _core_dma.sg_layout_hint(a) is None
    assert _map_outcome(d, a)[1] == [[a.mapping.iova, 3 * G]]
    dma_unmap_sgtable(d, a, BIDI)
    # A table that needs the general path records none.
    u = make_table([(0x100000, 0x200, 0x600)])
    dma_map_sgtable(d, u, BIDI)
    assert _core_dma.sg_layout_hint(u) is None
    dma_unmap_sgtable(d, u, BIDI)


ROWS600 = [(0x100000 + 3 * i, 0, G) for i in range(600)]
# Each change keeps the IOVA length or not; those that keep it are caught
# only by the map's check of each entry against the hint.
CHANGES = ["pfn", "length", "offset", "unaligned", "zero", "far", "split", "end"]


def _changed(change):
    """Writes (k, (page address | flags, offset, length)) into ROWS600."""
    k = 300
    pl, off, ln = ROWS600[k][0] << 12, 0, G
    if change == "pfn":  # another page in the same RAM range
        return [(k, (0x90_0000 << 12, 0, G))]
    if change == "length":
        return [(k, (pl, 0, 2 * G))]
    if change == "offset":
        return [(k, (pl, 0x200, G - 0x200))]
    if change == "unaligned":  # same length: the IOVA length stays
        return [(k, (pl, 0x200, G))]
    if change == "zero":
        return [(k, (pl, 0, 0))]
    if change == "far":  # below 3 GiB, the other RAM range
        return [(k, (0x1_0000 << 12, 0, G))]
    if change == "split":  # two pages in one entry, none in the next: same length
        return [(k, (pl, 0, 2 * G)), (k + 1, (ROWS600[k + 1][0] << 12, 0, 0))]
    assert change == "end"  # the table now ends here
    return [(k, (pl | 2, off, ln))]


def _write(tab, k, entry, raw):
    """Write data entry k of a table built by make_table (127 entries and a
    link per chunk) through a view, or behind the struct's back (``raw``:
    the layout hint stays)."""
    from pydmabuf import _core_dma

    slot = k + k // 127
    pl, off, ln = entry
    if raw:
        _core_dma.sg_write_cpu_raw(tab, slot, pl, off, ln)
    else:
        e = tab.entries
        e["page_link"][slot], e["offset"][slot], e["length"][slot] = pl, off, ln


@pytest.mark.parametrize("raw", [False, True], ids=["view", "behind-the-struct"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_table_is_mapped_as_it_is_now(change, raw):
    from pydmabuf import _core_dma

    (m1, d1), (m2, d2) = iommu_device(), iommu_device()
    t, ref = make_table(ROWS600), make_table(ROWS600)
    for dev, tab in ((d1, t), (d2, ref)):
        dma_map_sgtable(dev, tab, BIDI)
        dma_unmap_sgtable(dev, tab, BIDI)
    assert _core_dma.sg_layout_hint(t) is not None
    for k, entry in _changed(change):
        _write(t, k, entry, raw)
        _write(ref, k, entry, False)
    assert (_core_dma.sg_layout_hint(t) is not None) == raw
    got, want = _map_outcome(d1, t), _map_outcome(d2, ref)
    assert got == want
    if not raw:
        # Through a view nothing is undone: the counted work is the same too.
        assert d1.domain.stats == d2.domain.stats
    if t.mapping is not None:
        dma_unmap_sgtable(d1, t, BIDI)
        dma_unmap_sgtable(d2, ref, BIDI)
    assert d1.domain.stats["mapped_nbytes"] == 0 and d1.domain.stats["iova_live_ranges"] == 0
    assert _map_outcome(d1, t) == _map_outcome(d2, ref)
    if t.mapping is not None:
        dma_unmap_sgtable(d1, t, BIDI)
        dma_unmap_sgtable(d2, ref, BIDI)


@pytest.mark.parametrize("first", [(0x100000, 0, G), (0x100000, 0x200, 0x600)])
def test_an_end_mark_before_orig_nents_is_einval_and_changes_nothing(first):
    # Both walks (the aligned one and the general one, which an unaligned
    # first entry forces) stop at the end mark; the general one once read
    # past it, before the table's slots.
    m, d = iommu_device()
    rows = [first] + ROWS600[1:]
    t = make_table(rows)
    _write(t, 300, (ROWS600[300][0] << 12 | 2, 0, G), False)
    before = t.entries.copy()
    with pytest.raises(errors.InvalidArgument):
        dma_map_sgtable(d, t, BIDI)
    assert (t.entries == before).all() and t.mapping is None
    s = d.domain.stats
    assert s["mapped_nbytes"] == 0 and s["iova_live_ranges"] == 0


def test_a_segment_merged_to_exactly_4g_keeps_the_kernels_zero_length_quirk():
    # from_pages of 4 GiB of contiguous pages and one more page: entries of
    # 0xFFFFF000 and 0x1000 bytes merge (the u32 length wraps past
    # max_seg) into a segment of exactly 4 GiB, whose length reads 0; the
    # next segment still goes in the next slot, on every map.
    m, d = iommu_device(dma_mask=48)
    pfns = np.concatenate([np.arange(0x100000, 0x200000, dtype=np.uint64), np.array([0x900000], dtype=np.uint64)])
    t = SgTable.from_pages(pfns)
    rows = [(pfn >> 12, 0, ln) for pfn, ln in t.cpu_ranges().tolist()]
    assert [ln for _, _, ln in rows] == [0xFFFFF000, 0x1000, 0x1000]
    _, _, finalise = ref_map_sg(rows, 0xFFFFFFFF, 0x10000)
    for _ in range(2):  # the layout pass, then the hint
        assert dma_map_sgtable(d, t, BIDI) == 2
        base = t.mapping.iova
        assert [tuple(r) for r in t.dma_ranges().tolist()] == finalise(base) == [(base, 0), (base + 2**32, G)]
        dma_unmap_sgtable(d, t, BIDI)


def test_an_undone_walk_gives_back_the_32_bit_iova_preference():
    from pydmabuf import _core_dma

    GiB = 1 << 30
    (m1, d1), (m2, d2) = iommu_device(), iommu_device()
    t, ref = make_table([(0x100000, 0, GiB)]), make_table([(0x100000, 0, GiB)])
    busy = []
    for d, x in ((d1, t), (d2, ref)):
        dma_map_sgtable(d, x, BIDI)
        dma_unmap_sgtable(d, x, BIDI)
        for k in range(2):  # the same 2 GiB below 4 GiB taken on both
            busy.append((d, make_table([(0x200000 + k * 0x40000, 0, GiB)])))
            dma_map_sgtable(d, busy[-1][1], BIDI)
    assert d1.prefer_32bit_iova and d2.prefer_32bit_iova
    # One page now: the hint's 1 GiB no longer fits below 4 GiB, the page does.
    _core_dma.sg_write_cpu_raw(t, 0, (0x100000 << 12) | 2, 0, G)
    _write(ref, 0, ((0x100000 << 12) | 2, 0, G), False)
    assert _map_outcome(d1, t) == _map_outcome(d2, ref)
    assert d1.prefer_32bit_iova and d2.prefer_32bit_iova
    for d, x in busy + [(d1, t), (d2, ref)]:
        dma_unmap_sgtable(d, x, BIDI)


def test_a_view_released_during_a_map_leaves_no_hint_that_is_not_true():
    # A view alive when the map begins may write the entries while the map
    # reads them, and may be gone when it ends: no hint is kept from it.
    import threading
    import time

    from pydmabuf import _core_dma

    m, d = iommu_device()
    n = 1 << 16
    for trial in range(12):
        t = SgTable.from_pages(np.arange(0x100000, 0x100000 + 2 * n, 2, dtype=np.uint64))
        v = t.entries
        go = threading.Event()

        def writer():
            go.wait()
            time.sleep(0.0001 * (trial % 4))
            v["length"][1] = 2 * G  # the entry grows by a page

        def mapper():
            go.set()
            try:
                dma_map_sgtable(d, t, BIDI)
            except errors.DmaBufError:
                pass

        threads = [threading.Thread(target=writer), threading.Thread(target=mapper)]
        for th in threads:
            th.start()
        threads[0].join()
        del v
        threads[1].join()
        hint = _core_dma.sg_layout_hint(t)
        assert hint is None or hint[0] == int(t.cpu_ranges()[:, 1].sum())
        if t.mapping is not None:
            dma_unmap_sgtable(d, t, BIDI)
    assert d.domain.stats["iova_live_ranges"] == 0


def test_a_stale_hint_over_peer_memory_maps_the_peer_by_bus_address():
    from test_phys_vec import spec_two_switches

    from pydmabuf import _core_dma

    (m1, m2) = (pydmabuf.Machine.from_spec(spec_two_switches()) for _ in range(2))
    bar = m1.device("exp").p2p_provider(0).bar.cpu_start
    assert bar == m2.device("exp").p2p_provider(0).bar.cpu_start
    imp1, imp2 = m1.device("imp"), m2.device("imp")
    t, ref = make_table(ROWS600), make_table(ROWS600)
    dma_map_sgtable(imp1, t, BIDI)
    dma_unmap_sgtable(imp1, t, BIDI)
    _core_dma.sg_write_cpu_raw(t, 300 + 300 // 127, bar, 0, G)
    _write(ref, 300, (bar, 0, G), False)
    got, want = _map_outcome(imp1, t), _map_outcome(imp2, ref)
    assert got == want
    assert [bar + 0x8000_0000_0000, G] in got[1]  # the BAR's bus address, no IOVA
    dma_unmap_sgtable(imp1, t, BIDI)
    dma_unmap_sgtable(imp2, ref, BIDI)


# ------------------------------------------- the compiled per-call path
#
# pydmabuf._dma_api takes dma_map_sgtable's common case in one compiled
# call; everything else goes the general Python path.  Both must leave the
# same table, IOVA, domain counters and device state.


def _mapped_state(m, dev, rows, limits, through_cache):
    """Map ``rows`` twice for ``dev`` (two tables, so the IOVA allocator's
    state carries over) and return everything the map leaves behind."""
    from pydmabuf import dma_iommu

    for k, v in limits.items():
        setattr(dev, k, v)
    if through_cache:  # one map elsewhere fills the argument cache: every map below is compiled
        _, other = iommu_device()
        t = make_table(rows)
        dma_map_sgtable(other, t, BIDI)
        dma_unmap_sgtable(other, t, BIDI)
    out, tables = [], []
    for _ in range(2):
        t = make_table(rows)
        tables.append(t)
        if not through_cache:
            dma_iommu._LINK_ARGS.clear()  # the general path: it refills the cache itself
        n = dma_map_sgtable(dev, t, BIDI)
        mp = t.mapping
        out.append((n, t.dma_ranges().tolist(), mp.kind, mp.iova, mp.iova_nbytes, mp.direction, mp.attrs,
                    dev.prefer_32bit_iova))
    out.append(dev.domain.stats)
    for t in tables:
        dma_unmap_sgtable(dev, t, BIDI)
    out.append(dev.domain.stats)
    return out


@pytest.mark.parametrize("limits", [
    {},
    {"max_segment_size": 8192},
    {"seg_boundary_mask": 0xFFFF},
    {"dma_mask": 2**32 - 1},
    {"bus_dma_limit": 2**36 - 1},
])
def test_the_compiled_sg_path_leaves_what_the_general_path_leaves(limits):
    rows = [(0x100000, 0, G), (0x100001, 0, G), (0x100009, 0x200, 0x600), (0x200000, 0, 3 * G)]
    (m1, d1), (m2, d2) = iommu_device(), iommu_device()
    fast = _mapped_state(m1, d1, rows, limits, through_cache=True)
    slow = _mapped_state(m2, d2, rows, limits, through_cache=False)
    assert fast == slow


def test_the_compiled_sg_path_takes_the_common_case_and_declines_the_rest():
    from pydmabuf import _dma_api

    m, dev = iommu_device()
    t = make_table([(0x100000, 0, G)])
    dma_map_sgtable(dev, t, BIDI)  # fills the argument cache
    dma_unmap_sgtable(dev, t, BIDI)
    assert _dma_api.map_iommu(dev, t, BIDI, 0) == 1
    assert type(t.mapping) is _dma_api.SgMapping and t.mapping.kind == "iommu"
    # Declined, nothing done: the general path checks and raises.
    assert _dma_api.map_iommu(dev, t, BIDI, 0) == -1  # already mapped
    assert _dma_api.unmap_iommu(dev, t, DmaDirection.TO_DEVICE, 0) is False  # other direction
    with pytest.raises(errors.LifetimeError):
        dma_unmap_sgtable(dev, t, DmaDirection.TO_DEVICE)
    m2, other = iommu_device()
    assert _dma_api.unmap_iommu(other, t, BIDI, 0) is False  # another device
    assert _dma_api.unmap_iommu(dev, t, 3.0, 0) is False  # not a plain type
    assert t.mapping is not None
    assert _dma_api.unmap_iommu(dev, t, BIDI, 0) is True and t.mapping is None
    assert dev.domain.stats["mapped_nbytes"] == 0
    assert _dma_api.unmap_iommu(dev, t, BIDI, 0) is False  # not mapped
    for args in [(dev, t, 1.0, 0), (dev, t, BIDI, 0.0), (None, t, BIDI, 0), (dev, None, BIDI, 0),
                 (dev, t, BIDI, 1 << 40)]:  # attributes never seen: the general path parses them
        assert _dma_api.map_iommu(*args) == -1
        assert t.mapping is None
    assert _dma_api.map_iommu(dev, SgTable.from_ranges([[0x1000, G]]), BIDI, 0) == -1  # no CPU entries
    _, untrusted = iommu_device(untrusted=True)
    assert _dma_api.map_iommu(untrusted, t, BIDI, 0) == -1
    assert t.mapping is None and dev.domain.stats["mapped_nbytes"] == 0


def test_a_thread_stands_for_its_native_id_modulo_the_cpus():
    import threading

    from pydmabuf import _core

    seen = {}

    def run():
        seen[threading.get_native_id()] = [_core.thread_cpu(n) for n in (1, 2, 3, 7, 64)]

    threads = [threading.Thread(target=run) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    run()
    assert len(seen) >= 2
    for tid, cpus in seen.items():
        assert cpus == [tid % n for n in (1, 2, 3, 7, 64)]
    with pytest.raises(ValueError):
        _core.thread_cpu(0)


@pytest.mark.parametrize("junk", [(), (1,), (1, 2, 3), "x", ["n", None], None])
def test_the_compiled_sg_path_declines_a_p2p_cache_it_cannot_read(junk):
    """A junk P2P cache on the device is not read by the compiled path (a
    short tuple once read past its end); the general path rebuilds it or
    refuses it, as it always did."""
    from pydmabuf import _dma_api

    m, dev = iommu_device()
    t = make_table([(0x100000, 0, G)])
    dma_map_sgtable(dev, t, BIDI)
    dma_unmap_sgtable(dev, t, BIDI)
    dev._p2p_ctx = junk
    assert _dma_api.map_iommu(dev, t, BIDI, 0) == -1 and t.mapping is None
    try:
        dma_map_sgtable(dev, t, BIDI)
    except (TypeError, IndexError, ValueError):
        assert t.mapping is None and dev.domain.stats["mapped_nbytes"] == 0
    else:
        dma_unmap_sgtable(dev, t, BIDI)


@pytest.mark.parametrize("ncpus", [0, -1, None, 1.0, 2**32])
def test_the_compiled_sg_path_declines_an_iommu_without_a_usable_cpu_count(ncpus):
    from pydmabuf import _dma_api

    m, dev = iommu_device()
    t = make_table([(0x100000, 0, G)])
    dma_map_sgtable(dev, t, BIDI)
    dev.iommu_group.iommu.ncpus = ncpus
    assert _dma_api.unmap_iommu(dev, t, BIDI, 0) is False and t.mapping is not None
    dev.iommu_group.iommu.ncpus = 1
    dma_unmap_sgtable(dev, t, BIDI)
    dev.iommu_group.iommu.ncpus = ncpus
    assert _dma_api.map_iommu(dev, t, BIDI, 0) == -1
    assert t.mapping is None and dev.domain.stats["mapped_nbytes"] == 0


@pytest.mark.parametrize("junk", [(), (1,), "x", (1, 2, 3, 4)])
def test_the_compiled_paths_read_no_argument_cache_entry_of_the_wrong_shape(junk):
    """The argument caches are module dicts anyone can write to: an entry
    of the wrong shape is not read (with bounds checks off, a short tuple
    would be read past its end); the compiled calls decline."""
    from pydmabuf import _args, _dma_api

    m, dev = iommu_device()
    t = make_table([(0x100000, 0, G)])
    try:
        _args._LINK_ARGS[(BIDI, 0, True)] = junk
        assert _dma_api.map_iommu(dev, t, BIDI, 0) == -1 and t.mapping is None
        _args._LINK_ARGS.clear()
        dma_map_sgtable(dev, t, BIDI)
        _args._DIR_ATTRS[(BIDI, 0)] = junk
        assert _dma_api.unmap_iommu(dev, t, BIDI, 0) is False and t.mapping is not None
    finally:
        _args._LINK_ARGS.clear()
        _args._DIR_ATTRS.clear()
    dma_unmap_sgtable(dev, t, BIDI)
    assert dev.domain.stats["mapped_nbytes"] == 0


@pytest.mark.parametrize("kind", ["iommu", "direct", "untrusted"])
def test_two_threads_mapping_one_table_one_wins_and_the_other_is_told_busy(kind):
    """The map claims the table before its walk (which runs without the
    GIL for long tables): of two threads mapping the same table at once,
    one maps and the other gets Busy; nothing leaks."""
    import threading

    from machines import direct_device

    if kind == "direct":
        m, dev = direct_device()
    else:
        m, dev = iommu_device(untrusted=kind == "untrusted")
    n = 64 if kind == "untrusted" else 2048
    pfns = np.arange(0x100000, 0x100000 + 2 * n, 2, dtype=np.uint64)  # not contiguous: n entries
    t = SgTable.from_pages(pfns)
    before = dev.domain.stats if dev.domain is not None else None
    for _ in range(30 if kind == "untrusted" else 60):
        gate = threading.Barrier(2)
        results = []

        def run():
            gate.wait()
            try:
                dma_map_sgtable(dev, t, BIDI)
                results.append("mapped")
            except errors.Busy:
                results.append("busy")

        threads = [threading.Thread(target=run) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(results) == ["busy", "mapped"]
        dma_unmap_sgtable(dev, t, BIDI)
        assert t.mapping is None
    if before is not None:
        after = dev.domain.stats
        assert after["mapped_nbytes"] == 0 and after["iova_live_ranges"] == before["iova_live_ranges"]
