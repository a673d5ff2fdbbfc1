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


#: A transparent huge page (x86-64, arm64 with 4 KiB pages).
HUGE_PAGE_SIZE = 2 << 20
#: The size from which :func:`real_pages` asks for huge pages (NumPy's
#: threshold for the same advice on its arrays).
HUGE_ADVICE_BYTES = 4 << 20


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
    # A mapping of its own, never memory the process's heap used before
    # (what a recycled heap chunk was backed by depended on the run's
    # history: the same size read 10x more runs in one run than the next),
    # starting on a huge-page boundary; huge pages asked for from 4 MiB up,
    # as NumPy asks for them for its arrays, so a large buffer is all
    # huge pages rather than however many whole ones fit where malloc put
    # it.  Touch one byte per page so every page has a frame.
    import mmap

    span = -(-nbytes // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
    # private: an anonymous shared mapping is shmem, whose huge pages follow
    # another switch (shmem_enabled)
    region = mmap.mmap(-1, span + HUGE_PAGE_SIZE, flags=getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0))
    raw = np.frombuffer(region, dtype=np.uint8)
    start = (-raw.ctypes.data) % HUGE_PAGE_SIZE
    if nbytes >= HUGE_ADVICE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE, start, span)
    view = raw[start : start + nbytes]
    view[::PAGE_SIZE] = 1
    return pagemap(view), view


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
