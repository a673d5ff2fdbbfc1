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

import io
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pydmabuf import _core, errors, iotlb, kernel_work

__all__ = ["Event", "Malformed", "Op", "ASSUMPTIONS", "STRATEGIES", "KNOWN_EVENTS", "parse_line", "parse_events",
           "rebuild_ops", "pagetable_work_4k", "Replay", "DeviceGeometry", "replay", "synthesize_trace",
           "iotlb_probe", "stale_window", "to_json", "to_csv", "format_markdown", "format_table"]

log = logging.getLogger(__name__)

PAGE = 4096
_PAGE_MASK = PAGE - 1
_U64: type[np.uint64] = np.uint64
_U64_MAX = (1 << 64) - 1
#: include/trace/events/dma.h: DMA_TRACE_MAX_ENTRIES
TRACE_MAX_ENTRIES = 128
#: A line longer than this is malformed (no kernel event prints one: 3 arrays of 128 u64).
MAX_LINE = 1 << 16
#: A mapping of more pages than this (64 GiB) is counted but not replayed:
#: the counts take its page frames as an array.
MAX_OP_PAGES = 1 << 24

# ----------------------------------------------------------------- parsing

#: The events the replay reads, by name, and the class of their print format.
KNOWN_EVENTS = {
    "dma_map_page": "map", "dma_map_resource": "map", "dma_map_phys": "map",
    "dma_unmap_page": "unmap", "dma_unmap_resource": "unmap", "dma_unmap_phys": "unmap",
    "dma_map_sg": "map_sg", "dma_map_sg_err": "map_sg_err", "dma_unmap_sg": "unmap_sg",
    "dma_sync_single_for_cpu": "sync_single", "dma_sync_single_for_device": "sync_single",
    "dma_sync_sg_for_cpu": "sync_sg", "dma_sync_sg_for_device": "sync_sg",
    "dma_alloc": "alloc", "dma_alloc_pages": "alloc", "dma_alloc_sgt_err": "alloc", "dma_alloc_sgt": "alloc_sgt",
    "dma_free": "free", "dma_free_pages": "free", "dma_free_sgt": "free_sgt",
    "map": "iommu_map", "unmap": "iommu_unmap", "io_page_fault": "io_page_fault",
    "swiotlb_bounced": "swiotlb_bounced",
}
_DIRS = {"BIDIRECTIONAL", "TO_DEVICE", "FROM_DEVICE", "NONE"}

# Header of one event line.  tracefs `trace`:
#   "  <idle>-0       [001] d.h1.  1234.567890: dma_map_page: TEXT"
# (the irq/preempt flags column is 4 or 5 characters, absent with
# `options/irq-info` off; "(  123)" is the tgid column of `record-tgid`);
# trace-cmd report: "  kworker/0:1-42   [000]  1234.567890: dma_map_page:   TEXT"
# (event name padded; flags only with -l).  The comm may hold spaces and
# dashes: the pid is the last "-digits" before the cpu column.
_HEAD = re.compile(
    r"[ \t]*(?P<task>\S(?:[^\[\n]{0,64}?\S)?)-(?P<pid>\d{1,10})[ \t]+(?:\([ \t]*[\d-]{1,10}\)[ \t]+)?"
    r"\[(?P<cpu>\d{1,6})\][ \t]+(?:(?P<flags>[^\s\d][^\s]{2,5})[ \t]+)?"
    r"(?P<ts>\d{1,12}(?:\.\d{1,12})?):[ \t]+(?:(?P<sys>[a-z_][a-z0-9_]{0,63}):)?(?P<name>[A-Za-z_][A-Za-z0-9_]{0,127}):"
    r"[ \t]?(?P<text>.*)")


@dataclass(slots=True)
class Event:
    """One trace event: the header fields and the event's own fields."""

    lineno: int
    task: str
    pid: int
    cpu: int
    ts: float
    name: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Malformed:
    """A line that looked like an event and could not be read."""

    lineno: int
    reason: str
    name: str = ""


class _Bad(ValueError):
    pass


def _hex(s: str, what: str) -> int:
    if s.startswith(("0x", "0X")):
        s = s[2:]
    if not s or len(s) > 16:
        raise _Bad(f"{what}: not a 64-bit hex number")
    try:
        return int(s, 16)
    except ValueError:
        raise _Bad(f"{what}: not a hex number") from None


def _dec(s: str, what: str) -> int:
    if not s.isascii() or not s.isdigit() or len(s) > 20:
        raise _Bad(f"{what}: not a decimal number")
    v = int(s)
    if v > _U64_MAX:
        raise _Bad(f"{what}: out of range")
    return v


def _array(s: str, what: str) -> np.ndarray:
    """``__print_array`` output: ``{0x1,0x2}`` (``{}`` when empty), elements in hex."""
    if len(s) < 2 or s[0] != "{" or s[-1] != "}":
        raise _Bad(f"{what}: not an array {{...}}")
    body = s[1:-1]
    if not body:
        return np.zeros(0, dtype=_U64)
    parts = body.split(",")
    if len(parts) > 4 * TRACE_MAX_ENTRIES * 64:
        raise _Bad(f"{what}: too many elements")
    # text to numbers: one int() per printed element, as the text has them
    return np.array([_hex(p, what) for p in parts], dtype=_U64)


def _kv(tokens: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tokens:
        k, sep, v = t.partition("=")
        if sep:
            out[k] = v
    return out


def _dir(kv: dict[str, str]) -> str:
    d = kv.get("dir")
    if d is None:
        raise _Bad("no dir=")
    if d not in _DIRS and not d.startswith("0x"):
        raise _Bad(f"dir={d[:20]!r} is not a DMA direction")
    return d


def _need(kv: dict[str, str], key: str) -> str:
    v = kv.get(key)
    if v is None:
        raise _Bad(f"no {key}=")
    return v


def _fields(kind: str, text: str) -> dict[str, Any]:
    """The fields of one event's TP_printk text, by the event's class."""
    tok = text.split()
    if kind in ("iommu_map", "iommu_unmap"):
        # "IOMMU: iova=0x%016llx - 0x%016llx paddr=0x%016llx size=%zu"
        # "IOMMU: iova=0x%016llx - 0x%016llx size=%zu unmapped_size=%zu"
        if not tok or tok[0] != "IOMMU:":
            raise _Bad("no IOMMU: prefix")
        kv = _kv(tok)
        f: dict[str, Any] = {"iova": _hex(_need(kv, "iova"), "iova"), "size": _dec(_need(kv, "size"), "size")}
        if kind == "iommu_map":
            f["paddr"] = _hex(_need(kv, "paddr"), "paddr")
        else:
            f["unmapped_size"] = _dec(_need(kv, "unmapped_size"), "unmapped_size")
        return f
    if kind == "io_page_fault":
        # "IOMMU:%s %s iova=0x%016llx flags=0x%04x" (driver, device)
        if len(tok) < 4 or not tok[0].startswith("IOMMU:"):
            raise _Bad("not IOMMU:DRIVER DEVICE iova= flags=")
        kv = _kv(tok)
        return {"device": tok[1], "iova": _hex(_need(kv, "iova"), "iova"), "flags": _hex(_need(kv, "flags"), "flags")}
    if kind == "swiotlb_bounced":
        # "dev_name: %s dma_mask=%llx dev_addr=%llx size=%zu" (+ " NORMAL|FORCE" before 5.x)
        if len(tok) < 5 or tok[0] != "dev_name:":
            raise _Bad("not dev_name: NAME dma_mask= dev_addr= size=")
        kv = _kv(tok)
        return {"device": tok[1], "dev_addr": _hex(_need(kv, "dev_addr"), "dev_addr"),
                "size": _dec(_need(kv, "size"), "size")}
    # the dma events: "DEVICE dir=... ..."
    if len(tok) < 2 or "=" in tok[0]:
        raise _Bad("no device name")
    kv = _kv(tok[1:])
    f = {"device": tok[0], "dir": _dir(kv), "attrs": kv.get("attrs", "")}
    if kind in ("map", "unmap", "sync_single", "alloc", "free"):
        f["dma_addr"] = _hex(_need(kv, "dma_addr"), "dma_addr")
        f["size"] = _dec(_need(kv, "size"), "size")
        if kind == "map":
            f["phys_addr"] = _hex(_need(kv, "phys_addr"), "phys_addr")
    elif kind == "map_sg":
        f["dma_addrs"] = _array(_need(kv, "dma_addrs"), "dma_addrs")
        f["sizes"] = _array(_need(kv, "sizes"), "sizes")
        f["phys_addrs"] = _array(_need(kv, "phys_addrs"), "phys_addrs")
        if len(f["sizes"]) != len(f["dma_addrs"]):
            raise _Bad("dma_addrs and sizes differ in length")
        if np.any(f["sizes"] > _U64(0xFFFFFFFF)):
            raise _Bad("sizes: not an unsigned int")
        traced_n, traced_e = len(f["phys_addrs"]), len(f["dma_addrs"])
        full_n, full_e = traced_n, traced_e
        if "nents" in kv or "ents" in kv:   # the format since DMA_TRACE_MAX_ENTRIES
            try:
                a, b = _need(kv, "nents").split("/")
                c, d = _need(kv, "ents").split("/")
            except ValueError:
                raise _Bad("nents=/ents= not N/M") from None
            a_, full_n, c_, full_e = (_dec(x, "nents/ents") for x in (a, b, c, d))
            if a_ != traced_n or c_ != traced_e or full_n < traced_n or full_e < traced_e:
                raise _Bad("nents=/ents= disagree with the arrays")
            if full_n > (1 << 31) or full_e > (1 << 31):
                raise _Bad("nents/ents beyond an int")
        f.update(full_nents=full_n, full_ents=full_e, truncated="[TRUNCATED]" in tok)
        if f["truncated"] != (full_n > traced_n or full_e > traced_e):
            raise _Bad("[TRUNCATED] disagrees with nents=/ents=")
    elif kind == "map_sg_err":
        # the kernel prints the scatterlist's physical addresses under "dma_addrs="
        f["phys_addrs"] = _array(_need(kv, "dma_addrs"), "dma_addrs")
        f["err"] = _need(kv, "err")
    elif kind == "unmap_sg":
        f["phys_addrs"] = _array(_need(kv, "phys_addrs"), "phys_addrs")
    elif kind == "sync_sg":
        f["dma_addrs"] = _array(_need(kv, "dma_addrs"), "dma_addrs")
        f["sizes"] = _array(_need(kv, "sizes"), "sizes")
    elif kind in ("alloc_sgt", "free_sgt"):
        f["dma_addr"] = _hex(_need(kv, "dma_addr"), "dma_addr")
        f["size"] = _dec(_need(kv, "size"), "size")
        f["phys_addrs"] = _array(_need(kv, "phys_addrs"), "phys_addrs")
    return f


def parse_line(line: str, lineno: int = 0) -> Event | Malformed | None:
    """One line of a trace: an :class:`Event` (``fields`` filled for the
    events of :data:`KNOWN_EVENTS`, empty for others), a
    :class:`Malformed`, or None for a comment, a blank line or a line of
    the report's preamble (``cpus=2``, ``version = 6``, ``CPU 0 is empty``)."""
    s = line.rstrip("\r\n")
    if not s.strip() or s.lstrip().startswith("#"):
        return None
    if len(s) > MAX_LINE:
        return Malformed(lineno, f"line longer than {MAX_LINE} characters")
    m = _HEAD.match(s)
    if m is None:
        st = s.strip()
        # trace-cmd report's preamble and per-CPU notes, tracefs's buffer notes
        if st.startswith(("cpus=", "version", "CPU ", "CPU:", "##### CPU")) or " is empty" in st:
            return None
        return Malformed(lineno, "not an event line (TASK-PID [CPU] ... TIMESTAMP: EVENT: ...)")
    name = m["name"]
    try:
        ev = Event(lineno, m["task"], int(m["pid"]), int(m["cpu"]), float(m["ts"]), name, m["text"])
    except ValueError:
        return Malformed(lineno, "bad header number", name)
    kind = KNOWN_EVENTS.get(name)
    if kind is None:
        return ev
    if kind in ("iommu_map", "iommu_unmap", "io_page_fault") and m["sys"] not in (None, "iommu"):
        return ev   # a "map" event of another system
    try:
        ev.fields = _fields(kind, ev.text)
    except _Bad as e:
        return Malformed(lineno, f"{name}: {e}", name)
    return ev


def _lines(source: str | os.PathLike[str] | IO[str] | IO[bytes] | Iterable[str]) -> Iterator[str]:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _lines(f)
        return
    for ln in source:
        yield ln.decode("utf-8", "replace") if isinstance(ln, (bytes, bytearray)) else ln


def parse_events(source: str | os.PathLike[str] | IO[str] | IO[bytes] | Iterable[str],
                 *, progress: Callable[[int], None] | None = None) -> Iterator[Event | Malformed]:
    """Events of a trace, one at a time (a generator: memory does not grow
    with the trace).  ``source``: a path, an open file (text or binary) or
    an iterable of lines.  Bytes that are not UTF-8 are replaced, never
    fatal.  ``progress(lineno)`` is called every 65536 lines."""
    for lineno, line in enumerate(_lines(source), 1):
        if progress is not None and not lineno & 0xFFFF:
            progress(lineno)
        got = parse_line(line, lineno)
        if got is not None:
            yield got


# ------------------------------------------------------------ reconstruction

#: What the trace does not say and the replay assumed, by the name the report counts.
ASSUMPTIONS = {
    "sg_lengths_from_segments": "dma_map_sg records the scatterlist's physical addresses without lengths: "
                                "as many entries as DMA segments, so each entry's length is taken as its "
                                "segment's (nothing was merged)",
    "sg_lengths_to_page_end": "dma_map_sg records the scatterlist's physical addresses without lengths: each "
                              "entry but the last is taken to run to the end of its page, the last takes the "
                              "rest of the DMA length",
    "sg_truncated": "dma_map_sg cut its arrays at 128 entries ([TRUNCATED]): the untraced entries are taken as "
                    "physically discontiguous, of the traced entries' mean length, and the untraced segments "
                    "of the traced segments' mean length",
    "unmap_sg_by_first_phys": "dma_unmap_sg records physical addresses only: matched to the live dma_map_sg "
                              "whose first entry has the same physical address",
    "direct_by_address": "no machine spec for the device: a mapping whose DMA address equals its physical "
                         "address is taken as dma-direct, any other as through the IOMMU (a dma-direct "
                         "mapping bounced through swiotlb or behind a DMA offset is misread: give --machine)",
}


@dataclass(slots=True)
class Op:
    """One map or unmap of a device, rebuilt from the trace.

    ``phys``/``lens`` (u64 arrays): the physical ranges mapped (map only).
    ``dma``: the DMA address the kernel returned (first segment for a
    scatterlist).  ``key``: what pairs an unmap with its map.
    """

    kind: str                 # "map" | "unmap"
    device: str
    lineno: int
    cpu: int
    ts: float
    sg: bool
    key: tuple[Any, ...]
    dma: int = 0
    dir: str = ""
    attrs: str = ""
    phys: np.ndarray | None = None
    lens: np.ndarray | None = None
    nbytes: int = 0
    assumed: tuple[str, ...] = ()


def _sg_ranges(f: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """The scatterlist's (phys, length) entries for one dma_map_sg event,
    and the total DMA length, filling in what the event leaves out."""
    phys = f["phys_addrs"]
    sizes = f["sizes"].astype(_U64)
    n, e = len(phys), len(sizes)
    full_n, full_e = f["full_nents"], f["full_ents"]
    assumed: list[str] = []
    seg_total = int(sizes.sum())
    if full_e > e:
        # untraced segments at the traced ones' mean length
        mean = seg_total // e if e else PAGE
        seg_total += (full_e - e) * mean
    if n == 0:
        return phys, np.zeros(0, dtype=_U64), seg_total, assumed
    if n == e and full_n == full_e:
        lens = sizes.copy()
        assumed.append("sg_lengths_from_segments")
        return phys, lens, seg_total, assumed
    # each traced entry runs to the end of its page; what is left of the
    # DMA length goes to the last traced entry, or, when entries were cut,
    # is shared by the untraced ones
    lens = (_U64(PAGE) - (phys & _U64(_PAGE_MASK))).astype(_U64)
    extra = full_n - n
    rest = seg_total - int(lens.sum()) if extra else seg_total - int(lens[:-1].sum())
    assumed.append("sg_lengths_to_page_end")
    if not extra:
        if rest > 0:
            lens[-1] = rest
        else:   # the pages' ends overshoot the total: split it evenly
            per = max(seg_total // n, 1)
            lens = np.full(n, per, dtype=_U64)
            lens[-1] = max(seg_total - per * (n - 1), 1)
        return phys, lens, seg_total, assumed
    assumed.append("sg_truncated")
    # the rest of the DMA length shared evenly (whole pages when it has
    # them); a byte each when the traced entries already cover it all
    if rest >= extra:
        per = (rest // extra) & ~_PAGE_MASK if rest >= extra * PAGE else rest // extra
        last = rest - per * (extra - 1)
    else:
        per = last = 1
    # fresh physical addresses above everything traced, a page apart
    # from each other so no two untraced entries merge
    top = (int(phys.max()) + (1 << 30)) & ~((1 << 30) - 1)
    stride = ((max(per, last) + _PAGE_MASK) & ~_PAGE_MASK) + PAGE
    if top + extra * stride < (1 << 63):
        xl = np.full(extra, per, dtype=_U64)
        xl[-1] = last
        phys = np.concatenate((phys, _U64(top) + np.arange(extra, dtype=_U64) * _U64(stride)))
        lens = np.concatenate((lens, xl))
    return phys, lens, seg_total, assumed


def rebuild_ops(events: Iterable[Event | Malformed], stats: "TraceStats") -> Iterator[Op]:
    """Each device's map and unmap operations, in trace order.

    Events that are not mappings are counted into ``stats`` (syncs,
    swiotlb bounces, faults, the IOMMU's own map/unmap calls, unknown
    events by name, malformed lines by number).
    """
    for ev in events:
        if isinstance(ev, Malformed):
            stats.malformed(ev)
            continue
        kind = KNOWN_EVENTS.get(ev.name)
        f = ev.fields
        if kind is None or not f:
            # by name, up to a bound on distinct names (memory stays bounded
            # whatever the input holds)
            name = ev.name if ev.name in stats.skipped or len(stats.skipped) < 1000 else "(other names)"
            stats.skipped[name] += 1
            continue
        if kind in ("iommu_map", "iommu_unmap"):
            stats.iommu[ev.name] += 1
            stats.iommu[f"{ev.name}_bytes"] += f["size"]
            continue
        dev = stats.device(f["device"])
        dev.events[ev.name] += 1
        if kind == "map":
            size = f["size"]
            if size == 0:
                continue
            yield Op("map", f["device"], ev.lineno, ev.cpu, ev.ts, False, ("single", f["dma_addr"]),
                     dma=f["dma_addr"], dir=f["dir"], attrs=f["attrs"],
                     phys=np.array([f["phys_addr"]], dtype=_U64), lens=np.array([size], dtype=_U64), nbytes=size)
        elif kind == "unmap":
            yield Op("unmap", f["device"], ev.lineno, ev.cpu, ev.ts, False, ("single", f["dma_addr"]),
                     dma=f["dma_addr"], nbytes=f["size"])
        elif kind == "map_sg":
            phys, lens, total, assumed = _sg_ranges(f)
            if len(phys) == 0:
                continue
            dma = int(f["dma_addrs"][0]) if len(f["dma_addrs"]) else 0
            yield Op("map", f["device"], ev.lineno, ev.cpu, ev.ts, True, ("sg", int(phys[0])), dma=dma, dir=f["dir"],
                     attrs=f["attrs"], phys=phys, lens=lens, nbytes=total, assumed=tuple(assumed))
        elif kind == "unmap_sg":
            if len(f["phys_addrs"]):
                yield Op("unmap", f["device"], ev.lineno, ev.cpu, ev.ts, True, ("sg", int(f["phys_addrs"][0])),
                         assumed=("unmap_sg_by_first_phys",))
        elif kind == "map_sg_err":
            dev.map_errors += 1
        elif kind in ("sync_single", "sync_sg"):
            dev.syncs += 1
        elif kind in ("alloc", "alloc_sgt"):
            dev.coherent_allocs += 1
            dev.coherent_bytes += f["size"]
        elif kind == "swiotlb_bounced":
            dev.swiotlb_bounces += 1
            dev.swiotlb_bytes += f["size"]
        elif kind == "io_page_fault":
            dev.faults += 1


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

def stale_window(model: Any) -> dict[str, int]:
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
iotlb_probe: Callable[[Any], dict[str, int]] | None = stale_window
NOT_MODELLED = "not modelled in this build"


# ------------------------------------------------------------------ report


@dataclass
class DeviceStats:
    """What the trace says about one device, and what the replay made of it."""

    name: str
    events: Counter[str] = field(default_factory=Counter)
    maps: int = 0
    unmaps: int = 0
    unmatched_unmaps: int = 0
    bytes_mapped: int = 0
    assumed: Counter[str] = field(default_factory=Counter)
    map_errors: int = 0
    syncs: int = 0
    coherent_allocs: int = 0
    coherent_bytes: int = 0
    swiotlb_bounces: int = 0
    swiotlb_bytes: int = 0
    faults: int = 0
    model_errors: int = 0
    not_replayed: Counter[str] = field(default_factory=Counter)
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    iova: dict[str, dict[str, Any]] = field(default_factory=dict)
    agreement: dict[str, Any] | None = None
    stale_iotlb: Any = NOT_MODELLED


@dataclass
class TraceStats:
    """Counts over the whole trace."""

    devices: dict[str, DeviceStats] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    malformed_lines: list[int] = field(default_factory=list)
    malformed_reasons: list[str] = field(default_factory=list)
    malformed_count: int = 0
    iommu: Counter[str] = field(default_factory=Counter)
    max_malformed_kept: int = 10000

    def device(self, name: str) -> DeviceStats:
        d = self.devices.get(name)
        if d is None:
            d = self.devices[name] = DeviceStats(name)
        return d

    def malformed(self, m: Malformed) -> None:
        self.malformed_count += 1
        if len(self.malformed_lines) < self.max_malformed_kept:
            self.malformed_lines.append(m.lineno)
            self.malformed_reasons.append(m.reason)
        if self.malformed_count <= 20:
            log.warning("line %d: %s", m.lineno, m.reason)


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


def geometry_from_machine(machine: Any) -> dict[str, DeviceGeometry]:
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
            stale: Any = NOT_MODELLED
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
    f: Any = None
    if isinstance(source, (str, os.PathLike)):
        total_bytes = os.path.getsize(source)
        f = open(source, "rb")
        src: Any = f
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


# ---------------------------------------------------------------- output


def to_json(result: dict[str, Any]) -> str:
    import json

    return json.dumps(result, indent=1, sort_keys=False) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """One row per device and strategy: the counts and the estimate."""
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["device", "strategy", "mode", "maps", "unmaps", "bytes_mapped", *kernel_work.KEYS, "kernel_est_ns",
                "iova_peak_nbytes", "iova_fragmentation_max", "swiotlb_bounces"])
    for name, d in result["devices"].items():
        for s, v in d["strategies"].items():
            iova = v.get("iova") or {}
            w.writerow([name, s, v["mode"], d["maps"], d["unmaps"], d["bytes_mapped"],
                        *(v["kernel_work"][k] for k in kernel_work.KEYS), v["kernel_est_ns"],
                        iova.get("peak_nbytes", ""), iova.get("fragmentation_max", ""), d["swiotlb"]["bounces"]])
    return buf.getvalue()


def _ns(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.3f} ms" if v >= 1e6 else f"{v / 1e3:.2f} us"


def format_markdown(result: dict[str, Any]) -> str:
    """Per device, one row per strategy; then the totals and the notes."""
    out = ["# DMA trace replay", ""]
    cols = ("iova_allocs", "iommu_map_calls", "pte_writes", "pt_walks", "iotlb_invalidations", "sg_entry_visits",
            "metadata_bytes")
    for name, d in result["devices"].items():
        out.append(f"## {name}")
        out.append("")
        out.append(f"{d['maps']} maps, {d['unmaps']} unmaps, {d['bytes_mapped']} bytes mapped; "
                   f"swiotlb {d['swiotlb']['bounces']} bounces ({d['swiotlb']['bytes']} bytes); "
                   f"assumed: {', '.join(f'{k} x{v}' for k, v in d['assumed'].items()) or 'nothing'}")
        if d["iova_agreement"]:
            a = d["iova_agreement"]
            out.append(f"IOVA agreement with the trace: {a['agree']}/{a['compared']}")
        out.append(f"stale IOTLB exposure: {d['stale_iotlb']}")
        out.append("")
        out.append("| strategy | " + " | ".join(cols) + " | kernel est. | IOVA peak | frag. |")
        out.append("|---|" + "---:|" * (len(cols) + 3))
        for s, v in d["strategies"].items():
            iova = v.get("iova") or {}
            out.append(f"| {s} | " + " | ".join(str(v["kernel_work"][k]) for k in cols)
                       + f" | {_ns(v['kernel_est_ns'])} | {iova.get('peak_nbytes', '-')} | "
                         f"{iova.get('fragmentation_max', '-')} |")
        out.append("")
    out.append("## Total")
    out.append("")
    out.append("| strategy | " + " | ".join(cols) + " | kernel est. |")
    out.append("|---|" + "---:|" * (len(cols) + 1))
    for s, v in result["total"]["strategies"].items():
        out.append(f"| {s} | " + " | ".join(str(v["kernel_work"][k]) for k in cols) + f" | {_ns(v['kernel_est_ns'])} |")
    out.append("")
    out.append(f"skipped events: {result['skipped'] or 'none'}; malformed lines: {result['malformed_count']}"
               + (f" (first: {result['malformed'][:10]})" if result["malformed"] else ""))
    out.extend(_iommu_check(result))
    for k, v in result["assumptions"].items():
        out.append(f"- assumed {k}: {v}")
    return "\n".join(out) + "\n"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary: per device and strategy, the main counts."""
    lines = []
    hdr = f"{'device':<14} {'strategy':<20} {'maps':>7} {'iommu_map':>9} {'pte_wr':>9} {'walks':>8} " \
          f"{'inval':>7} {'sg_vis':>8} {'meta_B':>9} {'kernel est':>12} {'iova_peak':>10}"
    lines.append(hdr)
    for name, d in result["devices"].items():
        for s, v in d["strategies"].items():
            k = v["kernel_work"]
            iova = v.get("iova") or {}
            lines.append(f"{name[:14]:<14} {s:<20} {d['maps']:>7} {k['iommu_map_calls']:>9} {k['pte_writes']:>9} "
                         f"{k['pt_walks']:>8} {k['iotlb_invalidations']:>7} {k['sg_entry_visits']:>8} "
                         f"{k['metadata_bytes']:>9} {_ns(v['kernel_est_ns']):>12} {iova.get('peak_nbytes', '-')!s:>10}")
    for name, d in result["devices"].items():
        extra = []
        if d["assumed"]:
            extra.append("assumed " + ", ".join(f"{k} x{v}" for k, v in d["assumed"].items()))
        if d["iova_agreement"]:
            a = d["iova_agreement"]
            extra.append(f"IOVA agreement {a['agree']}/{a['compared']}")
        if d["swiotlb"]["bounces"]:
            extra.append(f"swiotlb {d['swiotlb']['bounces']} bounces, {d['swiotlb']['bytes']} B")
        extra.append(f"stale IOTLB: {d['stale_iotlb']}")
        lines.append(f"{name}: " + "; ".join(extra))
    lines.append(f"skipped: {result['skipped'] or 'none'}; malformed lines: {result['malformed_count']}"
                 + (f" {result['malformed'][:10]}" if result["malformed"] else ""))
    lines.extend(_iommu_check(result))
    return "\n".join(lines)


def _iommu_check(result: dict[str, Any]) -> list[str]:
    """The IOMMU's own map tracepoint (one event per iommu_map_nosync call,
    any device, no device name) beside the model's count for the traced
    strategy."""
    ev = result.get("iommu_events") or {}
    traced = result["total"]["strategies"].get("traced")
    if not ev.get("map") or traced is None:
        return []
    return [f"iommu:map events in the trace: {ev['map']} (every domain and device); the model's 'traced' "
            f"iommu_map_calls for the DMA-API mappings read: {traced['kernel_work']['iommu_map_calls']}"]


# ------------------------------------------------------------- synthesis


def _segments(entry_lens: np.ndarray, max_seg: int) -> np.ndarray:
    """Lengths of the DMA segments iommu_dma_map_sg's __finalise_sg makes
    of page-aligned entries laid out back to back in IOVA space: an entry
    joins the segment while the segment stays within ``max_seg``."""
    cum = np.concatenate(([0], np.cumsum(entry_lens.astype(np.int64))))
    out = []
    start, n = 0, len(entry_lens)
    while start < n:   # one step per segment
        end = max(int(np.searchsorted(cum, cum[start] + max_seg, side="right")) - 1, start + 1)
        out.append(int(cum[end] - cum[start]))
        start = end
    return np.array(out, dtype=np.int64)


def _arr(a: Iterable[int]) -> str:
    """``__print_array``'s text: ``{0x1,0x2}``."""
    return "{" + ",".join(f"0x{int(x):x}" for x in a) + "}"


def synthesize_trace(*, ops: int = 200, seed: int = 1, flavour: str = "trace", device: str = "0000:03:00.0",
                     strict: bool = False, aperture_bits: int = 48, ncpus: int = 2, dma_limit: int = _U64_MAX,
                     max_segment_size: int = 65536, sg_share: float = 0.3, max_sg_entries: int = 160,
                     fq_timeout: float | None = 0.01, live_max: int = 32) -> Iterator[str]:
    """Kernel-format trace text made by the model's own IOVA allocator.

    A seeded workload of ``dma_map_phys`` single mappings and
    ``dma_map_sg`` scatterlists (some longer than 128 entries, so the
    kernel's ``[TRUNCATED]`` cut shows) with their unmaps, on a PCI device
    behind a domain of the given geometry: the DMA addresses printed are
    those :class:`pydmabuf._core.IommuDomain` hands out, so replaying the
    text with the same geometry must agree on every one.  ``flavour``:
    ``"trace"`` (tracefs's file, with its header) or ``"report"``
    (``trace-cmd report``).  Yields lines with their newline.
    """
    if flavour not in ("trace", "report"):
        raise ValueError("flavour must be 'trace' or 'report'")
    rng = np.random.default_rng(seed)
    dom = _core.IommuDomain(strict=strict, aperture_bits=aperture_bits, ncpus=ncpus, fq_timeout=None)
    pref = True
    ts = 100.0
    first_queued: float | None = None
    live: list[tuple[bool, int, int, np.ndarray, np.ndarray, np.ndarray, str]] = []
    if flavour == "trace":
        yield "# tracer: nop\n#\n"
        yield f"# entries-in-buffer/entries-written: {2 * ops}/{2 * ops}   #P:{ncpus}\n#\n"
        yield "#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n"
        yield "#              | |         |   |||||     |         |\n"
    else:
        yield f"cpus={ncpus}\n"

    def line(cpu: int, name: str, text: str) -> str:
        if flavour == "trace":
            return f"     kworker/{cpu}:1-{40 + cpu:<6} [{cpu:03d}] ..... {ts:12.6f}: {name}: {text}\n"
        pad = " " * max(0, 20 - len(name))   # trace-cmd pads the event name
        return f"     kworker/{cpu}:1-{40 + cpu:<6} [{cpu:03d}] {ts:12.6f}: {name}: {pad}{text}\n"

    def tick() -> None:
        nonlocal first_queued
        if first_queued is not None and fq_timeout is not None and ts - first_queued >= fq_timeout:
            dom.flush()
            first_queued = None

    dirs = ("TO_DEVICE", "FROM_DEVICE", "BIDIRECTIONAL")
    done = 0
    while done < ops or live:
        # the time as printed (microseconds), so the flush-queue timer
        # fires here exactly where the replay, reading the text, fires it
        ts = round(ts + float(rng.integers(1, 4000)) * 1e-6, 6)
        cpu = int(rng.integers(0, ncpus))
        tick()
        if done < ops and (len(live) < live_max and (not live or rng.random() < 0.55)):
            done += 1
            d = dirs[int(rng.integers(0, 3))]
            if rng.random() < sg_share:
                n = int(rng.integers(1, max_sg_entries + 1))
                pages = rng.integers(1, 5, size=n)
                phys = (rng.integers(1 << 16, 1 << 22, size=n).astype(np.uint64) << _U64(12))
                lens = pages.astype(np.uint64) << _U64(12)
                size = int(lens.sum())
                if pref:
                    iova, pref = dom.alloc_iova_pci(size, dma_limit, pref, cpu)
                else:
                    iova = dom.alloc_iova(size, dma_limit, cpu)
                segs = _segments(lens, max_segment_size)
                dmas = iova + np.concatenate(([0], np.cumsum(segs)[:-1]))
                tn, te = min(n, TRACE_MAX_ENTRIES), min(len(segs), TRACE_MAX_ENTRIES)
                trunc = " [TRUNCATED]" if n > TRACE_MAX_ENTRIES or len(segs) > TRACE_MAX_ENTRIES else ""
                yield line(cpu, "dma_map_sg", f"{device} dir={d} nents={tn}/{n} ents={te}/{len(segs)}{trunc} "
                           f"dma_addrs={_arr(dmas[:te])} sizes={_arr(segs[:te])} phys_addrs={_arr(phys[:tn])} attrs=")
                live.append((True, iova, size, phys, lens, segs, d))
            else:
                npg = int(rng.choice([1, 1, 1, 2, 16, 512]))
                off = int(rng.integers(0, 8)) * 64
                nbytes = npg * PAGE - off if npg > 1 else int(rng.integers(64, PAGE - off + 1))
                base = int(rng.integers(1 << 16, 1 << 22)) << 12
                if npg == 512:
                    base &= ~((1 << 21) - 1)
                size = ((off + nbytes + _PAGE_MASK) >> 12) << 12
                if pref:
                    iova, pref = dom.alloc_iova_pci(size, dma_limit, pref, cpu)
                else:
                    iova = dom.alloc_iova(size, dma_limit, cpu)
                yield line(cpu, "dma_map_phys", f"{device} dir={d} dma_addr={iova + off:x} size={nbytes} "
                           f"phys_addr={base + off:x} attrs=")
                live.append((False, iova, size, np.array([base + off], dtype=np.uint64),
                             np.array([nbytes], dtype=np.uint64), np.zeros(0, dtype=np.int64), d))
        else:
            k = int(rng.integers(0, len(live)))
            sg, iova, size, phys, lens, segs, d = live.pop(k)
            dom.unmap_dma(iova, size, cpu)
            if not strict and first_queued is None:
                first_queued = ts
            if sg:
                yield line(cpu, "dma_unmap_sg", f"{device} dir={d} phys_addrs={_arr(phys)} attrs=")
            else:
                off = int(phys[0]) & _PAGE_MASK
                yield line(cpu, "dma_unmap_phys", f"{device} dir={d} dma_addr={iova + off:x} size={int(lens[0])} "
                           f"attrs=")
