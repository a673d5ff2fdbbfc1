"""``pydmabuf bench``: the mapping-throughput study.

A study is a grid of cells (page layout x buffer size x strategy).  The
strategies of one (layout, size) form a group, timed together in
interleaved rounds (:func:`pydmabuf._stats.interleave`): every round runs
each strategy once, round-robin, on pre-built input, on this thread's CPU
time with the garbage collector off.  A default run builds each group's
input and model machine several times (``sets`` in :data:`TIMING`) and
the rounds take the sets in turn, so that where one allocation landed in
memory (which moved the medians of the big cells by 10-25% from one
process to the next) weighs only its share of the samples.  Rounds go on
until every median and every ratio to the group's baseline has a tight
95% interval or the group's time budget is spent.  Each cell keeps its
raw samples, reports ns per page (median) with its interval, and its
ratio to the baseline
(the median of the per-round ratios, paired, so a drift of the machine
cancels); a cell whose interval is wider than :data:`WIDE_CI` is marked
``wide_ci``.  The walk is timed beside references on the same input: the
C floor compiled into the core (``pydmabuf._core.floor_coalesce``) and the
NumPy code a user would write (:func:`pydmabuf.workloads.numpy_coalesce`).

The mapping part times, per strategy, a map step and its unmap step on the
same pages.  Its counters cover one map and its unmap: ``pte_writes_per_page``
(every page-table entry set or cleared, leaf or table; an unmap that frees
a whole table page clears one entry, as io-pgtable does),
``iotlb_invalidations`` (range and walk invalidations and full flushes,
with lazy domains flushed so deferred ones count), ``segments`` (DMA
segments of the mapped table, or ranges linked) and
``metadata_bytes_per_page`` (scatterlist entries, the IOVA state, the
exporter's range array).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from pydmabuf import _core, _stats, errors, iotlb, kernel_work, workloads
from pydmabuf.mapping import PAL_MODULE
from pydmabuf._types import PAGE_SIZE, _fmt_size
from pydmabuf.dmabuf import PHYS_NAMESPACE, ImporterOps

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 16, 256, 4096, 65536, 1 << 20)  # pages: 4 KiB .. 4 GiB
QUICK_SIZES = (16, 4096, 65536)
DEFAULT_LAYOUTS = ("contiguous", "fragmented", "scattered", "thp", "pagemap")


#: The level of every confidence interval of the study.
CI_LEVEL = 0.95
#: A cell whose median or ratio interval is wider than this (half-width
#: over the value) is marked ``wide_ci``: it cannot tell a 10% difference.
WIDE_CI = 0.05


@dataclass
class Cell:
    """One measured (layout, size, strategy).

    ``samples_ns`` holds one sample per round of its group (step + undo:
    map + unmap, or build + free), ``samples_map_ns`` the map step alone
    (mapping cells).  ``ratio`` is the median of the per-round ratios to
    ``baseline``, timed in the same rounds, with its interval.
    """

    layout: str
    npages: int
    strategy: str
    samples_ns: list[float] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    #: What the kernel does on this path for this input (:mod:`pydmabuf.kernel_work`);
    #: None for the references that are no kernel path (c_floor, numpy).
    kernel_work: dict[str, int] | None = None
    #: The kernel-cost estimate (ns per page) and its terms.
    kernel_est_ns_per_page: float | None = None
    kernel_est_terms: list[dict[str, Any]] | None = None
    #: The counts with their detail (what the estimate's terms are made
    #: of), kept to re-cost the cell when the run's unit costs are final.
    kernel_work_detail: dict[str, int] | None = field(default=None, repr=False)
    samples_map_ns: list[float] | None = None
    baseline: str | None = None
    ratio: tuple[float, float, float] | None = None

    @property
    def ns_per_page(self) -> float:
        return float(np.median(self.samples_ns)) / self.npages

    @property
    def spread(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.samples_ns, [25, 75])
        return float(q1) / self.npages, float(q3) / self.npages

    def as_dict(self) -> dict[str, Any]:
        """The cell as JSON: the fields every reader knows (``layout``,
        ``npages``, ``strategy``, ``nbytes``, ``ns_per_page`` and its
        quartiles, ``repeats``, ``counters``), then the interval of the
        median (``ns_per_page_ci``, at ``ci_level``, exact ``ci_coverage``),
        the ratio to the group's ``baseline`` (``ratio_to_baseline``,
        ``ratio_ci``), ``wide_ci`` and the raw samples."""
        med, lo, hi = _stats.median_ci(self.samples_ns, CI_LEVEL)
        d: dict[str, Any] = {"layout": self.layout, "npages": self.npages, "strategy": self.strategy,
                             "nbytes": self.npages * PAGE_SIZE, "ns_per_page": med / self.npages}
        d["ns_per_page_q1"], d["ns_per_page_q3"] = self.spread
        d["repeats"] = len(self.samples_ns)
        d["counters"] = dict(self.counters)
        d["ns_per_page_ci"] = [lo / self.npages, hi / self.npages]
        d["ci_level"] = CI_LEVEL
        d["ci_coverage"] = _stats.coverage(len(self.samples_ns), CI_LEVEL)
        d["baseline"] = self.baseline
        wide = _stats.rel_half_width((med, lo, hi)) > WIDE_CI or d["ci_coverage"] < CI_LEVEL
        if self.ratio is not None and not math.isnan(self.ratio[0]):
            d["ratio_to_baseline"] = self.ratio[0]
            d["ratio_ci"] = [self.ratio[1], self.ratio[2]]
            wide = wide or _stats.rel_half_width(self.ratio) > WIDE_CI
        else:
            d["ratio_to_baseline"] = None
            d["ratio_ci"] = None
        d["wide_ci"] = bool(wide)
        d["kernel_work"] = dict(self.kernel_work) if self.kernel_work is not None else None
        d["kernel_est_ns_per_page"] = self.kernel_est_ns_per_page
        d["kernel_est_terms"] = self.kernel_est_terms
        d["samples_ns"] = [int(x) for x in self.samples_ns]
        if self.samples_map_ns is not None:
            d["samples_map_ns"] = [int(x) for x in self.samples_map_ns]
        return d


def measure(fn: Callable[[], Any], *, min_time: float = 0.05, min_reps: int = 3, max_reps: int = 25) -> list[float]:
    """Time ``fn`` repeatedly after one warm-up call: at least ``min_reps``
    calls, then until ``min_time`` seconds passed or ``max_reps`` calls
    ran; returns the duration of each call in ns (this thread's CPU time,
    as :func:`pydmabuf._stats.interleave` measures it).  To compare several
    callables, time them together with :func:`~pydmabuf._stats.interleave`
    or :func:`~pydmabuf._stats.unit_costs` instead."""
    samples, _ = _stats.interleave({"fn": (fn, _drop)}, min_rounds=min_reps, max_rounds=max_reps,
                                   budget_s=min_time, target=0.0, warmup=1)
    steps, undos = samples["fn"]
    return [float(a + b) for a, b in zip(steps, undos)]


class Progress:
    """A one-line progress display on stderr (only when it is a terminal)."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            el = time.monotonic() - self.t0
            sys.stderr.write(f"\r[{self.done}/{self.total}] {el:5.1f}s {what:<60.60}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _attach_kernel_work(c: Cell, pfns: np.ndarray, dev: Any, units: dict[str, Any] | None, **kw: Any) -> None:
    """Count the kernel's work for cell ``c`` and, with unit costs, its
    estimate.  ``cache``: shared by the cells of one input."""
    w = kernel_work.cell_kernel_work(c.strategy, pfns, dev, detail=True, **kw)
    c.kernel_work = {k: w[k] for k in kernel_work.KEYS}
    c.kernel_work_detail = w
    if units is not None:
        c.kernel_est_terms = kernel_work.estimate_terms(w, units)
        c.kernel_est_ns_per_page = kernel_work.estimate_ns_per_page(c.kernel_est_terms, c.npages)


def _sg_cells(layout: str, npages: int, pfns: np.ndarray, timing: dict[str, Any],
              groups: list[dict[str, Any]] | None = None, units: dict[str, Any] | None = None) -> list[Cell]:
    """The scatterlist walk and its two references on one input, timed in
    interleaved rounds (:func:`pydmabuf._stats.interleave`); the ratios are
    to the C floor.  A sample is the build and the free of the result.
    ``timing["sets"]`` (default 1): how many copies of the input the rounds
    take in turn."""
    table = _core.SgTable.from_pages(pfns)
    segs = int(table.nents)
    meta = int(table.metadata_nbytes)
    del table
    out = _core.floor_buffer(npages, 32)
    counters: dict[str, dict[str, float]] = {
        "sg_from_pages": {"segments": segs, "metadata_bytes_per_page": meta / npages},
        "c_floor": {"segments": _core.floor_coalesce(pfns, 0xFFFFF000, out)},
        "numpy": {"segments": len(workloads.numpy_coalesce(pfns)[1])},
    }

    def make_plans(pfns: np.ndarray, out: Any) -> dict[str, _stats.Plan]:
        return {
            "sg_from_pages": (lambda: _core.SgTable.from_pages(pfns), _drop),
            "c_floor": (lambda: _core.floor_coalesce(pfns, 0xFFFFF000, out), _drop),
            "numpy": (lambda: workloads.numpy_coalesce(pfns), _drop),
        }
    # timing["sets"] sets of the plans, each on its own copy of the frames
    # and its own output buffer, taken in turn (_stats.interleave).
    sets = [make_plans(pfns, out)] + [make_plans(pfns.copy(), _core.floor_buffer(npages, 32))
                                      for _ in range(int(timing.get("sets", 1)) - 1)]
    samples, info = _stats.interleave(sets, baseline="c_floor", **_group_timing(timing, npages))
    if groups is not None:
        groups.append({"layout": layout, "npages": npages, "part": "sg_walk", **info})
    cells = _group_cells(layout, npages, samples, counters, "c_floor", with_map=False)
    for c in cells:
        if c.strategy == "sg_from_pages":  # the references are no kernel path
            _attach_kernel_work(c, pfns, None, units)
    return cells


def _group_timing(timing: dict[str, Any], npages: int) -> dict[str, Any]:
    """The :func:`pydmabuf._stats.interleave` arguments of a group of
    ``npages`` pages from a part's timing (:data:`TIMING`): ``big_budget_s``
    as the budget from ``big_pages`` pages up; ``sets`` is the caller's."""
    out = {k: v for k, v in timing.items() if k not in ("sets", "big_pages", "big_budget_s")}
    if "big_budget_s" in timing and npages >= int(timing.get("big_pages", 0)):
        out["budget_s"] = timing["big_budget_s"]
    return out


def _drop(handle: Any) -> None:
    """The undo of a step whose result is only freed (the handle is dropped
    by the timing loop, inside the undo's time)."""


def _group_cells(layout: str, npages: int, samples: dict[str, tuple[list[int], list[int]]],
                 counters: dict[str, dict[str, float]], baseline: str | None, *, with_map: bool) -> list[Cell]:
    """The cells of one interleaved group: per plan the step + undo samples
    of each round, the ratio of each round to the baseline's same round."""
    totals = {n: [float(a + b) for a, b in zip(st, un)] for n, (st, un) in samples.items()}
    base = totals.get(baseline) if baseline is not None else None
    cells = []
    for name, (st, un) in samples.items():
        c = Cell(layout, npages, name, totals[name], dict(counters[name]))
        if with_map:
            c.samples_map_ns = [float(x) for x in st]
            c.counters["map_ns_per_page"] = float(np.median(st)) / npages
            c.counters["unmap_ns_per_page"] = float(np.median(un)) / npages
        if base is not None:
            c.baseline = baseline
            c.ratio = (1.0, 1.0, 1.0) if name == baseline else _stats.paired_ratio_ci(totals[name], base, CI_LEVEL)
        cells.append(c)
    return cells


# ---------------------------------------------------------------- mapping

#: Mapping strategies of the study, in the order the table prints them.
MAPPING_STRATEGIES = ("sg_iommu", "sg_direct", "link_pages", "link_runs", "ranges_to_table",
                      "dmabuf_static", "dmabuf_dynamic", "dmabuf_ranges", "dmabuf_pal", "pte_floor")
#: The scatterlist baseline the other strategies are compared with.
BASELINE = "sg_iommu"

_BIDI = 0


class _QuietImporter(ImporterOps):
    """The study's dynamic importer: nothing moves the buffer while it runs."""

    def invalidate_mappings(self, attachment: Any) -> None:
        pass


class _QuietPhysImporter(_QuietImporter):
    """The same, declaring the physical-range namespace (dmabuf_ranges)."""

    import_namespaces = frozenset({PHYS_NAMESPACE})


class _QuietPalImporter(_QuietImporter):
    """The same, for the mapping-types PAL path (dmabuf_pal): its ops name
    the module ``pal_map_phys`` is reserved for, as iommufd's do."""

    import_namespaces = frozenset({PAL_MODULE})


class _Bench:
    """The devices of the default machine the study maps for."""

    def __init__(self, machine: Any = None) -> None:
        from pydmabuf.machine import Machine

        # No flush-queue timer: a lazy domain's 10 ms timer reads the wall
        # clock, and a flush landing inside a counted map + unmap would
        # change the counts and the stale window from run to run.
        self.machine = machine or Machine.default(flush_timer=False)
        self.iommu_dev = self.machine.device("gpu0")
        self.direct_dev = self.machine.device("direct0")
        provider = self.machine.device("vfio0").p2p_provider(0)
        if provider is None:
            raise errors.NoDevice(f"machine {self.machine.name!r}: vfio0 has no memory BAR0 to export ranges from")
        self.provider = provider
        # Synthetic layouts start at 4 GiB: keep them in the RAM range there.
        r = self.machine.address_map.lookup(1 << 32)
        self.ram_limit_pfn = (r.end >> 12) if r is not None else None

    def domain_counters(self, dev: Any) -> dict[str, int]:
        if dev.domain is None:
            return {"pte_writes": 0, "iotlb_invalidations": 0}
        dev.domain.flush()  # count the deferred invalidations too
        s = dev.domain.stats
        return {"pte_writes": s["pte_writes"], "iotlb_invalidations": s["iotlb_invalidations"]}


def _bar_ranges(b: _Bench, phys: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The layout's runs placed inside the exporter's BAR (same lengths,
    starts folded into the BAR), as a VFIO exporter's ranges would be."""
    bar = b.provider.bar
    pages = bar.nbytes >> 12
    maxrun = int(lens.max()) >> 12 if len(lens) else 1
    span = max(pages - maxrun, 1)
    starts = (phys >> np.uint64(12)) % np.uint64(span)
    out = np.empty((len(lens), 2), dtype=np.uint64)
    out[:, 0] = np.uint64(bar.cpu_start) + (starts << np.uint64(12))
    out[:, 1] = lens
    return out


def _stale_window(dev: Any) -> tuple[int, int]:
    """(unmaps, bytes) a strategy's unmap left on its domain's flush queue:
    page-table entries cleared, IOTLB not yet invalidated, so a device with
    a cached translation still reaches the old pages
    (:func:`pydmabuf.iotlb.stale_window`; zero on a strict domain and
    without an IOMMU)."""
    if dev is None or dev.domain is None:
        return 0, 0
    w = iotlb.stale_window(dev.domain)
    return w.queued_unmaps, w.queued_bytes


def _mapping_cells(b: _Bench | list[_Bench], layout: str, npages: int, pfns: np.ndarray, timing: dict[str, Any],
                   strategies: Iterable[str], skipped: list[dict[str, Any]] | None = None,
                   groups: list[dict[str, Any]] | None = None,
                   units: dict[str, Any] | None = None) -> list[Cell]:
    """Each strategy's map step and unmap step on one input.

    ``sg_*``: build the table (``sg_alloc_table_from_pages``) and
    ``dma_map_sgtable``; unmap: ``dma_unmap_sgtable``.  ``link_*``:
    ``dma_iova_try_alloc`` + link every range + one sync; unmap:
    ``dma_iova_destroy``.  ``ranges_to_table``: ``dma_buf_phys_vec_to_sgt``
    on the exporter's BAR; unmap: ``dma_buf_free_sgt``.  ``pte_floor``: one
    8-byte write per page, nothing to undo.  Lazy domains are flushed
    after the counting run, so deferred invalidations are counted too.

    ``b``: one machine, or a list of machines: then the strategies are
    timed on as many sets, each on its own machine and its own copies of
    the arrays, taken in turn round by round (:func:`pydmabuf._stats.interleave`),
    so that where one set's memory landed weighs only its share of the
    samples.  The first machine's set is the one counted.
    """
    from pydmabuf import IovaState, dma_buf_free_sgt, dma_buf_phys_vec_to_sgt, dma_map_sgtable, dma_unmap_sgtable

    benches = [b] if isinstance(b, _Bench) else list(b)
    if not benches:
        raise ValueError("_mapping_cells needs at least one machine")
    b = benches[0]
    nbytes = npages * PAGE_SIZE
    cells: list[Cell] = []
    kw_cache: dict[Any, Any] = {}  # page-table work the paths on these pages share
    plans_keep: list[Any] = []

    def make_plans(b: _Bench, pfns: np.ndarray) -> tuple[dict[str, tuple[Any, _stats.Plan]], dict[str, Any]]:
        """Every strategy's (device, (map, unmap)) on machine ``b`` and arrays
        of its own made from ``pfns``; and those arrays."""
        phys, lens = workloads.numpy_coalesce(pfns)
        runs = np.ascontiguousarray(np.stack([phys, lens], axis=1))
        pages = np.empty((npages, 2), dtype=np.uint64)
        pages[:, 0] = pfns << np.uint64(12)
        pages[:, 1] = PAGE_SIZE
        bar_rows = _bar_ranges(b, phys, lens)
        floor_out = _core.floor_buffer(npages, 8)

        def sg(dev: Any) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
            def map_() -> Any:
                t = _core.SgTable.from_pages(pfns)
                dma_map_sgtable(dev, t, _BIDI)
                return t

            def unmap(t: Any) -> None:
                dma_unmap_sgtable(dev, t, _BIDI)
            return map_, unmap

        def link(rows: np.ndarray) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
            dev = b.iommu_dev

            def map_() -> Any:
                st = IovaState.try_alloc(dev, 0, nbytes)
                n = st.link_ranges(rows, _BIDI)
                st.sync(0, n)
                return st, n

            def unmap(h: Any) -> None:
                h[0].destroy(h[1], _BIDI)
            return map_, unmap

        def table() -> tuple[Callable[[], Any], Callable[[Any], Any]]:
            return (lambda: dma_buf_phys_vec_to_sgt(b.iommu_dev, b.provider, bar_rows)), dma_buf_free_sgt

        def dmabuf(dynamic: bool) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
            """The whole dma-buf path: attach, map (under the reservation lock),
            unmap, detach, on a system-heap buffer of exactly these pages."""
            from pydmabuf.dmabuf import export
            from pydmabuf.exporters.system_heap import HeapBuffer

            buf = export(HeapBuffer(b.machine, pfns, nbytes, owned=False, layout=layout, seed=0), nbytes)
            dev = b.iommu_dev

            ops = _QuietImporter() if dynamic else None

            def map_() -> Any:
                a = buf.dynamic_attach(dev, ops)
                return a, a.map_unlocked(_BIDI)

            def unmap(h: Any) -> None:
                a, t = h
                a.unmap_unlocked(t, _BIDI)
                buf.detach(a)
            plans_keep.append(buf)
            return map_, unmap

        def dmabuf_ranges() -> tuple[Callable[[], Any], Callable[[Any], Any]]:
            """An importer that declared the physical-range namespace: attach,
            take the ranges under the lock, link them itself into one IOVA
            range, one sync; undo: destroy the IOVA state, detach."""
            from pydmabuf.dmabuf import export
            from pydmabuf.exporters.system_heap import HeapBuffer

            buf = export(HeapBuffer(b.machine, pfns, nbytes, owned=False, layout=layout, seed=0), nbytes)
            dev = b.iommu_dev

            ops = _QuietPhysImporter()

            def map_() -> Any:
                a = buf.dynamic_attach(dev, ops)
                with buf.resv:
                    rows = a.phys_vec().ranges
                st = IovaState.try_alloc(dev, 0, nbytes)
                n = st.link_ranges(rows, _BIDI)
                st.sync(0, n)
                return a, st, n

            def unmap(h: Any) -> None:
                a, st, n = h
                st.destroy(n, _BIDI)
                buf.detach(a)
            plans_keep.append(buf)
            return map_, unmap

        def dmabuf_pal() -> tuple[Callable[[], Any], Callable[[Any], Any]]:
            """The mapping-types PAL path, as iommufd takes it: attach asking
            for [PAL] (the exporter offers [SGT, PAL]), take the physical
            address list under the lock, link it into one IOVA range, one
            sync; undo: destroy the IOVA state, give the list back under the
            lock, detach."""
            from pydmabuf import mapping
            from pydmabuf.dmabuf import export
            from pydmabuf.exporters.system_heap import PalHeapBuffer

            buf = export(PalHeapBuffer(b.machine, pfns, nbytes, owned=False, layout=layout, seed=0), nbytes)
            dev = b.iommu_dev
            ops = _QuietPalImporter()

            def map_() -> Any:
                a = buf.mapping_attach([mapping.pal_importer()], ops)
                with buf.resv:
                    pl = mapping.pal_map_phys(a)
                st = IovaState.try_alloc(dev, 0, nbytes)
                n = st.link_ranges(pl.ranges, _BIDI)
                st.sync(0, n)
                return a, pl, st, n

            def unmap(h: Any) -> None:
                a, pl, st, n = h
                st.destroy(n, _BIDI)
                with buf.resv:
                    mapping.pal_unmap_phys(a, pl)
                buf.detach(a)
            plans_keep.append(buf)
            return map_, unmap

        plans: dict[str, tuple[Any, _stats.Plan]] = {
            "sg_iommu": (b.iommu_dev, sg(b.iommu_dev)),
            "sg_direct": (b.direct_dev, sg(b.direct_dev)),
            "link_pages": (b.iommu_dev, link(pages)),
            "link_runs": (b.iommu_dev, link(runs)),
            "ranges_to_table": (b.iommu_dev, table()),
            "dmabuf_static": (b.iommu_dev, dmabuf(False)),
            "dmabuf_dynamic": (b.iommu_dev, dmabuf(True)),
            "dmabuf_ranges": (b.iommu_dev, dmabuf_ranges()),
            "dmabuf_pal": (b.iommu_dev, dmabuf_pal()),
            "pte_floor": (None, (lambda: _core.floor_pte(pfns, floor_out), lambda h: None)),
        }
        return plans, {"pages": pages, "runs": runs, "bar_rows": bar_rows}

    counters: dict[str, dict[str, float]] = {}
    timed: dict[str, _stats.Plan] = {}
    try:
        # Set 0 is counted and timed; the other sets are the same plans on fresh
        # machines and fresh copies of the arrays (see _stats.interleave).
        plans, arrays = make_plans(b, pfns)
        pages, runs, bar_rows = arrays["pages"], arrays["runs"], arrays["bar_rows"]
        for name in strategies:
            dev, (map_, unmap) = plans[name]
            try:
                before = b.domain_counters(dev) if dev is not None else None
                h = map_()
                if name in ("dmabuf_static", "dmabuf_dynamic"):
                    segments = int(h[1].nents)
                    meta = float(h[1].metadata_nbytes)
                elif name.startswith("sg_") or name == "ranges_to_table":
                    segments = int(h.nents)
                    meta = float(h.metadata_nbytes) + (16.0 if name == "ranges_to_table" else 0.0)
                elif name.startswith("link_") or name in ("dmabuf_ranges", "dmabuf_pal"):
                    segments = len(pages) if name == "link_pages" else len(runs)
                    # struct dma_iova_state; plus the exporter's phys_vec
                    # array (dma_buf_phys_list: a count and 16 bytes a range)
                    meta = 16.0 + (16.0 * len(runs) if name == "dmabuf_ranges" else 0.0) + \
                        (8.0 + 16.0 * len(runs) if name == "dmabuf_pal" else 0.0)
                else:
                    segments, meta = npages, 0.0
                unmap(h)
                # What the unmap left reachable through cached translations
                # until the flush below (a lazy domain's queued unmaps).
                window = _stale_window(dev)
                after = b.domain_counters(dev) if dev is not None else None
            except Exception as e:  # one strategy failing loses none of the others
                if skipped is None:
                    raise
                skipped.append(_skip(layout, npages, name, e))
                continue
            k: dict[str, float] = {"segments": segments, "metadata_bytes_per_page": meta / npages}
            if before is not None and after is not None:
                k["pte_writes_per_page"] = (after["pte_writes"] - before["pte_writes"]) / npages
                k["iotlb_invalidations"] = after["iotlb_invalidations"] - before["iotlb_invalidations"]
            else:
                k["pte_writes_per_page"] = 1.0 if name == "pte_floor" else 0.0
                k["iotlb_invalidations"] = 0
            k["stale_window_unmaps"], k["stale_window_bytes"] = window
            counters[name] = k
            timed[name] = (map_, unmap)
        if timed:
            sets = [timed]
            for other in benches[1:]:
                more, _ = make_plans(other, pfns.copy())
                sets.append({name: more[name][1] for name in timed})
            # Every strategy of the cell, round-robin within each round.
            samples, info = _stats.interleave(sets, baseline=BASELINE if BASELINE in timed else None,
                                              **_group_timing(timing, npages))
            if groups is not None:
                groups.append({"layout": layout, "npages": npages, "part": "mapping", **info})
            cells = _group_cells(layout, npages, samples, counters, BASELINE if BASELINE in timed else None,
                                 with_map=True)
            for c in cells:
                if c.strategy == "ranges_to_table":
                    from pydmabuf.machine import P2PMapType

                    dev = plans[c.strategy][0]
                    route = b.machine.p2p_map_type(b.provider, b.iommu_dev)
                    _attach_kernel_work(c, pfns, dev, units, bar_ranges=bar_rows,
                                        p2p_iova=route == P2PMapType.THRU_HOST_BRIDGE and dev.domain is not None)
                else:
                    _attach_kernel_work(c, pfns, plans[c.strategy][0], units, cache=kw_cache)
    except BaseException:
        # Interrupted or failed, perhaps between a map and its unmap: let
        # go of the buffers without letting their complaint about a live
        # mapping replace what is propagating.
        for buf in plans_keep:
            try:
                buf.put()
            except errors.DmaBufError as e:
                log.debug("releasing a study buffer after a failure: %s", e)
        raise
    for buf in plans_keep:
        buf.put()
    return cells


def _skip(layout: str, npages: int | None, strategy: str | None, e: BaseException) -> dict[str, Any]:
    """A skipped cell (or group, ``strategy`` None; or layout, ``npages``
    None) and why, for the result's ``skipped`` list."""
    log.debug("skipped %s %s %s", layout, npages, strategy, exc_info=e)
    reason = str(e) or type(e).__name__
    if isinstance(e, MemoryError):
        reason = "out of memory (MemoryError)"
    elif not isinstance(e, (OSError, ValueError)):
        reason = f"{type(e).__name__}: {reason}"
    return {"layout": layout, "npages": npages, "strategy": strategy, "reason": reason}


#: The largest ``pagemap`` buffer a run makes unless asked (``max_real_pages``,
#: or sizes given explicitly on the command line): 256 MiB of real memory.
DEFAULT_MAX_REAL_PAGES = 65536
#: The same for ``--quick``: 16 MiB (touching 256 MiB of fresh memory alone
#: takes about a second).
QUICK_MAX_REAL_PAGES = 4096

#: Interleaved timing (:func:`pydmabuf._stats.interleave`) of a default run
#: and of ``--quick``, per cell group: the mapping strategies, and the walk
#: with its references.
#: ``sets``: how many fresh copies of a group's input (and, for the mapping
#: part, fresh model machines) the rounds take in turn: the same allocation
#: reused for every round of a group made the group's medians move with
#: where that one allocation landed, by 10-25% between processes for
#: buffers of 256 MiB and more; pooled over three, one placement weighs a third.
#: ``big_budget_s``: the budget of a group of ``big_pages`` pages or more,
#: whose rounds are long and few (the small groups reach hundreds of rounds
#: in less time).
TIMING = {
    "mapping": {"min_rounds": 15, "max_rounds": 1000, "budget_s": 0.6, "target": 0.015, "warmup": 2, "cap_s": 2.5,
                "sets": 3, "big_pages": 65536, "big_budget_s": 1.0},
    "sg_walk": {"min_rounds": 15, "max_rounds": 1000, "budget_s": 0.25, "target": 0.015, "warmup": 2, "cap_s": 1.0,
                "sets": 3, "big_pages": 65536, "big_budget_s": 0.3},
}
#: Rounds of the unit-cost loops (:func:`pydmabuf.kernel_work.calibrate`)
#: of a run: (at the start and again at the end, after each group).  A
#: quick run, a few seconds long, calibrates only at its start and end.
CAL_ROUNDS = {"default": (15, 1), "quick": (9, 0)}
QUICK_TIMING = {
    "mapping": {"min_rounds": 3, "max_rounds": 200, "budget_s": 0.03, "target": 0.05, "warmup": 1, "cap_s": 0.3},
    "sg_walk": {"min_rounds": 3, "max_rounds": 200, "budget_s": 0.01, "target": 0.05, "warmup": 1, "cap_s": 0.1},
}


def run_study(
    layouts: Iterable[str] = DEFAULT_LAYOUTS,
    sizes: Iterable[int] = DEFAULT_SIZES,
    *,
    seed: int = 1,
    quick: bool = False,
    progress: bool | None = None,
    parts: Iterable[str] = ("sg_walk", "mapping"),
    machine: Any = None,
    cost_profile: str | dict[str, Any] | None = None,
    max_real_pages: int | None = DEFAULT_MAX_REAL_PAGES,
    result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the study; returns a JSON-ready dict (``machine``, ``cells``,
    ``notes``, ``skipped``, ``timing``, ``groups`` (the rounds each group
    ran, in how many seconds, and why it stopped), ``resources``).

    ``parts``: ``sg_walk`` (the scatterlist walk against the C floor and
    NumPy) and ``mapping`` (each mapping strategy: scatterlist + IOMMU,
    scatterlist + dma-direct, list-free links of pages and of runs,
    ranges -> DMA-only table, and the one-PTE-per-page floor).

    Each (layout, size) is a group, mapped on a machine of its own (a new
    default machine, unless ``machine`` is given): its strategies are timed in
    interleaved rounds until their medians and ratios are tight or the
    group's time budget is spent (``TIMING``, ``QUICK_TIMING``); every
    cell keeps its samples and the confidence interval of its median and
    of its ratio to the group's baseline.

    The arguments are checked before anything runs (TypeError for the
    wrong type, ValueError for an unknown layout or part, a size that is
    not a positive number of pages, or a negative seed); OutOfMemory
    (ENOMEM) for a size whose frame list alone would not fit in the
    memory available.  After that a failing cell, group or layout is
    skipped, said in ``notes`` and listed in ``skipped``, and the run goes
    on.  ``pagemap`` buffers above ``max_real_pages`` pages (None: no cap)
    are skipped with a note: they take that much real memory.

    ``result``: a dict to fill instead of a new one.  It is filled even
    when the run is interrupted (KeyboardInterrupt propagates, the dict
    holds what was measured, ``interrupted`` set), so a caller can still
    write it out.

    ``cost_profile``: the unit costs the host cannot measure (a TOML file's
    path, or :func:`pydmabuf.kernel_work.load_profile`'s result; None: the
    shipped profile).  The host's unit costs are measured once, before the
    cells; every cell carries ``kernel_work`` (the kernel's counts) and
    ``kernel_est_ns_per_page`` (their cost), the result ``unit_costs``.
    """
    layouts, sizes, parts = _study_args(layouts, sizes, parts, machine, seed, max_real_pages)
    timing = QUICK_TIMING if quick else TIMING
    if cost_profile is not None and not isinstance(cost_profile, (str, dict)):
        raise TypeError(f"cost_profile must be a path, a loaded profile or None, not {type(cost_profile).__name__}")
    profile = kernel_work.load_profile(cost_profile) if not isinstance(cost_profile, dict) else cost_profile
    cal_rounds = CAL_ROUNDS["quick" if quick else "default"]
    # The host's unit costs: rounds of the calibration loops at the start,
    # between the groups and at the end, each unit the least of them all.
    cal_raw = kernel_work.calibrate(cal_rounds[0]) if kernel_work.needs_calibration(profile) else None
    units = kernel_work.unit_costs(profile, raw=cal_raw)
    notes: list[str] = []
    skipped: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    cells: list[Cell] = []
    b = _Bench(machine) if "mapping" in parts else None
    out = result if result is not None else {}
    prog = Progress(len(layouts) * len(sizes), progress)
    t0 = time.monotonic()
    interrupted = False
    where = ""

    def skip(lay: str, npages: int | None, strategy: str | None, e: BaseException) -> None:
        skipped.append(_skip(lay, npages, strategy, e))

    try:
        for lay in layouts:
            for npages in sizes:
                where = f"{lay} {_fmt_size(npages * PAGE_SIZE)}"
                prog.step(where)
                if lay == "pagemap" and max_real_pages is not None and npages > max_real_pages:
                    skipped.append({"layout": lay, "npages": npages, "strategy": None,
                                    "reason": f"a {_fmt_size(npages * PAGE_SIZE)} buffer of real memory is opt-in "
                                              f"(above {_fmt_size(max_real_pages * PAGE_SIZE)}; ask for the size "
                                              "with --sizes)"})
                    continue
                try:
                    pfns, keep = workloads.layout(lay, npages, seed, limit_pfn=b.ram_limit_pfn if b else None)
                except (OSError, MemoryError) as e:
                    if lay == "pagemap" and isinstance(e, errors.NotPermitted):
                        note = f"layout {lay!r} skipped: {e}"  # the same for every size: one note
                        if note not in notes:
                            notes.append(note)
                    else:
                        skip(lay, npages, None, e)
                    continue
                try:
                    if "sg_walk" in parts:
                        try:
                            cells.extend(_sg_cells(lay, npages, pfns, timing["sg_walk"], groups, units))
                        except Exception as e:  # noqa: BLE001 - the run goes on; the note says why
                            skip(lay, npages, "sg_walk", e)
                    if b is not None:
                        try:
                            # A fresh default machine per group: the work a path does (page-table
                            # entries it must create, IOVA placement) then depends on the input
                            # alone, not on how many rounds earlier groups ran.
                            # timing["mapping"]["sets"] of them, timed in turn (_mapping_cells).
                            nsets = int(timing["mapping"].get("sets", 1))
                            gb = [b] * nsets if machine is not None else [_Bench() for _ in range(nsets)]
                            cells.extend(_mapping_cells(gb, lay, npages, pfns, timing["mapping"],
                                                        MAPPING_STRATEGIES, skipped, groups, units))
                        except Exception as e:  # noqa: BLE001
                            skip(lay, npages, "mapping", e)
                finally:
                    del pfns, keep
                if cal_raw is not None and cal_rounds[1]:
                    kernel_work.calibrate(cal_rounds[1], into=cal_raw)
        if cal_raw is not None and cells:
            # Each unit the least of all the run's calibration rounds: a
            # shared host runs slow for seconds at a time, and rounds taken
            # at one moment would scale every estimate of the run with it.
            kernel_work.calibrate(cal_rounds[0], into=cal_raw)
            units = kernel_work.unit_costs(profile, raw=cal_raw)
            for c in cells:
                if c.kernel_work_detail is not None:
                    c.kernel_est_terms = kernel_work.estimate_terms(c.kernel_work_detail, units)
                    c.kernel_est_ns_per_page = kernel_work.estimate_ns_per_page(c.kernel_est_terms, c.npages)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        prog.close()
        for sk in skipped:
            what = " ".join(str(x) for x in (sk["layout"], _fmt_size(sk["npages"] * PAGE_SIZE) if sk["npages"]
                                              else None, sk["strategy"]) if x)
            notes.append(f"{what} skipped: {sk['reason']}")
        if interrupted:
            notes.append(f"interrupted during {where}: the cells measured before it are kept")
        out.update({
            "tool": "pydmabuf bench",
            "version": _version(),
            "seed": seed,
            "quick": quick,
            "machine": machine_description(),
            "model": {"machine": b.machine.name if b else None,
                      "iommu_device": b.iommu_dev.name if b else None,
                      "direct_device": b.direct_dev.name if b else None,
                      "exporter": b.provider.owner.name if b else None},
            "timing": {"interleaved": True, "gc_disabled": True, "ci_level": CI_LEVEL, "wide_ci": WIDE_CI,
                       "clock": "thread CPU time (CLOCK_THREAD_CPUTIME_ID) less the clock's own cost",
                       "ci": "order-statistic interval of the median; ratios: median of per-round ratios",
                       **{k: dict(v) for k, v in timing.items()}},
            "groups": groups,
            "unit_costs": units,
            "cells": [c.as_dict() for c in cells],
            "skipped": skipped,
            "interrupted": interrupted,
            "resources": {"seconds": round(time.monotonic() - t0, 3), "peak_rss_bytes": peak_rss()},
            "notes": notes,
        })
    return out


def peak_rss() -> int:
    """The peak resident set size of this process so far, in bytes."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru) * (1 if sys.platform == "darwin" else 1024)


#: The parts of a study.
PARTS = ("sg_walk", "mapping")


def _study_args(layouts: Any, sizes: Any, parts: Any, machine: Any, seed: Any = 1,
                max_real_pages: Any = None) -> tuple[list[str], list[int], list[str]]:
    """:func:`run_study`'s arguments, checked before anything runs:
    TypeError for the wrong type, ValueError for an unknown layout or
    part or a size that is not a positive number of pages of a buffer
    below 2**64 bytes."""
    from pydmabuf.machine import Machine

    if machine is not None and not isinstance(machine, Machine):
        raise TypeError(f"machine must be a Machine or None, not {type(machine).__name__}")
    layouts, sizes, parts = list(layouts), list(sizes), list(parts)
    for lay in layouts:
        if lay not in workloads.LAYOUTS:
            raise ValueError(f"unknown layout {lay!r}; known: {', '.join(workloads.LAYOUTS)}")
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS)}")
    for n in sizes:
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"sizes must be ints (pages), not {type(n).__name__}")
        if n < 1 or n * PAGE_SIZE >> 64:
            raise ValueError(f"size {n} pages: must be at least 1 page and below 2**64 bytes")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must not be negative (got {seed})")
    if max_real_pages is not None and (not isinstance(max_real_pages, int) or isinstance(max_real_pages, bool)):
        raise TypeError(f"max_real_pages must be an int or None, not {type(max_real_pages).__name__}")
    avail = workloads._mem_available()
    for n in sizes:
        # The frame list alone takes 8 bytes a page: a size it does not fit
        # is refused before anything runs.
        if avail is not None and n * 8 > avail:
            raise errors.OutOfMemory(f"size {n} pages: its frame list alone needs {_fmt_size(n * 8)}, more than the "
                                     f"{_fmt_size(avail)} of memory available")
    return layouts, sizes, parts


def _version() -> str:
    from pydmabuf import __version__

    return __version__


def machine_description() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "kernel": platform.release(),
    }


# ------------------------------------------------------------------ output

#: What every cell of a result holds (:meth:`Cell.as_dict`).
_CELL_KEYS = ("layout", "npages", "strategy", "nbytes", "ns_per_page", "ns_per_page_q1", "ns_per_page_q3", "repeats",
              "counters")
#: The counters each kind of cell holds.
_SG_COUNTERS = {"sg_from_pages": ("segments", "metadata_bytes_per_page"), "c_floor": ("segments",),
                "numpy": ("segments",)}
_MAPPING_COUNTERS = ("map_ns_per_page", "unmap_ns_per_page", "segments", "metadata_bytes_per_page",
                     "pte_writes_per_page", "iotlb_invalidations")
_MACHINE_KEYS = ("cpu", "cpus", "python", "numpy")


def _need(d: dict[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(map(repr, missing))}")


def _check_result(result: Any, what: str, *, header: bool = True) -> list[dict[str, Any]]:
    """The cells of a study result (:func:`run_study`, or its JSON read
    back), checked before anything is formatted: TypeError for what is not
    a dict of a list of dict cells, ValueError for a missing key (and, with
    ``header``, the run's description)."""
    if not isinstance(result, dict):
        raise TypeError(f"{what}: a study result is a dict, not {type(result).__name__}")
    _need(result, ("cells",) + (("version", "seed", "machine") if header else ()), f"{what}: the result")
    cells = result["cells"]
    if not isinstance(cells, list):
        raise TypeError(f"{what}: the result's cells are a list, not {type(cells).__name__}")
    if header:
        if not isinstance(result["machine"], dict):
            raise TypeError(f"{what}: the result's machine is a dict, not {type(result['machine']).__name__}")
        _need(result["machine"], _MACHINE_KEYS, f"{what}: the result's machine")
    for c in cells:
        if not isinstance(c, dict):
            raise TypeError(f"{what}: a cell is a dict, not {type(c).__name__}")
        _need(c, _CELL_KEYS, f"{what}: a cell")
        k = c["counters"]
        if not isinstance(k, dict):
            raise TypeError(f"{what}: a cell's counters are a dict, not {type(k).__name__}")
        st = c["strategy"]
        _need(k, _MAPPING_COUNTERS if st in MAPPING_STRATEGIES else _SG_COUNTERS.get(st, ()),
              f"{what}: the counters of a {st!r} cell")
    return cells


def _ratio(num: float, den: float, fmt: str) -> str:
    """``num / den`` formatted, or "-" when ``den`` is not positive (a
    hand-edited or truncated result; a measured time never is)."""
    return format(num / den, fmt) if den > 0 else "-"


def format_table(result: dict[str, Any]) -> str:
    """The study as a table for people.  TypeError or ValueError for what
    is not a study result."""
    cells = _check_result(result, "format_table")
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for c in cells:
        by_key.setdefault((c["layout"], c["npages"]), {})[c["strategy"]] = c
    lines = []
    m = result["machine"]
    lines.append(f"pydmabuf bench {result['version']} on {m['cpu']} ({m['cpus']} CPUs), "
                 f"Python {m['python']}, NumPy {m['numpy']}, seed {result['seed']}")
    lines.append("")
    lines.append("Scatterlist walk (sg_alloc_table_from_pages): ns/page, median [95% interval]; "
                 "core/C paired per round; ~ = interval too wide to trust")
    rows: list[list[str]] = []
    for (lay, npages), strat in by_key.items():
        core = strat.get("sg_from_pages")
        if core is None:
            continue
        floor = strat["c_floor"]
        npy = strat["numpy"]
        lo, hi = core.get("ns_per_page_ci") or (core["ns_per_page_q1"], core["ns_per_page_q3"])
        q = f"{core['ns_per_page']:.2f} [{lo:.2f}-{hi:.2f}]{_wide(core)}"
        rows.append([lay, _fmt_size(npages * PAGE_SIZE), str(core["counters"]["segments"]), q,
                     f"{floor['ns_per_page']:.2f}", f"{npy['ns_per_page']:.2f}",
                     _base_ratio(core, floor, "ns_per_page", ".2f"),
                     _ratio(core["ns_per_page"], npy["ns_per_page"], ".2f"),
                     f"{core['counters']['metadata_bytes_per_page']:.2f}"])
    lines += _columns(["layout", "size", "segments", "core", "C floor", "NumPy", "core/C", "core/NumPy",
                       "meta B/page"], rows, left=1)
    maps = [c for c in cells if c["strategy"] in MAPPING_STRATEGIES]
    if maps:
        lines.append("")
        lines.append("Mapping a buffer, one map + unmap.  kernel est: the kernel's CPU cost, ns/page "
                     "(its counted work x unit costs; --explain CELL shows the terms), x = against sg_iommu; "
                     "map calls, walks, PTE writes/page and IOTLB invalidations: the kernel's counts.  "
                     "model: this model's own CPU time, map and unmap ns/page (medians), +-% half the 95% "
                     "interval of map + unmap, x sg_iommu = model map + unmap against sg_iommu's, paired per "
                     "round, x floor = model map time against the one-PTE-per-page floor; ~ = interval too "
                     "wide to trust.  stale window: unmaps the lazy domain queued x the bytes a cached "
                     "translation still reached until the flush")
        rows = []
        for (lay, npages), strat in by_key.items():
            base = strat.get(BASELINE)
            pte_floor = strat.get("pte_floor")
            for name in MAPPING_STRATEGIES:
                mc = strat.get(name)
                if mc is None:
                    continue
                k = mc["counters"]
                mp = k["map_ns_per_page"]
                rb = _base_ratio(mc, base, "map_ns_per_page", ".2f") + _wide(mc) if base else "-"
                rf = _ratio(mp, pte_floor["counters"]["map_ns_per_page"], ".1f") if pte_floor else "-"
                rows.append([lay, _fmt_size(npages * PAGE_SIZE), name, *_kernel_columns(mc, base), _stale(k), "|",
                             f"{mp:.2f}", f"{k['unmap_ns_per_page']:.2f}", _spread_pct(mc), rb, rf,
                             str(k["segments"]), f"{k['metadata_bytes_per_page']:.2f}"])
            rows.append([])  # a blank line between buffers
        lines += _columns(["layout", "size", "strategy", "kernel est", "x", "map calls", "walks", "PTE w/pg",
                           "IOTLB inv", "stale window", "|", "model map", "unmap", "+-%", "x sg_iommu", "x floor",
                           "segments", "meta B/page"], rows, left=1, text=(2, 10))
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    res = result.get("resources")
    if isinstance(res, dict) and "seconds" in res and "peak_rss_bytes" in res:
        lines.append(f"run: {res['seconds']:.1f} s, peak RSS {res['peak_rss_bytes'] / (1 << 20):.0f} MiB"
                     f"{', interrupted' if result.get('interrupted') else ''}")
    return "\n".join(lines)


def _stale(k: dict[str, Any]) -> str:
    """The stale-IOTLB window a mapping row's unmap left open: queued
    unmaps x the bytes they still expose ("-": none, or a result from
    before the window was counted)."""
    n, b = k.get("stale_window_unmaps"), k.get("stale_window_bytes")
    if not n or b is None:
        return "-"
    return f"{n} x {_fmt_size(int(b))}"


def _kernel_columns(c: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """The kernel's side of a mapping row: the estimate (and its ratio to
    the baseline's), map calls, walks, PTE writes per page, invalidations;
    dashes for a result without them (written before the estimate existed)."""
    est, w = c.get("kernel_est_ns_per_page"), c.get("kernel_work")
    if est is None or not isinstance(w, dict):
        return ["-"] * 6
    b = base.get("kernel_est_ns_per_page") if base else None
    x = _ratio(est, b, ".2f") if b is not None else "-"
    return [f"{est:.2f}", x, str(w["iommu_map_calls"]), str(w["pt_walks"]), f"{w['pte_writes'] / c['npages']:.3f}",
            str(w["iotlb_invalidations"])]


def _columns(header: list[str], rows: list[list[str]], *, left: int = 1, text: tuple[int, ...] = ()) -> list[str]:
    """A plain-text table whose columns are as wide as their widest cell:
    the first ``left`` columns and those in ``text`` left-aligned, numbers
    right-aligned; an empty row is a blank line."""
    widths = [max([len(h)] + [len(r[i]) for r in rows if r]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return " ".join(c.ljust(w) if i < left or i in text else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    head = line(header)
    return [head, "-" * len(head)] + [line(r) if r else "" for r in rows]


def _spread_pct(c: dict[str, Any]) -> str:
    """Half the 95% interval of the median (map + unmap) as a percentage
    of the median; half the interquartile range for a result without
    intervals."""
    med = c["ns_per_page"]
    if not med:
        return "-"
    lo, hi = c.get("ns_per_page_ci") or (c["ns_per_page_q1"], c["ns_per_page_q3"])
    return f"{50.0 * (hi - lo) / med:.0f}"


def _wide(c: dict[str, Any]) -> str:
    """The table's mark of a cell whose interval is too wide to trust."""
    return "~" if c.get("wide_ci") else ""


def _base_ratio(c: dict[str, Any], base: dict[str, Any], counter: str, fmt: str) -> str:
    """A cell against its group's baseline: the paired per-round ratio the
    cell holds when ``base`` is that baseline, else the ratio of the two
    cells' ``counter`` (a result without paired ratios)."""
    if c.get("baseline") == base["strategy"] and c.get("ratio_to_baseline") is not None:
        return format(c["ratio_to_baseline"], fmt)
    num = c["counters"].get(counter, c["ns_per_page"]) if counter != "ns_per_page" else c["ns_per_page"]
    den = base["counters"].get(counter, base["ns_per_page"]) if counter != "ns_per_page" else base["ns_per_page"]
    return _ratio(num, den, fmt)


def format_markdown(result: dict[str, Any], sizes: Iterable[int] | None = None) -> str:
    """A Markdown summary of the mapping part, for a README: per buffer
    size, one row per layout, one column per strategy, each cell its cost
    in ns/page and its ratio to the scatterlist + IOMMU baseline.

    The cost is the kernel CPU estimate (``kernel_est_ns_per_page``) when
    every mapping cell has one, else the model's own CPU time of map +
    unmap (median; the ratio is the paired per-round one); the text says
    which.  A ``~`` marks a cell whose interval is too wide to trust.
    TypeError or ValueError for what is not a study result."""
    all_cells = _check_result(result, "format_markdown")
    model = result.get("model")
    if not isinstance(model, dict) or "iommu_device" not in model:
        raise ValueError("format_markdown: the result lacks the model's 'iommu_device'")
    m = result["machine"]
    cells = [c for c in all_cells if c["strategy"] in MAPPING_STRATEGIES]
    have = sorted({c["npages"] for c in cells})
    want = [n for n in (sizes if sizes is not None else have) if n in have]
    by: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    layouts: list[str] = []
    for c in cells:
        by.setdefault((c["npages"], c["layout"]), {})[c["strategy"]] = c
        if c["layout"] not in layouts:
            layouts.append(c["layout"])
    quantity, _ = plot_quantity(cells)
    res = result.get("resources")
    run = (f" The run took {res['seconds']:.0f} s, peak RSS {res['peak_rss_bytes'] / (1 << 20):.0f} MiB."
           if isinstance(res, dict) and "seconds" in res and "peak_rss_bytes" in res else "")
    out = [f"Measured with `pydmabuf bench` {result['version']} (seed {result['seed']}"
           f"{', --quick' if result.get('quick') else ''}) on {m['cpu']}, {m['cpus']} CPUs, "
           f"Linux {m.get('kernel', '?')}, Python {m['python']}, NumPy {m['numpy']}; "
           f"model: the default machine, importer {model['iommu_device']} behind its IOMMU.{run}",
           ""]
    if quantity == "kernel_est_ns_per_page":
        out.append("Kernel CPU estimate of map + unmap in ns per 4 KiB page (`kernel_est_ns_per_page`: the exact "
                   "kernel work of the path times unit costs), and in brackets its ratio to `sg_iommu` (build a "
                   "scatterlist, `dma_map_sgtable` through the IOMMU).")
    else:
        out.append("Model CPU time of map + unmap in ns per 4 KiB page (median of interleaved rounds; the "
                   "model's own cost, not a kernel estimate), and in brackets its ratio to `sg_iommu` (build a "
                   "scatterlist, `dma_map_sgtable` through the IOMMU), paired per round; ~ marks a cell whose "
                   "95% interval is wider than +-5%.")
    out.append("")
    for npages in want:
        out.append(f"**{_fmt_size(npages * PAGE_SIZE)}**")
        out.append("")
        out.append("| layout | " + " | ".join(MAPPING_STRATEGIES) + " |")
        out.append("|---|" + "---:|" * len(MAPPING_STRATEGIES))
        for lay in layouts:
            row = by.get((npages, lay))
            if not row:
                continue
            base = row.get(BASELINE)
            cols = []
            for name in MAPPING_STRATEGIES:
                mc = row.get(name)
                if mc is None:
                    cols.append("-")
                    continue
                if quantity == "kernel_est_ns_per_page":
                    v = _kernel_est(mc) or 0.0
                    bv = _kernel_est(base) if base else None
                    ratio = f" ({_ratio(v, bv, '.2f')})" if bv is not None else ""
                else:
                    v = float(mc["ns_per_page"])
                    ratio = f" ({_base_ratio(mc, base, 'ns_per_page', '.2f')})" if base else ""
                cols.append(f"{v:.2f}{ratio}{_wide(mc) if quantity == 'ns_per_page' else ''}")
            out.append(f"| {lay} | " + " | ".join(cols) + " |")
        out.append("")
    walks = [c for c in all_cells if c["strategy"] == "sg_from_pages"]
    if walks:
        big = max(c["npages"] for c in walks)
        out.append(f"**Scatterlist walk** (`sg_alloc_table_from_pages`) on {_fmt_size(big * PAGE_SIZE)}, ns per page "
                   "(median), against the C floor and the NumPy code a user would write, run on the same PFNs:")
        out.append("")
        out.append("| layout | segments | core | C floor | NumPy | core / C | core / NumPy |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        at_big = {(c["layout"], c["strategy"]): c for c in all_cells if c["npages"] == big}
        for lay in layouts or sorted({c["layout"] for c in walks}):
            core, floor, npy = (at_big.get((lay, k)) for k in ("sg_from_pages", "c_floor", "numpy"))
            if core is None or floor is None or npy is None:
                continue
            out.append(f"| {lay} | {core['counters']['segments']} | {core['ns_per_page']:.2f} | "
                       f"{floor['ns_per_page']:.2f} | {npy['ns_per_page']:.2f} | "
                       f"{_base_ratio(core, floor, 'ns_per_page', '.2f')} | "
                       f"{_ratio(core['ns_per_page'], npy['ns_per_page'], '.2f')} |")
        out.append("")
    for n in result.get("notes", []):
        out.append(f"Note: {n}")
    return "\n".join(out).rstrip() + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """One row per cell: counters flattened (``counter_*``), intervals as
    ``*_lo`` and ``*_hi``, other dicts (``kernel_work``) as ``<key>_*``;
    the raw samples are left to the JSON.  TypeError or ValueError for
    what is not a study result."""
    rows = []
    keys: list[str] = []
    for c in _check_result(result, "to_csv", header=False):
        row: dict[str, Any] = {}
        for k, v in c.items():
            if k in ("counters", "kernel_work", "kernel_est_terms") or k.startswith("samples_"):
                continue
            if isinstance(v, list) and len(v) == 2:
                row[f"{k}_lo"], row[f"{k}_hi"] = v
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    row[f"{k}_{kk}"] = vv
            else:
                row[k] = v
        for k, v in c["counters"].items():
            row[f"counter_{k}"] = v
        for k in kernel_work.KEYS:  # empty for a reference cell, which is no kernel path
            kw = c.get("kernel_work")
            row[f"kernel_{k}"] = kw[k] if isinstance(kw, dict) else ""
        for t in c.get("kernel_est_terms") or ():
            row[f"kernel_est_ns_{t['count_of'].replace(' (', '_').rstrip(')')}"] = t["ns"]
        for k in row:
            if k not in keys:
                keys.append(k)
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def explain(result: dict[str, Any], cell: str) -> str:
    """The kernel-cost estimate of one cell of ``result`` written out term by
    term (:func:`pydmabuf.kernel_work.format_explain`).  ``cell`` is
    ``LAYOUT:PAGES:STRATEGY``, e.g. ``scattered:65536:sg_iommu``.  ValueError
    for a malformed cell or one the result does not hold."""
    lay, npages, strat = kernel_work.parse_cell(cell)
    for c in _check_result(result, "explain", header=False):
        if (c["layout"], c["npages"], c["strategy"]) == (lay, npages, strat):
            return kernel_work.format_explain(c, result.get("unit_costs"))
    raise ValueError(f"cell {cell!r} is not in this result")


def to_json(result: dict[str, Any]) -> str:
    """The result as indented JSON, each list of samples on one line."""
    cells = result.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        return json.dumps(result, indent=2, sort_keys=False) + "\n"
    compact: dict[str, str] = {}
    shown = []
    for i, c in enumerate(cells):
        d = dict(c)
        for k, v in c.items():
            if k.startswith("samples_") and isinstance(v, list):
                token = f"@@pydmabuf-samples-{i}-{k}@@"
                compact[json.dumps(token)] = json.dumps(v, separators=(",", ":"))
                d[k] = token
        shown.append(d)
    text = json.dumps({**result, "cells": shown}, indent=2, sort_keys=False)
    for token, samples in compact.items():
        text = text.replace(token, samples, 1)
    return text + "\n"


# ------------------------------------------------------------- plot, compare


#: The work counts of the second figure: (kernel_work key, the model
#: counter used when a cell has no kernel_work, label).
_WORK_PANELS = (("pte_writes", "pte_writes_per_page", "PTE writes / page"),
                ("iotlb_invalidations", "iotlb_invalidations", "IOTLB invalidations / page"),
                ("metadata_bytes", "metadata_bytes_per_page", "metadata bytes / page"))


def _size_label(nbytes: float, _pos: Any = None) -> str:
    """A tick label: 4 KiB, 16 MiB, 4 GiB."""
    n = int(round(nbytes))
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{n} B"


def plot_quantity(cells: list[dict[str, Any]]) -> tuple[str, str]:
    """What the main figure draws: ``("kernel_est_ns_per_page", "kernel
    CPU estimate")`` when every mapping cell has a kernel estimate, else
    ``("ns_per_page", "model CPU time")``, the model's own cost."""
    if cells and all(_kernel_est(c) is not None for c in cells):
        return "kernel_est_ns_per_page", "kernel CPU estimate"
    return "ns_per_page", "model CPU time"


def plot(result: dict[str, Any], path: str) -> list[str]:
    """Draw the study; returns the paths written.

    ``path`` (PNG): one panel per layout, ns/page on a log axis against
    the buffer size, one line per mapping strategy with its 95% band, the
    legend once.  It draws ``kernel_est_ns_per_page`` when the cells have
    it, else the model's own CPU time, and says which on its axis.  Points
    whose interval is too wide to trust are drawn hollow.  A second
    figure, ``<path stem>-work.png``, draws the work counts per page (PTE
    writes, IOTLB invalidations, metadata bytes) from each cell's
    ``kernel_work``, or from the model's counters when cells have none.
    Needs matplotlib (``pip install 'pydmabuf[plot]'``).  TypeError or
    ValueError for what is not a study result or has nothing to draw.
    """
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # the optional [plot] extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'pydmabuf[plot]'") from None
    cells = [c for c in _check_result(result, "plot") if c["strategy"] in MAPPING_STRATEGIES]
    layouts = list(dict.fromkeys(c["layout"] for c in cells))
    if not layouts:
        raise ValueError("plot: the result has no mapping cells to draw")
    strategies = [s for s in MAPPING_STRATEGIES if any(c["strategy"] == s for c in cells)]
    sizes = sorted({float(c["nbytes"]) for c in cells})
    colors = {s: f"C{i}" for i, s in enumerate(strategies)}
    quantity, ylabel = plot_quantity(cells)
    m = result["machine"]
    title = (f"pydmabuf bench {result['version']} - {m['cpu']}, {m['cpus']} CPUs, seed {result['seed']}"
             f"{', --quick' if result.get('quick') else ''}")

    def panels(nrows: int) -> tuple[Any, Any]:
        ncols = min(len(layouts), 3)
        rows_per = -(-len(layouts) // ncols)
        fig, axes = plt.subplots(nrows * rows_per, ncols, figsize=(4.6 * ncols, 3.6 * nrows * rows_per + 0.9),
                                 squeeze=False, sharex=True)
        return fig, axes

    def style(ax: Any, lay: str, ylab: str | None) -> None:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_size_label))
        ax.tick_params(axis="x", labelsize=7, labelbottom=True, labelrotation=30)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(lay, fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.set_xlabel("buffer size", fontsize=8)
        if ylab:
            ax.set_ylabel(ylab, fontsize=8)

    def finish(fig: Any, axes: Any, used: int, out: str, note: str) -> None:
        flat = list(axes.flat)
        for ax in flat[used:]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=colors[s], marker="o", ms=4, label=s) for s in strategies]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
        fig.suptitle(f"{title}\n{note}", fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(out, dpi=110)
        plt.close(fig)

    fig, axes = panels(1)
    flat = list(axes.flat)
    for i, lay in enumerate(layouts):
        ax = flat[i]
        for s in strategies:
            pts = sorted((c["nbytes"], c) for c in cells if c["layout"] == lay and c["strategy"] == s)
            if not pts:
                continue
            xs = np.array([n for n, _ in pts], dtype=np.float64)
            if quantity == "kernel_est_ns_per_page":
                ys = np.array([_kernel_est(c) for _, c in pts], dtype=np.float64)
                band = [c.get("kernel_est_ci") for _, c in pts]
            else:
                ys = np.array([c["ns_per_page"] for _, c in pts], dtype=np.float64)
                band = [c.get("ns_per_page_ci") for _, c in pts]
            ys[ys <= 0] = np.nan  # a log axis has no zero
            ax.plot(xs, ys, color=colors[s], lw=1.2, marker="o", ms=3)
            wide = np.array([bool(c.get("wide_ci")) for _, c in pts])
            if wide.any():
                ax.plot(xs[wide], ys[wide], ls="none", marker="o", ms=6, mfc="white", mec=colors[s])
            bounds = [b for b in band if isinstance(b, list) and len(b) == 2]
            if len(bounds) == len(band):
                lo = np.array([b[0] for b in bounds], dtype=np.float64)
                hi = np.array([b[1] for b in bounds], dtype=np.float64)
                lo[lo <= 0] = np.nan
                ax.fill_between(xs, lo, hi, color=colors[s], alpha=0.18, lw=0)
        style(ax, lay, f"{ylabel}, ns/page" if i % axes.shape[1] == 0 else None)
    finish(fig, axes, len(layouts), path,
           "model CPU time of map + unmap (median; band: 95% interval; hollow: too wide to trust) - "
           "the model's own cost, not a kernel estimate" if quantity == "ns_per_page"
           else "kernel CPU estimate of map + unmap: exact work counts x unit costs (kernel_est_ns_per_page)")
    written = [path]

    stem = path[:-4] if path.lower().endswith(".png") else path
    work_path = f"{stem}-work.png"
    has_work = all(isinstance(c.get("kernel_work"), dict) for c in cells)
    fig, axes = plt.subplots(len(_WORK_PANELS), len(layouts), figsize=(3.4 * len(layouts), 2.9 * len(_WORK_PANELS)
                                                                       + 0.9), squeeze=False, sharex=True,
                             sharey="row")
    for row, (key, counter, label) in enumerate(_WORK_PANELS):
        for col, lay in enumerate(layouts):
            ax = axes[row][col]
            for s in strategies:
                pts = sorted((c["nbytes"], c) for c in cells if c["layout"] == lay and c["strategy"] == s)
                xs = np.array([n for n, _ in pts], dtype=np.float64)
                if has_work:
                    ys = np.array([float(c["kernel_work"].get(key, np.nan)) / c["npages"] for _, c in pts])
                else:
                    ys = np.array([float(c["counters"].get(counter, np.nan)) / (c["npages"] if counter ==
                                   "iotlb_invalidations" else 1) for _, c in pts])
                ys[ys <= 0] = np.nan
                ax.plot(xs, ys, color=colors[s], lw=1.2, marker="o", ms=3)
            style(ax, lay if row == 0 else "", label if col == 0 else None)
    finish(fig, axes, axes.size, work_path,
           ("work per page from each cell's kernel_work (exact counts)" if has_work
            else "work per page from the model's counters (cells have no kernel_work)") + "; zero is not drawn")
    written.append(work_path)
    return written


def _est(c: dict[str, Any]) -> tuple[float, float, float] | None:
    """A cell's ns/page with its interval: the stored interval, else one
    computed from its samples, else None (a result without either)."""
    v = float(c["ns_per_page"])
    ci = c.get("ns_per_page_ci")
    if isinstance(ci, list) and len(ci) == 2:
        return v, float(ci[0]), float(ci[1])
    samples = c.get("samples_ns")
    if isinstance(samples, list) and samples:
        _, lo, hi = _stats.median_ci(samples, CI_LEVEL)
        return v, lo / c["npages"], hi / c["npages"]
    return None


def _ratio_est(c: dict[str, Any]) -> tuple[float, float, float] | None:
    """A cell's ratio to its baseline with its interval, None where the
    cell has none (its own baseline, or an older result)."""
    r = c.get("ratio_to_baseline")
    ci = c.get("ratio_ci")
    if r is None or c.get("baseline") in (None, c["strategy"]) or not isinstance(ci, list) or len(ci) != 2:
        return None
    return float(r), float(ci[0]), float(ci[1])


def _work_key(c: dict[str, Any]) -> tuple[Any, ...]:
    """What a cell's input made the path do: its counters other than
    times, and its kernel work when it has one."""
    k = tuple(sorted((n, v) for n, v in c["counters"].items() if not n.endswith("ns_per_page")))
    w = c.get("kernel_work")
    return k + (tuple(sorted(w.items())) if isinstance(w, dict) else ())


def _kernel_est(c: dict[str, Any]) -> float | None:
    v = c.get("kernel_est_ns_per_page", c["counters"].get("kernel_est_ns_per_page"))
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _num(v: float) -> str:
    """A time or ratio with three or four significant digits, no exponent."""
    if math.isnan(v):
        return "nan"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _fmt_ci(e: tuple[float, float, float] | None, fmt: str | None = None) -> str:
    """``value [low-high]``, with ``fmt`` or :func:`_num`; "-" for None."""
    if e is None:
        return "-"
    f = (lambda v: format(v, fmt)) if fmt else _num
    return f"{f(e[0])} [{f(e[1])}-{f(e[2])}]"


def compare(old: dict[str, Any], new: dict[str, Any], *, show_all: bool = False, tol: float = 0.10,
            min_effect: float = 0.02) -> str:
    """Which cells of two results differ significantly, and how well the
    two runs agree.

    For every cell both results have, ``new / old`` of the ns/page
    (median of map + unmap) with a 95% interval combining the two cells'
    intervals (:func:`pydmabuf._stats.ratio_of_medians_ci`); the same for
    every ratio to the baseline of the cell's group (``strategy /
    sg_iommu``, ``... / c_floor``).  A difference is significant when its
    interval excludes 1 and it is at least ``min_effect`` (relative).
    Only significant rows are listed unless ``show_all``.  The summary
    gives the agreement fractions: how many ratio cells, ns/page cells and
    (when the results have them) ``kernel_est_ns_per_page`` cells agree
    within ``+-tol``.  TypeError or ValueError for what is not a study
    result.
    """
    old_cells = _check_result(old, "compare old", header=False)
    new_cells = _check_result(new, "compare new", header=False)

    def key(c: dict[str, Any]) -> tuple[str, int, str]:
        return (c["layout"], c["npages"], c["strategy"])

    a = {key(c): c for c in old_cells}
    pairs = [(a[key(c)], c) for c in new_cells if key(c) in a]
    if not pairs:
        return "no cells in common"
    # A group whose work differs between the runs had a different input
    # (the pagemap layout reads the frames of a new buffer each run): its
    # times are not a measure of reproducibility.
    differs = sorted({(c["layout"], c["npages"]) for o, c in pairs if _work_key(o) != _work_key(c)},
                     key=lambda g: (g[0], g[1]))
    rows: list[str] = []
    ratio_rows: list[str] = []
    n_sig = n_rsig = 0
    ns_pairs: list[tuple[float, float]] = []
    base_pairs: list[tuple[float, float]] = []
    other_ratio_pairs: list[tuple[float, float]] = []
    est_pairs: list[tuple[float, float]] = []
    same: dict[str, list[tuple[float, float]]] = {"base": [], "other": [], "ns": [], "est": []}
    ratios: list[float] = []
    for o, c in pairs:
        where = f"{c['layout']:<11} {_fmt_size(c['nbytes']):>8} {c['strategy']:<16}"
        on, nn = float(o["ns_per_page"]), float(c["ns_per_page"])
        same_input = (c["layout"], c["npages"]) not in differs
        ns_pairs.append((on, nn))
        if same_input:
            same["ns"].append((on, nn))
        ratios.append(nn / on if on > 0 else float("nan"))
        eo, en = _est(o), _est(c)
        if eo is not None and en is not None:
            rr = _stats.ratio_of_medians_ci(en, eo)
            sig = _stats.significant(rr, min_effect)
        else:
            rr, sig = (nn / on if on > 0 else math.nan, math.nan, math.nan), False
        n_sig += sig
        if sig or show_all:
            rows.append(f"{where} {_fmt_ci(eo):>26} {_fmt_ci(en):>26} {_fmt_ci(rr, '.3f'):>23} {'*' if sig else ''}")
        ro, rn = _ratio_est(o), _ratio_est(c)
        if ro is not None and rn is not None and o.get("baseline") == c.get("baseline"):
            kind = "base" if c.get("baseline") == BASELINE else "other"
            (base_pairs if kind == "base" else other_ratio_pairs).append((ro[0], rn[0]))
            if same_input:
                same[kind].append((ro[0], rn[0]))
            q = _stats.ratio_of_medians_ci(rn, ro)
            qsig = _stats.significant(q, min_effect)
            n_rsig += qsig
            if qsig or show_all:
                ratio_rows.append(f"{where} {'/ ' + str(c['baseline']):<10} {_fmt_ci(ro):>23} {_fmt_ci(rn):>23} "
                                  f"{_fmt_ci(q, '.3f'):>23} {'*' if qsig else ''}")
        ko, kn = _kernel_est(o), _kernel_est(c)
        if ko is not None and kn is not None:
            est_pairs.append((ko, kn))
            if same_input:
                same["est"].append((ko, kn))
    out = [f"Compared: {len(pairs)} cells in common.  Intervals are 95%; * = significant: the interval of new/old "
           f"excludes 1 and new/old is at least {min_effect:.0%} away from 1."]
    out.append("")
    out.append("ns/page (map + unmap, median [interval])" + ("" if show_all else ", significant differences only"))
    hdr = f"{'layout':<11} {'size':>8} {'strategy':<16} {'old':>26} {'new':>26} {'new/old':>23}"
    out += [hdr, "-" * len(hdr)] + (rows or ["(none)"])
    out.append("")
    out.append("Ratios to the baseline of the cell (same run, paired rounds)"
               + ("" if show_all else ", significant differences only"))
    hdr = f"{'layout':<11} {'size':>8} {'strategy':<16} {'ratio':<10} {'old':>23} {'new':>23} {'new/old':>23}"
    out += [hdr, "-" * len(hdr)] + (ratio_rows or ["(none)"])
    out.append("")
    pos = [r for r in ratios if r > 0]  # a zero time has no ratio (a measured one is never zero)
    geo = f"{float(np.exp(np.mean(np.log(pos)))):.3f}" if pos else "-"
    out.append(f"{len(ratios)} cells in common; geometric mean new/old = {geo}")
    out.append(f"significant differences: {n_sig} of {len(pairs)} cells, {n_rsig} of "
               f"{len(base_pairs) + len(other_ratio_pairs)} ratios")

    def frac(name: str, ps: list[tuple[float, float]], kind: str) -> str:
        ok, n = _stats.agreement(ps, tol)
        if not n:
            return f"  {name}: none in both results"
        line = f"  {name}: {ok}/{n} = {ok / n:.1%}"
        if differs:
            ok, n = _stats.agreement(same[kind], tol)
            line += f"; on the same input: {ok}/{n} = {ok / n:.1%}" if n else "; none on the same input"
        return line

    out.append(f"agreement within +-{tol:.0%}:")
    out.append(frac(f"ratio cells (strategy / {BASELINE})", base_pairs, "base"))
    out.append(frac("other ratio cells (walk / c_floor)", other_ratio_pairs, "other"))
    out.append(frac("ns/page cells", ns_pairs, "ns"))
    out.append(frac("kernel_est_ns_per_page cells", est_pairs, "est"))
    if differs:
        out.append(f"the input differs between the runs (other work counts) in {len(differs)} groups: "
                   + ", ".join(f"{lay} {_fmt_size(n * PAGE_SIZE)}" for lay, n in differs))
    return "\n".join(out)
