"""``pydmabuf bench``: the mapping-throughput study.

A study is a grid of cells (page layout x buffer size x strategy).  Each
cell is timed over repeated runs on the same input and reported in ns per
page (median, with the spread of the middle half), beside references run in
the same process on the same input: the C floor compiled into the core
(``pydmabuf._core.floor_coalesce``) and the NumPy code a user would write
(:func:`pydmabuf.workloads.numpy_coalesce`).
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

from pydmabuf import _core, workloads
from pydmabuf._types import PAGE_SIZE, _fmt_size

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


def _sg_cells(layout: str, npages: int, pfns: np.ndarray, timing: dict[str, Any]) -> list[Cell]:
    """The scatterlist walk and its two references on one input."""
    cells = []
    table = _core.SgTable.from_pages(pfns)
    segs = int(table.nents)
    meta = int(table.metadata_nbytes)
    c = Cell(layout, npages, "sg_from_pages", measure(lambda: _core.SgTable.from_pages(pfns), **timing))
    c.counters = {"segments": segs, "metadata_bytes_per_page": meta / npages}
    cells.append(c)
    out = _core.floor_buffer(npages, 32)
    c = Cell(layout, npages, "c_floor", measure(lambda: _core.floor_coalesce(pfns, 0xFFFFF000, out), **timing))
    c.counters = {"segments": _core.floor_coalesce(pfns, 0xFFFFF000, out)}
    cells.append(c)
    c = Cell(layout, npages, "numpy", measure(lambda: workloads.numpy_coalesce(pfns), **timing))
    c.counters = {"segments": len(workloads.numpy_coalesce(pfns)[1])}
    cells.append(c)
    return cells


def run_study(
    layouts: Iterable[str] = DEFAULT_LAYOUTS,
    sizes: Iterable[int] = DEFAULT_SIZES,
    *,
    seed: int = 1,
    quick: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the study; returns a JSON-ready dict (``machine``, ``cells``, ``notes``)."""
    layouts = list(layouts)
    sizes = list(sizes)
    timing = {"min_time": 0.01, "min_reps": 3, "max_reps": 7} if quick else {"min_time": 0.1, "min_reps": 5, "max_reps": 25}
    notes: list[str] = []
    cells: list[Cell] = []
    prog = Progress(len(layouts) * len(sizes), progress)
    try:
        for lay in layouts:
            for npages in sizes:
                prog.step(f"{lay} {_fmt_size(npages * PAGE_SIZE)}")
                try:
                    pfns, keep = workloads.layout(lay, npages, seed)
                except OSError as e:
                    note = f"layout {lay!r} skipped: {e}"
                    if note not in notes:
                        notes.append(note)
                    continue
                cells.extend(_sg_cells(lay, npages, pfns, timing))
                del keep
    finally:
        prog.close()
    return {
        "tool": "pydmabuf bench",
        "version": _version(),
        "seed": seed,
        "quick": quick,
        "machine": machine_description(),
        "cells": [c.as_dict() for c in cells],
        "notes": notes,
    }


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


def format_table(result: dict[str, Any]) -> str:
    """The study as a table for people."""
    cells = result["cells"]
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for c in cells:
        by_key.setdefault((c["layout"], c["npages"]), {})[c["strategy"]] = c
    lines = []
    m = result["machine"]
    lines.append(f"pydmabuf bench {result['version']} on {m['cpu']} ({m['cpus']} CPUs), "
                 f"Python {m['python']}, NumPy {m['numpy']}, seed {result['seed']}")
    lines.append("")
    lines.append("Scatterlist walk (sg_alloc_table_from_pages): ns/page, median [q1-q3]")
    hdr = f"{'layout':<11} {'size':>8} {'segments':>9} {'core':>18} {'C floor':>8} {'NumPy':>8} {'core/C':>7} {'core/NumPy':>10} {'meta B/page':>11}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for (lay, npages), strat in by_key.items():
        core = strat.get("sg_from_pages")
        if core is None:
            continue
        floor = strat["c_floor"]
        npy = strat["numpy"]
        q = f"{core['ns_per_page']:.2f} [{core['ns_per_page_q1']:.2f}-{core['ns_per_page_q3']:.2f}]"
        lines.append(
            f"{lay:<11} {_fmt_size(npages * PAGE_SIZE):>8} {core['counters']['segments']:>9} {q:>18} "
            f"{floor['ns_per_page']:>8.2f} {npy['ns_per_page']:>8.2f} "
            f"{core['ns_per_page'] / floor['ns_per_page']:>7.2f} {core['ns_per_page'] / npy['ns_per_page']:>10.2f} "
            f"{core['counters']['metadata_bytes_per_page']:>11.2f}"
        )
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def to_csv(result: dict[str, Any]) -> str:
    """One row per cell, counters flattened."""
    rows = []
    keys: list[str] = []
    for c in result["cells"]:
        row = {k: v for k, v in c.items() if k != "counters"}
        for k, v in c["counters"].items():
            row[f"counter_{k}"] = v
        for k in row:
            if k not in keys:
                keys.append(k)
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=False) + "\n"
