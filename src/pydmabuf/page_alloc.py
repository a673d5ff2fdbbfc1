"""The page allocator and the page layouts it hands out.

:class:`PageAllocator` is the machine's RAM pages as the system heap and
friends draw from them (``mm/page_alloc.c``'s role in the model): an
allocation is a layout of runs, placed in a free stretch of RAM, given back
whole.  The layouts are deterministic for a given seed, so two runs of a
study see the same pages; the recipe for the random ones is the project's
NumPy baseline: a page starts a new run with probability ``1 / mean_run``
and then jumps 1..1000 frames ahead.

The study (:mod:`pydmabuf.workloads`, the benchmarks) draws its page
layouts from here: the model does not depend on its measurements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pydmabuf import errors
from pydmabuf._core import RangeTable
from pydmabuf._types import RangeKind

if TYPE_CHECKING:
    from pydmabuf.machine import Machine

__all__ = ["PageAllocator", "LAYOUTS", "synthetic_layout", "contiguous", "random_runs", "thp_runs", "numpy_coalesce"]

#: Layout names: :func:`pydmabuf.workloads.layout` makes them all, :func:`synthetic_layout` all but
#: ``pagemap`` (the pages of a Python buffer).
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


def _check_npages(npages: int) -> None:
    if not isinstance(npages, int):
        raise TypeError(f"npages must be an int, not {type(npages).__name__}")
    if npages < 0:
        raise ValueError(f"npages must not be negative (got {npages})")


def synthetic_layout(name: str, npages: int, seed: int = 1, limit_pfn: int | None = None) -> np.ndarray:
    """PFNs for a named synthetic layout (every name of :data:`LAYOUTS` but
    ``pagemap``, which is the pages of a Python buffer:
    :func:`pydmabuf.workloads.real_pages`).  With ``limit_pfn`` the
    layouts keep below that frame (the top of a machine's RAM region
    starting at 4 GiB)."""
    _check_npages(npages)
    if name == "contiguous":
        return contiguous(npages)
    if name == "fragmented":
        return random_runs(npages, 8, seed, limit_pfn=limit_pfn)
    if name == "scattered":
        return random_runs(npages, 1, seed, limit_pfn=limit_pfn)
    if name == "thp":
        return thp_runs(npages, seed, limit_pfn=limit_pfn)
    if name == "pagemap":
        raise ValueError("the pagemap layout is a Python buffer's own pages (pydmabuf.workloads.real_pages)")
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


class PageAllocator:
    """The machine's RAM pages, handed out to buffers (the page allocator
    the system heap and friends draw from).

    Pages come in the layouts the study uses: one contiguous run, or the
    run pattern of :func:`synthetic_layout` placed in a free
    stretch of RAM; ``thp`` runs are 2 MiB aligned.  Freed pages go back.
    """

    def __init__(self, machine: Machine, kinds: tuple[RangeKind, ...] = (RangeKind.RAM,)) -> None:
        self.machine = machine
        self._used = RangeTable()  # in pfns; owner = allocation id
        self._live: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._next = 1
        # Everything that is not RAM of the wanted kinds is unavailable.
        prev = 0
        top = 1 << 64  # pfn units: everything above RAM is unavailable
        for r in machine.address_map:
            s, e = r.start >> 12, (r.end + 4095) >> 12
            if r.kind in kinds:
                if s > prev:
                    self._used.insert(prev, s - prev, kind=RangeKind.RESERVED)
                prev = max(prev, e)
        if prev < top:
            self._used.insert(prev, top - prev, kind=RangeKind.RESERVED)
        self._reserved_pages = self._used.total_nbytes
        self.total_pages = top - self._reserved_pages

    @property
    def allocated_pages(self) -> int:
        # The table keeps its total: no walk over the live allocations.
        return self._used.total_nbytes - self._reserved_pages

    @property
    def free_pages(self) -> int:
        return self.total_pages - self.allocated_pages

    def alloc(self, npages: int, layout: str = "contiguous", seed: int = 1) -> np.ndarray:
        """``npages`` pages in ``layout``; returns a u64 array of PFNs.
        Raises OutOfMemory (ENOMEM) when no free stretch of RAM holds it."""
        if not isinstance(npages, int):
            raise TypeError(f"alloc: npages must be an int, not {type(npages).__name__}")
        if npages <= 0:
            raise errors.InvalidArgument(f"alloc: npages must be positive (got {npages!r})")
        if npages > self.free_pages:
            # Before the layout is drawn: its arrays are npages long.
            raise errors.OutOfMemory(f"alloc: {npages} pages is more than the {self.free_pages} free pages of RAM")
        if layout == "pagemap":
            raise errors.InvalidArgument("alloc: pagemap pages belong to a Python buffer (SystemHeap.from_buffer)")
        try:
            pattern = synthetic_layout(layout, npages, seed)
        except ValueError as e:
            raise errors.InvalidArgument(str(e)) from None
        pattern = pattern - pattern[0]
        align = 512 if layout == "thp" else 1
        span = int(pattern[-1]) + 1
        try:
            start = self._used.find_gap(span, align)
        except errors.NoSpace:
            # Too spread out for any free stretch: squeeze the jumps between
            # runs (every run boundary stays) into at most 4x the pages, so
            # one big buffer does not take a whole stretch of RAM.
            big = self._largest_gap()
            if layout not in ("fragmented", "scattered") or big < npages * 2 + 2:
                raise errors.OutOfMemory(f"no free stretch of RAM holds {npages} pages laid out {layout!r}") from None
            pattern = synthetic_layout(layout, npages, seed, limit_pfn=min(big - 1, npages * 4) + 0x100000)
            pattern = pattern - pattern[0]
            span = int(pattern[-1]) + 1
            start = self._used.find_gap(span, align)
        pfns: np.ndarray = pattern + np.uint64(start)
        phys, lens = numpy_coalesce(pfns)
        starts = phys >> np.uint64(12)
        npg = lens >> np.uint64(12)
        aid = self._next
        self._next += 1
        self._used.insert_many(starts, npg, kinds=RangeKind.RAM, owners=aid)
        self._live[aid] = (starts, npg)
        return pfns

    def _largest_gap(self) -> int:
        best, prev = 0, 0
        for r in self._used:
            best = max(best, r.start - prev)
            prev = r.end
        return best

    def free(self, pfns: np.ndarray) -> None:
        """Give back pages from :meth:`alloc` (the whole allocation)."""
        if len(pfns) == 0:
            raise errors.InvalidArgument("free: no pages")
        r = self._used.lookup(int(pfns[0]))
        if r is None or r.kind != RangeKind.RAM or r.owner not in self._live:
            raise errors.NotFound(f"free: pfn {int(pfns[0]):#x} is not an allocated page")
        starts, _ = self._live.pop(r.owner)
        self._used.remove_many(starts)

    def owner_of(self, pfn: int) -> int | None:
        r = self._used.lookup(pfn)
        return r.owner if r is not None and r.kind == RangeKind.RAM else None
