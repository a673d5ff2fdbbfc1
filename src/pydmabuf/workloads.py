"""Page layouts for benchmarks and studies: arrays of PFNs.

Every generator is deterministic for a given seed, so two runs of a study
see the same pages.  The recipe for the random layouts is the one in the
project's NumPy baseline: a page starts a new run with probability
``1 / mean_run`` and then jumps 1..1000 frames ahead.
"""

from __future__ import annotations

import numpy as np

from pydmabuf._types import PAGE_SIZE

__all__ = ["LAYOUTS", "layout", "contiguous", "random_runs", "thp_runs", "real_pages", "numpy_coalesce"]

#: Layout names understood by :func:`layout`.
LAYOUTS = ("contiguous", "fragmented", "scattered", "thp", "pagemap")

_BASE_PFN = 0x100000  # 4 GiB: above the 32-bit hole on the default machine


def contiguous(npages: int, base_pfn: int = _BASE_PFN) -> np.ndarray:
    """``npages`` consecutive frames."""
    return np.arange(base_pfn, base_pfn + npages, dtype=np.uint64)


def _fit(steps: np.ndarray, brk: np.ndarray, base_pfn: int, limit_pfn: int | None) -> np.ndarray:
    """Shrink the jumps between runs so the last frame stays below
    ``limit_pfn``; every jump stays a jump (at least one frame skipped)."""
    pfns = base_pfn + np.cumsum(steps, dtype=np.int64)
    if limit_pfn is None or len(pfns) == 0 or pfns[-1] < limit_pfn:
        return pfns.astype(np.uint64)
    extra = steps - 1
    room = limit_pfn - 1 - base_pfn - len(steps) - int(brk.sum())
    if room < 0:
        raise ValueError(f"{len(steps)} pages in runs do not fit below pfn {limit_pfn:#x}")
    scale = room / max(int(extra.sum()), 1)
    steps = 1 + np.where(brk, 1 + np.floor(np.maximum(extra - 1, 0) * scale).astype(np.int64), 0)
    return (base_pfn + np.cumsum(steps, dtype=np.int64)).astype(np.uint64)


def random_runs(npages: int, mean_run: float, seed: int = 1, base_pfn: int = _BASE_PFN,
                limit_pfn: int | None = None) -> np.ndarray:
    """Runs of consecutive frames with mean length ``mean_run`` (1: every
    page its own run), each run 1..1000 frames after the previous one.
    With ``limit_pfn`` the jumps shrink (keeping every run boundary) so
    all frames stay below it, inside a machine's RAM."""
    if not mean_run >= 1:
        raise ValueError(f"mean_run must be at least 1 page (got {mean_run!r})")
    rng = np.random.default_rng(seed)
    brk = rng.random(npages) < (1.0 / mean_run)
    steps = np.where(brk, 1 + rng.integers(0, 1000, npages), 1)
    return _fit(steps, brk, base_pfn, limit_pfn)


def thp_runs(npages: int, seed: int = 1, base_pfn: int = _BASE_PFN, limit_pfn: int | None = None) -> np.ndarray:
    """2 MiB runs of 512 frames, each 2 MiB aligned, scattered like
    transparent huge pages (closer together when ``limit_pfn`` asks)."""
    rng = np.random.default_rng(seed)
    nruns = -(-npages // 512)
    gaps = 1 + rng.integers(0, 64, nruns)
    if limit_pfn is not None:
        room = (limit_pfn // 512) - (base_pfn // 512) - 1
        if gaps.sum() > room:
            gaps = 1 + np.floor((gaps - 1) * max(room - nruns, 0) / max(int((gaps - 1).sum()), 1)).astype(np.int64)
    huge = (base_pfn // 512) + np.cumsum(gaps)
    pfns = (huge[:, None] * 512 + np.arange(512)[None, :]).reshape(-1)[:npages]
    return pfns.astype(np.uint64)


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
    from pydmabuf import errors, pagemap

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
    if not isinstance(npages, int):
        raise TypeError(f"npages must be an int, not {type(npages).__name__}")
    if npages < 0:
        raise ValueError(f"npages must not be negative (got {npages})")
    if name == "contiguous":
        return contiguous(npages), None
    if name == "fragmented":
        return random_runs(npages, 8, seed, limit_pfn=limit_pfn), None
    if name == "scattered":
        return random_runs(npages, 1, seed, limit_pfn=limit_pfn), None
    if name == "thp":
        return thp_runs(npages, seed, limit_pfn=limit_pfn), None
    if name == "pagemap":
        return real_pages(npages)
    raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")


def numpy_coalesce(pfns: np.ndarray, max_pages: int = 0xFFFFF) -> tuple[np.ndarray, np.ndarray]:
    """What a NumPy user would write to turn PFNs into (phys, len) segments.

    The reference the core's scatterlist walk is measured against: runs of
    consecutive PFNs, split every ``max_pages`` pages.
    """
    if max_pages < 1:
        raise ValueError(f"max_pages must be at least 1 (got {max_pages})")
    if len(pfns) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    brk = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(pfns)]))
    lens = ends - starts
    if (lens > max_pages).any():
        reps = (lens + max_pages - 1) // max_pages
        s = np.repeat(starts, reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)) * max_pages
        e = np.minimum(s + max_pages, np.repeat(ends, reps))
        starts, lens = s, e - s
    return pfns[starts] << np.uint64(12), lens.astype(np.uint64) << np.uint64(12)
