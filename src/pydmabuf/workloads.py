"""Page layouts for benchmarks and studies: arrays of PFNs.

The synthetic layouts are the page allocator's
(:mod:`pydmabuf.page_alloc`, re-exported here): every generator is
deterministic for a given seed, so two runs of a study see the same pages.
This module adds the ``pagemap`` layout, the real frames of a buffer
allocated in this process, and :func:`layout`, which names them all.
"""

from __future__ import annotations

import numpy as np

from pydmabuf import errors
from pydmabuf._core import pagemap
from pydmabuf._types import PAGE_SIZE
from pydmabuf.page_alloc import (LAYOUTS, _check_npages, contiguous, numpy_coalesce, random_runs,
                                 synthetic_layout, thp_runs)

__all__ = ["LAYOUTS", "layout", "contiguous", "random_runs", "thp_runs", "real_pages", "numpy_coalesce"]


def real_pages(npages: int) -> tuple[np.ndarray, object]:
    """The frames of a buffer allocated here, read through pagemap.

    Returns ``(pfns, buffer)``; keep the buffer alive while the PFNs are in
    use.  Raises :class:`pydmabuf.errors.NotPermitted` where the process
    may not read PFNs.
    """
    nbytes = npages * PAGE_SIZE
    avail = _mem_available()
    if avail is not None and nbytes > avail // 2:
        raise errors.OutOfMemory(f"a {nbytes >> 20} MiB buffer would take more than half of the "
                                 f"{avail >> 20} MiB of memory available")
    # One allocation with a page of slack, so a page-aligned view of exactly
    # npages exists; touch one byte per page so every page has a frame.
    buf = np.empty(nbytes + PAGE_SIZE, dtype=np.uint8)
    start = (-buf.__array_interface__["data"][0]) % PAGE_SIZE
    view = buf[start : start + nbytes]
    view[::PAGE_SIZE] = 1
    return pagemap(view), buf


def _mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, None where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def layout(name: str, npages: int, seed: int = 1, limit_pfn: int | None = None) -> tuple[np.ndarray, object]:
    """PFNs for a named layout; returns ``(pfns, keepalive)``.  With
    ``limit_pfn`` the synthetic layouts keep below that frame (the top of
    a machine's RAM region starting at 4 GiB)."""
    if name == "pagemap":
        _check_npages(npages)
        return real_pages(npages)
    return synthetic_layout(name, npages, seed, limit_pfn), None
