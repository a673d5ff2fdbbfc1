"""dma_resv: drivers/dma-buf/st-dma-resv.c in our own words, the slot rules
of dma-resv.c, and a Hypothesis state machine against a plain Python
model of the slot list."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lockhelp import clean_thread, spawn  # noqa: F401  (autouse fixture)
from pydmabuf import (
    AcquireContext,
    Fence,
    FenceArray,
    FenceChain,
    Resv,
    Usage,
    WwClass,
    errors,
    fence_context_alloc,
    reservation_ww_class,
    usage_rw,
)

USAGES = list(Usage)


def mock_fence(ctx=0, seqno=0):
    f = Fence(ctx, seqno)
    f.enable_sw_signaling()
    return f


def locked_with(f, usage):
    """A locked Resv holding ``f`` in the one slot reserved for it."""
    r = Resv()
    r.lock()
    r.reserve_fences(1)
    r.add_fence(f, usage)
    return r


# --------------------------------------------------------- st-dma-resv.c


def test_sanitycheck():
    f = mock_fence()
    f.signal()
    del f
    r = Resv()
    r.lock()
    r.unlock()


@pytest.mark.parametrize("usage", USAGES)
def test_signaling(usage):
    f = mock_fence()
    r = locked_with(f, usage)
    assert not r.test_signaled(usage)
    f.signal()
    assert r.test_signaled(usage)
    r.unlock()


@pytest.mark.parametrize("usage", USAGES)
def test_for_each(usage):
    f = mock_fence()
    r = locked_with(f, usage)
    it = r.iter_fences(usage)
    items = []
    for fence, u in it:
        items.append((fence, u, it.is_restarted))
    assert items == [(f, usage, True)]
    f.signal()
    r.unlock()


@pytest.mark.parametrize("usage", USAGES)
def test_for_each_unlocked(usage):
    f = mock_fence()
    r = locked_with(f, usage)
    r.unlock()
    it = r.iter_fences_unlocked(usage)
    seen = []
    for fence, u in it:
        assert it.is_restarted, "no restart flag"
        assert fence is f and u == usage
        seen.append(fence)
        if len(seen) == 1:
            it._invalidate()  # the selftest corrupts its cursor: a restart
    assert seen == [f, f]
    f.signal()


@pytest.mark.parametrize("usage", USAGES)
def test_get_fences(usage):
    f = mock_fence()
    r = locked_with(f, usage)
    r.unlock()
    assert r.get_fences(usage) == [f]
    f.signal()
    assert r.get_fences(usage) == []


# -------------------------------------------------------------- locking


def test_resv_locking_api():
    r = Resv()
    assert r.ww_class is reservation_ww_class
    assert not r.is_locked() and r.locking_ctx() is None
    assert r.trylock()
    assert r.is_locked() and r.held_by_current_thread()
    r.assert_held()
    r.unlock()
    with AcquireContext(reservation_ww_class) as ctx:
        r.lock(ctx)
        assert r.locking_ctx() is ctx
        r.unlock()
        r.lock_interruptible(ctx)
        r.unlock()
    with r:
        assert r.held_by_current_thread()


def test_writers_need_the_lock():
    r = Resv()
    f = mock_fence()
    for call in (
        lambda: r.reserve_fences(1),
        lambda: r.add_fence(f, Usage.WRITE),
        lambda: r.replace_fences(0, f, Usage.WRITE),
        lambda: r.copy_fences(Resv()),
        lambda: list(r.iter_fences()),
        lambda: r.describe(),
    ):
        with pytest.raises(errors.LockingError, match="locked by this thread"):
            call()
    holder = threading.Event()
    release = threading.Event()

    def hold():
        with r:
            holder.set()
            release.wait()

    w = spawn(hold)
    holder.wait()
    with pytest.raises(errors.LockingError):
        r.reserve_fences(1)  # locked, but not by this thread
    release.set()
    w.result()


def test_reserve_sizes_follow_the_allocator():
    r = Resv()
    with r:
        assert r.max_fences == 0
        r.reserve_fences(1)  # max(4, 1) = 4 slots -> 56 bytes -> 64 -> 5
        assert r.max_fences == 5
        r.reserve_fences(5)  # 0 + 5 <= 5: nothing
        assert r.max_fences == 5
        for i in range(5):
            r.add_fence(mock_fence(fence_context_alloc(), 1), Usage.READ)
        r.reserve_fences(1)  # max(6, 10) -> 104 bytes -> 128 -> 13
        assert (r.num_fences, r.max_fences) == (5, 13)
        r.reserve_fences(100)  # max(105, 26) -> 864 -> 1024 -> 125
        assert r.max_fences == 125
    r2 = Resv()
    with r2:
        r2.reserve_fences(5)  # next power of two 8 -> 88 -> 96 -> 9
        assert r2.max_fences == 9
        with pytest.raises(errors.InvalidArgument):
            r2.reserve_fences(0)
        with pytest.raises(errors.InvalidArgument):
            r2.reserve_fences(-1)
        with pytest.raises(errors.OutOfMemory):
            r2.reserve_fences(2**32)
        assert r2.max_fences == 9


def test_reservations_end_at_unlock():
    r = Resv()
    with r:
        r.reserve_fences(3)
        r.add_fence(mock_fence(fence_context_alloc(), 1), Usage.WRITE)
    assert (r.num_fences, r.max_fences) == (1, 1)
    with r:
        with pytest.raises(errors.LockingError, match="without a reserved slot"):
            r.add_fence(mock_fence(fence_context_alloc(), 1), Usage.WRITE)
        assert r.num_fences == 1
        r.reserve_fences(1)
        r.add_fence(mock_fence(fence_context_alloc(), 1), Usage.WRITE)
    assert r.num_fences == 2


def test_add_without_ever_reserving():
    r = Resv()
    with r:
        with pytest.raises(errors.LockingError, match="reserved slot"):
            r.add_fence(mock_fence(), Usage.KERNEL)


# ----------------------------------------------------------- slot rules


def resv_with(*items):
    r = Resv()
    with r:
        r.reserve_fences(len(items) + 4)
        for f, u in items:
            r.add_fence(f, u)
    return r


def slots(r):
    with r:
        return [(f, u) for f, u in r.iter_fences()]


def test_later_fence_of_same_context_replaces():
    ctx = fence_context_alloc()
    a, b = mock_fence(ctx, 1), mock_fence(ctx, 2)
    r = resv_with((a, Usage.WRITE), (b, Usage.WRITE))
    assert slots(r) == [(b, Usage.WRITE)]


def test_same_fence_twice_replaces_itself():
    a = mock_fence(fence_context_alloc(), 1)
    r = resv_with((a, Usage.READ), (a, Usage.READ))
    assert slots(r) == [(a, Usage.READ)]


def test_older_fence_appends():
    ctx = fence_context_alloc()
    a, b = mock_fence(ctx, 2), mock_fence(ctx, 1)
    r = resv_with((a, Usage.WRITE), (b, Usage.WRITE))
    assert slots(r) == [(a, Usage.WRITE), (b, Usage.WRITE)]


def test_promotion_replaces_but_degradation_appends():
    ctx = fence_context_alloc()
    a = mock_fence(ctx, 1)
    r = resv_with((a, Usage.BOOKKEEP), (a, Usage.READ))
    assert slots(r) == [(a, Usage.READ)]
    r = resv_with((a, Usage.WRITE), (a, Usage.READ))
    assert slots(r) == [(a, Usage.WRITE), (a, Usage.READ)]


def test_signalled_slot_is_recycled():
    a, b = mock_fence(fence_context_alloc(), 1), mock_fence(fence_context_alloc(), 1)
    r = resv_with((a, Usage.KERNEL))
    a.signal()
    with r:
        r.reserve_fences(1)
        r.add_fence(b, Usage.BOOKKEEP)
    assert slots(r) == [(b, Usage.BOOKKEEP)]


def test_replacement_uses_the_32bit_wrap():
    ctx = fence_context_alloc()
    a, b = mock_fence(ctx, 0xFFFFFFFF), mock_fence(ctx, 0x1_0000_0000)
    r = resv_with((a, Usage.WRITE), (b, Usage.WRITE))
    assert slots(r) == [(b, Usage.WRITE)]


def test_containers_are_refused():
    f = mock_fence(fence_context_alloc(), 1)
    r = Resv()
    with r:
        r.reserve_fences(2)
        for c in (FenceArray([f]), FenceChain(None, f, 1)):
            with pytest.raises(errors.InvalidArgument, match="container"):
                r.add_fence(c, Usage.WRITE)
        with pytest.raises(errors.InvalidArgument):
            r.add_fence(f, 4)
        with pytest.raises(TypeError):
            r.add_fence(f, "write")
        assert r.num_fences == 0


def test_reserve_drops_signalled_fences():
    fs = [mock_fence(fence_context_alloc(), 1) for _ in range(5)]
    r = resv_with(*[(f, Usage.READ) for f in fs])
    fs[1].signal()
    fs[3].signal()
    with r:
        r.reserve_fences(r.max_fences)  # forces a new list
        assert [f for f, u in r.iter_fences()] == [fs[0], fs[2], fs[4]]


def test_replace_fences():
    ctx = fence_context_alloc()
    a, b, other = mock_fence(ctx, 1), mock_fence(ctx, 2), mock_fence(fence_context_alloc(), 1)
    r = resv_with((a, Usage.WRITE), (other, Usage.READ))
    with r:
        r.reserve_fences(1)
        r.add_fence(b, Usage.BOOKKEEP)  # a less important usage: appends
        pt = mock_fence(fence_context_alloc(), 1)
        r.replace_fences(ctx, pt, Usage.KERNEL)
    assert slots(r) == [(pt, Usage.KERNEL), (other, Usage.READ), (pt, Usage.KERNEL)]


def test_copy_fences():
    a, b, c = (mock_fence(fence_context_alloc(), 1) for _ in range(3))
    src = resv_with((a, Usage.WRITE), (b, Usage.BOOKKEEP), (c, Usage.READ))
    b.signal()
    dst = resv_with((mock_fence(fence_context_alloc(), 1), Usage.KERNEL))
    with dst:
        dst.copy_fences(src)
        assert [(f, u) for f, u in dst.iter_fences()] == [(a, Usage.WRITE), (c, Usage.READ)]
        assert dst.max_fences == 5  # a list sized for src's 3 slots
    empty = Resv()
    with dst:
        dst.copy_fences(empty)
        assert dst.num_fences == 0 and dst.max_fences == 0


def test_get_singleton():
    r = Resv()
    assert r.get_singleton() is None
    a, b = mock_fence(fence_context_alloc(), 1), mock_fence(fence_context_alloc(), 1)
    r = resv_with((a, Usage.WRITE))
    assert r.get_singleton() is a
    r = resv_with((a, Usage.WRITE), (b, Usage.READ))
    s = r.get_singleton(Usage.READ)
    assert isinstance(s, FenceArray) and s.fences == (a, b) and s.seqno == 1
    assert r.get_singleton(Usage.WRITE) is a
    a.signal()
    b.signal()
    assert s.is_signaled()


def test_usage_filter_and_order():
    fs = {u: mock_fence(fence_context_alloc(), 1) for u in USAGES}
    r = resv_with(*[(fs[u], u) for u in reversed(USAGES)])
    for u in USAGES:
        assert r.get_fences(u) == [fs[v] for v in reversed(USAGES) if v <= u]
        assert not r.test_signaled(u)
    fs[Usage.KERNEL].signal()
    assert r.test_signaled(Usage.KERNEL) and not r.test_signaled(Usage.WRITE)


def test_usage_rw():
    assert usage_rw(True) == Usage.READ and usage_rw(False) == Usage.WRITE


def test_wait():
    a, b = mock_fence(fence_context_alloc(), 1), mock_fence(fence_context_alloc(), 1)
    r = resv_with((a, Usage.WRITE), (b, Usage.READ))
    assert r.wait(Usage.READ, 0) is False
    assert r.wait(Usage.READ, 0.01) is False
    a.signal()
    assert r.wait(Usage.WRITE, 0) is True
    threading.Timer(0.01, b.signal).start()
    assert r.wait(Usage.READ, 5.0) is True
    assert Resv().wait() is True
    with pytest.raises(errors.InvalidArgument):
        r.wait(Usage.READ, -1)


def test_wait_with_lock_held():
    a = mock_fence(fence_context_alloc(), 1)
    r = resv_with((a, Usage.WRITE))
    with r:
        threading.Timer(0.01, a.signal).start()
        assert r.wait(Usage.WRITE, 5.0)


def test_set_deadline():
    class D(Fence):
        hints: list

        def set_deadline(self, d):
            self.hints.append(d)

    a = D(fence_context_alloc(), 1)
    a.hints = []
    r = resv_with((a, Usage.WRITE))
    r.set_deadline(Usage.KERNEL, 5)
    r.set_deadline(Usage.WRITE, 6)
    assert a.hints == [6]
    a.signal()


def test_describe_and_repr():
    a, b = mock_fence(fence_context_alloc(), 3), mock_fence(fence_context_alloc(), 4)
    r = resv_with((a, Usage.WRITE), (b, Usage.BOOKKEEP))
    with r:
        assert r.describe() == "\twrite fence: pydmabuf unbound seq 3 unsignalled"
    assert "2 fence(s)" in repr(r)


def test_unlocked_walk_restarts_when_the_list_is_replaced():
    fs = [mock_fence(fence_context_alloc(), 1) for _ in range(3)]
    r = resv_with(*[(f, Usage.READ) for f in fs])
    it = r.iter_fences_unlocked()
    first = next(it)
    assert first[0] is fs[0] and it.is_restarted
    assert next(it)[0] is fs[1] and not it.is_restarted
    with r:
        r.reserve_fences(r.max_fences)  # a new list
    again = next(it)
    assert again[0] is fs[0] and it.is_restarted


def test_wound_wait_resv_extension():
    ww = WwClass("resv_ww", wait_die=False)
    r = Resv(ww_class=ww)
    with AcquireContext(ww) as ctx:
        r.lock(ctx)
        r.unlock()


def test_fences_are_released():
    import gc
    import weakref

    a = mock_fence(fence_context_alloc(), 1)
    ref = weakref.ref(a)
    r = resv_with((a, Usage.WRITE))
    del a
    gc.collect()
    assert ref() is not None
    del r
    gc.collect()
    assert ref() is None


def test_concurrent_readers_and_writer():
    r = Resv()
    stop = time.monotonic() + 0.3
    ctx = fence_context_alloc()

    def writer():
        seq = 0
        while time.monotonic() < stop:
            with r:
                r.reserve_fences(2)
                seq += 1
                f = Fence(ctx, seq)
                r.add_fence(f, Usage.WRITE)
                r.add_fence(Fence(fence_context_alloc(), 1), Usage.BOOKKEEP)
            f.signal()
        return seq

    def reader():
        n = 0
        while time.monotonic() < stop:
            for f in r.get_fences():
                assert isinstance(f, Fence)
            r.test_signaled(Usage.WRITE)
            n += 1
        return n

    ws = [spawn(writer), spawn(reader), spawn(reader)]
    assert all(w.result() > 0 for w in ws)


# ------------------------------------------------- the model state machine


def lo_later(a_seq, b_seq, a64):
    """__dma_fence_is_later() of the model, written plainly."""
    if a64:
        return a_seq > b_seq
    d = (a_seq - b_seq) & 0xFFFFFFFF
    return 0 < d < 0x80000000


def bucket_max(slots_wanted):
    size = 24 + 8 * slots_wanted
    for b in (8, 16, 32, 64, 96, 128, 192):
        if size <= b:
            return (b - 24) // 8
    b = 256
    while b < size:
        b *= 2
    return (b - 24) // 8


class ModelFence:
    def __init__(self, fence, ctx, seqno, seqno64):
        self.fence, self.ctx, self.seqno, self.seqno64 = fence, ctx, seqno, seqno64
        self.signalled = False


SEQNOS = st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1_0000_0000, 2**64 - 1])


class ResvMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ctxs = [fence_context_alloc() for _ in range(3)]
        self.resv = Resv()
        self.resv.lock()
        self.locked = True
        self.slots = []  # [(ModelFence, usage)]
        self.max = 0
        self.fences = []
        self.src = Resv()
        self.src_slots = []

    def teardown(self):
        if self.locked:
            self.resv.unlock()

    @rule(c=st.integers(0, 2), seqno=SEQNOS, seqno64=st.booleans())
    def new_fence(self, c, seqno, seqno64):
        f = Fence(self.ctxs[c], seqno, seqno64=seqno64)
        self.fences.append(ModelFence(f, self.ctxs[c], seqno, seqno64))

    @precondition(lambda self: self.locked)
    @rule()
    def unlock(self):
        self.resv.unlock()
        self.locked = False
        self.max = len(self.slots)

    @precondition(lambda self: not self.locked)
    @rule()
    def lock(self):
        self.resv.lock()
        self.locked = True

    @precondition(lambda self: self.locked)
    @rule(n=st.integers(1, 9))
    def reserve(self, n):
        self.resv.reserve_fences(n)
        num = len(self.slots)
        if self.max and num + n <= self.max:
            return
        want = max(num + n, 2 * self.max) if self.max else max(4, 1 << (n - 1).bit_length())
        self.max = bucket_max(want)
        self.slots = [(mf, u) for mf, u in self.slots if not mf.signalled]

    @precondition(lambda self: self.locked and self.fences)
    @rule(i=st.integers(0, 1000), usage=st.sampled_from(USAGES))
    def add(self, i, usage):
        mf = self.fences[i % len(self.fences)]
        for k, (old, ou) in enumerate(self.slots):
            same = old.ctx == mf.ctx and ou >= usage and (
                old is mf or lo_later(mf.seqno, old.seqno, mf.seqno64)
            )
            if same or old.signalled:
                self.resv.add_fence(mf.fence, usage)
                self.slots[k] = (mf, usage)
                return
        if len(self.slots) >= self.max:
            with pytest.raises(errors.LockingError):
                self.resv.add_fence(mf.fence, usage)
            return
        self.resv.add_fence(mf.fence, usage)
        self.slots.append((mf, usage))

    @precondition(lambda self: self.fences)
    @rule(i=st.integers(0, 1000))
    def signal(self, i):
        mf = self.fences[i % len(self.fences)]
        assert mf.fence.check_and_signal() is mf.signalled
        mf.signalled = True

    @precondition(lambda self: self.locked and self.fences)
    @rule(c=st.integers(0, 2), i=st.integers(0, 1000), usage=st.sampled_from(USAGES))
    def replace(self, c, i, usage):
        mf = self.fences[i % len(self.fences)]
        self.resv.replace_fences(self.ctxs[c], mf.fence, usage)
        self.slots = [((mf, usage) if old.ctx == self.ctxs[c] else (old, u)) for old, u in self.slots]

    @precondition(lambda self: self.fences)
    @rule(i=st.integers(0, 1000), usage=st.sampled_from(USAGES))
    def add_to_src(self, i, usage):
        # A second reservation lock while holding the first: only a
        # trylock is allowed without an acquire context.
        mf = self.fences[i % len(self.fences)]
        assert self.src.trylock()
        self.src.reserve_fences(1)
        self.src.add_fence(mf.fence, usage)
        self.src_slots = [(f, u) for f, u in self.src.iter_fences()]
        self.src.unlock()

    @precondition(lambda self: self.locked)
    @rule()
    def copy(self):
        by_fence = {id(mf.fence): mf for mf in self.fences}
        src = [(by_fence[id(f)], u) for f, u in self.src_slots]
        self.resv.copy_fences(self.src)
        self.slots = [(mf, u) for mf, u in src if not mf.signalled]
        self.max = bucket_max(len(src)) if self.slots else 0

    @invariant()
    def matches_model(self):
        assert self.resv.num_fences == len(self.slots)
        assert self.resv.max_fences == self.max
        for u in USAGES:
            want = [mf.fence for mf, v in self.slots if v <= u and not mf.signalled]
            assert self.resv.get_fences(u) == want
            assert self.resv.test_signaled(u) == (not want)
        if self.locked:
            got = [(f, v) for f, v in self.resv.iter_fences()]
            assert got == [(mf.fence, v) for mf, v in self.slots]


TestResvMachine = ResvMachine.TestCase


def test_wait_on_an_empty_resv_checks_its_arguments_first():
    """An empty list returns at once, but only after the arguments a full
    one would refuse are refused."""
    r = Resv()
    with pytest.raises(errors.InvalidArgument):
        r.wait(Usage.READ, -1)
    with pytest.raises((ValueError, errors.DmaBufError)):
        r.wait(99)
    with pytest.raises(TypeError):
        r.wait(Usage.READ, "soon")
    assert r.wait(Usage.KERNEL, 0, interruptible=True) is True
