"""Fence containers: drivers/dma-buf/st-dma-fence-chain.c and
st-dma-fence-unwrap.c in our own words, and dma_fence_array's rules."""

from __future__ import annotations

import errno
import random
import threading
import time

import pytest

from lockhelp import clean_thread, spawn  # noqa: F401  (autouse fixture)
from pydmabuf import (
    Fence,
    FenceArray,
    FenceChain,
    errors,
    fence_chain_contained,
    fence_chain_find_seqno,
    fence_context_alloc,
    fence_merge,
    fence_unwrap,
    get_stub_fence,
)

CHAIN_SZ = 512  # the kernel's 4096 runs in the slow tests


def mock_fence(ctx=0, seqno=0):
    return Fence(ctx, seqno)


class Chains:
    """fence_chains_init(): ``count`` fences and a chain over them, every
    node with signalling enabled."""

    def __init__(self, count, seqno_fn=lambda i: i + 1):
        self.fences, self.chains = [], []
        tail = None
        for i in range(count):
            f = mock_fence()
            tail = FenceChain(tail, f, seqno_fn(i))
            tail.enable_sw_signaling()
            self.fences.append(f)
            self.chains.append(tail)
        self.tail = tail

    def fini(self):
        for f in self.fences:
            f.check_and_signal()


# ------------------------------------------------------------------ chains


def test_chain_sanitycheck():
    f = mock_fence()
    chain = FenceChain(None, f, 1)
    chain.enable_sw_signaling()
    f.signal()
    assert chain.is_signaled()


def test_chain_context_rules():
    a = FenceChain(None, mock_fence(), 1)
    b = FenceChain(a, mock_fence(), 5)
    assert b.context == a.context and b.prev_seqno == 1 and b.seqno == 5 and b.seqno64
    c = FenceChain(b, mock_fence(), 3)  # not later: new timeline, seqno raised
    assert c.context != b.context and c.prev_seqno == 0 and c.seqno == 5
    plain = mock_fence(fence_context_alloc(), 9)
    d = FenceChain(plain, mock_fence(), 2)  # prev not a chain: new context
    assert d.context != plain.context and d.seqno == 2 and d.prev_seqno == 0
    assert d.prev is plain and d.fence is not plain
    assert fence_chain_contained(d) is d.fence and fence_chain_contained(plain) is plain
    with pytest.raises(errors.InvalidArgument, match="chain node"):
        FenceChain(None, a, 1)
    with pytest.raises(TypeError):
        FenceChain(3, mock_fence(), 1)
    assert a.get_driver_name() == "dma_fence_chain" and a.get_timeline_name() == "unbound"


def test_find_seqno():
    fc = Chains(64)
    assert fc.tail.find_seqno(0) is fc.tail
    for i in range(64):
        assert fc.tail.find_seqno(i + 1) is fc.chains[i]
        assert fc.chains[i].find_seqno(i + 1) is fc.chains[i]
        with pytest.raises(errors.InvalidArgument):
            fc.chains[i].find_seqno(i + 2)
        found = fc.chains[i].find_seqno(i)
        if i > 0:
            assert found is fc.chains[i - 1]
    fc.fini()


def test_find_seqno_module_form():
    f = mock_fence()
    assert fence_chain_find_seqno(f, 0) is f
    with pytest.raises(errors.InvalidArgument):
        fence_chain_find_seqno(f, 1)
    c = FenceChain(None, f, 1)
    assert fence_chain_find_seqno(c, 1) is c
    f.signal()


def test_find_signaled():
    fc = Chains(2)
    fc.fences[0].signal()
    found = fc.tail.find_seqno(1)
    assert found is None or found is fc.chains[0]
    fc.fini()


def test_find_out_of_order():
    """Signalling the middle of 1-2-3 still leaves point 1 to wait for;
    point 2 is dropped from the links on the way."""
    fc = Chains(3)
    fc.fences[1].signal()
    assert fc.tail.find_seqno(2) is fc.chains[0]
    assert fc.tail.prev is fc.chains[0]  # garbage-collected link
    fc.fini()


def test_find_gap():
    fc = Chains(64, lambda i: 2 * i + 2)
    for i in range(64):
        assert fc.tail.find_seqno(2 * i + 1) is fc.chains[i]
        assert fc.chains[i].find_seqno(2 * i + 2) is fc.chains[i]
    fc.fini()


def test_find_race():
    fc = Chains(CHAIN_SZ)
    stop = time.monotonic() + 0.5
    n = len(fc.chains)

    def run():
        cycles = 0
        while time.monotonic() < stop:
            seqno = random.randint(1, n)
            fence = fc.tail.find_seqno(seqno)
            if fence is not None and fence.seqno == seqno:
                assert fence.find_seqno(seqno) is fence
            fc.fences[random.randrange(n - 1)].check_and_signal()
            cycles += 1
        return cycles

    workers = [spawn(run) for _ in range(2)]
    assert sum(w.result() for w in workers) > 0
    fc.fini()


def test_signal_forward():
    fc = Chains(64)
    for i in range(64):
        fc.fences[i].signal()
        assert fc.chains[i].is_signaled()
        if i + 1 < 64:
            assert not fc.chains[i + 1].is_signaled()
    fc.fini()


def test_signal_backward():
    fc = Chains(64)
    for i in reversed(range(64)):
        fc.fences[i].signal()
        if i > 0:
            assert not fc.chains[i].is_signaled()
    assert all(c.is_signaled() for c in fc.chains)
    fc.fini()


def wait_tail(fc, order):
    waiter = spawn(fc.tail.wait, 60.0)
    time.sleep(0.001)
    for i in order:
        fc.fences[i].signal()
    assert waiter.result() is True
    assert all(c.is_signaled() for c in fc.chains)


@pytest.mark.parametrize("how", ["forward", "backward", "random"])
def test_wait(how):
    fc = Chains(CHAIN_SZ)
    order = list(range(CHAIN_SZ))
    if how == "backward":
        order.reverse()
    elif how == "random":
        random.shuffle(order)
    wait_tail(fc, order)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["forward", "backward", "random"])
def test_wait_kernel_size(how):
    fc = Chains(4096)
    order = list(range(4096))
    if how == "backward":
        order.reverse()
    elif how == "random":
        random.shuffle(order)
    wait_tail(fc, order)


def test_chain_walk_and_iteration():
    fc = Chains(4)
    assert list(fc.tail) == list(reversed(fc.chains))
    fc.fences[1].signal()
    fc.fences[2].signal()
    assert list(fc.tail) == [fc.chains[3], fc.chains[0]]
    assert fc.chains[3].walk() is fc.chains[0]
    fc.fences[0].signal()
    assert fc.chains[3].walk() is None
    fc.fini()


def test_chain_callback_fires_once_all_points_signalled():
    fc = Chains(3)
    seen = []
    fc.tail.add_callback(seen.append)
    fc.fences[2].signal()
    fc.fences[0].signal()
    assert seen == []
    fc.fences[1].signal()
    assert seen == [fc.tail]


def test_chain_set_deadline_forwards():
    class D(Fence):
        def __init__(self):
            super().__init__(0, 0)
            self.hint = []

        def set_deadline(self, d):
            self.hint.append(d)

    a, b = D(), D()
    c = FenceChain(FenceChain(None, a, 1), b, 2)
    c.set_deadline_hint(77)
    assert a.hint == [77] and b.hint == [77]
    a.signal()
    b.signal()


def test_long_chain_is_freed_without_recursion():
    tail = None
    for i in range(50_000):
        tail = FenceChain(tail, get_stub_fence(), i + 1)
    del tail


# ------------------------------------------------------------------ arrays


def test_array_all():
    fs = [mock_fence() for _ in range(3)]
    a = FenceArray(fs)
    assert a.fences == tuple(fs) and len(a) == 3 and list(a) == fs and a.seqno == 1
    assert a.get_driver_name() == "dma_fence_array"
    seen = []
    a.add_callback(seen.append)
    fs[0].signal()
    fs[2].signal()
    assert not a.is_signaled() and seen == []
    fs[1].signal()
    assert a.is_signaled() and seen == [a] and a.error == 0


def test_array_any():
    fs = [mock_fence() for _ in range(3)]
    a = FenceArray(fs, signal_on_any=True)
    assert a.signal_on_any
    w = spawn(a.wait, 5.0)
    time.sleep(0.005)
    fs[1].signal()
    assert w.result() is True
    fs[0].signal()  # later members do not signal it again
    fs[2].signal()


def test_array_error_is_the_first_member_error():
    fs = [mock_fence() for _ in range(3)]
    a = FenceArray(fs)
    a.enable_sw_signaling()
    fs[0].signal()
    fs[1].set_error(-errno.EIO)
    fs[1].signal()
    fs[2].set_error(-errno.ENODATA)
    fs[2].signal()
    assert a.is_signaled() and a.error == -errno.EIO and a.status == -errno.EIO


def test_array_over_signalled_members():
    fs = [mock_fence() for _ in range(2)]
    fs[0].set_error(-errno.ECANCELED)
    for f in fs:
        f.signal()
    a = FenceArray(fs)
    with pytest.raises(errors.NotFound):  # enabling finds it done
        a.add_callback(lambda x: None)
    assert a.error == -errno.ECANCELED


def test_array_peek_without_enabling():
    fs = [mock_fence() for _ in range(2)]
    a = FenceArray(fs)
    fs[0].signal()
    assert not a.is_signaled()
    fs[1].signal()
    assert a.is_signaled() and not a.sw_signaling_enabled


def test_array_rules():
    with pytest.raises(errors.InvalidArgument):
        FenceArray([])
    f = mock_fence()
    with pytest.raises(errors.InvalidArgument, match="container"):
        FenceArray([FenceArray([f])])
    with pytest.raises(errors.InvalidArgument, match="container"):
        FenceArray([FenceChain(None, f, 1)])
    with pytest.raises(TypeError):
        FenceArray([1])
    a = FenceArray([f], context=7, seqno=9)
    assert (a.context, a.seqno) == (7, 9)
    ctx = fence_context_alloc()
    b = FenceArray([Fence(ctx, 1), Fence(ctx, 2)])
    assert b.match_context(ctx) and not b.match_context(ctx + 1)


# ------------------------------------------------------- unwrap and merge


def fresh(seqno=1):
    return Fence(fence_context_alloc(), seqno)


def test_unwrap_sanitycheck():
    f = fresh()
    chain = FenceChain(None, FenceArray([f]), 1)
    assert fence_unwrap(chain) == [f]


def test_unwrap_array():
    f1, f2 = fresh(), fresh()
    assert fence_unwrap(FenceArray([f1, f2])) == [f1, f2]


def test_unwrap_chain():
    f1, f2 = fresh(), fresh()
    assert fence_unwrap(FenceChain(f1, f2, 1)) == [f2, f1]


def test_unwrap_chain_array():
    f1, f2 = fresh(), fresh()
    assert fence_unwrap(FenceChain(None, FenceArray([f1, f2]), 1)) == [f1, f2]


def test_unwrap_plain():
    f = fresh()
    assert fence_unwrap(f) == [f]


def test_unwrap_merge():
    f1, f2 = fresh(), fresh()
    m = fence_merge(f1, f2)
    assert isinstance(m, FenceArray) and set(fence_unwrap(m)) == {f1, f2}
    assert m.seqno == 1


def test_unwrap_merge_duplicate():
    f1 = fresh()
    assert fence_merge(f1, f1) is f1


def test_unwrap_merge_seqno():
    c0, c1 = fence_context_alloc(), fence_context_alloc()
    f1, f2, f3 = Fence(c1, 1), Fence(c1, 2), Fence(c0, 1)
    assert fence_unwrap(fence_merge(f1, f2, f3)) == [f3, f2]


def test_unwrap_merge_order():
    f1, f2 = fresh(), fresh()
    a1 = FenceArray([f1, f2])
    c2 = FenceChain(FenceChain(None, f1, 1), f2, 2)
    assert fence_unwrap(fence_merge(a1, c2)) == [f1, f2]


def test_unwrap_merge_complex():
    f1, f2 = fresh(), fresh()
    f3 = fence_merge(f1, f2)
    f4 = FenceArray([f2, f1])
    leaves = fence_unwrap(fence_merge(f3, f4, get_stub_fence()))
    assert sorted(map(id, leaves)) == sorted(map(id, [f1, f2]))


def test_unwrap_merge_complex_seqno():
    c0, c1 = fence_context_alloc(), fence_context_alloc()
    f1, f2, f3, f4 = Fence(c0, 2), Fence(c1, 1), Fence(c0, 1), Fence(c1, 2)
    merged = fence_merge(FenceArray([f1, f2]), FenceArray([f3, f4]))
    assert fence_unwrap(merged) == [f1, f4]


def test_merge_of_signalled_is_a_stub_with_the_latest_timestamp():
    f1, f2 = fresh(), fresh()
    f1.signal(timestamp=100)
    f2.signal(timestamp=300)
    m = fence_merge(f1, f2)
    assert m.is_signaled() and m.timestamp == 300 and (m.context, m.seqno) == (0, 0)


def test_merge_drops_signalled_leaves():
    f1, f2 = fresh(), fresh()
    f1.signal()
    assert fence_merge(f1, f2) is f2
    with pytest.raises(TypeError):
        fence_merge(f1, None)


def test_merge_32bit_wrap_keeps_the_newest():
    ctx = fence_context_alloc()
    old, new = Fence(ctx, 0xFFFFFFFF), Fence(ctx, 0x1_0000_0003)
    assert fence_merge(old, new, fresh()).fences[0] is new
