"""dma_fence: drivers/dma-buf/st-dma-fence.c in our own words, plus the
rest of dma-fence.c's contract (ordering, errors, ops, waits, stubs)."""

from __future__ import annotations

import errno
import gc
import threading
import time

import pytest

from lockhelp import clean_thread, spawn  # noqa: F401  (autouse fixture)
from pydmabuf import (
    Fence,
    FenceCallback,
    errors,
    fence_context_alloc,
    fence_wait_any,
    get_stub_fence,
    private_stub_fence,
    signal_pending,
    signal_thread,
)


def mock_fence(seqno=0, **kw):
    return Fence(fence_context_alloc(), seqno, **kw)


# --------------------------------------------------------- st-dma-fence.c


def test_sanitycheck():
    f = Fence(0, 0)
    f.enable_sw_signaling()
    f.signal()
    del f


def test_signaling():
    f = mock_fence()
    f.enable_sw_signaling()
    assert not f.is_signaled()
    f.signal()
    assert f.is_signaled()
    with pytest.raises(errors.InvalidArgument) as ei:
        f.signal()
    assert ei.value.errno == errno.EINVAL
    assert f.check_and_signal() is True  # Linux 7.0: "it was already"
    assert f.is_signaled()


def test_check_and_signal_first_time():
    f = mock_fence()
    assert f.check_and_signal() is False
    assert f.is_signaled()


def test_add_callback():
    f = mock_fence()
    seen = []
    f.add_callback(seen.append)
    assert seen == []
    f.signal()
    assert seen == [f]


def test_late_add_callback():
    f = mock_fence()
    seen = []
    f.enable_sw_signaling()
    f.signal()
    with pytest.raises(errors.NotFound) as ei:
        f.add_callback(seen.append)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(errors.InvalidArgument):
        f.signal()
    assert seen == []


def test_rm_callback():
    f = mock_fence()
    seen = []
    cb = f.add_callback(seen.append)
    assert isinstance(cb, FenceCallback) and cb.pending
    assert f.remove_callback(cb) is True
    assert not cb.pending
    f.signal()
    assert seen == []


def test_late_rm_callback():
    f = mock_fence()
    seen = []
    cb = f.add_callback(seen.append)
    f.signal()
    assert seen == [f]
    assert f.remove_callback(cb) is False


def test_remove_callback_of_another_fence():
    f, g = mock_fence(), mock_fence()
    cb = g.add_callback(lambda x: None)
    assert f.remove_callback(cb) is False
    assert cb.pending
    g.signal()


def test_status():
    f = mock_fence()
    f.enable_sw_signaling()
    assert f.status == 0
    f.signal()
    assert f.status == 1


def test_error():
    f = mock_fence()
    f.enable_sw_signaling()
    f.set_error(-errno.EIO)
    assert f.status == 0  # invisible until signalled
    assert f.error == -errno.EIO
    f.signal()
    assert f.status == -errno.EIO


@pytest.mark.parametrize("bad", [0, 1, -4096, 5])
def test_set_error_range(bad):
    f = mock_fence()
    with pytest.raises(errors.InvalidArgument):
        f.set_error(bad)
    assert f.error == 0
    f.set_error(-4095)
    f.set_error(-1)
    assert f.error == -1


def test_set_error_after_signal():
    f = mock_fence()
    f.signal()
    with pytest.raises(errors.InvalidArgument, match="already signalled"):
        f.set_error(-errno.ECANCELED)
    assert f.error == 0


def test_wait():
    f = mock_fence()
    f.enable_sw_signaling()
    assert f.wait(0) is False
    f.signal()
    assert f.wait(0) is True
    assert f.wait() is True


def test_wait_timeout():
    f = mock_fence()
    f.enable_sw_signaling()
    t0 = time.monotonic()
    assert f.wait(0.01) is False
    assert time.monotonic() - t0 >= 0.009
    timer = threading.Timer(0.01, f.signal)
    timer.start()
    assert f.wait(5.0) is True
    timer.join()


def test_wait_negative_timeout():
    f = mock_fence()
    with pytest.raises(errors.InvalidArgument):
        f.wait(-1)
    with pytest.raises(errors.InvalidArgument):
        f.wait(float("nan"))


def test_stub():
    stubs = [get_stub_fence() for _ in range(64)]
    assert all(s.is_signaled() for s in stubs)
    assert all(s is stubs[0] for s in stubs)
    s = stubs[0]
    assert (s.context, s.seqno, s.error) == (0, 0, 0)
    assert s.get_driver_name() == "stub" and s.timestamp is not None


def test_private_stub():
    s = private_stub_fence(12345)
    assert s.is_signaled() and s.timestamp == 12345 and s is not get_stub_fence()
    assert (s.context, s.seqno) == (0, 0)


@pytest.mark.parametrize("signal_first", [False, True])
def test_race_signal_callback(signal_first):
    """Two threads each publish a fresh fence, add a callback to the peer's,
    signal their own; no callback may be lost."""
    slots = [None, None]
    barrier = threading.Barrier(2)
    stop = time.monotonic() + 0.05

    def run(me):
        peer = 1 - me
        passes = misses = 0
        while time.monotonic() < stop:
            f = mock_fence()
            slots[me] = f
            barrier.wait()
            other = slots[peer]
            barrier.wait()
            if signal_first:
                f.signal()
            seen = []
            try:
                other.add_callback(lambda x: seen.append(x))
            except errors.NotFound:
                misses += 1
                seen.append(other)
            if not signal_first:
                f.signal()
            if not seen:
                assert other.wait(5.0)
                assert seen == [other], "callback lost"
            passes += 1
        barrier.abort()
        return passes, misses

    workers = [spawn(run, 0), spawn(run, 1)]
    results = []
    for w in workers:
        try:
            results.append(w.result())
        except threading.BrokenBarrierError:
            results.append(None)
    assert any(r is not None and r[0] > 0 for r in results)


# ------------------------------------------------------- context, ordering


def test_context_alloc():
    a = fence_context_alloc()
    b = fence_context_alloc(5)
    c = fence_context_alloc()
    assert a >= 1 and b == a + 1 and c == b + 5
    with pytest.raises(errors.InvalidArgument):
        fence_context_alloc(0)
    with pytest.raises(errors.InvalidArgument):
        fence_context_alloc(-1)


def test_is_later_32bit_wrap():
    ctx = fence_context_alloc()
    a, b = Fence(ctx, 0xFFFFFFFF), Fence(ctx, 0x1_0000_0000)
    assert b.is_later(a)  # low halves 0 vs 0xffffffff: 0 is one step later
    assert not a.is_later(b)
    x, y = Fence(ctx, 5), Fence(ctx, 5 + 0x80000000)
    assert not y.is_later(x)  # half the circle away: no longer "later"
    assert not x.is_later(x)
    assert x.is_later_or_same(x) and not x.is_later_or_same(Fence(ctx, 5))


def test_is_later_64bit():
    ctx = fence_context_alloc()
    a, b = Fence(ctx, 0xFFFFFFFF, seqno64=True), Fence(ctx, 0x1_0000_0000, seqno64=True)
    assert b.is_later(a) and not a.is_later(b) and a.seqno64
    c = Fence(ctx, 2**64 - 1, seqno64=True)
    assert c.is_later(a) and not Fence(ctx, 0, seqno64=True).is_later(c)


def test_is_later_different_contexts():
    with pytest.raises(errors.InvalidArgument, match="different contexts"):
        mock_fence(1).is_later(mock_fence(2))


def test_later():
    ctx = fence_context_alloc()
    a, b = Fence(ctx, 1), Fence(ctx, 2)
    assert Fence.later(a, b) is b and Fence.later(b, a) is b
    b.signal()
    assert Fence.later(a, b) is None


def test_u64_arguments():
    with pytest.raises(errors.Overflow):
        Fence(2**64, 0)
    with pytest.raises(errors.InvalidArgument):
        Fence(0, -1)
    with pytest.raises(TypeError):
        Fence("0", 0)


# -------------------------------------------------------------- signalling


def test_timestamp():
    f = mock_fence()
    assert f.timestamp is None
    before = time.monotonic_ns()
    f.signal()
    assert before <= f.timestamp <= time.monotonic_ns()
    g = mock_fence()
    g.signal(timestamp=42)
    assert g.timestamp == 42


def test_callbacks_run_in_order_once():
    f = mock_fence()
    seen = []
    for i in range(5):
        f.add_callback(lambda x, i=i: seen.append(i))
    assert f.pending_callbacks == 5
    f.signal()
    assert seen == [0, 1, 2, 3, 4] and f.pending_callbacks == 0


def test_raising_callback_does_not_half_signal():
    f = mock_fence()
    seen = []

    def bad(x):
        seen.append("bad")
        raise ValueError("boom")

    def worse(x):
        seen.append("worse")
        raise KeyError("second")

    f.add_callback(bad)
    f.add_callback(worse)
    f.add_callback(lambda x: seen.append("good"))
    waiter = spawn(f.wait, 5.0)
    with pytest.raises(ValueError, match="boom"):
        f.signal()
    assert seen == ["bad", "worse", "good"]
    assert f.is_signaled() and waiter.result() is True
    with pytest.raises(errors.InvalidArgument):
        f.signal()


def test_add_callback_rejects_non_callables():
    with pytest.raises(TypeError):
        mock_fence().add_callback(3)


def test_waiters_wake_after_callbacks():
    f = mock_fence()
    log = []
    started = threading.Event()

    def slow(x):
        started.set()
        time.sleep(0.05)
        log.append("callback done")

    f.add_callback(slow)

    def waiter():
        assert f.wait(5.0)
        log.append("waiter woke")

    w = spawn(waiter)
    time.sleep(0.01)
    s = spawn(f.signal)
    started.wait()
    assert f.is_signaled()  # the flag is visible before the callbacks end
    s.result()
    w.result()
    assert log == ["callback done", "waiter woke"]


def test_wait_releases_the_gil():
    f = mock_fence()
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
        f.signal()

    s = spawn(spin)
    threading.Timer(0.05, stop.set).start()
    assert f.wait(5.0)
    s.result()
    assert count[0] > 1000


def test_interruptible_wait():
    f = mock_fence()
    me = threading.get_ident()
    assert f.wait(0) is False  # this thread now has its task
    threading.Timer(0.02, signal_thread, (me,)).start()
    with pytest.raises(errors.Interrupted) as ei:
        f.wait(5.0, interruptible=True)
    assert ei.value.errno == errno.EINTR
    assert not signal_pending()
    # pending before the call: interrupted at once; uninterruptible ignores it
    signal_thread(me)
    assert f.wait(0.01) is False
    with pytest.raises(errors.Interrupted):
        f.wait(5.0, interruptible=True)
    f.signal()
    signal_thread(me)
    assert f.wait(interruptible=True) is True  # already signalled wins
    from pydmabuf import flush_signals

    flush_signals()


def test_many_waiters():
    f = mock_fence()
    ws = [spawn(f.wait, 10.0) for _ in range(8)]
    time.sleep(0.02)
    f.signal()
    assert all(w.result() is True for w in ws)


def test_release_with_pending_callbacks_signals_edeadlk():
    f = mock_fence()
    seen = []
    f.add_callback(lambda x: seen.append((x.error, x.is_signaled())))
    del f
    gc.collect()
    assert seen == [(-errno.EDEADLK, True)]


# --------------------------------------------------------------------- ops


class HwFence(Fence):
    """A fence whose completion is a 'hardware' register we poll."""

    def __init__(self, ctx, seqno, hw):
        super().__init__(ctx, seqno)
        self.hw = hw
        self.enabled = 0
        self.deadlines = []

    def signaled(self):
        return self.hw["seqno"] >= self.seqno

    def enable_signaling(self):
        self.enabled += 1
        return not self.signaled()

    def set_deadline(self, deadline_ns):
        self.deadlines.append(deadline_ns)

    def get_driver_name(self):
        return "hw"

    def get_timeline_name(self):
        return "ring0"


def test_signaled_op_signals_as_side_effect():
    hw = {"seqno": 0}
    f = HwFence(fence_context_alloc(), 3, hw)
    seen = []
    f.add_callback(seen.append)
    assert f.enabled == 1
    assert not f.is_signaled()
    hw["seqno"] = 3
    assert seen == []  # nobody looked yet
    assert f.is_signaled()
    assert seen == [f] and f.timestamp is not None
    assert f.describe() == "hw ring0 seq 3 signalled"


def test_enable_signaling_false_signals_at_once():
    hw = {"seqno": 10}
    f = HwFence(fence_context_alloc(), 3, hw)
    with pytest.raises(errors.NotFound):
        f.add_callback(lambda x: None)
    assert f.enabled == 1 and f.sw_signaling_enabled
    assert "signalled" in repr(f)
    f.enable_sw_signaling()
    assert f.enabled == 1  # once only


def test_wait_with_enable_signaling_false():
    f = HwFence(fence_context_alloc(), 1, {"seqno": 1})
    assert f.wait(0) is True


def test_set_deadline_hint():
    f = HwFence(fence_context_alloc(), 1, {"seqno": 0})
    f.set_deadline_hint(1000)
    f.signal()
    f.set_deadline_hint(2000)
    assert f.deadlines == [1000]
    g = mock_fence()
    g.set_deadline_hint(5)  # the base ignores it


def test_base_ops():
    f = mock_fence(7)
    assert f.signaled() is False and f.enable_signaling() is True
    assert f.get_driver_name() == "pydmabuf" and f.get_timeline_name() == "unbound"
    assert f.describe() == "pydmabuf unbound seq 7 unsignalled"


# -------------------------------------------------------------- wait_any


def test_wait_any():
    fs = [mock_fence() for _ in range(4)]
    with pytest.raises(errors.InvalidArgument):
        fence_wait_any([])
    assert fence_wait_any(fs, 0) is None
    assert fence_wait_any(fs, 0.01) is None
    fs[2].signal()
    fs[3].signal()
    assert fence_wait_any(fs, 0) == 2
    assert fence_wait_any(fs) == 2
    threading.Timer(0.01, fs[1].signal).start()
    assert fence_wait_any(fs[:2], 5.0) == 1
    with pytest.raises(TypeError):
        fence_wait_any([1])
