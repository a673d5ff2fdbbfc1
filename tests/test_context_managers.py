"""Resources as context managers: ``with heap.allocate(n) as buf:`` puts,
``with buf.attach(dev) as a:`` detaches, ``with a.map(d) as table:`` unmaps
(static and dynamic attachments, with or without the reservation lock
held at the end), ``with IovaState.try_alloc(...) as st:`` destroys; the
explicit calls keep working inside the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from pydmabuf import DmaDirection, IovaState, SgTable, errors
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.exporters import SystemHeap

BIDI = DmaDirection.BIDIRECTIONAL


@pytest.fixture
def heap(m):
    return SystemHeap(m)


class Dropper(ImporterOps):
    """A dynamic importer that unmaps its table when told (under the lock
    the exporter holds)."""

    table = None

    def invalidate_mappings(self, attachment):
        if self.table is not None:
            attachment.unmap(self.table, BIDI)
            self.table = None


def test_with_allocate_puts_the_reference(heap):
    with heap.allocate(1 << 16) as buf:
        assert buf.refcount == 1 and not buf.released
    assert buf.released


def test_with_allocate_after_a_put_by_hand_puts_nothing_more(heap):
    with heap.allocate(1 << 16) as buf:
        buf.put()  # the last reference, by hand: the exit must not put again (strict checker raises)
    assert buf.released


def test_with_allocate_puts_when_the_block_raises(heap):
    with pytest.raises(RuntimeError):
        with heap.allocate(1 << 16) as buf:
            raise RuntimeError("boom")
    assert buf.released


def test_with_attach_and_map_unmap_and_detach_in_order(m, heap):
    gpu = m.device("gpu0")
    with heap.allocate(1 << 16) as buf, buf.attach(gpu) as a:
        with buf.resv, a.map(BIDI) as table:
            assert isinstance(table, SgTable) and a.live_mappings == 1
            iova = int(table.dma_ranges()[0, 0])
            gpu.dma_write(iova, b"x")
        assert a.live_mappings == 0 and not a.detached
    assert a.detached and buf.released
    # The unmap took the IOVA down; gpu0's domain is lazy, so the IOTLB
    # forgets the translation only at the flush (iotlb tests cover the window).
    gpu.domain.flush()
    with pytest.raises(errors.IommuFault):
        gpu.dma_read(iova, 1)


def test_with_map_unlocked_takes_the_lock_to_unmap(m, heap):
    with heap.allocate(1 << 16) as buf, buf.attach(m.device("gpu0")) as a:
        with a.map_unlocked(BIDI) as table:
            assert not buf.resv.held_by_current_thread() and a.live_mappings == 1
        assert a.live_mappings == 0 and table.mapping is None
        assert not buf.resv.held_by_current_thread()


def test_with_map_of_a_dynamic_attachment_after_the_importer_unmapped(m, heap):
    # The exporter moves the buffer inside the block; the importer unmaps
    # in its invalidate_mappings.  The exit finds no live mapping and does
    # nothing: no double unmap (which the strict checker would raise).
    ops = Dropper()
    with heap.allocate(1 << 16, movable=True) as buf, buf.dynamic_attach(m.device("nic0"), ops) as a:
        with buf.resv:
            with a.map(BIDI) as table:
                ops.table = table
                buf.move()
                assert ops.table is None and a.live_mappings == 0
            with a.map(BIDI) as table:  # a fresh mapping, unmapped by the exit
                ops.table = table
            assert a.live_mappings == 0


def test_with_map_after_an_unmap_by_hand_does_nothing(m, heap):
    with heap.allocate(1 << 16) as buf, buf.attach(m.device("gpu0")) as a:
        with buf.resv:
            with a.map(BIDI) as table:
                a.unmap(table, BIDI)
            assert a.live_mappings == 0


def test_a_table_that_is_not_a_dmabuf_mapping_refuses_with():
    t = SgTable.from_pages(np.arange(4, dtype=np.uint64))
    with pytest.raises(TypeError, match="only a live dma-buf mapping"):
        with t:
            pass


def test_with_attach_detaches_after_a_detach_by_hand_only_once(m, heap):
    with heap.allocate(1 << 16) as buf:
        with buf.attach(m.device("gpu0")) as a:
            buf.detach(a)
        assert a.detached


def test_with_iova_state_destroys_what_is_linked(m):
    gpu = m.device("gpu0")
    with IovaState.try_alloc(gpu, 0, 2 * 4096) as st:
        n = st.link_ranges([[0x100000000, 0x2000]], BIDI)
        st.sync(0, n)
        addr = st.addr
        assert gpu.dma_read(addr, 1) is not None
    assert not st.live
    gpu.domain.flush()  # lazy domain: the IOTLB is invalidated at the flush
    with pytest.raises(errors.IommuFault):
        gpu.dma_read(addr, 1)


def test_with_allocate_leaves_the_reference_a_cpu_mapping_holds(heap):
    # The block's own reference went by hand; the one the mapping holds is
    # the mapping's to put, so leaving the block puts nothing.
    with heap.allocate(1 << 16) as buf:
        cpu = buf.mmap()
        buf.put()
    assert buf.refcount == 1 and not buf.released
    cpu.close()
    assert buf.released


def test_every_resource_owner_of_the_dma_buf_layers_is_a_lifecycle_owner():
    from pydmabuf._lifecycle import Owner
    from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf
    from pydmabuf.exporters import VfioPciBar
    from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, RdmaMr
    from pydmabuf.importers.drm import DrmDynamicGpu
    from pydmabuf.importers.nvme import NvmeMapping

    for cls in (DmaBuf, Attachment, CpuMapping, VfioPciBar, DrmGpu, DrmDynamicGpu, IommufdIoas, KvmVm, RdmaMr,
                NvmeMapping):
        assert issubclass(cls, Owner), cls


@pytest.mark.parametrize("kind", ["attachment", "cpu-mapping", "drm", "drm-dynamic", "rdma", "nvme", "iommufd",
                                  "kvm"])
def test_close_gives_back_what_the_owner_holds_and_twice_does_nothing(m, heap, kind):
    from pydmabuf.exporters import VfioPciBar
    from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, NvmeQueue, RdmaMr
    from pydmabuf.importers.drm import DrmDynamicGpu
    from pydmabuf.importers.kvm import KVM_MEM_VFIO_DMABUF

    vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20) if kind in ("iommufd", "kvm") else None
    buf = vfio.export() if vfio is not None else heap.allocate(16 * 4096)
    if kind == "attachment":
        obj = buf.attach(m.device("gpu0"))
    elif kind == "cpu-mapping":
        obj = buf.mmap()
    elif kind == "drm":
        obj = DrmGpu.prime_import(m.device("gpu0"), buf)
    elif kind == "drm-dynamic":
        obj = DrmDynamicGpu.import_buffer(m.device("gpu0"), buf)
    elif kind == "rdma":
        obj = RdmaMr.register(m.device("nic0"), buf, 0, 16 * 4096)
    elif kind == "nvme":
        obj = NvmeQueue(m.device("nvme0")).map_pages(buf.exporter.pfns)
    elif kind == "iommufd":
        obj = IommufdIoas(m)
        obj.attach_device(m.device("gpu0"))
        obj.map_file(buf, 0, 1 << 20)
    else:
        obj = KvmVm(m, private_mem=True)
        obj.set_user_memory_region2(0, KVM_MEM_VFIO_DMABUF, 1 << 32, 1 << 20, guest_memfd=buf)
    assert obj._owns()
    obj.close()
    assert not obj._owns()
    obj.close()  # idempotent: no LifetimeError, nothing given back twice
    assert not buf.attachments
    buf.put()
    assert buf.released
    if vfio is not None:
        vfio.close()
