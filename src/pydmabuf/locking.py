"""Helpers around the native reservation-locking core.

* :func:`locked`: lock a set of :class:`~pydmabuf.WwMutex` /
  :class:`~pydmabuf.Resv` objects with one acquire context and the full
  back-off loop, unlock and finish on exit.
* :func:`signalling_section`: a fence-signalling critical section as a
  context manager (:func:`~pydmabuf.begin_signalling` /
  :func:`~pydmabuf.end_signalling`).
* The messages of the signalling checker: where a section began and where
  the offending wait or lock happened, as ``file:line`` of Python code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

from pydmabuf import errors

__all__ = ["locked", "signalling_section"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_FILES = (contextlib.__file__,)


def _internal(frame: FrameType) -> bool:
    fn = frame.f_code.co_filename
    return fn.startswith(_PKG_DIR) or fn in _SKIP_FILES


def _describe(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _caller_site() -> str:
    """The innermost frame outside pydmabuf (and contextlib), as
    ``file:line in function``."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _internal(frame):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return _describe(frame)


def _signal_site(frame_id: int, fence: Any) -> str:
    """Where the running ``Fence.signal()`` was called: the frame that was
    current when it began (found by identity on the live stack)."""
    what = f"Fence.signal() of {fence!r}" if fence is not None else "Fence.signal()"
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if id(frame) == frame_id:
            return f"{what} called at {_describe(frame)}"
        frame = frame.f_back
    return what


def _signalling_error(what: str, begin: str) -> errors.LockingError:
    return errors.LockingError(
        f"{what} inside a fence-signalling critical section: the fence being signalled could "
        f"depend on it (a deadlock the kernel's lockdep reports).  The section began at "
        f"{begin}; the offending call is at {_caller_site()}"
    )


@contextlib.contextmanager
def signalling_section() -> Iterator[None]:
    """``with signalling_section():`` brackets code that must reach a fence
    signal without waiting on fences or taking reservation locks."""
    from pydmabuf._core import begin_signalling, end_signalling

    cookie = begin_signalling()
    try:
        yield
    finally:
        end_signalling(cookie)


@contextlib.contextmanager
def locked(objs: Iterable[Any], ww_class: Any = None, *, interruptible: bool = False) -> Iterator[Any]:
    """Lock every object of ``objs`` with one new acquire context.

    Uses :meth:`~pydmabuf.AcquireContext.lock_all` (back-off handled
    inside), yields the context, and on exit unlocks everything it holds
    and finishes it.

    Parameters
    ----------
    objs : iterable of WwMutex or Resv
    ww_class : WwClass, optional
        Default: the class of the first object (``reservation_ww_class``
        when there is none).
    interruptible : bool
        Wait interruptibly (:class:`~pydmabuf.errors.Interrupted`).
    """
    from pydmabuf._core import AcquireContext, reservation_ww_class

    items = list(objs)
    cls = ww_class if ww_class is not None else (items[0].ww_class if items else reservation_ww_class)
    with AcquireContext(cls) as ctx:
        ctx.lock_all(items, interruptible=interruptible)
        try:
            yield ctx
        finally:
            ctx.unlock_all()
