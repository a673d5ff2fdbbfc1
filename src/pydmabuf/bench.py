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
C floor compiled beside the core (``pydmabuf._floors.floor_coalesce``) and the
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

from pydmabuf import _core, _floors, _stats, errors, kernel_work, mapping, workloads
from pydmabuf._about import VERSION
from pydmabuf._types import PAGE_SIZE, _fmt_size
from pydmabuf.bench_cells import (_BIDI, BASELINE, CI_LEVEL, MAPPING_STRATEGIES, WIDE_CI, _Bench, _bar_ranges,
                                  _QuietImporter, _QuietPalImporter, _QuietPhysImporter,
                                  _stale_window)
from pydmabuf.bench_report import (_work_key, compare, explain, format_markdown, format_table, plot, plot_quantity,
                                   to_csv, to_json)
from pydmabuf.dma import IovaState, dma_map_sgtable, dma_unmap_sgtable
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import export
from pydmabuf.exporters.system_heap import HeapBuffer, PalHeapBuffer
from pydmabuf.machine import Device, Machine, P2PMapType

__all__ = ["Cell", "measure", "Progress", "run_study", "peak_rss", "machine_description", "MAPPING_STRATEGIES",
           "BASELINE", "CI_LEVEL", "WIDE_CI", "DEFAULT_SIZES", "QUICK_SIZES", "DEFAULT_LAYOUTS", "PARTS", "TIMING",
           "QUICK_TIMING", "DEFAULT_MAX_REAL_PAGES", "QUICK_MAX_REAL_PAGES", "format_table", "format_markdown",
           "to_csv", "to_json", "explain", "plot", "plot_quantity", "compare"]

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 16, 256, 4096, 65536, 1 << 20)  # pages: 4 KiB .. 4 GiB
QUICK_SIZES = (16, 4096, 65536)
DEFAULT_LAYOUTS = ("contiguous", "fragmented", "scattered", "thp", "pagemap")



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


def _attach_kernel_work(c: Cell, pfns: np.ndarray, dev: Device | None, units: dict[str, Any] | None,
                        **kw: Any) -> None:
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
    out = _floors.floor_buffer(npages, 32)
    counters: dict[str, dict[str, float]] = {
        "sg_from_pages": {"segments": segs, "metadata_bytes_per_page": meta / npages},
        "c_floor": {"segments": _floors.floor_coalesce(pfns, 0xFFFFF000, out)},
        "numpy": {"segments": len(workloads.numpy_coalesce(pfns)[1])},
    }

    def make_plans(pfns: np.ndarray, out: Any) -> dict[str, _stats.Plan]:
        return {
            "sg_from_pages": (lambda: _core.SgTable.from_pages(pfns), _drop),
            "c_floor": (lambda: _floors.floor_coalesce(pfns, 0xFFFFF000, out), _drop),
            "numpy": (lambda: workloads.numpy_coalesce(pfns), _drop),
        }
    # timing["sets"] sets of the plans, each on its own copy of the frames
    # and its own output buffer, taken in turn (_stats.interleave).
    sets = [make_plans(pfns, out)] + [make_plans(pfns.copy(), _floors.floor_buffer(npages, 32))
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
        floor_out = _floors.floor_buffer(npages, 8)

        def sg(dev: Device) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
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
            "pte_floor": (None, (lambda: _floors.floor_pte(pfns, floor_out), lambda h: None)),
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
    machine: Machine | None = None,
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
    return VERSION


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
