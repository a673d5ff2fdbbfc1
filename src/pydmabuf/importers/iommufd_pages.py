"""iommufd's pages of a dma-buf (``drivers/iommu/iommufd/pages.c``):
``struct iopt_pages`` of type ``IOPT_ADDRESS_DMABUF`` with its attach ops
(:class:`DmaBufPages`: the revoke callback, the tracked domains, the
release), the walker that feeds a batch from the buffer's physical address
list (:func:`dmabuf_runs`), and the iommufd misc device the attachment is
made for.  The IOAS that creates them is :mod:`pydmabuf.importers.iommufd`,
which re-exports :func:`dmabuf_runs`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf import checks, errors, mapping
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE
from pydmabuf.dmabuf import Attachment, DmaBuf, ImporterOps
from pydmabuf.locking import Mutex
from pydmabuf.machine import Device, Machine

if TYPE_CHECKING:
    from pydmabuf.importers.iommufd import IoasArea
    from pydmabuf.importers.iommufd_hwpt import HwPagetable

log = logging.getLogger(__name__)

__all__ = ["DmaBufPages", "dmabuf_runs", "iommufd_global_device", "MAX_NPFNS"]

#: The largest page count of one batch entry (u32).
MAX_NPFNS = 2**32 - 1


# ------------------------------------------------------------------ pages


class DmaBufPages(ImporterOps):
    """``struct iopt_pages`` of type ``IOPT_ADDRESS_DMABUF`` and its
    attach ops (``iopt_dmabuf_attach_revoke_ops``).  ``lock`` is the pages
    mutex (taken inside the reservation lock).  ``exp_phys`` is the PAL
    list iommufd owns while the buffer is not revoked."""

    allow_peer2peer = True
    import_namespaces = frozenset({mapping.PAL_MODULE})

    def __init__(self, dmabuf: DmaBuf, start: int, length: int, writable: bool) -> None:
        self.lock = Mutex("&pages->mutex")
        self.dmabuf = dmabuf
        self.start = start
        self.length = length
        self.writable = writable
        self.attachment: Attachment | None = None
        self.exp_phys: mapping.PhysList | None = None
        self.tracker: list[tuple[IoasArea, HwPagetable]] = []
        self.revokes = 0
        self.batches = 0

    @property
    def revoked(self) -> bool:
        """``iopt_dmabuf_revoked()``: no list (P24: ``exp_phys == NULL``)."""
        return self.exp_phys is None

    @property
    def paddr(self) -> int:
        """The first range's physical address (0 when revoked)."""
        pl = self.exp_phys
        return int(pl.ranges[0, 0]) if pl is not None and pl.length else 0

    def invalidate_mappings(self, attachment: Attachment) -> None:
        # iopt_revoke_notify(): under the reservation lock; unmap every
        # tracked (area, domain) now, then give the list back, once.
        with self.lock:
            if self.exp_phys is None:
                return
            for area, hwpt in self.tracker:
                hwpt.unmap(area.iova, area.nbytes)
            # The published attachment, as the kernel uses it.  The model
            # publishes it before the reservation lock drops; only
            # IommufdIoas(kernel_compat=True) opens the kernel's window.
            if self.attachment is None:
                checks.checker.lifetime(
                    "iommufd-revoke-before-publish",
                    "a revoke reached iommufd between iopt_map_dmabuf()'s unlock and the publish of its "
                    "attachment: dma_buf_pal_unmap_phys() would get a NULL attachment (a kernel oops)",
                    attachment, culprit=self)
            mapping.pal_unmap_phys(attachment, self.exp_phys)
            self.exp_phys = None
            self.revokes += 1

    def map_domain(self, area: IoasArea, hwpt: HwPagetable) -> None:
        """Track (area, domain) and map the area unless revoked; all or nothing."""
        with self.lock:
            if any(a is area and h is hwpt for a, h in self.tracker):
                raise errors.InvalidArgument(f"{area!r} is already tracked in {hwpt!r}")
            if self.exp_phys is not None:
                self.batches += hwpt.map_runs(area.iova, dmabuf_runs(self.exp_phys.ranges, self.start,
                                                                     area.nbytes // PAGE_SIZE), area.prot)
            self.tracker.append((area, hwpt))

    def unmap_domain(self, area: IoasArea, hwpt: HwPagetable) -> None:
        """Unmap (unless revoked: then it is already unmapped) and untrack."""
        with self.lock:
            if not self.revoked:
                hwpt.unmap(area.iova, area.nbytes)
            self.tracker = [(a, h) for a, h in self.tracker if not (a is area and h is hwpt)]

    def give_back(self, a: Attachment) -> None:
        """Give the physical list back and unpin under the reservation
        lock, then detach ``a``: what a release, or a map that failed after
        attaching, leaves behind."""
        buf = self.dmabuf
        buf.resv.lock()
        try:
            if self.exp_phys is not None:
                mapping.pal_unmap_phys(a, self.exp_phys)
                self.exp_phys = None
            a.unpin()
        finally:
            buf.resv.unlock()
        buf.detach(a)

    def release(self) -> None:
        """``iopt_release_pages()``: give the list back and unpin under the
        lock, detach, drop the reference."""
        a = self.attachment
        buf = self.dmabuf
        if a is not None:
            self.give_back(a)
            self.attachment = None
        if self.tracker:
            log.warning("iommufd: dma-buf pages released with %d tracked domain(s)", len(self.tracker))
        buf.put()


def dmabuf_runs(rows: Any, start: int, npages: int) -> np.ndarray:
    """The page runs ``pfn_reader_fill_dmabuf()`` (P24) feeds the batch for
    ``npages`` pages from byte ``start`` of the buffer, merged as
    ``batch_add_pfn_num()`` merges physically contiguous runs.

    The kernel walks entry by entry: skip entries while their cumulative
    end is at or below ``start``, then one run per entry of
    ``min(pages left, (len - offset) >> PAGE_SHIFT)`` pages.  Vectorised
    here: the entries are found by a search of the cumulative lengths.

    Returns an (R, 2) u64 array of (first pfn, npfns).

    Raises
    ------
    InvalidArgument
        (EINVAL) the request runs past the end of the list (the kernel
        reads past the array), or an entry it walks is empty or not whole
        pages (the kernel's arithmetic then offers an empty run or wraps
        the next offset and yields wrong PFNs).
    """
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1, 2)
    if npages <= 0:
        return np.zeros((0, 2), dtype=np.uint64)
    end = start + npages * PAGE_SIZE
    lens = rows[:, 1]
    ends = np.cumsum(lens, dtype=np.uint64) if len(rows) else np.zeros(0, dtype=np.uint64)
    total = int(lens.sum(dtype=object)) if len(rows) else 0
    if end > total:
        raise errors.InvalidArgument(f"pages [{start:#x}, {end:#x}) run past the {total:#x} bytes the exporter's "
                                     f"{len(rows)} range(s) describe")
    first = int(np.searchsorted(ends, np.uint64(start), side="right"))
    last = int(np.searchsorted(ends, np.uint64(end - 1), side="right"))
    sel = rows[first:last + 1]
    bases = ends[first:last + 1] - sel[:, 1]
    bad = np.flatnonzero((sel[:, 1] == 0) | ((sel[:, 1] & np.uint64(PAGE_SIZE - 1)) != 0)
                         | ((sel[:, 0] & np.uint64(PAGE_SIZE - 1)) != 0))
    if len(bad):
        i = first + int(bad[0])
        raise errors.InvalidArgument(f"range {i} ({int(rows[i, 0]):#x}, +{int(rows[i, 1]):#x}) is empty or not "
                                     "whole pages")
    lo = np.maximum(bases, np.uint64(start))
    hi = np.minimum(ends[first:last + 1], np.uint64(end))
    pfn = (sel[:, 0] + (lo - bases)) >> np.uint64(PAGE_SHIFT)
    n = (hi - lo) >> np.uint64(PAGE_SHIFT)
    # batch_add_pfn_num(): a run that starts where the previous one ends
    # extends it (u32 counts: at most MAX_NPFNS pages per entry).
    joins = np.concatenate(([False], pfn[1:] == pfn[:-1] + n[:-1]))
    heads = np.flatnonzero(~joins)
    npfns = np.add.reduceat(n, heads) if len(heads) else n
    out = np.stack([pfn[heads], npfns], axis=1).astype(np.uint64)
    if len(out) and int(out[:, 1].max()) > MAX_NPFNS:
        raise errors.InvalidArgument("a merged run exceeds the batch's u32 page count")
    return np.ascontiguousarray(out)


_global_lock = threading.Lock()


def iommufd_global_device(machine: Machine) -> Device:
    """The stand-in for ``iommufd_global_device()``: the iommufd misc
    device, not a PCI device (so any exporter that tried to map for it
    would find no peer-to-peer route)."""
    with _global_lock:
        d = getattr(machine, "_iommufd_device", None)  # on the machine: collected with it
        if not isinstance(d, Device):
            d = Device(machine, "iommufd", description="iommufd misc device")
            setattr(machine, "_iommufd_device", d)
        return d
