"""Call sites as ``file:line in function``: the messages of the signalling checker.

A leaf module (layer 0): the compiled core (``pydmabuf._core_ww``) raises the
checker's LockingError with these helpers, and :mod:`pydmabuf.locking`
re-uses them, so the core never imports a module above it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import FrameType
from typing import Any

from pydmabuf import errors

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
