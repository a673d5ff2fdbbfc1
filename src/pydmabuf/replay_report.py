"""The output of :mod:`pydmabuf.replay`: its report as JSON, CSV,
Markdown and a plain-text table.  Every public name here is also
importable from :mod:`pydmabuf.replay`."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from pydmabuf import kernel_work

__all__ = ["to_json", "to_csv", "format_markdown", "format_table"]



def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, sort_keys=False) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """One row per device and strategy: the counts and the estimate."""
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

