"""VFIO's dma-buf exporter: the buffer of one BAR slice
(``drivers/vfio/pci/vfio_pci_dmabuf.c``).

:class:`VfioPciDmaBuf` is the exporter (``struct vfio_pci_dma_buf``): its
mapping types ``[PAL, SGT P2P]``, attach, map, the physical ranges, the
7.1 mmap.  :func:`vfio_pci_dma_buf_iommufd_map` is 6.19's private
interconnect to iommufd.  :func:`every_buffer` and :func:`flip_619` are the
pieces of ``vfio_pci_dma_buf_move()`` that the device side
(:mod:`pydmabuf.exporters.vfio`, ``vfio_pci_core.c``) walks its buffers
with.  The device, its open files and the ioctl that creates these
buffers are in :mod:`pydmabuf.exporters.vfio`, which re-exports the
public names here; see its docstring for the rules of the whole driver.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pydmabuf import checks, errors, mapping
from pydmabuf._core import SgTable
from pydmabuf._types import Caching, DmaDirection, _fmt_size
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf, Exporter, PhysVec, attach_revocable
from pydmabuf.machine import P2pProvider

if TYPE_CHECKING:
    from pydmabuf.exporters.vfio import _VfioPciCore

__all__ = ["VfioPciDmaBuf", "vfio_pci_dma_buf_iommufd_map", "IOMMUFD_MODULE"]

#: The only module allowed to link :func:`vfio_pci_dma_buf_iommufd_map`
#: (upstream exports the symbol to iommufd alone); importers declare it in
#: ``import_namespaces``.
IOMMUFD_MODULE = mapping.PAL_MODULE


@contextlib.contextmanager
def every_buffer() -> Iterator[Callable[..., None]]:
    """A walk over a device's buffers that an importer's raising
    invalidation callback cannot cut short: ``each(fn, *args)`` runs one
    buffer's step, keeps a LifetimeError (the checker's report of that
    importer, raised only once the buffer's own sequence completed) and
    goes on; the first one kept is raised when the walk ends."""
    kept: list[errors.LifetimeError] = []

    def each(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except errors.LifetimeError as e:
            kept.append(e)

    yield each
    if kept:
        for e in kept[1:]:
            kept[0].add_note(f"also: {e}")
        raise kept[0]


def flip_619(buf: DmaBuf, revoked: bool) -> None:
    """6.19: set the flag and move_notify under the lock, wait for nothing."""
    buf.resv.lock()
    try:
        buf.revoked = revoked
        buf.invalidate_mappings()
    finally:
        buf.resv.unlock()

# ------------------------------------------------------------- the buffer


class VfioPciDmaBuf(Exporter):
    """The exporter of one VFIO dma-buf (``struct vfio_pci_dma_buf``).

    Attributes
    ----------
    device : Device
        The VFIO device whose BAR this is.
    provider : P2pProvider
        The BAR's P2P provider.
    ranges : numpy.ndarray
        (N, 2) u64 rows of (CPU physical address, nbytes), in the order
        asked for (ranges may repeat or overlap).
    nbytes : int
        The dma-buf's size, the sum of the range lengths.
    region_index : int
        The BAR.
    maps, unmaps : int
        Calls of the map and unmap ops.
    """

    name = "vfio-pci"

    def __init__(self, core: _VfioPciCore, provider: P2pProvider, ranges: np.ndarray, nbytes: int,
                 region_index: int, open_flags: int) -> None:
        self._core: _VfioPciCore | None = core
        self.kernel = core.kernel
        self.device = core.device
        self.machine = core.device.machine
        self.provider = provider
        self.ranges = ranges
        self.nbytes = nbytes
        self.region_index = region_index
        self.open_flags = open_flags
        self.dmabuf: DmaBuf | None = None
        self.maps = 0
        self.unmaps = 0
        self.pal_maps = 0
        self.pal_unmaps = 0
        #: ``priv->memattr``: the caching later mmaps get.  Write-combining
        #: for a prefetchable BAR, uncached otherwise: the rule PCI's own
        #: mmap of a BAR keeps (``resourceN_wc`` exists only for
        #: prefetchable resources).  The posted series starts every buffer
        #: at NC and leaves WC to the DMA_BUF_MEMATTR feature, which can
        #: still set either here.
        self.memattr = Caching.WRITE_COMBINE if provider.bar.prefetch else Caching.UNCACHED

    @property
    def linked(self) -> bool:
        """Still on its device's list (False once the device was closed)."""
        return self._core is not None

    def match_mapping(self, args: Any) -> None:
        """``vfio_pci_dma_buf_match_mapping()`` (P22, with the 13 April fix:
        no reservation-lock assertion, no device check): PAL first, then a
        peer-to-peer scatterlist of the BAR.  An importer that takes
        neither (static, or no P2P route) gets EINVAL from the matcher."""
        mapping.match_mapping(args, [mapping.pal_exporter(self), mapping.sgt_exporter_p2p(self, self.device)])

    def attach(self, attachment: Attachment) -> None:
        # vfio_pci_dma_buf_attach(): unlocked, so the revoked test races
        # with a revoke in the kernel; map tests it again under the lock.
        # The peer2peer test went into the SGT P2P entry (P12).
        if attachment.dmabuf.revoked:
            raise errors.Revoked(f"{attachment.dmabuf.name} is revoked: the device does not decode its BAR "
                                 "or was closed")
        if self.kernel != "6.19" and not attach_revocable(attachment):
            who = attachment.device.name if attachment.device is not None else repr(attachment.importer_ops)
            raise errors.NotSupported(f"{who}: VFIO accepts only importers it can revoke "
                                      "(dynamic, with invalidate_mappings)")

    def map_dma_buf(self, attachment: Attachment, direction: DmaDirection) -> SgTable:
        buf = attachment.dmabuf
        if buf.revoked:
            raise errors.Revoked(f"{buf.name} is revoked")
        table = dma_buf_phys_vec_to_sgt(attachment, self.provider, self.ranges, self.nbytes, direction)
        self.maps += 1
        return table

    def unmap_dma_buf(self, attachment: Attachment, table: SgTable, direction: DmaDirection) -> None:
        dma_buf_free_sgt(table, direction)
        self.unmaps += 1

    def map_phys(self, attachment: Attachment) -> mapping.PhysList:
        """``vfio_pci_dma_pal_map_phys()``: a copy of the BAR ranges (the
        reservation lock is held).  Strict where v1 is loose: a revoked
        buffer is ENODEV (v1 ignores ``revoked``; ``kernel_compat`` maps
        it)."""
        buf = attachment.dmabuf
        if buf.revoked and not mapping.kernel_compat_active():
            raise errors.Revoked(f"{buf.name} is revoked")
        self.pal_maps += 1
        return mapping.PhysList(self.ranges)

    def unmap_phys(self, attachment: Attachment, phys_list: mapping.PhysList) -> None:
        """``vfio_pci_dma_pal_unmap_phys()``: free the copy.  The model counts
        live lists as mappings, so a revoke waits for them (v1's FIXME)."""
        self.pal_unmaps += 1

    def release(self, dmabuf: DmaBuf) -> None:
        core = self._core
        if core is not None:
            with core.memory_lock:
                if self in core.dmabufs:
                    core.dmabufs.remove(self)
            self._core = None

    def get_phys_vec(self, attachment: Attachment | None) -> PhysVec:
        return PhysVec(self.ranges.copy(), self.provider)

    def mmap(self, dmabuf: DmaBuf, mapping: CpuMapping) -> None:
        """``vfio_pci_dma_buf_mmap()`` (the Evans series): MMIO pages,
        uncached or write-combining as ``memattr`` says; faults resolve the
        BAR ranges (``get_phys_vec``) and give SIGBUS while revoked."""
        if self.kernel == "6.19":
            # dma_buf_mmap_internal(): no ->mmap op in 6.19's vfio_pci_dmabuf_ops.
            raise errors.InvalidArgument(f"{dmabuf.name}: VFIO dma-bufs cannot be mmapped before 7.1 "
                                         "(no mmap op)")
        if dmabuf.revoked:
            raise errors.Revoked(f"{dmabuf.name} is revoked: mmap refused")
        mapping.caching = self.memattr

    def __repr__(self) -> str:
        state = "linked" if self.linked else "unlinked"
        return (f"<VfioPciDmaBuf {self.device.name} BAR{self.region_index}: {len(self.ranges)} range(s), "
                f"{_fmt_size(self.nbytes)}, {state}>")


def vfio_pci_dma_buf_iommufd_map(attachment: Attachment) -> tuple[int, int]:
    """``vfio_pci_dma_buf_iommufd_map()``: the one physical range of a VFIO
    dma-buf, for iommufd only.

    The reservation lock must be held.  Returns ``(phys, nbytes)``.

    Raises
    ------
    NotPermitted
        (EPERM) the importer did not declare :data:`IOMMUFD_MODULE` (the
        kernel exports the symbol to the iommufd module alone).
    NotSupported
        (EOPNOTSUPP) the dma-buf is not a VFIO one, or has more than one
        range.
    Revoked
        (ENODEV) the buffer is revoked.

    A successful call is a promise from VFIO: one MMIO range, and an
    invalidation of this attachment means revoke, not move.
    """
    if not isinstance(attachment, Attachment):
        raise TypeError(f"vfio_pci_dma_buf_iommufd_map: {type(attachment).__name__} is not an Attachment")
    ops = attachment.importer_ops
    if ops is None or IOMMUFD_MODULE not in ops.import_namespaces:
        who = attachment.device.name if attachment.device is not None else repr(ops)
        raise errors.NotPermitted(f"{who}: vfio_pci_dma_buf_iommufd_map is exported to the "
                                  f"{IOMMUFD_MODULE!r} module only")
    buf = attachment.dmabuf
    if not buf.resv.held_by_current_thread():
        checks.checker.locking("iommufd-map-without-resv",
                               "vfio_pci_dma_buf_iommufd_map without the reservation lock", attachment)
    exp = buf.exporter
    if not isinstance(exp, VfioPciDmaBuf):
        raise errors.NotSupported(f"{buf.name} was not exported by VFIO ({exp.name})")
    if buf.revoked:
        raise errors.Revoked(f"{buf.name} is revoked")
    if len(exp.ranges) != 1:
        raise errors.NotSupported(f"{buf.name} has {len(exp.ranges)} ranges; iommufd takes exactly one")
    rows = attachment.phys_vec().ranges  # the PAL map, through the one gate
    return int(rows[0, 0]), int(rows[0, 1])
