"""iommufd: an IO address space into which VFIO dma-bufs are mapped.

The model of ``IOMMU_IOAS_MAP_FILE`` with a dma-buf fd
(``drivers/iommu/iommufd/pages.c``, ``io_pagetable.c``, ``ioas.c``; 6.19
and the 7.1 pin).  This module is the IOAS (``ioas.c``,
``io_pagetable.c``: areas, IOVA allocation, map and unmap, and the device
attach of ``device.c``); the dma-buf pages and their walker are
:mod:`pydmabuf.importers.iommufd_pages` (``pages.c``), the hardware page
tables :mod:`pydmabuf.importers.iommufd_hwpt` (``hw_pagetable.c``); the
public names of both are re-exported here.

* :meth:`IommufdIoas.map_file` checks in the kernel's order, attaches
  asking for the PAL mapping type only (the mapping-types RFC, P23/P24:
  an exporter without PAL is EINVAL), pins (7.1 ``dma_buf_pin``) and takes
  the buffer's physical address list with
  :func:`~pydmabuf.mapping.pal_map_phys`; buffers of several ranges map
  through the RFC's walker (:func:`dmabuf_runs`: seek by cumulative
  length, one page run per entry, contiguous runs merged, batches of
  ``TEMP_MEMORY_LIMIT`` refilled until the area is done).  It never maps
  the attachment.
* The area is mapped at its IOVA into the IO page table of every hardware
  page table (:class:`HwPagetable`, an unmanaged
  :class:`~pydmabuf.IommuDomain`) of the devices attached to the IOAS,
  with ``IOMMU_MMIO`` and without ``IOMMU_CACHE``.  Each (area, domain)
  pair is tracked.
* A revoke (the importer's invalidation, called under the reservation
  lock) unmaps the area from every tracked domain at once and marks it
  revoked for good: device DMA to it faults; VFIO un-revoking changes
  nothing (user space must unmap and map again); a domain attached later
  gets nothing mapped for it; unmapping it later needs no IOMMU unmap.
* Splitting a dma-buf area is EOPNOTSUPP; dma-buf areas are not charged
  to ``locked_vm`` (no pinned-page accounting).

Where the kernel is loose the model is correct by default, and says so
where it differs: an ``IOAS_UNMAP`` that fails (ENOENT: it would cut an
area) changes nothing, where the kernel has already unmapped the areas
before the one it refuses; IOVA alignment is always 4 KiB (the kernel
starts at 1 byte until a domain is attached).  Not modelled: memfd and
user-memory areas, ``IOAS_COPY``, in-kernel accesses, nested and
dirty-tracking page tables.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from pydmabuf import errors, mapping
from pydmabuf._core import RangeTable
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE, IommuProt, RangeKind, _fmt_size
from pydmabuf._uapi import U64_MAX, as_uint
from pydmabuf.dmabuf import DmaBuf, dma_buf_ref
from pydmabuf.importers.iommufd_hwpt import HwPagetable
from pydmabuf.importers.iommufd_pages import MAX_NPFNS, DmaBufPages, dmabuf_runs
from pydmabuf.machine import MSI_WINDOW, Device, Machine

log = logging.getLogger(__name__)

__all__ = [
    "IommufdIoas",
    "HwPagetable",
    "IoasArea",
    "IOMMU_IOAS_MAP_FIXED_IOVA",
    "IOMMU_IOAS_MAP_WRITEABLE",
    "IOMMU_IOAS_MAP_READABLE",
    "dmabuf_runs",
]

IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2
_MAP_FLAGS = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
#: ULONG_MAX on a 64-bit kernel.
ULONG_MAX = U64_MAX
#: Called (with the pages) in the kernel's unlock-to-publish window of
#: ``IommufdIoas(kernel_compat=True)``; tests set it to land a revoke there.
_publish_window: Any = None
#: iopt_alloc_iova() aligns no further than a transparent huge page.
HPAGE_SIZE = 2 << 20


@dataclass(eq=False)
class IoasArea:
    """One mapping of an IOAS: ``[iova, iova + nbytes)`` onto a slice of a
    dma-buf (``struct iopt_area``)."""

    iova: int
    nbytes: int
    prot: int
    pages: DmaBufPages
    owner: int = 0  # its key in the IOAS's range table

    @property
    def last(self) -> int:
        """The inclusive last IOVA."""
        return self.iova + self.nbytes - 1

    @property
    def dmabuf(self) -> DmaBuf:
        """The dma-buf the area maps a slice of."""
        return self.pages.dmabuf

    @property
    def phys(self) -> int:
        """The CPU physical address the area's first page maps to (0 once
        revoked)."""
        pl = self.pages.exp_phys
        if pl is None:
            return 0
        return int(dmabuf_runs(pl.ranges, self.pages.start, 1)[0, 0]) << PAGE_SHIFT

    @property
    def revoked(self) -> bool:
        """VFIO revoked the buffer: the area is unmapped everywhere, for good."""
        return self.pages.revoked

    @property
    def npages(self) -> int:
        """4 KiB pages in the area."""
        return self.nbytes // PAGE_SIZE

    @property
    def accounted_pages(self) -> int:
        """Pages charged to ``locked_vm``: none for a dma-buf area."""
        return 0

    def __repr__(self) -> str:
        state = " REVOKED" if self.revoked else f" -> {self.phys:#x}"
        return f"<IoasArea [{self.iova:#x}, +{_fmt_size(self.nbytes)}]{state} prot={IommuProt(self.prot)!r}>"


# -------------------------------------------------------------- the IOAS


class IommufdIoas(Owner):
    """An iommufd IO address space (``struct iommufd_ioas``).

    Parameters
    ----------
    machine : Machine
    name : str
        For reprs.
    kernel_compat : bool
        Publish a dma-buf's attachment after the reservation lock drops, as
        ``iopt_map_dmabuf()`` does: a revoke landing in between finds no
        attachment to give the list back with (the kernel passes NULL to
        ``dma_buf_pal_unmap_phys``); the model reports it as a
        LifetimeError.  By default the attachment is published under the
        lock and the window does not exist.

    Devices join with :meth:`attach_device` (each IOMMU instance gets one
    hardware page table, unless a separate one is asked for); dma-bufs are
    mapped with :meth:`map_file` and unmapped with :meth:`unmap`.  Close
    it (or use it as a context manager) to unmap everything and detach.

    Examples
    --------
    >>> from pydmabuf import Machine
    >>> from pydmabuf.exporters import VfioPciBar
    >>> m = Machine.default()
    >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
    >>> bar = vfio.export()
    >>> ioas = IommufdIoas(m)
    >>> hwpt = ioas.attach_device(m.device("gpu0"))
    >>> iova = ioas.map_file(bar, 0, 1 << 20)
    >>> m.device("gpu0").dma_read(iova, 4) is not None
    True
    >>> ioas.close(); bar.put(); vfio.close()
    """

    def __init__(self, machine: Machine, *, name: str = "ioas", kernel_compat: bool = False) -> None:
        self.machine = machine
        self.name = name
        self.kernel_compat = bool(kernel_compat)
        self._lock = threading.RLock()
        self._areas = RangeTable()
        self._by_owner: dict[int, IoasArea] = {}
        self._next_owner = 1
        self._reserved: list[tuple[int, int, Any]] = []  # (start, last, owner)
        self._hwpts: list[HwPagetable] = []
        self._dev_hwpt: dict[Device, HwPagetable] = {}
        self._next_hwpt = 1
        self.iova_alignment = PAGE_SIZE
        self.closed = False

    # ------------------------------------------------------------ queries

    @property
    def areas(self) -> list[IoasArea]:
        """The areas, in IOVA order (a copy of the list)."""
        with self._lock:
            return [self._by_owner[r.owner] for r in self._areas]

    def area_at(self, iova: int) -> IoasArea | None:
        """The area holding ``iova``, or None."""
        with self._lock:
            r = self._areas.lookup(as_uint(iova, "iova"))
            return None if r is None else self._by_owner[r.owner]

    @property
    def hwpts(self) -> list[HwPagetable]:
        """The hardware page tables, oldest first."""
        with self._lock:
            return list(self._hwpts)

    @property
    def devices(self) -> list[Device]:
        """The attached devices."""
        with self._lock:
            return list(self._dev_hwpt)

    @property
    def reserved(self) -> list[tuple[int, int]]:
        """Reserved IOVA as (start, inclusive last) pairs."""
        with self._lock:
            return [(s, last) for s, last, _ in self._reserved]

    @property
    def locked_vm_pages(self) -> int:
        """Pages charged to the user's ``locked_vm``: dma-buf areas are not
        accounted (``IOPT_PAGES_ACCOUNT_NONE``)."""
        return sum([a.accounted_pages for a in self.areas], 0)

    @property
    def stats(self) -> dict[str, int]:
        """Accounting: ``areas``, ``revoked_areas``, ``nbytes`` and
        ``npages`` of all areas, ``locked_vm_pages``, ``pinned_attachments``
        (dma-bufs pinned by this IOAS), ``hwpts``, ``devices``."""
        with self._lock:
            areas = self.areas
            return {
                "areas": len(areas),
                "revoked_areas": sum(1 for a in areas if a.revoked),
                "nbytes": sum(a.nbytes for a in areas),
                "npages": sum(a.npages for a in areas),
                "locked_vm_pages": self.locked_vm_pages,
                "pinned_attachments": len([a for a in areas
                                           if a.pages.attachment is not None and a.pages.attachment.pin_count > 0]),
                "hwpts": len(self._hwpts),
                "devices": len(self._dev_hwpt),
            }

    def _need_open(self, what: str) -> None:
        if self.closed:
            raise errors.BadHandle(f"{what}: {self.name} was destroyed")

    # ------------------------------------------------------------ devices

    def attach_device(self, device: Device, *, new_hwpt: bool = False) -> HwPagetable:
        """Attach ``device`` (its IOMMU group) to the IOAS.

        It joins the hardware page table of its IOMMU, or (the first time,
        or with ``new_hwpt``) a new one, filled with every area that is not
        revoked.  The device's reserved IOVA (the MSI window on x86) and a
        new domain's space past its aperture are reserved.

        Raises
        ------
        NoDevice
            (ENODEV) the device is not behind an IOMMU.
        InvalidArgument
            (EINVAL) the device is already attached, or belongs to another
            machine.
        AddressInUse
            (EADDRINUSE) an area lies in the device's reserved IOVA or
            past the new domain's aperture.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import VfioPciBar
        >>> m = Machine.default()
        >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        >>> bar = vfio.export()
        >>> ioas = IommufdIoas(m)
        >>> hwpt = ioas.attach_device(m.device("gpu0"))
        >>> hwpt is not None
        True
        >>> ioas.close(); bar.put(); vfio.close()
        """
        if not isinstance(device, Device):
            raise TypeError(f"device must be a Device, not {type(device).__name__}")
        with self._lock:
            self._need_open("attach_device")
            if device.machine is not self.machine:
                raise errors.InvalidArgument(f"{device.name} is not a device of {self.machine!r}")
            g = device.iommu_group
            if g is None:
                raise errors.NoDevice(f"{device.name} is not behind an IOMMU")
            if device in self._dev_hwpt:
                raise errors.InvalidArgument(f"{device.name} is already attached to {self.name}")
            resv = self._device_resv(device)
            for s, last in resv:
                self._check_free(s, last, f"{device.name}'s reserved region")
            hwpt = None
            if not new_hwpt:
                hwpt = next((h for h in self._hwpts if h.iommu is g.iommu), None)
            created = hwpt is None
            if hwpt is None:
                hwpt = HwPagetable(self, g.iommu, self._next_hwpt)
                if hwpt.aperture_end < ULONG_MAX:
                    self._check_free(hwpt.aperture_end + 1, ULONG_MAX, f"{hwpt!r}'s space past its aperture")
                self._fill(hwpt)
            # commit
            if created:
                self._next_hwpt += 1
                self._hwpts.append(hwpt)
                if hwpt.aperture_end < ULONG_MAX:
                    self._reserved.append((hwpt.aperture_end + 1, ULONG_MAX, hwpt))
            self._reserved.extend((s, last, device) for s, last in resv)
            hwpt.devices.append(device)
            self._dev_hwpt[device] = hwpt
            self.machine.attach_domain(device, hwpt.domain)
            return hwpt

    def detach_device(self, device: Device) -> None:
        """Put the device back on its default domain; a hardware page table
        left without devices is destroyed (its areas unmapped from it, except
        revoked ones, which are unmapped already).  NotFound (ENOENT) if the
        device is not attached."""
        with self._lock:
            hwpt = self._dev_hwpt.pop(device, None)
            if hwpt is None:
                raise errors.NotFound(f"{getattr(device, 'name', device)} is not attached to {self.name}")
            self.machine.detach_domain(device)
            self._reserved = [r for r in self._reserved if r[2] is not device]
            hwpt.devices.remove(device)
            if not hwpt.devices:
                for area in self.areas:
                    area.pages.unmap_domain(area, hwpt)
                self._reserved = [r for r in self._reserved if r[2] is not hwpt]
                self._hwpts.remove(hwpt)

    def _device_resv(self, device: Device) -> list[tuple[int, int]]:
        """``iommu_get_resv_regions()``: x86 IOMMUs reserve the MSI window."""
        if self.machine.cpu_vendor in ("intel", "amd"):
            return [(MSI_WINDOW[0], MSI_WINDOW[0] + MSI_WINDOW[1] - 1)]
        return []

    def _check_free(self, start: int, last: int, what: str) -> None:
        """``iopt_reserve_iova()``: no area may lie there."""
        hit = self._areas.overlapping(start, last - start + 1)
        if hit:
            raise errors.AddressInUse(f"{what} [{start:#x}, {last:#x}] holds {self._by_owner[hit[0].owner]!r}")

    def _fill(self, hwpt: HwPagetable) -> None:
        """``iopt_fill_domain()``: every area into a new domain; all or nothing."""
        done: list[IoasArea] = []
        try:
            for area in self.areas:
                area.pages.map_domain(area, hwpt)
                done.append(area)
        except BaseException:
            for area in done:
                area.pages.unmap_domain(area, hwpt)
            raise

    # ------------------------------------------------------------ mapping

    def map_file(self, fd: int | DmaBuf, start: int, length: int, *, iova: int = 0,
                 flags: int = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE) -> int:
        """``IOMMU_IOAS_MAP_FILE`` of a dma-buf: map ``[start, start +
        length)`` of it at an IOVA.

        Parameters
        ----------
        fd : int or DmaBuf
            A dma-buf fd (or the buffer itself); the area holds its own
            reference.
        start, length : int
            The slice of the dma-buf, in bytes.
        iova : int
            Where, with ``IOMMU_IOAS_MAP_FIXED_IOVA`` in ``flags``;
            otherwise the IOAS picks the lowest free IOVA aligned like the
            kernel (to the length's power of two, at most 2 MiB).
        flags : int
            ``IOMMU_IOAS_MAP_FIXED_IOVA | _WRITEABLE | _READABLE``.

        Returns
        -------
        int
            The area's IOVA.

        Raises
        ------
        In the kernel's order:

        NotSupported
            (EOPNOTSUPP) unknown flags.
        Overflow
            (EOVERFLOW) ``iova`` or ``length`` is ``ULONG_MAX``.
        InvalidArgument
            (EINVAL) neither READABLE nor WRITEABLE; ``length`` 0.
        Overflow
            (EOVERFLOW) ``start + length - 1`` wraps.
        BadHandle / InvalidArgument
            (EBADF / EINVAL) ``fd`` is not open / not a dma-buf (memfd
            files are not modelled: NotSupported).
        InvalidArgument
            (EINVAL) the slice ends past the dma-buf, or has 2**32 - 1
            pages or more.
        InvalidArgument
            (EINVAL) the exporter offers no PAL mapping (mapping types:
            nothing matches ``[PAL]``), or its list is invalid (strict PAL
            rules) or describes less than the slice.
        NotSupported / NoDevice
            (EOPNOTSUPP / ENODEV) the exporter refused the attachment (VFIO:
            revoked is ENODEV) or its PAL map (revoked: ENODEV).
        InvalidArgument
            (EINVAL) ``length`` or a fixed ``iova`` is not 4 KiB aligned,
            or a fixed range meets reserved IOVA; ``start`` not 4 KiB
            aligned.
        Overflow
            (EOVERFLOW) a fixed ``iova + length - 1`` wraps.
        AlreadyExists
            (EEXIST) a fixed range meets an area.
        NoSpace
            (ENOSPC) no free IOVA for it.

        A failed call maps nothing and leaves no attachment.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import VfioPciBar
        >>> m = Machine.default()
        >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        >>> bar = vfio.export()
        >>> ioas = IommufdIoas(m)
        >>> hwpt = ioas.attach_device(m.device("gpu0"))
        >>> iova = ioas.map_file(bar, 0, 1 << 20)       # IOMMU_IOAS_MAP_FILE
        >>> vfio.set_memory_decode(False, timeout=5)    # revoked: iommufd unmaps at once
        >>> m.device("gpu0").dma_read(iova, 4)
        Traceback (most recent call last):
            ...
        pydmabuf.errors.IommuFault: ...
        >>> ioas.close(); bar.put(); vfio.close()
        """
        flags = as_uint(flags, "flags", 32)
        iova = as_uint(iova, "iova")
        start = as_uint(start, "start")
        length = as_uint(length, "length")
        self._need_open("map_file")
        # iommufd_ioas_map_file()
        if flags & ~_MAP_FLAGS:
            raise errors.NotSupported(f"IOMMU_IOAS_MAP_FILE: unknown flags {flags & ~_MAP_FLAGS:#x}")
        if iova >= ULONG_MAX or length >= ULONG_MAX:
            raise errors.Overflow("IOMMU_IOAS_MAP_FILE: iova and length must be below ULONG_MAX")
        if not flags & (IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE):
            raise errors.InvalidArgument("IOMMU_IOAS_MAP_FILE: the mapping must be readable or writeable")
        # iopt_map_file_pages()
        if length == 0:
            raise errors.InvalidArgument("IOMMU_IOAS_MAP_FILE: length must not be 0")
        if start + length - 1 > ULONG_MAX:
            raise errors.Overflow(f"IOMMU_IOAS_MAP_FILE: start {start:#x} + length {length:#x} wraps")
        start_byte = start % PAGE_SIZE
        buf = self._get_dmabuf(fd)
        prot = IommuProt.CACHE
        if flags & IOMMU_IOAS_MAP_WRITEABLE:
            prot |= IommuProt.WRITE
        if flags & IOMMU_IOAS_MAP_READABLE:
            prot |= IommuProt.READ
        # batch_to_domain(): MMIO gets IOMMU_MMIO and loses IOMMU_CACHE
        prot = (prot & ~IommuProt.CACHE) | IommuProt.MMIO
        try:
            pages = self._alloc_dmabuf_pages(buf, start_byte, start, length, bool(flags & IOMMU_IOAS_MAP_WRITEABLE))
        except BaseException:
            buf.put()
            raise
        try:
            return self._map_pages(pages, iova, length, start_byte, int(prot),
                                   bool(flags & IOMMU_IOAS_MAP_FIXED_IOVA))
        except BaseException:
            pages.release()
            raise

    @staticmethod
    def _get_dmabuf(fd: int | DmaBuf) -> DmaBuf:
        try:
            return dma_buf_ref(fd, "IOMMU_IOAS_MAP_FILE")
        except errors.InvalidArgument:
            raise errors.NotSupported(f"fd {fd} is not a dma-buf; memfd areas are not modelled") from None

    def _alloc_dmabuf_pages(self, buf: DmaBuf, start_byte: int, start: int, length: int,
                            writable: bool) -> DmaBufPages:
        # iopt_alloc_dmabuf_pages()
        if buf.size <= start + length - 1 or length // PAGE_SIZE >= MAX_NPFNS:
            raise errors.InvalidArgument(f"IOMMU_IOAS_MAP_FILE: [{start:#x}, +{length:#x}) is not inside the "
                                         f"{_fmt_size(buf.size)} dma-buf (or has too many pages)")
        pages = DmaBufPages(buf, start - start_byte, length, writable)
        # iopt_map_dmabuf() (P23/P24): attach asking for [PAL], then under
        # the lock pin and take the list; publish it before the unlock.
        a = buf.mapping_attach([mapping.pal_importer()], pages, pages)
        try:
            buf.resv.lock()
            try:
                # iopt_map_dmabuf() primes lockdep: the pages mutex nests
                # inside the reservation lock (taken and dropped once here).
                with pages.lock:
                    pass
                a.pin()
                try:
                    pl = mapping.pal_map_phys(a)
                    need = pages.start + start_byte + length
                    if pl.nbytes < need:
                        mapping.pal_unmap_phys(a, pl)
                        raise errors.InvalidArgument(f"the exporter's list describes {pl.nbytes:#x} bytes; the "
                                                     f"area needs {need:#x}")
                except BaseException:
                    a.unpin()
                    raise
                pages.exp_phys = pl
                if not self.kernel_compat:
                    pages.attachment = a  # published under the lock: no window
            finally:
                buf.resv.unlock()
        except BaseException:
            buf.detach(a)
            raise
        if self.kernel_compat:
            hook = _publish_window
            try:
                if hook is not None:
                    hook(pages)  # where a revoke can land in the kernel
            except BaseException:
                # A failed map leaves nothing: the list (if the revoke did
                # not get it back), the pin, the attachment.
                pages.give_back(a)
                raise
            pages.attachment = a
        return pages

    def _map_pages(self, pages: DmaBufPages, iova: int, length: int, start_byte: int, prot: int,
                   fixed: bool) -> int:
        with self._lock:
            self._need_open("map_file")
            # iopt_alloc_area_pages()
            if length & (self.iova_alignment - 1):
                raise errors.InvalidArgument(f"length {length:#x} is not a multiple of {self.iova_alignment:#x}")
            if fixed:
                self._check_iova(iova, length)
            else:
                iova = self._alloc_iova(pages.start + start_byte, length)
            # iopt_insert_area()
            if start_byte & (self.iova_alignment - 1):
                raise errors.InvalidArgument(f"start is {start_byte:#x} bytes into a page; the IOVA alignment "
                                             f"is {self.iova_alignment:#x}")
            area = IoasArea(iova, length, prot, pages, self._next_owner)
            done: list[HwPagetable] = []
            try:
                for hwpt in self._hwpts:  # iopt_area_fill_domains()
                    pages.map_domain(area, hwpt)
                    done.append(hwpt)
            except BaseException:
                for hwpt in done:
                    pages.unmap_domain(area, hwpt)
                raise
            self._next_owner += 1
            self._areas.insert(iova, length, kind=RangeKind.IOVA, owner=area.owner)
            self._by_owner[area.owner] = area
            return iova

    def _check_iova(self, iova: int, length: int) -> None:
        """``iopt_check_iova()``."""
        if iova & (self.iova_alignment - 1):
            raise errors.InvalidArgument(f"iova {iova:#x} is not {self.iova_alignment:#x} aligned")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise errors.Overflow(f"iova {iova:#x} + length {length:#x} wraps")
        for s, l_, _ in self._reserved:
            if s <= last and iova <= l_:
                raise errors.InvalidArgument(f"[{iova:#x}, {last:#x}] meets reserved IOVA [{s:#x}, {l_:#x}]")
        hit = self._areas.overlapping(iova, length)
        if hit:
            raise errors.AlreadyExists(f"[{iova:#x}, {last:#x}] meets {self._by_owner[hit[0].owner]!r}")

    def _alloc_iova(self, addr: int, length: int) -> int:
        """``iopt_alloc_iova()``: the lowest free, unreserved IOVA in
        ``[PAGE_SIZE, ULONG_MAX - PAGE_SIZE]`` aligned to the length's power
        of two (at most 2 MiB, and no more than ``addr`` is aligned)."""
        if length >= ULONG_MAX // 2:
            raise errors.Overflow(f"length {length:#x} is too large to place")
        align = 1 << (length - 1).bit_length()
        if addr:
            align = min(align, addr & -addr)
        align = min(align, HPAGE_SIZE)
        if align < self.iova_alignment:
            raise errors.InvalidArgument(f"an IOVA aligned to {align:#x} is below the {self.iova_alignment:#x} "
                                         "the page tables need")
        page_offset = addr % PAGE_SIZE  # 0 here: sub-page starts are refused at insert
        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        while True:
            try:
                cand = self._areas.find_gap(length, align, lo, hi) | page_offset
            except errors.NoSpace:
                raise errors.NoSpace(f"no free {_fmt_size(length)} of IOVA in {self.name}") from None
            clash = [(s, l_) for s, l_, _ in self._reserved if s <= cand + length - 1 and cand <= l_]
            if not clash:
                return cand
            nxt = max(l_ for _, l_ in clash) + 1
            if nxt > hi:
                raise errors.NoSpace(f"no free {_fmt_size(length)} of IOVA in {self.name}")
            lo = nxt

    # ---------------------------------------------------------- unmapping

    def unmap(self, iova: int, length: int, *, split: bool = False) -> int:
        """``IOMMU_IOAS_UNMAP``: unmap every area inside ``[iova, iova +
        length)``; ``iova=0, length=2**64 - 1`` unmaps everything.

        With ``split`` the range may cut areas, as the VFIO type1
        compatibility unmap does (``iopt_cut_iova`` first): a dma-buf area
        cannot be split (EOPNOTSUPP).

        Returns the bytes unmapped.

        Raises
        ------
        Overflow
            (EOVERFLOW) ``iova`` or ``length`` is ``ULONG_MAX``, or the range
            wraps.
        InvalidArgument
            (EINVAL) ``length`` 0.
        NotSupported
            (EOPNOTSUPP) ``split`` would cut a dma-buf area.
        NotFound
            (ENOENT) the range cuts an area, or holds none.  Nothing is
            unmapped then (the kernel unmaps the areas before the one it
            refuses).
        """
        iova = as_uint(iova, "iova")
        length = as_uint(length, "length")
        if iova == 0 and length == U64_MAX:
            return self.unmap_all()
        if iova >= ULONG_MAX or length >= ULONG_MAX:
            raise errors.Overflow("IOMMU_IOAS_UNMAP: iova and length must be below ULONG_MAX")
        if length == 0:
            raise errors.InvalidArgument("IOMMU_IOAS_UNMAP: length must not be 0")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise errors.Overflow(f"IOMMU_IOAS_UNMAP: [{iova:#x}, +{length:#x}) wraps")
        with self._lock:
            self._need_open("unmap")
            if split:
                for cut in ([last, iova - 1] if iova else [last]):  # iopt_cut_iova()
                    r = self._areas.lookup(cut)
                    if r is not None and cut not in (r.start, r.last):
                        raise errors.NotSupported(f"cutting {self._by_owner[r.owner]!r} at {cut:#x}: a dma-buf "
                                                  "area cannot be split")
            hits = [self._by_owner[r.owner] for r in self._areas.overlapping(iova, length)]
            for area in hits:
                if area.iova < iova or area.last > last:
                    raise errors.NotFound(f"IOMMU_IOAS_UNMAP: [{iova:#x}, {last:#x}] cuts {area!r}")
            if not hits:
                raise errors.NotFound(f"IOMMU_IOAS_UNMAP: nothing is mapped in [{iova:#x}, {last:#x}]")
            return self._unmap_areas(hits)

    def unmap_all(self) -> int:
        """Unmap every area (0 if there is none); returns the bytes unmapped."""
        with self._lock:
            self._need_open("unmap_all")
            return self._unmap_areas(self.areas)

    def _unmap_areas(self, areas: list[IoasArea]) -> int:
        done = 0
        for area in areas:
            self._areas.remove(area.iova)
            del self._by_owner[area.owner]
            for hwpt in self._hwpts:  # iopt_area_unfill_domains()
                area.pages.unmap_domain(area, hwpt)
            area.pages.release()
            done += area.nbytes
        return done

    # ---------------------------------------------------------- lifetime

    def close(self) -> None:
        """Destroy the IOAS: unmap every area, detach every device.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import VfioPciBar
        >>> m = Machine.default()
        >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        >>> bar = vfio.export()
        >>> ioas = IommufdIoas(m)
        >>> hwpt = ioas.attach_device(m.device("gpu0"))
        >>> iova = ioas.map_file(bar, 0, 1 << 20)
        >>> ioas.close()                        # unmaps and detaches everything
        >>> bar.put(); vfio.close()
        """
        with self._lock:
            if self.closed:
                return
            self.unmap_all()
            for d in list(self._dev_hwpt):
                self.detach_device(d)
            self.closed = True

    def _owns(self) -> bool:
        # An IOAS with no device and no area holds nothing of anyone's.
        return not self.closed and bool(self._dev_hwpt or self.areas)

    def _leak_message(self) -> str:
        return f"{self!r} collected without close(): its areas stay pinned and mapped"

    def __exit__(self, *exc: object) -> None:
        self.close()  # the block destroys the IOAS, empty or not

    def __repr__(self) -> str:
        s = self.stats
        return (f"<IommufdIoas {self.name}: {s['areas']} area(s) ({s['revoked_areas']} revoked), "
                f"{_fmt_size(s['nbytes'])}, {s['hwpts']} hwpt(s), {s['devices']} device(s)"
                f"{', destroyed' if self.closed else ''}>")
