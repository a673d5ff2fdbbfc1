"""An NVMe-style request walker: the block layer's list-free DMA mapping of
a request (``blk_rq_dma_map_iter_start/next`` and ``blk_rq_dma_unmap`` of
``block/blk-mq-dma.c``, research dma-mapping.md section 3.3), beside the
scatterlist path it replaced, so the two can be compared.

A request is a list of bio_vecs, (physical address, nbytes) rows.  The walk:

1. merges them into phys_vecs as ``blk_map_iter_next()`` does: each clipped
   to the queue's max segment size and segment boundary, physically
   contiguous bvecs of the same kind of memory merged while they fit (in
   the core, without the GIL);
2. classifies the first vec with ``pci_p2pdma_state()``: memory of a peer
   the device reaches by **bus address** is mapped by adding the bus
   offset, one segment per vec, nothing to unmap; memory reached
   **through the host bridge** is mapped with ``DMA_ATTR_MMIO``; a peer the
   device cannot reach fails with BLK_STS_INVAL;
3. takes the **IOVA path** when no interior seam has bits in the device's
   merge boundary (every seam granule aligned; an IOMMU's is the granule
   minus one, direct DMA has none) and ``dma_iova_try_alloc`` succeeds: one
   link per vec back to back, one sync, one DMA segment for the request;
4. else the **fallback**: one ``dma_map_phys`` per vec (all of them in one
   core call), one DMA segment per vec.

Statuses are the kernel's ``blk_status_t``; a failed map raises the
:mod:`pydmabuf.errors` class of ``blk_status_to_errno(status)`` with the
status in ``.blk_status``.  Where the kernel is loose the model decides:
a link failure on the IOVA path is lost upstream (the following sync
overwrites it and the request is issued with a partly linked range); here
the reservation is freed and the request fails with the link error's
status.  The block layer never builds a request that mixes kinds of
memory; the model refuses one (BLK_STS_INVAL) rather than classify only
its first vec.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pydmabuf import _core, _walk, errors
from pydmabuf._core import SCATTERLIST_MAX_SEGMENT, SG_CHAIN, SgTable
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE, DmaDirection
from pydmabuf.dma import (DmaAttrs, IovaState, PhysBatch, dma_map_phys_many, dma_map_sgtable, dma_unmap_phys_many,
                          dma_unmap_sgtable, p2p_context)
from pydmabuf.machine import Device, P2PMapType

__all__ = ["NvmeQueue", "NvmeMapping", "BlkStatus", "BLK_SEG_BOUNDARY_MASK"]

#: The block layer's default segment boundary: no segment crosses 4 GiB.
BLK_SEG_BOUNDARY_MASK = 0xFFFFFFFF
_PMASK = PAGE_SIZE - 1
#: PFNs of 52-bit physical addresses (the core's page-list limit).
_PFN_LIMIT = 1 << (52 - PAGE_SHIFT)


class BlkStatus(enum.IntEnum):
    """``blk_status_t`` values a mapping can end with; each member's value
    is ``blk_status_to_errno()`` of it."""

    OK = 0
    RESOURCE = errno.ENOMEM
    INVAL = errno.EINVAL
    IOERR = errno.EIO
    NOTSUPP = errno.EOPNOTSUPP
    TARGET = errno.EREMOTEIO
    DEV_RESOURCE = errno.EBUSY
    AGAIN = errno.EAGAIN
    OFFLINE = errno.ENODEV
    NOSPC = errno.ENOSPC
    TIMEOUT = errno.ETIMEDOUT

    @classmethod
    def from_errno(cls, code: int) -> BlkStatus:
        """``errno_to_blk_status()``: the status of that errno, IOERR for
        any the table does not hold."""
        try:
            return cls(code)
        except ValueError:
            return cls.IOERR


def _fail(status: BlkStatus, message: str) -> errors.DmaBufError:
    """The exception a request fails with: the class of
    ``blk_status_to_errno(status)``, the status in ``.blk_status``; raise
    it ``from`` the error that caused it."""
    e = errors.from_errno(int(status), f"BLK_STS_{status.name}: {message}")
    e.blk_status = status  # type: ignore[attr-defined]
    return e


@dataclass(eq=False)
class NvmeMapping(Owner):
    """One mapped request: what the driver keeps until completion.

    Attributes
    ----------
    path : str
        ``"iova"`` (one IOVA range), ``"direct"`` (one ``dma_map_phys``
        per vec) or ``"bus"`` (peer bus addresses, nothing mapped).
    route : P2PMapType
        NONE for RAM, BUS_ADDR or THRU_HOST_BRIDGE for a peer's BAR.
    segments : numpy.ndarray
        (N, 2) u64 (DMA address, nbytes): what the iterator returned, in
        order (one row on the IOVA path).
    nvecs : int
        phys_vecs the bvecs merged into.
    state : IovaState or None
        The ``dma_iova_state`` (IOVA path).
    batch : PhysBatch or None
        The per-segment mappings (fallback).
    """

    queue: NvmeQueue
    direction: DmaDirection
    path: str
    route: P2PMapType
    segments: np.ndarray
    nbytes: int
    nvecs: int
    state: IovaState | None = None
    batch: PhysBatch | None = None
    need_unmap: bool = False
    live: bool = field(default=True)

    @property
    def coalesced(self) -> bool:
        """``blk_rq_dma_map_coalesce()``: one DMA range for the request."""
        return self.state is not None and self.state.uses_iova

    @property
    def metadata_nbytes(self) -> int:
        """What the driver keeps to unmap: the 16-byte ``dma_iova_state``
        every request carries, plus ``{dma_addr, len}`` (16 bytes) per
        segment when it must unmap them one by one (the fallback on a
        device where ``dma_need_unmap()`` holds)."""
        return 16 + (16 * len(self.segments) if self.need_unmap else 0)

    def read(self, offset: int, nbytes: int) -> bytes:
        """What the device reads at ``[offset, +nbytes)`` of the request's
        data (a write request's DMA), one access per DMA segment."""
        self._live("read")
        return _walk.read(self.queue.device, self.segments, offset, nbytes, "request read")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """The device writes ``data`` at ``offset`` of the request's data."""
        self._live("write")
        _walk.write(self.queue.device, self.segments, offset, data, "request write")

    def _live(self, what: str) -> None:
        if not self.live:
            raise errors.LifetimeError(f"{what} through an unmapped request")

    def close(self) -> None:
        """Unmap the request with its queue (:meth:`NvmeQueue.unmap`)
        unless unmapped already."""
        if self.live:
            self.queue.unmap(self)

    def _owns(self) -> bool:
        # Peer bus addresses map nothing: such a request owns nothing to
        # warn about when collected (it still unmaps on close).
        return self.live and self.path != "bus"

    def __exit__(self, *exc: object) -> None:
        self.close()  # a peer-bus request too: it leaves the queue's books

    def _leak_message(self) -> str:
        return f"{self!r} collected while mapped: unmap it with its queue"

    def __repr__(self) -> str:
        return (f"<NvmeMapping {self.queue.device.name} {self.nbytes:#x} bytes, {self.nvecs} vec(s) -> "
                f"{len(self.segments)} segment(s) via {self.path}{'' if self.live else ', unmapped'}>")


class NvmeQueue:
    """A block queue of ``device`` with its limits, mapping requests.

    Parameters
    ----------
    device : Device
        The controller (``dma_dev``).
    max_segment_size : int, optional
        ``queue_limits.max_segment_size`` (default: the device's
        ``dma_get_max_seg_size()``; at least PAGE_SIZE).
    seg_boundary_mask : int
        ``queue_limits.seg_boundary_mask`` (default 0xFFFFFFFF, the block
        layer's; at least PAGE_SIZE - 1).
    """

    def __init__(self, device: Device, *, max_segment_size: int | None = None,
                 seg_boundary_mask: int = BLK_SEG_BOUNDARY_MASK) -> None:
        if not isinstance(device, Device):
            raise TypeError("device must be a Device")
        mss = device.dma_get_max_seg_size() if max_segment_size is None else max_segment_size
        for name, v in (("max_segment_size", mss), ("seg_boundary_mask", seg_boundary_mask)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if mss < PAGE_SIZE or mss > 0xFFFFFFFF:
            raise errors.InvalidArgument(f"max_segment_size {mss!r} must be in [PAGE_SIZE, UINT_MAX]")
        if seg_boundary_mask < _PMASK or seg_boundary_mask >> 64 or seg_boundary_mask & (seg_boundary_mask + 1):
            raise errors.InvalidArgument(f"seg_boundary_mask {seg_boundary_mask!r} must be 2**k - 1 >= PAGE_SIZE - 1")
        self.device = device
        self.max_segment_size = mss
        self.seg_boundary_mask = seg_boundary_mask
        self.requests = 0

    @property
    def merge_boundary(self) -> int:
        """``dma_get_merge_boundary()``: the IOMMU granule minus one, or 0
        for direct DMA (which cannot merge)."""
        return PAGE_SIZE - 1 if self.device.domain is not None else 0

    def _need_unmap(self, batch: PhysBatch) -> bool:
        """``dma_need_unmap()``: not direct DMA, or not coherent, or
        swiotlb was used."""
        d = self.device
        return d.domain is not None or not d.coherent or batch.kind == "singles"

    # ------------------------------------------------------------- walk

    def merge(self, bvecs: Any) -> np.ndarray:
        """The phys_vecs ``blk_map_iter_next()`` makes of ``bvecs``: (M, 2)
        u64 (physical address, nbytes).  EINVAL for an empty request, an
        empty or wrapping bvec, or more than UINT_MAX bytes."""
        vecs, *_ = _core.blk_map_iter(_rows(bvecs), self.max_segment_size, self.seg_boundary_mask, None)
        return vecs

    def map(self, bvecs: Any, *, write: bool = False) -> NvmeMapping:
        """Map a request (``blk_rq_dma_map_iter_start`` and ``_next`` until
        the iterator ends).  ``write`` makes it a write request
        (``DMA_TO_DEVICE``; reads are ``DMA_FROM_DEVICE``).

        Raises the class of the status's errno, ``.blk_status`` set:
        BLK_STS_INVAL (EINVAL) for a malformed request or a peer the
        device cannot reach, BLK_STS_RESOURCE (ENOMEM) when a per-vec
        mapping fails, and what ``errno_to_blk_status`` makes of a failed
        link or sync on the IOVA path (BLK_STS_IOERR for EEXIST ...).
        Nothing stays mapped after a failure."""
        d = DmaDirection.TO_DEVICE if write else DmaDirection.FROM_DEVICE
        dev = self.device
        try:
            vecs, gap, kind, bus_off, mixed, total = _core.blk_map_iter(
                _rows(bvecs), self.max_segment_size, self.seg_boundary_mask, p2p_context(dev))
        except errors.InvalidArgument as e:
            raise _fail(BlkStatus.INVAL, str(e.strerror)) from e
        route = P2PMapType(kind)
        if mixed:
            raise _fail(BlkStatus.INVAL, "the request mixes memory of different kinds (RAM and peer BARs)")
        if route == P2PMapType.BUS_ADDR:
            segs = vecs.copy()
            segs[:, 0] += np.uint64(bus_off)
            return self._done(NvmeMapping(self, d, "bus", route, segs, int(total), len(vecs)))
        if route not in (P2PMapType.NONE, P2PMapType.THRU_HOST_BRIDGE):
            raise _fail(BlkStatus.INVAL, f"{dev.name} cannot reach the peer memory at {int(vecs[0, 0]):#x} "
                                         f"({route.name})")
        attrs = DmaAttrs.MMIO if route == P2PMapType.THRU_HOST_BRIDGE else DmaAttrs.NONE
        if not gap & self.merge_boundary:
            st = IovaState.try_alloc(dev, int(vecs[0, 0]), int(total))
            if st.uses_iova:
                return self._done(self._map_iova(st, vecs, d, attrs, route, int(total)))
        try:
            batch = dma_map_phys_many(dev, vecs, d, attrs)
        except errors.DmaBufError as e:
            raise _fail(BlkStatus.RESOURCE, str(e.strerror)) from e
        m = NvmeMapping(self, d, "direct", route, batch.dma_ranges, int(total), len(vecs), batch=batch,
                        need_unmap=self._need_unmap(batch))
        return self._done(m)

    def _map_iova(self, st: IovaState, vecs: np.ndarray, d: DmaDirection, attrs: DmaAttrs, route: P2PMapType,
                  total: int) -> NvmeMapping:
        """``blk_rq_dma_map_iova()``: link every vec back to back, one sync."""
        try:
            mapped = st.link_ranges(vecs, d, attrs)  # all or nothing
        except errors.DmaBufError as e:
            st.free()
            raise _fail(BlkStatus.from_errno(e.errno or 0), str(e.strerror)) from e
        try:
            st.sync(0, mapped)
        except errors.DmaBufError as e:
            st.destroy(mapped, d, attrs)
            raise _fail(BlkStatus.from_errno(e.errno or 0), f"dma_iova_sync: {e.strerror}") from e
        segs = np.array([[st.addr, st.size]], dtype=np.uint64)
        return NvmeMapping(self, d, "iova", route, segs, total, len(vecs), state=st)

    def _done(self, m: NvmeMapping) -> NvmeMapping:
        self.requests += 1
        return m

    def unmap(self, mapping: NvmeMapping) -> None:
        """``blk_rq_dma_unmap()``, and the per-segment ``dma_unmap_phys``
        the driver does when it returns false: bus addresses need nothing,
        the IOVA path one ``dma_iova_destroy``, the fallback every segment.
        Twice, or a request of another queue: LifetimeError; not a request
        at all: TypeError."""
        if not isinstance(mapping, NvmeMapping):
            raise TypeError(f"blk_rq_dma_unmap: mapping must be an NvmeMapping, not {type(mapping).__name__}")
        if mapping.queue is not self:
            raise errors.LifetimeError("blk_rq_dma_unmap: not a request mapped by this queue")
        if not mapping.live:
            raise errors.LifetimeError("blk_rq_dma_unmap: the request was unmapped already")
        attrs = DmaAttrs.MMIO if mapping.route == P2PMapType.THRU_HOST_BRIDGE else DmaAttrs.NONE
        if mapping.state is not None:
            mapping.state.destroy(int(mapping.segments[0, 1]), mapping.direction, attrs)
        elif mapping.batch is not None:
            dma_unmap_phys_many(mapping.batch, mapping.direction, attrs)
        mapping.live = False

    # ------------------------------------------------------- page lists

    @staticmethod
    def bvecs_from_pages(pfns: Any, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """One bvec per page of a buffer (``bio_add_page``): (N, 2) u64
        rows, the first starting ``offset`` into its page, ``nbytes`` in
        all (default: to the end of the last page).

        ``pfns`` is parsed as the core parses its u64 buffers (TypeError,
        ValueError for a dtype or shape, EINVAL for a negative or too large
        int in a list); a PFN beyond 52-bit physical addresses is
        OutOfRange (ERANGE), as for :meth:`SgTable.from_pages`."""
        p = _core.u64_array(pfns, "pfns")
        if len(p) == 0:
            raise errors.InvalidArgument("a request needs at least one page")
        if int(p.max()) >= _PFN_LIMIT:
            raise errors.OutOfRange("bvecs_from_pages: a PFN is beyond 52-bit physical addresses")
        if not isinstance(offset, int) or not 0 <= offset < PAGE_SIZE:
            raise errors.InvalidArgument(f"offset {offset!r} must be inside the first page")
        room = len(p) * PAGE_SIZE - offset
        n = room if nbytes is None else nbytes
        if not isinstance(n, int) or n <= 0 or n > room or n <= room - PAGE_SIZE:
            raise errors.InvalidArgument(f"nbytes {n!r} does not end in the last of the {len(p)} pages")
        rows = np.empty((len(p), 2), dtype=np.uint64)
        rows[:, 0] = p << np.uint64(12)
        rows[:, 1] = PAGE_SIZE
        rows[0, 0] += np.uint64(offset)
        rows[0, 1] -= np.uint64(offset)
        rows[-1, 1] -= np.uint64(room - n)
        return rows

    def map_pages(self, pfns: Any, *, offset: int = 0, nbytes: int | None = None, write: bool = False) -> NvmeMapping:
        """:meth:`map` of the request :meth:`bvecs_from_pages` makes."""
        return self.map(self.bvecs_from_pages(pfns, offset, nbytes), write=write)

    # ------------------------------------------------- scatterlist path

    def map_sg(self, bvecs: Any, *, write: bool = False) -> SgTable:
        """The scatterlist path for the same request: ``__blk_rq_map_sg``
        (one entry per merged phys_vec) then ``dma_map_sgtable``.  Errors
        are :func:`dma_map_sgtable`'s; nothing stays mapped after one."""
        vecs = self.merge(bvecs)
        t = SgTable.alloc(len(vecs))
        e = t.entries
        slots = np.flatnonzero((e["page_link"] & np.uint64(SG_CHAIN)) == 0)[: len(vecs)]
        keep = e["page_link"][slots] & np.uint64(3)
        e["page_link"][slots] = (vecs[:, 0] & ~np.uint64(_PMASK)) | keep
        e["offset"][slots] = (vecs[:, 0] & np.uint64(_PMASK)).astype(np.uint32)
        e["length"][slots] = vecs[:, 1].astype(np.uint32)
        dma_map_sgtable(self.device, t, DmaDirection.TO_DEVICE if write else DmaDirection.FROM_DEVICE)
        return t

    def map_pages_sg(self, pfns: Any, *, offset: int = 0, nbytes: int | None = None, write: bool = False) -> SgTable:
        """The scatterlist path for a page list: ``SgTable.from_pages``
        (entries up to the queue's max segment size) then
        ``dma_map_sgtable``."""
        seg = min(self.max_segment_size, SCATTERLIST_MAX_SEGMENT) & ~_PMASK
        t = SgTable.from_pages(pfns, offset=offset, nbytes=nbytes, max_segment=seg)
        dma_map_sgtable(self.device, t, DmaDirection.TO_DEVICE if write else DmaDirection.FROM_DEVICE)
        return t

    def unmap_sg(self, table: SgTable) -> None:
        """``dma_unmap_sgtable`` of a table from :meth:`map_sg` /
        :meth:`map_pages_sg`."""
        if not isinstance(table, SgTable):
            raise TypeError(f"dma_unmap_sgtable: table must be an SgTable, not {type(table).__name__}")
        m = table.mapping
        if m is None:
            raise errors.LifetimeError("dma_unmap_sgtable: the table is not mapped")
        dma_unmap_sgtable(self.device, table, m.direction)

    def __repr__(self) -> str:
        return (f"<NvmeQueue {self.device.name} max_segment={self.max_segment_size:#x} "
                f"boundary={self.seg_boundary_mask:#x} requests={self.requests}>")


def _rows(bvecs: Any) -> np.ndarray:
    """The request's bvecs as (N, 2) u64 (physical address, nbytes) rows,
    parsed as the core parses its (N, 2) buffers (``_core.u64_pairs``):
    TypeError for what is not a table of ints, ValueError for a dtype,
    shape or layout that is not C-contiguous (N, 2) u64, EINVAL for a
    negative or too large int in a list.  Nothing is cast or reshaped."""
    return _core.u64_pairs(bvecs, "bvecs")
