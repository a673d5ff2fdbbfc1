"""RDMA memory regions over dma-bufs: the dma-buf umem of
``drivers/infiniband/core/umem_dmabuf.c`` and mlx5's dynamic dma-buf MR
(``mlx5_ib_reg_user_mr_dmabuf``, its invalidate callback and the ODP
page-fault path ``pagefault_dmabuf_mr``), research dma-buf.md section 6.

* :class:`UmemDmabuf` is ``struct ib_umem_dmabuf``: a dynamic attachment
  of the NIC (``allow_peer2peer``) over ``[offset, offset + nbytes)`` of a
  dma-buf, mapped ``DMA_BIDIRECTIONAL`` under the reservation lock with
  the exporter's table trimmed *in place* to the page-aligned window (and
  restored before it goes back), then a wait for the KERNEL fences.
* :class:`RdmaMr` is the MR on top: its translation (the MTT) is written
  when the umem is mapped, zapped when the exporter invalidates (then the
  umem is unmapped), and the next access by the NIC page-faults and maps
  again, as ODP does.  The pinned variant (``ib_umem_dmabuf_get_pinned``)
  maps once and never faults.

``kernel_version`` selects what changed in the importer between releases:
up to 7.0 ``ib_umem_dmabuf_get`` refuses importer ops without an
invalidation callback (EINVAL) and the pinned ops carry a stub callback
that only warns; 7.1 dropped both (the pinned ops have no callback, so an
exporter that requires revocable importers refuses them at attach).  What
the exporter does with a pinned importer (VFIO 6.19 accepts it, 7.0 fails
its pin with EOPNOTSUPP, 7.1 refuses it at attach) is the exporter's.

Where the model is stricter than the kernel: ``ib_umem_dmabuf_get_pinned``
unpins once on its error path and again in the release that follows (the
``pinned`` flag is not cleared), a double unpin; the model unpins once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from pydmabuf import _walk, checks, errors
from pydmabuf._core import SG_CHAIN, SgTable
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SIZE, DmaDirection, Usage
from pydmabuf.dmabuf import Attachment, DmaBuf, ImporterOps, dma_buf_ref
from pydmabuf.dmabuf_ops import timeout_arg
from pydmabuf.machine import U64_MAX, Device, P2PMapType

log = logging.getLogger(__name__)

__all__ = ["UmemDmabuf", "RdmaMr", "KERNEL_VERSIONS"]

#: The importer behaviours modelled (see the module docstring).
KERNEL_VERSIONS = ("6.19", "7.0", "7.1")

_BIDI = DmaDirection.BIDIRECTIONAL
_PMASK = PAGE_SIZE - 1


def _version(v: str) -> str:
    if v not in KERNEL_VERSIONS:
        raise ValueError(f"kernel_version must be one of {KERNEL_VERSIONS}, not {v!r}")
    return v


def _iova_arg(iova: Any) -> int | None:
    """The MR's ``virt_addr`` (None: the buffer offset), parsed before
    anything is attached: TypeError for a non-int, EINVAL outside u64."""
    if iova is None:
        return None
    if not isinstance(iova, int) or isinstance(iova, bool):
        raise TypeError(f"iova must be an int or None, not {type(iova).__name__}")
    if iova < 0 or iova > U64_MAX:
        raise errors.InvalidArgument(f"iova {iova:#x} is not a u64")
    return iova


# --------------------------------------------------------- the in-place trim


class _Trim:
    """What ``ib_umem_dmabuf_map_pages`` changed in the exporter's table:
    ``first_sg`` / ``first_sg_offset``, ``last_sg`` / ``last_sg_trim``
    (table slots, or -1 for none) and the window's first DMA segment and
    count (``sgt_append.sgt.sgl`` / ``nents``)."""

    __slots__ = ("first_slot", "first_offset", "last_slot", "last_trim", "first_index", "nmap")

    def __init__(self) -> None:
        self.first_slot = self.last_slot = self.first_index = -1
        self.first_offset = self.last_trim = self.nmap = 0


def _dma_slots(table: SgTable) -> np.ndarray:
    """The slots of the table's ``nents`` DMA segments, in order."""
    e = table.entries
    return np.flatnonzero((e["page_link"] & np.uint64(SG_CHAIN)) == 0)[: table.nents]


def _trim_table(table: SgTable, start: int, end: int) -> _Trim:
    """Trim the DMA side of ``table`` in place to the byte window
    ``[start, end)`` of its DMA stream, as ``ib_umem_dmabuf_map_pages``
    does: the segment holding ``start`` is shifted (address up, length
    down), the segment holding ``end`` shortened; segments overlapping the
    window are counted.  A window that runs past the stream leaves the last
    segment whole (no segment holds its end)."""
    tr = _Trim()
    e = table.entries
    slots = _dma_slots(table)
    if len(slots) == 0:
        return tr
    lens = e["dma_length"][slots].astype(np.uint64)
    ends = np.cumsum(lens, dtype=np.uint64)
    begins = ends - lens
    s, t = np.uint64(start), np.uint64(end)
    overlap = (s < ends) & (begins < t)
    f = int(np.searchsorted(ends, s, side="right"))  # begins[f] <= start < ends[f]
    last = int(np.searchsorted(ends, t, side="left"))  # begins[last] < end <= ends[last]
    tr.nmap = int(overlap.sum())
    if f < len(slots):
        off = int(s - begins[f])
        tr.first_slot, tr.first_offset, tr.first_index = int(slots[f]), off, f
        e["dma_address"][tr.first_slot] += np.uint64(off)
        e["dma_length"][tr.first_slot] -= np.uint32(off)
    if last < len(slots):
        trim = int(ends[last] - t)
        tr.last_slot, tr.last_trim = int(slots[last]), trim
        e["dma_length"][tr.last_slot] -= np.uint32(trim)
    return tr


def _untrim_table(table: SgTable, tr: _Trim) -> None:
    """Undo :func:`_trim_table` exactly (``ib_umem_dmabuf_unmap_pages``)."""
    e = table.entries
    if tr.first_slot >= 0:
        e["dma_address"][tr.first_slot] -= np.uint64(tr.first_offset)
        e["dma_length"][tr.first_slot] += np.uint32(tr.first_offset)
    if tr.last_slot >= 0:
        e["dma_length"][tr.last_slot] += np.uint32(tr.last_trim)


def _window(table: SgTable, tr: _Trim) -> np.ndarray:
    """The umem's view: ``nmap`` (DMA address, nbytes) rows from the first
    trimmed segment (the table's DMA segments are its non-chain slots in
    order, so a slice of its ``dma_ranges``)."""
    if tr.first_index < 0:
        return np.zeros((0, 2), dtype=np.uint64)
    return table.dma_ranges()[tr.first_index : tr.first_index + tr.nmap]


def best_page_size(segments: np.ndarray, address: int, length: int, iova: int, pgsz_bitmap: int = PAGE_SIZE) -> int:
    """``ib_umem_find_best_pgsz()``: the largest page size of ``pgsz_bitmap``
    that maps the MR's IOVA range onto the DMA segments, or 0.

    Every segment's DMA address (the first one plus the in-page offset of
    ``address``) must agree with the IOVA it lands at in the low bits, and
    every segment but the last must end on such a boundary."""
    segs = np.asarray(segments, dtype=np.uint64).reshape(-1, 2)
    va0 = iova & U64_MAX
    mask = pgsz_bitmap & ~((1 << (((length - 1 + va0) ^ va0) & U64_MAX).bit_length()) - 1) & U64_MAX
    if len(segs):
        pgoff = address & _PMASK
        lens = segs[:, 1]
        before = np.cumsum(lens, dtype=np.uint64) - lens
        va = np.uint64((va0 - pgoff) & U64_MAX) + before
        dma = segs[:, 0].copy()
        dma[0] += np.uint64(pgoff)
        va[0] = np.uint64(va0)
        m = np.bitwise_or.reduce(dma ^ va)
        if len(segs) > 1:
            m |= np.bitwise_or.reduce(va[1:])  # where each but the last segment ends
        mask |= int(m)
    if mask:
        low = (mask & -mask).bit_length() - 1  # count_trailing_zeros
        pgsz_bitmap &= (1 << (low + 1)) - 1
    return 1 << (pgsz_bitmap.bit_length() - 1) if pgsz_bitmap else 0


# ------------------------------------------------------------------- umem


class _PinnedOps(ImporterOps):
    """``ib_umem_dmabuf_attach_pinned_ops`` (7.1): peer-to-peer capable, no
    invalidation callback, so not revocable."""

    allow_peer2peer = True


class _PinnedOpsLegacy(ImporterOps):
    """The pinned ops up to 7.0: a stub callback that only warns."""

    allow_peer2peer = True

    def invalidate_mappings(self, attachment: Attachment) -> None:
        umem = attachment.importer_priv
        umem.unsupported_invalidations += 1
        log.warning("%s: invalidate callback should not be called when memory is pinned", umem.device.name)


class UmemDmabuf:
    """``struct ib_umem_dmabuf``: a NIC's window on a dma-buf.

    Create with :meth:`get` (dynamic; nothing mapped yet) or
    :meth:`get_pinned`.  :meth:`map_pages` / :meth:`unmap_pages` need the
    buffer's reservation lock held; :meth:`revoke` and :meth:`release`
    take it.

    Attributes
    ----------
    device : Device
        The NIC (``ib_device->dma_device``).
    dmabuf : DmaBuf
        The buffer (the umem holds a reference until :meth:`release`).
    attachment : Attachment
        The dynamic attachment (``importer_priv`` is this umem).
    address, length : int
        ``umem.address`` (the offset into the buffer) and ``umem.length``.
    pinned, revoked : bool
    table : SgTable or None
        The exporter's table while mapped (``umem_dmabuf->sgt``), trimmed.
    private : Any
        The driver's object (mlx5: the MR).
    """

    device: Device
    dmabuf: DmaBuf
    attachment: Attachment
    address: int
    length: int
    writable: bool
    kernel_version: str
    pinned: bool
    revoked: bool
    released: bool
    table: SgTable | None
    private: Any
    maps: int
    unsupported_invalidations: int
    _trim: _Trim

    def __init__(self) -> None:
        raise TypeError("use UmemDmabuf.get() or UmemDmabuf.get_pinned()")

    @classmethod
    def get(cls, device: Device, dmabuf: DmaBuf | int, offset: int, nbytes: int, ops: ImporterOps | None, *,
            writable: bool = True, kernel_version: str = "7.1") -> UmemDmabuf:
        """``ib_umem_dmabuf_get()``: checks in the kernel's order, then a
        dynamic attach; nothing is mapped.

        ``dmabuf`` is a DmaBuf or a file descriptor from :meth:`DmaBuf.fd`
        (the umem takes its own reference either way).

        Raises
        ------
        InvalidArgument
            (EINVAL) ``offset + nbytes`` overflows an unsigned long; (up
            to 7.0) ``ops`` without an invalidation callback; the window
            runs past the buffer; the window has no page (``nbytes`` 0).
        BadHandle, InvalidArgument
            From ``dma_buf_get`` (EBADF: no such fd; EINVAL: not a dma-buf).
        DmaBufError
            Whatever the exporter's ``attach`` refuses with.
        """
        v = _version(kernel_version)
        if not isinstance(device, Device):
            raise TypeError(f"ib_umem_dmabuf_get: device must be a Device, not {type(device).__name__}")
        if not isinstance(offset, int) or not isinstance(nbytes, int) or isinstance(offset, bool) \
                or isinstance(nbytes, bool):
            raise TypeError("offset and nbytes must be ints")
        # check_add_overflow(offset, size, &end) on unsigned longs.
        if offset < 0 or nbytes < 0 or offset + nbytes > U64_MAX:
            raise errors.InvalidArgument(f"ib_umem_dmabuf_get: offset {offset:#x} + size {nbytes:#x} overflows")
        if v != "7.1" and (ops is None or not ops.has_invalidate):
            raise errors.InvalidArgument("ib_umem_dmabuf_get: the importer ops have no invalidation callback "
                                         f"(required up to 7.0; kernel_version={v})")
        buf = dma_buf_ref(dmabuf, "ib_umem_dmabuf_get")
        try:
            end = offset + nbytes
            if buf.size < end:
                raise errors.InvalidArgument(f"ib_umem_dmabuf_get: [{offset:#x}, {end:#x}) runs past the "
                                             f"{buf.size:#x}-byte dma-buf")
            self = object.__new__(cls)
            self.device = device
            self.dmabuf = buf
            self.address = offset
            self.length = nbytes
            self.writable = bool(writable)
            self.kernel_version = v
            self.pinned = False
            self.revoked = False
            self.released = False
            self.table = None
            self._trim = _Trim()
            self.private = None
            self.maps = 0
            self.unsupported_invalidations = 0
            # ib_umem_num_pages() counts from umem->iova, still 0 here.
            if self.num_pages_from(0) == 0:
                raise errors.InvalidArgument("ib_umem_dmabuf_get: the window holds no page (size 0)")
            self.attachment = buf.dynamic_attach(device, ops, importer_priv=self)
        except BaseException:
            buf.put()
            raise
        return self

    @classmethod
    def get_pinned(cls, device: Device, dmabuf: DmaBuf | int, offset: int, nbytes: int, *, writable: bool = True,
                   kernel_version: str = "7.1", fence_timeout: float | None = None) -> UmemDmabuf:
        """``ib_umem_dmabuf_get_pinned()``: :meth:`get` with the pinned ops,
        then under the reservation lock ``dma_buf_pin`` and
        :meth:`map_pages`.  A failure undoes everything (unpinning once).

        An exporter that requires revocable importers refuses the 7.1
        pinned ops at attach (EOPNOTSUPP); a static exporter (no ``pin``
        op, like the system heap) accepts and the pin does nothing."""
        v = _version(kernel_version)
        timeout_arg(fence_timeout, "ib_umem_dmabuf_get_pinned")  # before anything is attached
        ops = _PinnedOps() if v == "7.1" else _PinnedOpsLegacy()
        self = cls.get(device, dmabuf, offset, nbytes, ops, writable=writable, kernel_version=v)
        resv = self.dmabuf.resv
        resv.lock()
        try:
            self.attachment.pin()
            self.pinned = True
            try:
                self.map_pages(fence_timeout)
            except BaseException:
                self.attachment.unpin()
                self.pinned = False
                raise
        except BaseException:
            resv.unlock()
            self.release()
            raise
        resv.unlock()
        return self

    # ------------------------------------------------------------- queries

    def num_pages_from(self, iova: int) -> int:
        """``ib_umem_num_dma_blocks(umem, PAGE_SIZE)`` for ``umem->iova``."""
        return ((iova + self.length + _PMASK) & ~_PMASK) - (iova & ~_PMASK) >> 12

    @property
    def window(self) -> tuple[int, int]:
        """``[ALIGN_DOWN(address), ALIGN(address + length))``: the bytes of
        the buffer the umem maps (whole pages)."""
        return self.address & ~_PMASK, (self.address + self.length + _PMASK) & ~_PMASK

    @property
    def mapped(self) -> bool:
        return self.table is not None

    def dma_ranges(self) -> np.ndarray:
        """The umem's DMA segments while mapped (``sgt_append.sgt``: the
        trimmed entries from the first in the window, ``nents`` of them):
        (N, 2) u64 (DMA address, nbytes); empty when unmapped."""
        if self.table is None:
            return np.zeros((0, 2), dtype=np.uint64)
        return _window(self.table, self._trim)

    # ------------------------------------------------------------ mapping

    def _assert_held(self, what: str) -> None:
        if not self.dmabuf.resv.held_by_current_thread():
            checks.checker.locking(f"umem-{what}-without-resv", f"ib_umem_dmabuf_{what} without the "
                                   "reservation lock", self.attachment)

    def map_pages(self, fence_timeout: float | None = None) -> None:
        """``ib_umem_dmabuf_map_pages()`` (reservation lock held).

        EINVAL once revoked.  If already mapped, only the fence wait.
        Otherwise ``dma_buf_map_attachment(DMA_BIDIRECTIONAL)`` (its errors
        propagate: ENODEV from a revoking exporter ...), trim the table in
        place to :attr:`window`, then wait (uninterruptibly) for the KERNEL
        fences: the kernel waits forever; ``fence_timeout`` seconds here,
        and running out is ETIMEDOUT as the kernel's zero return would be.
        As in the kernel, a timed-out wait leaves the table mapped (the
        next call only waits)."""
        self._assert_held("map_pages")
        timeout_arg(fence_timeout, "ib_umem_dmabuf_map_pages")  # before anything is mapped
        if self.revoked:
            raise errors.InvalidArgument(f"ib_umem_dmabuf_map_pages: the umem of {self.dmabuf.name} was revoked")
        if self.table is None:
            t = self.attachment.map(_BIDI)
            start, end = self.window
            self._trim = _trim_table(t, start, end)
            self.table = t
            self.maps += 1
        if not self.dmabuf.resv.wait(Usage.KERNEL, timeout=fence_timeout):
            raise errors.TimedOut(f"ib_umem_dmabuf_map_pages: the KERNEL fences of {self.dmabuf.name} did not "
                                  f"signal in {fence_timeout}s")

    def unmap_pages(self) -> None:
        """``ib_umem_dmabuf_unmap_pages()`` (reservation lock held): restore
        the trimmed entries, unmap the attachment; nothing if unmapped."""
        self._assert_held("unmap_pages")
        t = self.table
        if t is None:
            return
        _untrim_table(t, self._trim)
        self._trim = _Trim()
        self.table = None
        self.attachment.unmap(t, _BIDI)

    def revoke(self) -> None:
        """``ib_umem_dmabuf_revoke()``: once, under the lock: unmap, unpin
        if pinned, mark revoked (later :meth:`map_pages` are EINVAL)."""
        resv = self.dmabuf.resv
        resv.lock()
        try:
            if self.revoked:
                return
            self.unmap_pages()
            if self.pinned:
                self.attachment.unpin()
                self.pinned = False
            self.revoked = True
        finally:
            resv.unlock()

    def release(self) -> None:
        """``ib_umem_dmabuf_release()``: revoke, detach, drop the buffer
        reference.  A second release is a LifetimeError."""
        if self.released:
            raise errors.LifetimeError(f"ib_umem_dmabuf_release: the umem of {self.dmabuf.name} was released already")
        self.revoke()
        self.dmabuf.detach(self.attachment)
        self.released = True
        self.dmabuf.put()

    def __repr__(self) -> str:
        state = ["released" if self.released else "revoked" if self.revoked else
                 "mapped" if self.table is not None else "unmapped"]
        if self.pinned:
            state.append("pinned")
        return (f"<UmemDmabuf {self.device.name} [{self.address:#x}, +{self.length:#x}] of "
                f"{self.dmabuf.name!r} {', '.join(state)}>")


# --------------------------------------------------------------------- MR


class _Mlx5DmabufOps(ImporterOps):
    """``mlx5_ib_dmabuf_attach_ops``: peer-to-peer capable, with the
    invalidation callback ``mlx5_ib_dmabuf_invalidate_cb``."""

    allow_peer2peer = True

    def invalidate_mappings(self, attachment: Attachment) -> None:
        umem: UmemDmabuf = attachment.importer_priv
        umem._assert_held("invalidate")
        mr = umem.private
        if umem.table is None or mr is None:
            return
        mr._zap()
        umem.unmap_pages()


class RdmaMr(Owner):
    """An RDMA memory region over a window of a dma-buf (mlx5's dma-buf MR).

    Register with :meth:`register` (dynamic: ODP-style faults after
    invalidation) or :meth:`register_pinned`.  The NIC accesses the MR with
    :meth:`read` / :meth:`write` (byte offsets from the start of the MR):
    one DMA access per DMA segment, through the MR's translation; a zapped
    translation first page-faults (:meth:`fault`), which takes the
    reservation lock and maps again.

    Attributes
    ----------
    umem : UmemDmabuf
    iova : int
        The MR's virtual address (``virt_addr``; its page offset must
        match the buffer offset's).
    faults, zaps, mtt_writes : int
        Page faults served, translations zapped, MTT entries written (one
        per page of the umem per translation update).
    """

    umem: UmemDmabuf
    device: Device
    iova: int
    is_pinned: bool
    fence_timeout: float | None
    faults: int
    zaps: int
    mtt_writes: int
    deregistered: bool
    _xlt: np.ndarray | None
    _lock: threading.Lock

    def __init__(self) -> None:
        raise TypeError("use RdmaMr.register() or RdmaMr.register_pinned()")

    @classmethod
    def _new(cls, umem: UmemDmabuf, iova: int, fence_timeout: float | None, *, pinned: bool) -> RdmaMr:
        self = object.__new__(cls)
        self.is_pinned = pinned
        self.umem = umem
        self.device = umem.device
        self.iova = iova
        self.fence_timeout = fence_timeout
        self.faults = 0
        self.zaps = 0
        self.mtt_writes = 0
        self.deregistered = False
        self._xlt = None  # the translation: DMA segments of the window
        self._lock = threading.Lock()  # the hardware's view: an access and a zap do not overlap
        return self

    @classmethod
    def _adopt(cls, umem: UmemDmabuf, iova: int | None, fence_timeout: float | None, *, pinned: bool) -> RdmaMr:
        """The MR over a new umem, once its IOVA passes
        ``mlx5_umem_dmabuf_default_pgsz()`` (mkeys for dma-bufs are fixed at
        PAGE_SIZE, so the IOVA and the buffer offset must share the page
        offset: EINVAL, and the umem is released)."""
        offset = umem.address
        try:
            if iova is None:
                iova = offset
            elif (iova ^ offset) & _PMASK:
                raise errors.InvalidArgument(f"iova {iova:#x} and offset {offset:#x} differ in their page offset")
        except BaseException:
            umem.release()
            raise
        self = cls._new(umem, iova, fence_timeout, pinned=pinned)
        umem.private = self
        return self

    @classmethod
    def register(cls, device: Device, dmabuf: DmaBuf | int, offset: int, nbytes: int, *, iova: int | None = None,
                 writable: bool = True, kernel_version: str = "7.1", fence_timeout: float | None = None) -> RdmaMr:
        """``mlx5_ib_reg_user_mr_dmabuf()``: :meth:`UmemDmabuf.get` with
        the mlx5 ops, then the first page fault with ENABLE (the MR is
        mapped at registration).  A failure deregisters (nothing stays
        attached or mapped) and raises what :meth:`fault` raised.  A
        non-int ``iova`` or ``fence_timeout`` is TypeError, out of range
        EINVAL, before anything is attached."""
        iova = _iova_arg(iova)
        timeout_arg(fence_timeout, "mlx5_ib_reg_user_mr_dmabuf")
        umem = UmemDmabuf.get(device, dmabuf, offset, nbytes, _Mlx5DmabufOps(), writable=writable,
                              kernel_version=kernel_version)
        self = cls._adopt(umem, iova, fence_timeout, pinned=False)
        try:
            self.fault()
        except BaseException:
            self.faults = 0
            self.dereg()
            raise
        return self

    @classmethod
    def register_pinned(cls, device: Device, dmabuf: DmaBuf | int, offset: int, nbytes: int, *,
                        iova: int | None = None, writable: bool = True, kernel_version: str = "7.1",
                        fence_timeout: float | None = None) -> RdmaMr:
        """An MR over :meth:`UmemDmabuf.get_pinned`: mapped and pinned
        once, translation written once, no page faults.  Refused at attach
        (EOPNOTSUPP) by exporters that require revocable importers.
        ``iova`` and ``fence_timeout`` are checked as :meth:`register`
        checks them; the page-offset rule on ``iova`` comes after the
        umem is mapped, in the kernel's order."""
        iova = _iova_arg(iova)
        timeout_arg(fence_timeout, "mlx5_ib_reg_user_mr_dmabuf")
        umem = UmemDmabuf.get_pinned(device, dmabuf, offset, nbytes, writable=writable,
                                     kernel_version=kernel_version, fence_timeout=fence_timeout)
        self = cls._adopt(umem, iova, fence_timeout, pinned=True)
        resv = umem.dmabuf.resv
        resv.lock()
        try:
            ranges = umem.dma_ranges()
            self._check_page_size(ranges)
            self._write_xlt(ranges)
        except BaseException:
            resv.unlock()
            self.dereg()
            raise
        resv.unlock()
        return self

    # ----------------------------------------------------------- state

    @property
    def pinned(self) -> bool:
        """Registered with :meth:`register_pinned`."""
        return self.is_pinned

    @property
    def revoked(self) -> bool:
        return self.umem.revoked

    @property
    def attachment(self) -> Attachment:
        return self.umem.attachment

    @property
    def nbytes(self) -> int:
        return self.umem.length

    @property
    def translation_valid(self) -> bool:
        """The MTT holds a live translation (not zapped)."""
        return self._xlt is not None

    @property
    def route(self) -> P2PMapType | None:
        """How the NIC reaches the exporter's memory: None for RAM, else
        the P2P route of the attachment (BUS_ADDR, THRU_HOST_BRIDGE)."""
        return self.umem.attachment.p2p_route

    def dma_ranges(self) -> np.ndarray:
        """The translation as (DMA address, nbytes) rows of the page-aligned
        window (empty while zapped)."""
        x = self._xlt
        return np.zeros((0, 2), dtype=np.uint64) if x is None else x.copy()

    # ----------------------------------------------------- translation

    def _check_page_size(self, ranges: np.ndarray) -> None:
        """``ranges``: the umem's :meth:`UmemDmabuf.dma_ranges`."""
        u = self.umem
        if best_page_size(ranges, u.address, u.length, self.iova) == 0:
            raise errors.InvalidArgument(f"{self.device.name}: the DMA segments of {u.dmabuf.name} cannot be "
                                         "mapped with PAGE_SIZE MTT entries at this IOVA")

    def _write_xlt(self, ranges: np.ndarray) -> None:
        """UMR update with ENABLE: the MTT of every page of the window
        (``ranges``: the umem's :meth:`UmemDmabuf.dma_ranges`)."""
        with self._lock:
            self._xlt = ranges
            self.mtt_writes += self.umem.num_pages_from(self.iova)

    def _zap(self) -> None:
        """UMR update with ZAP (``MLX5_IB_UPD_XLT_ZAP``): the MTT cleared;
        waits for an access in flight."""
        with self._lock:
            if self._xlt is not None:
                self._xlt = None
                self.zaps += 1
                self.mtt_writes += self.umem.num_pages_from(self.iova)

    def fault(self) -> None:
        """``pagefault_dmabuf_mr()``: take the reservation lock, map the
        umem (its errors propagate: EINVAL once revoked, ENODEV from a
        revoked exporter, ETIMEDOUT from the fence wait), check the pages
        fit PAGE_SIZE MTT entries (else unmap, EINVAL), write the
        translation.  Pinned MRs do not fault (EFAULT)."""
        if self.deregistered:
            raise errors.LifetimeError("page fault on a deregistered MR")
        if self.is_pinned:
            raise errors.IommuFault(f"{self.device.name}: a pinned MR cannot page-fault")
        resv = self.umem.dmabuf.resv
        resv.lock()
        try:
            self.umem.map_pages(self.fence_timeout)
            ranges = self.umem.dma_ranges()
            try:
                self._check_page_size(ranges)
            except errors.InvalidArgument:
                self.umem.unmap_pages()
                raise
            self._write_xlt(ranges)
            self.faults += 1
        finally:
            resv.unlock()

    # ----------------------------------------------------------- access

    def _access(self, offset: int, nbytes: int, write: bool, data: Any = None) -> bytes | None:
        if self.deregistered:
            raise errors.LifetimeError("access through a deregistered MR")
        if not isinstance(offset, int) or not isinstance(nbytes, int):
            raise TypeError("offset and nbytes must be ints")
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.umem.length:
            # pagefault_mr(): the access is not within the MR.
            raise errors.IommuFault(f"{self.device.name}: [{offset:#x}, +{nbytes:#x}) is outside the "
                                    f"{self.umem.length:#x}-byte MR")
        if write and not self.umem.writable:
            raise errors.NotPermitted(f"{self.device.name}: the MR was registered without write access")
        skip = self.umem.address & _PMASK  # the window starts at the page holding `address`
        for _ in range(8):
            with self._lock:
                segs = self._xlt
                if segs is not None:
                    if write:
                        _walk.write(self.device, segs, skip + offset, data, "MR write")
                        return None
                    return _walk.read(self.device, segs, skip + offset, nbytes, "MR read")
            if self.is_pinned:
                raise errors.IommuFault(f"{self.device.name}: access to a pinned MR whose translation is gone "
                                        "(revoked; a pinned MR has no page faults)")
            self.fault()
        raise errors.TryAgain(f"{self.device.name}: the MR kept being invalidated while faulting")

    def read(self, offset: int, nbytes: int) -> bytes:
        """The NIC reads ``nbytes`` at ``offset`` of the MR (an RDMA READ
        response or a send from it), page-faulting first if zapped."""
        return self._access(offset, nbytes, False)  # type: ignore[return-value]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """The NIC writes ``data`` at ``offset`` of the MR (an RDMA WRITE
        or a receive into it); EPERM if registered read-only."""
        n = memoryview(data).nbytes
        self._access(offset, n, True, data)

    # ----------------------------------------------------------- teardown

    def revoke(self) -> None:
        """``ib_umem_dmabuf_revoke()`` of the MR's umem (the driver's revoke
        of an MR): the translation is zapped, the umem unmapped and unpinned
        for good; later faults fail with EINVAL."""
        resv = self.umem.dmabuf.resv
        resv.lock()
        try:
            self._zap()
        finally:
            resv.unlock()
        self.umem.revoke()

    def dereg(self) -> None:
        """``mlx5_ib_dereg_mr()``: stop the MR under the reservation lock
        (zap, forget the MR so the invalidate callback cannot race), then
        release the umem (revoke, detach, put).  Twice: LifetimeError."""
        if self.deregistered:
            raise errors.LifetimeError("mlx5_ib_dereg_mr: the MR was deregistered already")
        resv = self.umem.dmabuf.resv
        resv.lock()
        try:
            self._zap()
            self.umem.private = None
        finally:
            resv.unlock()
        self.deregistered = True
        self.umem.release()

    def close(self) -> None:
        """:meth:`dereg` unless deregistered already (what ``with`` calls)."""
        if not self.deregistered:
            self.dereg()

    def _owns(self) -> bool:
        return not self.deregistered

    def _leak_message(self) -> str:
        return f"{self!r} collected without dereg(): its attachment and mapping leak"

    def __repr__(self) -> str:
        state = "deregistered" if self.deregistered else "revoked" if self.revoked else \
            "valid" if self._xlt is not None else "zapped"
        kind = "pinned" if self.pinned else "dynamic"
        return (f"<RdmaMr {self.device.name} iova={self.iova:#x} {self.umem.length:#x} bytes of "
                f"{self.umem.dmabuf.name!r} {kind} {state}, faults={self.faults} zaps={self.zaps}>")
