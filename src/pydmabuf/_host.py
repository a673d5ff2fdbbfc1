"""Building a :class:`~pydmabuf.machine.Machine` from the running host.

Read only: ``/proc/iomem`` for the physical address map and host bridge
windows, ``/sys/bus/pci/devices`` for the PCI tree, BARs, DMA masks, IOMMU
groups and (where the config space is readable) ACS settings.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydmabuf import errors
from pydmabuf._spec import _BDF  # a PCI address, domain:bus:device.function
from pydmabuf._types import PAGE_SIZE, RangeKind
from pydmabuf.device import Device
from pydmabuf.iommu import Iommu
from pydmabuf.pci import HostBridge, PciPort, Window

if TYPE_CHECKING:  # the class to build is passed in (Machine.from_host calls build)
    from pydmabuf.machine import Machine

log = logging.getLogger(__name__)

_LINE = re.compile(r"^(\s*)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")
_PCI_BUS = re.compile(r"^PCI Bus ([0-9a-fA-F]{4}):([0-9a-fA-F]{2})$")

PCI_EXT_CAP_ID_ACS = 0x0D
PCI_ACS_CTRL = 6
PCI_ACS_RR, PCI_ACS_CR, PCI_ACS_EC = 0x04, 0x08, 0x20
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000


@dataclass
class _Entry:
    depth: int
    start: int
    end: int
    label: str
    children: list["_Entry"] = field(default_factory=list)


def parse_iomem(text: str) -> list[_Entry]:
    """The /proc/iomem tree (top-level entries with their children)."""
    roots: list[_Entry] = []
    stack: list[_Entry] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        e = _Entry(len(m.group(1)) // 2, int(m.group(2), 16), int(m.group(3), 16), m.group(4).strip())
        while stack and stack[-1].depth >= e.depth:
            stack.pop()
        (stack[-1].children if stack else roots).append(e)
        stack.append(e)
    return roots


def _walk(entries: list[_Entry]) -> Iterator[_Entry]:
    for e in entries:
        yield e
        yield from _walk(e.children)


def _read(path: str, default: str | None = None) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _acs_redirect(config_path: str) -> bool:
    """ACS control has RR, CR or EC set (needs the extended config space)."""
    try:
        with open(config_path, "rb") as f:
            cfg = f.read(4096)
    except OSError:
        return False
    pos = 0x100
    seen = 0
    while len(cfg) >= pos + 8 and pos and seen < 64:
        hdr = int.from_bytes(cfg[pos : pos + 4], "little")
        if hdr in (0, 0xFFFFFFFF):
            return False
        if hdr & 0xFFFF == PCI_EXT_CAP_ID_ACS:
            ctrl = int.from_bytes(cfg[pos + PCI_ACS_CTRL : pos + PCI_ACS_CTRL + 2], "little")
            return bool(ctrl & (PCI_ACS_RR | PCI_ACS_CR | PCI_ACS_EC))
        pos = (hdr >> 20) & 0xFFC
        seen += 1
    return False


def build(cls: type[Machine], *, iomem: str, sysfs: str) -> Machine:
    try:
        with open(iomem) as f:
            text = f.read()
    except OSError as exc:
        raise errors.from_errno(exc.errno or 5, f"cannot read {iomem}: {exc.strerror}") from None
    roots = parse_iomem(text)
    if not roots:
        raise errors.InvalidArgument(f"{iomem}: no ranges found")
    if all(e.start == 0 and e.end == 0 for e in _walk(roots)):
        raise errors.NotPermitted(f"{iomem} hides its addresses from this process (run as root)")

    m = cls("host")
    cpuinfo = _read("/proc/cpuinfo", "") or ""
    if "AuthenticAMD" in cpuinfo:
        fam = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M)
        m.cpu_vendor, m.cpu_family = "amd", int(fam.group(1)) if fam else 0
    elif "GenuineIntel" in cpuinfo:
        m.cpu_vendor = "intel"

    # Host bridge windows: "PCI Bus SSSS:BB" entries that are not inside
    # another PCI Bus entry (those are bridge windows).
    windows: dict[str, list[Window]] = {}

    def collect(entries: list[_Entry], in_bus: bool) -> None:
        for e in entries:
            mb = _PCI_BUS.match(e.label)
            if mb and not in_bus:
                key = f"{mb.group(1)}:{mb.group(2)}".lower()
                windows.setdefault(key, []).append(Window(e.start, e.end - e.start + 1))
                collect(e.children, True)
            else:
                collect(e.children, in_bus or bool(mb))

    collect(roots, False)

    # Memory: System RAM, and the other top-level ranges as reserved unless
    # they hold PCI windows (ECAM and the like).
    def holds_pci(e: _Entry) -> bool:
        return any(_PCI_BUS.match(c.label) for c in _walk(e.children))

    for e in roots:
        if _PCI_BUS.match(e.label):
            continue
        kind = RangeKind.RAM if e.label == "System RAM" else RangeKind.RESERVED
        if kind == RangeKind.RESERVED and holds_pci(e):
            continue
        try:
            m.add_memory(e.start, e.end - e.start + 1, kind, e.label)
        except errors.AlreadyExists:
            log.debug("skipping overlapping iomem range %s", e.label)

    # PCI functions.
    try:
        names = sorted(n for n in os.listdir(sysfs) if _BDF.match(n))
    except OSError as exc:
        if not windows:
            names = []
        else:
            raise errors.from_errno(exc.errno or 5, f"cannot list {sysfs}: {exc.strerror}") from None

    for key, wins in windows.items():
        seg, bus = key.split(":")
        m.add_host_bridge(HostBridge(f"pci{key}", int(seg, 16), int(bus, 16), wins))

    info = {}
    for n in names:
        path = os.path.realpath(os.path.join(sysfs, n))
        chain = [p for p in path.split("/") if _BDF.match(p)]
        hb_dir = [p for p in path.split("/") if p.startswith("pci") and ":" in p]
        cls_code = int(_read(os.path.join(path, "class"), "0x0") or "0", 16)
        info[n] = (path, chain, hb_dir[0][3:].lower() if hb_dir else None, cls_code)

    iommu = None
    groups: dict[str, list[Device]] = {}
    for n in names:
        path, chain, hbkey, cls_code = info[n]
        parent_bdf = chain[-2] if len(chain) >= 2 else None
        parent: PciPort | HostBridge
        if parent_bdf is not None and parent_bdf in m.ports:
            parent = m.ports[parent_bdf]
        else:
            if hbkey is None:
                continue
            if hbkey not in {h.split("pci", 1)[1] for h in m.host_bridges}:
                seg, bus = hbkey.split(":")
                m.add_host_bridge(HostBridge(f"pci{hbkey}", int(seg, 16), int(bus, 16), []))
            parent = m.host_bridges[f"pci{hbkey}"]
        vendor = int(_read(os.path.join(path, "vendor"), "0x0") or "0", 16)
        device_id = int(_read(os.path.join(path, "device"), "0x0") or "0", 16)
        acs = _acs_redirect(os.path.join(path, "config"))
        hb = parent if isinstance(parent, HostBridge) else parent.host_bridge
        if hb.root_vendor is None and isinstance(parent, HostBridge):
            devfn = n.split(":")[2]
            if devfn == "00.0" or (cls_code >> 8) == 0x0604:
                hb.root_vendor, hb.root_device = vendor, device_id
        if (cls_code >> 8) == 0x0604:  # PCI-to-PCI bridge
            port_kind = "root_port" if isinstance(parent, HostBridge) else (
                "switch_upstream" if getattr(parent, "kind", "") != "switch_upstream" else "switch_downstream")
            m.add_port(PciPort(n, n, parent, kind=port_kind, acs_redirect=acs, vendor=vendor, device_id=device_id))
            continue
        bits = _read(os.path.join(path, "dma_mask_bits"))
        mask = (1 << int(bits)) - 1 if bits and bits.isdigit() and 0 < int(bits) <= 64 else 2**64 - 1
        drv = os.path.basename(os.path.realpath(os.path.join(path, "driver"))) if os.path.exists(
            os.path.join(path, "driver")) else ""
        dev = Device(m, n, bdf=n, parent=parent, vendor=vendor, device_id=device_id, dma_mask=mask,
                     vfio=drv == "vfio-pci", description=f"driver {drv}" if drv else "no driver")
        m.add_device(dev)
        # BARs from the resource file: "start end flags" per line.
        res = _read(os.path.join(path, "resource"), "") or ""
        for idx, line in enumerate(res.splitlines()[:6]):
            parts = line.split()
            if len(parts) != 3:
                continue
            start, end, flags = (int(p, 16) for p in parts)
            size = end - start + 1
            if not (flags & IORESOURCE_MEM) or start == 0 or size < PAGE_SIZE or size & (size - 1):
                continue
            if hb.window_for(start) is None:
                hb.windows.append(Window(start, size, 0, bool(flags & IORESOURCE_PREFETCH), "from BAR"))
            if any(r.kind == RangeKind.RESERVED for r in m.address_map.overlapping(start, size)):
                m.address_map.erase(start, size)  # one erase clears the whole window
            try:
                m.add_bar(dev, idx, size, prefetch=bool(flags & IORESOURCE_PREFETCH), cpu_start=start)
            except errors.DmaBufError as e:
                log.debug("%s BAR%d not modelled: %s", n, idx, e)
        grp = os.path.join(path, "iommu_group")
        if os.path.exists(grp):
            gname = os.path.basename(os.path.realpath(grp))
            gtype = _read(os.path.join(os.path.realpath(grp), "type"), "DMA") or "DMA"
            if gtype in ("DMA", "DMA-FQ"):
                if iommu is None:
                    iommu = m.add_iommu(Iommu("host-iommu", strict=gtype == "DMA"))
                groups.setdefault(gname, []).append(dev)
    for gname, devs in groups.items():
        assert iommu is not None
        m.add_group(f"group{gname}", iommu, devs)
    return m.finalize()
