"""Objects collected while they still hold resources say so with a
ResourceWarning (the suite runs with warnings as errors, so a test that
leaks fails); objects released properly say nothing."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest

from pydmabuf import (AcquireContext, DmaDirection, IovaState, Machine, SgTable, dma_map_sgtable,
                      dma_unmap_sgtable, reservation_ww_class)
from pydmabuf.exporters import SystemHeap, VfioPciBar
from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, NvmeQueue, RdmaMr
from pydmabuf.importers.kvm import KVM_MEM_VFIO_DMABUF

BIDI = DmaDirection.BIDIRECTIONAL
G = 4096


def _leak(make, clean):
    """``make()`` returns (object, cleanup-state); drop the object without
    cleaning up: a ResourceWarning naming it.  Then the same cleaned up:
    silence.  ``clean(obj)`` releases what ``make`` took."""
    obj = make()
    name = type(getattr(obj, "obj", obj)).__name__
    with pytest.warns(ResourceWarning, match="collected") as rec:
        del obj
        gc.collect()
    assert any(name in str(w.message) for w in rec), [str(w.message) for w in rec]
    obj = make()
    clean(obj)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del obj
        gc.collect()


def test_a_mapped_table(m):
    dev = m.device("gpu0")

    def make():
        t = SgTable.from_pages(np.array([0x100000], dtype=np.uint64))
        dma_map_sgtable(dev, t, BIDI)
        return t

    _leak(make, lambda t: dma_unmap_sgtable(dev, t, BIDI))


def test_an_iova_state(m):
    _leak(lambda: IovaState.try_alloc(m.device("gpu0"), 0, 4 * G), lambda st: st.free())


def test_a_dma_buf(m):
    heap = SystemHeap(m)
    _leak(lambda: heap.allocate(4 * G), lambda b: b.put())


def test_an_acquire_context():
    _leak(lambda: AcquireContext(reservation_ww_class), lambda c: c.fini())


class _Held:
    """A driver object and the buffer it imported, dropped together (the
    buffer's attachment list keeps a live importer reachable while the
    buffer lives, as the kernel's does)."""

    def __init__(self, obj, buf, extra=None):
        self.obj, self.buf, self.extra = obj, buf, extra


@pytest.mark.parametrize("kind", ["drm", "rdma", "nvme", "vfio", "iommufd", "kvm"])
def test_the_drivers(kind):
    def make():
        m = Machine.default()  # dropped with the rest: a device keeps its VFIO buffers reachable
        if kind in ("drm", "rdma", "nvme"):
            buf = SystemHeap(m).allocate(16 * G)
            if kind == "drm":
                return _Held(DrmGpu.prime_import(m.device("gpu0"), buf), buf)
            if kind == "rdma":
                return _Held(RdmaMr.register(m.device("nic0"), buf, 0, 16 * G), buf)
            q = NvmeQueue(m.device("nvme0"))
            return _Held(q.map_pages(buf.exporter.pfns), buf, q)
        vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        if kind == "vfio":
            return _Held(vfio, None)
        bar = vfio.export()
        if kind == "iommufd":
            x = IommufdIoas(m)
            x.attach_device(m.device("gpu0"))
            x.map_file(bar, 0, 1 << 20)
        else:
            x = KvmVm(m, private_mem=True)
            x.set_user_memory_region2(0, KVM_MEM_VFIO_DMABUF, 1 << 32, 1 << 20, guest_memfd=bar)
        return _Held(x, bar, vfio)

    def clean(h):
        o = h.obj
        h.m = None
        {"drm": lambda: o.free(), "rdma": lambda: o.dereg(), "nvme": lambda: h.extra.unmap(o),
         "vfio": lambda: o.close(), "iommufd": lambda: o.close(), "kvm": lambda: o.close()}[kind]()
        if h.buf is not None:
            h.buf.put()
        if kind in ("iommufd", "kvm"):
            h.extra.close()

    _leak(make, clean)


_AT_EXIT = r"""
import numpy as np
import pydmabuf
from pydmabuf import AcquireContext, DmaDirection, IovaState, Machine, SgTable, dma_map_sgtable, reservation_ww_class
from pydmabuf.machine import DEFAULT_SPEC

m = Machine.from_spec(DEFAULT_SPEC)
t = SgTable.from_pages(np.array([0x100000, 0x100001], dtype=np.uint64))
dma_map_sgtable(m.device("gpu1"), t, DmaDirection.BIDIRECTIONAL)
st = IovaState.try_alloc(m.device("gpu1"), 0, 8192)
ctx = AcquireContext(reservation_ww_class)


class Holder:
    pass


h = Holder()
h.me, h.t, h.st, h.ctx, h.m = h, t, st, ctx, m   # a cycle: collected after the modules are torn down
if {global_too}:
    keep = t                                         # and a module global, cleared during shutdown
del t, st, ctx
"""


@pytest.mark.parametrize("global_too", [False, True], ids=["cycle", "global"])
def test_leaks_at_interpreter_exit_warn_without_a_traceback(global_too):
    """Objects still live at interpreter exit (a mapped table, a reserved
    IOVA, an unfinished acquire context) warn with ResourceWarning as the
    interpreter collects them; nothing they do then imports (that raised
    ImportError tracebacks: 'sys.meta_path is None')."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", _AT_EXIT.format(global_too=global_too)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "SgTable" in p.stderr and "collected while mapped" in p.stderr and "ResourceWarning" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "ImportError" not in p.stderr and "Exception ignored" not in p.stderr, (
        p.stderr)
