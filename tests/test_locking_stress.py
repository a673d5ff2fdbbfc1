"""Stress: N threads lock random subsets of M reservation objects with
acquire contexts, wait for the previous writers, add a fence, update a
counter, unlock and signal.  For wait-die and wound-wait: it must end with
no deadlock, no lost update, nothing left locked and every fence
signalled."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest

from lockhelp import clean_thread, spawn  # noqa: F401  (autouse fixture)
from pydmabuf import (
    AcquireContext,
    Fence,
    Resv,
    Usage,
    WwClass,
    errors,
    fence_context_alloc,
    reservation_ww_class,
)

WOUND_WAIT = WwClass("stress_ww", wait_die=False)


@dataclass
class Stats:
    transactions: int = 0
    backoffs: int = 0
    fences: int = 0
    waits: int = 0
    increments: dict = field(default_factory=dict)


def lock_by_hand(ctx, objs):
    """The design document's first method: a fixed list, remembering the
    contended entry; returns the back-offs."""
    contended = None
    backoffs = 0
    while True:
        try:
            for r in objs:
                if r is not contended:
                    r.lock(ctx)
            return backoffs
        except errors.WouldDeadlock:
            backoffs += 1
            contended = ctx.contending
            ctx.unlock_all()
            contended.lock_slow(ctx)


def run_stress(cls, nthreads, nobjs, seconds, seed=0, inject=False):
    resvs = [Resv(ww_class=cls) for _ in range(nobjs)]
    counters = [0] * nobjs
    stop = time.monotonic() + seconds

    def worker(k):
        rng = random.Random(seed * 1000 + k)
        timeline = fence_context_alloc()
        st = Stats(increments={i: 0 for i in range(nobjs)})
        seqno = 0
        while time.monotonic() < stop:
            subset = rng.sample(range(nobjs), rng.randint(1, min(8, nobjs)))
            objs = [resvs[i] for i in subset]
            seqno += 1
            fence = Fence(timeline, seqno)
            with AcquireContext(cls, inject_deadlocks=inject) as ctx:
                if k % 2:
                    st.backoffs += ctx.lock_all(objs)
                else:
                    st.backoffs += lock_by_hand(ctx, objs)
                ctx.done()
                for i, r in zip(subset, objs):
                    # Waiting for fences while holding reservation locks is
                    # allowed; those fences' owners signal without locks.
                    assert r.wait(Usage.WRITE, 30.0), "a fence was never signalled"
                    st.waits += 1
                    r.reserve_fences(1)
                    r.add_fence(fence, Usage.WRITE)
                    st.fences += 1
                    value = counters[i]
                    if rng.random() < 0.25:
                        time.sleep(0)  # let others run while we hold it
                    counters[i] = value + 1
                    st.increments[i] += 1
                ctx.unlock_all()
            fence.signal()
            st.transactions += 1
        return st

    workers = [spawn(worker, k, name=f"stress-{k}") for k in range(nthreads)]
    stats = [w.result(timeout=seconds + 120) for w in workers]

    for i, r in enumerate(resvs):
        assert counters[i] == sum(s.increments[i] for s in stats), f"lost update on object {i}"
        assert not r.is_locked()
        assert r.test_signaled(Usage.BOOKKEEP)
        assert r.num_fences <= nthreads  # a later fence of a timeline replaces its slot
    total = Stats(
        transactions=sum(s.transactions for s in stats),
        backoffs=sum(s.backoffs for s in stats),
        fences=sum(s.fences for s in stats),
        waits=sum(s.waits for s in stats),
    )
    assert total.transactions > 0
    return total


CLASSES = [pytest.param(reservation_ww_class, id="wait-die"), pytest.param(WOUND_WAIT, id="wound-wait")]


@pytest.mark.parametrize("cls", CLASSES)
def test_stress(cls, record_property):
    total = run_stress(cls, nthreads=6, nobjs=12, seconds=1.5, seed=1)
    record_property("stats", total)
    assert total.backoffs > 0, "no contention: the test exercised nothing"


@pytest.mark.parametrize("cls", CLASSES)
def test_stress_with_injected_deadlocks(cls):
    total = run_stress(cls, nthreads=4, nobjs=8, seconds=0.5, seed=2, inject=True)
    assert total.backoffs > 0


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES)
def test_stress_long(cls, record_property):
    total = run_stress(cls, nthreads=8, nobjs=64, seconds=5.0, seed=3)
    record_property("stats", total)
