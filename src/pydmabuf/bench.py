"""``pydmabuf bench``: the mapping-throughput study.

A study is a grid of cells (page layout x buffer size x strategy).  Each
cell is timed over repeated runs on the same input and reported in ns per
page (median, with the spread of the middle half), beside references run in
the same process on the same input: the C floor compiled into the core
(``pydmabuf._core.floor_coalesce``) and the NumPy code a user would write
(:func:`pydmabuf.workloads.numpy_coalesce`).

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
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from pydmabuf import _core, errors, kernel_work, workloads
from pydmabuf._types import PAGE_SIZE, _fmt_size
from pydmabuf.dmabuf import PHYS_NAMESPACE, ImporterOps

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 16, 256, 4096, 65536, 1 << 20)  # pages: 4 KiB .. 4 GiB
QUICK_SIZES = (16, 4096, 65536)
DEFAULT_LAYOUTS = ("contiguous", "fragmented", "scattered", "thp", "pagemap")


@dataclass
class Cell:
    """One measured (layout, size, strategy)."""

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

    @property
    def ns_per_page(self) -> float:
        return float(np.median(self.samples_ns)) / self.npages

    @property
    def spread(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.samples_ns, [25, 75])
        return float(q1) / self.npages, float(q3) / self.npages

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nbytes"] = self.npages * PAGE_SIZE
        d["ns_per_page"] = self.ns_per_page
        d["ns_per_page_q1"], d["ns_per_page_q3"] = self.spread
        d["repeats"] = len(self.samples_ns)
        del d["samples_ns"]
        return d


def measure(fn: Callable[[], Any], *, min_time: float = 0.05, min_reps: int = 3, max_reps: int = 25) -> list[float]:
    """Time ``fn`` repeatedly; returns the duration of each call in ns."""
    fn()  # warm up (page faults, caches)
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < max_reps and (len(out) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter_ns()
        fn()
        out.append(float(time.perf_counter_ns() - t0))
    return out


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
    if units is not None:
        c.kernel_est_terms = kernel_work.estimate_terms(w, units)
        c.kernel_est_ns_per_page = kernel_work.estimate_ns_per_page(c.kernel_est_terms, c.npages)


def _sg_cells(layout: str, npages: int, pfns: np.ndarray, timing: dict[str, Any],
              units: dict[str, Any] | None = None) -> list[Cell]:
    """The scatterlist walk and its two references on one input."""
    cells = []
    table = _core.SgTable.from_pages(pfns)
    segs = int(table.nents)
    meta = int(table.metadata_nbytes)
    c = Cell(layout, npages, "sg_from_pages", measure(lambda: _core.SgTable.from_pages(pfns), **timing))
    c.counters = {"segments": segs, "metadata_bytes_per_page": meta / npages}
    _attach_kernel_work(c, pfns, None, units)
    cells.append(c)
    out = _core.floor_buffer(npages, 32)
    c = Cell(layout, npages, "c_floor", measure(lambda: _core.floor_coalesce(pfns, 0xFFFFF000, out), **timing))
    c.counters = {"segments": _core.floor_coalesce(pfns, 0xFFFFF000, out)}
    cells.append(c)
    c = Cell(layout, npages, "numpy", measure(lambda: workloads.numpy_coalesce(pfns), **timing))
    c.counters = {"segments": len(workloads.numpy_coalesce(pfns)[1])}
    cells.append(c)
    return cells


# ---------------------------------------------------------------- mapping

#: Mapping strategies of the study, in the order the table prints them.
MAPPING_STRATEGIES = ("sg_iommu", "sg_direct", "link_pages", "link_runs", "ranges_to_table",
                      "dmabuf_static", "dmabuf_dynamic", "dmabuf_ranges", "pte_floor")
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


class _Bench:
    """The devices of the default machine the study maps for."""

    def __init__(self, machine: Any = None) -> None:
        from pydmabuf.machine import Machine

        self.machine = machine or Machine.default()
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


def measure_pair(setup: Callable[[], Any], teardown: Callable[[Any], Any], *, min_time: float = 0.05,
                 min_reps: int = 3, max_reps: int = 25) -> tuple[list[float], list[float]]:
    """Time a map step and its unmap step, repeatedly, on the same input;
    returns the durations (ns) of each."""
    teardown(setup())  # warm up
    maps: list[float] = []
    unmaps: list[float] = []
    start = time.perf_counter()
    while len(maps) < max_reps and (len(maps) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter_ns()
        h = setup()
        t1 = time.perf_counter_ns()
        teardown(h)
        t2 = time.perf_counter_ns()
        maps.append(float(t1 - t0))
        unmaps.append(float(t2 - t1))
    return maps, unmaps


def _mapping_cells(b: _Bench, layout: str, npages: int, pfns: np.ndarray, timing: dict[str, Any],
                   strategies: Iterable[str], units: dict[str, Any] | None = None) -> list[Cell]:
    """Each strategy's map step and unmap step on one input.

    ``sg_*``: build the table (``sg_alloc_table_from_pages``) and
    ``dma_map_sgtable``; unmap: ``dma_unmap_sgtable``.  ``link_*``:
    ``dma_iova_try_alloc`` + link every range + one sync; unmap:
    ``dma_iova_destroy``.  ``ranges_to_table``: ``dma_buf_phys_vec_to_sgt``
    on the exporter's BAR; unmap: ``dma_buf_free_sgt``.  ``pte_floor``: one
    8-byte write per page, nothing to undo.  Lazy domains are flushed
    after the counting run, so deferred invalidations are counted too.
    """
    from pydmabuf import IovaState, dma_buf_free_sgt, dma_buf_phys_vec_to_sgt, dma_map_sgtable, dma_unmap_sgtable

    nbytes = npages * PAGE_SIZE
    phys, lens = workloads.numpy_coalesce(pfns)
    runs = np.ascontiguousarray(np.stack([phys, lens], axis=1))
    pages = np.empty((npages, 2), dtype=np.uint64)
    pages[:, 0] = pfns << np.uint64(12)
    pages[:, 1] = PAGE_SIZE
    bar_rows = _bar_ranges(b, phys, lens)
    floor_out = _core.floor_buffer(npages, 8)
    cells: list[Cell] = []
    kw_cache: dict[Any, Any] = {}  # page-table work the paths on these pages share

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

    plans_keep: list[Any] = []

    plans: dict[str, tuple[Any, tuple[Callable[[], Any], Callable[[Any], Any]]]] = {
        "sg_iommu": (b.iommu_dev, sg(b.iommu_dev)),
        "sg_direct": (b.direct_dev, sg(b.direct_dev)),
        "link_pages": (b.iommu_dev, link(pages)),
        "link_runs": (b.iommu_dev, link(runs)),
        "ranges_to_table": (b.iommu_dev, table()),
        "dmabuf_static": (b.iommu_dev, dmabuf(False)),
        "dmabuf_dynamic": (b.iommu_dev, dmabuf(True)),
        "dmabuf_ranges": (b.iommu_dev, dmabuf_ranges()),
        "pte_floor": (None, (lambda: _core.floor_pte(pfns, floor_out), lambda h: None)),
    }
    for name in strategies:
        dev, (map_, unmap) = plans[name]
        before = b.domain_counters(dev) if dev is not None else None
        h = map_()
        if name in ("dmabuf_static", "dmabuf_dynamic"):
            segments = int(h[1].nents)
            meta = float(h[1].metadata_nbytes)
        elif name.startswith("sg_") or name == "ranges_to_table":
            segments = int(h.nents)
            meta = float(h.metadata_nbytes) + (16.0 if name == "ranges_to_table" else 0.0)
        elif name.startswith("link_") or name == "dmabuf_ranges":
            segments = len(pages) if name == "link_pages" else len(runs)
            # struct dma_iova_state; plus the exporter's phys_vec array
            meta = 16.0 + (16.0 * len(runs) if name == "dmabuf_ranges" else 0.0)
        else:
            segments, meta = npages, 0.0
        unmap(h)
        after = b.domain_counters(dev) if dev is not None else None
        maps, unmaps = measure_pair(map_, unmap, **timing)
        c = Cell(layout, npages, name, [m + u for m, u in zip(maps, unmaps)])
        c.counters = {
            "map_ns_per_page": float(np.median(maps)) / npages,
            "unmap_ns_per_page": float(np.median(unmaps)) / npages,
            "segments": segments,
            "metadata_bytes_per_page": meta / npages,
        }
        if before is not None and after is not None:
            c.counters["pte_writes_per_page"] = (after["pte_writes"] - before["pte_writes"]) / npages
            c.counters["iotlb_invalidations"] = after["iotlb_invalidations"] - before["iotlb_invalidations"]
        else:
            c.counters["pte_writes_per_page"] = 1.0 if name == "pte_floor" else 0.0
            c.counters["iotlb_invalidations"] = 0
        if name == "ranges_to_table":
            from pydmabuf.machine import P2PMapType

            route = b.machine.p2p_map_type(b.provider, b.iommu_dev)
            _attach_kernel_work(c, pfns, dev, units, bar_ranges=bar_rows,
                                p2p_iova=route == P2PMapType.THRU_HOST_BRIDGE and dev.domain is not None)
        else:
            _attach_kernel_work(c, pfns, dev, units, cache=kw_cache)
        cells.append(c)
    for buf in plans_keep:
        buf.put()
    return cells


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
) -> dict[str, Any]:
    """Run the study; returns a JSON-ready dict (``machine``, ``cells``, ``notes``).

    ``parts``: ``sg_walk`` (the scatterlist walk against the C floor and
    NumPy) and ``mapping`` (each mapping strategy: scatterlist + IOMMU,
    scatterlist + dma-direct, list-free links of pages and of runs,
    ranges -> DMA-only table, and the one-PTE-per-page floor).

    The arguments are checked before anything runs (TypeError for the
    wrong type, ValueError for an unknown layout or part or a size that is
    not a positive number of pages); OutOfMemory (ENOMEM) when a layout or
    a table does not fit in memory.

    ``cost_profile``: the unit costs the host cannot measure (a TOML file's
    path, or :func:`pydmabuf.kernel_work.load_profile`'s result; None: the
    shipped profile).  The host's unit costs are measured once, before the
    cells; every cell carries ``kernel_work`` (the kernel's counts) and
    ``kernel_est_ns_per_page`` (their cost), the result ``unit_costs``.
    """
    layouts, sizes, parts = _study_args(layouts, sizes, parts, machine)
    if cost_profile is not None and not isinstance(cost_profile, (str, dict)):
        raise TypeError(f"cost_profile must be a path, a loaded profile or None, not {type(cost_profile).__name__}")
    profile = kernel_work.load_profile(cost_profile) if not isinstance(cost_profile, dict) else cost_profile
    units = kernel_work.unit_costs(profile, rounds=5 if quick else 9)
    timing = {"min_time": 0.01, "min_reps": 3, "max_reps": 7} if quick else {"min_time": 0.1, "min_reps": 5, "max_reps": 25}
    notes: list[str] = []
    cells: list[Cell] = []
    b = _Bench(machine) if "mapping" in parts else None
    prog = Progress(len(layouts) * len(sizes), progress)
    try:
        for lay in layouts:
            for npages in sizes:
                prog.step(f"{lay} {_fmt_size(npages * PAGE_SIZE)}")
                try:
                    pfns, keep = workloads.layout(lay, npages, seed, limit_pfn=b.ram_limit_pfn if b else None)
                except OSError as e:
                    note = f"layout {lay!r} skipped: {e}"
                    if note not in notes:
                        notes.append(note)
                    continue
                if "sg_walk" in parts:
                    cells.extend(_sg_cells(lay, npages, pfns, timing, units))
                if b is not None:
                    cells.extend(_mapping_cells(b, lay, npages, pfns, timing, MAPPING_STRATEGIES, units))
                del keep
    except MemoryError:  # NumPy could not allocate the layout or a table
        raise errors.OutOfMemory(f"no memory to study the {lay} layout of {npages} pages") from None
    finally:
        prog.close()
    return {
        "tool": "pydmabuf bench",
        "version": _version(),
        "seed": seed,
        "quick": quick,
        "machine": machine_description(),
        "model": {"machine": b.machine.name if b else None,
                  "iommu_device": b.iommu_dev.name if b else None,
                  "direct_device": b.direct_dev.name if b else None,
                  "exporter": b.provider.owner.name if b else None},
        "unit_costs": units,
        "cells": [c.as_dict() for c in cells],
        "notes": notes,
    }


#: The parts of a study.
PARTS = ("sg_walk", "mapping")


def _study_args(layouts: Any, sizes: Any, parts: Any, machine: Any) -> tuple[list[str], list[int], list[str]]:
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
    import os

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
    lines.append("Scatterlist walk (sg_alloc_table_from_pages): ns/page, median [q1-q3]")
    rows: list[list[str]] = []
    for (lay, npages), strat in by_key.items():
        core = strat.get("sg_from_pages")
        if core is None:
            continue
        floor = strat["c_floor"]
        npy = strat["numpy"]
        q = f"{core['ns_per_page']:.2f} [{core['ns_per_page_q1']:.2f}-{core['ns_per_page_q3']:.2f}]"
        rows.append([lay, _fmt_size(npages * PAGE_SIZE), str(core["counters"]["segments"]), q,
                     f"{floor['ns_per_page']:.2f}", f"{npy['ns_per_page']:.2f}",
                     _ratio(core["ns_per_page"], floor["ns_per_page"], ".2f"),
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
                     "model: this model's own CPU time, map and unmap ns/page (medians), +-% half the "
                     "interquartile range, x = model map time against the sg_iommu map and the floor")
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
                rb = _ratio(mp, base["counters"]["map_ns_per_page"], ".2f") if base else "-"
                rf = _ratio(mp, pte_floor["counters"]["map_ns_per_page"], ".1f") if pte_floor else "-"
                rows.append([lay, _fmt_size(npages * PAGE_SIZE), name, *_kernel_columns(mc, base), "|",
                             f"{mp:.2f}", f"{k['unmap_ns_per_page']:.2f}", _spread_pct(mc), rb, rf,
                             str(k["segments"]), f"{k['metadata_bytes_per_page']:.2f}"])
            rows.append([])  # a blank line between buffers
        lines += _columns(["layout", "size", "strategy", "kernel est", "x", "map calls", "walks", "PTE w/pg",
                           "IOTLB inv", "|", "model map", "unmap", "+-%", "x sg_iommu", "x floor", "segments",
                           "meta B/page"], rows, left=1, text=(2, 9))
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


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
    """Half the interquartile range of the repeats, as a percentage of the
    median (map + unmap)."""
    med = c["ns_per_page"]
    if not med:
        return "-"
    return f"{50.0 * (c['ns_per_page_q3'] - c['ns_per_page_q1']) / med:.0f}"


def format_markdown(result: dict[str, Any], sizes: Iterable[int] | None = None) -> str:
    """A Markdown summary of the mapping part, for a README: per buffer
    size, one row per layout, one column per strategy, each cell the map
    cost in ns/page and its ratio to the scatterlist + IOMMU baseline.
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
    out = [f"Measured with `pydmabuf bench` {result['version']} (seed {result['seed']}"
           f"{', --quick' if result.get('quick') else ''}) on {m['cpu']}, {m['cpus']} CPUs, "
           f"Linux {m.get('kernel', '?')}, Python {m['python']}, NumPy {m['numpy']}; "
           f"model: the default machine, importer {model['iommu_device']} behind its IOMMU.",
           "",
           "Each cell: the kernel's estimated CPU cost of one map + unmap in ns per 4 KiB page "
           "(its counted work x unit costs, `pydmabuf bench --explain CELL`) with its ratio to `sg_iommu` "
           "(build a scatterlist, `dma_map_sgtable` through the IOMMU) in brackets, then the model's own "
           "map time (median ns per page; it measures this model, not the kernel).", ""]
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
                mp = mc["counters"]["map_ns_per_page"]
                est = mc.get("kernel_est_ns_per_page")
                best = base.get("kernel_est_ns_per_page") if base else None
                if est is None:
                    ratio = f" ({_ratio(mp, base['counters']['map_ns_per_page'], '.2f')})" if base else ""
                    cols.append(f"model {mp:.2f}{ratio}")
                else:
                    ratio = f" ({_ratio(est, best, '.2f')})" if best is not None else ""
                    cols.append(f"{est:.2f}{ratio} · model {mp:.2f}")
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
                       f"{_ratio(core['ns_per_page'], floor['ns_per_page'], '.2f')} | "
                       f"{_ratio(core['ns_per_page'], npy['ns_per_page'], '.2f')} |")
        out.append("")
    for n in result.get("notes", []):
        out.append(f"Note: {n}")
    return "\n".join(out).rstrip() + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """One row per cell, counters flattened.  TypeError or ValueError for
    what is not a study result."""
    rows = []
    keys: list[str] = []
    for c in _check_result(result, "to_csv", header=False):
        row = {k: v for k, v in c.items() if k not in ("counters", "kernel_work", "kernel_est_terms")}
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
    return json.dumps(result, indent=2, sort_keys=False) + "\n"


# ------------------------------------------------------------- plot, compare


def plot(result: dict[str, Any], path: str) -> None:
    """Throughput against buffer size, one line per strategy, one panel per
    layout; written to ``path`` (PNG).  Needs matplotlib (``pip install
    'pydmabuf[plot]'``)."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # the optional [plot] extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'pydmabuf[plot]'") from None
    cells = [c for c in _check_result(result, "plot") if c["strategy"] in MAPPING_STRATEGIES
             or c["strategy"] == "sg_from_pages"]
    layouts = list(dict.fromkeys(c["layout"] for c in cells))
    if not layouts:
        raise ValueError("nothing to plot")
    fig, axes = plt.subplots(1, len(layouts), figsize=(4.2 * len(layouts), 4.2), sharey=True, squeeze=False)
    for ax, lay in zip(axes[0], layouts):
        for strat in dict.fromkeys(c["strategy"] for c in cells):
            pts = sorted((c["nbytes"], c) for c in cells if c["layout"] == lay and c["strategy"] == strat)
            if not pts:
                continue
            xs = [n for n, _ in pts]
            ns = [c["counters"].get("map_ns_per_page", c["ns_per_page"]) for _, c in pts]
            gbps = [PAGE_SIZE / v if v > 0 else float("nan") for v in ns]  # bytes per ns = GB/s
            ax.plot(xs, gbps, marker="o", ms=3, label=strat)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(lay)
        ax.set_xlabel("buffer size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("mapping throughput (GB/s, map step)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    m = result["machine"]
    fig.suptitle(f"pydmabuf bench {result['version']} - {m['cpu']}, seed {result['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Ratios new / old of the map time (ns/page) of every cell both have.
    TypeError or ValueError for what is not a study result."""
    old_cells = _check_result(old, "compare old", header=False)
    new_cells = _check_result(new, "compare new", header=False)

    def key(c: dict[str, Any]) -> tuple[str, int, str]:
        return (c["layout"], c["npages"], c["strategy"])

    def ns(c: dict[str, Any]) -> float:
        return float(c["counters"].get("map_ns_per_page", c["ns_per_page"]))

    a = {key(c): c for c in old_cells}
    lines = [f"{'layout':<11} {'size':>8} {'strategy':<16} {'old ns/page':>12} {'new ns/page':>12} {'new/old':>8}"]
    lines.append("-" * len(lines[0]))
    ratios = []
    for c in new_cells:
        o = a.get(key(c))
        if o is None:
            continue
        r = ns(c) / ns(o) if ns(o) > 0 else float("nan")
        ratios.append(r)
        lines.append(f"{c['layout']:<11} {_fmt_size(c['nbytes']):>8} {c['strategy']:<16} {ns(o):>12.3f} "
                     f"{ns(c):>12.3f} {r:>8.2f}")
    if not ratios:
        return "no cells in common"
    pos = [r for r in ratios if r > 0]  # a zero time has no ratio (a measured one is never zero)
    geo = f"{float(np.exp(np.mean(np.log(pos)))):.3f}" if pos else "-"
    lines.append(f"\n{len(ratios)} cells in common; geometric mean new/old = {geo}")
    return "\n".join(lines)
