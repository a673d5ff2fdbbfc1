"""dma-buf: export, references, attachments, mapping rules, invalidation,
move, revoke, physical ranges, CPU access and the checker."""

from __future__ import annotations

import errno
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

import pydmabuf
import pydmabuf.page_alloc
from pydmabuf import (DmaDirection, Fence, Machine, RangeKind, RangeTable, Usage, checks, errors,
                      fence_context_alloc)
from pydmabuf.dmabuf import (PHYS_NAMESPACE, Exporter, ImporterOps, PhysVec, attach_revocable, close, dma_buf_get,
                             export)
from pydmabuf.exporters import SystemHeap
from pydmabuf.exporters.system_heap import HeapBuffer
from pydmabuf.mapping import _touches

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL


class Recorder(Exporter):
    """A dynamic exporter that records every op call."""

    name = "recorder"

    def __init__(self, machine, npages=4, fail_map=False):
        self.machine = machine
        self.calls = []
        self.fail_map = fail_map
        self.pfns = np.arange(0x200000, 0x200000 + npages, dtype=np.uint64)

    def attach(self, a):
        self.calls.append(("attach", a.device.name))

    def detach(self, a):
        self.calls.append(("detach", a.device.name))

    def pin(self, a):
        assert a.dmabuf.resv.held_by_current_thread()
        self.calls.append(("pin", a.device.name))

    def unpin(self, a):
        self.calls.append(("unpin", a.device.name))

    def map_dma_buf(self, a, d):
        assert a.dmabuf.resv.held_by_current_thread()
        self.calls.append(("map", a.device.name))
        if self.fail_map:
            return None
        t = pydmabuf.SgTable.from_pages(self.pfns)
        pydmabuf.dma_map_sgtable(a.device, t, d)
        return t

    def unmap_dma_buf(self, a, t, d):
        self.calls.append(("unmap", a.device.name))
        pydmabuf.dma_unmap_sgtable(a.device, t, d)

    def release(self, buf):
        self.calls.append(("release",))

    def get_phys_vec(self, a):
        return PhysVec(np.array([[0x200000 << 12, len(self.pfns) * G]], dtype=np.uint64), None)


class Static(Recorder):
    """The same without pin/unpin: a static exporter."""

    pin = Exporter.pin
    unpin = Exporter.unpin


class Dyn(ImporterOps):
    allow_peer2peer = True

    def __init__(self):
        self.calls = []

    def invalidate_mappings(self, a):
        assert a.dmabuf.resv.held_by_current_thread()
        self.calls.append(a)


class OldName(ImporterOps):
    def __init__(self):
        self.calls = []

    def move_notify(self, a):
        self.calls.append(a)


class NoOp(ImporterOps):
    pass


class PhysImporter(Dyn):
    import_namespaces = frozenset({PHYS_NAMESPACE})


# --------------------------------------------------------------- exporting


def test_export_checks_mandatory_ops_and_pin_pairs(m):
    class NoRelease(Exporter):
        def map_dma_buf(self, a, d): ...
        def unmap_dma_buf(self, a, t, d): ...

    class PinOnly(Recorder):
        unpin = Exporter.unpin

    with pytest.raises(errors.InvalidArgument):
        export(NoRelease(), G)
    with pytest.raises(errors.InvalidArgument):
        export(PinOnly(m), G)
    with pytest.raises(errors.InvalidArgument):
        export(Recorder(m), 0)
    assert Recorder.is_dynamic() and not Static.is_dynamic()


def test_references_and_release_once(m):
    e = Recorder(m)
    b = export(e, 4 * G, name="buf")
    assert b.refcount == 1 and b.size == 4 * G and b.name == "buf"
    assert b.get() is b and b.refcount == 2
    b.put()
    assert e.calls == []
    b.put()
    assert e.calls == [("release",)] and b.released
    with pytest.raises(errors.LifetimeError):
        b.put()
    with checks.report_mode():
        checks.clear()
        b.put()
        assert [r.rule for r in checks.reports()] == ["put-after-release"]
    assert e.calls == [("release",)]


def test_report_mode_is_per_thread(m):
    """report_mode() affects its own thread only: two threads in
    overlapping blocks (entered and left in the worst order) each see
    report mode inside and strict outside, a third thread stays strict
    throughout and its violation raises, and the process is strict after."""
    e = Recorder(m)
    b = export(e, G)
    b.put()                                    # released: every further put() is a violation
    a_in, b_in, a_may_leave, b_left = (threading.Event() for _ in range(4))
    seen: dict[str, object] = {}

    def thread_a():
        with checks.report_mode():
            a_in.set()
            b_in.wait(10)
            seen["a-inside"] = checks.mode()
            b.put()                            # recorded, not raised
            a_may_leave.wait(10)
        seen["a-after"] = checks.mode()

    def thread_b():
        a_in.wait(10)
        with checks.report_mode():
            b_in.set()
            seen["b-inside"] = checks.mode()
        b_left.set()                           # leaves first: the old global switch restored "report" here
        seen["b-after"] = checks.mode()

    def thread_c():
        b_left.wait(10)
        seen["c"] = checks.mode()
        try:
            b.put()
        except errors.LifetimeError:
            seen["c-raised"] = True
        a_may_leave.set()

    checks.clear()
    ts = [threading.Thread(target=f) for f in (thread_a, thread_b, thread_c)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert seen == {"a-inside": "report", "b-inside": "report", "b-after": "strict", "c": "strict",
                    "c-raised": True, "a-after": "strict"}
    assert [r.rule for r in checks.reports()] == ["put-after-release"]    # thread a's only
    assert checks.mode() == "strict"
    with pytest.raises(errors.LifetimeError):
        b.put()
    checks.clear()


def test_mode_blocks_nest_and_restore_exactly():
    with checks.report_mode():
        with checks.strict():
            assert checks.mode() == "strict"
            with checks.report_mode():
                assert checks.mode() == "report"
            assert checks.mode() == "strict"
        assert checks.mode() == "report"
        seen = []
        t = threading.Thread(target=lambda: seen.append(checks.mode()))
        t.start()
        t.join(10)
        assert seen == ["strict"]              # a new thread starts from the process default
    assert checks.mode() == "strict"


def test_names(m):
    b = export(Recorder(m), G)
    b.set_name("x" * 31)
    with pytest.raises(errors.InvalidArgument):
        b.set_name("x" * 32)
    b.put()


def test_passed_around_as_a_file_descriptor(m):
    e = Recorder(m)
    b = export(e, G)
    fd = b.fd()  # the fd holds the only reference now
    b2 = dma_buf_get(fd)
    assert b2 is b and b.refcount == 2
    b2.put()
    close(fd)
    assert e.calls == [("release",)]
    with pytest.raises(errors.BadHandle):
        dma_buf_get(fd)
    other = pydmabuf.files.install(object())
    with pytest.raises(errors.InvalidArgument):
        dma_buf_get(other)
    pydmabuf.files.close(other)


# -------------------------------------------------------------- attaching


def test_attachments_are_newest_first_and_refusals_change_nothing(m):
    class Picky(Recorder):
        def attach(self, a):
            if a.device.name == "legacy0":
                raise errors.Busy("storage not usable by a 32-bit device")
            super().attach(a)

    b = export(Picky(m), G)
    a1 = b.attach(m.device("gpu0"))
    a2 = b.dynamic_attach(m.device("nic0"), Dyn())
    assert b.attachments == [a2, a1]
    with pytest.raises(errors.Busy):
        b.attach(m.device("legacy0"))
    assert b.attachments == [a2, a1]
    assert not a1.dynamic and a2.dynamic and a2.peer2peer and not a1.peer2peer
    b.detach(a1)
    b.detach(a2)
    assert b.exporter.calls[-2:] == [("detach", "gpu0"), ("detach", "nic0")]
    with pytest.raises(errors.LifetimeError):
        b.detach(a1)
    other = export(Recorder(m), G)
    a3 = other.attach(m.device("gpu0"))
    with pytest.raises(errors.LifetimeError):
        b.detach(a3)
    other.detach(a3)
    other.put()
    b.put()


def test_static_importer_of_a_dynamic_exporter_pins_on_every_map(m):
    e = Recorder(m)
    b = export(e, 4 * G)
    a = b.attach(m.device("gpu0"))
    assert a.pin_count == 0 and ("pin", "gpu0") not in e.calls
    with b.resv:
        t1 = a.map(BIDI)
        assert a.pin_count == 1
        t2 = a.map(BIDI)  # no caching: a second map and a second pin
        assert a.pin_count == 2 and e.calls.count(("map", "gpu0")) == 2
        a.unmap(t1, BIDI)
        a.unmap(t2, BIDI)
    assert a.pin_count == 0 and e.calls.count(("unpin", "gpu0")) == 2
    b.detach(a)
    b.put()


def test_map_and_unmap_need_the_lock_and_map_unlocked_and_attach_refuse_it(m):
    b = export(Recorder(m), 4 * G)
    a = b.dynamic_attach(m.device("gpu0"), Dyn())
    with pytest.raises(errors.LockingError):
        a.map(BIDI)
    t = a.map_unlocked(BIDI)
    with b.resv:
        with pytest.raises(errors.LockingError):
            a.map_unlocked(BIDI)
        with pytest.raises(errors.LockingError):
            b.attach(m.device("nic0"))
    with pytest.raises(errors.LockingError):
        a.unmap(t, BIDI)
    a.unmap_unlocked(t, BIDI)
    b.detach(a)
    b.put()


def test_static_importer_waits_for_kernel_fences_and_an_interrupt_unwinds_the_map(m):
    e = Recorder(m)
    b = export(e, 4 * G)
    a = b.attach(m.device("gpu0"))
    f = Fence(fence_context_alloc(), 1)
    with b.resv:
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.KERNEL)
    threading.Timer(0.05, f.signal).start()
    t0 = time.monotonic()
    t = a.map_unlocked(BIDI)
    assert time.monotonic() - t0 >= 0.04
    a.unmap_unlocked(t, BIDI)
    # Interrupted while waiting: the exporter saw map then unmap, pin then unpin.
    f2 = Fence(fence_context_alloc(), 1)
    with b.resv:
        b.resv.reserve_fences(1)
        b.resv.add_fence(f2, Usage.KERNEL)
    me = threading.get_ident()
    e.calls.clear()
    threading.Timer(0.05, lambda: pydmabuf.signal_thread(me)).start()
    with pytest.raises(errors.Interrupted):
        a.map_unlocked(BIDI)
    pydmabuf.flush_signals()
    assert e.calls == [("pin", "gpu0"), ("map", "gpu0"), ("unmap", "gpu0"), ("unpin", "gpu0")]
    assert a.pin_count == 0 and a.live_mappings == 0
    f2.signal()
    b.detach(a)
    b.put()


def test_exporter_returning_no_table_is_enomem_and_unpins(m):
    e = Recorder(m, fail_map=True)
    b = export(e, 4 * G)
    a = b.attach(m.device("gpu0"))
    with pytest.raises(errors.OutOfMemory):
        a.map_unlocked(BIDI)
    assert e.calls[-3:] == [("pin", "gpu0"), ("map", "gpu0"), ("unpin", "gpu0")] and a.pin_count == 0
    b.detach(a)
    b.put()


def test_invalidation_needs_the_lock_and_tells_importer_callbacks_newest_first(m):
    b = export(Recorder(m), 4 * G)
    seen = []

    class Tell(ImporterOps):
        def __init__(self, tag):
            self.tag = tag

        def invalidate_mappings(self, a):
            seen.append(self.tag)

    a1 = b.attach(m.device("gpu0"))
    a2 = b.dynamic_attach(m.device("nic0"), Tell("with-op"))
    a3 = b.dynamic_attach(m.device("nvme0"), NoOp())
    a4 = b.dynamic_attach(m.device("gpu1"), Tell("newest"))
    with pytest.raises(errors.LockingError):
        b.invalidate_mappings()
    with b.resv:
        b.move_notify()  # the old name is the same call
    assert seen == ["newest", "with-op"]
    assert b.move_notify == b.invalidate_mappings
    for a in (a1, a2, a3, a4):
        b.detach(a)
    b.put()


def test_both_callback_names_work(m):
    b = export(Recorder(m), 4 * G)
    old = OldName()
    a = b.dynamic_attach(m.device("nic0"), old)
    with b.resv:
        b.invalidate_mappings()
    assert old.calls == [a]
    b.detach(a)
    b.put()


def test_attach_revocable_only_for_dynamic_importers_with_a_callback(m):
    b = export(Recorder(m), 4 * G)
    assert not attach_revocable(b.attach(m.device("gpu0")))
    assert not attach_revocable(b.dynamic_attach(m.device("nic0"), NoOp()))
    assert attach_revocable(b.dynamic_attach(m.device("nvme0"), Dyn()))
    assert attach_revocable(b.dynamic_attach(m.device("gpu1"), OldName()))
    for a in b.attachments:
        b.detach(a)
    b.put()


def test_mmap_never_maps_a_partial_page_and_vmap_is_refcounted(m):
    # An exporter of two and a half pages (the heaps page-align, so not one
    # of theirs): the trailing partial page is never mappable.
    exp = HeapBuffer(m, m.pages.alloc(3), 2 * G + G // 2, owned=True, layout="contiguous", seed=1)
    b = export(exp, 2 * G + G // 2)
    with pytest.raises(errors.InvalidArgument):
        b.mmap(0, 3 * G)
    with pytest.raises(errors.InvalidArgument):
        b.mmap()  # the whole size, rounded to pages: the same three pages
    c = b.mmap(0, 2 * G)
    c.write(0x10, b"hello")
    assert c.read(0x10, 5) == b"hello"
    with b.resv:
        v1 = b.vmap()
        v2 = b.vmap()
        assert v1 is v2 and b._vmap_count == 2
        assert v1.read(0x10, 5) == b"hello"
        with pytest.raises(errors.LifetimeError):
            b.vunmap(object())
        b.vunmap(v1)
        b.vunmap(v2)
    b.put()


def test_release_with_users_is_reported_and_release_still_runs(m):
    e = Recorder(m)
    b = export(e, 4 * G)
    a = b.attach(m.device("gpu0"))
    with checks.report_mode():
        checks.clear()
        b.put()
        assert [r.rule for r in checks.reports()] == ["release-with-users"]
        assert "gpu0" in str(checks.reports()[0])
    assert e.calls[-1] == ("release",)
    with pytest.raises(errors.LifetimeError):
        a.map_unlocked(BIDI)


def test_detach_with_live_mappings_is_a_lifetime_error(m):
    b = export(Recorder(m), 4 * G)
    a = b.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    with pytest.raises(errors.LifetimeError) as ei:
        b.detach(a)
    assert "1 live mapping" in str(ei.value)
    a.unmap_unlocked(t, BIDI)
    with pytest.raises(errors.LifetimeError):
        a.unmap_unlocked(t, BIDI)  # double unmap
    b.detach(a)
    with pytest.raises(errors.LifetimeError):
        a.map_unlocked(BIDI)  # use after detach
    b.put()


# ------------------------------------------------- invalidation and its abuse


def test_dma_through_an_invalidated_mapping_is_caught(m):
    heap = SystemHeap(m)
    b = heap.allocate(16 * G, layout="contiguous", movable=True, name="moving")
    nic = m.device("nic0")

    class Lazy(ImporterOps):  # acknowledges, keeps using the old mapping
        def invalidate_mappings(self, a):
            pass

    ignorer = Lazy()
    a = b.dynamic_attach(nic, ignorer)
    t = a.map_unlocked(BIDI)
    addr = int(t.dma_ranges()[0, 0])
    nic.dma_write(addr, b"ok before")
    with b.resv:
        b.invalidate_mappings()
    with pytest.raises(errors.LifetimeError) as ei:
        nic.dma_read(addr, 4)
    assert "Lazy" in str(ei.value) and "invalidated" in str(ei.value)
    with checks.report_mode():
        checks.clear()
        assert nic.dma_read(addr, 9) == b"ok before"  # the stale mapping still works, as in the kernel
        (r,) = checks.reports("dma-after-invalidate")
        assert "Lazy" in r.culprit
    # Re-mapping gives a fresh mapping that is fine to use.
    a.unmap_unlocked(t, BIDI)
    t2 = a.map_unlocked(BIDI)
    nic.dma_read(int(t2.dma_ranges()[0, 0]), 4)
    a.unmap_unlocked(t2, BIDI)
    b.detach(a)
    b.put()


def test_move_migrates_pages_and_keeps_contents(m):
    heap = SystemHeap(m)
    b = heap.allocate(8 * G, layout="fragmented", movable=True)
    exp = b.exporter
    c = b.mmap()
    c.write(5 * G + 7, b"survives a move")
    old = exp.pfns.copy()
    dyn = Dyn()
    a = b.dynamic_attach(m.device("nic0"), dyn)
    st = b.attach(m.device("gpu0"))
    f = Fence(fence_context_alloc(), 1)
    with b.resv:
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.BOOKKEEP)  # a job still using the old pages
        t = st.map(BIDI)  # a static map pins the buffer...
        with pytest.raises(errors.Busy):
            b.move()
        st.unmap(t, BIDI)  # ...until it is unmapped
        b.move()
        assert dyn.calls == [a]
        assert not np.array_equal(exp.pfns, old)
        assert m.pages.owner_of(int(old[0])) is not None  # old pages wait for the fence
        # The move is published as a KERNEL fence (already signalled).
        kernel = [f_ for f_, _u in b.resv.iter_fences(Usage.KERNEL)]
        assert len(kernel) == 1 and kernel[0].is_signaled()
    assert c.read(5 * G + 7, 15) == b"survives a move"  # refaulted through the new ranges
    assert c.zaps == 1 and c.faults == 2
    f.signal()
    assert m.pages.owner_of(int(old[0])) is None  # freed once the fence signalled
    b.detach(a)
    b.detach(st)
    b.put()


def test_static_heap_cannot_move(m):
    b = SystemHeap(m).allocate(4 * G)
    with b.resv:
        with pytest.raises(errors.NotSupported):
            b.move()
    b.put()


def test_revoke_sequence(m):
    heap = SystemHeap(m)
    b = heap.allocate(4 * G, movable=True)
    nic = m.device("nic0")
    done = threading.Event()

    class Polite(ImporterOps):
        """Unmaps from another thread shortly after being told."""

        def __init__(self):
            self.tables = []

        def invalidate_mappings(self, a):
            tables = list(self.tables)
            self.tables.clear()

            def later():
                time.sleep(0.05)
                for t in tables:
                    a.unmap_unlocked(t, BIDI)
                done.set()
            threading.Thread(target=later).start()

    imp = Polite()
    a = b.dynamic_attach(nic, imp)
    imp.tables.append(a.map_unlocked(BIDI))
    with pytest.raises(errors.LockingError):
        with b.resv:
            b.revoke()
    b.revoke(timeout=5)
    assert done.is_set() and b.live_mappings == 0 and b.revoked
    with pytest.raises(errors.Revoked) as ei:
        a.map_unlocked(BIDI)
    assert ei.value.errno == 19
    b.unrevoke()
    a.unmap_unlocked(a.map_unlocked(BIDI), BIDI)
    b.detach(a)
    b.put()


def test_revoke_times_out_when_an_importer_never_unmaps(m):
    b = SystemHeap(m).allocate(4 * G, movable=True)
    a = b.dynamic_attach(m.device("nic0"), NoOp())  # cannot be told
    t = a.map_unlocked(BIDI)
    with pytest.raises(errors.TimedOut) as ei:
        b.revoke(timeout=0.05)
    assert "nic0" in str(ei.value)
    a.unmap_unlocked(t, BIDI)
    b.detach(a)
    b.put()


def _bookkeep_fence(b):
    f = Fence(fence_context_alloc(), 1)
    with b.resv:
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.BOOKKEEP)
    return f


def test_revoke_waits_for_bookkeep_fences(m):
    b = SystemHeap(m).allocate(4 * G)
    f = _bookkeep_fence(b)
    with pytest.raises(errors.TimedOut):
        b.revoke(timeout=0.05)
    f.signal()
    b.revoke(timeout=1)
    # Un-revoking waits for them too, and stays revoked when it gives up.
    f2 = _bookkeep_fence(b)
    with pytest.raises(errors.TimedOut):
        b.unrevoke(timeout=0.05)
    assert b.revoked
    f2.signal()
    b.unrevoke(timeout=1)
    assert not b.revoked
    b.put()


# ------------------------------------------------------- physical ranges


def test_phys_vec_is_gated_by_the_namespace(m):
    b = SystemHeap(m).allocate(8 * G, layout="fragmented")
    plain = b.dynamic_attach(m.device("nic0"), Dyn())
    capable = b.dynamic_attach(m.device("gpu0"), PhysImporter())
    with b.resv:
        with pytest.raises(errors.NotPermitted):
            plain.phys_vec()
        pv = capable.phys_vec()
    assert pv.provider is None and int(pv.ranges[:, 1].sum()) == 8 * G
    assert (pv.ranges[:, 0] >> np.uint64(12)).tolist() == \
        pydmabuf.page_alloc.numpy_coalesce(b.exporter.pfns)[0].__rshift__(np.uint64(12)).tolist()
    with pytest.raises(errors.LockingError):
        capable.phys_vec()
    # A capable importer maps the ranges itself with the list-free API and
    # tells the checker, which then watches its DMA too.
    dev = m.device("gpu0")
    st = pydmabuf.IovaState.try_alloc(dev, 0, 8 * G)
    st.link_ranges(pv.ranges, BIDI)
    st.sync()
    h = capable.track_dma([[st.addr, 8 * G]])
    with b.resv:
        b.invalidate_mappings()
    with pytest.raises(errors.LifetimeError):
        dev.dma_read(st.addr, 4)
    capable.untrack_dma(h)
    st.destroy(8 * G, BIDI)
    b.detach(plain)
    b.detach(capable)
    b.put()


def test_private_memory_only_for_trusted_importers(m):
    class Private(Recorder):
        def get_phys_vec(self, a):
            return PhysVec(np.array([[61 << 30, 4 * G]], dtype=np.uint64), None)

    b = export(Private(m), 4 * G)
    untrusted = b.dynamic_attach(m.device("nic0"), PhysImporter())
    trusted = b.dynamic_attach(m.device("gpu0"), PhysImporter())
    with b.resv:
        with pytest.raises(errors.NotPermitted):
            untrusted.phys_vec()
        assert trusted.phys_vec().ranges.tolist() == [[61 << 30, 4 * G]]
    b.detach(untrusted)
    b.detach(trusted)
    b.put()


def test_cpu_mapping_sigbus_after_revoke(m):
    b = SystemHeap(m).allocate(4 * G)
    c = b.mmap()
    c.write(0, b"x")
    b.revoke(timeout=1)
    with pytest.raises(errors.IOFailure) as ei:
        c.read(0, 1)
    assert "SIGBUS" in str(ei.value)
    b.put()


def test_cpu_access_is_atomic_against_a_move(m):
    """A CPU access translates and copies under the reservation lock, so a
    move cannot free the pages in between (found by the thread stress: a
    read raced a move and returned another buffer's bytes)."""
    b = SystemHeap(m).allocate(4 * G, layout="scattered", movable=True)
    c = b.mmap()
    c.write(8, b"mine")
    holder_in, release = threading.Event(), threading.Event()
    seen = []

    def mover():
        with b.resv:
            holder_in.set()
            release.wait(5)
            b.move()

    t = threading.Thread(target=mover)
    t.start()
    holder_in.wait(5)
    reader = threading.Thread(target=lambda: seen.append(c.read(8, 4)))
    reader.start()
    time.sleep(0.05)
    assert reader.is_alive()  # waits for the lock instead of reading the old pages
    release.set()
    t.join(5)
    reader.join(5)
    assert seen == [b"mine"] and c.zaps == 1 and c.faults == 2
    b.put()


def test_a_fault_while_holding_the_lock_is_refused(m):
    b = SystemHeap(m).allocate(4 * G, movable=True)
    c = b.mmap()
    c.write(0, b"ok")  # faulted in
    with b.resv:
        assert c.read(0, 2) == b"ok"  # already mapped: no fault, no lock needed
        b.move()  # zaps it
        with pytest.raises(errors.LockingError, match="deadlock"):
            c.read(0, 2)
    assert c.read(0, 2) == b"ok"
    b.put()


def test_begin_cpu_access_waits_for_writers(m):
    b = SystemHeap(m).allocate(4 * G)
    f = Fence(fence_context_alloc(), 1)
    with b.resv:
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.WRITE)
    threading.Timer(0.05, f.signal).start()
    t0 = time.monotonic()
    b.begin_cpu_access(DmaDirection.FROM_DEVICE)
    assert time.monotonic() - t0 >= 0.04
    b.end_cpu_access(DmaDirection.FROM_DEVICE)
    b.put()


def test_real_pages_of_a_python_buffer(m):
    data = bytearray(5 * G)
    try:
        b = SystemHeap(m).from_buffer(data)
    except (errors.NotPermitted, errors.InvalidArgument):
        pytest.skip("this host's PFNs cannot be read or fall outside the model's RAM")
    a = b.attach(m.device("direct0"))
    t = a.map_unlocked(BIDI)
    assert t.cpu_nbytes == 5 * G
    a.unmap_unlocked(t, BIDI)
    b.detach(a)
    b.put()


def test_resource_warnings(m):
    b = SystemHeap(m).allocate(G)
    a = b.attach(m.device("gpu0"))
    with pytest.warns(ResourceWarning):
        a.__del__()
    b.detach(a)
    with pytest.warns(ResourceWarning):
        b.__del__()
    b.put()



# ------------------------------------------- _touches against the per-range walk

U64_MAX = 2**64 - 1


def _touches_ref(amap, rows, kind):
    """The obvious walk: ask the map about each row in turn."""
    for p, n in rows:
        if any(r.kind == kind for r in amap.overlapping(p, n)):
            return True
    return False


_addr = st.one_of(st.integers(0, 1 << 16), st.integers(U64_MAX - (1 << 16), U64_MAX))


@given(
    table=st.lists(st.tuples(_addr, st.integers(1, 1 << 12), st.sampled_from([1, 2, 3])), max_size=12),
    rows=st.lists(st.tuples(_addr, st.integers(0, 1 << 13)), max_size=12),
)
def test_touches_matches_the_per_range_walk(table, rows):
    amap = RangeTable()
    for s, n, k in table:
        n = min(n, U64_MAX - s + 1)
        if not amap.overlapping(s, n):
            amap.insert(s, n, kind=k)
    machine = SimpleNamespace(address_map=amap)
    arr = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    try:
        want = _touches_ref(amap, rows, RangeKind.PRIVATE)
    except errors.DmaBufError as e:
        with pytest.raises(type(e)):
            _touches(machine, arr, RangeKind.PRIVATE)
    else:
        assert _touches(machine, arr, RangeKind.PRIVATE) is want


def test_touches_edges():
    amap = RangeTable()
    amap.insert(0x1000, 0x1000, kind=RangeKind.PRIVATE)
    amap.insert(U64_MAX - 0xFFF, 0x1000, kind=RangeKind.PRIVATE)
    m = SimpleNamespace(address_map=amap)
    P = RangeKind.PRIVATE
    assert not _touches(m, np.array([[0, 0x1000], [0x2000, 0x1000]], dtype=np.uint64), P)
    assert _touches(m, np.array([[0, 0x1001]], dtype=np.uint64), P)
    assert _touches(m, np.array([[0x1FFF, 1]], dtype=np.uint64), P)
    assert _touches(m, np.array([[U64_MAX, 1]], dtype=np.uint64), P)
    assert not _touches(m, np.empty((0, 2), dtype=np.uint64), P)
    with pytest.raises(errors.InvalidArgument):
        _touches(m, np.array([[0x5000, 0]], dtype=np.uint64), P)
    with pytest.raises(errors.Overflow):
        _touches(m, np.array([[U64_MAX, 2]], dtype=np.uint64), P)
    # A touching row before a bad one answers first, as the walk did.
    assert _touches(m, np.array([[0x1000, 1], [0x5000, 0]], dtype=np.uint64), P)
    # No range of the kind: still no window from a bad row.
    assert not _touches(m, np.array([[0, 0x10000]], dtype=np.uint64), RangeKind.SWIOTLB)
    with pytest.raises(errors.InvalidArgument):
        _touches(m, np.array([[0x5000, 0]], dtype=np.uint64), RangeKind.SWIOTLB)


# ------------------------------------------- CPU mapping past 2**53 bytes


class _HugeRanges(Exporter):
    """An mmappable exporter of given physical ranges (no DMA)."""

    name = "huge-ranges"

    def __init__(self, machine, rows):
        self.machine = machine
        self.rows = np.array(rows, dtype=np.uint64)

    def map_dma_buf(self, a, d):
        raise errors.NotSupported("CPU only")

    def unmap_dma_buf(self, a, t, d):
        pass

    def release(self, b):
        pass

    def get_phys_vec(self, a):
        return PhysVec(self.rows, None)

    def mmap(self, b, mapping):
        pass


def test_cpu_mapping_finds_the_right_range_past_2_53_bytes(m):
    # The byte before 2**60 + G is the last of the first range: a float64
    # search rounds it up into the second.
    first = 2**60 + G
    # A machine with RAM behind both ranges: the access gate refuses CPU
    # accesses where no memory is.
    m = Machine("huge")
    m.add_memory(0x1_0000_0000, 2**61)
    b = export(_HugeRanges(m, [[0x1_0000_0000, first], [0x2_0000_0000, G]]), first + G)
    c = b.mmap(2**60, 2 * G)
    m.memory.write(0x1_0000_0000 + first - 1, b"A")
    m.memory.write(0x2_0000_0000, b"B")
    assert c.read(G - 1, 2) == b"AB"
    c.write(G - 2, b"yz")
    assert m.memory.read(0x1_0000_0000 + first - 2, 2) == b"yz"
    assert c.read(0, 0) == b"" and c.faults == 1
    b.put()


def test_cpu_mapping_past_the_exporters_ranges_is_sigbus(m):
    b = export(_HugeRanges(m, [[0x1_0000_0000, G]]), 2 * G)
    c = b.mmap()
    assert len(c.read(G - 4, 4)) == 4
    with pytest.raises(errors.IOFailure, match="SIGBUS"):
        c.read(G - 4, 8)
    b.put()


# ------------------------------------------- an importer whose callback raises


class Dropper(ImporterOps):
    """Drops its mappings when told (the callback runs under the lock)."""

    allow_peer2peer = True

    def __init__(self):
        self.tables = []
        self.told = 0

    def invalidate_mappings(self, a):
        self.told += 1
        for t in self.tables:
            a.unmap(t, BIDI)
        self.tables.clear()


class Raiser(Dropper):
    """A buggy importer: its callback raises before dropping anything."""

    def invalidate_mappings(self, a):
        self.told += 1
        raise RuntimeError("importer bug")


def _three_importers(m, movable=True):
    """A buffer with a well-behaved importer on each side of a raising one
    (newest first: gpu1, then the raiser on nic0, then gpu0), each mapped."""
    b = SystemHeap(m).allocate(4 * G, movable=movable, name="shared")
    ops = [Dropper(), Raiser(), Dropper()]
    atts = [b.dynamic_attach(m.device(n), o) for n, o in zip(("gpu0", "nic0", "gpu1"), ops)]
    with b.resv:
        for a, o in zip(atts, ops):
            o.tables.append(a.map(BIDI))
    return b, ops, atts


def _teardown(b, ops, atts):
    with b.resv:
        for a, o in zip(atts, ops):
            for t in o.tables:
                a.unmap(t, BIDI)
            o.tables.clear()
    for a in atts:
        b.detach(a)
    b.put()


def test_revoke_reaches_every_importer_when_one_callback_raises(m):
    b, ops, atts = _three_importers(m)
    raiser_table = ops[1].tables[0]
    with pytest.raises(errors.LifetimeError) as ei:
        b.revoke(timeout=5)
    e = ei.value
    # Named, with the importer's own exception as the cause and the errno
    # of a broken API rule (the kernel's callback returns void).
    assert e.errno == errno.EINVAL and "Raiser" in str(e) and "nic0" in str(e)
    assert isinstance(e.__cause__, RuntimeError) and str(e.__cause__) == "importer bug"
    assert e.report.rule == "invalidate-callback-raised"
    # Everyone was told, on both sides of the raiser, once each.
    assert [o.told for o in ops] == [1, 1, 1] and [a.invalidations for a in atts] == [1, 1, 1]
    assert b.revoked and atts[0].live_mappings == 0 and atts[2].live_mappings == 0
    # The raiser's mapping went stale: DMA through it is caught, not silent.
    assert all(mp.stale for mp in b._mappings)
    with pytest.raises(errors.LifetimeError):
        m.device("nic0").dma_write(int(raiser_table.dma_ranges()[0, 0]), b"late")
    with pytest.raises(errors.Revoked):
        atts[0].map_unlocked(BIDI)
    # The lock was dropped, the fences waited for; unmapping ends the wait.
    assert not b.resv.is_locked()
    with b.resv:
        atts[1].unmap(raiser_table, BIDI)
        ops[1].tables.clear()
    b.wait_unmapped(1)
    _teardown(b, ops, atts)



def test_revoke_in_report_mode_records_the_raising_importer_and_completes(m):
    b, ops, atts = _three_importers(m)
    checks.clear()
    ops[1].tables.clear()  # the importer unmaps from elsewhere, late

    def late_unmap(a=atts[1], t=list(b._mappings)):
        time.sleep(0.05)
        for mp in t:
            if mp.attachment is a:
                a.unmap_unlocked(mp.table, BIDI)

    with checks.report_mode():
        th = threading.Thread(target=late_unmap)
        th.start()
        b.revoke(timeout=5)  # waits for the late unmap, as the kernel would
        th.join()
        reps = checks.reports("invalidate-callback-raised")
        assert len(reps) == 1 and "Raiser" in reps[0].culprit
        assert b.revoked and b.live_mappings == 0 and [o.told for o in ops] == [1, 1, 1]
        b.unrevoke()  # tells everyone again: a second report, and the buffer is back
    assert len(checks.reports("invalidate-callback-raised")) == 2 and not b.revoked
    assert [o.told for o in ops] == [2, 2, 2]
    checks.clear()
    _teardown(b, ops, atts)


def test_move_and_invalidate_tell_every_importer_then_report(m):
    b, ops, atts = _three_importers(m)
    old = b.exporter.pfns.copy()
    with b.resv:
        with pytest.raises(errors.LifetimeError) as ei:
            b.move()
        assert isinstance(ei.value.__cause__, RuntimeError)
        # The move completed as the kernel's would: new pages, all told.
        assert not np.array_equal(b.exporter.pfns, old)
        assert [o.told for o in ops] == [1, 1, 1]
        with pytest.raises(errors.LifetimeError):
            b.invalidate_mappings()
        assert [o.told for o in ops] == [2, 2, 2]
    _teardown(b, ops, atts)


def test_an_interrupt_in_a_callback_is_reraised_after_every_importer_was_told(m):
    class Interrupted(Dropper):
        def invalidate_mappings(self, a):
            self.told += 1
            raise KeyboardInterrupt

    b = SystemHeap(m).allocate(4 * G, movable=True)
    ops = [Dropper(), Interrupted(), Dropper()]
    atts = [b.dynamic_attach(m.device(n), o) for n, o in zip(("gpu0", "nic0", "gpu1"), ops)]
    with b.resv:
        with pytest.raises(KeyboardInterrupt):
            b.invalidate_mappings()
    assert [o.told for o in ops] == [1, 1, 1]
    _teardown(b, ops, atts)



# ------------------------------------------------ pins of static attachments


def test_a_static_attachments_pins_belong_to_map_and_unmap(m):
    e = Recorder(m)
    b = export(e, 4 * G)
    a = b.attach(m.device("gpu0"))
    with b.resv:
        t = a.map(BIDI)
        assert a.pin_count == 1
        # dma_buf_unpin / dma_buf_pin are for dynamic importers only: the
        # map's pin is not the caller's to drop, nor a new one to take.
        with pytest.raises(errors.LifetimeError) as ei:
            a.unpin()
        assert ei.value.errno == errno.EINVAL and ei.value.report.rule == "unpin-static"
        with pytest.raises(errors.LifetimeError) as ei:
            a.pin()
        assert ei.value.report.rule == "pin-static"
        assert a.pin_count == 1 and e.calls.count(("pin", "gpu0")) == 1 and ("unpin", "gpu0") not in e.calls
        checks.clear()
        with checks.report_mode():
            a.unpin()  # recorded, refused: the mapping keeps its pin
            with pytest.raises(errors.InvalidArgument):
                a.pin()
        assert [r.rule for r in checks.reports()] == ["unpin-static", "pin-static"]
        checks.clear()
        assert a.pin_count == 1 and ("unpin", "gpu0") not in e.calls
        a.unmap(t, BIDI)
    assert a.pin_count == 0 and e.calls.count(("unpin", "gpu0")) == 1
    b.detach(a)
    b.put()


def test_a_movable_buffer_moves_again_after_the_static_unmap(m):
    b = SystemHeap(m).allocate(4 * G, movable=True)
    a = b.attach(m.device("gpu0"))
    with b.resv:
        t = a.map(BIDI)
        with checks.report_mode():
            a.unpin()
            a.unpin()
        checks.clear()
        assert a.pin_count == 1
        with pytest.raises(errors.Busy):
            b.move()  # still pinned by the live mapping
        a.unmap(t, BIDI)
        assert a.pin_count == 0
        b.move()
    b.detach(a)
    b.put()


# ------------------------------------------------ the system heap zeroes its pages


def _fill(b, byte):
    with b.resv:
        vm = b.vmap()
        vm.write(0, bytes([byte]) * b.size)
        b.vunmap(vm)


def _contents(b):
    with b.resv:
        vm = b.vmap()
        try:
            return vm.read(0, b.size)
        finally:
            b.vunmap(vm)


@pytest.mark.parametrize("layout", ["contiguous", "fragmented", "scattered"])
def test_heap_buffer_never_shows_the_last_owners_bytes(m, layout):
    """The kernel's system heap allocates with __GFP_ZERO: a buffer on
    pages another buffer wrote and freed reads zeros; a live neighbour
    sharing the model's 64 KiB chunks keeps its bytes."""
    heap = SystemHeap(m)
    neighbour = heap.allocate(5 * G, layout="contiguous")
    old = heap.allocate(37 * G, layout=layout, seed=3)
    _fill(neighbour, 0x5A)
    _fill(old, 0xA5)
    old_pfns = set(old.exporter.pfns.tolist())
    old.put()
    new = heap.allocate(37 * G, layout=layout, seed=3)
    assert old_pfns & set(new.exporter.pfns.tolist()), "the test needs the pages reused"
    assert _contents(new) == bytes(new.size)
    assert _contents(neighbour) == b"\x5a" * neighbour.size
    new.put()
    neighbour.put()


def test_moved_buffer_gets_clean_pages_and_keeps_its_own(m):
    """A migration copies the pages that hold data and clears the rest of
    the new pages, which may have held another buffer's bytes."""
    heap = SystemHeap(m)
    b = heap.allocate(48 * G, movable=True, layout="contiguous")   # pages past 17 hold no data
    with b.resv:
        vm = b.vmap()
        vm.write(G, b"kept")
        b.vunmap(vm)
    # Dirty the pages the move will draw (the allocator is deterministic:
    # same request, same free RAM, same pages), then give them back.
    e = b.exporter
    junk = m.pages.alloc(48, e.layout, e.seed + e.moves + 1)
    for p in junk.tolist():
        m.memory.write(p << 12, b"\xee" * G)
    dirty = set(junk.tolist())
    m.pages.free(junk)
    with b.resv:
        b.move()
    assert dirty & set(b.exporter.pfns.tolist()), "the test needs the move to reuse the dirty pages"
    data = _contents(b)
    assert data[G:G + 4] == b"kept"
    assert data[:G] == bytes(G) and data[G + 4:] == bytes(48 * G - G - 4)
    b.put()


def test_zero_pages_clears_exactly_the_pages_given(m):
    mem = m.memory
    base = 0x100000
    mem.write(base << 12, b"\x11" * (40 * G))
    pf = np.array([base + 1, base + 16, base + 17, base + 39] + list(range(base + 18, base + 32)), dtype=np.uint64)
    assert mem._raw_zero_pages(pf) == len(pf)
    got = np.frombuffer(mem.read(base << 12, 40 * G), dtype=np.uint8).reshape(40, G)
    cleared = {int(p - base) for p in pf}
    for i in range(40):
        assert (got[i] == 0).all() if i in cleared else (got[i] == 0x11).all(), i
    assert mem._raw_zero_pages(np.array([base + 200], dtype=np.uint64)) == 0   # never written: nothing to do


def test_wait_unmapped_wakes_when_another_thread_unmaps(m):
    """An unmap notifies the buffer's waiters (and only when there are
    some: the count of threads in wait_unmapped)."""

    b = SystemHeap(m).allocate(1 << 16)
    a = b.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    done = []
    waiter = threading.Thread(target=lambda: done.append(b.wait_unmapped(30) is None))
    waiter.start()
    for _ in range(3000):  # until the waiter is counted (no assertion on time)
        if b._idle_waiters:
            break
        time.sleep(0.001)
    assert b._idle_waiters == 1
    a.unmap_unlocked(t, BIDI)
    waiter.join(30)
    assert done == [True] and b._idle_waiters == 0
    b.detach(a)
    b.put()


def test_leaked_mappings_leave_a_bounded_trail_in_the_checkers_records(m):
    """Mappings collected without an unmap (their attachments leaked) leave
    dead weak references in the checker's records; those are swept out as
    the records grow, so a program that keeps leaking does not grow them
    without bound."""
    import warnings

    from pydmabuf import dmabuf_attach

    gpu = m.device("gpu0")
    heap = SystemHeap(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for i in range(300):  # a buffer, attached and mapped, all dropped
            heap.allocate(1 << 12).attach(gpu).map_unlocked(BIDI)
            if i % 25 == 24:
                gc.collect()
    refs = dmabuf_attach._device_maps[gpu]
    assert all(r() is None for r in refs.values())  # nothing kept alive
    assert len(refs) <= 2 * 64 + 1


def _covers_reference(rows: np.ndarray, addr: int, nbytes: int) -> bool:
    """What a mapping covers, in NumPy (the checker's old arithmetic):
    inclusive last bytes, empty rows never touched."""
    if len(rows) == 0:
        return False
    lo = rows[:, 0]
    last = lo + (rows[:, 1] - np.uint64(1))
    live = rows[:, 1] != 0
    return bool((live & (lo <= np.uint64(addr + nbytes - 1)) & (last >= np.uint64(addr))).any())


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**20)), max_size=6),
       st.integers(0, 2**64 - 1), st.integers(1, 2**20))
def test_a_mappings_rows_are_touched_as_numpy_says(rows, addr, nbytes):
    """ranges_touch (the compiled check of Mapping.covers) against the NumPy
    arithmetic it replaced, on rows and accesses that may end at 2**64."""
    from pydmabuf._core import ranges_touch

    rows = [(lo, min(n, 2**64 - lo)) for lo, n in rows]  # a row never wraps
    arr = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    nbytes = min(nbytes, 2**64 - addr)
    assert ranges_touch(arr.tobytes(), addr, nbytes) == _covers_reference(arr, addr, nbytes)


def test_ranges_touch_refuses_what_is_not_u64():
    from pydmabuf._core import ranges_touch

    with pytest.raises(TypeError):
        ranges_touch(None, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ranges_touch(np.zeros(2, dtype=np.uint64), 0, 1)  # type: ignore[arg-type]
    with pytest.raises((ValueError, errors.DmaBufError)):
        ranges_touch(b"", -1, 1)
    assert ranges_touch(b"", 0, 1) is False
    assert ranges_touch(np.array([[0, 0]], dtype=np.uint64).tobytes(), 0, 1) is False  # empty row
    assert ranges_touch(np.array([[2**64 - 4096, 4096]], dtype=np.uint64).tobytes(), 2**64 - 1, 1) is True


def test_a_mapping_records_the_tables_rows_at_map_time(m):
    """The checker's copy of a mapping's DMA rows is the table's at map
    time (``SgTable._dma_snapshot``), and a table finds its mapping from
    itself while the mapping is live, and not after."""
    from pydmabuf import dmabuf_attach

    buf = SystemHeap(m).allocate(16 << 12, layout="fragmented", seed=3)
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    assert t._dma_snapshot() == t.dma_ranges().tobytes()
    (rec,) = a._maps
    assert np.array_equal(rec.dma, t.dma_ranges()) and not rec.dma.flags.writeable
    lo, n = (int(x) for x in t.dma_ranges()[0])
    assert rec.covers(lo + n - 1, 1) and not rec.covers(lo + n, 0)
    assert dmabuf_attach._table_map(t) is rec and t._dmabuf_ref() is rec
    a.unmap_unlocked(t, BIDI)
    assert t._dmabuf_ref is None and dmabuf_attach._table_map(t) is None
    with checks.report_mode():
        a.unmap_unlocked(t, BIDI)  # a double unmap: found to be no live mapping
    assert [r.rule for r in checks.reports()] == ["bad-unmap"]
    buf.detach(a)
    buf.put()


def test_attachments_and_mappings_record_the_users_line(m):
    """``created_at`` names the user's line for every way in: the walk to
    it skips the package's own frames (found in C, pydmabuf._dmabuf_api)."""
    import inspect

    from pydmabuf import mapping

    def line() -> int:
        f = inspect.currentframe()
        assert f is not None and f.f_back is not None
        return f.f_back.f_lineno

    here = "test_dmabuf.py"
    buf = SystemHeap(m).allocate(4 << 12)
    gpu = m.device("gpu0")
    a, at = buf.attach(gpu), line()
    b, bt = buf.dynamic_attach(gpu, ImporterOps()), line()
    c, ct = buf.mapping_attach([mapping.sgt_importer(gpu)]), line()
    assert [x.created_at for x in (a, b, c)] == [f"{here}:{at}", f"{here}:{bt}", f"{here}:{ct}"]
    t1, t1l = a.map_unlocked(BIDI), line()
    with buf.resv:
        t2, t2l = c.map(BIDI), line()
    h, hl = b.track_dma(np.array([[1 << 20, 4096]], dtype=np.uint64)), line()
    sites = {id(x.table): x.created_at for x in (*a._maps, *c._maps)}
    assert sites == {id(t1): f"{here}:{t1l}", id(t2): f"{here}:{t2l}"}
    assert h.created_at == f"{here}:{hl}"
    b.untrack_dma(h)
    a.unmap_unlocked(t1, BIDI)
    c.unmap_unlocked(t2, BIDI)
    for x in (a, b, c):
        buf.detach(x)
    buf.put()


@pytest.mark.parametrize("junk", [None, 5, lambda: None, "ref"])
def test_a_table_whose_mapping_reference_was_overwritten_is_no_live_mapping(m, junk):
    """``SgTable._dmabuf_ref`` is writable from Python: whatever is written
    there, an unmap finds no mapping (the checker's bad-unmap), never a
    crash or a TypeError; the mapping stays live for the attachment."""
    buf = SystemHeap(m).allocate(4 << 12)
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    t._dmabuf_ref = junk
    with checks.report_mode():
        a.unmap_unlocked(t, BIDI)
    assert [r.rule for r in checks.reports()] == ["bad-unmap"] and a.live_mappings == 1
    (rec,) = a._maps
    t._dmabuf_ref = weakref.ref(rec)  # put back: the unmap works again
    a.unmap_unlocked(t, BIDI)
    assert a.live_mappings == 0
    buf.detach(a)
    buf.put()


def test_entry_points_called_as_a_threads_first_frame_record_an_unknown_site(m):
    """An attach or a map that is the first Python frame of a thread (a
    ``_thread`` target, a C caller) has fewer frames above it than the
    entry point's site assumes: the site is ``?``, and nothing fails
    half-way (a static map of a dynamic exporter keeps its one pin)."""
    import _thread

    buf = SystemHeap(m).allocate(1 << 16, movable=True)
    a = buf.attach(m.device("gpu0"))
    done = threading.Event()
    got: list[object] = []

    def call(fn, *args):
        try:
            got.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - the outcome is the test
            got.append(e)
        done.set()

    _thread.start_new_thread(call, (a.map_unlocked, BIDI))
    assert done.wait(30)
    assert isinstance(got[-1], pydmabuf.SgTable) and a.live_mappings == 1 and a.pin_count == 1
    (rec,) = a._maps
    assert rec.created_at.startswith("test_dmabuf.py:")  # `call` is user code: the walk reaches it
    done.clear()
    _thread.start_new_thread(buf.attach, (m.device("nic0"),))
    deadline = time.monotonic() + 30
    while len(buf.attachments) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    b = buf.attachments[0]
    assert b.created_at == "?"  # no user frame above the bare thread's attach
    a.unmap_unlocked(got[-1], BIDI)
    buf.detach(b)
    buf.detach(a)
    buf.put()


def test_track_dma_reads_the_importers_array(m):
    """``track_dma`` keeps the importer's array (its own record of what it
    mapped), not a copy: the checker reads it as it is at the access."""
    buf = SystemHeap(m).allocate(4 << 12)
    a = buf.dynamic_attach(m.device("gpu0"), ImporterOps())
    rows = np.array([[1 << 30, 1 << 12]], dtype=np.uint64)
    h = a.track_dma(rows)
    assert h.covers(1 << 30, 8)
    rows[:] = 0
    assert not h.covers(1 << 30, 8) and np.shares_memory(h.dma, rows)
    a.untrack_dma(h)
    buf.detach(a)
    buf.put()


def test_sgt_dma_device_of_a_broken_map_type_is_an_error():
    """Only a missing ``map_type`` (not an attachment) or a missing field
    is None; a ``map_type`` that is no entry at all is the caller's bug."""
    from pydmabuf import mapping

    class NoType:
        map_type = object()

    assert mapping.sgt_dma_device(object()) is None
    with pytest.raises(AttributeError):
        mapping.sgt_dma_device(NoType())
