"""Building a :class:`~pydmabuf.machine.Machine` from a declarative spec."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Mapping

from pydmabuf import errors
from pydmabuf._args import _mask, _num
from pydmabuf._types import U64_MAX, RangeKind
from pydmabuf.device import Device, DmaRange
from pydmabuf.iommu import Iommu
from pydmabuf.pci import HostBridge, PciPort, Window

if TYPE_CHECKING:  # the class to build is passed in (Machine's classmethods call build)
    from pydmabuf.machine import Machine

_MEM_KINDS = {"ram": RangeKind.RAM, "reserved": RangeKind.RESERVED, "private": RangeKind.PRIVATE}
_KNOWN = {
    "top": {"name", "cpu", "memory", "swiotlb", "iommus", "host_bridges", "ports", "devices"},
    "memory": {"start", "size", "kind", "name"},
    "swiotlb": {"name", "start", "size"},
    "iommu": {"name", "strict", "aperture_bits", "granule", "ncpus", "fq_timeout", "iotlb_entries"},
    "host_bridge": {"name", "segment", "bus", "root_vendor", "root_device", "windows"},
    "window": {"cpu", "size", "bus_offset", "prefetch", "name"},
    "port": {"name", "bdf", "parent", "kind", "acs_redirect", "vendor", "device_id"},
    "device": {"name", "bdf", "parent", "vendor", "device_id", "dma_mask", "bus_dma_limit",
               "max_segment_size", "seg_boundary_mask", "dma_ranges", "dma_offset", "min_align_mask",
               "iommu", "group", "swiotlb", "force_swiotlb", "can_p2p", "cc_trusted", "untrusted",
               "coherent", "vfio", "bars", "description"},
    "bar": {"index", "size", "prefetch", "at"},
}


def _check_keys(d: Mapping[str, Any], kind: str, where: str) -> None:
    if not isinstance(d, Mapping):
        raise errors.InvalidArgument(f"{where}: expected a table/dict, got {type(d).__name__}")
    extra = set(d) - _KNOWN[kind]
    if extra:
        raise errors.InvalidArgument(f"{where}: unknown key(s) {sorted(extra)}; known: {sorted(_KNOWN[kind])}")


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise errors.InvalidArgument(f"{where}: missing {key!r}")
    return d[key]


def _timeout(v: Any, where: str) -> float | None:
    """Seconds; None, false or 0 (what TOML can say) mean no timer."""
    if v is None or v is False or v == 0:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise errors.InvalidArgument(f"{where}: fq_timeout must be seconds >= 0, or false")
    return float(v)


_BDF = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def _bdf(v: Any, where: str) -> str | None:
    """A PCI address ``DDDD:BB:DD.F`` (or None)."""
    if v is None:
        return None
    if not isinstance(v, str) or not _BDF.match(v):
        raise errors.InvalidArgument(f"{where}: bdf {v!r} is not a PCI address DDDD:BB:DD.F")
    return v


def build(cls: type[Machine], spec: Mapping[str, Any]) -> Machine:
    _check_keys(spec, "top", "machine")
    cpu = spec.get("cpu", {})
    if not isinstance(cpu, Mapping):
        raise errors.InvalidArgument(f"machine: cpu must be a table/dict, got {type(cpu).__name__}")
    m = cls(spec.get("name", "machine"), cpu_vendor=str(cpu.get("vendor", "intel")),
            cpu_family=_num(cpu.get("family", 6), "cpu.family"))

    for i, e in enumerate(spec.get("memory", [])):
        where = f"memory[{i}]"
        _check_keys(e, "memory", where)
        kind = str(e.get("kind", "ram")).lower()
        if kind not in _MEM_KINDS:
            raise errors.InvalidArgument(f"{where}: kind {kind!r} is not one of {sorted(_MEM_KINDS)}")
        try:
            m.add_memory(_num(_req(e, "start", where), where + ".start"), _num(_req(e, "size", where), where + ".size"),
                         _MEM_KINDS[kind], str(e.get("name", "")))
        except errors.AlreadyExists as ex:
            raise errors.AlreadyExists(f"{where}: {ex.strerror}") from None

    for i, e in enumerate(spec.get("swiotlb", [])):
        where = f"swiotlb[{i}]"
        _check_keys(e, "swiotlb", where)
        m.add_swiotlb(str(e.get("name", "swiotlb")), _num(_req(e, "start", where), where),
                      _num(_req(e, "size", where), where))

    for i, e in enumerate(spec.get("iommus", [])):
        where = f"iommus[{i}]"
        _check_keys(e, "iommu", where)
        m.add_iommu(Iommu(str(_req(e, "name", where)), strict=bool(e.get("strict", False)),
                          aperture_bits=_num(e.get("aperture_bits", 48), where),
                          granule=_num(e.get("granule", 4096), where), ncpus=_num(e.get("ncpus", 1), where),
                          fq_timeout=_timeout(e.get("fq_timeout", 0.01), where),
                          iotlb_entries=_num(e.get("iotlb_entries", 64), where)))

    for i, e in enumerate(spec.get("host_bridges", [])):
        where = f"host_bridges[{i}]"
        _check_keys(e, "host_bridge", where)
        windows = []
        for j, w in enumerate(e.get("windows", [])):
            ww = f"{where}.windows[{j}]"
            _check_keys(w, "window", ww)
            windows.append(Window(_num(_req(w, "cpu", ww), ww), _num(_req(w, "size", ww), ww),
                                  _num(w.get("bus_offset", 0), ww) & U64_MAX, bool(w.get("prefetch", False)),
                                  str(w.get("name", ""))))
        rv, rd = e.get("root_vendor"), e.get("root_device")
        m.add_host_bridge(HostBridge(str(_req(e, "name", where)), _num(e.get("segment", 0), where),
                                     _num(e.get("bus", 0), where), windows,
                                     root_vendor=None if rv is None else _num(rv, where),
                                     root_device=None if rd is None else _num(rd, where)))

    def parent_of(name: str, where: str) -> Any:
        if name in m.host_bridges:
            return m.host_bridges[name]
        if name in m.ports:
            return m.ports[name]
        raise errors.InvalidArgument(f"{where}: parent {name!r} is not a host bridge or port defined before it")

    for i, e in enumerate(spec.get("ports", [])):
        where = f"ports[{i}]"
        _check_keys(e, "port", where)
        kind = str(e.get("kind", "root_port"))
        if kind not in ("root_port", "switch_upstream", "switch_downstream"):
            raise errors.InvalidArgument(f"{where}: kind {kind!r} is not root_port/switch_upstream/switch_downstream")
        m.add_port(PciPort(str(_req(e, "name", where)), _bdf(e.get("bdf"), where), parent_of(str(_req(e, "parent", where)), where),
                           kind=kind, acs_redirect=bool(e.get("acs_redirect", False)),
                           vendor=_num(e.get("vendor", 0), where), device_id=_num(e.get("device_id", 0), where)))

    groups: dict[str, tuple[Iommu, list[Device]]] = {}
    for i, e in enumerate(spec.get("devices", [])):
        where = f"devices[{i}]"
        _check_keys(e, "device", where)
        name = str(_req(e, "name", where))
        where = f"device {name!r}"
        parent = parent_of(str(e["parent"]), where) if "parent" in e else None
        bdf = _bdf(e.get("bdf"), where)
        if bdf is not None and parent is None:
            raise errors.InvalidArgument(f"{where}: a PCI device (bdf {bdf}) needs a parent port or host bridge")
        ranges = []
        for r in e.get("dma_ranges", []):
            if isinstance(r, (str, bytes)) or not isinstance(r, Sequence) or len(r) != 3:
                raise errors.InvalidArgument(f"{where}: a dma_ranges entry must be [cpu_start, dma_start, size], "
                                             f"not {r!r}")
            ranges.append(DmaRange(_num(r[0], where), _num(r[1], where), _num(r[2], where)))
        if "dma_offset" in e:
            off = _num(e["dma_offset"], where)
            if ranges:
                raise errors.InvalidArgument(f"{where}: give dma_ranges or dma_offset, not both")
            # dma = phys + offset over the whole address space (mod 2**64)
            ranges = [DmaRange(0, off & U64_MAX, 1 << 64)]
        pool = None
        if "swiotlb" in e:
            try:
                pool = m.swiotlb_pools[str(e["swiotlb"])]
            except KeyError:
                raise errors.InvalidArgument(f"{where}: no swiotlb pool {e['swiotlb']!r}") from None
        mss = e.get("max_segment_size")
        sbm = e.get("seg_boundary_mask")
        dev = Device(
            m, name, bdf=bdf, parent=parent, vendor=_num(e.get("vendor", 0), where),
            device_id=_num(e.get("device_id", 0), where),
            dma_mask=_mask(e.get("dma_mask", 64), where + ".dma_mask"),
            bus_dma_limit=_num(e.get("bus_dma_limit", 0), where),
            max_segment_size=None if mss is None else _num(mss, where),
            seg_boundary_mask=None if sbm is None else _num(sbm, where),
            dma_ranges=ranges, min_align_mask=_num(e.get("min_align_mask", 0), where),
            coherent=bool(e.get("coherent", True)), untrusted=bool(e.get("untrusted", False)),
            can_p2p=bool(e.get("can_p2p", False)), cc_trusted=bool(e.get("cc_trusted", False)),
            vfio=bool(e.get("vfio", False)), swiotlb=pool, force_swiotlb=bool(e.get("force_swiotlb", False)),
            description=str(e.get("description", "")),
        )
        m.add_device(dev)
        for j, b in enumerate(e.get("bars", [])):
            bw = f"{where}.bars[{j}]"
            _check_keys(b, "bar", bw)
            if parent is None:
                raise errors.InvalidArgument(f"{bw}: only PCI devices have BARs")
            idx = _num(b.get("index", j), bw)
            if not 0 <= idx <= 5:
                raise errors.InvalidArgument(f"{bw}: BAR index {idx} is not 0..5")
            m.add_bar(dev, idx, _num(_req(b, "size", bw), bw), prefetch=bool(b.get("prefetch", False)),
                      cpu_start=None if "at" not in b else _num(b["at"], bw))
        if "iommu" in e:
            io_name = str(e["iommu"])
            if io_name not in m.iommus:
                raise errors.InvalidArgument(f"{where}: no IOMMU {io_name!r}")
            gname = str(e.get("group", name))
            io, members = groups.setdefault(gname, (m.iommus[io_name], []))
            if io is not m.iommus[io_name]:
                raise errors.InvalidArgument(f"{where}: group {gname!r} is on IOMMU {io.name}, not {io_name}")
            members.append(dev)
    for gname, (io, members) in groups.items():
        m.add_group(gname, io, members)
    return m.finalize()
