"""Replay a real machine's DMA traffic through the model: ``pydmabuf replay TRACE``.

Input is the text of tracefs's ``trace`` file or of ``trace-cmd report``
for the ``dma``, ``iommu`` and ``swiotlb`` trace events.  Field layouts
and print formats follow ``include/trace/events/dma.h`` (6.12: the
``dma_map_page`` / ``dma_map_resource`` / ``dma_unmap_page`` /
``dma_unmap_resource`` names; later trees: ``dma_map_phys`` /
``dma_unmap_phys``, and ``dma_map_sg`` with ``nents=``/``ents=`` and the
128-entry ``[TRUNCATED]`` cut), ``include/trace/events/iommu.h`` (``map``,
``unmap``, ``io_page_fault``) and ``include/trace/events/swiotlb.h``
(``swiotlb_bounced``).  The parser is written from those formats; it
shares no code with the kernel.

Three stages, each a generator, so a trace of millions of events replays
in memory bounded by the mappings live at one time (plus a cache of
per-shape counts of fixed size):

1. :func:`parse_events` -- lines to :class:`Event` (or :class:`Malformed`).
2. :func:`rebuild_ops` -- events to each device's map and unmap
   operations (:class:`Op`), with what the trace does not say filled in
   under a named assumption (:data:`ASSUMPTIONS`).
3. :class:`Replay` -- every operation through each strategy's kernel work
   (:func:`pydmabuf.kernel_work.kernel_work`, and the 4 KiB-leaf page-table
   work of :func:`pagetable_work_4k`) and through an IOVA allocator of the
   model (:class:`pydmabuf._core.IommuDomain`) per device and domain mode.

A mapping's kernel work is counted whole (map and unmap, as
:func:`~pydmabuf.kernel_work.kernel_work` counts one cell) when its map is
seen; page-table counts are those of kernel_work's steady state.  The
IOVA figures come from replaying the allocations and frees in trace
order.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from pydmabuf import _core, errors, iotlb, kernel_work
from pydmabuf.replay_report import format_markdown, format_table, to_csv, to_json
from pydmabuf.replay_trace import (ASSUMPTIONS, KNOWN_EVENTS, MAX_LINE, MAX_OP_PAGES, NOT_MODELLED, PAGE,
                                   TRACE_MAX_ENTRIES, DeviceStats, Event, Malformed, Op, TraceStats, _PAGE_MASK,
                                   _U64, _U64_MAX, parse_events, parse_line, rebuild_ops, synthesize_trace)

if TYPE_CHECKING:
    from pydmabuf.machine import Machine

__all__ = ["Event", "Malformed", "Op", "ASSUMPTIONS", "STRATEGIES", "KNOWN_EVENTS", "parse_line", "parse_events",
           "rebuild_ops", "pagetable_work_4k", "Replay", "DeviceGeometry", "replay", "synthesize_trace",
           "iotlb_probe", "stale_window", "to_json", "to_csv", "format_markdown", "format_table"]

# ------------------------------------------------------------- kernel work


def pagetable_work_4k(call_pages: np.ndarray, *, strict: bool) -> dict[str, int]:
    """Page-table work of ``iommu_map_nosync`` calls of ``call_pages[k]``
    pages, back to back from an IOVA aligned to a 512-entry table, and one
    ``iommu_unmap_fast`` of the whole span, on a domain whose page sizes
    are 4 KiB only (``pgsize_bitmap`` = SZ_4K), in the steady state.

    ``__iommu_map``/``__iommu_unmap`` then always choose 4 KiB and
    io-pgtable-arm writes at most the rest of one level-3 table per
    descent: a call takes one descent per table it touches.  No unmap
    clears a table entry (``__arm_lpae_unmap`` frees a table only for a
    block-sized unmap), so the steady state installs and frees no table
    and flushes no walk cache: every leaf is written once by the map and
    once by the unmap; the unmap's gather holds one page size, so strict
    mode syncs once and lazy mode queues one entry.
    """
    n = np.asarray(call_pages, dtype=np.int64)
    if len(n) == 0 or int(n.sum()) == 0:
        return {"pte_writes": 0, "pt_walks": 0, "iotlb_invalidations": 0, "_walk_invalidations": 0,
                "_unmap_invalidations": 0, "_queued": 0, "_map_walks": 0, "_unmap_walks": 0}
    n = n[n > 0]
    first = np.concatenate(([0], np.cumsum(n)[:-1]))
    last = first + n - 1
    map_walks = int((last // 512 - first // 512 + 1).sum())
    total = int(n.sum())
    unmap_walks = (total - 1) // 512 + 1
    return {"pte_writes": 2 * total, "pt_walks": map_walks + unmap_walks, "iotlb_invalidations": 1,
            "_walk_invalidations": 0, "_unmap_invalidations": 1, "_queued": int(not strict),
            "_map_walks": map_walks, "_unmap_walks": unmap_walks,
            "_leaves_4k": total, "_leaves_2m": 0, "_leaves_1g": 0, "_tables_installed": 0, "_tables_cleared": 0}


def _pfns(phys: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The page frames of ranges (each rounded out to whole pages), in
    order -- built in bulk with NumPy."""
    start = phys >> _U64(12)
    end = (phys + lens + _U64(_PAGE_MASK)) >> _U64(12)
    cnt = (end - start).astype(np.int64)
    tot = int(cnt.sum())
    base = np.repeat(start, cnt)
    idx = np.arange(tot, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    out: np.ndarray = base + idx.astype(_U64)
    return out


#: Strategy name -> (kernel_work path, strict (None: the device's mode), 4 KiB leaves only).
STRATEGIES: dict[str, tuple[str, bool | None, bool]] = {
    "traced": ("traced", None, False),
    "sg_iommu:lazy": ("sg_iommu", False, False),
    "sg_iommu:strict": ("sg_iommu", True, False),
    "sg_iommu:lazy:4k": ("sg_iommu", False, True),
    "sg_iommu:strict:4k": ("sg_iommu", True, True),
    "link_runs:lazy": ("link_runs", False, False),
    "link_runs:strict": ("link_runs", True, False),
    "link_runs:lazy:4k": ("link_runs", False, True),
    "link_runs:strict:4k": ("link_runs", True, True),
}
STRATEGY_HELP = {
    "traced": "each mapping as the trace shows it: dma_map_page/phys/resource through the IOMMU "
              "(__iommu_dma_map: one IOVA, one iommu_map) or dma-direct; dma_map_sg through the IOMMU "
              "(iommu_dma_map_sg) or dma-direct (dma_direct_map_sg); the device's domain mode",
    "sg_iommu": "every mapping as a scatterlist built from its pages and mapped through the IOMMU",
    "link_runs": "every mapping's physical ranges linked with the list-free API (dma_iova_try_alloc + "
                 "dma_iova_link per run + dma_iova_sync / dma_iova_destroy)",
    "lazy/strict": "flush-queue (DMA-FQ) or strict (DMA) domain",
    "4k": "a domain with 4 KiB pages only (no 2 MiB / 1 GiB leaves); without it huge leaves are used "
          "where physical and IOVA alignment allow",
}


# ------------------------------------------------------------ stale IOTLB

def stale_window(model: _IovaModel) -> dict[str, int]:
    """The stale-IOTLB exposure of one replayed domain (lazy domains; a
    strict one gives zeros): every unmap a flush queue took leaves its
    bytes reachable through a cached translation until the next flush
    (``iommu_dma_free_iova`` -> ``queue_iova``; invalidated by
    ``fq_flush_iotlb``, on the 10 ms timer in trace time or a full ring).
    ``queued_unmaps`` / ``queued_bytes``: unmaps and bytes that went
    through the queue; ``peak_queued_bytes``: the most bytes reachable that
    way at once; ``flushes``: the queue's flushes; ``queued_at_end_bytes``:
    still reachable when the trace ends (:func:`pydmabuf.iotlb.stale_window`
    of the domain)."""
    w = iotlb.stale_window(model.dom)
    return {"queued_unmaps": model.queued_unmaps, "queued_bytes": model.queued_bytes,
            "peak_queued_bytes": model.peak_queued, "flushes": model.flushes,
            "queued_at_end_bytes": w.queued_bytes}


#: How a replay reports the stale-IOTLB window of each domain: a callable
#: taking the replayed domain's model and returning counts; None: the
#: report says "not modelled in this build".
iotlb_probe: Callable[[_IovaModel], dict[str, int]] | None = stale_window

@dataclass(frozen=True)
class DeviceGeometry:
    """The traced domain as the user described it (``--machine``): one
    IOVA allocator per IOMMU group, its mode and aperture, the device's
    DMA limit and whether it is PCI (the 32-bit IOVA preference)."""

    group: str
    strict: bool
    aperture_bits: int
    ncpus: int
    fq_timeout: float | None
    dma_limit: int
    pci: bool
    direct: bool = False


def geometry_from_machine(machine: Machine) -> dict[str, DeviceGeometry]:
    """Each device of a :class:`~pydmabuf.machine.Machine`, by name and by
    PCI address (the name the trace shows)."""
    out: dict[str, DeviceGeometry] = {}
    for dev in machine:
        grp = dev.iommu_group
        if grp is None:
            g = DeviceGeometry(dev.name, False, 48, 1, None, dev.dma_limit, dev.is_pci, direct=True)
        else:
            iommu = grp.iommu
            g = DeviceGeometry(grp.name, bool(iommu.strict or dev.untrusted), int(iommu.aperture_bits),
                               int(iommu.ncpus), iommu.fq_timeout, dev.dma_limit, dev.is_pci)
        out[dev.name] = g
        if dev.bdf:
            out[dev.bdf] = g
    return out


class _IovaModel:
    """One IOVA allocator of the model replaying a device's (or group's)
    allocations and frees in trace order, with its statistics."""

    SAMPLE = 256

    def __init__(self, strict: bool, aperture_bits: int, ncpus: int, fq_timeout: float | None) -> None:
        self.dom = _core.IommuDomain(strict=strict, aperture_bits=aperture_bits, ncpus=max(ncpus, 1),
                                     fq_timeout=None)
        self.ncpus = max(ncpus, 1)
        self.timeout = fq_timeout
        self.first_queued: float | None = None
        self.held = 0
        self.peak = 0
        self.lowest = _U64_MAX
        self.highest = 0
        self.allocs = 0
        self.failures = 0
        self.frag_max = 0.0
        self.since_sample = 0
        self.queued_unmaps = 0
        self.queued_bytes = 0
        self.peak_queued = 0
        self.flushes = 0

    def tick(self, ts: float) -> None:
        """The flush queue's timer (fq_flush_timeout), driven by trace time:
        entries queued ``fq_timeout`` seconds ago are flushed before the
        next operation."""
        if self.first_queued is not None and self.timeout is not None and ts - self.first_queued >= self.timeout:
            self.dom.flush()
            self.flushes += 1
            self.first_queued = None

    def alloc(self, size: int, limit: int, pci: bool, pref: bool, cpu: int,
              phys: np.ndarray, lens: np.ndarray) -> tuple[int, bool]:
        if pci:
            iova, pref = self.dom.alloc_iova_pci(size, limit, pref, cpu % self.ncpus)
        else:
            iova = self.dom.alloc_iova(size, limit, cpu % self.ncpus)
        try:
            self.dom.pgtable.map_many(iova, phys, lens)
        except errors.DmaBufError:
            self.dom.free_iova(iova, size, cpu % self.ncpus)
            raise
        self.allocs += 1
        self.held += size
        self.lowest = min(self.lowest, iova)
        self.highest = max(self.highest, iova + size)
        # IOVA held: mapped, plus freed but waiting on a flush queue
        held = self.held + (self.dom.iovad.stats["queued_pages"] << 12 if not self.dom.strict else 0)
        if held > self.peak:
            self.peak = held
        self.since_sample += 1
        if self.since_sample >= self.SAMPLE:
            self.sample()
        return iova, pref

    def free(self, iova: int, size: int, cpu: int, ts: float) -> None:
        if self.dom.strict:
            self.dom.unmap_dma(iova, size, cpu % self.ncpus)
            self.held -= size
            return
        before = self.dom.iovad.stats["queued_pages"]
        self.dom.unmap_dma(iova, size, cpu % self.ncpus)
        self.held -= size
        after = self.dom.iovad.stats["queued_pages"]
        if after < before + (size >> 12):  # the ring was full: queue_iova flushed it first
            self.flushes += 1
        self.queued_unmaps += 1
        self.queued_bytes += size
        self.peak_queued = max(self.peak_queued, after << 12)
        if self.first_queued is None:
            self.first_queued = ts

    def sample(self) -> None:
        """Fragmentation of the IOVA space between the lowest and highest
        addresses handed out: 1 - largest free gap / all free space there."""
        self.since_sample = 0
        r = self.dom.iovad.ranges()
        if self.lowest >= self.highest:
            return
        lo, hi = self.lowest >> 12, (self.highest >> 12) - 1
        sel = (r[:, 1] >= _U64(lo)) & (r[:, 0] <= _U64(hi))
        r = r[sel].astype(np.int64)
        if len(r) == 0:
            return
        starts = np.concatenate(([lo], r[:, 1] + 1))
        ends = np.concatenate((r[:, 0], [hi + 1]))
        gaps = np.maximum(ends - starts, 0)
        free = int(gaps.sum())
        if free:
            self.frag_max = max(self.frag_max, 1.0 - int(gaps.max()) / free)

    def summary(self) -> dict[str, Any]:
        self.sample()
        return {"allocations": self.allocs, "alloc_failures": self.failures, "peak_nbytes": self.peak,
                "lowest_iova": self.lowest if self.allocs else None,
                "span_nbytes": (self.highest - self.lowest) if self.allocs else 0,
                "fragmentation_max": round(self.frag_max, 4),
                "held_at_end_nbytes": self.held}


class Replay:
    """Replay rebuilt operations through the strategies and the IOVA model.

    Parameters
    ----------
    strategies : sequence of str
        Names of :data:`STRATEGIES`.
    units : dict, optional
        Unit costs (:func:`pydmabuf.kernel_work.unit_costs`); None: no
        kernel-cost estimate.
    geometry : dict, optional
        :class:`DeviceGeometry` by trace device name (``--machine``); a
        device found here has its IOVA choices compared with the trace's.
    device : str, optional
        Replay only this device (others are still counted as events).
    """

    CACHE_MAX = 1 << 14

    def __init__(self, strategies: Sequence[str] = tuple(STRATEGIES), *, units: dict[str, Any] | None = None,
                 geometry: dict[str, DeviceGeometry] | None = None, device: str | None = None) -> None:
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad or not strategies:
            raise ValueError(f"unknown strategy {', '.join(bad) or '(none)'}; known: {', '.join(STRATEGIES)}")
        self.strategies = list(dict.fromkeys(strategies))
        self.units = units
        self.geometry = geometry or {}
        self.only = device
        self.stats = TraceStats()
        self._cache: dict[tuple[Any, ...], tuple[dict[str, int], float]] = {}
        self._base: dict[tuple[Any, ...], dict[str, int]] = {}
        # live mappings per device, by what pairs an unmap with its map; a
        # key mapped twice (the same page mapped twice by dma-direct, the
        # same first entry in two tables) pairs first-in first-out
        self._live: dict[str, dict[tuple[Any, ...], list[tuple[int, int, int]]]] = {}
        self._nlive: Counter[str] = Counter()
        self._iova: dict[tuple[str, bool], _IovaModel] = {}
        self._pref: dict[str, bool] = {}

    # -- per-op kernel work
    @staticmethod
    def _shape(phys: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, bytes]:
        """A mapping's page frames, its physically contiguous runs (in
        pages) and the key of everything its counts depend on: the runs'
        lengths and, for runs that can hold a 2 MiB leaf, their physical
        alignment within 1 GiB (kernel_work maps at a fixed, size-aligned
        IOVA)."""
        pfns = _pfns(phys, lens)
        brk = np.flatnonzero(np.diff(pfns) != _U64(1)) + 1 if len(pfns) > 1 else np.zeros(0, dtype=np.int64)
        starts = np.concatenate(([0], brk)).astype(np.int64)
        runs = np.diff(np.concatenate((starts, [len(pfns)]))).astype(np.int64)
        align = np.where(runs >= 512, (pfns[starts] & _U64((1 << 18) - 1)).astype(np.int64), -1)
        return pfns, runs, runs.tobytes() + b"|" + align.tobytes()

    def _base_work(self, path: str, strict: bool, pfns: np.ndarray, shape: bytes) -> dict[str, int]:
        key = (path, strict, shape)
        hit = self._base.get(key)
        if hit is not None:
            return hit
        if path == "direct_single":
            # dma_direct_map_phys: no IOVA, no page table, no list
            w = {k: 0 for k in kernel_work.KEYS}
            w.update(_iova_granules=0, _walk_invalidations=0, _unmap_invalidations=0, _queued=0)
        elif path == "iommu_single":
            # __iommu_dma_map: iommu_dma_alloc_iova, iommu_map (iommu_map_nosync +
            # iommu_sync_map); __iommu_dma_unmap: iommu_unmap_fast of the span,
            # iommu_dma_free_iova -- link_runs' work of one range, without its
            # dma_iova_state
            w = kernel_work.kernel_work("link_runs", pfns, strict=strict, detail=True)
            w["metadata_bytes"] = 0
        else:
            # the table is built as sg_alloc_table_from_pages does (entries up
            # to UINT_MAX rounded down to a page): kernel_work's device with no
            # segment limit
            w = kernel_work.kernel_work(path, pfns, strict=strict, detail=True)
        if len(self._base) >= self.CACHE_MAX:
            self._base.clear()
        self._base[key] = w
        return w

    def _work(self, path: str, strict: bool, four_k: bool, pfns: np.ndarray, runs: np.ndarray,
              shape: bytes) -> tuple[dict[str, int], float]:
        key = (path, strict, four_k, shape)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        w = dict(self._base_work(path, strict, pfns, shape))
        if four_k and path not in ("direct_single", "sg_direct"):
            if path == "sg_iommu":
                calls = runs   # iommu_map_sg: one call per physically contiguous run
            else:
                # link_runs / a single mapping: numpy_coalesce splits a run every 0xFFFFF pages
                q, rem = runs // 0xFFFFF, runs % 0xFFFFF
                per_run = q + (rem > 0)
                k = np.arange(int(per_run.sum())) - np.repeat(np.cumsum(per_run) - per_run, per_run)
                calls = np.where(k < np.repeat(q, per_run), 0xFFFFF, np.repeat(rem, per_run))
            w.update(pagetable_work_4k(calls, strict=strict))
        est = (sum(t["ns"] for t in kernel_work.estimate_terms(w, self.units))
               if self.units is not None else float("nan"))
        out = ({k: int(w[k]) for k in kernel_work.KEYS}, float(est))
        if len(self._cache) >= self.CACHE_MAX:
            self._cache.clear()
        self._cache[key] = out
        return out

    def _strict_of(self, dev: str) -> bool:
        g = self.geometry.get(dev)
        return bool(g.strict) if g is not None else False

    def _iova_model(self, dev: str, strict: bool) -> _IovaModel:
        g = self.geometry.get(dev)
        group = g.group if g is not None else dev
        m = self._iova.get((group, strict))
        if m is None:
            if g is not None:
                m = _IovaModel(strict, g.aperture_bits, g.ncpus, g.fq_timeout)
            else:
                m = _IovaModel(strict, 48, 64, 0.01)
            self._iova[(group, strict)] = m
        return m

    def feed(self, op: Op) -> None:
        """Replay one operation."""
        st = self.stats.device(op.device)
        if self.only is not None and op.device != self.only:
            return
        g = self.geometry.get(op.device)
        if op.kind == "unmap":
            live = self._live.setdefault(op.device, {})
            stack = live.get(op.key)
            if not stack:
                st.unmatched_unmaps += 1
                return
            got = stack.pop(0)
            if not stack:
                del live[op.key]
            self._nlive[op.device] -= 1
            st.unmaps += 1
            for a in op.assumed:
                st.assumed[a] += 1
            for strict in self._modes(op.device):
                iova_by_mode = got[0] if strict else got[1]
                if iova_by_mode >= 0:
                    m = self._iova_model(op.device, strict)
                    m.tick(op.ts)
                    try:
                        m.free(iova_by_mode, got[2], op.cpu, op.ts)
                    except errors.DmaBufError:
                        st.model_errors += 1
            return
        assert op.phys is not None and op.lens is not None
        st.maps += 1
        st.bytes_mapped += op.nbytes
        # (the page arithmetic below must not wrap: keep two pages of room)
        if bool(np.any(op.lens > _U64(_U64_MAX - 2 * PAGE))) or \
                bool(np.any(op.phys > _U64(_U64_MAX - 2 * PAGE) - op.lens)):
            st.not_replayed["range_wraps_past_2**64"] += 1
            return
        pages = int((((op.phys & _U64(_PAGE_MASK)) + op.lens + _U64(_PAGE_MASK)) >> _U64(12)).sum())
        if pages > MAX_OP_PAGES:
            st.not_replayed[f"more_than_{MAX_OP_PAGES}_pages"] += 1
            return
        if pages == 0:
            st.not_replayed["no_bytes"] += 1
            return
        assumed = list(op.assumed)
        # how the traced kernel mapped it
        if g is not None:
            direct = g.direct
        else:
            direct = (op.dma == int(op.phys[0]))
            assumed.append("direct_by_address")
        for a in assumed:
            st.assumed[a] += 1
        pfns, runs, shape = self._shape(op.phys, op.lens)
        for name in self.strategies:
            path, mode, four_k = STRATEGIES[name]
            strict = self._strict_of(op.device) if mode is None else mode
            if path == "traced":
                path = ("sg_direct" if op.sg else "direct_single") if direct else \
                    ("sg_iommu" if op.sg else "iommu_single")
            try:
                w, est = self._work(path, strict, four_k, pfns, runs, shape)
            except ValueError:
                st.model_errors += 1
                continue
            acc = st.strategies.get(name)
            if acc is None:
                acc = st.strategies[name] = {"kernel_work": {k: 0 for k in kernel_work.KEYS}, "kernel_est_ns": 0.0}
            kw = acc["kernel_work"]
            for k, v in w.items():
                kw[k] += v
            acc["kernel_est_ns"] += est
        # the IOVA model: one allocation of the pages the ranges touch
        offs = op.phys & _U64(_PAGE_MASK)
        alen = ((offs + op.lens + _U64(_PAGE_MASK)) >> _U64(12)) << _U64(12)
        size = int(alen.sum())
        aphys = op.phys - offs
        iovas = [-1, -1]
        if not (g is not None and g.direct) and size:
            limit = g.dma_limit if g is not None else _U64_MAX
            pci = g.pci if g is not None else bool(_BDF.match(op.device))
            for strict in self._modes(op.device):
                m = self._iova_model(op.device, strict)
                m.tick(op.ts)
                pref_key = f"{op.device}/{int(strict)}"
                try:
                    iova, self._pref[pref_key] = m.alloc(size, limit, pci, self._pref.get(pref_key, True), op.cpu,
                                                         aphys, alen)
                except errors.DmaBufError:
                    m.failures += 1
                    st.model_errors += 1
                    continue
                iovas[0 if strict else 1] = iova
                if g is not None and strict == g.strict:
                    ag = st.agreement
                    if ag is None:
                        ag = st.agreement = {"compared": 0, "agree": 0, "first_disagreement_line": None}
                    ag["compared"] += 1
                    if iova + int(offs[0]) == op.dma:
                        ag["agree"] += 1
                    elif ag["first_disagreement_line"] is None:
                        ag["first_disagreement_line"] = op.lineno
        live = self._live.setdefault(op.device, {})
        live.setdefault(op.key, []).append((iovas[0], iovas[1], size))
        self._nlive[op.device] += 1

    def _modes(self, dev: str) -> tuple[bool, ...]:
        modes = set()
        for name in self.strategies:
            s = STRATEGIES[name][1]
            modes.add(self._strict_of(dev) if s is None else s)
        return tuple(sorted(modes))

    def result(self) -> dict[str, Any]:
        """The report (the shape :func:`to_json` writes)."""
        st = self.stats
        devices: dict[str, Any] = {}
        for name, d in sorted(st.devices.items()):
            if self.only is not None and name != self.only:
                continue
            strategies: dict[str, Any] = {}
            for s in self.strategies:
                acc = d.strategies.get(s) or {"kernel_work": {k: 0 for k in kernel_work.KEYS}, "kernel_est_ns": 0.0}
                strict = STRATEGIES[s][1]
                if strict is None:
                    strict = self._strict_of(name)
                g = self.geometry.get(name)
                group = g.group if g is not None else name
                m = self._iova.get((group, strict))
                strategies[s] = {"kernel_work": dict(acc["kernel_work"]),
                                 "kernel_est_ns": None if self.units is None else round(acc["kernel_est_ns"], 1),
                                 "mode": "strict" if strict else "lazy",
                                 "iova": m.summary() if m is not None else None}
            stale: dict[str, dict[str, int]] | str = NOT_MODELLED
            if iotlb_probe is not None:
                g = self.geometry.get(name)
                group = g.group if g is not None else name
                stale = {("strict" if k[1] else "lazy"): iotlb_probe(m) for k, m in self._iova.items()
                         if k[0] == group}
            live = self._nlive[name]
            devices[name] = {
                "events": dict(sorted(d.events.items())), "maps": d.maps, "unmaps": d.unmaps,
                "bytes_mapped": d.bytes_mapped, "assumed": dict(sorted(d.assumed.items())),
                "strategies": strategies,
                "unmatched_unmaps": d.unmatched_unmaps, "live_at_end": live,
                "map_errors": d.map_errors, "syncs": d.syncs,
                "coherent_allocs": d.coherent_allocs, "coherent_bytes": d.coherent_bytes,
                "swiotlb": {"bounces": d.swiotlb_bounces, "bytes": d.swiotlb_bytes},
                "io_page_faults": d.faults, "model_errors": d.model_errors,
                "not_replayed": dict(sorted(d.not_replayed.items())),
                "iova_agreement": d.agreement, "stale_iotlb": stale,
            }
        total: dict[str, Any] = {}
        for s in self.strategies:
            kw = {k: sum(dv["strategies"][s]["kernel_work"][k] for dv in devices.values()) for k in kernel_work.KEYS}
            est = None if self.units is None else round(sum(dv["strategies"][s]["kernel_est_ns"]
                                                            for dv in devices.values()), 1)
            total[s] = {"kernel_work": kw, "kernel_est_ns": est}
        return {
            "devices": devices,
            "total": {"maps": sum(d["maps"] for d in devices.values()),
                      "unmaps": sum(d["unmaps"] for d in devices.values()),
                      "bytes_mapped": sum(d["bytes_mapped"] for d in devices.values()),
                      "swiotlb": {"bounces": sum(d["swiotlb"]["bounces"] for d in devices.values()),
                                  "bytes": sum(d["swiotlb"]["bytes"] for d in devices.values())},
                      "strategies": total},
            "iommu_events": dict(sorted(st.iommu.items())),
            "skipped": dict(sorted(st.skipped.items())),
            "malformed": list(st.malformed_lines),
            "malformed_count": st.malformed_count,
            "malformed_reasons": {str(n): r for n, r in zip(st.malformed_lines[:100], st.malformed_reasons[:100])},
            "assumptions": {k: ASSUMPTIONS[k] for k in sorted({a for d in devices.values() for a in d["assumed"]})},
            "strategy_help": STRATEGY_HELP,
            "unit_costs": None if self.units is None else {u: {"ns": v["ns"], "source": v["source"]}
                                                           for u, v in sorted(self.units.items())},
            "stale_iotlb": NOT_MODELLED if iotlb_probe is None else "see devices",
        }


_BDF = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


class _Progress:
    """A progress line on stderr for long inputs: lines read, share of the file."""

    def __init__(self, total_bytes: int | None, enabled: bool) -> None:
        self.total = total_bytes
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last = 0.0
        self.pos: Callable[[], int] | None = None
        self.shown = False

    def __call__(self, lineno: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        pct = ""
        if self.total and self.pos is not None:
            try:
                pct = f" {100.0 * self.pos() / self.total:5.1f}%"
            except (OSError, ValueError):
                pct = ""
        sys.stderr.write(f"\rreplay: {lineno:,} lines{pct} {now - self.t0:6.1f}s")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def replay(source: str | os.PathLike[str] | IO[str] | IO[bytes] | Iterable[str], *,
           strategies: Sequence[str] = tuple(STRATEGIES), units: dict[str, Any] | None = None,
           geometry: dict[str, DeviceGeometry] | None = None, device: str | None = None,
           limit: int | None = None, progress: bool | None = False) -> dict[str, Any]:
    """Parse a trace and replay it: the report :func:`to_json` writes.

    Parameters
    ----------
    source : path, open file or iterable of lines
        The text of tracefs's ``trace`` or of ``trace-cmd report``.
    strategies : sequence of str
        Names of :data:`STRATEGIES` (default: all).
    units : dict, optional
        Unit costs for the kernel-cost estimate
        (:func:`pydmabuf.kernel_work.unit_costs`); None leaves
        ``kernel_est_ns`` None.
    geometry : dict, optional
        The traced domains (:func:`geometry_from_machine`); with it, the
        model's IOVA choices are compared with the trace's DMA addresses.
    device : str, optional
        Replay only this device.
    limit : int, optional
        Stop after this many map/unmap operations.
    progress : bool or None
        A progress line on stderr; None: when stderr is a terminal.

    Unknown events are counted under ``skipped``; unreadable lines under
    ``malformed`` (line numbers) and the replay goes on.  Raises
    ValueError for an unknown strategy or a negative limit, OSError when
    the file cannot be read.
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    r = Replay(strategies, units=units, geometry=geometry, device=device)
    total_bytes = None
    f: IO[bytes] | None = None
    if isinstance(source, (str, os.PathLike)):
        total_bytes = os.path.getsize(source)
        f = open(source, "rb")
        src: IO[str] | IO[bytes] | Iterable[str] = f
    else:
        src = source
    prog = _Progress(total_bytes, sys.stderr.isatty() if progress is None else bool(progress))
    if f is not None:
        prog.pos = f.tell
    try:
        n = 0
        for op in rebuild_ops(parse_events(src, progress=prog), r.stats):
            if limit is not None and n >= limit:
                break
            r.feed(op)
            n += 1
    finally:
        prog.close()
        if f is not None:
            f.close()
    return r.result()

