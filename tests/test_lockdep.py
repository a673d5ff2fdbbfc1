"""Lock order checked the way lockdep checks it (kernel/locking/lockdep.c):
one dependency graph over lock classes, an edge A -> B each time B is
taken with A held, and the first acquisition that closes a cycle reported
with both chains, whether or not another thread was there to deadlock.

Each test names the kernel function whose behaviour it shows next to the
model's."""

from __future__ import annotations

import threading
import uuid

import pytest

from pydmabuf import AcquireContext, Fence, Resv, WwClass, WwMutex, checks, errors, fence_context_alloc, locking
from pydmabuf.locking import FENCE_MAP, FS_RECLAIM, MMAP_LOCK, RESV_CLASS, Mutex


@pytest.fixture(autouse=True)
def fresh_graph():
    """Every test starts from a freshly primed graph (a boot) and leaves
    one behind, so inversions it makes on purpose stay its own."""
    locking.lockdep_reset()
    yield
    locking.lockdep_reset()


def _cls(name: str) -> str:
    return f"&{name}-{uuid.uuid4().hex[:6]}"


def test_ab_ba_in_one_thread_is_reported_with_both_chains_and_call_sites():
    # check_prev_add() -> check_noncircular() -> print_circular_bug(): the
    # first B -> A after an A -> B is the report, with no second thread.
    a, b = Mutex(_cls("a")), Mutex(_cls("b"))
    with a:
        with b:  # the A -> B edge is made here
            pass
    with b:
        with pytest.raises(errors.LockingError) as ei:
            a.lock()
        assert not a.locked()  # refused before it was taken: nothing changed
        assert locking.held_locks() == [b.lock_class]
    msg = str(ei.value)
    assert "circular locking dependency" in msg
    assert f"{b.lock_class} -> {a.lock_class}" in msg.replace("makes ", "")  # the new edge
    assert f"{a.lock_class} -> {b.lock_class} at test_lockdep.py:" in msg  # the old chain with its call site
    assert msg.count("test_lockdep.py:") == 2  # both edges name where they were made


def test_longer_cycle_names_the_whole_chain():
    a, b, c = Mutex(_cls("a")), Mutex(_cls("b")), Mutex(_cls("c"))
    with a, b:
        pass
    with b, c:
        pass
    with c:
        with pytest.raises(errors.LockingError) as ei:
            a.lock()
    assert f"{a.lock_class} -> {b.lock_class} -> {c.lock_class}" in str(ei.value)


def test_inversion_across_two_threads_that_never_overlap():
    # lockdep's graph is global: thread 1 finished long before thread 2
    # starts, and the inversion is still caught in thread 2.
    a, b = Mutex(_cls("a")), Mutex(_cls("b"))
    seen: list[BaseException] = []

    def first() -> None:
        with a, b:
            pass

    def second() -> None:
        try:
            with b, a:
                pass
        except errors.LockingError as e:
            seen.append(e)

    t1 = threading.Thread(target=first, name="first")
    t1.start()
    t1.join()
    t2 = threading.Thread(target=second, name="second")
    t2.start()
    t2.join()
    assert len(seen) == 1
    msg = str(seen[0])
    assert "[first]" in msg and "[second]" in msg  # each edge names its thread
    assert not a.locked() and not b.locked()


def test_report_mode_records_once_and_lets_the_lock_be_taken():
    a, b = Mutex(_cls("a")), Mutex(_cls("b"))
    with a, b:
        pass
    with checks.report_mode():
        checks.clear()
        for _ in range(3):
            with b, a:
                pass
        reps = checks.reports("lock-inversion")
        checks.clear()
    assert len(reps) == 1 and reps[0].kind == "locking"


def test_every_reservation_object_is_one_class():
    # reservation_ww_class: two different buffers' locks are one lockdep
    # class, so M inside resv1 and resv2 inside M is an inversion.
    r1, r2 = Resv(), Resv()
    m = Mutex(_cls("pages"))
    with r1:
        with m:
            pass
    assert m.lock_class in locking.dependencies()[RESV_CLASS]
    with m:
        with pytest.raises(errors.LockingError) as ei:
            r2.lock()
        assert not r2.held_by_current_thread()  # the refused lock was dropped again
    assert RESV_CLASS in str(ei.value)


def test_ww_nesting_under_an_acquire_context_is_legal():
    # ww_mutex_lock(ctx) nests under the context (lockdep's nest_lock):
    # same class, no report.
    objs = [Resv() for _ in range(4)]
    with AcquireContext(objs[0].ww_class) as ctx:
        ctx.lock_all(objs)
        assert locking.held_locks() == [RESV_CLASS] * 4
        ctx.unlock_all()
    assert locking.held_locks() == []


def test_ww_classes_are_lock_classes_too():
    cls = WwClass(_cls("ww"))
    w = WwMutex(cls)
    m = Mutex(_cls("m"))
    with w:
        with m:
            pass
    with m:
        with pytest.raises(errors.LockingError):
            w.lock()
    assert not w.trylock() or w.unlock() is None  # still usable, and free


def test_same_class_twice_is_recursive_locking_unless_annotated():
    # mutex_lock() of a second lock of the class: "possible recursive
    # locking detected"; mutex_lock_nested(subclass) / nest_lock are the
    # annotations that make it legal.
    name = _cls("node")
    x, y = Mutex(name), Mutex(name)
    with x:
        with pytest.raises(errors.LockingError, match="recursive locking"):
            y.lock()
        assert not y.locked()
        y.lock(subclass=1)  # mutex_lock_nested(&y, 1)
        y.unlock()
    outer = Mutex(_cls("set"))
    with outer:
        x.lock(nest_lock=outer)  # mutex_lock_nest_lock()
        y.lock(nest_lock=outer)
        y.unlock()
        x.unlock()
    with checks.report_mode():
        checks.clear()
        with x, y:
            pass
        assert len(checks.reports("recursive-locking")) == 1
        checks.clear()


def test_the_same_mutex_twice_raises_in_every_mode():
    x = Mutex(_cls("x"))
    with checks.report_mode(), x:
        with pytest.raises(errors.LockingError, match="would deadlock"):
            x.lock()
        assert x.trylock() is False  # mutex_trylock() of a held mutex: 0, no report
    assert x.trylock() is True and locking.held_locks() == [x.lock_class]
    x.unlock()


def test_unlock_by_a_non_owner_and_nest_lock_not_held():
    x, n = Mutex(_cls("x")), Mutex(_cls("n"))
    with pytest.raises(errors.LockingError):
        x.unlock()
    with pytest.raises(errors.LockingError, match="nest_lock"):
        x.lock(nest_lock=n)
    with pytest.raises(TypeError):
        Mutex("")
    with pytest.raises(ValueError):
        x.lock(subclass=8)


def test_dma_resv_lockdep_priming_forbids_mmap_lock_inside_resv():
    # dma_resv_lockdep() (drivers/dma-buf/dma-resv.c) primes mmap_lock ->
    # reservation lock -> fs_reclaim at boot: a page fault / GUP /
    # copy_from_user under a reservation lock is reported the first time,
    # without any path having taken mmap_lock first.
    deps = locking.dependencies()
    assert RESV_CLASS in deps[MMAP_LOCK] and FS_RECLAIM in deps[RESV_CLASS]
    r = Resv()
    with r:
        locking.might_lock(FS_RECLAIM)  # allocating under the lock: fine
        with pytest.raises(errors.LockingError) as ei:
            locking.might_lock(MMAP_LOCK)
    assert "primed by dma_resv_lockdep()" in str(ei.value)


def test_reclaim_inside_a_signalling_section_closes_a_cycle_through_the_fence_map():
    # fs_reclaim -> mmu_notifier -> dma_fence_map is primed; a GFP_KERNEL
    # allocation inside dma_fence_begin_signalling() makes dma_fence_map ->
    # fs_reclaim.
    with locking.signalling_section():
        assert FENCE_MAP in locking.held_locks()
        with pytest.raises(errors.LockingError) as ei:
            locking.might_lock(FS_RECLAIM)
    assert FENCE_MAP in str(ei.value)


def test_lock_held_while_waiting_and_taken_while_signalling_is_a_cycle():
    # __dma_fence_might_wait() makes L -> dma_fence_map for every lock held
    # across a wait; the same L taken inside a signalling section makes
    # dma_fence_map -> L: the cycle lockdep reports.
    m = Mutex(_cls("l"))
    f = Fence(fence_context_alloc(), 1)
    with m:
        assert f.wait(timeout=0) is False
    assert FENCE_MAP in locking.dependencies()[m.lock_class]
    with locking.signalling_section():
        with pytest.raises(errors.LockingError):
            m.lock()
    assert not m.locked()


def test_a_fence_callback_taking_a_lock_held_across_waits_is_caught():
    # Fence.signal() runs its callbacks in its own signalling section.
    m = Mutex(_cls("cb"))
    f, g = Fence(fence_context_alloc(), 1), Fence(fence_context_alloc(), 1)
    with m:
        g.wait(timeout=0)
    caught: list[BaseException] = []

    def cb(_f):
        try:
            with m:
                pass
        except errors.LockingError as e:
            caught.append(e)

    f.add_callback(cb)
    f.signal()
    assert len(caught) == 1 and FENCE_MAP in str(caught[0])


def test_iommufd_primes_the_pages_mutex_inside_the_reservation_lock():
    # iopt_map_dmabuf() takes pages->mutex once under the reservation lock
    # for lockdep's sake; after one IOMMU_IOAS_MAP_FILE of a dma-buf the
    # edge is in the graph.
    from pydmabuf import scenarios

    scenarios.run("vfio-iommufd-kvm", out=None)
    deps = locking.dependencies()
    assert "&pages->mutex" in deps[RESV_CLASS]
    assert "iommufd.py" in deps[RESV_CLASS]["&pages->mutex"]
    # KVM's fault and invalidation: reservation lock before mmu_lock.
    assert "&kvm->mmu_lock" in deps[RESV_CLASS]
    assert RESV_CLASS not in deps.get("&kvm->mmu_lock", {})


def test_tracking_off_records_nothing():
    a, b = Mutex(_cls("a")), Mutex(_cls("b"))
    locking.set_lockdep(False)
    try:
        assert not locking.lockdep_enabled()
        with a, b:
            pass
        with b, a:
            pass
        r = Resv()
        with r:
            assert locking.held_locks() == []
    finally:
        locking.set_lockdep(True)
    assert a.lock_class not in locking.dependencies()


def test_threads_hold_their_own_stacks():
    a = Mutex(_cls("a"))
    r = Resv()
    inside = threading.Event()
    done = threading.Event()
    seen: list[list[str]] = []

    def other() -> None:
        with a:
            inside.set()
            done.wait(5)
            seen.append(locking.held_locks())

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    with r:
        assert locking.held_locks() == [RESV_CLASS]
    done.set()
    t.join()
    assert seen == [[a.lock_class]]
    assert a.lock_class not in locking.dependencies().get(RESV_CLASS, {})


def test_vfio_memory_lock_orders_before_the_reservation_lock():
    # vfio_pci_dma_buf_move() runs under memory_lock and takes each
    # buffer's reservation lock: memory_lock -> resv.  A path that took
    # memory_lock under a reservation lock would invert it.
    from pydmabuf import Machine
    from pydmabuf.exporters import VfioPciBar

    m = Machine.default()
    v = VfioPciBar(m, "vfio1", nbytes=1 << 16)
    b = v.export()
    try:
        v.set_memory_decode(False, timeout=5)
        assert RESV_CLASS in locking.dependencies()["&vdev->memory_lock"]
        core_lock = v._core.memory_lock
        with b.resv:
            with pytest.raises(errors.LockingError) as ei:
                core_lock.lock()
        assert "&vdev->memory_lock" in str(ei.value) and not core_lock.locked()
        v.set_memory_decode(True, timeout=5)
    finally:
        b.put()
        v.close()


def test_the_cores_own_record_of_uncontended_ww_locks_is_the_hooks():
    """The core records a ww lock taken with nothing else held, and drops
    the lock released last, without calling the Python hooks; everything
    else goes to them.  Both must keep the one list lockdep reads."""
    from pydmabuf import _core

    calls: list[str] = []
    acquire, release = locking._fast_hooks(locking._ld)

    def spy_acquire(m, with_ctx, trylock):
        calls.append("acquire")
        acquire(m, with_ctx, trylock)

    def spy_release(m):
        calls.append("release")
        release(m)

    ld = locking._ld
    cls = WwClass(_cls("fresh"))  # not keyed yet: its first lock goes to the hook
    x, y = WwMutex(cls), WwMutex(cls)
    r1 = Resv()
    _core.set_lockdep_hooks(spy_acquire, spy_release, ld.signal, ld.might_wait, tls=ld.tls, keys=ld.ww_keys)
    try:
        with x:
            assert locking.held_locks() == [cls.mutex_name]
        assert calls == ["acquire"] and locking.held_locks() == []
        calls.clear()
        with x:  # keyed now: the core's own path, both ways
            pass
        assert calls == []
        x.lock()
        r1.lock()  # another lock held: the hook adds the edge
        assert locking.held_locks() == [cls.mutex_name, RESV_CLASS]
        assert RESV_CLASS in locking.dependencies()[cls.mutex_name]
        x.unlock()  # out of order: the hook finds it
        assert locking.held_locks() == [RESV_CLASS]
        r1.unlock()  # the last one: the core's
        assert calls == ["acquire", "release"] and locking.held_locks() == []
        assert y.trylock() is True and locking.held_locks() == [cls.mutex_name]
        y.unlock()
    finally:
        locking.set_lockdep(True)
    with pytest.raises(TypeError):
        _core.set_lockdep_hooks(spy_acquire, spy_release, None, None, tls=ld.tls)
    with pytest.raises(TypeError):
        _core.set_lockdep_hooks(None, None, None, None, tls=ld.tls, keys={})


def test_the_cores_record_keys_a_lock_as_the_hook_does():
    """The class key comes from the lock's ``ww_class`` attribute, as the
    Python hook reads it, on the core's path too."""
    other = WwClass(_cls("other"))
    w = WwMutex(other)
    w.lock()
    w.unlock()
    r0 = Resv()
    r0.lock()
    r0.unlock()  # both classes keyed now: the core's path is taken

    class Relabelled(Resv):
        @property
        def ww_class(self) -> WwClass:  # type: ignore[override]
            return other

    r = Relabelled()
    r.lock()
    try:
        assert locking.held_locks() == [other.mutex_name]
    finally:
        r.unlock()
    assert locking.held_locks() == []


def test_tracking_switched_off_during_a_locks_own_record_finishes_the_record():
    """A collection run by the record's own look-ups may switch tracking
    off (a finalizer calling set_lockdep(False)); the lock still succeeds
    and the record it began is kept, as the hook closures did."""
    import gc

    class Fin:
        def __del__(self):
            locking.set_lockdep(False)

    r = Resv()
    out: list[str] = []

    def worker():
        a = Fin()
        a.self = a  # type: ignore[attr-defined]
        del a
        gc.set_threshold(1)
        try:
            r.lock()
            out.append("locked")
            r.unlock()
        except BaseException as e:  # noqa: BLE001 - the outcome is the test
            out.append(repr(e))
        finally:
            gc.set_threshold(700)

    try:
        t = threading.Thread(target=worker)
        t.start()
        t.join(30)
    finally:
        locking.set_lockdep(True)
    assert out == ["locked"]


def test_priming_takes_no_edge_from_the_locks_the_caller_holds():
    """lockdep_reset() primes the graph as the kernel does at boot, holding
    nothing: a reservation lock or a mutex the caller holds adds no edge
    and is no recursive locking; the caller still holds them after."""
    r = Resv()
    m = Mutex(_cls("held"))
    with r, m:
        locking.lockdep_reset()
        locking.prime([FS_RECLAIM, MMAP_LOCK + "-x"], "a test")
        assert locking.held_locks() == [RESV_CLASS, m.lock_class]
    deps = locking.dependencies()
    assert m.lock_class not in deps and MMAP_LOCK not in deps.get(RESV_CLASS, {})
    assert RESV_CLASS in deps[MMAP_LOCK]  # the boot order itself is primed


def test_the_held_list_is_kept_per_thread_and_goes_with_the_thread():
    """pydmabuf.locking keeps each thread's held locks in a core
    ThreadHeld (the thread's own state dict): one value per thread, an
    AttributeError before it is set or after it is deleted, and nothing
    left once the thread has ended."""
    import gc
    import threading
    import weakref

    from pydmabuf._core import ThreadHeld

    tl = ThreadHeld()
    with pytest.raises(AttributeError):
        tl.held
    mine = [1]
    tl.held = mine
    seen: dict[str, object] = {}

    class Box(list):  # weakly referenceable
        pass

    def other() -> None:
        seen["before"] = getattr(tl, "held", None)
        box = Box([2])
        tl.held = box
        seen["ref"] = weakref.ref(box)
        seen["after"] = tl.held is box

    t = threading.Thread(target=other)
    t.start()
    t.join()
    gc.collect()
    assert seen["before"] is None and seen["after"] is True
    assert seen["ref"]() is None  # the thread's value went with its state
    assert tl.held is mine
    del tl.held
    with pytest.raises(AttributeError):
        tl.held
    with pytest.raises(AttributeError):
        del tl.held
