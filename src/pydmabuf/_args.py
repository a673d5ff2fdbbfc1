"""Argument parsing shared by the hardware model and the DMA API.

The helpers turn what a caller passes (an int or a size string, a direction,
a set of attributes, a range) into the kernel's values, and refuse the rest
with the errno the kernel gives (EINVAL) or a TypeError for Python misuse.
The lookups are cached for arguments of exactly the int / enum types: these
sit on the hot paths of every map and unmap.

This module is a leaf: it imports only other leaves.
"""

from __future__ import annotations

from typing import Any

from pydmabuf import errors
from pydmabuf._types import U64_MAX, DmaAttrs, DmaDirection, _parse_size


def _num(v: Any, what: str) -> int:
    """An int from an int or a size string like ``"64M"``, ``"0x1000"``,
    ``"4 GiB"`` (the syntax ``pydmabuf bench --sizes`` shares, see
    :func:`pydmabuf._types._parse_size`)."""
    if isinstance(v, bool):
        raise TypeError(f"{what}: expected a number, not {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        n = _parse_size(v)
        if n is not None:
            return n
    raise errors.InvalidArgument(f"{what}: cannot read {v!r} as a number or size")


def _mask(v: Any, what: str) -> int:
    """A DMA mask: a bit count (``32``, ``"64"``) or the mask itself."""
    n = _num(v, what)
    if 1 <= n <= 64:
        return (1 << n) - 1
    if n < 2**12 - 1 or n > U64_MAX or (n & (n + 1)):
        raise errors.InvalidArgument(f"{what}: {v!r} is neither a bit count nor a mask of low bits")
    return n


#: The directions one can map with, by value (a dict lookup is the fast path).
_DIRS: dict[int, DmaDirection] = {int(d): d for d in DmaDirection if d != DmaDirection.NONE}


def _dir(direction: Any) -> DmaDirection:
    if type(direction) is int or type(direction) is DmaDirection:
        d = _DIRS.get(direction)
        if d is not None:
            return d
    if not isinstance(direction, int):  # DmaDirection(0.0) would be BIDIRECTIONAL
        raise errors.InvalidArgument(f"{direction!r} is not a DMA direction")
    try:
        d = DmaDirection(direction)
    except ValueError:
        raise errors.InvalidArgument(f"{direction!r} is not a DMA direction") from None
    if d == DmaDirection.NONE:
        raise errors.InvalidArgument("DMA_NONE is not a direction one can map with")
    return d


_ATTRS: dict[int, DmaAttrs] = {}


def _attrs(attrs: Any) -> DmaAttrs:
    a = _ATTRS.get(attrs) if type(attrs) is int or type(attrs) is DmaAttrs else None
    if a is not None:
        return a
    if not isinstance(attrs, int) or attrs < 0 or attrs >= 1 << 11:
        raise errors.InvalidArgument(f"{attrs!r} is not a set of DMA attributes")
    a = _ATTRS[int(attrs)] = DmaAttrs(attrs)
    return a

def _need_int(what: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int):
            raise TypeError(f"{what}: {name} must be an int, not {type(v).__name__}")


#: (direction, attrs) -> (_dir(direction), _attrs(attrs)), filled only for
#: arguments of exactly these types (a float 1.0 hashes like 1 and must
#: still be refused).
_DIR_TYPES = (int, DmaDirection)
_ATTR_TYPES = (int, DmaAttrs)
_DIR_ATTRS: dict[tuple[int, int], tuple[DmaDirection, DmaAttrs]] = {}

#: (direction, attrs, device.coherent) -> (_dir(direction), _attrs(attrs),
#: the IOMMU prot of ``dma_info_to_prot()``), filled by the DMA API
#: (:mod:`pydmabuf.dma_iommu`, :mod:`pydmabuf.dma`) for arguments of exactly
#: the int / enum types, and read by its compiled paths (``pydmabuf._dma_api``).
_LINK_ARGS: dict[tuple[int, int, bool], tuple[DmaDirection, DmaAttrs, int]] = {}


def _dir_attrs(direction: Any, attrs: Any) -> tuple[DmaDirection, DmaAttrs]:
    """``(_dir(direction), _attrs(attrs))``, remembered for arguments of
    exactly the int / enum types (the hot paths look the pair up first)."""
    da = (_dir(direction), _attrs(attrs))
    if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES:
        _DIR_ATTRS[(direction, attrs)] = da
    return da

def _bad_range(start: int, nbytes: int) -> bool:
    """``[start, start + nbytes)`` is not a byte range the DMA API can
    take: empty, below 0, past 2**64 - 1, or a size that does not fit a
    size_t (2**64, even from 0)."""
    return nbytes <= 0 or nbytes > U64_MAX or start < 0 or start + nbytes - 1 > U64_MAX

