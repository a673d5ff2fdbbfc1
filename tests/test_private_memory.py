"""Confidential-computing private memory: only trusted devices attach, the
physical ranges are the private ones, the host cannot map it, and DMA by an
untrusted device faults end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmabuf import DmaDirection, IovaState, Machine, RangeKind, errors
from pydmabuf.dma import dma_map_phys, dma_unmap_phys
from pydmabuf.dmabuf import PHYS_NAMESPACE, ImporterOps, export
from pydmabuf.exporters import PrivateMemory
from pydmabuf.exporters.private import PrivateBuffer

from machines import machine

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL
PRIVATE_START, PRIVATE_END = 60 << 30, 64 << 30


class PhysOps(ImporterOps):
    allow_peer2peer = True
    import_namespaces = frozenset({PHYS_NAMESPACE})

    def invalidate_mappings(self, a):
        pass


def _in_private(rows):
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1, 2)
    return bool(((rows[:, 0] >= PRIVATE_START) & (rows[:, 0] + rows[:, 1] <= PRIVATE_END)).all())


def test_buffers_come_from_private_memory_and_go_back(m):
    pm = PrivateMemory(m)
    b1 = pm.allocate(5 * G, layout="fragmented", seed=3)
    b2 = pm.allocate(G + 1)
    p1, p2 = b1.exporter.pfns, b2.exporter.pfns
    assert len(p1) == 5 and len(p2) == 2 and b2.size == G + 1
    assert not set(p1.tolist()) & set(p2.tolist())
    for p in (p1, p2):
        assert all(m.what_is(int(x) << 12)[0] == RangeKind.PRIVATE for x in (p.min(), p.max()))
    assert m.private_pages.allocated_pages == 7 and m.pages.allocated_pages == 0
    assert "7/" in repr(pm)
    b1.put()
    b2.put()
    assert m.private_pages.allocated_pages == 0
    assert b1.exporter.released == 1


@pytest.mark.parametrize("bad", [0, -G, 1.5, True, "4096"])
def test_bad_sizes_are_einval_and_allocate_nothing(m, bad):
    with pytest.raises(errors.InvalidArgument):
        PrivateMemory(m).allocate(bad)
    assert m.private_pages.allocated_pages == 0


def test_exhaustion_is_enomem_and_changes_nothing(m):
    pm = PrivateMemory(m)
    with pytest.raises(errors.OutOfMemory):
        pm.allocate(5 << 30)
    assert m.private_pages.allocated_pages == 0
    whole = pm.allocate(4 << 30)  # exactly all of it
    with pytest.raises(errors.OutOfMemory):
        pm.allocate(G)
    whole.put()
    plain = machine(memory=[{"start": 0, "size": "1G", "kind": "ram"}])
    with pytest.raises(errors.OutOfMemory):
        PrivateMemory(plain).allocate(G)


def test_untrusted_devices_cannot_attach(m):
    b = PrivateMemory(m).allocate(4 * G)
    exp = b.exporter
    for dev in ("nic0", "nvme0", "vfio0", "legacy0"):
        with pytest.raises(errors.NotPermitted) as ei:
            b.attach(m.device(dev))
        assert ei.value.errno == 1 and dev in str(ei.value)
        with pytest.raises(errors.NotPermitted):
            b.dynamic_attach(m.device(dev), PhysOps())
    assert b.attachments == [] and exp.refused == 8 and exp.maps == 0
    b.put()


def test_trusted_gpu_maps_and_does_dma(m):
    b = PrivateMemory(m).allocate(6 * G, layout="scattered", seed=2)
    gpu = m.device("gpu0")
    assert gpu.cc_trusted
    a = b.attach(gpu)
    t = a.map_unlocked(BIDI)
    assert _in_private(t.cpu_ranges()) and t.cpu_nbytes == 6 * G
    seg, n = (int(x) for x in t.dma_ranges()[0])
    gpu.dma_write(seg + 2 * G + 5, b"secret")
    phys = int(b.exporter.pfns[2]) << 12
    assert m.memory.read(phys + 5, 6) == b"secret"
    assert gpu.dma_read(seg + 2 * G + 5, 6) == b"secret"
    a.unmap_unlocked(t, BIDI)
    b.detach(a)
    assert b.exporter.maps == b.exporter.unmaps == 1
    b.put()


def test_phys_ranges_are_the_private_ranges(m):
    b = PrivateMemory(m).allocate(7 * G + 100, layout="fragmented", seed=5)
    a = b.dynamic_attach(m.device("gpu0"), PhysOps())
    b.resv.lock()
    try:
        pv = a.phys_vec()
    finally:
        b.resv.unlock()
    assert pv.provider is None and _in_private(pv.ranges)
    assert int(pv.ranges[:, 1].sum()) == 7 * G + 100
    # The ranges cover exactly the buffer's pages, in order.
    starts = (np.asarray(pv.ranges[:, 0]) >> np.uint64(12)).tolist()
    assert starts[0] == int(b.exporter.pfns[0])
    # A trusted importer maps them itself with the list-free API and reaches them.
    gpu = m.device("gpu0")
    with IovaState.try_alloc(gpu, 0, 8 * G) as s:
        s.link_ranges(pv.ranges, BIDI)
        s.sync()
        gpu.dma_write(s.addr + 7 * G, b"tail")
        assert m.memory.read(int(b.exporter.pfns[7]) << 12, 4) == b"tail"
    b.detach(a)
    b.put()


def test_the_core_refuses_phys_ranges_to_untrusted_devices_even_if_the_exporter_let_them_attach(m):
    class Lenient(PrivateBuffer):
        def attach(self, a):
            pass

    pfns = m.private_pages.alloc(2)
    b = export(Lenient(m, pfns, 2 * G, "contiguous"), 2 * G)
    a = b.dynamic_attach(m.device("nic0"), PhysOps())
    b.resv.lock()
    try:
        with pytest.raises(errors.NotPermitted) as ei:
            a.phys_vec()
    finally:
        b.resv.unlock()
    assert "not trusted" in str(ei.value)
    b.detach(a)
    b.put()
    assert m.private_pages.allocated_pages == 0


def test_the_host_cannot_map_it(m):
    b = PrivateMemory(m).allocate(2 * G)
    with pytest.raises(errors.NotPermitted):
        b.mmap()
    with pytest.raises(errors.NotPermitted):
        b.mmap(0, G)
    b.resv.lock()
    try:
        with pytest.raises(errors.NotPermitted):
            b.vmap()
    finally:
        b.resv.unlock()
    assert b._vmap_count == 0 and not b._cpu_maps
    with pytest.raises(errors.NotPermitted):
        b.exporter.get_phys_vec(None)  # the generic CPU-mapping path
    b.put()


def test_untrusted_dma_to_private_memory_faults_end_to_end(m):
    """The trusted GPU maps the buffer; the NIC shares its IOMMU domain (one
    group behind the switch), so the GPU's IOVA translates for the NIC too,
    yet the access faults: the NIC may not touch confidential memory."""
    b = PrivateMemory(m).allocate(4 * G)
    gpu, nic = m.device("gpu0"), m.device("nic0")
    assert gpu.domain is nic.domain and not nic.cc_trusted
    a = b.attach(gpu)
    t = a.map_unlocked(BIDI)
    iova = int(t.dma_ranges()[0, 0])
    gpu.dma_write(iova, b"guest data")
    with pytest.raises(errors.IommuFault) as ei:
        nic.dma_read(iova, 4)
    assert ei.value.errno == 14 and "confidential" in str(ei.value)
    with pytest.raises(errors.IommuFault):
        nic.dma_write(iova, b"evil")
    assert gpu.dma_read(iova, 10) == b"guest data"  # the failed write changed nothing
    # A mapping the untrusted device makes itself faults the same way.
    phys = int(b.exporter.pfns[1]) << 12
    dma = dma_map_phys(nic, phys, G, BIDI)
    with pytest.raises(errors.IommuFault):
        nic.dma_read(dma, 8)
    dma_unmap_phys(nic, dma, G, BIDI)
    # So does a device doing direct DMA at the physical address.
    with pytest.raises(errors.IommuFault):
        m.device("direct0").dma_read(phys, 8)
    a.unmap_unlocked(t, BIDI)
    b.detach(a)
    b.put()


@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 40 * G), min_size=1, max_size=5),
       layout=st.sampled_from(["contiguous", "fragmented", "scattered"]), seed=st.integers(0, 1000))
def test_buffers_are_private_and_disjoint(sizes, layout, seed):
    m = Machine.default()
    pm = PrivateMemory(m)
    bufs = [pm.allocate(n, layout=layout, seed=seed + i) for i, n in enumerate(sizes)]
    seen: set[int] = set()
    for b, n in zip(bufs, sizes):
        pv = b.exporter.get_phys_vec(b.attach(m.device("gpu0")))
        assert _in_private(pv.ranges) and int(pv.ranges[:, 1].sum()) == n
        pages = set(b.exporter.pfns.tolist())
        assert len(pages) == -(-n // G) and not pages & seen
        seen |= pages
    for b in bufs:
        for a in b.attachments:
            b.detach(a)
        b.put()
    assert m.private_pages.allocated_pages == 0
