"""RDMA memory regions over dma-bufs: ib_umem_dmabuf and mlx5's dynamic MR,
the ODP-style re-map
after invalidation, P2P routes, the pinned variant across kernel versions."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pydmabuf
from pydmabuf import (DmaDirection, Fence, Machine, P2PMapType, SgTable, Usage, checks, errors, fence_context_alloc,
                      workloads)
from pydmabuf._core import SG_CHAIN
from pydmabuf.dma import dma_map_sgtable, dma_unmap_sgtable
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import Exporter, ImporterOps, attach_revocable, close, export
from pydmabuf.exporters import SystemHeap
from pydmabuf.exporters.system_heap import HeapBuffer
from pydmabuf.importers import RdmaMr, UmemDmabuf
from pydmabuf.importers.rdma import _trim_table, _untrim_table, _window, best_page_size

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL


class locked:
    def __init__(self, buf):
        self.resv = buf.resv

    def __enter__(self):
        self.resv.lock()

    def __exit__(self, *exc):
        self.resv.unlock()


def invalidate(buf):
    with locked(buf):
        buf.invalidate_mappings()


# ------------------------------------------------------------ exporters


class Recording(HeapBuffer):
    """A system-heap buffer that checks its tables come back exactly as it
    handed them out (the umem trims them in place)."""

    def __init__(self, machine, npages, layout="scattered", seed=1):
        super().__init__(machine, machine.pages.alloc(npages, layout, seed), npages * G, owned=True,
                         layout=layout, seed=seed)
        self.snapshots = {}
        self.restored = []

    def map_dma_buf(self, a, d):
        t = super().map_dma_buf(a, d)
        self.snapshots[id(t)] = t.entries.copy()
        return t

    def unmap_dma_buf(self, a, t, d):
        self.restored.append(bool(np.array_equal(t.entries, self.snapshots.pop(id(t)))))
        super().unmap_dma_buf(a, t, d)


class Bar(Exporter):
    """A slice of a PCI BAR, mapped with dma_buf_phys_vec_to_sgt (a VFIO-like
    MMIO exporter; ``version`` picks how it treats importers it cannot
    revoke: 7.1 refuses them at attach, 7.0 fails their pin, 6.19 takes
    them)."""

    name = "bar"

    def __init__(self, machine, owner, bar, ranges, version="7.1"):
        self.machine = machine
        dev = machine.device(owner)
        self.provider = dev.p2p_provider(bar)
        base = dev.bar(bar).cpu_start
        self.ranges = np.array([[base + o, n] for o, n in ranges], dtype=np.uint64)
        self.version = version
        self.maps = self.unmaps = 0

    def attach(self, a):
        if not a.peer2peer:
            raise errors.NotSupported("MMIO needs a peer-to-peer capable importer")
        if self.version == "7.1" and not attach_revocable(a):
            raise errors.NotSupported("the importer cannot be revoked")

    def map_dma_buf(self, a, d):
        t = dma_buf_phys_vec_to_sgt(a, self.provider, self.ranges, int(self.ranges[:, 1].sum()), d)
        self.maps += 1
        return t

    def unmap_dma_buf(self, a, t, d):
        dma_buf_free_sgt(t, d)
        self.unmaps += 1

    def release(self, buf):
        pass


class Bar70(Bar):
    """VFIO in the 7.0 cycle: a pin op that refuses (so dynamic)."""

    def pin(self, a):
        raise errors.NotSupported("VFIO cannot be pinned")

    def unpin(self, a):
        pass


def bar_buf(m, owner="gpu0", bar=1, ranges=((0, 16 * G),), version="7.1", cls=Bar):
    e = cls(m, owner, bar, ranges, version)
    return export(e, int(e.ranges[:, 1].sum()))


def nothing_left(buf, refs=1):
    assert buf.attachments == [] and buf.live_mappings == 0 and buf.refcount == refs


# ------------------------------------------------------ window and trim


def test_the_window_is_page_aligned_and_the_exporters_table_is_restored(m):
    e = Recording(m, 3, layout="contiguous")
    b = export(e, 3 * G)
    mr = RdmaMr.register(m.device("nic0"), b, 0x800, 0x1000)
    u = mr.umem
    assert u.window == (0, 0x2000) and u.num_pages_from(0) == 1 and u.num_pages_from(mr.iova) == 2
    (base, n), = u.dma_ranges().tolist()
    assert n == 0x2000  # one IOVA segment of 3 pages trimmed to the 2-page window
    t = u.table
    assert int(t.dma_ranges()[0, 1]) == 0x2000  # trimmed in the exporter's own table
    mr.write(0, b"A" * 0x1000)
    assert m.memory.read((int(e.pfns[0]) << 12) + 0x800, 0x800) == b"A" * 0x800
    assert m.memory.read(int(e.pfns[1]) << 12, 0x800) == b"A" * 0x800
    mr.dereg()
    assert e.restored == [True]
    nothing_left(b)
    b.put()


@pytest.mark.parametrize("offset,nbytes,first_off,rows", [
    (0x800, 0x1000, 0, [G, G]),                 # window [0, 0x2000): two whole pages
    (0x1800, 0x1000, 0, [G, G]),                # [0x1000, 0x3000)
    (0x1000, 1, 0, [G]),                        # one byte: its page
    (0x2fff, 1, 0, [G]),                        # the last byte
])
def test_trim_over_direct_dma_segments(m, offset, nbytes, first_off, rows):
    """direct0 does direct DMA: one DMA segment per scattered page."""
    e = Recording(m, 3, layout="scattered")
    b = export(e, 3 * G)
    mr = RdmaMr.register(m.device("direct0"), b, offset, nbytes)
    segs = mr.umem.dma_ranges()
    assert segs[:, 1].tolist() == rows
    first_page = offset // G
    assert int(segs[0, 0]) == (int(e.pfns[first_page]) << 12) + first_off
    mr.write(0, b"x" * nbytes)
    head = min(nbytes, G - offset % G)
    assert m.memory.read((int(e.pfns[first_page]) << 12) + offset % G, head) == b"x" * head
    if nbytes > head:  # the rest is on the next (scattered) page
        assert m.memory.read(int(e.pfns[first_page + 1]) << 12, nbytes - head) == b"x" * (nbytes - head)
    mr.dereg()
    assert e.restored == [True]
    b.put()


def kernel_trim(segs, start, end):
    """ib_umem_dmabuf_map_pages' loop, literally (a reference model)."""
    segs = [list(s) for s in segs]
    cur, nmap, first, last = 0, 0, None, None
    for i, s in enumerate(segs):
        if start < cur + s[1] and cur < end:
            nmap += 1
        if cur <= start < cur + s[1]:
            off = start - cur
            first = (i, off)
            s[0] += off
            s[1] -= off
            cur += off
        if cur < end <= cur + s[1]:
            trim = cur + s[1] - end
            last = (i, trim)
            s[1] -= trim
            break
        cur += s[1]
    return segs, nmap, first, last


@settings(max_examples=150)
@given(lens=st.lists(st.integers(1, 5).map(lambda k: k * 0x800), min_size=1, max_size=12),
       data=st.data())
def test_trim_matches_the_kernels_loop(lens, data):
    total = sum(lens)
    start = data.draw(st.integers(0, total - 1)) & ~(G - 1)
    end = data.draw(st.integers(start + 1, total + 3 * G))
    end = (end + G - 1) & ~(G - 1)
    rows = np.array([[0x100000 * (i + 1), n] for i, n in enumerate(lens)], dtype=np.uint64)
    t = SgTable.from_ranges(rows)
    before = t.entries.copy()
    tr = _trim_table(t, start, end)
    want, nmap, first, last = kernel_trim(rows.tolist(), start, end)
    assert t.dma_ranges().tolist() == want
    assert tr.nmap == nmap
    assert (tr.first_index, tr.first_offset) == (first if first else (-1, 0))
    assert tr.last_trim == (last[1] if last else 0) and (tr.last_slot >= 0) == (last is not None)
    if first:
        assert _window(t, tr).tolist() == want[first[0]:first[0] + nmap]
    _untrim_table(t, tr)
    assert np.array_equal(t.entries, before)


@pytest.mark.parametrize("dev", ["direct0", "nic0"])
def test_window_is_the_dma_segments_of_a_chained_mapped_table(m, dev):
    """The window is a slice of the table's DMA segments: the non-chain
    slots in order, cut at ``nents`` (the definition _trim_table uses),
    also across chain links and after an IOMMU merged segments."""
    pfns, _ = workloads.layout("fragmented", 5000, seed=2)
    t = SgTable.from_pages(pfns)
    e = t.entries
    assert ((e["page_link"] & np.uint64(SG_CHAIN)) != 0).any()
    d = m.device(dev)
    dma_map_sgtable(d, t, DmaDirection.BIDIRECTIONAL)
    total = int(t.dma_ranges()[:, 1].sum())
    for start, end in [(0, total), (3 * G, total - 5 * G), (G, 2 * G)]:
        tr = _trim_table(t, start, end)
        e = t.entries
        slots = np.flatnonzero((e["page_link"] & np.uint64(SG_CHAIN)) == 0)[: t.nents]
        slots = slots[tr.first_index : tr.first_index + tr.nmap]
        want = np.stack([e["dma_address"][slots].astype(np.uint64), e["dma_length"][slots].astype(np.uint64)], 1)
        assert np.array_equal(_window(t, tr), want) and len(want) == tr.nmap
        _untrim_table(t, tr)
    dma_unmap_sgtable(d, t, DmaDirection.BIDIRECTIONAL)


def kernel_best_pgsz(segs, address, length, iova, bitmap=G):
    """ib_umem_find_best_pgsz(), literally."""
    m64 = (1 << 64) - 1
    va = iova
    mask = bitmap & ~((1 << (((length - 1 + va) ^ va) & m64).bit_length()) - 1) & m64
    pgoff = address & (G - 1)
    for i, (dma, n) in enumerate(segs):
        mask |= ((dma + pgoff) ^ va) & m64
        va = (va + n - pgoff) & m64
        if i != len(segs) - 1:
            mask |= va
        pgoff = 0
    if mask:
        ctz = (mask & -mask).bit_length() - 1
        bitmap &= (1 << (ctz + 1)) - 1
    return 1 << (bitmap.bit_length() - 1) if bitmap else 0


@settings(max_examples=200)
@given(segs=st.lists(st.tuples(st.integers(0, 1 << 40).map(lambda x: x & ~0x1FF),
                               st.integers(1, 16).map(lambda k: k * 0x200)), min_size=1, max_size=6),
       address=st.integers(0, 1 << 20), iova=st.integers(0, (1 << 64) - 1), bitmap=st.sampled_from([G, G | 0x200000]))
def test_best_page_size_matches_the_kernel(segs, address, iova, bitmap):
    length = max(1, sum(n for _, n in segs) - (address & (G - 1)))
    got = best_page_size(np.array(segs, dtype=np.uint64), address, length, iova, bitmap)
    assert got == kernel_best_pgsz(segs, address, length, iova, bitmap)


# --------------------------------------------- invalidation and ODP


def test_invalidate_zaps_then_unmaps_and_the_next_access_refaults(m):
    b = SystemHeap(m).allocate(8 * G, layout="fragmented", movable=True)
    exp = b.exporter
    mr = RdmaMr.register(m.device("nic0"), b, 0, 8 * G)
    order = []
    real_unmap = exp.unmap_dma_buf

    def watch(a, t, d):
        order.append(("unmap", mr.translation_valid))
        real_unmap(a, t, d)
    exp.unmap_dma_buf = watch
    mr.write(3 * G + 5, b"through the MR")
    assert (mr.faults, mr.zaps, exp.maps) == (1, 0, 1)
    invalidate(b)
    assert order == [("unmap", False)]  # zapped before the unmap
    assert not mr.translation_valid and not mr.umem.mapped and b.live_mappings == 0
    assert mr.dma_ranges().shape == (0, 2)
    assert mr.read(3 * G + 5, 14) == b"through the MR"  # page-faults, maps again
    assert (mr.faults, mr.zaps, exp.maps) == (2, 1, 2)
    assert mr.mtt_writes == 3 * 8  # enable, zap, enable: 8 MTT entries each
    # A move: invalidate, new pages; the MR follows them on its next access.
    old = exp.pfns.copy()
    with locked(b):
        b.move()
    assert not mr.translation_valid
    mr.write(0, b"new pages")
    assert m.memory.read(int(exp.pfns[0]) << 12, 9) == b"new pages" and not np.array_equal(exp.pfns, old)
    assert mr.read(3 * G + 5, 14) == b"through the MR"  # the move copied the contents
    # Revoking the umem: the MR cannot map again.
    mr.revoke()
    assert mr.revoked and not mr.umem.mapped
    with pytest.raises(errors.InvalidArgument) as ei:
        mr.fault()
    assert "revoked" in str(ei.value)
    with pytest.raises(errors.InvalidArgument):
        mr.read(0, 1)
    mr.revoke()  # once only: the second does nothing
    mr.dereg()
    nothing_left(b)
    b.put()


def test_exporter_revoke_and_unrevoke(m):
    b = SystemHeap(m).allocate(4 * G)
    mr = RdmaMr.register(m.device("nic0"), b, 0, 4 * G)
    b.revoke(timeout=5)  # the MR unmaps inside its callback, so this returns
    assert not mr.translation_valid and b.live_mappings == 0
    with pytest.raises(errors.Revoked) as ei:  # the fault's map fails with ENODEV
        mr.read(0, 4)
    assert ei.value.errno == 19 and mr.faults == 1
    b.unrevoke()
    mr.write(0, b"back")
    assert mr.read(0, 4) == b"back" and mr.faults == 2
    mr.dereg()
    b.put()


def test_access_and_zap_do_not_overlap(m):
    """The NIC's accesses run while the exporter invalidates from another
    thread; every read sees the data and nothing is left mapped."""
    b = SystemHeap(m).allocate(16 * G, movable=True)
    mr = RdmaMr.register(m.device("nic0"), b, 0, 16 * G)
    mr.write(0, bytes(range(256)) * 16)
    stop = threading.Event()
    errs = []

    def churn():
        try:
            while not stop.is_set():
                invalidate(b)
        except BaseException as e:  # pragma: no cover - reported below
            errs.append(e)
    th = threading.Thread(target=churn)
    th.start()
    try:
        for _ in range(150):
            assert mr.read(0, 256) == bytes(range(256))
    finally:
        stop.set()
        th.join()
    assert not errs
    mr.dereg()
    nothing_left(b)
    b.put()


# ------------------------------------------------------------ pinned


def test_pinned_mr_is_refused_at_attach_by_a_revocable_only_exporter(m):
    b = bar_buf(m)
    with pytest.raises(errors.NotSupported) as ei:
        RdmaMr.register_pinned(m.device("nic0"), b, 0, 4 * G)
    assert ei.value.errno == 95
    nothing_left(b)
    # The dynamic MR is revocable and accepted.
    with RdmaMr.register(m.device("nic0"), b, 0, 4 * G) as mr:
        assert attach_revocable(mr.attachment) and mr.route == P2PMapType.BUS_ADDR
    nothing_left(b)
    b.put()


def test_pinned_mr_on_a_static_exporter_maps_once_and_never_faults(m):
    b = SystemHeap(m).allocate(4 * G)
    mr = RdmaMr.register_pinned(m.device("nic0"), b, G, 2 * G)
    assert mr.pinned and mr.attachment.pin_count == 1 and not b.exporter.is_dynamic()
    assert mr.umem.mapped and mr.translation_valid and b.exporter.maps == 1
    assert not attach_revocable(mr.attachment)
    mr.write(0, b"pinned")
    assert mr.translation_valid and mr.read(0, 6) == b"pinned"
    with pytest.raises(errors.IommuFault):
        mr.fault()  # no page faults on a pinned MR
    mr.revoke()
    with pytest.raises(errors.IommuFault):
        mr.read(0, 1)
    assert mr.attachment.pin_count == 0
    mr.dereg()
    nothing_left(b)
    b.put()


def test_pinned_on_70_fails_at_pin_and_unpins_nothing(m):
    b = bar_buf(m, version="7.0", cls=Bar70)
    with pytest.raises(errors.NotSupported):
        RdmaMr.register_pinned(m.device("nic0"), b, 0, G, kernel_version="7.0")
    nothing_left(b)
    b.put()


def test_pinned_on_619_is_accepted_and_a_revoke_only_warns(m, caplog):
    """6.19: VFIO takes the pinned importer; its stub callback only warns,
    so the NIC keeps using a mapping the exporter revoked (caught)."""
    b = bar_buf(m, version="6.19")
    mr = RdmaMr.register_pinned(m.device("nic0"), b, 0, 2 * G, kernel_version="6.19")
    mr.write(0, b"mmio")
    with caplog.at_level(logging.WARNING, logger="pydmabuf.importers.rdma"):
        with pytest.raises(errors.TimedOut):
            b.revoke(timeout=0.05)  # the importer never unmaps
    assert mr.umem.unsupported_invalidations == 1 and "pinned" in caplog.text
    with pytest.raises(errors.LifetimeError) as ei:
        mr.read(0, 4)
    assert "revoked" in str(ei.value)
    mr.dereg()
    nothing_left(b)
    b.put()


def test_dynamic_ops_without_callback_are_einval_up_to_70(m):
    b = SystemHeap(m).allocate(2 * G)

    class NoCallback(ImporterOps):
        allow_peer2peer = True

    for v in ("6.19", "7.0"):
        with pytest.raises(errors.InvalidArgument):
            UmemDmabuf.get(m.device("nic0"), b, 0, G, NoCallback(), kernel_version=v)
        with pytest.raises(errors.InvalidArgument):
            UmemDmabuf.get(m.device("nic0"), b, 0, G, None, kernel_version=v)
    u = UmemDmabuf.get(m.device("nic0"), b, 0, G, NoCallback())  # 7.1: optional
    assert not u.mapped and u.attachment.dynamic
    u.release()
    with pytest.raises(errors.LifetimeError):
        u.release()
    with pytest.raises(ValueError):
        UmemDmabuf.get(m.device("nic0"), b, 0, G, NoCallback(), kernel_version="5.4")
    nothing_left(b)
    b.put()


# --------------------------------------------------- KERNEL fences


def test_kernel_fence_that_never_signals_times_out_the_registration(m):
    b = SystemHeap(m).allocate(4 * G)
    f = Fence(fence_context_alloc(), 1)
    with locked(b):
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.KERNEL)
    with pytest.raises(errors.TimedOut) as ei:
        RdmaMr.register(m.device("nic0"), b, 0, 4 * G, fence_timeout=0.05)
    assert ei.value.errno == 110
    nothing_left(b)
    assert b.exporter.maps == b.exporter.unmaps == 1
    f.signal()
    b.put()


def test_fault_waits_for_kernel_fences_and_keeps_the_mapping(m):
    b = SystemHeap(m).allocate(4 * G, movable=True)
    mr = RdmaMr.register(m.device("nic0"), b, 0, 4 * G, fence_timeout=0.05)
    f = Fence(fence_context_alloc(), 1)
    with locked(b):
        b.invalidate_mappings()
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.KERNEL)  # e.g. the exporter's copy after a move
    with pytest.raises(errors.TimedOut):
        mr.read(0, 4)
    assert mr.umem.mapped and not mr.translation_valid  # as the kernel: mapped, not enabled
    maps = b.exporter.maps
    threading.Timer(0.02, f.signal).start()
    mr.fence_timeout = 5
    mr.read(0, 4)
    assert b.exporter.maps == maps and mr.translation_valid  # the second fault only waited
    mr.dereg()
    b.put()


# ------------------------------------------------ checks and their order


def test_get_checks_in_the_kernels_order(m):
    b = SystemHeap(m).allocate(3 * G)
    nic = m.device("nic0")
    fd = b.fd()
    b.get()
    close(fd)
    # Overflow is checked before the fd is even looked up.
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(nic, fd, 2**64 - 1, 1)
    with pytest.raises(errors.BadHandle):
        RdmaMr.register(nic, fd, 0, G)
    other = pydmabuf.files.install(object())
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(nic, other, 0, G)
    pydmabuf.files.close(other)
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(nic, b, G, 2 * G + 1)  # past the end
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(nic, b, G, 0)  # no page
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(nic, b, -1, G)
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(nic, b, 0x800, G, iova=0x10000)  # page offsets differ
    with pytest.raises(TypeError):
        RdmaMr.register(nic, b, 0.5, G)
    with pytest.raises(TypeError):
        RdmaMr.register(nic, "fd", 0, G)
    nothing_left(b)
    assert b.exporter.maps == 0
    # Exactly to the end, through a file descriptor, at another IOVA.
    fd = b.fd()
    b.get()
    mr = RdmaMr.register(nic, fd, G, 2 * G, iova=0x7000_0000_1000)
    close(fd)
    mr.write(2 * G - 3, b"end")
    assert mr.read(2 * G - 3, 3) == b"end"
    with pytest.raises(errors.IommuFault):
        mr.read(2 * G - 3, 4)  # past the MR
    with pytest.raises(errors.IommuFault):
        mr.read(-1, 1)
    mr.dereg()
    with pytest.raises(errors.LifetimeError):
        mr.dereg()
    with pytest.raises(errors.LifetimeError):
        mr.read(0, 1)
    nothing_left(b)
    b.put()


def test_read_only_mr_and_locking(m):
    b = SystemHeap(m).allocate(2 * G)
    mr = RdmaMr.register(m.device("nic0"), b, 0, 2 * G, writable=False)
    with pytest.raises(errors.NotPermitted):
        mr.write(0, b"x")
    mr.read(0, 1)
    with pytest.raises(errors.LockingError):
        mr.umem.map_pages()
    with pytest.raises(errors.LockingError):
        mr.umem.unmap_pages()
    assert "valid" in repr(mr) and "dynamic" in repr(mr) and "mapped" in repr(mr.umem)
    mr.dereg()
    b.put()


def test_unaligned_segments_fail_the_page_size_check_and_unmap(m):
    """An MMIO slice whose first range ends inside a page: PAGE_SIZE MTT
    entries cannot describe it (EINVAL at registration, nothing left)."""
    b = bar_buf(m, ranges=((0, 0x1800), (0x4000, 0x800)))
    with pytest.raises(errors.InvalidArgument) as ei:
        RdmaMr.register(m.device("nic0"), b, 0, 0x2000)
    assert "PAGE_SIZE" in str(ei.value)
    nothing_left(b)
    assert b.exporter.maps == b.exporter.unmaps == 1
    b.put()


# ----------------------------------------------------------------- P2P


@pytest.mark.parametrize("owner,bar,client,route", [
    ("gpu0", 1, "nic0", P2PMapType.BUS_ADDR),            # siblings under one switch
    ("vfio0", 0, "nic0", P2PMapType.THRU_HOST_BRIDGE),   # across host bridges (whitelisted)
    ("vfio1", 0, "gpu1", P2PMapType.BUS_ADDR),           # behind the host bridge with a bus offset
])
def test_p2p_routes(m, owner, bar, client, route):
    b = bar_buf(m, owner, bar, ranges=((0x10000, 4 * G), (0x40000, 4 * G)))
    dev = m.device(client)
    live = m.iova_stats(dev)["live_ranges"]
    mr = RdmaMr.register(dev, b, G, 6 * G)
    assert mr.route == route
    segs = mr.dma_ranges()
    base = m.device(owner).bar(bar).cpu_start
    prov = m.device(owner).p2p_provider(bar)
    if route == P2PMapType.BUS_ADDR:  # bus addresses, nothing in the IOMMU
        assert int(segs[0, 0]) == (base + 0x11000 + prov.bus_offset) % 2**64
        assert m.iova_stats(dev)["live_ranges"] == live
    else:  # one IOVA range through the host bridge
        assert m.iova_stats(dev)["live_ranges"] == live + 1 and len(segs) == 1
    mr.write(3 * G - 2, b"peer")  # crosses from the first range into the second
    assert m.memory.read(base + 0x10000 + 4 * G - 2, 2) == b"pe"
    assert m.memory.read(base + 0x40000, 2) == b"er"
    assert mr.read(3 * G - 2, 4) == b"peer"
    mr.dereg()
    nothing_left(b)
    b.put()


def test_p2p_not_supported_fails_registration(m):
    b = bar_buf(m, "gpu1", 1)
    with pytest.raises(errors.InvalidArgument):
        RdmaMr.register(m.device("nic0"), b, 0, G)
    nothing_left(b)
    b.put()


def test_static_importer_of_mmio_is_refused(m):
    b = bar_buf(m)
    with pytest.raises(errors.NotSupported):
        b.attach(m.device("nic0"))
    b.put()


# ------------------------------------------------------- state machine


class MrLifecycle(RuleBasedStateMachine):
    """An MR over a movable buffer, against a bytearray: whatever the
    exporter does (invalidate, move), the NIC's reads through the MR see
    what it wrote, and at most one mapping is live."""

    @initialize(npages=st.integers(1, 6), off_pages=st.integers(0, 2), sub=st.integers(0, G - 1))
    def setup(self, npages, off_pages, sub):
        self.m = Machine.default()
        self.buf = SystemHeap(self.m).allocate((npages + 3) * G, layout="fragmented", movable=True)
        self.off = off_pages * G + sub
        self.n = npages * G - sub
        self.mr = RdmaMr.register(self.m.device("nic0"), self.buf, self.off, self.n)
        self.model = bytearray(self.mr.read(0, self.n))

    @rule(data=st.data())
    def write(self, data):
        o = data.draw(st.integers(0, self.n - 1))
        k = data.draw(st.integers(1, min(64, self.n - o)))
        payload = data.draw(st.binary(min_size=k, max_size=k))
        self.mr.write(o, payload)
        self.model[o:o + k] = payload

    @rule(data=st.data())
    def read(self, data):
        o = data.draw(st.integers(0, self.n - 1))
        k = data.draw(st.integers(1, min(256, self.n - o)))
        assert self.mr.read(o, k) == bytes(self.model[o:o + k])

    @rule()
    def invalidate(self):
        invalidate(self.buf)
        assert not self.mr.translation_valid

    @rule()
    def move(self):
        with locked(self.buf):
            self.buf.move()

    @rule()
    def fault(self):
        self.mr.fault()
        assert self.mr.translation_valid

    @invariant()
    def one_mapping_at_most(self):
        if hasattr(self, "buf"):
            assert self.buf.live_mappings == (1 if self.mr.umem.mapped else 0)
            assert self.mr.translation_valid <= self.mr.umem.mapped

    def teardown(self):
        if hasattr(self, "mr"):
            self.mr.dereg()
            assert self.buf.live_mappings == 0 and self.buf.attachments == []
            self.buf.put()


MrLifecycle.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
test_mr_lifecycle = MrLifecycle.TestCase


def test_checker_in_report_mode_sees_no_violation(m):
    with checks.report_mode():
        checks.clear()
        b = SystemHeap(m).allocate(4 * G, movable=True)
        with RdmaMr.register(m.device("nic0"), b, 0, 4 * G) as mr:
            mr.write(0, b"x")
            invalidate(b)
            mr.read(0, 1)
        b.put()
        assert checks.reports() == []
