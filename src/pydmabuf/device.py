"""A device that does DMA, with the limits the kernel keeps for it
(``struct device``'s ``dma_mask``, ``bus_dma_limit``, ``dma_parms``,
``dma_range_map``; ``include/linux/dma-mapping.h``).

A :class:`Device` is a node of the PCI tree (:mod:`pydmabuf.pci`) when it
has a BDF, sits in an IOMMU group (:mod:`pydmabuf.iommu`) or does direct
DMA with an optional bounce pool (:mod:`pydmabuf.swiotlb`), and reads and
writes through :mod:`pydmabuf.devaccess`.  A :class:`~pydmabuf.machine.Machine`
owns its devices; this module names it in annotations only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from pydmabuf import errors
from pydmabuf._types import DMA_MAPPING_ERROR, U64_MAX
from pydmabuf.devaccess import device_read, device_write
from pydmabuf.pci import Bar, HostBridge, P2pProvider, P2PMapType, _PciNode

if TYPE_CHECKING:
    from pydmabuf._core import IommuDomain
    from pydmabuf.iommu import IommuGroup
    from pydmabuf.machine import Machine
    from pydmabuf.swiotlb import SwiotlbPool

__all__ = ["Device", "DmaRange", "DEFAULT_MAX_SEGMENT_SIZE"]

#: dma_get_max_seg_size() when a driver set none.
DEFAULT_MAX_SEGMENT_SIZE = 64 * 1024


@dataclass(frozen=True)
class DmaRange:
    """One entry of a device's ``dma_range_map``: CPU ``[cpu_start,
    cpu_start + size)`` is reached at DMA ``dma_start``."""

    cpu_start: int
    dma_start: int
    size: int



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
    def domain(self) -> IommuDomain | None:
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
        >>> from pydmabuf import Machine
        >>> m = Machine.default()
        >>> m.memory.write(0x100000, b"hi")
        >>> m.device("direct0").dma_read(0x100000, 2)
        b'hi'
        """
        return device_read(self, addr, nbytes)

    def dma_write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at DMA address ``addr`` as this device would.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> m = Machine.default()
        >>> direct = m.device("direct0")        # no IOMMU: DMA addresses are physical
        >>> direct.dma_write(0x100000, b"hi")
        >>> m.memory.read(0x100000, 2)
        b'hi'
        """
        device_write(self, addr, data)

    def __repr__(self) -> str:
        where = f" {self.bdf}" if self.bdf else ""
        dom = ""
        if self.iommu_group is not None:
            dom = f", {self.iommu_group.iommu.name}/{self.iommu_group.name}"
        else:
            dom = ", direct DMA" + (f" + {self.swiotlb.name}" if self.swiotlb else "")
        return f"<Device {self.name}{where}, {self.dma_limit.bit_length()}-bit{dom}>"


def _need_device(device: Any, what: str) -> Device:
    if not isinstance(device, Device):
        raise TypeError(f"{what}: device must be a pydmabuf Device, not {type(device).__name__}")
    return device

