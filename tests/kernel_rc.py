"""The one errno helper of the tests: run a pydmabuf call and give its
result the way a kernel function returns it, the value or a negative
errno.  ``kernel_rc(f, ...) == -errno.EINVAL`` reads as the kernel's
``ret == -EINVAL``, and a reference model written in C style compares
with ``==``."""

from __future__ import annotations

from typing import Any, Callable

from pydmabuf import errors


def kernel_rc(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: its value (0 for None), or ``-errno`` if
    it raised a :class:`~pydmabuf.errors.DmaBufError`.  Any other
    exception (TypeError, ValueError, ...) propagates."""
    try:
        r = fn(*args, **kwargs)
    except errors.DmaBufError as e:
        return -int(e.errno)
    return 0 if r is None else r
