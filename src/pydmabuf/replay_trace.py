"""DMA trace text, read and written: the first two stages of
:mod:`pydmabuf.replay`, and sample traces made by the model.

1. :func:`parse_events` -- lines of tracefs's ``trace`` file or of
   ``trace-cmd report`` to :class:`Event` (or :class:`Malformed`), in the
   print formats of ``include/trace/events/dma.h``, ``iommu.h`` and
   ``swiotlb.h`` (see :mod:`pydmabuf.replay` for the kernel versions read).
2. :func:`rebuild_ops` -- events to each device's map and unmap
   operations (:class:`Op`), with what the trace does not say filled in
   under a named assumption (:data:`ASSUMPTIONS`), counted in
   :class:`TraceStats`.

:func:`synthesize_trace` writes kernel-format text whose DMA addresses the
model's IOVA allocator chose.  The parser is written from the kernel's
formats; it shares no code with the kernel.  Every public name here is
also importable from :mod:`pydmabuf.replay`.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pydmabuf import _core

__all__ = ["Event", "Malformed", "Op", "ASSUMPTIONS", "KNOWN_EVENTS", "parse_line", "parse_events", "rebuild_ops",
           "DeviceStats", "TraceStats", "synthesize_trace", "NOT_MODELLED"]

log = logging.getLogger("pydmabuf.replay")

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
#: What a report says where the replay does not model the stale IOTLB window.
NOT_MODELLED = "not modelled in this build"

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
    stale_iotlb: dict[str, dict[str, int]] | str = NOT_MODELLED


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
