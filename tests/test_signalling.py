"""Fence-signalling critical sections (dma_fence_begin/end_signalling) and
the checks lockdep makes with them: no fence wait and no reservation lock
inside a section, reported with both sites."""

from __future__ import annotations

import inspect
import threading

import pytest

from lockhelp import clean_thread, spawn  # noqa: F401  (autouse fixture)
from pydmabuf import (
    AcquireContext,
    Fence,
    Resv,
    Usage,
    WwClass,
    WwMutex,
    begin_signalling,
    end_signalling,
    errors,
    fence_context_alloc,
    fence_wait_any,
    in_signalling_section,
    reservation_ww_class,
    signalling_section,
)

HERE = __file__


def line_of(marker):
    """The line number of the line of this file carrying ``# marker``."""
    src, _ = inspect.getsourcelines(inspect.getmodule(line_of))
    for i, line in enumerate(src, start=1):
        if f"# {marker}" in line:
            return i
    raise AssertionError(marker)


def fence():
    return Fence(fence_context_alloc(), 1)


def test_cookies_nest():
    assert not in_signalling_section()
    outer = begin_signalling()
    assert outer is False and in_signalling_section()
    inner = begin_signalling()
    assert inner is True
    end_signalling(inner)
    assert in_signalling_section()
    end_signalling(outer)
    assert not in_signalling_section()


def test_end_without_begin():
    with pytest.raises(errors.LockingError, match="without a matching"):
        end_signalling(False)
    end_signalling(True)  # a nested cookie closes nothing


def test_wait_inside_a_section_names_both_sites():
    f = fence()
    cookie = begin_signalling()  # SECTION-BEGIN
    try:
        with pytest.raises(errors.LockingError) as ei:
            f.wait(0)  # OFFENDING-WAIT
    finally:
        end_signalling(cookie)
    msg = str(ei.value)
    assert f"{HERE}:{line_of('SECTION-BEGIN')}" in msg
    assert f"{HERE}:{line_of('OFFENDING-WAIT')}" in msg
    assert "waiting on" in msg and repr(f) in msg


def test_wait_on_a_signalled_fence_is_still_reported():
    f = fence()
    f.signal()
    with signalling_section():
        with pytest.raises(errors.LockingError):
            f.wait()
        with pytest.raises(errors.LockingError):
            fence_wait_any([f])


def test_resv_lock_inside_a_section():
    r = Resv()
    with signalling_section():  # CM-BEGIN
        with pytest.raises(errors.LockingError) as ei:
            r.lock()  # CM-LOCK
        assert not r.is_locked()
        with AcquireContext(reservation_ww_class) as ctx:
            with pytest.raises(errors.LockingError):
                r.lock(ctx)
        assert r.trylock()  # a trylock cannot deadlock
        r.unlock()
    msg = str(ei.value)
    assert f"{HERE}:{line_of('CM-BEGIN')}" in msg and f"{HERE}:{line_of('CM-LOCK')}" in msg
    assert "reservation lock" in msg


def test_other_ww_classes_are_not_reservation_locks():
    m = WwMutex(WwClass("other"))
    with signalling_section():
        m.lock()
        m.unlock()


def test_resv_wait_inside_a_section():
    r = Resv()
    f = fence()
    with signalling_section():
        assert r.wait(Usage.BOOKKEEP, 0)  # nothing to wait for: fine
    with r:
        r.reserve_fences(1)
        r.add_fence(f, Usage.WRITE)
    with signalling_section():
        with pytest.raises(errors.LockingError):
            r.wait(Usage.WRITE, 0)
    f.signal()


def test_callback_waiting_is_reported_and_the_signal_completes():
    f, g = fence(), fence()
    f.add_callback(lambda x: g.wait(0))  # CB-WAIT
    with pytest.raises(errors.LockingError) as ei:
        f.signal()  # CB-SIGNAL
    assert f.is_signaled() and not in_signalling_section()
    msg = str(ei.value)
    assert f"Fence.signal() of {f!r} called at {HERE}:{line_of('CB-SIGNAL')}" in msg
    assert f"{HERE}:{line_of('CB-WAIT')}" in msg


def test_callback_taking_a_reservation_lock():
    f = fence()
    r = Resv()
    f.add_callback(lambda x: r.lock())
    with pytest.raises(errors.LockingError, match="reservation lock"):
        f.signal()
    assert not r.is_locked()


def test_callbacks_may_signal_and_add_callbacks():
    f, g, h = fence(), fence(), fence()
    seen = []
    g.add_callback(lambda x: seen.append("g"))
    f.add_callback(lambda x: g.signal())
    f.add_callback(lambda x: h.add_callback(lambda y: seen.append("h")))
    f.signal()
    h.signal()
    assert seen == ["g", "h"]


def test_sections_are_per_thread():
    f = fence()
    with signalling_section():
        w = spawn(f.wait, 5.0)
        f.signal()
    assert w.result() is True


def test_section_closed_after_callback_error():
    f = fence()
    f.add_callback(lambda x: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        f.signal()
    assert not in_signalling_section()


def test_signal_inside_an_explicit_section_keeps_the_outer_site():
    f, g = fence(), fence()
    f.add_callback(lambda x: g.wait(0))
    with signalling_section():  # OUTER
        with pytest.raises(errors.LockingError) as ei:
            f.signal()
        assert in_signalling_section()
    assert f"{HERE}:{line_of('OUTER')}" in str(ei.value)


def test_locks_held_while_waiting_are_fine():
    """The opposite order is the allowed one: waiting for fences while
    holding reservation locks."""
    r = Resv()
    f = fence()
    with r:
        threading.Timer(0.01, f.signal).start()
        assert f.wait(5.0)
