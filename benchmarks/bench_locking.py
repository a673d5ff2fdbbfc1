"""Reservation locking and fences against the threading primitives doing
the comparable work, in the same run.

Each benchmark times a loop of ``LOOP`` operations; ``extra_info`` holds
ns per operation and, where there is a reference, the ratio to it
measured in the same test (min of several timeit repeats on both sides).

    PYTHONPATH=src python -m pytest benchmarks/bench_locking.py --benchmark-only
"""

from __future__ import annotations

import threading
import timeit

import pytest
from benchutil import min_ns

from pydmabuf import (
    AcquireContext,
    Fence,
    Resv,
    Usage,
    WwMutex,
    fence_context_alloc,
    reservation_ww_class,
)

LOOP = 1000


def ns_per_op(fn, loops=LOOP, repeat=7):
    return min(timeit.repeat(fn, number=1, repeat=repeat)) / loops * 1e9


def record(benchmark, fn, reference=None, loops=LOOP):
    benchmark(fn)
    ns = min_ns(benchmark, loops, "mean")
    benchmark.extra_info["ns_per_op"] = round(ns, 1)
    if reference is not None:
        mine, ref = ns_per_op(fn, loops), ns_per_op(reference, loops)
        benchmark.extra_info["ref_ns_per_op"] = round(ref, 1)
        benchmark.extra_info["ratio_vs_ref"] = round(mine / ref, 3)


# ------------------------------------------------------------- uncontended


def rlock_loop():
    lk = threading.RLock()
    acquire, release = lk.acquire, lk.release

    def run():
        for _ in range(LOOP):
            acquire()
            release()

    return run


@pytest.mark.benchmark(group="uncontended lock+unlock")
def test_resv_lock_unlock(benchmark):
    r = Resv()

    def run():
        lock, unlock = r.lock, r.unlock
        for _ in range(LOOP):
            lock()
            unlock()

    record(benchmark, run, rlock_loop())


@pytest.mark.benchmark(group="uncontended lock+unlock")
def test_resv_lock_unlock_with_ctx(benchmark):
    r = Resv()
    ctx = AcquireContext(reservation_ww_class)

    def run():
        lock, unlock = r.lock, r.unlock
        for _ in range(LOOP):
            lock(ctx)
            unlock()

    record(benchmark, run, rlock_loop())
    ctx.fini()


@pytest.mark.benchmark(group="uncontended lock+unlock")
def test_wwmutex_lock_unlock(benchmark):
    m = WwMutex(reservation_ww_class)

    def run():
        lock, unlock = m.lock, m.unlock
        for _ in range(LOOP):
            lock()
            unlock()

    record(benchmark, run, rlock_loop())


@pytest.mark.benchmark(group="uncontended lock+unlock")
def test_ref_rlock(benchmark):
    record(benchmark, rlock_loop())


@pytest.mark.benchmark(group="uncontended lock+unlock")
def test_ref_lock(benchmark):
    lk = threading.Lock()

    def run():
        acquire, release = lk.acquire, lk.release
        for _ in range(LOOP):
            acquire()
            release()

    record(benchmark, run)


# ------------------------------------------------ many objects, one context


def locks_loop(n, rounds):
    locks = [threading.Lock() for _ in range(n)]

    def run():
        for _ in range(rounds):
            for lk in locks:
                lk.acquire()
            for lk in locks:
                lk.release()

    return run


@pytest.mark.parametrize("n", [2, 8, 64])
@pytest.mark.benchmark(group="lock n objects with one context")
def test_lock_all(benchmark, n):
    objs = [Resv() for _ in range(n)]
    rounds = max(1, LOOP // n)

    def run():
        for _ in range(rounds):
            with AcquireContext(reservation_ww_class) as ctx:
                ctx.lock_all(objs)
                ctx.unlock_all()

    record(benchmark, run, locks_loop(n, rounds), loops=rounds * n)


@pytest.mark.parametrize("n", [2, 8, 64])
@pytest.mark.benchmark(group="lock n objects with one context")
def test_lock_each(benchmark, n):
    objs = [Resv() for _ in range(n)]
    rounds = max(1, LOOP // n)

    def run():
        for _ in range(rounds):
            ctx = AcquireContext(reservation_ww_class)
            for r in objs:
                r.lock(ctx)
            for r in objs:
                r.unlock()
            ctx.fini()

    record(benchmark, run, locks_loop(n, rounds), loops=rounds * n)


@pytest.mark.parametrize("n", [2, 8, 64])
@pytest.mark.benchmark(group="lock n objects with one context")
def test_ref_threading_locks(benchmark, n):
    rounds = max(1, LOOP // n)
    record(benchmark, locks_loop(n, rounds), loops=rounds * n)


# --------------------------------------------------- signal with callbacks


def noop(_):
    pass


def event_loop(k):
    """The comparable Python work: an Event set after which k callbacks run."""

    def run():
        for _ in range(LOOP):
            ev = threading.Event()
            cbs = []
            for _ in range(k):
                cbs.append(noop)
            ev.set()
            for cb in cbs:
                cb(ev)

    return run


@pytest.mark.parametrize("k", [0, 1, 8])
@pytest.mark.benchmark(group="fence create + k callbacks + signal")
def test_fence_signal(benchmark, k):
    ctx = fence_context_alloc()

    def run():
        for i in range(LOOP):
            f = Fence(ctx, i)
            add = f.add_callback
            for _ in range(k):
                add(noop)
            f.signal()

    record(benchmark, run, event_loop(k))


@pytest.mark.parametrize("k", [0, 1, 8])
@pytest.mark.benchmark(group="fence create + k callbacks + signal")
def test_ref_event(benchmark, k):
    record(benchmark, event_loop(k))


@pytest.mark.benchmark(group="wait on a done fence")
def test_fence_wait_signalled(benchmark):
    f = Fence(fence_context_alloc(), 1)
    f.signal()
    ev = threading.Event()
    ev.set()

    def run():
        w = f.wait
        for _ in range(LOOP):
            w()

    def ref():
        w = ev.wait
        for _ in range(LOOP):
            w()

    record(benchmark, run, ref)


# ------------------------------------------------- add_fence and iteration

NFENCES = 16


def list_loop():
    """The comparable Python work: under a Lock, a list of (fence, usage)
    slots with replacement by context, then a filtered walk."""
    lk = threading.Lock()
    fences = [(i, Usage.WRITE) for i in range(NFENCES)]

    def run():
        for _ in range(LOOP // NFENCES):
            slots = []
            with lk:
                for f, u in fences:
                    for j, (g, v) in enumerate(slots):
                        if g == f and v >= u:
                            slots[j] = (f, u)
                            break
                    else:
                        slots.append((f, u))
            out = [g for g, v in slots if v <= Usage.READ]
            assert len(out) == NFENCES

    return run


@pytest.mark.benchmark(group="reserve + add 16 fences + get_fences")
def test_add_fence_and_iterate(benchmark):
    fences = [Fence(fence_context_alloc(), 1) for _ in range(NFENCES)]

    def run():
        for _ in range(LOOP // NFENCES):
            r = Resv()
            r.lock()
            r.reserve_fences(NFENCES)
            for f in fences:
                r.add_fence(f, Usage.WRITE)
            r.unlock()
            assert len(r.get_fences(Usage.READ)) == NFENCES

    record(benchmark, run, list_loop())


@pytest.mark.benchmark(group="reserve + add 16 fences + get_fences")
def test_iterate_locked(benchmark):
    fences = [Fence(fence_context_alloc(), 1) for _ in range(NFENCES)]
    r = Resv()
    with r:
        r.reserve_fences(NFENCES)
        for f in fences:
            r.add_fence(f, Usage.WRITE)

    def run():
        for _ in range(LOOP // NFENCES):
            with r:
                n = 0
                for f, u in r.iter_fences(Usage.READ):
                    n += 1
                assert n == NFENCES

    record(benchmark, run, list_loop())


@pytest.mark.benchmark(group="reserve + add 16 fences + get_fences")
def test_ref_python_list(benchmark):
    record(benchmark, list_loop())
