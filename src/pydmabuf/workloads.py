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


def random_runs(npages: int, mean_run: float, seed: int = 1, base_pfn: int = _BASE_PFN) -> np.ndarray:
    """Runs of consecutive frames with mean length ``mean_run`` (1: every
    page its own run), each run 1..1000 frames after the previous one."""
    rng = np.random.default_rng(seed)
    brk = rng.random(npages) < (1.0 / mean_run)
    steps = np.where(brk, 1 + rng.integers(0, 1000, npages), 1)
    return (base_pfn + np.cumsum(steps)).astype(np.uint64)


def thp_runs(npages: int, seed: int = 1, base_pfn: int = _BASE_PFN) -> np.ndarray:
    """2 MiB runs of 512 frames, each 2 MiB aligned, scattered like
    transparent huge pages."""
    rng = np.random.default_rng(seed)
    nruns = -(-npages // 512)
    gaps = 1 + rng.integers(0, 64, nruns)
    huge = (base_pfn // 512) + np.cumsum(gaps)
    pfns = (huge[:, None] * 512 + np.arange(512)[None, :]).reshape(-1)[:npages]
    return pfns.astype(np.uint64)


def real_pages(npages: int) -> tuple[np.ndarray, object]:
    """The frames of a buffer allocated here, read through pagemap.

    Returns ``(pfns, buffer)``; keep the buffer alive while the PFNs are in
    use.  Raises :class:`pydmabuf.errors.NotPermitted` where the process
    may not read PFNs.
    """
    from pydmabuf import pagemap

    buf = np.ones(npages * PAGE_SIZE, dtype=np.uint8)
    addr = buf.__array_interface__["data"][0]
    start = (-addr) % PAGE_SIZE
    if start:  # keep exactly npages whole pages
        buf = np.ones(npages * PAGE_SIZE + PAGE_SIZE, dtype=np.uint8)
        addr = buf.__array_interface__["data"][0]
        start = (-addr) % PAGE_SIZE
    view = buf[start : start + npages * PAGE_SIZE]
    return pagemap(view), buf


def layout(name: str, npages: int, seed: int = 1) -> tuple[np.ndarray, object]:
    """PFNs for a named layout; returns ``(pfns, keepalive)``."""
    if name == "contiguous":
        return contiguous(npages), None
    if name == "fragmented":
        return random_runs(npages, 8, seed), None
    if name == "scattered":
        return random_runs(npages, 1, seed), None
    if name == "thp":
        return thp_runs(npages, seed), None
    if name == "pagemap":
        return real_pages(npages)
    raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")


def numpy_coalesce(pfns: np.ndarray, max_pages: int = 0xFFFFF) -> tuple[np.ndarray, np.ndarray]:
    """What a NumPy user would write to turn PFNs into (phys, len) segments.

    The reference the core's scatterlist walk is measured against: runs of
    consecutive PFNs, split every ``max_pages`` pages.
    """
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
