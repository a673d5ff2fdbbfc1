"""Argument parsing shared by the uAPI-shaped driver models (VFIO,
iommufd, KVM): fixed-width unsigned fields and tables of them, checked as
the core checks its u64 arguments."""

from __future__ import annotations

from typing import Any

import numpy as np

from pydmabuf import errors

__all__ = ["as_uint", "as_u64_pairs", "U64_MAX", "U32_MAX"]

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1


def as_uint(value: Any, name: str, bits: int = 64) -> int:
    """``value`` as an unsigned ``bits``-wide field: TypeError for a
    non-integer, InvalidArgument (EINVAL) for a negative number, Overflow
    (EOVERFLOW) for one that does not fit."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            value = int(value.__index__())
        except AttributeError:
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    v = int(value)
    if v < 0:
        raise errors.InvalidArgument(f"{name} must not be negative (got {v})")
    if v >> bits:
        raise errors.Overflow(f"{name} does not fit in {bits} bits (got {v:#x})")
    return v


def as_u64_pairs(rows: Any, name: str, max_rows: int | None = None) -> np.ndarray:
    """An (N, 2) u64 array from a u64 array or a sequence of integer
    pairs (a copy unless already u64 and contiguous).  TypeError for what
    is not a table at all (None, a string, a number) or holds
    non-integers, ValueError for the wrong shape, InvalidArgument (EINVAL)
    for a negative entry, Overflow (EOVERFLOW) for one above 2**64 - 1 or
    more than ``max_rows`` rows (checked before anything is copied),
    OutOfMemory (ENOMEM) when the copy does not fit in memory."""
    if not isinstance(rows, (list, tuple)):
        _refuse_records(rows, name)
    try:
        a = np.asarray(rows)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: not a table of integer pairs: {e}") from None
    if a.ndim == 0:
        raise TypeError(f"{name} must be a table of (N, 2) integers, not {type(rows).__name__}")
    if a.size == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), not {a.shape}")
    if max_rows is not None and a.shape[0] > max_rows:
        raise errors.Overflow(f"{name}: {a.shape[0]} rows, more than {max_rows}")
    try:
        return _u64_rows(a, rows, name)
    except MemoryError:
        raise errors.OutOfMemory(f"{name}: no memory for a copy of {a.shape[0]} rows") from None


def _refuse_records(rows: Any, name: str) -> None:
    """Refuse a buffer of records (a structured format such as the
    scatterlist's own entries, or a ctypes structure) before NumPy guesses
    at it: TypeError, as for any table that does not hold integers.  A
    released view is a ValueError.  Objects without the buffer protocol
    pass (NumPy converts sequences)."""
    try:
        with memoryview(rows) as m:
            fmt = m.format
    except TypeError:
        return
    except ValueError as e:
        raise ValueError(f"{name}: not a table of integer pairs: {e}") from None
    if "{" in fmt or ":" in fmt:
        raise TypeError(f"{name} must hold integers, not records of format {fmt!r}")


def _u64_rows(a: np.ndarray, rows: Any, name: str) -> np.ndarray:
    kind = a.dtype.kind
    if kind == "u":
        return np.ascontiguousarray(a, dtype=np.uint64)
    if kind == "i":
        if (a < 0).any():
            raise errors.InvalidArgument(f"{name}: entries must not be negative")
        return np.ascontiguousarray(a, dtype=np.uint64)
    if kind in "fO":  # floats, or ints NumPy could not hold in one integer dtype
        flat = np.asarray(rows, dtype=object).ravel().tolist()
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
            raise TypeError(f"{name} must hold integers")
        if min(flat) < 0:
            raise errors.InvalidArgument(f"{name}: entries must not be negative")
        if max(flat) > U64_MAX:
            raise errors.Overflow(f"{name}: entries must fit in 64 bits")
        return np.ascontiguousarray(np.array(flat, dtype=np.uint64).reshape(a.shape))
    raise TypeError(f"{name} must hold integers, not {a.dtype}")
