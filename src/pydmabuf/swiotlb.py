"""The bounce buffers (``kernel/dma/swiotlb.c``).

A :class:`SwiotlbPool` is one ``struct io_tlb_mem``: slots of 2 KiB in
segments of 128, handed out first-fit from a rotating index.  The
functions below are the copies in and out of it (``swiotlb_tbl_map_single``,
``swiotlb_tbl_unmap_single``, ``swiotlb_map``), which dma-direct and
dma-iommu call for what a device cannot reach or must not see whole.
Every copy goes through the device's access gate
(:func:`pydmabuf.devaccess.accessor`): a bounce of memory the device may
not reach faults before a slot is taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydmabuf import access, errors
from pydmabuf._core import RangeTable
from pydmabuf._types import PAGE_SIZE, DmaAttrs, DmaDirection, _fmt_size
from pydmabuf.devaccess import accessor

if TYPE_CHECKING:
    from pydmabuf.device import Device

__all__ = ["SwiotlbPool", "IO_TLB_SHIFT", "IO_TLB_SIZE", "IO_TLB_SEGSIZE"]

#: swiotlb geometry (include/linux/swiotlb.h).
IO_TLB_SHIFT = 11
IO_TLB_SIZE = 1 << IO_TLB_SHIFT
IO_TLB_SEGSIZE = 128


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

    def tlb_of(self, dma: int, device: Device) -> int:
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


# ------------------------------------------------------ bounce copies


def _pool(device: Device) -> SwiotlbPool | None:
    if device.swiotlb is not None:
        return device.swiotlb
    return next(iter(device.machine.swiotlb_pools.values()), None)


def _bounce_in(device: Device, pool: SwiotlbPool, orig: int, size: int, direction: DmaDirection, attrs: int,
               align_mask: int = 0) -> int:
    """swiotlb_tbl_map_single(): take slots and copy the original into the
    bounce buffer, in every direction (for FROM_DEVICE too: the copy back
    at unmap must give back the original's bytes where the device wrote
    nothing, not what the slot held before, the previous user's data);
    returns the bounce buffer's physical address."""
    if size > pool.max_mapping_size:
        raise errors.OutOfMemory(f"{pool.name}: a {size}-byte bounce exceeds {pool.max_mapping_size} bytes")
    acc = accessor(device)
    # The bounce gives the device the original's bytes both ways: the gate
    # refuses it (EFAULT, as the device's own access would fault) before a
    # slot is taken, whatever the direction.
    access.bounce_check(acc, orig, size)
    tlb = pool.alloc(orig, size, device.min_align_mask | align_mask)
    access.bounce_copy(acc, tlb, orig, size)
    pool.bounced_to_device += size
    return tlb


def _bounce_out(device: Device, pool: SwiotlbPool | None, tlb: int, direction: DmaDirection, attrs: int,
                free: bool = True) -> None:
    pool = _bounced_through(device, pool)
    orig, size = pool.original(tlb)
    if direction in (DmaDirection.FROM_DEVICE, DmaDirection.BIDIRECTIONAL) and not attrs & DmaAttrs.SKIP_CPU_SYNC:
        access.bounce_copy(accessor(device), orig, tlb, size)
        pool.bounced_to_cpu += size
    if free:
        pool.free(tlb)


def _bounced_through(device: Device, pool: SwiotlbPool | None) -> SwiotlbPool:
    """The pool a live bounce mapping of ``device`` was made through: it
    cannot be gone while the mapping lives (LifetimeError if it was taken
    away, e.g. ``device.swiotlb`` reset)."""
    if pool is None:
        raise errors.LifetimeError(f"{device.name} has live bounce mappings but no swiotlb pool")
    return pool


def _swiotlb_map(device: Device, pool: SwiotlbPool, phys: int, nbytes: int, d: DmaDirection, a: int) -> int:
    """swiotlb_map(): bounce, then check the device can reach the bounce
    buffer (the kernel unmaps it and fails otherwise)."""
    tlb = _bounce_in(device, pool, phys, nbytes, d, a)
    dma = device.phys_to_dma(tlb)
    if not device.dma_capable(dma, nbytes):
        pool.free(tlb)
        raise errors.OutOfMemory(f"swiotlb buffer {tlb:#x}+{nbytes:#x} is beyond {device.name}'s reach")
    return dma
