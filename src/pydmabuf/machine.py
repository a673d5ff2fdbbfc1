"""The machine model: physical address map, PCI tree, IOMMUs and devices.

A :class:`Machine` holds

* the physical address map, a :class:`~pydmabuf.RangeTable` of RAM,
  reserved holes, private (confidential) memory, bounce-buffer pools and
  the PCI BARs (MMIO) placed inside their host bridge's windows;
* the PCI tree: host bridges (each window with its offset between CPU
  physical and PCI bus addresses), root ports, switches with their ACS
  settings, and endpoints with BARs;
* IOMMUs, their groups and the groups' DMA domains
  (:class:`~pydmabuf.IommuDomain`);
* devices (:class:`Device`) with the DMA limits the kernel keeps for them.

Build one with :meth:`Machine.default`, from a declarative description
(:meth:`Machine.from_spec` with a dict, :meth:`Machine.from_toml`), or from
the running host (:meth:`Machine.from_host`).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from pydmabuf import errors
from pydmabuf._core import RangeTable
from pydmabuf._types import PAGE_SIZE, RangeKind, _fmt_size, _parse_size
from pydmabuf.memory import PhysMemory

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

U64_MAX = 2**64 - 1
DMA_MAPPING_ERROR = U64_MAX
#: dma_get_max_seg_size() when a driver set none.
DEFAULT_MAX_SEGMENT_SIZE = 64 * 1024
#: swiotlb geometry (include/linux/swiotlb.h).
IO_TLB_SHIFT = 11
IO_TLB_SIZE = 1 << IO_TLB_SHIFT
IO_TLB_SEGSIZE = 128
#: x86's MSI doorbell window, an IOMMU reserved region on every domain.
MSI_WINDOW = (0xFEE0_0000, 0x10_0000)


class P2PMapType(enum.IntEnum):
    """``enum pci_p2pdma_map_type`` (without the internal UNKNOWN)."""

    NONE = 1  #: not peer-to-peer memory (from ``pci_p2pdma_state`` only)
    NOT_SUPPORTED = 2  #: the client cannot reach the provider's BAR
    BUS_ADDR = 3  #: program the PCI bus address; no IOMMU, no host bridge
    THRU_HOST_BRIDGE = 4  #: a normal DMA mapping of the CPU physical address


# ------------------------------------------------------------------ parsing

def _num(v: Any, what: str) -> int:
    """An int from an int or a size string like ``"64M"``, ``"0x1000"``,
    ``"4 GiB"`` (the syntax ``pydmabuf bench --sizes`` shares, see
    :func:`pydmabuf._types._parse_size`)."""
    if isinstance(v, bool):
        raise TypeError(f"{what}: expected a number, not {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        n = _parse_size(v)
        if n is not None:
            return n
    raise errors.InvalidArgument(f"{what}: cannot read {v!r} as a number or size")


def _mask(v: Any, what: str) -> int:
    """A DMA mask: a bit count (``32``, ``"64"``) or the mask itself."""
    n = _num(v, what)
    if 1 <= n <= 64:
        return (1 << n) - 1
    if n < 2**12 - 1 or n > U64_MAX or (n & (n + 1)):
        raise errors.InvalidArgument(f"{what}: {v!r} is neither a bit count nor a mask of low bits")
    return n


# ---------------------------------------------------------------- topology


@dataclass(frozen=True)
class DmaRange:
    """One entry of a device's ``dma_range_map``: CPU ``[cpu_start,
    cpu_start + size)`` is reached at DMA ``dma_start``."""

    cpu_start: int
    dma_start: int
    size: int


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


class Iommu:
    """An IOMMU instance: its page-size granule, input width, and whether its
    DMA domains invalidate strictly (``IOMMU_DOMAIN_DMA``) or through a flush
    queue (``IOMMU_DOMAIN_DMA_FQ``), and its IOTLB of ``iotlb_entries``
    4 KiB translations (LRU; :data:`pydmabuf.iotlb.DEFAULT_ENTRIES` by
    default)."""

    def __init__(self, name: str, *, strict: bool = False, aperture_bits: int = 48, granule: int = PAGE_SIZE,
                 ncpus: int = 1, fq_timeout: float | None = 0.01, iotlb_entries: int | None = None) -> None:
        from pydmabuf.iotlb import DEFAULT_ENTRIES, Iotlb

        self.name = name
        self.strict = strict
        self.aperture_bits = aperture_bits
        self.granule = granule
        self.ncpus = ncpus
        #: Seconds before a lazy domain's flush queue flushes by timer (the
        #: kernel's 10 ms); None: only on a full ring or ``domain.flush()``.
        self.fq_timeout = fq_timeout
        #: The translation cache device DMA goes through (:mod:`pydmabuf.iotlb`).
        self.iotlb = Iotlb(DEFAULT_ENTRIES if iotlb_entries is None else iotlb_entries)
        self.groups: list[IommuGroup] = []

    def __repr__(self) -> str:
        return f"<Iommu {self.name} {'strict' if self.strict else 'lazy (flush queue)'}>"


class IommuGroup:
    """Devices the IOMMU cannot tell apart; they share one domain."""

    def __init__(self, name: str, iommu: Iommu) -> None:
        self.name = name
        self.iommu = iommu
        self.devices: list[Device] = []
        self.default_domain: Any = None
        self.domain: Any = None  # the attached domain (default or an unmanaged one)
        iommu.groups.append(self)

    def __repr__(self) -> str:
        return f"<IommuGroup {self.name} on {self.iommu.name}: {', '.join(d.name for d in self.devices)}>"


class SwiotlbPool:
    """A bounce-buffer pool (``struct io_tlb_mem``): slots of 2 KiB in
    segments of 128; a mapping takes contiguous slots inside one segment.

    Slots are handed out first-fit from a rotating index, as the kernel's
    area index rotates.  ``bounced_to_device`` / ``bounced_to_cpu`` count
    the bytes copied in each direction.
    """

    def __init__(self, name: str, phys_start: int, nbytes: int) -> None:
        if phys_start % PAGE_SIZE or nbytes % (IO_TLB_SIZE * IO_TLB_SEGSIZE) or nbytes <= 0:
            raise errors.InvalidArgument(f"swiotlb pool {name}: base and size must be page and segment aligned")
        self.name = name
        self.phys_start = phys_start
        self.nbytes = nbytes
        self.nslabs = nbytes >> IO_TLB_SHIFT
        self._used = RangeTable()  # slot index ranges in use
        self._index = 0
        self._orig: dict[int, tuple[int, int, int]] = {}  # tlb addr -> (orig phys, size, nslots)
        self.bounced_to_device = 0
        self.bounced_to_cpu = 0
        self.peak_slots = 0

    @property
    def max_mapping_size(self) -> int:
        return IO_TLB_SIZE * IO_TLB_SEGSIZE

    @property
    def slots_used(self) -> int:
        return self._used.total_nbytes

    @property
    def mappings(self) -> int:
        return len(self._orig)

    def contains(self, addr: int) -> bool:
        return self.phys_start <= addr < self.phys_start + self.nbytes

    def alloc(self, orig_phys: int, size: int, min_align_mask: int = 0) -> int:
        """Take slots for ``size`` bytes; returns the bounce address.

        As in the kernel, the bounce keeps the bits of ``orig_phys`` under
        the device's ``min_align_mask``: the offset inside a slot
        (``swiotlb_align_offset``), and above a slot the slot index's phase.
        ENOMEM when no segment has room, or the size exceeds a segment.
        """
        offset = orig_phys & min_align_mask & (IO_TLB_SIZE - 1)
        stride = ((min_align_mask & ~(IO_TLB_SIZE - 1)) >> IO_TLB_SHIFT) + 1
        phase = (orig_phys >> IO_TLB_SHIFT) & (stride - 1) if stride > 1 else 0
        nslots = -(-(offset + size) // IO_TLB_SIZE)
        if size <= 0 or nslots > IO_TLB_SEGSIZE:
            raise errors.OutOfMemory(f"{self.name}: a {size}-byte bounce does not fit one segment")
        base = self._find(nslots + phase, stride)
        start = base + phase
        self._used.insert(start, nslots)
        addr = self.phys_start + (start << IO_TLB_SHIFT) + offset
        self._orig[addr] = (orig_phys, size, nslots)
        self._index = (start + nslots) % self.nslabs
        self.peak_slots = max(self.peak_slots, self.slots_used)
        return addr

    def _find(self, nslots: int, align: int = 1) -> int:
        lo = self._index
        for _ in range(self.nslabs // IO_TLB_SEGSIZE + 2):
            try:
                s = self._used.find_gap(nslots, align, lo, self.nslabs - 1)
            except errors.NoSpace:
                if lo == 0:
                    break
                lo = 0
                continue
            seg_end = (s // IO_TLB_SEGSIZE + 1) * IO_TLB_SEGSIZE
            if s + nslots <= seg_end:
                return s
            lo = seg_end % self.nslabs
        raise errors.OutOfMemory(f"{self.name}: no {nslots} free contiguous slots in one segment")

    def tlb_of(self, dma: int, device: Any) -> int:
        """The bounce buffer's physical address from a device's DMA address."""
        tlb = device.dma_to_phys(dma)
        if tlb is None or tlb not in self._orig:
            raise errors.NotFound(f"{self.name}: {dma:#x} is not a live bounce mapping of {device.name}")
        return int(tlb)

    def original(self, tlb_addr: int) -> tuple[int, int]:
        """(original physical address, size) of a bounce mapping."""
        try:
            o, size, _ = self._orig[tlb_addr]
        except KeyError:
            raise errors.NotFound(f"{self.name}: {tlb_addr:#x} is not a live bounce address") from None
        return o, size

    def free(self, tlb_addr: int) -> None:
        """Give back the slots of a bounce mapping."""
        self.original(tlb_addr)
        self._orig.pop(tlb_addr)
        self._used.remove((tlb_addr - self.phys_start) >> IO_TLB_SHIFT)

    def __repr__(self) -> str:
        return (f"<SwiotlbPool {self.name} [{self.phys_start:#x}, +{_fmt_size(self.nbytes)}] "
                f"{self.slots_used}/{self.nslabs} slots used>")


class PageAllocator:
    """The machine's RAM pages, handed out to buffers (the page allocator
    the system heap and friends draw from).

    Pages come in the layouts the study uses: one contiguous run, or the
    run pattern of :func:`pydmabuf.workloads.layout` placed in a free
    stretch of RAM; ``thp`` runs are 2 MiB aligned.  Freed pages go back.
    """

    def __init__(self, machine: Machine, kinds: tuple[RangeKind, ...] = (RangeKind.RAM,)) -> None:
        self.machine = machine
        self._used = RangeTable()  # in pfns; owner = allocation id
        self._live: dict[int, tuple[Any, Any]] = {}
        self._next = 1
        # Everything that is not RAM of the wanted kinds is unavailable.
        prev = 0
        top = 1 << 64  # pfn units: everything above RAM is unavailable
        for r in machine.address_map:
            s, e = r.start >> 12, (r.end + 4095) >> 12
            if r.kind in kinds:
                if s > prev:
                    self._used.insert(prev, s - prev, kind=RangeKind.RESERVED)
                prev = max(prev, e)
        if prev < top:
            self._used.insert(prev, top - prev, kind=RangeKind.RESERVED)
        self._reserved_pages = self._used.total_nbytes
        self.total_pages = top - self._reserved_pages

    @property
    def allocated_pages(self) -> int:
        # The table keeps its total: no walk over the live allocations.
        return self._used.total_nbytes - self._reserved_pages

    @property
    def free_pages(self) -> int:
        return self.total_pages - self.allocated_pages

    def alloc(self, npages: int, layout: str = "contiguous", seed: int = 1) -> Any:
        """``npages`` pages in ``layout``; returns a u64 array of PFNs.
        Raises OutOfMemory (ENOMEM) when no free stretch of RAM holds it."""
        import numpy as np

        from pydmabuf import workloads

        if not isinstance(npages, int):
            raise TypeError(f"alloc: npages must be an int, not {type(npages).__name__}")
        if npages <= 0:
            raise errors.InvalidArgument(f"alloc: npages must be positive (got {npages!r})")
        if npages > self.free_pages:
            # Before the layout is drawn: its arrays are npages long.
            raise errors.OutOfMemory(f"alloc: {npages} pages is more than the {self.free_pages} free pages of RAM")
        if layout == "pagemap":
            raise errors.InvalidArgument("alloc: pagemap pages belong to a Python buffer (SystemHeap.from_buffer)")
        try:
            pattern, _ = workloads.layout(layout, npages, seed)
        except ValueError as e:
            raise errors.InvalidArgument(str(e)) from None
        pattern = pattern - pattern[0]
        align = 512 if layout == "thp" else 1
        span = int(pattern[-1]) + 1
        try:
            start = self._used.find_gap(span, align)
        except errors.NoSpace:
            # Too spread out for any free stretch: squeeze the jumps between
            # runs (every run boundary stays) into at most 4x the pages, so
            # one big buffer does not take a whole stretch of RAM.
            big = self._largest_gap()
            if layout not in ("fragmented", "scattered") or big < npages * 2 + 2:
                raise errors.OutOfMemory(f"no free stretch of RAM holds {npages} pages laid out {layout!r}") from None
            pattern, _ = workloads.layout(layout, npages, seed, limit_pfn=min(big - 1, npages * 4) + 0x100000)
            pattern = pattern - pattern[0]
            span = int(pattern[-1]) + 1
            start = self._used.find_gap(span, align)
        pfns = pattern + np.uint64(start)
        phys, lens = workloads.numpy_coalesce(pfns)
        starts = phys >> np.uint64(12)
        npg = lens >> np.uint64(12)
        aid = self._next
        self._next += 1
        self._used.insert_many(starts, npg, kinds=RangeKind.RAM, owners=aid)
        self._live[aid] = (starts, npg)
        return pfns

    def _largest_gap(self) -> int:
        best, prev = 0, 0
        for r in self._used:
            best = max(best, r.start - prev)
            prev = r.end
        return best

    def free(self, pfns: Any) -> None:
        """Give back pages from :meth:`alloc` (the whole allocation)."""
        if len(pfns) == 0:
            raise errors.InvalidArgument("free: no pages")
        r = self._used.lookup(int(pfns[0]))
        if r is None or r.kind != RangeKind.RAM or r.owner not in self._live:
            raise errors.NotFound(f"free: pfn {int(pfns[0]):#x} is not an allocated page")
        starts, _ = self._live.pop(r.owner)
        self._used.remove_many(starts)

    def owner_of(self, pfn: int) -> int | None:
        r = self._used.lookup(pfn)
        return r.owner if r is not None and r.kind == RangeKind.RAM else None


# ------------------------------------------------------------------ devices


class Device(_PciNode):
    """A device that does DMA, with the limits the kernel keeps for it.

    Attributes
    ----------
    dma_mask : int
        ``*dev->dma_mask``: the highest DMA address the device can emit.
    bus_dma_limit : int
        A limit of the bus above the device (0 = none); the lower of the two
        applies (``min_not_zero``).
    max_segment_size : int or None
        ``dma_parms->max_segment_size``; None means unset, which the kernel
        reads as 64 KiB.
    seg_boundary_mask : int or None
        ``dma_parms->segment_boundary_mask``; None means no boundary.
    dma_ranges : list of DmaRange
        The ``dma_range_map`` for direct DMA (empty: DMA address = physical).
    iommu_group : IommuGroup or None
        None for a device doing direct DMA.
    swiotlb : SwiotlbPool or None
        The bounce pool direct DMA falls back to.
    can_p2p : bool
        The device (and its driver) can handle peer-to-peer addresses with no
        struct page behind them (``allow_peer2peer`` of its importers).
    cc_trusted : bool
        Trusted for confidential-computing private memory (a TDISP device
        in the RUN state, for example).
    untrusted : bool
        External-facing: the IOMMU layer bounces its sub-granule mappings and
        its domain is always strict.
    coherent : bool
        DMA is cache coherent (no cache maintenance on map/unmap).
    vfio : bool
        Assigned to VFIO (driven from user space; its BARs can be exported).
    """

    kind = "endpoint"

    def __init__(self, machine: Machine, name: str, *, bdf: str | None = None,
                 parent: _PciNode | HostBridge | None = None, vendor: int = 0, device_id: int = 0,
                 dma_mask: int = U64_MAX, bus_dma_limit: int = 0, max_segment_size: int | None = None,
                 seg_boundary_mask: int | None = None, dma_ranges: Iterable[DmaRange] = (),
                 min_align_mask: int = 0, coherent: bool = True, untrusted: bool = False,
                 can_p2p: bool = False, cc_trusted: bool = False, vfio: bool = False,
                 swiotlb: SwiotlbPool | None = None, force_swiotlb: bool = False,
                 description: str = "") -> None:
        super().__init__(name, bdf, parent, vendor=vendor, device_id=device_id)
        if max_segment_size is not None and not 0 < max_segment_size <= 0xFFFFFFFF:
            raise errors.InvalidArgument(f"{name}: max_segment_size {max_segment_size:#x} is not an unsigned int > 0")
        if not 0 < dma_mask <= U64_MAX:
            raise errors.InvalidArgument(f"{name}: bad DMA mask {dma_mask:#x}")
        self.machine = machine
        self.dma_mask = dma_mask
        self.bus_dma_limit = bus_dma_limit
        self.max_segment_size = max_segment_size
        self.seg_boundary_mask = seg_boundary_mask
        self.dma_ranges = list(dma_ranges)
        self.min_align_mask = min_align_mask
        self.coherent = coherent
        self.untrusted = untrusted
        self.can_p2p = can_p2p
        self.cc_trusted = cc_trusted
        self.vfio = vfio
        self.swiotlb = swiotlb
        self.force_swiotlb = force_swiotlb
        self.description = description
        self.bars: dict[int, Bar] = {}
        self.iommu_group: IommuGroup | None = None
        #: iommu_dma_alloc_iova() state: PCI devices try the 32-bit space
        #: first until the first failure there.
        self.prefer_32bit_iova = bdf is not None
        self._p2pdma_ready = False
        self._providers: dict[int, P2pProvider] = {}
        self._map_type_cache: dict[int, P2PMapType] = {}
        self.memory_decode = True
        self.power_state = "D0"

    # ---------------------------------------------------------- DMA limits

    @property
    def is_pci(self) -> bool:
        return self.bdf is not None

    @property
    def domain(self) -> Any:
        """The IOMMU domain this device's DMA goes through, or None."""
        return self.iommu_group.domain if self.iommu_group is not None else None

    @property
    def dma_limit(self) -> int:
        """``min_not_zero(*dma_mask, bus_dma_limit)``."""
        if self.bus_dma_limit and self.bus_dma_limit < self.dma_mask:
            return self.bus_dma_limit
        return self.dma_mask

    def dma_get_max_seg_size(self) -> int:
        return DEFAULT_MAX_SEGMENT_SIZE if self.max_segment_size is None else self.max_segment_size

    def dma_get_seg_boundary(self) -> int:
        return U64_MAX if self.seg_boundary_mask is None else self.seg_boundary_mask

    def phys_to_dma(self, phys: int) -> int:
        """``phys_to_dma()``: through the ``dma_range_map``; DMA_MAPPING_ERROR
        (2**64 - 1) when no region covers ``phys``."""
        if not self.dma_ranges:
            return phys
        # translate_phys_to_dma(): u64 arithmetic, so a window whose bus
        # address is below its CPU address (a "negative" offset) wraps
        # instead of running past 2**64.
        for r in self.dma_ranges:
            off = (phys - r.cpu_start) & U64_MAX
            if phys >= r.cpu_start and off < r.size:
                return (r.dma_start + off) & U64_MAX
        return DMA_MAPPING_ERROR

    def dma_to_phys(self, dma: int) -> int | None:
        if not self.dma_ranges:
            return dma
        # translate_dma_to_phys(): (dma - dma_start) < size in u64, so a
        # window of a wrapped offset (dma_start near 2**64) covers bus 0 up.
        for r in self.dma_ranges:
            off = (dma - r.dma_start) & U64_MAX
            if off < r.size:
                return (r.cpu_start + off) & U64_MAX
        return None

    def dma_capable(self, addr: int, size: int) -> bool:
        """``dma_capable()``: the last byte is within the device's limits."""
        if addr == DMA_MAPPING_ERROR or size <= 0:
            return False
        return addr + size - 1 <= self.dma_limit

    # ----------------------------------------------------------------- BARs

    def bar(self, index: int = 0) -> Bar:
        try:
            return self.bars[index]
        except KeyError:
            raise errors.NoDevice(f"{self.name} has no memory BAR{index}") from None

    def p2pdma_init(self) -> None:
        """``pcim_p2pdma_init()``: one provider per memory BAR."""
        if not self.is_pci:
            raise errors.NotSupported(f"{self.name} is not a PCI device")
        if not self._p2pdma_ready:
            self._providers = {i: P2pProvider(b) for i, b in self.bars.items() if b.is_mem}
            self._p2pdma_ready = True

    def p2p_provider(self, bar: int = 0) -> P2pProvider | None:
        """``pcim_p2pdma_provider()``: None for a non-memory BAR; initialises
        the P2P state on first use (drivers call ``pcim_p2pdma_init`` at probe)."""
        self.p2pdma_init()
        return self._providers.get(bar)

    # ----------------------------------------------------------- DMA access

    def dma_read(self, addr: int, nbytes: int) -> bytes:
        """Read ``nbytes`` at DMA address ``addr`` as this device would.

        Translates through the device's IOMMU domain (or directly), checks
        the mapping allows reads, and returns the bytes.  Raises
        :class:`~pydmabuf.errors.IommuFault` (EFAULT) naming the device, the
        address and the reason when nothing usable is mapped there.

        Examples
        --------
        >>> m = Machine.default()
        >>> m.memory.write(0x100000, b"hi")
        >>> m.device("direct0").dma_read(0x100000, 2)
        b'hi'
        """
        from pydmabuf import dma

        return dma.device_read(self, addr, nbytes)

    def dma_write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at DMA address ``addr`` as this device would.

        Examples
        --------
        >>> m = Machine.default()
        >>> direct = m.device("direct0")        # no IOMMU: DMA addresses are physical
        >>> direct.dma_write(0x100000, b"hi")
        >>> m.memory.read(0x100000, 2)
        b'hi'
        """
        from pydmabuf import dma

        dma.device_write(self, addr, data)

    def __repr__(self) -> str:
        where = f" {self.bdf}" if self.bdf else ""
        dom = ""
        if self.iommu_group is not None:
            dom = f", {self.iommu_group.iommu.name}/{self.iommu_group.name}"
        else:
            dom = ", direct DMA" + (f" + {self.swiotlb.name}" if self.swiotlb else "")
        return f"<Device {self.name}{where}, {self.dma_limit.bit_length()}-bit{dom}>"


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
        self._owners: list[Any] = [None]
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

    def owner_of(self, range_owner: int) -> Any:
        return self._owners[range_owner] if 0 <= range_owner < len(self._owners) else None

    def what_is(self, phys: int) -> tuple[RangeKind | int, Any] | None:
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

    def _own(self, obj: Any) -> int:
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

    def new_dma_domain(self, iommu: Iommu, devices: Iterable[Device] = ()) -> Any:
        """A DMA-API domain on ``iommu`` with the reserved regions of ``devices``."""
        from pydmabuf import IommuDomain

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

    def attach_domain(self, device: Device, domain: Any) -> Any:
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
        t, _ = self._calc_map_type_and_dist(owner, client)
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
            t, dist = self._calc_map_type_and_dist(provider, c)
            provider._map_type_cache[c.key()] = t
            if t == P2PMapType.NOT_SUPPORTED:
                return -1
            total += dist
        return total

    def _calc_map_type_and_dist(self, provider: _PciNode, client: _PciNode) -> tuple[P2PMapType, int]:
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
        if not self.cpu_supports_p2pdma and not self._host_bridge_whitelist(provider, client):
            return P2PMapType.NOT_SUPPORTED, dist
        return P2PMapType.THRU_HOST_BRIDGE, dist

    _WHITELIST = {
        (0x8086, 0x3C00): True, (0x8086, 0x3C01): True, (0x8086, 0x2F00): True, (0x8086, 0x2F01): True,
        (0x8086, 0x2030): False, (0x8086, 0x2031): False, (0x8086, 0x2032): False, (0x8086, 0x2033): False,
        (0x8086, 0x2020): False, (0x8086, 0x09A2): False,
    }  # (vendor, device) -> requires the same host bridge

    @classmethod
    def _hb_whitelisted(cls, hb: HostBridge, same: bool) -> bool:
        if hb.root_vendor is None or hb.root_device is None:
            return False
        req_same = cls._WHITELIST.get((hb.root_vendor, hb.root_device))
        if req_same is None:
            return False
        return same or not req_same

    def _host_bridge_whitelist(self, a: _PciNode, b: _PciNode) -> bool:
        ha, hb = a.host_bridge, b.host_bridge
        if ha is hb:
            return self._hb_whitelisted(ha, True)
        return self._hb_whitelisted(ha, False) and self._hb_whitelisted(hb, False)

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

        def walk(node: Any, depth: int) -> None:
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
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10: the backport
            import tomli as tomllib
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
        from pydmabuf import _spec

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
        from pydmabuf import _host

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
