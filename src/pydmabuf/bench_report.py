"""The output of ``pydmabuf bench``: the text table, the Markdown
summary, CSV and JSON, ``--explain``, the plots and ``--compare``.  Every
public name here is also importable from :mod:`pydmabuf.bench`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Iterable

import numpy as np

from pydmabuf import _stats, kernel_work
from pydmabuf._types import PAGE_SIZE, _fmt_size
from pydmabuf.bench_cells import BASELINE, CI_LEVEL, FLOOR_STRATEGIES, MAPPING_STRATEGIES

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
    try:  # imported here on purpose: matplotlib is the optional [plot] extra, only a plot needs it
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
        from matplotlib.lines import Line2D  # type: ignore[import-not-found, unused-ignore]
        from matplotlib.ticker import (  # type: ignore[import-not-found, unused-ignore]
            FixedLocator, FuncFormatter, NullLocator)
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
    floor_pairs: list[tuple[float, float]] = []
    est_pairs: list[tuple[float, float]] = []
    same: dict[str, list[tuple[float, float]]] = {"base": [], "floor": [], "other": [], "ns": [], "est": []}
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
            kind = ("other" if c.get("baseline") != BASELINE else
                    "floor" if c["strategy"] in FLOOR_STRATEGIES else "base")
            {"base": base_pairs, "floor": floor_pairs, "other": other_ratio_pairs}[kind].append((ro[0], rn[0]))
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
               f"{len(base_pairs) + len(floor_pairs) + len(other_ratio_pairs)} ratios")

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
    out.append(frac(f"floor ratio cells ({', '.join(FLOOR_STRATEGIES)} / {BASELINE})", floor_pairs, "floor"))
    out.append(frac("other ratio cells (walk / c_floor)", other_ratio_pairs, "other"))
    out.append(frac("ns/page cells", ns_pairs, "ns"))
    out.append(frac("kernel_est_ns_per_page cells", est_pairs, "est"))
    if differs:
        out.append(f"the input differs between the runs (other work counts) in {len(differs)} groups: "
                   + ", ".join(f"{lay} {_fmt_size(n * PAGE_SIZE)}" for lay, n in differs))
    return "\n".join(out)
