"""The block layer's list-free request mapping: bvec merging against a literal model of
blk_map_iter_next, the IOVA path and its fallbacks, P2P kinds, statuses,
and nothing left mapped after unmap."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmabuf import IommuProt, Machine, P2PMapType, errors
from pydmabuf.importers import NvmeQueue
from pydmabuf.importers.nvme import BLK_SEG_BOUNDARY_MASK, BlkStatus

from machines import machine

G = 4096
U32 = 0xFFFFFFFF


def leftovers(m, dev):
    """What a device still has mapped: live IOVA, mapped PTE bytes, bounce slots."""
    live = m.iova_stats(dev)["live_ranges"]
    pte = dev.domain.pgtable.stats["mapped_nbytes"] if dev.domain is not None else 0
    slots = sum(p.slots_used for p in m.swiotlb_pools.values())
    return live, pte, slots


# ---------------------------------------------- the merge, against a model


def model_merge(bvecs, max_seg, mask, kind=lambda p: 0):
    """blk_map_iter_next(), literally, over a flat bvec list; returns the
    phys_vecs and the OR of every interior seam."""
    out = []
    i, done = 0, 0
    while i < len(bvecs):
        p0, l0 = bvecs[i]
        paddr = p0 + done
        to_b = mask - (mask & paddr)
        cap = min(U32, max_seg) - 1
        maxsz = (min(to_b, cap) if to_b and cap else (to_b or cap)) + 1
        take = min(l0 - done, maxsz)
        done += take
        if done == l0:
            i, done = i + 1, 0
            while i < len(bvecs):
                np_, nl = bvecs[i]
                if take + nl > maxsz or paddr + take != np_ or (paddr | mask) != ((np_ + nl - 1) | mask) \
                        or kind(np_) != kind(paddr):
                    break
                take += nl
                i += 1
        out.append((paddr, take))
    gap = 0
    for (a, n), (b, _) in zip(out, out[1:]):
        gap |= (a + n) | b
    return out, gap


bvec_lists = st.lists(st.tuples(st.integers(0, 64).map(lambda k: k * 0x200), st.integers(1, 40).map(lambda k: k * 0x200),
                                st.booleans()), min_size=1, max_size=20)


def build(spec, base=0x4000_0000):
    """Bvecs from (gap, length, contiguous?) triples: contiguous ones start
    where the previous ended."""
    rows, cur = [], base
    for gap, n, contiguous in spec:
        start = cur if contiguous and rows else cur + gap + 0x10000
        rows.append((start, n))
        cur = start + n
    return rows


@settings(max_examples=300)
@given(spec=bvec_lists, max_seg=st.sampled_from([G, 0x3000, 0x10000, U32]),
       mask=st.sampled_from([0xFFF, 0x7FFF, 0xFFFF, BLK_SEG_BOUNDARY_MASK, 2**64 - 1]))
def test_merge_matches_the_kernels_iterator(spec, max_seg, mask):
    from pydmabuf import _core

    bvecs = build(spec)
    vecs, gap, kind, _, mixed, total = _core.blk_map_iter(np.array(bvecs, dtype=np.uint64), max_seg, mask, None)
    want, wgap = model_merge(bvecs, max_seg, mask)
    assert [tuple(r) for r in vecs.tolist()] == want
    assert gap == wgap and total == sum(n for _, n in bvecs) and kind == P2PMapType.NONE and not mixed


def test_contiguous_bvecs_merge_up_to_the_max_segment(m):
    q = NvmeQueue(m.device("nvme0"), max_segment_size=4 * G)
    bvecs = [(0x100000 + i * G, G) for i in range(10)]
    assert q.merge(bvecs).tolist() == [[0x100000, 4 * G], [0x104000, 4 * G], [0x108000, 2 * G]]
    # Exactly the max: one vec; one byte more in a single bvec: split.
    assert q.merge([(0x100000, 4 * G)]).tolist() == [[0x100000, 4 * G]]
    assert q.merge([(0x100000, 4 * G + 1)]).tolist() == [[0x100000, 4 * G], [0x104000, 1]]
    # Not contiguous: never merged.
    assert len(q.merge([(0x100000, G), (0x102000, G)])) == 2


def test_segments_never_cross_the_boundary(m):
    q = NvmeQueue(m.device("nvme0"))
    start = (4 << 30) - 2 * G  # two pages below 4 GiB, two above
    assert q.merge([(start, 4 * G)]).tolist() == [[start, 2 * G], [4 << 30, 2 * G]]
    assert q.merge([(start, 2 * G), (4 << 30, 2 * G)]).tolist() == [[start, 2 * G], [4 << 30, 2 * G]]
    wide = NvmeQueue(m.device("nvme0"), seg_boundary_mask=2**64 - 1)
    assert wide.merge([(start, 4 * G)]).tolist() == [[start, 4 * G]]
    assert wide.merge([(2**64 - G, G)]).tolist() == [[2**64 - G, G]]  # touches 2**64 - 1


@pytest.mark.parametrize("bvecs", [[], [(0x1000, 0)], [(2**64 - G, G + 1)], [(0, U32), (U32, 1)]])
def test_malformed_requests_are_blk_sts_inval(m, bvecs):
    q = NvmeQueue(m.device("nvme0"))
    before = leftovers(m, q.device)
    with pytest.raises(errors.InvalidArgument) as ei:
        q.map(bvecs)
    assert ei.value.blk_status == BlkStatus.INVAL
    assert leftovers(m, q.device) == before and q.requests == 0


def test_queue_limits_are_checked(m):
    dev = m.device("nvme0")
    for kw in ({"max_segment_size": G - 1}, {"max_segment_size": U32 + 1}, {"seg_boundary_mask": 0x7FF},
               {"seg_boundary_mask": 0x1FFF0}):
        with pytest.raises(errors.InvalidArgument):
            NvmeQueue(dev, **kw)
    with pytest.raises(TypeError):
        NvmeQueue("nvme0")
    with pytest.raises(ValueError):
        NvmeQueue(dev).map([[1, 2, 3]])


# ------------------------------------------------------ the IOVA path


def test_aligned_seams_give_one_iova_segment_and_one_sync(m):
    dev = m.device("nvme0")
    q = NvmeQueue(dev)
    bvecs = [(0x200000 + 0x800, 0x800), (0x900000, 0x3000), (0x500000, 0x1800)]
    syncs = dev.domain.stats["sync_map_calls"]
    r = q.map(bvecs, write=True)
    assert r.path == "iova" and r.coalesced and r.nvecs == 3
    assert r.segments.tolist() == [[r.state.addr, 0x5000]] and r.state.addr & 0xFFF == 0x800
    assert dev.domain.stats["sync_map_calls"] == syncs + 1
    assert r.metadata_nbytes == 16
    m.memory.write(0x900000 + 0x2FFE, b"ab")
    m.memory.write(0x500000, b"cd")
    assert r.read(0x800 + 0x2FFE, 4) == b"abcd"  # the device reads across the seam, one access
    q.unmap(r)
    assert leftovers(m, dev)[:2] == (0, 0)
    with pytest.raises(errors.LifetimeError):
        q.unmap(r)
    with pytest.raises(errors.LifetimeError):
        r.read(0, 1)


def test_an_unaligned_seam_falls_back_to_one_mapping_per_vec(m):
    dev = m.device("nvme0")
    q = NvmeQueue(dev)
    bvecs = [(0x200000, 0x1000), (0x900000, 0xE00), (0x500000 + 0x200, 0x1000)]  # a 512-byte gap at a seam
    r = q.map(bvecs)
    assert r.path == "direct" and not r.coalesced and len(r.segments) == 3
    assert r.segments[:, 1].tolist() == [0x1000, 0xE00, 0x1000]
    assert [int(a) & 0xFFF for a in r.segments[:, 0]] == [0, 0, 0x200]
    assert r.need_unmap and r.metadata_nbytes == 16 + 3 * 16
    assert leftovers(m, dev)[0] == 3
    r.write(0xFFE, b"xyzw")  # a read request: the device writes
    assert m.memory.read(0x200FFE, 2) == b"xy" and m.memory.read(0x900000, 2) == b"zw"
    q.unmap(r)
    assert leftovers(m, dev)[:2] == (0, 0)


def test_read_requests_are_write_only_for_the_device(m):
    q = NvmeQueue(m.device("nvme0"))
    r = q.map([(0x200000, G)])
    with pytest.raises(errors.IommuFault):
        r.read(0, 4)  # DMA_FROM_DEVICE maps without IOMMU read permission
    q.unmap(r)


def test_without_an_iommu_the_fallback_maps_nothing_to_undo(m):
    dev = m.device("direct0")
    q = NvmeQueue(dev)
    assert q.merge_boundary == 0
    r = q.map([(0x200000, G), (0x300000, G)])
    assert r.path == "direct" and r.segments.tolist() == [[0x200000, G], [0x300000, G]]
    assert not r.need_unmap and r.metadata_nbytes == 16
    q.unmap(r)


def test_bounced_segments_are_given_back(m):
    dev = m.device("legacy0")  # 32-bit DMA with a swiotlb pool
    q = NvmeQueue(dev)
    high = 5 << 30
    m.memory.write(high, b"high memory")
    r = q.map([(0x200000, G), (high, G)], write=True)
    assert r.path == "direct" and r.need_unmap and leftovers(m, dev)[2] > 0
    assert r.read(G, 11) == b"high memory"  # from the bounce buffer
    q.unmap(r)
    assert leftovers(m, dev) == (0, 0, 0)


def test_a_link_failure_frees_the_iova_and_fails_the_request(m):
    """Upstream loses the link error (the sync's result overwrites it);
    the model destroys the reservation and fails with its status."""
    dev = m.device("nvme0")
    q = NvmeQueue(dev)
    before = leftovers(m, dev)
    with pytest.raises(errors.IOFailure) as ei:
        q.map([(0x200000, G), (1 << 60, G)])  # beyond the IO page table's output size
    assert ei.value.blk_status == BlkStatus.IOERR and isinstance(ei.value.__cause__, errors.OutOfRange)
    assert leftovers(m, dev) == before
    # The same on the fallback path is BLK_STS_RESOURCE.
    with pytest.raises(errors.OutOfMemory) as ei:
        q.map([(0x200000, G), ((1 << 60) + 0x200, G)])
    assert ei.value.blk_status == BlkStatus.RESOURCE
    assert leftovers(m, dev) == before


def test_iova_exhaustion_falls_back():
    m = machine({"name": "nvme", "iommu": "strict", "dma_mask": 24, "max_segment_size": U32})  # 16 MiB of IOVA
    dev = m.device("nvme")
    q = NvmeQueue(dev)
    big = q.map([(0x1000000, 8 << 20)])  # takes [8 MiB, 16 MiB) (IOVA is naturally aligned)
    r = q.map([(0x4000000 + i * (4 << 20), 2 << 20) for i in range(3)])  # 6 MiB needs 8 aligned: no...
    assert big.path == "iova" and r.path == "direct" and len(r.segments) == 3  # ...three 2 MiB do
    q.unmap(r)
    q.unmap(big)
    assert leftovers(m, dev)[:2] == (0, 0)


def test_untrusted_device_bounces_unaligned_ends(m):
    dev = m.device("ext0")
    q = NvmeQueue(dev)
    r = q.map([(0x200100, 0xF00), (0x300000, 0x1000)], write=True)
    assert r.path == "iova" and r.state.uses_swiotlb
    q.unmap(r)
    assert leftovers(m, dev) == (0, 0, 0)


# ------------------------------------------------------------------- P2P


def test_bus_address_peer_needs_no_mapping(m):
    dev = m.device("nvme0")
    q = NvmeQueue(dev)
    bar = m.device("gpu0").bar(1).cpu_start
    before = leftovers(m, dev)
    r = q.map([(bar, 2 * G), (bar + 8 * G, 0x800)])
    assert r.route == P2PMapType.BUS_ADDR and r.path == "bus"
    assert r.segments.tolist() == [[bar, 2 * G], [bar + 8 * G, 0x800]] and r.metadata_nbytes == 16
    assert leftovers(m, dev) == before
    r.write(2 * G - 1, b"p2p")
    assert m.memory.read(bar + 2 * G - 1, 1) == b"p" and m.memory.read(bar + 8 * G, 2) == b"2p"
    q.unmap(r)


def test_bus_address_with_a_host_bridge_offset(m):
    dev = m.device("gpu1")  # behind the offset host bridge, beside vfio1
    q = NvmeQueue(dev)
    b = m.device("vfio1").bar(0)
    r = q.map([(b.cpu_start + G, G)])
    assert r.route == P2PMapType.BUS_ADDR and int(r.segments[0, 0]) == (b.cpu_start + G + b.bus_offset) % 2**64
    r.write(0, b"bus")
    assert m.memory.read(b.cpu_start + G, 3) == b"bus"
    q.unmap(r)


def test_through_the_host_bridge_is_mapped_as_mmio(m):
    dev = m.device("nvme0")
    q = NvmeQueue(dev)
    bar = m.device("vfio0").bar(0).cpu_start
    r = q.map([(bar, 2 * G), (bar + 16 * G, G)], write=True)
    assert r.route == P2PMapType.THRU_HOST_BRIDGE and r.path == "iova"
    iova = int(r.segments[0, 0])
    leaves = dev.domain.pgtable.leaves()
    mine = leaves[(leaves[:, 0] >= iova) & (leaves[:, 0] < iova + 3 * G)]
    assert len(mine) and all(int(p) & IommuProt.MMIO and not int(p) & IommuProt.CACHE for p in mine[:, 3])
    assert r.read(0, 4) == m.memory.read(bar, 4)
    q.unmap(r)
    # An unaligned seam: one MMIO dma_map_phys per vec.
    r = q.map([(bar, 0x800), (bar + 16 * G, G)], write=True)
    assert r.path == "direct" and len(r.segments) == 2 and r.batch.attrs & 1024
    q.unmap(r)
    assert leftovers(m, dev)[:2] == (0, 0)


def test_unreachable_or_mixed_peer_memory_is_blk_sts_inval(m):
    q = NvmeQueue(m.device("nvme0"))
    far = m.device("gpu1").bar(1).cpu_start  # behind a host bridge that is not whitelisted
    with pytest.raises(errors.InvalidArgument) as ei:
        q.map([(far, G)])
    assert ei.value.blk_status == BlkStatus.INVAL and "NOT_SUPPORTED" in str(ei.value)
    bar = m.device("gpu0").bar(1).cpu_start
    with pytest.raises(errors.InvalidArgument):
        q.map([(0x200000, G), (bar, G)])
    assert leftovers(m, q.device)[:2] == (0, 0)


# --------------------------------------------------- scatterlist path


def test_the_scatterlist_path_for_the_same_request(m):
    dev = m.device("nvme0")
    q = NvmeQueue(dev)
    pfns = m.pages.alloc(64, "scattered", 3)
    t = q.map_pages_sg(pfns, write=True)
    r = q.map_pages(pfns, write=True)
    assert t.nents == 1 and len(r.segments) == 1  # the IOMMU merges both into one segment
    assert t.metadata_nbytes >= 64 * 32 and r.metadata_nbytes == 16
    m.memory.write((int(pfns[40]) << 12) + 5, b"same data")
    assert dev.dma_read(int(t.dma_ranges()[0, 0]) + 40 * G + 5, 9) == r.read(40 * G + 5, 9) == b"same data"
    q.unmap_sg(t)
    q.unmap(r)
    with pytest.raises(errors.LifetimeError):
        q.unmap_sg(t)
    bvecs = NvmeQueue.bvecs_from_pages(pfns[:11], 0x100, 10 * G)
    t = q.map_sg(bvecs)
    assert t.orig_nents == len(q.merge(bvecs)) and t.cpu_nbytes == 10 * G
    q.unmap_sg(t)
    assert leftovers(m, dev)[:2] == (0, 0)
    m.pages.free(pfns)


def test_bvecs_from_pages(m):
    rows = NvmeQueue.bvecs_from_pages([5, 9, 7], 0x100, 2 * G)
    assert rows.tolist() == [[5 * G + 0x100, G - 0x100], [9 * G, G], [7 * G, 0x100]]
    for args in (([], 0, None), ([5], G, None), ([5, 6], 0, G), ([5], 0, G + 1), ([5], 0, 0)):
        with pytest.raises(errors.InvalidArgument):
            NvmeQueue.bvecs_from_pages(*args)


# --------------------------------------------- property: data and cleanup


@settings(max_examples=80)
@given(spec=bvec_lists, dev=st.sampled_from(["nvme0", "direct0", "legacy0", "ext0"]),
       seed=st.integers(0, 2**32 - 1))
def test_requests_move_the_right_bytes_and_leave_nothing_mapped(spec, dev, seed):
    m = Machine.default()
    d = m.device(dev)
    q = NvmeQueue(d)
    bvecs = build(spec, base=0x1_4000_0000 if dev != "legacy0" else 0x4000_0000)
    total = sum(n for _, n in bvecs)
    payload = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8).tobytes()
    before = leftovers(m, d)
    r = q.map(bvecs)  # a read request: the device writes the payload
    if d.domain is not None and not model_merge(bvecs, q.max_segment_size, q.seg_boundary_mask)[1] & 0xFFF:
        assert r.path == "iova" and len(r.segments) == 1
    else:
        assert r.path == "direct" and len(r.segments) == r.nvecs
    r.write(0, payload)
    q.unmap(r)  # bounce buffers are copied back here
    pos = 0
    for p, n in bvecs:
        assert m.memory.read(p, n) == payload[pos:pos + n]
        pos += n
    assert leftovers(m, d)[:2] == before[:2] and leftovers(m, d)[2] == 0


def test_with_unmaps_a_bus_address_request_too(m):
    """A peer-bus request owns no IOMMU mapping (nothing to warn about when
    collected), but leaving its with block still unmaps it."""
    q = NvmeQueue(m.device("nvme0"))
    bar = m.device("gpu0").bar(1).cpu_start
    with q.map([(bar, 2 * G)]) as r:
        assert r.path == "bus" and r.live
    assert not r.live
    with pytest.raises(errors.LifetimeError):
        r.write(0, b"x")
