"""dma-iommu (``drivers/iommu/dma-iommu.c``): DMA through an IOMMU domain.

* :class:`IovaState`: ``struct dma_iova_state`` and the two-step, list-free
  API (``dma_iova_try_alloc`` / ``link`` / ``sync`` / ``unlink`` /
  ``destroy`` / ``free``), with the swiotlb bounces of an untrusted device.
* :func:`_prot`: ``dma_info_to_prot()``; :func:`_cpu`: the CPU a thread
  stands for in the per-CPU IOVA caches and flush queues.

The scatterlist and single-range paths through an IOMMU are one core call
each (``_core.map_sg_iommu``, ``_core.map_single``), dispatched from
:mod:`pydmabuf.dma`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydmabuf import _core, _dma_api, errors
from pydmabuf._args import _ATTR_TYPES, _DIR_ATTRS, _DIR_TYPES, _LINK_ARGS, _attrs, _bad_range, _dir, _dir_attrs, _need_int
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SIZE, DmaAttrs, DmaDirection, IommuProt
from pydmabuf.device import Device, _need_device
from pydmabuf.swiotlb import _bounce_in, _bounce_out, _pool

__all__ = ["IovaState"]

G = PAGE_SIZE
GMASK = G - 1

def _cpu(device: Device) -> int:
    """The CPU this thread stands for (per-CPU IOVA caches, flush queues):
    its native thread id, read once per thread, modulo the IOMMU's CPUs."""
    g = device.iommu_group
    return _core.thread_cpu(g.iommu.ncpus if g is not None else 1)


_PROTS: dict[tuple[bool, int, int], int] = {}

def _prot(device: Device, direction: DmaDirection, attrs: int) -> int:
    """``dma_info_to_prot()``."""
    key = (bool(device.coherent), int(direction), int(attrs))
    prot = _PROTS.get(key)
    if prot is not None:
        return prot
    if attrs & DmaAttrs.MMIO:
        p = IommuProt.MMIO
    else:
        p = IommuProt.CACHE if device.coherent else IommuProt(0)
    if attrs & DmaAttrs.PRIVILEGED:
        p |= IommuProt.PRIV
    prot = _PROTS[key] = int(p | {DmaDirection.BIDIRECTIONAL: IommuProt.READ | IommuProt.WRITE,
                                   DmaDirection.TO_DEVICE: IommuProt.READ,
                                   DmaDirection.FROM_DEVICE: IommuProt.WRITE}[direction])
    return prot


# ------------------------------------------------------- two-step IOVA API


class IovaState(_core.IovaStateCore, Owner):
    """``struct dma_iova_state`` and the two-step, list-free IOVA API.

    Reserve one IOVA range with :meth:`try_alloc`, link physical ranges
    straight into the IO page table with :meth:`link` /
    :meth:`link_ranges` (no intermediate list, no IOTLB work), make them
    visible with one :meth:`sync`, take parts down with :meth:`unlink`
    (strict invalidation), and end with :meth:`destroy` (unlink all and
    free, lazily on a flush-queue domain) or :meth:`free`.

    When the device does not use dma-iommu, :meth:`try_alloc` returns a
    state with ``uses_iova`` False, as ``dma_use_iova()`` reports: the
    caller falls back to :func:`dma_map_phys`.

    The model checks what the kernel leaves to the caller: links beyond the
    reservation (EINVAL), destroy with a ``mapped_nbytes`` other than what is
    linked, use after destroy or free (LifetimeError).

    The reservation, the record of linked windows (``_linked``: sorted
    ``[start, end)`` offsets, touching parts merged) and the per-call checks
    live in the core (``_core.IovaStateCore``); this class adds directions,
    attributes and the swiotlb bounces of a device that must bounce.

    ``close()`` (and leaving a ``with`` block) unlinks whatever is still
    linked and frees the reservation; a state collected while it still
    holds its IOVA warns with a ResourceWarning (the core's finalizer).
    """

    __slots__ = ("_bounces",)

    # Set by the first bounced link: one (offset, nbytes, bounce address,
    # link direction) per bounced piece, the piece at [offset, +nbytes) of
    # the reservation.
    _bounces: list[tuple[int, int, int, DmaDirection]]

    def __init__(self) -> None:
        raise TypeError("use IovaState.try_alloc(device, phys, nbytes)")

    @classmethod
    def try_alloc(cls, device: Device, phys: int, nbytes: int) -> IovaState:
        """``dma_iova_try_alloc()``: reserve IOVA for ``nbytes`` starting at
        ``phys``'s offset within a granule (only that offset of ``phys`` is
        used).  Never raises for lack of IOVA: the state's ``uses_iova`` is
        False then (and for size 0, sizes with bit 63, and devices without
        an IOMMU).

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> gpu = Machine.default().device("gpu0")
        >>> with IovaState.try_alloc(gpu, 0x100000000, 2 * 4096) as st:
        ...     st.uses_iova, st.size
        (True, 8192)
        """
        if type(device) is not Device:
            _need_device(device, "dma_iova_try_alloc")
        self = cls.__new__(cls)
        self.device = device
        g = device.iommu_group
        dom = self._dom = g.domain if g is not None else None  # device.domain, without the property call
        if type(phys) is not int or type(nbytes) is not int:
            if not isinstance(phys, int) or not isinstance(nbytes, int):
                raise TypeError("phys and nbytes must be ints")
            phys, nbytes = int.__index__(phys), int.__index__(nbytes)  # the values, not a subclass's operators
        if g is None or dom is None or nbytes <= 0 or nbytes >> 63 or phys < 0:
            return self
        p32 = self._reserve(phys, nbytes, device.dma_limit, device.prefer_32bit_iova, g.iommu.ncpus)
        if p32 is not None:
            device.prefer_32bit_iova = p32
        return self

    def link(self, phys: int, offset: int, nbytes: int, direction: DmaDirection | int, attrs: int = 0) -> None:
        """``dma_iova_link()``: map ``[phys, +nbytes)`` at ``addr + offset``.

        Only a link at offset 0 may start inside a granule (EIO otherwise);
        IOVA and physical address must agree on granule alignment (EINVAL);
        an IOVA that is already mapped is EEXIST.  A device that must
        bounce (an untrusted device) bounces the unaligned head and tail of
        RAM through swiotlb, and refuses unaligned MMIO (EPERM).  No IOTLB
        work: call :meth:`sync` once after a batch of links.
        """
        _need_int("dma_iova_link", phys=phys, offset=offset, nbytes=nbytes)
        if _bad_range(phys, nbytes):
            raise errors.InvalidArgument(f"dma_iova_link: bad range [{phys:#x}, +{nbytes:#x})")
        self.link_ranges(np.array([[phys, nbytes]], dtype=np.uint64), direction, attrs, offset=offset)

    def link_ranges(self, ranges: Any, direction: DmaDirection | int, attrs: int = 0, *, offset: int = 0,
                    _all_at_offset: bool = False) -> int:
        """Link an (N, 2) u64 buffer of (phys, nbytes) rows back to back
        from ``offset`` in one call; returns the bytes linked.  All or
        nothing: on failure nothing this call linked stays.

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> gpu = Machine.default().device("gpu0")
        >>> st = IovaState.try_alloc(gpu, 0, 3 * 4096)
        >>> st.link_ranges([[0x100000000, 0x2000], [0x100007000, 0x1000]], DmaDirection.BIDIRECTIONAL)
        12288
        >>> st.sync(0, 12288)
        >>> st.destroy(12288, DmaDirection.BIDIRECTIONAL)
        """
        n = _dma_api.iova_link(self, ranges, direction, attrs, offset, _all_at_offset)
        if n >= 0:  # a device that does not bounce, arguments seen before: one compiled call
            return n
        dom = self._need("link")
        device = self.device
        hit = _LINK_ARGS.get((direction, attrs, device.coherent)) \
            if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES else None
        if hit is None:
            d = _dir(direction)
            a = _attrs(attrs)
            prot = _prot(device, d, a)
            if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES and type(device.coherent) is bool:
                _LINK_ARGS[(direction, attrs, device.coherent)] = (d, a, prot)
        else:
            d, a, prot = hit
        if not device.untrusted:
            # Parsing, the offset checks, the link and the record: one core call.
            return self._link(ranges, prot, offset, _all_at_offset)
        rows = _core.u64_pairs(ranges, "dma_iova_link ranges")
        if len(rows) == 0:
            return 0
        _need_int("dma_iova_link", offset=offset)
        offset = int.__index__(offset)  # the value, not an int subclass's operators
        if offset < 0 or offset >= self.size:
            raise errors.InvalidArgument(f"IovaState.link: offset {offset!r} is outside the {self.size:#x}-byte "
                                         "reservation")
        if ((rows[:, 0] | rows[:, 1]) & np.uint64(GMASK)).any():
            if a & DmaAttrs.MMIO:
                raise errors.NotPermitted("dma_iova_link: unaligned MMIO on a device that must bounce")
            self._check_window("link", offset, int(rows[:, 1].sum(dtype=object)))
            return self._link_bounced(dom, rows, offset, d, a)
        return int(self._link(rows, _prot(device, d, a), offset, bool(_all_at_offset)))

    def _link_bounced(self, dom: _core.IommuDomain, rows: np.ndarray, offset: int, d: DmaDirection,
                      a: DmaAttrs) -> int:
        """iommu_dma_iova_link_swiotlb(): bounce the sub-granule head and
        tail of each range, link the aligned middle directly."""
        pool = _pool(self.device)
        if pool is None:
            raise errors.OutOfMemory("dma_iova_link: the device must bounce and has no swiotlb pool")
        done: list[tuple[int, int]] = []
        bounces: list[tuple[int, int, int, DmaDirection]] = []
        off = offset
        prot = _prot(self.device, d, a)
        try:
            for phys, n in rows.tolist():
                pieces = []
                start_pad = phys & GMASK
                if start_pad:
                    head = min(n, G - start_pad)
                    pieces.append((phys, head, True))
                    phys, n = phys + head, n - head
                tail = (phys + n) & GMASK if n else 0
                mid = n - tail
                if mid:
                    pieces.append((phys, mid, False))
                if tail:
                    pieces.append((phys + mid, tail, True))
                for p, ln, bounce in pieces:
                    target = p
                    if bounce:
                        target = _bounce_in(self.device, pool, p, ln, d, a, align_mask=GMASK)
                        bounces.append((off, ln, target, d))
                    _core.iova_link_ranges(dom, self.addr, off, np.array([[target, ln]], dtype=np.uint64), prot)
                    done.append((off, ln))
                    off += ln
        except errors.DmaBufError:
            for o, ln in done:
                self._unmap(dom, o, ln)
            for _o, _n, t, _d in bounces:
                pool.free(t)
            raise
        self.uses_swiotlb = True
        self._bounces = getattr(self, "_bounces", []) + bounces
        self._mark(offset, off - offset)
        return off - offset

    def _unmap(self, dom: _core.IommuDomain, offset: int, nbytes: int) -> int:
        start = (self.addr + offset) & ~GMASK
        end = (self.addr + offset + nbytes + GMASK) & ~GMASK
        return int(dom.unmap(start, end - start))

    def unlink(self, offset: int, nbytes: int, direction: DmaDirection | int, attrs: int = 0) -> None:
        """``dma_iova_unlink()``: unmap a linked part now, with an immediate
        IOTLB invalidation even on a lazy domain; the IOVA stays reserved.

        Bounced pieces in the part are given back as
        ``__iommu_dma_iova_unlink()`` does through
        ``swiotlb_tbl_unmap_single()``: for FROM_DEVICE and BIDIRECTIONAL
        (``direction`` of this call) the bounce buffer is copied back to
        the original memory unless ``attrs`` has SKIP_CPU_SYNC, then its
        slots are freed.  Unlinking what is not linked, or only part of a
        bounced piece (the kernel would free the whole bounce buffer under
        the part left linked), raises LifetimeError and changes nothing."""
        dom = self._need("unlink")
        d = _dir(direction)
        a = _attrs(attrs)
        offset, nbytes = self._check_window("unlink", offset, nbytes)
        end = offset + nbytes
        if self._covered(offset, end) != nbytes:
            raise errors.LifetimeError(f"dma_iova_unlink: [{offset:#x}, +{nbytes:#x}) is not all linked")
        self._unlink_bounces(offset, end, d, a)
        self._unmap(dom, offset, nbytes)
        self._cut(offset, end)

    def destroy(self, mapped_nbytes: int, direction: DmaDirection | int, attrs: int = 0) -> None:
        """``dma_iova_destroy()``: end the transaction.  ``[0,
        mapped_nbytes)`` must be exactly what is linked (LifetimeError
        otherwise; the kernel would free a wrongly sized range).  Unlinks it
        and frees the whole reservation: at once on a strict domain, through
        the flush queue on a lazy one.  ``mapped_nbytes == 0`` is
        :meth:`free`.

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> gpu = Machine.default().device("gpu0")
        >>> st = IovaState.try_alloc(gpu, 0, 4096)
        >>> n = st.link_ranges([[0x100000000, 0x1000]], DmaDirection.TO_DEVICE)
        >>> st.destroy(n, DmaDirection.TO_DEVICE)
        >>> st.live
        False
        """
        if _dma_api.iova_destroy(self, mapped_nbytes, direction, attrs):
            return  # nothing bounced, arguments seen before: one compiled call
        self._need("destroy")
        da = _DIR_ATTRS.get((direction, attrs)) if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES else None
        d, a = da if da is not None else _dir_attrs(direction, attrs)
        # The checks, the unmap and the free in the core; False for 0 bytes.
        if not self._destroy(mapped_nbytes):
            if self.linked_nbytes:
                raise errors.LifetimeError("dma_iova_destroy(0) with ranges still linked")
            self.free()
            return
        if self.uses_swiotlb:  # only a bounced link leaves pieces to give back
            self._unlink_bounces(0, mapped_nbytes, d, a)
        self._live = False

    def _unlink_bounces(self, lo: int, hi: int, d: DmaDirection | None, a: DmaAttrs) -> None:
        """``iommu_dma_iova_unlink_range_slow()`` for the bounced pieces in
        ``[lo, hi)`` of the reservation: ``swiotlb_tbl_unmap_single()`` on
        each (copy back for FROM_DEVICE / BIDIRECTIONAL without
        SKIP_CPU_SYNC, then free the slots).  ``d`` None copies back by each
        piece's own link direction (the context manager's teardown).  A
        piece cut by the window is a LifetimeError, checked before anything
        is given back."""
        pieces = getattr(self, "_bounces", [])
        if not pieces:
            return
        inside = []
        for piece in pieces:
            o, n = piece[0], piece[1]
            if o + n <= lo or o >= hi:
                continue
            if o < lo or o + n > hi:
                raise errors.LifetimeError(f"dma_iova_unlink: [{lo:#x}, {hi:#x}) cuts the bounced piece "
                                           f"[{o:#x}, +{n:#x}): unlink it whole")
            inside.append(piece)
        if not inside:
            return
        pool = _pool(self.device)
        for _o, _n, tlb, link_dir in inside:
            _bounce_out(self.device, pool, tlb, link_dir if d is None else d, a)
        self._bounces = [p for p in pieces if p not in inside]

    def free(self) -> None:
        """``dma_iova_free()``: give the reservation back now (nothing may
        be linked: LifetimeError otherwise)."""
        dom = self._need("free")
        if self.linked_nbytes:
            raise errors.LifetimeError(f"dma_iova_free: {self.linked_nbytes:#x} bytes are still linked")
        dom.free_iova(self.addr - self._offset, self._reserved, _cpu(self.device))
        self._end()

    def _end(self) -> None:
        self._live = False

    def _owns(self) -> bool:
        return bool(self._live)

    def close(self) -> None:
        """Give everything back: unlink what is still linked (bounced
        pieces go back by the direction they were linked with) and free
        the reservation.  Nothing happens on a state that already ended
        (destroyed, freed, or without IOVA)."""
        if self._live:
            if self.linked_nbytes:
                # Bounced pieces go back by the direction they were linked
                # with (a TO_DEVICE piece is not copied back).
                linked = [(s, e - s) for s, e in self._linked]
                for o, n in linked:
                    self._unlink_bounces(o, o + n, None, DmaAttrs(0))
                if len(linked) == 1 and linked[0][0] == 0:
                    self.destroy(linked[0][1], DmaDirection.BIDIRECTIONAL)
                    return
                for o, n in linked:
                    self.unlink(o, n, DmaDirection.BIDIRECTIONAL)
            self.free()

    def __repr__(self) -> str:
        if not self.uses_iova:
            return f"<IovaState {self.device.name}: no IOVA (use dma_map_phys)>"
        state = "live" if self._live else "destroyed"
        return (f"<IovaState {self.device.name} addr={self.addr:#x} size={self.size:#x} "
                f"linked={self.linked_nbytes:#x} {state}{' swiotlb' if self.uses_swiotlb else ''}>")
