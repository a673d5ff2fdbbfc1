"""The PCI side of the machine: host bridges and their windows, ports,
BARs, P2P providers and the P2P routing rules (``drivers/pci/p2pdma.c``).

* :class:`HostBridge` with its MEM :class:`Window` s (CPU physical to PCI
  bus address offsets), :class:`PciPort` (root and switch ports with their
  ACS setting), :class:`Bar` (a memory BAR placed in a window) and
  :class:`P2pProvider` (``struct p2pdma_provider``).
* :func:`calc_map_type_and_dist`: ``pci_p2pdma_map_type()``'s walk up the
  tree (ACS-redirecting bridges, the host-bridge whitelist), which
  :meth:`pydmabuf.machine.Machine.p2p_map_type` caches per device pair.
* :func:`p2p_context`: the routes from one device to every BAR, in the form
  the core's walks read.

The endpoints themselves (:class:`~pydmabuf.device.Device`) derive from the
PCI node here; this module refers to them in annotations only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf import _core, errors
from pydmabuf._types import U64_MAX, _fmt_size

if TYPE_CHECKING:
    from pydmabuf.device import Device

__all__ = ["P2PMapType", "Window", "PciPort", "HostBridge", "Bar", "P2pProvider", "calc_map_type_and_dist",
           "p2p_context"]


class P2PMapType(enum.IntEnum):
    """``enum pci_p2pdma_map_type`` (without the internal UNKNOWN)."""

    NONE = 1  #: not peer-to-peer memory (from ``pci_p2pdma_state`` only)
    NOT_SUPPORTED = 2  #: the client cannot reach the provider's BAR
    BUS_ADDR = 3  #: program the PCI bus address; no IOMMU, no host bridge
    THRU_HOST_BRIDGE = 4  #: a normal DMA mapping of the CPU physical address


@dataclass(eq=False)
class Window:
    """A host bridge's MEM window: CPU ``[cpu_start, cpu_start + nbytes)``
    decodes to PCI bus addresses ``cpu + bus_offset`` (mod 2**64)."""

    cpu_start: int
    nbytes: int
    bus_offset: int = 0
    prefetch: bool = False
    name: str = ""

    @property
    def bus_start(self) -> int:
        return (self.cpu_start + self.bus_offset) & U64_MAX

    def __repr__(self) -> str:
        off = f", bus {self.bus_start:#x} (offset {self.bus_offset:#x})" if self.bus_offset else ""
        return f"Window([{self.cpu_start:#x}, +{_fmt_size(self.nbytes)}]{off})"


class _PciNode:
    """Something in the PCI tree with an upstream bridge."""

    kind = "node"

    def __init__(self, name: str, bdf: str | None, parent: _PciNode | HostBridge | None,
                 *, vendor: int = 0, device_id: int = 0, acs_redirect: bool = False) -> None:
        self.name = name
        self.bdf = bdf
        self.parent = parent
        self.vendor = vendor
        self.device_id = device_id
        self.acs_redirect = acs_redirect
        self.children: list[_PciNode] = []
        if parent is not None:
            parent.children.append(self)

    @property
    def upstream_bridge(self) -> _PciNode | None:
        """``pci_upstream_bridge()``: NULL on the root bus."""
        return self.parent if isinstance(self.parent, _PciNode) else None

    @property
    def host_bridge(self) -> HostBridge:
        n: Any = self
        while isinstance(n, _PciNode):
            n = n.parent
        if not isinstance(n, HostBridge):
            raise errors.NoDevice(f"{self.name} is not under a host bridge")
        return n

    @property
    def segment(self) -> int:
        return int(self.bdf.split(":")[0], 16) if self.bdf else 0

    def key(self) -> int:
        """``map_types_idx()``: domain << 16 | bus << 8 | devfn."""
        if not self.bdf:
            return id(self)
        seg, bus, df = self.bdf.split(":")
        dev, fn = df.split(".")
        return (int(seg, 16) << 16) | (int(bus, 16) << 8) | (int(dev, 16) << 3) | int(fn, 16)


class PciPort(_PciNode):
    """A root port or a switch port (upstream or downstream)."""

    def __init__(self, name: str, bdf: str | None, parent: _PciNode | HostBridge, *,
                 kind: str = "root_port", acs_redirect: bool = False, vendor: int = 0,
                 device_id: int = 0) -> None:
        super().__init__(name, bdf, parent, vendor=vendor, device_id=device_id, acs_redirect=acs_redirect)
        self.kind = kind

    def __repr__(self) -> str:
        return f"<PciPort {self.name} {self.bdf or ''} {self.kind}{' ACS-redirect' if self.acs_redirect else ''}>"


class HostBridge:
    """A PCI host bridge: a root bus, MEM windows, and the identity of its
    root device (used by the kernel's P2P host-bridge whitelist)."""

    def __init__(self, name: str, segment: int, bus: int, windows: list[Window], *,
                 root_vendor: int | None = None, root_device: int | None = None) -> None:
        self.name = name
        self.segment = segment
        self.bus = bus
        self.windows = windows
        self.root_vendor = root_vendor
        self.root_device = root_device
        self.children: list[_PciNode] = []

    def window_for(self, cpu_addr: int) -> Window | None:
        for w in self.windows:
            if w.cpu_start <= cpu_addr < w.cpu_start + w.nbytes:
                return w
        return None

    def __repr__(self) -> str:
        return f"<HostBridge {self.name} {self.segment:04x}:{self.bus:02x} windows={self.windows}>"


@dataclass(eq=False)
class Bar:
    """A memory BAR, placed at ``cpu_start`` in a window of the host bridge."""

    owner: Device
    index: int
    nbytes: int
    cpu_start: int
    bus_offset: int
    prefetch: bool = False
    is_mem: bool = True

    @property
    def bus_start(self) -> int:
        return (self.cpu_start + self.bus_offset) & U64_MAX

    @property
    def last(self) -> int:
        return self.cpu_start + self.nbytes - 1

    def __repr__(self) -> str:
        return (f"Bar({self.owner.name} BAR{self.index}: [{self.cpu_start:#x}, +{_fmt_size(self.nbytes)}]"
                f"{f', bus {self.bus_start:#x}' if self.bus_offset else ''})")


class P2pProvider:
    """``struct p2pdma_provider``: one MEM BAR as peers see it."""

    def __init__(self, bar: Bar) -> None:
        self.bar = bar
        self.owner = bar.owner
        self.bus_offset = bar.bus_offset

    def bus_addr(self, phys: int) -> int:
        """``pci_p2pdma_bus_addr_map()``: CPU physical -> PCI bus address."""
        return (phys + self.bus_offset) & U64_MAX

    def __repr__(self) -> str:
        return f"<P2pProvider {self.owner.name} BAR{self.bar.index} bus_offset={self.bus_offset:#x}>"


# ------------------------------------------------------------- P2P routes


def calc_map_type_and_dist(provider: _PciNode, client: _PciNode, cpu_supports_p2pdma: bool) -> tuple[P2PMapType, int]:
    """``calc_map_type_and_dist()``: the route from ``client`` to
    ``provider`` and its distance (bridges crossed)."""
    # The kernel's calc_map_type_and_dist(): walk up from the provider,
    # counting ACS-redirecting bridges on its path (the common ancestor
    # included), look for each of its ancestors on the client's path;
    # below a common ancestor count the client's ACS bridges too.
    a: _PciNode | None = provider
    acs = 0
    dist_a = dist_b = 0
    common = None
    while a is not None:
        dist_b = 0
        if a.acs_redirect:
            acs += 1
        bb: _PciNode | None = client
        while bb is not None:
            if a is bb:
                common = a
                break
            bb = bb.upstream_bridge
            dist_b += 1
        if common is not None:
            break
        a = a.upstream_bridge
        dist_a += 1
    dist = dist_a + dist_b
    if common is not None:
        bb = client
        while bb is not None and bb is not common:
            if bb.acs_redirect:
                acs += 1
            bb = bb.upstream_bridge
        if acs == 0:
            return P2PMapType.BUS_ADDR, dist
    if not cpu_supports_p2pdma and not _host_bridge_whitelist(provider, client):
        return P2PMapType.NOT_SUPPORTED, dist
    return P2PMapType.THRU_HOST_BRIDGE, dist


#: ``pci_p2pdma_whitelist``: root devices of host bridges known to route
#: P2P, (vendor, device) -> whether both ends must be below the same one.
_WHITELIST = {
    (0x8086, 0x3C00): True, (0x8086, 0x3C01): True, (0x8086, 0x2F00): True, (0x8086, 0x2F01): True,
    (0x8086, 0x2030): False, (0x8086, 0x2031): False, (0x8086, 0x2032): False, (0x8086, 0x2033): False,
    (0x8086, 0x2020): False, (0x8086, 0x09A2): False,
}


def _hb_whitelisted(hb: HostBridge, same: bool) -> bool:
    if hb.root_vendor is None or hb.root_device is None:
        return False
    req_same = _WHITELIST.get((hb.root_vendor, hb.root_device))
    if req_same is None:
        return False
    return same or not req_same


def _host_bridge_whitelist(a: _PciNode, b: _PciNode) -> bool:
    ha, hb = a.host_bridge, b.host_bridge
    if ha is hb:
        return _hb_whitelisted(ha, True)
    return _hb_whitelisted(ha, False) and _hb_whitelisted(hb, False)


def p2p_context(device: Device) -> _core.P2pContext:
    """The P2P routes from ``device`` to every BAR of its machine, for the
    walks (cached; rebuilt when the machine gains ranges)."""
    m = device.machine
    cache: tuple[int, _core.P2pContext] | None = getattr(device, "_p2p_ctx", None)
    if cache is not None and cache[0] == len(m._owners):
        return cache[1]
    n = len(m._owners)
    states = np.full(n, int(P2PMapType.NONE), dtype=np.uint64)
    offs = np.zeros(n, dtype=np.uint64)
    for i, o in enumerate(m._owners):
        if isinstance(o, Bar):
            states[i] = int(m.p2p_map_type(o.owner, device))
            offs[i] = o.bus_offset & U64_MAX
    ctx = _core.P2pContext(m.address_map, states, offs)
    device._p2p_ctx = (n, ctx)  # type: ignore[attr-defined]  # this module's cache, kept on the device
    return ctx

