"""Access through a list of segments ((address, nbytes) rows): one access
per contiguous segment an access touches (never one per page).  Devices
use it over DMA segments, :class:`~pydmabuf.dmabuf.CpuMapping` over the
exporter's physical ranges."""

from __future__ import annotations

from typing import Any

import numpy as np

from pydmabuf import errors

__all__ = ["ends_of", "runs", "read", "write"]


def ends_of(segments: np.ndarray) -> np.ndarray:
    """The cumulative lengths of the (N, 2) ``segments`` rows (u64): the
    byte offset just past each segment, for :func:`runs`."""
    return np.cumsum(np.asarray(segments, dtype=np.uint64).reshape(-1, 2)[:, 1], dtype=np.uint64)


def runs(segments: np.ndarray, offset: int, nbytes: int, what: str = "access",
         ends: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The (DMA address, nbytes) pieces of ``[offset, offset + nbytes)`` of
    the byte stream the (N, 2) ``segments`` rows describe, in order.
    ``ends``: :func:`ends_of` the segments, if the caller keeps it.
    InvalidArgument if the window is empty or runs past the segments."""
    if not isinstance(offset, int) or not isinstance(nbytes, int):
        raise TypeError("offset and nbytes must be ints")
    segs = np.asarray(segments, dtype=np.uint64).reshape(-1, 2)
    if ends is None:
        ends = ends_of(segs)
    total = int(ends[-1]) if len(ends) else 0
    if offset < 0 or nbytes <= 0 or offset + nbytes > total:
        raise errors.InvalidArgument(f"{what}: [{offset:#x}, +{nbytes:#x}) is not inside the {total:#x} bytes mapped")
    i = int(np.searchsorted(ends, np.uint64(offset), side="right"))
    j = int(np.searchsorted(ends, np.uint64(offset + nbytes - 1), side="right"))
    out = []
    pos, left = offset, nbytes
    for k in range(i, j + 1):
        start = int(ends[k]) - int(segs[k, 1])
        inner = pos - start
        take = min(left, int(segs[k, 1]) - inner)
        out.append((int(segs[k, 0]) + inner, take))
        pos += take
        left -= take
    return out


def read(device: Any, segments: np.ndarray, offset: int, nbytes: int, what: str = "read") -> bytes:
    """What ``device`` reads at ``[offset, +nbytes)`` of the segments."""
    return b"".join(device.dma_read(a, n) for a, n in runs(segments, offset, nbytes, what))


def write(device: Any, segments: np.ndarray, offset: int, data: Any, what: str = "write") -> None:
    """``device`` writes ``data`` at ``offset`` of the segments."""
    buf = memoryview(data).cast("B")
    pos = 0
    for a, n in runs(segments, offset, len(buf), what):
        device.dma_write(a, buf[pos : pos + n])
        pos += n
