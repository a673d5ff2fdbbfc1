"""Wound/wait mutexes: kernel/locking/test-ww_mutex.c in our own words, the
wait-die and wound-wait decisions of kernel/locking/ww_mutex.h, and the
DEBUG_WW_MUTEXES / lockdep checks as LockingError."""

from __future__ import annotations

import errno
import gc
import random
import threading
import time
import weakref

import pytest

from lockhelp import bounded, clean_thread, spawn  # noqa: F401  (autouse fixture)
from pydmabuf import (
    AcquireContext,
    Resv,
    WwClass,
    WwMutex,
    errors,
    flush_signals,
    reservation_ww_class,
    signal_pending,
    signal_thread,
)
from pydmabuf._core import thread_lock_state

WD = WwClass("test_wd", wait_die=True)
WW = WwClass("test_ww", wait_die=False)
CLASSES = [pytest.param(WW, id="wound-wait"), pytest.param(WD, id="wait-die")]


def wait_until(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def waiting_on(m):
    """True once somebody is queued on ``m`` (the repr shows the flag)."""
    return "waiters" in repr(m)


# ---------------------------------------------------------------- classes


def test_class_basics():
    c = WwClass("x", wait_die=True)
    assert c.is_wait_die and c.stamp == 0
    assert c.acquire_name == "x_acquire" and c.mutex_name == "x_mutex"
    assert not WwClass("y").is_wait_die  # DEFINE_WW_CLASS: wound-wait
    assert reservation_ww_class.is_wait_die  # dma-resv.c: DEFINE_WD_CLASS


def test_stamps_increase_per_class():
    a, b = WwClass("a"), WwClass("b")
    with AcquireContext(a) as c1, AcquireContext(a) as c2, AcquireContext(b) as c3:
        assert (c1.stamp, c2.stamp, c3.stamp) == (1, 2, 1)
        assert a.stamp == 2


# ------------------------------------------------------------- test_mutex


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("flags", range(8))
@bounded()
def test_mutual_exclusion(cls, flags):
    """__test_mutex(): the worker may not get the lock while main holds it."""
    spin, tryl, with_ctx = flags & 1, flags & 2, flags & 4
    m = WwMutex(cls)
    ready, go, done = threading.Event(), threading.Event(), threading.Event()

    def worker():
        ready.set()
        go.wait()
        if tryl:
            while not m.trylock():
                time.sleep(0)
        else:
            m.lock()
        done.set()
        m.unlock()

    w = spawn(worker)
    ready.wait()
    ctx = AcquireContext(cls)
    m.lock(ctx if with_ctx else None)
    go.set()
    if spin:
        end = time.monotonic() + 1 / 16
        seen = False
        while time.monotonic() < end:
            seen = seen or done.is_set()
            time.sleep(0)
    else:
        seen = done.wait(1 / 16)
    m.unlock()
    ctx.fini()
    w.result()
    assert not seen, "mutual exclusion failure"
    assert done.is_set()


# ---------------------------------------------------------------- test_aa


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("trylock", [False, True])
def test_aa(cls, trylock):
    m = WwMutex(cls)
    with AcquireContext(cls) as ctx:
        if trylock:
            assert m.trylock(ctx)
        else:
            m.lock(ctx)
        assert m.locking_ctx() is ctx
        assert not m.trylock()  # context-less trylock of our own lock fails
        assert not m.trylock(ctx)  # no EALREADY from a trylock
        with pytest.raises(errors.AlreadyLockedError) as ei:
            m.lock(ctx)
        assert ei.value.errno == errno.EALREADY
        assert ctx.acquired == 1 and m.is_locked()  # nothing changed
        m.unlock()


def test_ealready_comes_before_done_check():
    m = WwMutex(WD)
    with AcquireContext(WD) as ctx:
        m.lock(ctx)
        ctx.done()
        with pytest.raises(errors.AlreadyLockedError):
            m.lock(ctx)
        m.unlock()


# -------------------------------------------------------------- test_abba


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("trylock", [False, True])
@pytest.mark.parametrize("resolve", [False, True])
@bounded()
def test_abba(cls, trylock, resolve):
    a, b = WwMutex(cls), WwMutex(cls)
    a_ready, b_ready = threading.Event(), threading.Event()

    def side(mine, other, my_ready, their_ready):
        with AcquireContext(cls) as ctx:
            if trylock:
                assert mine.trylock(ctx)
            else:
                mine.lock(ctx)
            assert mine.locking_ctx() is ctx
            my_ready.set()
            their_ready.wait()
            err = 0
            try:
                other.lock(ctx)
            except errors.WouldDeadlock:
                err = -errno.EDEADLK
                if resolve:
                    mine.unlock()
                    other.lock_slow(ctx)
                    err = 0
                    mine.lock(ctx)
            if err == 0:
                other.unlock()
            if mine.held_by_current_thread():
                mine.unlock()
            return err

    w = spawn(side, b, a, b_ready, a_ready)
    main = side(a, b, a_ready, b_ready)
    theirs = w.result()
    if resolve:
        assert main == 0 and theirs == 0
    else:
        assert -errno.EDEADLK in (main, theirs), "missed ABBA deadlock"


# -------------------------------------------------------------- test_cycle


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("n", [2, 3, 4, 6])
@bounded()
def test_cycle(cls, n):
    """Each thread holds its lock and wants the next one's: a cycle every
    algorithm must resolve."""
    locks = [WwMutex(cls) for _ in range(n)]
    holding = [threading.Event() for _ in range(n)]

    def work(i):
        mine, nxt = locks[i], locks[(i + 1) % n]
        with AcquireContext(cls) as ctx:
            mine.lock(ctx)
            holding[i].set()
            holding[(i + 1) % n].wait()
            try:
                nxt.lock(ctx)
            except errors.WouldDeadlock:
                mine.unlock()
                nxt.lock_slow(ctx)
                mine.lock(ctx)
            nxt.unlock()
            mine.unlock()
        return 0

    workers = [spawn(work, i) for i in range(n)]
    assert [w.result() for w in workers] == [0] * n


# ------------------------------------------------------ wait-die decisions


def hold_in_thread(locks, cls, before=None):
    """Start a thread that creates a context (after ``before`` is set, if
    given), locks ``locks`` and holds them until released.  Returns
    (worker, ctx-holder dict, release event, holding event)."""
    release, holding = threading.Event(), threading.Event()
    box = {}

    def run():
        if before is not None:
            before.wait()
        with AcquireContext(cls) as ctx:
            box["ctx"] = ctx
            for m in locks:
                m.lock(ctx)
            holding.set()
            release.wait()
            for m in locks:
                m.unlock()

    return spawn(run), box, release, holding


def lock_then_lock(cls, first, second, before=None, made=None, holding=None):
    """In a new context (made after ``before`` is set, reporting ``made``):
    lock ``first`` (reporting ``holding``), then ``second``.  Returns "died"
    when the second lock raised EDEADLK (``first`` is then unlocked), else
    "got it"."""
    if before is not None:
        before.wait()
    with AcquireContext(cls) as ctx:
        if made is not None:
            made.set()
        first.lock(ctx)
        if holding is not None:
            holding.set()
        try:
            second.lock(ctx)
        except errors.WouldDeadlock:
            first.unlock()
            return "died"
        second.unlock()
        first.unlock()
        return "got it"


@bounded()
def test_wait_die_younger_dies_at_older_holder():
    x, y = WwMutex(WD), WwMutex(WD)
    w, box, release, holding = hold_in_thread([x], WD)
    holding.wait()
    with AcquireContext(WD) as young:
        assert young.stamp > box["ctx"].stamp
        y.lock(young)
        with pytest.raises(errors.WouldDeadlock) as ei:
            x.lock(young)
        assert ei.value.errno == errno.EDEADLK
        assert young.contending is x and young.acquired == 1
        y.unlock()
        release.set()
        x.lock_slow(young)
        assert young.contending is None
        x.unlock()
    w.result()


@bounded()
def test_context_holding_nothing_always_waits():
    x = WwMutex(WD)
    w, box, release, holding = hold_in_thread([x], WD)
    holding.wait()
    with AcquireContext(WD) as young:
        threading.Timer(0.05, release.set).start()
        x.lock(young)  # younger, but holds nothing: waits, never dies
        x.unlock()
    w.result()


@bounded()
def test_wait_die_older_waits_for_younger_holder():
    x, z = WwMutex(WD), WwMutex(WD)
    go = threading.Event()
    with AcquireContext(WD) as old:
        z.lock(old)
        go.set()  # the holder's context is made after ours: younger
        w, box, release, holding = hold_in_thread([x], WD, before=go)
        holding.wait()
        threading.Timer(0.05, release.set).start()
        x.lock(old)  # older requester: waits
        x.unlock()
        z.unlock()
    w.result()


@bounded()
def test_wait_die_dies_behind_an_older_waiter():
    """__ww_mutex_add_waiter(): an older context already queued makes a
    younger one holding locks die at once, even behind a plain holder."""
    x, a, b = WwMutex(WD), WwMutex(WD), WwMutex(WD)
    x.lock()  # held without a context
    old_in = threading.Event()

    def older():
        with AcquireContext(WD) as ctx:
            a.lock(ctx)
            old_in.set()
            x.lock(ctx)  # waits for main's plain lock
            x.unlock()
            a.unlock()

    w = spawn(older)
    old_in.wait()
    wait_until(lambda: waiting_on(x))

    assert spawn(lock_then_lock, WD, b, x).result() == "died"
    x.unlock()
    w.result()


@bounded()
def test_wait_die_waiting_younger_is_woken_to_die():
    """A younger waiter holding locks is woken to die when an older context
    queues ahead of it (__ww_mutex_die from add_waiter)."""
    x, a, b = WwMutex(WD), WwMutex(WD), WwMutex(WD)
    x.lock()
    order = threading.Event()
    young_waiting = threading.Event()

    def old():
        with AcquireContext(WD) as ctx:
            order.set()  # the young context is made after this one
            a.lock(ctx)
            young_waiting.wait()
            wait_until(lambda: waiting_on(x))
            x.lock(ctx)
            x.unlock()
            a.unlock()

    wy = spawn(lock_then_lock, WD, b, x, order, None, young_waiting)
    wo = spawn(old)
    assert wy.result() == "died"
    x.unlock()
    wo.result()


# ---------------------------------------------------- wound-wait decisions


@bounded()
def test_wound_wait_older_wounds_younger_holder():
    a, b, c = WwMutex(WW), WwMutex(WW), WwMutex(WW)
    older_made, young_holds, older_waits = threading.Event(), threading.Event(), threading.Event()
    box = {}

    def older():
        with AcquireContext(WW) as ctx:
            older_made.set()
            b.lock(ctx)
            young_holds.wait()
            older_waits.set()
            a.lock(ctx)  # younger holder of a gets wounded; we wait
            a.unlock()
            b.unlock()

    w = spawn(older)
    older_made.wait()
    with AcquireContext(WW) as young:
        a.lock(young)
        young_holds.set()
        older_waits.wait()
        wait_until(lambda: young.wounded)
        c.lock(young)  # wounding is lazy: a free lock still succeeds
        with pytest.raises(errors.WouldDeadlock):
            b.lock(young)  # contended: now the wound takes effect
        assert young.contending is b
        young.unlock_all()
        b.lock_slow(young)  # waits for the older one to finish
        assert not young.wounded  # reset: it held nothing when it relocked
        b.unlock()
    w.result()


@bounded()
def test_wound_wait_younger_waits_for_older():
    x, y = WwMutex(WW), WwMutex(WW)
    w, box, release, holding = hold_in_thread([x], WW)
    holding.wait()
    with AcquireContext(WW) as young:
        y.lock(young)
        threading.Timer(0.05, release.set).start()
        x.lock(young)  # younger requester under wound-wait: waits
        x.unlock()
        y.unlock()
    w.result()


@bounded()
def test_wound_wakes_a_sleeping_younger_holder():
    """A wounded holder that is asleep on another lock is woken and backs off."""
    a, b, p = WwMutex(WW), WwMutex(WW), WwMutex(WW)
    p.lock()  # a plain holder the young context will sleep on
    young_made, young_sleeps = threading.Event(), threading.Event()

    old_ctx = AcquireContext(WW)  # older than the young one
    wy = spawn(lock_then_lock, WW, a, p, None, young_made, young_sleeps)
    young_made.wait()
    young_sleeps.wait()
    wait_until(lambda: waiting_on(p))
    b.lock(old_ctx)
    a.lock(old_ctx)  # wounds the young holder, which wakes and backs off
    assert wy.result() == "died"  # the wounded holder backed off
    a.unlock()
    b.unlock()
    old_ctx.fini()
    p.unlock()


@bounded()
def test_stamp_wraparound_is_age_safe():
    c = WwClass("wrap", wait_die=True)
    c._set_stamp(2**64 - 2)
    x, y = WwMutex(c), WwMutex(c)
    w, box, release, holding = hold_in_thread([x], c)  # stamp 2**64 - 1
    holding.wait()
    with AcquireContext(c) as young:  # stamp wraps to 0, but is younger
        assert box["ctx"].stamp == 2**64 - 1 and young.stamp == 0
        y.lock(young)
        with pytest.raises(errors.WouldDeadlock):
            x.lock(young)
        y.unlock()
        release.set()
        x.lock_slow(young)
        x.unlock()
    w.result()


# ---------------------------------------------------------- interruptible


@pytest.mark.parametrize("slow", [False, True])
@bounded()
def test_interruptible_lock(slow):
    x = WwMutex(WD)
    w, box, release, holding = hold_in_thread([x], WD)
    holding.wait()
    me = threading.get_ident()
    with AcquireContext(WD) as ctx:
        if slow:  # make a legitimate lock_slow situation: die first
            y = WwMutex(WD)
            y.lock(ctx)
            with pytest.raises(errors.WouldDeadlock):
                x.lock(ctx)
            y.unlock()
        threading.Timer(0.05, signal_thread, (me,)).start()
        with pytest.raises(errors.Interrupted) as ei:
            (x.lock_slow_interruptible if slow else x.lock_interruptible)(ctx)
        assert ei.value.errno == errno.EINTR
        assert not signal_pending()  # consumed by the interrupted call
        assert ctx.acquired == 0 and not x.held_by_current_thread()
        release.set()
        if slow:
            x.lock_slow(ctx)
        else:
            x.lock(ctx)
        x.unlock()
    w.result()


def test_uncontended_interruptible_lock_succeeds_with_signal_pending():
    x = WwMutex(WD)
    x.lock()  # make sure this thread has its task
    x.unlock()
    assert signal_thread(threading.get_ident())
    x.lock_interruptible()
    assert signal_pending()
    x.unlock()
    flush_signals()
    assert not signal_pending()


@bounded()
def test_uninterruptible_lock_ignores_signals():
    x = WwMutex(WD)
    w, box, release, holding = hold_in_thread([x], WD)
    holding.wait()
    me = threading.get_ident()
    threading.Timer(0.02, signal_thread, (me,)).start()
    threading.Timer(0.1, release.set).start()
    x.lock()
    x.unlock()
    assert signal_pending()
    flush_signals()
    w.result()


def test_signal_thread_unknown():
    assert not signal_thread(0)


# ------------------------------------------------------------ debug checks


def test_lock_after_done():
    x, y = WwMutex(WD), WwMutex(WD)
    with AcquireContext(WD) as ctx:
        x.lock(ctx)
        ctx.done()
        assert ctx.is_done
        with pytest.raises(errors.LockingError, match="after done"):
            y.lock(ctx)
        with pytest.raises(errors.LockingError, match="after done"):
            y.trylock(ctx)
        with pytest.raises(errors.LockingError, match="twice"):
            ctx.done()
        assert not y.is_locked()
        x.unlock()


def test_mixing_classes():
    x = WwMutex(WW)
    with AcquireContext(WD) as ctx:
        with pytest.raises(errors.LockingError, match="mixing classes"):
            x.lock(ctx)
        assert not x.is_locked()


def test_unlock_not_held():
    x = WwMutex(WD)
    with pytest.raises(errors.LockingError, match="not locked"):
        x.unlock()
    w, box, release, holding = hold_in_thread([x], WD)
    holding.wait()
    with pytest.raises(errors.LockingError, match="only the owner"):
        x.unlock()
    assert x.is_locked() and x.owner_thread == w.ident
    release.set()
    w.result()


def test_destroy():
    x = WwMutex(WD)
    x.lock()
    with pytest.raises(errors.LockingError, match="locked"):
        x.destroy()
    x.unlock()
    x.destroy()
    with pytest.raises(errors.LockingError, match="destroyed"):
        x.lock()
    with pytest.raises(errors.LockingError, match="destroyed"):
        x.trylock()


def test_uninitialised_mutex():
    class Sub(WwMutex):
        def __init__(self):  # forgets super().__init__
            pass

    with pytest.raises(errors.LockingError, match="never initialised"):
        Sub().lock()


def injecting_ctx(cls=WD):
    """A context whose first lock after another one is an injected EDEADLK
    (countdown = stamp & 15 = 0)."""
    cls._set_stamp(15)
    return AcquireContext(cls, inject_deadlocks=True)


def test_deadlock_injection_interval():
    locks = [WwMutex(WD) for _ in range(4)]
    with injecting_ctx() as ctx:
        assert ctx.stamp == 16
        locks[0].lock(ctx)
        with pytest.raises(errors.WouldDeadlock, match="injected"):
            locks[1].lock(ctx)
        assert not locks[1].is_locked() and ctx.contending is locks[1]
        locks[0].unlock()
        locks[1].lock_slow(ctx)
        # interval 1 -> 3: three more successful locks, then a die
        locks[0].lock(ctx)
        locks[2].lock(ctx)
        locks[3].lock(ctx)
        ctx.unlock_all()
        locks[0].lock(ctx)
        with pytest.raises(errors.WouldDeadlock):
            locks[1].lock(ctx)
        ctx.unlock_all()


def test_after_edeadlk_only_the_contended_lock():
    a, b, c = WwMutex(WD), WwMutex(WD), WwMutex(WD)
    with injecting_ctx() as ctx:
        a.lock(ctx)
        with pytest.raises(errors.WouldDeadlock):
            b.lock(ctx)
        # check 2: a different mutex, even by trylock, even after unlocking
        with pytest.raises(errors.LockingError, match="must lock that one"):
            c.lock(ctx)
        with pytest.raises(errors.LockingError, match="must lock that one"):
            c.trylock(ctx)
        # check 3: the contended one while still holding others
        with pytest.raises(errors.LockingError, match="unlock everything"):
            b.lock_slow(ctx)
        with pytest.raises(errors.LockingError, match="unlock everything"):
            b.lock(ctx)
        a.unlock()
        with pytest.raises(errors.LockingError, match="must lock that one"):
            c.lock(ctx)
        b.lock(ctx)  # plain lock of the contended mutex is the slow path too
        c.lock(ctx)
        ctx.unlock_all()


def test_lock_slow_without_edeadlk():
    a = WwMutex(WD)
    with AcquireContext(WD) as ctx:
        with pytest.raises(errors.LockingError, match="without a preceding EDEADLK"):
            a.lock_slow(ctx)


def test_fini_rules():
    a = WwMutex(WD)
    ctx = AcquireContext(WD)
    a.lock(ctx)
    with pytest.raises(errors.LockingError, match="holds 1 lock"):
        ctx.fini()
    a.unlock()
    ctx.fini()
    assert ctx.is_finished
    with pytest.raises(errors.LockingError, match="twice"):
        ctx.fini()
    with pytest.raises(errors.LockingError, match="finished"):
        a.lock(ctx)
    with pytest.raises(errors.LockingError, match="already initialised"):
        ctx.__init__(WD)


def test_context_belongs_to_its_thread():
    a = WwMutex(WD)
    ctx = AcquireContext(WD)

    def other():
        for call in (lambda: a.lock(ctx), lambda: a.trylock(ctx), ctx.done, ctx.fini, ctx.unlock_all):
            with pytest.raises(errors.LockingError, match="belongs to thread"):
                call()

    spawn(other).result()
    assert not a.is_locked()
    ctx.fini()


def test_recursive_plain_lock():
    a = WwMutex(WD)
    a.lock()
    with pytest.raises(errors.LockingError, match="recursive"):
        a.lock()
    assert not a.trylock()
    a.unlock()


def test_plain_lock_while_holding_class_locks():
    a, b, other = WwMutex(WD), WwMutex(WD), WwMutex(WW)
    with AcquireContext(WD) as ctx:
        a.lock(ctx)
        with pytest.raises(errors.LockingError, match="without an acquire context"):
            b.lock()
        assert b.trylock()  # trylock is allowed (shrinkers do it)
        b.unlock()
        other.lock()  # another class is fine
        other.unlock()
        a.unlock()
    a.lock()
    with pytest.raises(errors.LockingError, match="without an acquire context"):
        b.lock()
    a.unlock()


def test_two_contexts_of_one_class_in_one_thread():
    a, b = WwMutex(WD), WwMutex(WD)
    with AcquireContext(WD) as c1, AcquireContext(WD) as c2:
        a.lock(c1)
        with pytest.raises(errors.LockingError, match="another acquire context"):
            b.lock(c2)
        a.unlock()
        b.lock(c2)  # fine once the first holds nothing
        b.unlock()


def test_ctx_lock_of_mutex_this_thread_holds_plainly():
    a = WwMutex(WD)
    a.lock()
    with AcquireContext(WD) as ctx:
        with pytest.raises(errors.LockingError, match="already holds"):
            a.lock(ctx)
    a.unlock()


def test_failed_calls_change_nothing():
    a, b = WwMutex(WD), WwMutex(WW)
    with AcquireContext(WD) as ctx:
        a.lock(ctx)
        before = (ctx.acquired, a.is_locked(), b.is_locked(), thread_lock_state()["held"])
        for call in (lambda: b.lock(ctx), lambda: a.lock(ctx), lambda: a.lock()):
            with pytest.raises(errors.DmaBufError):
                call()
            assert (ctx.acquired, a.is_locked(), b.is_locked(), thread_lock_state()["held"]) == before
        a.unlock()


# ----------------------------------------------------- context lifecycle


def test_context_manager_exit_unlocks_on_exception():
    a = WwMutex(WD)
    with pytest.raises(KeyError):
        with AcquireContext(WD) as ctx:
            a.lock(ctx)
            raise KeyError
    assert not a.is_locked() and ctx.is_finished


def test_context_manager_exit_with_locks_held():
    a = WwMutex(WD)
    with pytest.raises(errors.LockingError, match="still holding"):
        with AcquireContext(WD) as ctx:
            a.lock(ctx)
    assert not a.is_locked() and ctx.is_finished


def test_unfinished_context_warns():
    with pytest.warns(ResourceWarning, match="without fini"):
        ctx = AcquireContext(WD)
        del ctx
        gc.collect()


def test_held_mutex_stays_alive():
    a = WwMutex(WD)
    ref = weakref.ref(a)
    a.lock()
    del a
    gc.collect()
    a = ref()
    assert a is not None and a.is_locked()
    a.unlock()
    del a
    gc.collect()
    assert ref() is None


def test_introspection():
    a = WwMutex(WD)
    assert not a.is_locked() and a.locking_ctx() is None and a.owner_thread is None
    with pytest.raises(errors.LockingError):
        a.assert_held()
    with AcquireContext(WD) as ctx:
        a.lock(ctx)
        assert a.is_locked() and a.locking_ctx() is ctx and a.held_by_current_thread()
        assert a.owner_thread == threading.get_ident() == ctx.thread
        a.assert_held()
        assert ctx.held() == [a] and "stamp" in repr(a) and "1 held" in repr(ctx)
        a.unlock()
    with a:
        assert a.locking_ctx() is None and a.is_locked()
    assert not a.is_locked()


def test_held_lists_the_most_recently_locked_first():
    # The context's held list is newest first, and an unlock takes its
    # mutex out from the middle without disturbing the others' order.
    a, b, c = WwMutex(WD), WwMutex(WD), WwMutex(WD)
    with AcquireContext(WD) as ctx:
        for m in (a, b, c):
            m.lock(ctx)
        assert ctx.held() == [c, b, a]
        b.unlock()
        assert ctx.held() == [c, a] and not b.is_locked()
        b.lock(ctx)
        assert ctx.held() == [b, c, a]
        ctx.unlock_all()
        assert ctx.held() == [] and ctx.acquired == 0


# --------------------------------------------------------------- lock_all


def test_lock_all_duplicates_and_prior_locks():
    a, b, c = WwMutex(WD), WwMutex(WD), WwMutex(WD)
    with AcquireContext(WD) as ctx:
        c.lock(ctx)
        assert ctx.lock_all([a, b, a, c]) == 0
        assert set(ctx.held()) == {a, b, c} and ctx.acquired == 3
        ctx.unlock_all()


def test_lock_all_backs_off_and_keeps_prior_locks():
    a, b, c = WwMutex(WD), WwMutex(WD), WwMutex(WD)
    with injecting_ctx() as ctx:
        c.lock(ctx)
        assert ctx.lock_all([a, b]) >= 1
        assert set(ctx.held()) == {a, b, c}
        ctx.unlock_all()


def test_lock_all_rejects_non_mutexes():
    with AcquireContext(WD) as ctx:
        with pytest.raises(TypeError):
            ctx.lock_all([object()])


def test_lock_all_error_leaves_nothing_held():
    a, b = WwMutex(WD), WwMutex(WW)
    with AcquireContext(WD) as ctx:
        with pytest.raises(errors.LockingError, match="mixing"):
            ctx.lock_all([a, b])
        assert ctx.acquired == 0 and not a.is_locked()


def test_resv_is_a_reservation_class_mutex():
    r = Resv()
    assert r.ww_class is reservation_ww_class
    with AcquireContext(reservation_ww_class) as ctx:
        r.lock(ctx)
        assert r.locking_ctx() is ctx
        r.unlock()


# ----------------------------------------------------------------- stress
#
# stress_inorder / stress_reorder / stress_one of test-ww_mutex.c: every
# worker loops for a while; the only error allowed is a handled EDEADLK.


def stress(cls, nlocks, nthreads, kinds, seconds):
    locks = [WwMutex(cls) for _ in range(nlocks)]
    stop = time.monotonic() + seconds
    counts = {"rounds": 0, "backoffs": 0}
    lock = threading.Lock()

    def dummy_load():
        time.sleep(random.uniform(0.0002, 0.0005))

    def inorder():
        order = random.sample(range(nlocks), nlocks)
        rounds = backoffs = 0
        while time.monotonic() < stop:
            with AcquireContext(cls) as ctx:
                contended = -1
                while True:
                    died = -1
                    held = []
                    for n, idx in enumerate(order):
                        if n == contended:
                            continue
                        try:
                            locks[idx].lock(ctx)
                        except errors.WouldDeadlock:
                            died = n
                            break
                        held.append(idx)
                    if died < 0:
                        dummy_load()
                    if contended >= 0:
                        locks[order[contended]].unlock()
                    for idx in held:
                        locks[idx].unlock()
                    if died < 0:
                        break
                    backoffs += 1
                    contended = died
                    locks[order[contended]].lock_slow(ctx)
                assert ctx.acquired == 0
            rounds += 1
        return rounds, backoffs

    def reorder():
        ll = [locks[i] for i in random.sample(range(nlocks), nlocks)]
        rounds = backoffs = 0
        while time.monotonic() < stop:
            with AcquireContext(cls) as ctx:
                i = 0
                while i < len(ll):
                    if ll[i].locking_ctx() is ctx:
                        i += 1
                        continue
                    try:
                        ll[i].lock(ctx)
                        i += 1
                    except errors.WouldDeadlock:
                        backoffs += 1
                        ctx.unlock_all()
                        ll[i].lock_slow(ctx)
                        ll.insert(0, ll.pop(i))  # list_move to the head
                        i = 0
                dummy_load()
                ctx.unlock_all()
            rounds += 1
        return rounds, backoffs

    def one():
        m = random.choice(locks)
        rounds = 0
        while time.monotonic() < stop:
            m.lock()
            dummy_load()
            m.unlock()
            rounds += 1
        return rounds, 0

    fns = {"inorder": inorder, "reorder": reorder, "one": one}
    workers = [spawn(fns[kinds[i % len(kinds)]]) for i in range(nthreads)]
    for w in workers:
        r, b = w.result(timeout=seconds + 60)
        with lock:
            counts["rounds"] += r
            counts["backoffs"] += b
    assert not any(m.is_locked() for m in locks)
    assert all(r > 0 for r in [counts["rounds"]])
    return counts


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "nlocks,nthreads,kinds",
    [(16, 4, ["inorder"]), (16, 4, ["reorder"]), (64, 6, ["inorder", "reorder", "one"])],
    ids=["inorder", "reorder", "all"],
)
def test_stress(cls, nlocks, nthreads, kinds):
    stress(cls, nlocks, nthreads, kinds, seconds=0.4)


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES)
def test_stress_long(cls):
    """The kernel's big run: 2047 locks, every kind, 2 s."""
    counts = stress(cls, 2047, 6, ["inorder", "reorder", "one"], seconds=2.0)
    assert counts["rounds"] > 0
