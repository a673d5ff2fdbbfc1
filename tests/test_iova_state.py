"""The list-free two-step IOVA API (research items 25-32)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmabuf import DmaAttrs, DmaDirection, IovaState, dma_map_phys, dma_unmap_phys, errors

from machines import direct_device, iommu_device, machine

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL


def test_item25_no_iommu_no_iova():
    m, d = direct_device()
    st_ = IovaState.try_alloc(d, 0, 0x10000)
    assert not st_.uses_iova and st_.addr == 0 and st_.size == 0
    with pytest.raises(errors.NotSupported):
        st_.link(0x1000, 0, 0x1000, BIDI)
    # The fallback is dma_map_phys.
    dma = dma_map_phys(d, 0x1000, 0x1000, BIDI)
    dma_unmap_phys(d, dma, 0x1000, BIDI)


def test_item26_offset_of_phys_is_kept():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0x1234, 0x3000)
    assert s.uses_iova and s.addr & 0xFFF == 0x234 and s.size == 0x3000
    base = s.addr & ~0xFFF
    assert d.domain.iovad.find(base >> 12) == (base >> 12, (base >> 12) + 3)  # ALIGN(0x3234) = 4 pages
    s.free()


@pytest.mark.parametrize("size", [0, 1 << 63, (1 << 63) + 0x1000, -1])
def test_item27_sizes_that_cannot_be_reserved(size):
    m, d = iommu_device()
    assert not IovaState.try_alloc(d, 0, size).uses_iova


def test_item27_out_of_iova_is_just_false():
    m, d = iommu_device(dma_mask=32)
    d.domain.iovad.reserve(1, (1 << 20) - 1)
    assert not IovaState.try_alloc(d, 0, 0x1000).uses_iova


def test_item28_only_the_first_link_may_be_unaligned():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0x1234, 0x3000)
    s.link(0x10234, 0, 0x2DCC, BIDI)  # ends at a granule boundary
    s.link(0x20000, 0x2DCC, 0x234, BIDI)  # IOVA addr + 0x2DCC is aligned
    with pytest.raises(errors.IOFailure):
        s.link(0x30010, 0x2DCC, 0x10, BIDI)
    s.sync()
    pt = d.domain.pgtable
    base = s.addr - 0x234
    assert pt.iova_to_phys(base) == 0x10000
    assert pt.iova_to_phys(base + 0x3000) == 0x20000
    s.destroy(0x3000, BIDI)


def test_item28_misaligned_pairs_are_einval():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0, 0x4000)
    with pytest.raises(errors.InvalidArgument):
        s.link(0x10000, 0x800, 0x1000, BIDI)  # aligned phys, unaligned IOVA
    assert s.linked_nbytes == 0 and d.domain.stats["mapped_nbytes"] == 0
    s.free()


def test_item29_link_over_a_mapped_iova_is_eexist():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0, 0x4000)
    s.link(0x10000, 0, 0x2000, BIDI)
    before = d.domain.stats
    with pytest.raises(errors.AlreadyExists):
        s.link(0x50000, 0x1000, 0x2000, BIDI)
    after = d.domain.stats
    assert after["pte_writes"] == before["pte_writes"] and after["mapped_nbytes"] == 0x2000
    assert d.domain.pgtable.iova_to_phys(s.addr + 0x1000) == 0x11000
    s.destroy(0x2000, BIDI)


def test_item30_link_many_then_one_sync_and_unlink_a_middle_range():
    m, d = iommu_device("lazy")
    s = IovaState.try_alloc(d, 0, 16 * G)
    rows = np.array([[0x100000 + 2 * k * G, G] for k in range(16)], dtype=np.uint64)
    assert s.link_ranges(rows, BIDI) == 16 * G
    st1 = d.domain.stats
    assert st1["leaf_sets"] == 16 and st1["sync_map_calls"] == 0
    s.sync()
    assert d.domain.stats["sync_map_calls"] == 1
    assert d.domain.stats["iotlb_invalidations"] == 0
    s.unlink(5 * G, 2 * G, BIDI)
    st2 = d.domain.stats
    # Unlink is strict even on a lazy domain: one range invalidation now.
    assert st2["iotlb_range_invalidations"] == 1 and st2["fq_pending"] == 0
    assert d.domain.pgtable.iova_to_phys(s.addr + 5 * G) is None
    assert d.domain.iovad.find(s.addr >> 12) is not None  # the IOVA stays reserved
    with pytest.raises(errors.LifetimeError):
        s.unlink(5 * G, G, BIDI)  # not linked any more
    with pytest.raises(errors.LifetimeError):
        s.destroy(16 * G, BIDI)  # [0, 16 pages) is no longer all linked
    s.unlink(0, 5 * G, BIDI)
    s.unlink(7 * G, 9 * G, BIDI)
    s.free()
    assert d.domain.stats["mapped_nbytes"] == 0


def test_item31_destroy_strict_and_lazy():
    m, d = iommu_device("strict")
    s = IovaState.try_alloc(d, 0, 4 * G)
    s.link_ranges(np.array([[0x100000, 4 * G]], dtype=np.uint64), BIDI)
    s.destroy(4 * G, BIDI)
    assert d.domain.stats["iotlb_range_invalidations"] == 1
    assert d.domain.stats["iova_live_ranges"] == 0  # reusable at once
    m, d = iommu_device("lazy")
    s = IovaState.try_alloc(d, 0, 4 * G)
    s.link_ranges(np.array([[0x100000, 4 * G]], dtype=np.uint64), BIDI)
    s.destroy(4 * G, BIDI)
    assert d.domain.stats["iotlb_invalidations"] == 0 and d.domain.stats["fq_pending"] == 1
    with pytest.raises(errors.LifetimeError):
        s.link(0x100000, 0, G, BIDI)  # use after destroy
    # destroy(0) is free().
    s = IovaState.try_alloc(d, 0, 4 * G)
    s.destroy(0, BIDI)
    assert not s.live


def test_item32_unaligned_mmio_on_a_bouncing_device_is_eperm():
    m = machine({"name": "ext", "iommu": "strict", "untrusted": True})
    d = m.device("ext")
    s = IovaState.try_alloc(d, 0x100, 0x1000)
    with pytest.raises(errors.NotPermitted):
        s.link(0x40000100, 0, 0x800, BIDI, DmaAttrs.MMIO)
    # RAM bounces its unaligned head instead.
    s.link(0x100100, 0, 0x800, BIDI)
    assert s.uses_swiotlb
    pool = m.swiotlb_pools["swiotlb"]
    assert pool.mappings == 1
    s.destroy(0x800, BIDI)
    assert pool.mappings == 0


def test_links_beyond_the_reservation_are_refused():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0, 0x2000)
    with pytest.raises(errors.InvalidArgument):
        s.link(0x10000, 0x1000, 0x2000, BIDI)
    s.free()


def test_context_manager_and_resource_warning():
    m, d = iommu_device()
    with IovaState.try_alloc(d, 0, 0x2000) as s:
        s.link(0x10000, 0, 0x2000, BIDI)
    assert not s.live and d.domain.stats["mapped_nbytes"] == 0
    s = IovaState.try_alloc(d, 0, 0x2000)
    with pytest.warns(ResourceWarning):
        s.__del__()
    s.free()


def test_2m_aligned_links_use_2m_leaves():
    m, d = iommu_device()
    n = 8 << 20
    s = IovaState.try_alloc(d, 0, n)
    assert (s.addr % (2 << 20)) == 0
    s.link_ranges(np.array([[0x40000000, n]], dtype=np.uint64), BIDI)
    big = d.domain.stats["leaf_sets"]
    s.destroy(n, BIDI)
    m, d2 = iommu_device()
    s = IovaState.try_alloc(d2, 0, n)
    s.link_ranges(np.array([[0x40001000 + 0, n]], dtype=np.uint64), BIDI)  # off by a page
    small = d2.domain.stats["leaf_sets"]
    s.destroy(n, BIDI)
    assert big == 4 and small == 2048 and small == 512 * big


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0x100, 0x10000), st.integers(1, 8)), min_size=1, max_size=30),
       st.booleans())
def test_link_ranges_matches_one_link_at_a_time(ranges, lazy):
    rows = np.array([[pfn * G, n * G] for pfn, n in ranges], dtype=np.uint64)
    total = int(rows[:, 1].sum())
    m, d = iommu_device("lazy" if lazy else "strict")
    a = IovaState.try_alloc(d, 0, total)
    a.link_ranges(rows, BIDI)
    m2, d2 = iommu_device("lazy" if lazy else "strict")
    b = IovaState.try_alloc(d2, 0, total)
    off = 0
    for p, n in rows.tolist():
        b.link(p, off, n, BIDI)
        off += n
    assert a.addr == b.addr
    assert d.domain.pgtable.leaves().tolist() == d2.domain.pgtable.leaves().tolist()
    for k in ("leaf_sets", "table_sets", "table_pages", "mapped_nbytes"):
        assert d.domain.stats[k] == d2.domain.stats[k]
    a.destroy(total, BIDI)
    b.destroy(total, BIDI)
    assert d.domain.stats["mapped_nbytes"] == 0


def test_page_list_links_check_every_page_and_change_nothing_on_failure():
    m, d = iommu_device()
    n = 3000
    pages = np.empty((n, 2), dtype=np.uint64)
    pages[:, 0] = (np.arange(n, dtype=np.uint64) * 2 + 0x100000) << np.uint64(12)
    pages[:, 1] = G
    s = IovaState.try_alloc(d, 0, n * G)
    # An unaligned page past offset 0 is dma_iova_link()'s -EIO.
    for k, bad_phys, exc in [(1234, 0x123, errors.IOFailure), (2999, 1 << 60, errors.OutOfRange)]:
        rows = pages.copy()
        rows[k, 0] = bad_phys
        before = d.domain.stats
        with pytest.raises(exc) as ei:
            s.link_ranges(rows, BIDI)
        assert f"range {k} " in str(ei.value)
        after = d.domain.stats
        assert after["mapped_nbytes"] == 0 and after["leaf_sets"] == before["leaf_sets"]
        assert len(d.domain.pgtable.leaves()) == 0
    # One range that is not a single page takes the general path.
    rows = pages.copy()
    rows[-1, 1] = 2 * G
    with pytest.raises(errors.InvalidArgument):
        s.link_ranges(rows, BIDI)  # one page more than reserved
    rows = rows[:-1]
    assert s.link_ranges(rows, BIDI) == (n - 1) * G
    assert d.domain.pgtable.iova_to_phys(s.addr + 1234 * G) == int(pages[1234, 0])
    s.destroy((n - 1) * G, BIDI)
