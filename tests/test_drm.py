"""A GPU importing dma-bufs the classic way (drm_gem_prime_import): one
static mapping kept for the object's life, CPU access through the generic
mmap, the GPU's DMA one access per DMA segment."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydmabuf
from pydmabuf import DmaDirection, Fence, Machine, Usage, errors, fence_context_alloc
from pydmabuf.dmabuf import close
from pydmabuf.exporters import PrivateMemory, SystemHeap
from pydmabuf.importers import DrmGpu

G = 4096


def count_accesses(dev):
    calls = []
    real_r, real_w = dev.dma_read, dev.dma_write
    dev.dma_read = lambda a, n: (calls.append(("r", a, n)), real_r(a, n))[1]
    dev.dma_write = lambda a, d: (calls.append(("w", a, len(d))), real_w(a, d))[1]
    return calls


def test_import_maps_once_keeps_the_table_and_free_undoes_it(m):
    b = SystemHeap(m).allocate(10 * G, layout="fragmented", seed=4)
    exp = b.exporter
    gpu = DrmGpu.prime_import(m.device("gpu0"), b)
    assert b.refcount == 2 and exp.maps == 1 and not gpu.attachment.dynamic
    assert gpu.table.mapping is not None and int(gpu.dma_ranges()[:, 1].sum()) == 10 * G
    gpu.write(7 * G + 100, b"from the GPU")
    assert gpu.read(7 * G + 100, 12) == b"from the GPU"
    assert m.memory.read((int(exp.pfns[7]) << 12) + 100, 12) == b"from the GPU"
    for _ in range(3):
        gpu.read(0, G)
    assert exp.maps == 1  # no map per access
    iova = int(gpu.dma_ranges()[0, 0])
    gpu.free()
    assert exp.unmaps == 1 and b.attachments == [] and b.refcount == 1 and b.live_mappings == 0
    # gpu0's domain is lazy: the unmap only queued the IOTLB invalidation
    # (queue_iova), so gpu0's cached translation works until the flush.
    m.device("gpu0").domain.flush()
    with pytest.raises(errors.IommuFault):
        m.device("gpu0").dma_read(iova, 4)  # the IOVA is gone
    with pytest.raises(errors.LifetimeError):
        gpu.free()
    with pytest.raises(errors.LifetimeError):
        gpu.read(0, 1)
    b.put()
    assert exp.released == 1


def test_import_through_a_file_descriptor(m):
    b = SystemHeap(m).allocate(2 * G)
    fd = b.fd()  # the fd holds the only reference
    gpu = DrmGpu.prime_import(m.device("gpu0"), fd)
    assert b.refcount == 2
    close(fd)
    assert not b.released
    gpu.write(0, b"still here")
    gpu.free()
    assert b.released
    with pytest.raises(errors.BadHandle):
        DrmGpu.prime_import(m.device("gpu0"), fd)
    with pytest.raises(TypeError):
        DrmGpu.prime_import(m.device("gpu0"), "fd")
    with pytest.raises(TypeError):
        DrmGpu.prime_import("gpu0", b)


def test_one_device_access_per_dma_segment(m):
    """direct0 does direct DMA: a contiguous buffer is one DMA segment, a
    scattered one a segment per page; the GPU's reads follow the segments."""
    dev = m.device("direct0")
    heap = SystemHeap(m)
    contiguous = heap.allocate(64 * G, layout="contiguous")
    scattered = heap.allocate(4 * G, layout="scattered", seed=9)
    calls = count_accesses(dev)
    with DrmGpu.prime_import(dev, contiguous) as g:
        assert len(g.dma_ranges()) == 1
        g.read(0, 64 * G)
        assert len(calls) == 1
    calls.clear()
    with DrmGpu.prime_import(dev, scattered) as g:
        assert len(g.dma_ranges()) == 4
        g.write(G - 2, b"abcd")  # across a segment boundary
        assert [c[2] for c in calls] == [2, 2]
        calls.clear()
        assert g.read(G - 2, 4) == b"abcd"
        assert len(calls) == 2
        assert m.memory.read((int(scattered.exporter.pfns[1]) << 12), 2) == b"cd"
        with pytest.raises(errors.InvalidArgument):
            g.read(4 * G - 1, 2)  # past the end
        with pytest.raises(errors.InvalidArgument):
            g.read(0, 0)
    contiguous.put()
    scattered.put()


def test_cpu_and_gpu_see_each_others_writes(m):
    b = SystemHeap(m).allocate(3 * G, layout="scattered")
    g = DrmGpu.prime_import(m.device("gpu0"), b)
    cpu = g.mmap()
    cpu.write(G + 10, b"cpu wrote")
    assert g.read(G + 10, 9) == b"cpu wrote"
    g.write(2 * G, b"gpu wrote")
    assert cpu.read(2 * G, 9) == b"gpu wrote"
    part = g.mmap(G, G)
    assert part.read(10, 9) == b"cpu wrote"
    with pytest.raises(errors.InvalidArgument):
        g.mmap(0, 4 * G)
    g.free()
    with pytest.raises(errors.LifetimeError):
        g.mmap()
    b.put()


def test_a_dynamic_exporter_stays_pinned_while_imported(m):
    b = SystemHeap(m).allocate(4 * G, movable=True)
    g = DrmGpu.prime_import(m.device("gpu0"), b)
    assert g.attachment.pin_count == 1 and b.exporter.pins == 1
    b.resv.lock()
    try:
        with pytest.raises(errors.Busy):
            b.move()
    finally:
        b.resv.unlock()
    g.free()
    assert b.exporter.pins == 0
    b.resv.lock()
    try:
        b.move()
    finally:
        b.resv.unlock()
    b.put()


def test_import_waits_for_kernel_fences(m):
    b = SystemHeap(m).allocate(G)
    f = Fence(fence_context_alloc(), 1)
    b.resv.lock()
    b.resv.reserve_fences(1)
    b.resv.add_fence(f, Usage.KERNEL)
    b.resv.unlock()
    threading.Timer(0.05, f.signal).start()
    t0 = time.monotonic()
    g = DrmGpu.prime_import(m.device("gpu0"), b)
    assert time.monotonic() - t0 >= 0.04
    g.free()
    b.put()


def test_failures_leave_nothing_behind(m):
    class NoTable(pydmabuf.exporters.system_heap.HeapBuffer):
        def map_dma_buf(self, a, d):
            return None

    pfns = m.pages.alloc(2)
    b = pydmabuf.dmabuf.export(NoTable(m, pfns, 2 * G, owned=True, layout="contiguous", seed=1), 2 * G)
    with pytest.raises(errors.OutOfMemory):
        DrmGpu.prime_import(m.device("gpu0"), b)
    assert b.attachments == [] and b.refcount == 1
    fd = b.fd()
    b.get()
    with pytest.raises(errors.OutOfMemory):
        DrmGpu.prime_import(m.device("gpu0"), fd)
    assert b.refcount == 2
    close(fd)
    b.put()
    # The exporter refusing the attach: confidential memory for an untrusted device.
    p = PrivateMemory(m).allocate(2 * G)
    with pytest.raises(errors.NotPermitted):
        DrmGpu.prime_import(m.device("nic0"), p)
    assert p.attachments == [] and p.refcount == 1
    g = DrmGpu.prime_import(m.device("gpu0"), p)  # trusted: fine, but no CPU mapping
    g.write(0, b"private")
    assert g.read(0, 7) == b"private"
    with pytest.raises(errors.NotPermitted):
        g.mmap()
    assert "gpu0" in repr(g)
    g.free()
    p.put()


@settings(max_examples=60)
@given(npages=st.integers(1, 24), layout=st.sampled_from(["contiguous", "fragmented", "scattered"]),
       dev=st.sampled_from(["gpu0", "direct0"]), ops=st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=300)),
                                                              max_size=12), seed=st.integers(0, 99))
def test_gpu_reads_what_was_written(npages, layout, dev, ops, seed):
    m = Machine.default()
    size = npages * G
    b = SystemHeap(m).allocate(size, layout=layout, seed=seed)
    model = bytearray(size)
    with DrmGpu.prime_import(m.device(dev), b) as g:
        for off, data in ops:
            off %= size
            data = data[: size - off]
            g.write(off, data)
            model[off:off + len(data)] = data
        assert g.read(0, size) == bytes(model)
        # Through the CPU too, at page granularity of the pages themselves.
        assert b.mmap().read(0, size) == bytes(model)
    assert b.live_mappings == 0
    b.put()
