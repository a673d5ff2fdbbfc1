"""The machine model: physical address map, PCI tree, IOMMUs and devices.

A :class:`Machine` holds

* the physical address map, a :class:`~pydmabuf.RangeTable` of RAM,
  reserved holes, private (confidential) memory, bounce-buffer pools and
  the PCI BARs (MMIO) placed inside their host bridge's windows;
* the PCI tree (:mod:`pydmabuf.pci`): host bridges (each window with its
  offset between CPU physical and PCI bus addresses), root ports, switches
  with their ACS settings, and endpoints with BARs;
* IOMMUs, their groups (:mod:`pydmabuf.iommu`) and the groups' DMA domains
  (:class:`~pydmabuf.IommuDomain`);
* devices (:class:`~pydmabuf.device.Device`) with the DMA limits the kernel
  keeps for them, the swiotlb pools (:mod:`pydmabuf.swiotlb`) and the page
  allocators over RAM (:mod:`pydmabuf.page_alloc`).

Build one with :meth:`Machine.default`, from a declarative description
(:meth:`Machine.from_spec` with a dict, :meth:`Machine.from_toml`), or from
the running host (:meth:`Machine.from_host`); the builders are
:mod:`pydmabuf._spec` and :mod:`pydmabuf._host`, which take the class to
build as an argument.

The parts keep their own modules; the names this module always exported
(``Device``, ``Bar``, ``SwiotlbPool``, ``P2PMapType``, ``U64_MAX``, ...)
are re-exported here from them.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any, Iterable, Iterator, Mapping, Union

from pydmabuf import _host, _spec, errors
from pydmabuf._args import _mask as _mask, _num as _num  # re-exported: the old import paths stay
from pydmabuf._core import IommuDomain, RangeTable
from pydmabuf._types import DMA_MAPPING_ERROR as DMA_MAPPING_ERROR, PAGE_SIZE, U64_MAX, RangeKind, _fmt_size
from pydmabuf.device import DEFAULT_MAX_SEGMENT_SIZE as DEFAULT_MAX_SEGMENT_SIZE, Device, DmaRange
from pydmabuf.iommu import MSI_WINDOW as MSI_WINDOW, Iommu, IommuGroup
from pydmabuf.memory import PhysMemory
from pydmabuf.page_alloc import PageAllocator
from pydmabuf.pci import (Bar, HostBridge, P2pProvider, P2PMapType, PciPort, Window, _PciNode,
                          calc_map_type_and_dist)
from pydmabuf.swiotlb import IO_TLB_SEGSIZE as IO_TLB_SEGSIZE, IO_TLB_SHIFT as IO_TLB_SHIFT
from pydmabuf.swiotlb import IO_TLB_SIZE as IO_TLB_SIZE, SwiotlbPool

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the backport
    import tomli as tomllib

log = logging.getLogger(__name__)

__all__ = [
    "Machine",
    "Device",
    "HostBridge",
    "PciPort",
    "Window",
    "Bar",
    "P2pProvider",
    "P2PMapType",
    "Iommu",
    "IommuGroup",
    "SwiotlbPool",
    "DmaRange",
    "p2p_map_type",
    "U64_MAX",
]

#: What a range of the address map belongs to: a name (RAM, a reserved
#: hole), a BAR, a bounce pool; None for index 0.
_Owner = Union[str, Bar, SwiotlbPool, None]


# ------------------------------------------------------------------ machine


class Machine:
    """A modelled computer: address map, PCI tree, IOMMUs, devices, memory."""

    def __init__(self, name: str = "machine", *, cpu_vendor: str = "intel", cpu_family: int = 6) -> None:
        self.name = name
        self.cpu_vendor = cpu_vendor.lower()
        self.cpu_family = cpu_family
        self.address_map = RangeTable()
        self.memory = PhysMemory()
        self.host_bridges: dict[str, HostBridge] = {}
        self.ports: dict[str, PciPort] = {}
        self.iommus: dict[str, Iommu] = {}
        self.groups: dict[str, IommuGroup] = {}
        self.swiotlb_pools: dict[str, SwiotlbPool] = {}
        self._devices: dict[str, Device] = {}
        self._owners: list[_Owner] = [None]
        self._range_names: dict[int, str] = {}

    # ------------------------------------------------------------ queries

    @property
    def devices(self) -> dict[str, Device]:
        """Devices by name."""
        return dict(self._devices)

    def device(self, name: str) -> Device:
        """The device called ``name``; NoDevice (ENODEV) lists the ones there are.

        Examples
        --------
        >>> Machine.default().device("nic0").name
        'nic0'
        """
        try:
            return self._devices[name]
        except KeyError:
            raise errors.NoDevice(f"machine {self.name!r} has no device {name!r} "
                                  f"(it has: {', '.join(self._devices)})") from None

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def owner_of(self, range_owner: int) -> _Owner:
        return self._owners[range_owner] if 0 <= range_owner < len(self._owners) else None

    def what_is(self, phys: int) -> tuple[RangeKind | int, _Owner] | None:
        """(kind, owner object) of the range holding ``phys``, or None."""
        r = self.address_map.lookup(phys)
        if r is None:
            return None
        return r.kind, self.owner_of(r.owner)

    def bar_at(self, phys: int) -> Bar | None:
        r = self.address_map.lookup(phys)
        if r is None or r.kind != RangeKind.MMIO:
            return None
        o = self.owner_of(r.owner)
        return o if isinstance(o, Bar) else None

    def ram_ranges(self, kind: RangeKind = RangeKind.RAM) -> list[tuple[int, int]]:
        """(start, nbytes) of every range of ``kind``."""
        return [(r.start, r.nbytes) for r in self.address_map if r.kind == kind]

    @property
    def pages(self) -> PageAllocator:
        """The page allocator over this machine's RAM."""
        pa = getattr(self, "_pages", None)
        if pa is None:
            pa = self._pages = PageAllocator(self)
        return pa

    @property
    def private_pages(self) -> PageAllocator:
        """The page allocator over this machine's confidential-computing
        PRIVATE memory (one per machine, like :attr:`pages`, so two
        exporters of private memory never hand out the same page)."""
        pa = getattr(self, "_private_pages", None)
        if pa is None:
            pa = self._private_pages = PageAllocator(self, kinds=(RangeKind.PRIVATE,))
        return pa

    @property
    def cpu_supports_p2pdma(self) -> bool:
        """``cpu_supports_p2pdma()``: AMD Zen (family 0x17) or newer."""
        return self.cpu_vendor == "amd" and self.cpu_family >= 0x17

    def iova_stats(self, device: Device) -> dict[str, int]:
        """Live IOVA of the device's domain: ranges, bytes, reserved."""
        if not isinstance(device, Device):
            raise TypeError(f"iova_stats: {type(device).__name__} is not a Device")
        dom = device.domain
        if dom is None:
            return {"live_ranges": 0, "live_nbytes": 0, "reserved_ranges": 0}
        return dict(dom.iovad.stats)

    # ----------------------------------------------------------- building

    def _own(self, obj: _Owner) -> int:
        self._owners.append(obj)
        return len(self._owners) - 1

    def add_memory(self, start: int, nbytes: int, kind: RangeKind = RangeKind.RAM, name: str = "") -> None:
        """Add a range to the physical address map (EEXIST on overlap)."""
        self.address_map.insert(start, nbytes, kind=kind, owner=self._own(name or kind.name))

    def add_iommu(self, iommu: Iommu) -> Iommu:
        if iommu.name in self.iommus:
            raise errors.AlreadyExists(f"IOMMU {iommu.name!r} exists")
        self.iommus[iommu.name] = iommu
        return iommu

    def add_host_bridge(self, hb: HostBridge) -> HostBridge:
        if hb.name in self.host_bridges:
            raise errors.AlreadyExists(f"host bridge {hb.name!r} exists")
        mine = sorted((w.cpu_start, w.cpu_start + w.nbytes) for w in hb.windows)
        for (a0, a1), (b0, b1) in zip(mine, mine[1:]):
            if b0 < a1:
                raise errors.AlreadyExists(f"host bridge {hb.name!r}: windows [{a0:#x}, {a1:#x}) and "
                                           f"[{b0:#x}, {b1:#x}) overlap")
        for other in self.host_bridges.values():
            for w in other.windows:
                for lo, hi in mine:
                    if lo < w.cpu_start + w.nbytes and w.cpu_start < hi:
                        raise errors.AlreadyExists(
                            f"host bridge {hb.name!r}: window [{lo:#x}, {hi:#x}) overlaps {other.name}'s "
                            f"[{w.cpu_start:#x}, {w.cpu_start + w.nbytes:#x})")
        self.host_bridges[hb.name] = hb
        return hb

    def add_port(self, port: PciPort) -> PciPort:
        self.ports[port.name] = port
        return port

    def add_swiotlb(self, name: str, phys_start: int, nbytes: int) -> SwiotlbPool:
        """Carve a bounce pool out of RAM (the RAM range is split)."""
        r = self.address_map.lookup(phys_start)
        if r is None or r.kind != RangeKind.RAM or phys_start + nbytes > r.end:
            raise errors.InvalidArgument(f"swiotlb {name}: [{phys_start:#x}, +{nbytes:#x}] is not inside RAM")
        self.address_map.erase(phys_start, nbytes)
        pool = SwiotlbPool(name, phys_start, nbytes)
        self.address_map.insert(phys_start, nbytes, kind=RangeKind.SWIOTLB, owner=self._own(pool))
        self.swiotlb_pools[name] = pool
        return pool

    def add_device(self, dev: Device) -> Device:
        if dev.name in self._devices:
            raise errors.AlreadyExists(f"device {dev.name!r} exists")
        self._devices[dev.name] = dev
        return dev

    def add_bar(self, dev: Device, index: int, nbytes: int, *, prefetch: bool = False,
                window: Window | None = None, cpu_start: int | None = None) -> Bar:
        """Place a memory BAR of ``nbytes`` (a power of two) in a window of
        the device's host bridge, naturally aligned, lowest free address."""
        if nbytes < PAGE_SIZE or nbytes & (nbytes - 1):
            raise errors.InvalidArgument(f"{dev.name} BAR{index}: size {nbytes:#x} must be a power of two >= 4 KiB")
        if index in dev.bars:
            raise errors.AlreadyExists(f"{dev.name} already has a BAR{index}")
        hb = dev.host_bridge
        if cpu_start is None:
            cands = [window] if window is not None else sorted(hb.windows, key=lambda w: (not w.prefetch) if prefetch else w.prefetch)
            for w in cands:
                try:
                    cpu_start = self.address_map.find_gap(nbytes, nbytes, w.cpu_start, w.cpu_start + w.nbytes - 1)
                    window = w
                    break
                except errors.NoSpace:
                    continue
            else:
                raise errors.NoSpace(f"{dev.name} BAR{index}: no room for {_fmt_size(nbytes)} in {hb.name}'s windows")
        else:
            window = hb.window_for(cpu_start)
            if window is None or cpu_start + nbytes > window.cpu_start + window.nbytes:
                raise errors.InvalidArgument(f"{dev.name} BAR{index} at {cpu_start:#x} is outside {hb.name}'s windows")
        assert window is not None
        bar = Bar(dev, index, nbytes, cpu_start, window.bus_offset, prefetch)
        self.address_map.insert(cpu_start, nbytes, kind=RangeKind.MMIO, owner=self._own(bar))
        dev.bars[index] = bar
        return bar

    def add_group(self, name: str, iommu: Iommu, devices: Iterable[Device]) -> IommuGroup:
        g = IommuGroup(name, iommu)
        for d in devices:
            if d.iommu_group is not None:
                raise errors.AlreadyExists(f"{d.name} is already in group {d.iommu_group.name}")
            d.iommu_group = g
            g.devices.append(d)
        self.groups[name] = g
        return g

    def finalize(self) -> Machine:
        """Give every IOMMU group its default DMA domain, with the IOVA the
        kernel reserves: each host bridge's MEM windows at their bus
        addresses (``iova_reserve_pci_windows``) and the MSI window."""
        for g in self.groups.values():
            if g.default_domain is None:
                g.default_domain = self.new_dma_domain(g.iommu, g.devices)
                g.domain = g.default_domain
        return self

    def new_dma_domain(self, iommu: Iommu, devices: Iterable[Device] = ()) -> IommuDomain:
        """A DMA-API domain on ``iommu`` with the reserved regions of ``devices``."""
        devices = list(devices)
        strict = iommu.strict or any(d.untrusted for d in devices)
        dom = IommuDomain(strict=strict, aperture_bits=iommu.aperture_bits, granule=iommu.granule,
                          ncpus=iommu.ncpus, fq_timeout=iommu.fq_timeout)
        shift = iommu.granule.bit_length() - 1
        reserved: set[tuple[int, int]] = set()
        for d in devices:
            if not d.is_pci:
                continue
            for w in d.host_bridge.windows:
                reserved.add((w.bus_start >> shift, (w.bus_start + w.nbytes - 1) >> shift))
        if self.cpu_vendor in ("intel", "amd"):
            reserved.add((MSI_WINDOW[0] >> shift, (MSI_WINDOW[0] + MSI_WINDOW[1] - 1) >> shift))
        for lo, hi in sorted(reserved):
            dom.iovad.reserve(lo, hi)
        return dom

    def attach_domain(self, device: Device, domain: IommuDomain) -> IommuDomain | None:
        """Attach the device's group to ``domain`` (an unmanaged domain of
        iommufd or VFIO); returns the domain it replaced."""
        g = device.iommu_group
        if g is None:
            raise errors.NotSupported(f"{device.name} is not behind an IOMMU")
        old = g.domain
        g.domain = domain
        return old

    def detach_domain(self, device: Device) -> None:
        """Put the device's group back on its default DMA domain."""
        g = device.iommu_group
        if g is None:
            raise errors.NotSupported(f"{device.name} is not behind an IOMMU")
        g.domain = g.default_domain

    # ----------------------------------------------------------- P2P rules

    def p2p_map_type(self, provider: P2pProvider | Device, client: Device) -> P2PMapType:
        """``pci_p2pdma_map_type()``: how ``client`` reaches ``provider``'s BAR.

        The answer is computed once per (provider device, client) and cached
        as the kernel caches it in the provider's ``map_types``: a later ACS
        change is not seen (the kernel never invalidates the cache either).
        """
        owner = provider.owner if isinstance(provider, P2pProvider) else provider
        if not isinstance(owner, Device) or not isinstance(client, Device):
            raise TypeError("p2p_map_type: provider and client must be devices (or a P2pProvider)")
        if not owner.is_pci or not client.is_pci:
            return P2PMapType.NOT_SUPPORTED
        if owner.machine is not client.machine:
            return P2PMapType.NOT_SUPPORTED  # no PCI path between two machines
        owner.p2pdma_init()
        key = client.key()
        cached = owner._map_type_cache.get(key)
        if cached is not None:
            return cached
        t, _ = calc_map_type_and_dist(owner, client, self.cpu_supports_p2pdma)
        owner._map_type_cache[key] = t
        return t

    def p2p_distance(self, provider: Device, clients: Iterable[Device]) -> int:
        """``pci_p2pdma_distance_many()``: summed distance, -1 if any client
        is incompatible (clients that are not PCI devices count as their
        nearest PCI parent, as the kernel walks to it)."""
        clients = list(clients)
        if not isinstance(provider, Device) or not all(isinstance(c, Device) for c in clients):
            raise TypeError("p2p_distance: the provider and the clients must be devices")
        if not clients:
            return -1
        total = 0
        for c in clients:
            if not c.is_pci or c.machine is not provider.machine:
                return -1
            t, dist = calc_map_type_and_dist(provider, c, self.cpu_supports_p2pdma)
            provider._map_type_cache[c.key()] = t
            if t == P2PMapType.NOT_SUPPORTED:
                return -1
            total += dist
        return total

    # ---------------------------------------------------------- describing

    def describe(self) -> str:
        """A readable listing: memory map, PCI tree, IOMMUs, devices.

        Examples
        --------
        >>> print(Machine.default().describe())
        Machine 'default' (intel, P2P through host bridges by whitelist)
        ...
        """
        out = [f"Machine {self.name!r} ({self.cpu_vendor}, P2P through host bridges "
               f"{'by CPU' if self.cpu_supports_p2pdma else 'by whitelist'})", "", "Physical address map:"]
        for r in self.address_map:
            o = self.owner_of(r.owner)
            label = o.__repr__() if isinstance(o, (Bar, SwiotlbPool)) else str(o or "")
            out.append(f"  [{r.start:#014x}-{r.last:#014x}] {_fmt_size(r.nbytes):>9} {RangeKind(r.kind).name:<8} {label}")
        out += ["", "PCI:"]

        def walk(node: _PciNode | HostBridge, depth: int) -> None:
            for c in node.children:
                extra = ""
                if isinstance(c, Device):
                    extra = " " + ", ".join(f"BAR{i} {_fmt_size(b.nbytes)}@{b.cpu_start:#x}" for i, b in c.bars.items())
                out.append("  " * (depth + 1) + f"{c.bdf or ''} {c.name} ({c.kind}"
                           f"{', ACS redirect' if c.acs_redirect else ''}){extra}")
                walk(c, depth + 1)

        for hb in self.host_bridges.values():
            out.append(f"  {hb.name}: " + ", ".join(repr(w) for w in hb.windows))
            walk(hb, 1)
        out += ["", "IOMMUs:"]
        for io in self.iommus.values():
            out.append(f"  {io!r}: " + "; ".join(f"{g.name} [{', '.join(d.name for d in g.devices)}]" for g in io.groups))
        out += ["", "Devices:"]
        for d in self._devices.values():
            out.append(f"  {d!r}" + (f"  {d.description}" if d.description else ""))
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"<Machine {self.name!r}: {_fmt_size(sum(n for _, n in self.ram_ranges()))} RAM, "
                f"{len(self.host_bridges)} host bridges, {len(self._devices)} devices>")

    # ------------------------------------------------------------ factories

    @classmethod
    def default(cls, *, flush_timer: bool = True, strict: bool | None = None) -> Machine:
        """The built-in machine; see :data:`DEFAULT_SPEC` and the README.

        Parameters
        ----------
        flush_timer : bool
            False: the IOMMUs' flush queues have no timer (``fq_timeout =
            false``), so a lazy domain invalidates only when its ring fills
            or :meth:`IommuDomain.flush` is called.  The kernel's timer
            fires after 10 ms of wall time; a study or a narrated scenario
            that must count the same work on a loaded machine turns it off.
        strict : bool, optional
            Make every IOMMU's domains strict (True) or lazy (False)
            instead of what :data:`DEFAULT_SPEC` says.

        Examples
        --------
        >>> m = Machine.default()
        >>> m
        <Machine 'default': ...>
        >>> m.device("gpu0").name
        'gpu0'
        """
        if flush_timer and strict is None:
            return cls.from_spec(DEFAULT_SPEC)
        over: dict[str, Any] = {} if flush_timer else {"fq_timeout": False}
        if strict is not None:
            over["strict"] = bool(strict)
        spec = dict(DEFAULT_SPEC)
        spec["iommus"] = [dict(io, **over) for io in DEFAULT_SPEC["iommus"]]
        return cls.from_spec(spec)

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str]) -> Machine:
        """A machine from TOML text or a TOML file (the :meth:`from_spec` schema).

        A path object is always a file; a str is a file if one exists
        there, else TOML text.  A file that cannot be read raises the
        class of its errno (NotFound for ENOENT ...); malformed TOML is
        ValueError (``tomllib.TOMLDecodeError``).

        Examples
        --------
        >>> m = Machine.from_toml('''
        ... memory = [{start = 0, size = "1G"}]
        ... devices = [{name = "dev"}]
        ... ''')
        >>> m.device("dev").name
        'dev'
        """
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"from_toml: source must be TOML text or a path, not {type(source).__name__}")
        text = os.fspath(source)
        if isinstance(source, os.PathLike) or os.path.exists(text):
            try:
                with open(text, "rb") as f:
                    spec = tomllib.load(f)
            except OSError as exc:
                raise errors.from_errno(exc.errno or errno.EIO, f"from_toml: cannot read {text}: {exc.strerror}") \
                    from None
            return cls.from_spec(spec)
        return cls.from_spec(tomllib.loads(text))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Machine:
        """A machine from a declarative description (a dict, or parsed TOML).

        Keys: ``name``; ``cpu`` (``{vendor, family}``); ``memory`` (a list of
        ``{start, size, kind, name}``, kind one of ram/reserved/private);
        ``swiotlb`` (``{name, start, size}`` list); ``iommus`` (``{name,
        strict, aperture_bits, granule, ncpus, fq_timeout, iotlb_entries}``); ``host_bridges`` (``{name,
        segment, bus, root_vendor, root_device, windows: [{cpu, size,
        bus_offset, prefetch}]}``); ``ports`` (``{name, bdf, parent, kind,
        acs_redirect}``); ``devices`` (``{name, bdf, parent, dma_mask,
        bus_dma_limit, max_segment_size, seg_boundary_mask, dma_ranges,
        dma_offset, iommu, group, swiotlb, can_p2p, cc_trusted, untrusted,
        coherent, vfio, bars: [{index, size, prefetch}]}``).  Sizes and
        addresses may be ints or strings like ``"64M"``.  Errors name the
        offending entry.

        Examples
        --------
        >>> m = Machine.from_spec({"memory": [{"start": 0, "size": "1G"}], "devices": [{"name": "dev"}]})
        >>> m.device("dev").name
        'dev'
        """
        return _spec.build(cls, spec)

    @classmethod
    def from_host(cls, *, iomem: str = "/proc/iomem", sysfs: str = "/sys/bus/pci/devices") -> Machine:
        """The running Linux host's address map and PCI tree (read only).

        Reads ``/proc/iomem`` (addresses are hidden from unprivileged
        processes: then this raises :class:`~pydmabuf.errors.NotPermitted`)
        and ``/sys/bus/pci/devices``.  DMA masks, IOMMU groups and ACS
        settings are taken from sysfs where readable.

        Examples
        --------
        >>> m = Machine.from_host()      # what /proc/iomem and sysfs show (as root)
        >>> isinstance(m, Machine)
        True
        """
        for name, path in (("iomem", iomem), ("sysfs", sysfs)):
            # An int would be taken as an open file descriptor.
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"from_host: {name} must be a path, not {type(path).__name__}")
        return _host.build(cls, iomem=iomem, sysfs=sysfs)


def p2p_map_type(provider: P2pProvider | Device, client: Device) -> P2PMapType:
    """``pci_p2pdma_map_type()`` on the provider's machine."""
    owner = provider.owner if isinstance(provider, P2pProvider) else provider
    if not isinstance(owner, Device):
        raise TypeError(f"p2p_map_type: provider must be a P2pProvider or a Device, not {type(provider).__name__}")
    return owner.machine.p2p_map_type(provider, client)


#: The built-in machine: an x86 server with RAM below 3 GiB and from 4 to
#: 64 GiB (the top 4 GiB private, confidential memory), a 64 MiB swiotlb
#: pool, three host bridges (the third, ARM-style, translates CPU addresses
#: to different PCI bus addresses), a switch with a GPU, an RDMA NIC and an
#: NVMe drive behind it (ACS off: they reach each other by bus address), a
#: VFIO-assigned device with a 16 GiB BAR, an external (untrusted) device, a
#: device doing direct DMA with a 32-bit mask and one in a passthrough group
#: with a 64-bit mask, and a second switch with a GPU and a VFIO device
#: behind the offset host bridge.
DEFAULT_SPEC: dict[str, Any] = {
    "name": "default",
    "cpu": {"vendor": "intel", "family": 6},
    "memory": [
        {"start": 0x0, "size": 0x9F000, "kind": "ram", "name": "System RAM"},
        {"start": 0x9F000, "size": 0x61000, "kind": "reserved", "name": "legacy BIOS/VGA"},
        {"start": 0x100000, "size": 0xBFF00000, "kind": "ram", "name": "System RAM"},
        {"start": 0xFEC00000, "size": 0x1000, "kind": "reserved", "name": "IOAPIC"},
        {"start": 0xFED00000, "size": 0x1000, "kind": "reserved", "name": "HPET"},
        {"start": 0xFEE00000, "size": 0x100000, "kind": "reserved", "name": "Local APIC / MSI"},
        {"start": "4G", "size": "56G", "kind": "ram", "name": "System RAM"},
        {"start": "60G", "size": "4G", "kind": "private", "name": "CC private memory"},
    ],
    "swiotlb": [{"name": "swiotlb", "start": 0xB8000000, "size": "64M"}],
    "iommus": [
        {"name": "iommu0", "strict": False, "aperture_bits": 48},
        {"name": "smmu1", "strict": True, "aperture_bits": 48},
    ],
    "host_bridges": [
        {"name": "hb0", "segment": 0, "bus": 0x00, "root_vendor": 0x8086, "root_device": 0x2020,
         "windows": [{"cpu": 0xC0000000, "size": "512M"},
                     {"cpu": "224G", "size": "32G", "prefetch": True}]},
        {"name": "hb1", "segment": 0, "bus": 0x40, "root_vendor": 0x8086, "root_device": 0x2020,
         "windows": [{"cpu": 0xE0000000, "size": "256M"},
                     {"cpu": "288G", "size": "64G", "prefetch": True}]},
        {"name": "hb2", "segment": 1, "bus": 0x00, "root_vendor": 0x1DEF, "root_device": 0xE110,
         "windows": [{"cpu": "256G", "size": "16G", "prefetch": True, "bus_offset": -0x30_0000_0000}]},
    ],
    "ports": [
        {"name": "rp0", "bdf": "0000:00:01.0", "parent": "hb0", "kind": "root_port", "acs_redirect": True},
        {"name": "sw0_up", "bdf": "0000:01:00.0", "parent": "rp0", "kind": "switch_upstream"},
        {"name": "sw0_dp0", "bdf": "0000:02:00.0", "parent": "sw0_up", "kind": "switch_downstream"},
        {"name": "sw0_dp1", "bdf": "0000:02:01.0", "parent": "sw0_up", "kind": "switch_downstream"},
        {"name": "sw0_dp2", "bdf": "0000:02:02.0", "parent": "sw0_up", "kind": "switch_downstream"},
        {"name": "rp1", "bdf": "0000:40:01.0", "parent": "hb1", "kind": "root_port", "acs_redirect": True},
        {"name": "rp2", "bdf": "0000:40:03.0", "parent": "hb1", "kind": "root_port", "acs_redirect": True},
        {"name": "rp3", "bdf": "0001:00:00.0", "parent": "hb2", "kind": "root_port", "acs_redirect": True},
        {"name": "sw1_up", "bdf": "0001:01:00.0", "parent": "rp3", "kind": "switch_upstream"},
        {"name": "sw1_dp0", "bdf": "0001:02:00.0", "parent": "sw1_up", "kind": "switch_downstream"},
        {"name": "sw1_dp1", "bdf": "0001:02:01.0", "parent": "sw1_up", "kind": "switch_downstream"},
    ],
    "devices": [
        {"name": "gpu0", "bdf": "0000:03:00.0", "parent": "sw0_dp0", "vendor": 0x10DE, "device_id": 0x2330,
         "dma_mask": 47, "max_segment_size": 0xFFFFFFFF, "iommu": "iommu0", "group": "sw0",
         "can_p2p": True, "cc_trusted": True, "description": "GPU (TDISP capable, trusted for CC memory)",
         "bars": [{"index": 0, "size": "16M"}, {"index": 1, "size": "256M", "prefetch": True}]},
        {"name": "nic0", "bdf": "0000:04:00.0", "parent": "sw0_dp1", "vendor": 0x15B3, "device_id": 0x101D,
         "dma_mask": 64, "max_segment_size": 0x80000000, "iommu": "iommu0", "group": "sw0",
         "can_p2p": True, "description": "RDMA NIC",
         "bars": [{"index": 0, "size": "32M", "prefetch": True}]},
        {"name": "nvme0", "bdf": "0000:05:00.0", "parent": "sw0_dp2", "vendor": 0x144D, "device_id": 0xA80A,
         "dma_mask": 64, "max_segment_size": 0xFFFFFFFF, "iommu": "iommu0", "group": "sw0",
         "can_p2p": True, "description": "NVMe drive (P2P capable)",
         "bars": [{"index": 0, "size": "16K"}, {"index": 2, "size": "4M", "prefetch": True}]},
        {"name": "vfio0", "bdf": "0000:41:00.0", "parent": "rp1", "vendor": 0x10DE, "device_id": 0x20B5,
         "dma_mask": 64, "iommu": "iommu0", "group": "vfio0", "vfio": True,
         "description": "VFIO-assigned device (BARs exportable as dma-bufs)",
         "bars": [{"index": 0, "size": "16G", "prefetch": True}, {"index": 2, "size": "1M"}]},
        {"name": "ext0", "bdf": "0000:42:00.0", "parent": "rp2", "vendor": 0x8086, "device_id": 0x15F2,
         "dma_mask": 64, "iommu": "iommu0", "group": "ext0", "untrusted": True,
         "description": "external (untrusted) device: strict domain, sub-granule bounces"},
        {"name": "legacy0", "bdf": "0000:40:02.0", "parent": "hb1", "vendor": 0x8086, "device_id": 0x7020,
         "dma_mask": 32, "swiotlb": "swiotlb", "description": "direct DMA, 32-bit mask, swiotlb"},
        {"name": "direct0", "bdf": "0000:40:04.0", "parent": "hb1", "vendor": 0x8086, "device_id": 0x0B25,
         "dma_mask": 64, "max_segment_size": 0xFFFFFFFF, "swiotlb": "swiotlb",
         "description": "identity (passthrough) IOMMU group: direct DMA, 64-bit"},
        {"name": "gpu1", "bdf": "0001:03:00.0", "parent": "sw1_dp0", "vendor": 0x10DE, "device_id": 0x2331,
         "dma_mask": 48, "max_segment_size": 0xFFFFFFFF, "iommu": "smmu1", "group": "sw1", "can_p2p": True,
         "description": "GPU behind the offset host bridge",
         "bars": [{"index": 0, "size": "16M"}, {"index": 1, "size": "256M", "prefetch": True}]},
        {"name": "vfio1", "bdf": "0001:04:00.0", "parent": "sw1_dp1", "vendor": 0x10DE, "device_id": 0x20B5,
         "dma_mask": 64, "iommu": "smmu1", "group": "sw1", "vfio": True,
         "description": "VFIO-assigned device behind the offset host bridge",
         "bars": [{"index": 0, "size": "64M", "prefetch": True}]},
    ],
}
