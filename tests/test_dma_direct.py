"""dma-direct: the DMA address is the physical one through the device's
dma_range_map; what the device cannot reach bounces through swiotlb,
with the copies made when the kernel makes them."""

from __future__ import annotations

import numpy as np
import pytest

from pydmabuf import DmaAttrs, DmaDirection, SgTable, dma_map_phys, dma_map_sgtable, dma_unmap_phys, errors
from pydmabuf import dma_sync_sgtable_for_cpu, dma_sync_sgtable_for_device, dma_unmap_sgtable

from machines import direct_device, make_table

G = 4096
TO, FROM, BIDI = DmaDirection.TO_DEVICE, DmaDirection.FROM_DEVICE, DmaDirection.BIDIRECTIONAL


def test_one_byte_past_the_dma_mask_bounces_through_swiotlb():
    m, d = direct_device(dma_mask=32, swiotlb="swiotlb")
    assert dma_map_phys(d, 0xFFFFF000, 0x1000, TO) == 0xFFFFF000
    dma_unmap_phys(d, 0xFFFFF000, 0x1000, TO)
    # One byte more does not fit under the mask: it bounces.
    dma = dma_map_phys(d, 0xFFFFF000, 0x1001, TO)
    pool = m.swiotlb_pools["swiotlb"]
    assert pool.contains(dma) and pool.mappings == 1
    dma_unmap_phys(d, dma, 0x1001, TO)
    assert pool.mappings == 0


def test_past_the_mask_without_a_pool_map_is_enomem_and_map_sg_eio():
    m, d = direct_device(dma_mask=32)
    with pytest.raises(errors.OutOfMemory):
        dma_map_phys(d, 0xFFFFF000, 0x1001, TO)
    t = make_table([(0x100, 0, G), (0xFFFFF, 0, G), (0x100000, 0, G)])
    before = t.entries.copy()
    with pytest.raises(errors.IOFailure) as ei:  # map_sg: -EIO
        dma_map_sgtable(d, t, TO)
    assert ei.value.errno == 5
    assert (t.entries == before).all() and t.mapping is None


def test_forced_bouncing_without_a_pool_fails_cleanly():
    # Forced bouncing needs a pool to bounce through: without one the
    # kernel's swiotlb_tbl_map_single() fails (DMA_MAPPING_ERROR), so a
    # single map is ENOMEM and map_sg is -EIO; nothing stays mapped.
    m, d = direct_device(force_swiotlb=True)
    with pytest.raises(errors.OutOfMemory):
        dma_map_phys(d, 0x4000, 0x1000, TO)
    t = make_table([(0x100, 0, G), (0x200, 0, G)])
    before = t.entries.copy()
    with pytest.raises(errors.IOFailure) as ei:
        dma_map_sgtable(d, t, TO)
    assert ei.value.errno == 5
    assert (t.entries == before).all() and t.mapping is None and t.nents == t.orig_nents


def test_bus_dma_limit_caps_a_64_bit_mask():
    m, d = direct_device(dma_mask=64, bus_dma_limit=0x3FFFFFFF)
    assert d.dma_limit == 0x3FFFFFFF
    assert dma_map_phys(d, 0x3FFFF000, 0x1000, TO) == 0x3FFFF000
    with pytest.raises(errors.OutOfMemory):
        dma_map_phys(d, 0x40000000, 0x1000, TO)


def test_dma_range_map_translates_and_outside_every_region_fails():
    m, d = direct_device(dma_ranges=[[0x80000000, 0x0, 0x40000000]], swiotlb="swiotlb")
    assert dma_map_phys(d, 0x80001000, 0x1000, TO) == 0x1000
    # Outside every region: not capable, so it bounces (the pool at
    # 0x8000000 is inside no region either, so its address is unreachable).
    with pytest.raises(errors.DmaBufError):
        dma_map_phys(d, 0x10000, 0x1000, TO)


def test_mmio_is_not_translated_nor_bounced():
    m, d = direct_device(dma_offset=0x1000_0000, swiotlb="swiotlb")
    assert dma_map_phys(d, 0x2000, 0x1000, TO) == 0x1000_2000
    assert dma_map_phys(d, 0x4000, 0x1000, TO, DmaAttrs.MMIO) == 0x4000
    m, d = direct_device(force_swiotlb=True, swiotlb="swiotlb")
    with pytest.raises(errors.OutOfMemory):
        dma_map_phys(d, 0x4000, 0x1000, TO, DmaAttrs.MMIO)
    dma = dma_map_phys(d, 0x4000, 0x1000, TO)  # RAM bounces
    assert m.swiotlb_pools["swiotlb"].contains(dma)


def test_dma_direct_never_merges_entries():
    m, d = direct_device()
    t = make_table([(100, 0, G), (101, 0, G), (102, 0, G)])
    assert dma_map_sgtable(d, t, BIDI) == 3
    assert t.dma_ranges().tolist() == [[100 * G, G], [101 * G, G], [102 * G, G]]
    dma_unmap_sgtable(d, t, BIDI)
    assert t.nents == 3 and (t.entries["dma_address"] == 0).all()


def test_bounce_copies_follow_the_direction():
    m, d = direct_device(dma_mask=32, swiotlb="swiotlb")
    high = 0x2_0000_0000  # 8 GiB: out of a 32-bit device's reach
    m.memory.write(high, b"to-device")
    t = make_table([(high >> 12, 0, G)])
    dma_map_sgtable(d, t, TO)
    dma = int(t.dma_ranges()[0, 0])
    assert dma < 2**32
    assert d.dma_read(dma, 9) == b"to-device"  # copied into the bounce buffer
    dma_unmap_sgtable(d, t, TO)

    t = make_table([(high >> 12, 0, G)])
    dma_map_sgtable(d, t, FROM)
    dma = int(t.dma_ranges()[0, 0])
    d.dma_write(dma, b"from-dev")
    assert m.memory.read(high, 8) == b"to-devic"  # not visible before the sync
    dma_sync_sgtable_for_cpu(d, t, FROM)
    assert m.memory.read(high, 8) == b"from-dev"
    d.dma_write(dma, b"again!!!")
    dma_unmap_sgtable(d, t, FROM)  # unmap copies back too
    assert m.memory.read(high, 8) == b"again!!!"
    pool = m.swiotlb_pools["swiotlb"]
    # Both maps filled their bounce buffer (swiotlb_tbl_map_single() copies
    # the original in for FROM_DEVICE too, so unwritten bytes survive the
    # copy back); the FROM_DEVICE sync and unmap copied back.
    assert pool.slots_used == 0 and pool.bounced_to_cpu == 2 * G and pool.bounced_to_device == 2 * G


def test_sync_for_device_refreshes_the_bounce_buffer():
    m, d = direct_device(dma_mask=32, swiotlb="swiotlb")
    high = 0x2_0000_0000
    t = make_table([(high >> 12, 0, G)])
    dma_map_sgtable(d, t, TO)
    m.memory.write(high, b"later")
    dma = int(t.dma_ranges()[0, 0])
    assert d.dma_read(dma, 5) == bytes(5)
    dma_sync_sgtable_for_device(d, t, TO)
    assert d.dma_read(dma, 5) == b"later"
    dma_unmap_sgtable(d, t, TO)


def test_swiotlb_refuses_what_does_not_fit_a_segment():
    m, d = direct_device(dma_mask=32, swiotlb="swiotlb")
    with pytest.raises(errors.OutOfMemory):
        dma_map_phys(d, 0x2_0000_0000, 256 * 1024 + 1, TO)
    t = SgTable.from_pages(np.arange(0x200000, 0x200000 + 65, dtype=np.uint64))  # 260 KiB
    with pytest.raises(errors.IOFailure):
        dma_map_sgtable(d, t, TO)
    assert m.swiotlb_pools["swiotlb"].slots_used == 0


def test_swiotlb_exhaustion_unwinds_the_whole_table():
    m, d = direct_device(dma_mask=32, swiotlb="swiotlb")  # a 4 MiB pool
    pfns = np.arange(0x200000, 0x200000 + 2 * 1025, 2, dtype=np.uint64)  # 1025 separate pages
    t = SgTable.from_pages(pfns)
    with pytest.raises(errors.IOFailure):
        dma_map_sgtable(d, t, TO)  # 1025 x 2 slots of 2 KiB > the pool's 2048
    pool = m.swiotlb_pools["swiotlb"]
    assert pool.slots_used == 0 and t.mapping is None


def test_min_align_mask_keeps_the_low_bits():
    m, d = direct_device(dma_mask=32, swiotlb="swiotlb", min_align_mask=0xFFF)
    dma = dma_map_phys(d, 0x2_0000_0123, 0x100, TO)
    assert dma & 0xFFF == 0x123
    dma_unmap_phys(d, dma, 0x100, TO)


def test_unmap_rules():
    m, d = direct_device()
    dma = dma_map_phys(d, 0x10000, 0x1000, TO)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, dma, 0x2000, TO)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, dma, 0x1000, FROM)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, dma + 0x1000, 0x1000, TO)
    dma_unmap_phys(d, dma, 0x1000, TO)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, dma, 0x1000, TO)


@pytest.mark.parametrize("args,exc", [((-1, 10), errors.InvalidArgument), ((0, 0), errors.InvalidArgument),
                                      ((2**64 - 1, 2), errors.InvalidArgument), (("x", 1), TypeError)])
def test_bad_ranges(args, exc):
    m, d = direct_device()
    with pytest.raises(exc):
        dma_map_phys(d, *args, TO)


def test_map_phys_many_translates_through_an_offset_and_parses_like_the_core():
    from pydmabuf.dma import dma_map_phys_many, dma_unmap_phys_many

    # A plain dma_offset is a window of 2**64 bytes: the bulk path must
    # translate through it as dma_map_phys does.
    m, d = direct_device(dma_offset=0x1000_0000, swiotlb="swiotlb")
    rows = np.array([[0x2000, 0x1000], [0x9000, 0x2000]], dtype=np.uint64)
    batch = dma_map_phys_many(d, rows, TO)
    assert batch.dma_ranges.tolist() == [[0x1000_2000, 0x1000], [0x1000_9000, 0x2000]]
    dma_unmap_phys_many(batch)
    for bad, exc in [(np.zeros((2, 3), dtype=np.uint64), ValueError),  # not read as 3 rows
                     ([[0x2000 + 0.5, 0x1000]], TypeError),  # not truncated
                     ([[-1, 0x1000]], errors.InvalidArgument),
                     ([[2**64, 1]], errors.InvalidArgument),
                     (None, TypeError)]:
        with pytest.raises(exc):
            dma_map_phys_many(d, bad, TO)
    with pytest.raises(TypeError):
        dma_map_phys_many("gpu0", rows, TO)  # type: ignore[arg-type]


# ------------------------------------- identical mappings are separate entries


def test_the_same_range_mapped_twice_is_two_mappings():
    """dma-debug keeps one entry per mapping (a bucket per address): two
    maps of one range on a device without an IOMMU share the DMA address
    and each unmap consumes exactly one of them."""
    m, d = direct_device()
    TO = DmaDirection.TO_DEVICE
    a = dma_map_phys(d, 0x100000000, 2 * G, BIDI)
    b = dma_map_phys(d, 0x100000000, 2 * G, BIDI)
    c = dma_map_phys(d, 0x100000000, G, TO)
    assert a == b == c
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, a, G, BIDI)  # matches none of the three: nothing consumed
    dma_unmap_phys(d, c, G, TO)  # the one with that size and direction
    dma_unmap_phys(d, a, 2 * G, BIDI)
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, b, G, TO)  # consumed already
    dma_unmap_phys(d, b, 2 * G, BIDI)  # the second, correct unmap
    with pytest.raises(errors.LifetimeError):
        dma_unmap_phys(d, b, 2 * G, BIDI)  # a third is a double unmap
    assert not d._single_maps


def test_threads_mapping_one_range_each_consume_their_own_entry():
    """Thread stress: every thread maps and unmaps the same range on the
    same direct device; every unmap is correct, so none may fail, and the
    registry ends empty."""
    import threading

    m, d = direct_device()
    errs = []
    rounds = 2000

    def run():
        try:
            for i in range(rounds):
                dmas = [dma_map_phys(d, 0x100000000, G, BIDI) for _ in range(1 + i % 3)]
                for dma in dmas:
                    dma_unmap_phys(d, dma, G, BIDI)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errs.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errs, errs[0]
    assert not d._single_maps


@pytest.mark.parametrize("how", ["dma_offset", "dma_ranges"])
def test_ram_seen_at_bus_address_zero(how):
    """RAM at 0x8000_0000 reached at bus address 0 (a negative dma_offset,
    as on several ARM SoCs): translation is u64 arithmetic, as in the
    kernel's translate_phys_to_dma(), so DMA addresses wrap to 0 instead of
    running past 2**64, and the device reaches the right bytes."""
    kw = {"dma_offset": -0x8000_0000} if how == "dma_offset" else {"dma_ranges": [[0x8000_0000, 0, 0x4000_0000]]}
    m, d = direct_device(**kw)
    assert d.phys_to_dma(0x8000_0000) == 0 and d.phys_to_dma(0x8000_1234) == 0x1234
    assert d.dma_to_phys(0x1000) == 0x8000_1000
    t = SgTable.from_pages(np.array([0x80000, 0x80001, 0x80005], dtype=np.uint64))
    assert dma_map_sgtable(d, t, BIDI) == 2
    assert t.dma_ranges().tolist() == [[0, 2 * G], [5 * G, G]]
    m.memory.write(0x8000_5000, b"arm!")
    assert d.dma_read(5 * G, 4) == b"arm!"
    d.dma_write(0x10, b"dev")
    assert m.memory.read(0x8000_0010, 3) == b"dev"
    dma_unmap_sgtable(d, t, BIDI)
    assert dma_map_phys(d, 0x8000_2000, G, TO) == 0x2000
    dma_unmap_phys(d, 0x2000, G, TO)
