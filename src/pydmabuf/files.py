"""File descriptors for dma-bufs (and other shareable objects).

The kernel passes a dma-buf around as a file: ``dma_buf_fd()`` installs it
in the process's fd table, consuming the caller's reference;
``dma_buf_get(fd)`` takes a new reference; ``close(fd)`` drops the table's.
pydmabuf keeps one process-wide table with the same rules.
"""

from __future__ import annotations

import threading
from typing import Any

from pydmabuf import errors

__all__ = ["install", "lookup", "close", "open_fds"]

_lock = threading.Lock()
_table: dict[int, Any] = {}
_next = 3  # 0, 1, 2 are taken in every process


def install(obj: Any) -> int:
    """Put ``obj`` in the table (the table now owns one reference of it)."""
    global _next
    with _lock:
        fd = _next
        while fd in _table:
            fd += 1
        _table[fd] = obj
        _next = fd + 1
        return fd


def lookup(fd: int) -> Any:
    """The object behind ``fd``; BadHandle (EBADF) if there is none."""
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"fd must be an int, not {type(fd).__name__}")
    with _lock:
        try:
            return _table[fd]
        except KeyError:
            raise errors.BadHandle(f"fd {fd} is not open") from None


def close(fd: int) -> None:
    """Close ``fd``: the table drops its reference (``put``)."""
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"fd must be an int, not {type(fd).__name__}")
    with _lock:
        try:
            obj = _table.pop(fd)
        except KeyError:
            raise errors.BadHandle(f"fd {fd} is not open") from None
    put = getattr(obj, "put", None)
    if put is not None:
        put()


def open_fds() -> dict[int, Any]:
    with _lock:
        return dict(_table)
