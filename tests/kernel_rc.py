"""Shared by the reference-model tests: run a pydmabuf call and give its
result the way a kernel function would, a value or a negative errno."""

from __future__ import annotations

from typing import Any, Callable

from pydmabuf import errors


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; ``-errno`` if it raised a pydmabuf error, 0 for None."""
    try:
        r = fn(*args)
    except errors.DmaBufError as e:
        return -e.errno
    return 0 if r is None else r
