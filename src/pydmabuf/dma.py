"""The DMA API a driver calls (``kernel/dma/mapping.c``): scatterlists and
single ranges, dispatched to dma-direct or dma-iommu.

* :func:`dma_map_sgtable` / :func:`dma_unmap_sgtable`: ``iommu_dma_map_sg``
  (one IOVA range for the whole table, segments merged within the device's
  ``max_segment_size`` and segment boundary) when the device is behind an
  IOMMU, ``dma_direct_map_sg`` (one segment per entry, swiotlb bounces for
  what the device cannot reach) otherwise.
* :func:`dma_map_phys` / :func:`dma_unmap_phys`: one physical range, with
  :attr:`DmaAttrs.MMIO` for peer memory reached through the host bridge;
  :func:`dma_map_phys_many` / :class:`PhysBatch`: many at once.
* The record of live single mappings follows dma-debug
  (``kernel/dma/debug.c``): an unmap must match a map.

Re-exported from the modules below (their old import path): the two-step
IOVA API :class:`~pydmabuf.dma_iommu.IovaState`, the device accesses
:func:`~pydmabuf.devaccess.device_read` / ``device_write`` /
``accessor``, and :func:`~pydmabuf.pci.p2p_context`.  The dma-buf helper
``dma_buf_phys_vec_to_sgt`` lives in :mod:`pydmabuf.dma_buf_mapping` (and
``pydmabuf.dma_buf_phys_vec_to_sgt``).

Errors carry the kernel's codes: EINVAL (bad or unaligned use), ENOMEM (out
of IOVA space or bounce slots), EIO (a segment the device cannot reach and
nothing to bounce through), EREMOTEIO (peer memory the device cannot
reach).  Breaking the API's rules (unmapping what is not mapped, with
another device or direction, using a destroyed IOVA state) raises
:class:`~pydmabuf.errors.LifetimeError`, as ``CONFIG_DMA_API_DEBUG`` would
report it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from pydmabuf import _core, _dma_api, access, dma_direct, errors
from pydmabuf._args import _ATTR_TYPES, _DIR_ATTRS, _DIR_TYPES, _LINK_ARGS, _attrs, _bad_range, _dir_attrs, _need_int
from pydmabuf._args import _dir as _dir  # dmabuf.py parses directions through this module
from pydmabuf._core import IommuDomain, SgTable
from pydmabuf._dma_api import SgMapping
from pydmabuf._lifecycle import Owner
from pydmabuf._types import DMA_MAPPING_ERROR, PAGE_SIZE, DmaAttrs, DmaDirection
from pydmabuf.devaccess import accessor, device_read, device_write
from pydmabuf.device import Device, _need_device
from pydmabuf.dma_iommu import IovaState, _cpu, _prot
from pydmabuf.pci import p2p_context
from pydmabuf.swiotlb import _bounce_in, _bounce_out, _bounced_through, _pool, _swiotlb_map

log = logging.getLogger(__name__)

__all__ = [
    "DmaAttrs",
    "dma_map_sgtable",
    "dma_unmap_sgtable",
    "dma_sync_sgtable_for_cpu",
    "dma_sync_sgtable_for_device",
    "dma_map_phys",
    "dma_unmap_phys",
    "dma_map_phys_many",
    "dma_unmap_phys_many",
    "PhysBatch",
    "IovaState",
    "device_read",
    "device_write",
    "accessor",
    "p2p_context",
]

G = PAGE_SIZE
GMASK = G - 1


def _mapped_domain(device: Device) -> IommuDomain:
    """The domain an IOMMU mapping of ``device`` was made in: its current
    one (a group moved to another domain under a live mapping is the
    caller's bug, and fails in the call that gets None)."""
    return cast(IommuDomain, device.domain)


def _need_table(table: Any, what: str) -> SgTable:
    if not isinstance(table, SgTable):
        raise TypeError(f"{what}: table must be an SgTable, not {type(table).__name__}")
    return table


# ------------------------------------------------------------ scatterlists


def _map_sgtable(device: Device, table: SgTable, direction: DmaDirection | int, attrs: int) -> int:
    """dma_map_sgtable()'s general path (the compiled entry,
    :func:`pydmabuf._dma_api.dma_map_sgtable`, tried the common case)."""
    # One look-up gives the parsed direction, attributes and IOMMU prot
    # (the list-free calls' cache), for arguments of exactly these types.
    hit = _LINK_ARGS.get((direction, attrs, device.coherent)) if type(device) is Device \
        and type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES else None
    if hit is not None:
        d, a, prot = hit
    else:
        d, a = _dir_attrs(direction, attrs)
        prot = -1
    if type(device) is not Device or type(table) is not SgTable:
        _need_device(device, "dma_map_sgtable")
        _need_table(table, "dma_map_sgtable")
    if table.orig_nents == 0:
        raise errors.InvalidArgument("dma_map_sgtable: the table has no CPU entries (a DMA-only table)")
    g = device.iommu_group
    dom = g.domain if g is not None else None  # device.domain, without the property call
    m = SgMapping(device, d, a, "direct" if dom is None else "iommu-swiotlb" if device.untrusted else "iommu")
    # The record claims the table at once (two threads mapping one table:
    # one is told Busy); a failure below gives it back.
    held = _dma_api.claim(table, m)
    if held is not None:
        raise errors.Busy(f"dma_map_sgtable: the table is already mapped by {getattr(held, 'device_name', held)}")
    try:
        ctx = p2p_context(device)
        if dom is None:
            m.bounces = dma_direct.map_sg(device, table, d, a, ctx, m)
        elif m.kind == "iommu-swiotlb":
            _map_sg_iommu_swiotlb(device, table, m)
        else:
            if prot < 0:
                prot = _prot(device, d, a)
                if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES and type(device.coherent) is bool:
                    _LINK_ARGS[(direction, attrs, device.coherent)] = (d, a, prot)
            nents, iova, ilen, p32 = _core.map_sg_iommu(
                table, dom, device.dma_limit, device.dma_get_seg_boundary(), device.dma_get_max_seg_size(),
                device.prefer_32bit_iova, _cpu(device), prot, ctx, m)
            device.prefer_32bit_iova = p32
            m.iova, m.iova_nbytes = iova, ilen
            return int(nents)  # the core set table.nents to it
    except BaseException:
        if table.mapping is m:
            table.mapping = None
        raise
    return int(table.nents)



def _map_sg_iommu_swiotlb(device: Device, table: SgTable, m: SgMapping) -> None:
    """iommu_dma_map_sg_swiotlb(): an untrusted device maps every entry on
    its own (own IOVA, sub-granule buffers bounced); no merging.  The
    singles go into ``m``, the record that claimed the table."""
    d, a = m.direction, m.attrs
    slots = np.flatnonzero((table.entries["page_link"] & np.uint64(1)) == 0)[: table.orig_nents]
    phys, lens = dma_direct._entry_phys(table, slots)
    dmas = []
    try:
        for slot, p, n in zip(slots.tolist(), phys.tolist(), lens.tolist()):
            dma = dma_map_phys(device, p, n, d, a)
            m.singles.append((slot, dma, n))
            dmas.append(dma)
    except errors.DmaBufError as err:
        for _, dma, n in m.singles:
            dma_unmap_phys(device, dma, n, d, a | DmaAttrs.SKIP_CPU_SYNC)
        _core.sg_clear_dma(table)
        if isinstance(err, errors.IommuFault):  # the access gate refused a bounce: its fault as it is
            raise
        raise errors.IOFailure("dma_map_sgtable: mapping an entry of the untrusted device failed") from None
    if m.singles:
        _core.sg_set_dma(table, np.asarray(slots, dtype=np.uint64), np.asarray(dmas, dtype=np.uint64))
        e = table.entries
        e["dma_length"][slots] = e["length"][slots]
        e["dma_flags"][slots[0]] |= _core.SG_DMA_SWIOTLB


def _unmap_sgtable(device: Device, table: SgTable, direction: DmaDirection | int, attrs: int) -> None:
    """dma_unmap_sgtable()'s general path (after the compiled entry's
    common case)."""
    da = _DIR_ATTRS.get((direction, attrs)) if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES else None
    d, a = da if da is not None else _dir_attrs(direction, attrs)
    if type(device) is not Device or type(table) is not SgTable:
        _need_device(device, "dma_unmap_sgtable")
        _need_table(table, "dma_unmap_sgtable")
    m = table.mapping
    if not isinstance(m, SgMapping):
        raise errors.LifetimeError("dma_unmap_sgtable: the table is not mapped")
    if m.device is not device:
        raise errors.LifetimeError(f"dma_unmap_sgtable: mapped by {m.device.name}, unmapped by {device.name}")
    if m.direction != d:
        raise errors.LifetimeError(f"dma_unmap_sgtable: mapped {m.direction.name}, unmapped {d.name}")
    if m.kind == "direct":
        pool = device.swiotlb
        for _, tlb, _, _ in m.bounces:
            _bounce_out(device, pool, tlb, d, a)
        _core.sg_clear_dma(table)
    elif m.kind == "iommu":
        _core.unmap_sg_iommu(table, _mapped_domain(device), _cpu(device))
    else:
        for _, dma, n in m.singles:
            dma_unmap_phys(device, dma, n, d, a)
        _core.sg_clear_dma(table)
    table.mapping = None


# The entry points are compiled (their common case, a trusted device behind
# an IOMMU, is one C call); they call the general paths above for the rest.
dma_map_sgtable = _dma_api.dma_map_sgtable
dma_unmap_sgtable = _dma_api.dma_unmap_sgtable
_dma_api.bind_sgtable(_map_sgtable, _unmap_sgtable)


def dma_sync_sgtable_for_cpu(device: Device, table: SgTable, direction: DmaDirection | int) -> None:
    """Give the CPU the device's writes: copy bounce buffers back
    (FROM_DEVICE / BIDIRECTIONAL); slots stay taken."""
    d = _dir(direction)
    _need_device(device, "dma_sync_sgtable_for_cpu")
    m = _need_table(table, "dma_sync_sgtable_for_cpu").mapping
    if not isinstance(m, SgMapping) or m.device is not device:
        raise errors.LifetimeError("dma_sync_sgtable_for_cpu: the table is not mapped for this device")
    for _, tlb, _, _ in m.bounces:
        _bounce_out(device, device.swiotlb, tlb, d, 0, free=False)


def dma_sync_sgtable_for_device(device: Device, table: SgTable, direction: DmaDirection | int) -> None:
    """Give the device the CPU's writes: copy into bounce buffers
    (TO_DEVICE / BIDIRECTIONAL)."""
    d = _dir(direction)
    _need_device(device, "dma_sync_sgtable_for_device")
    m = _need_table(table, "dma_sync_sgtable_for_device").mapping
    if not isinstance(m, SgMapping) or m.device is not device:
        raise errors.LifetimeError("dma_sync_sgtable_for_device: the table is not mapped for this device")
    if d in (DmaDirection.TO_DEVICE, DmaDirection.BIDIRECTIONAL):
        for _, tlb, orig, size in m.bounces:
            pool = _bounced_through(device, device.swiotlb)
            access.bounce_copy(accessor(device), tlb, orig, size)
            pool.bounced_to_device += size


# -------------------------------------------------------------- one range


@dataclass(eq=False)
class _Single:
    phys: int
    size: int
    direction: DmaDirection
    attrs: DmaAttrs
    kind: str  # "direct", "iommu"
    tlb: int | None = None


def _singles(device: Device) -> dict[int, list[_Single]]:
    """The device's live single mappings: DMA address -> the mappings at
    that address, oldest first (``device._single_maps``)."""
    s = getattr(device, "_single_maps", None)
    if s is None:
        s = device._single_maps = {}  # type: ignore[attr-defined]  # this module's registry, kept on the device
    return s


#: Guards every device's single-mapping registry: a bucket's check and its
#: change happen together.
_singles_lock = threading.Lock()


def _record(device: Device, dma: int, single: _Single) -> None:
    """dma-debug's ``add_dma_entry()``: every mapping is an entry of its
    own, hashed by device and DMA address into a bucket list; identical
    live mappings (the same range mapped twice by a device without an
    IOMMU) are legal and each is one entry."""
    with _singles_lock:
        _singles(device).setdefault(dma, []).append(single)


def _match(device: Device, dma_addr: int, nbytes: int, d: DmaDirection, a: DmaAttrs,
           taken: dict[int, int] | None = None) -> _Single:
    """The entry an unmap of ``[dma_addr, +nbytes)`` consumes: as dma-debug's
    ``bucket_find_exact()`` / ``check_unmap()``, the first live entry of
    the bucket with the same size, direction and MMIO attribute.  A bucket
    with no such entry is a LifetimeError naming what is there (nothing,
    another size or direction, other attributes).  ``taken`` counts
    entries of a bucket already claimed by an earlier row of the same
    call: they are skipped.  Call with ``_singles_lock`` held."""
    bucket = _singles(device).get(dma_addr, [])
    skip = taken.get(dma_addr, 0) if taken is not None else 0
    mmio = bool(a & DmaAttrs.MMIO)
    first: _Single | None = None
    for s in bucket:
        if s.size == nbytes and s.direction == d and bool(s.attrs & DmaAttrs.MMIO) == mmio:
            if skip:
                skip -= 1
                continue
            if taken is not None:
                taken[dma_addr] = taken.get(dma_addr, 0) + 1
            return s
        first = first or s
    if first is None:
        raise errors.LifetimeError(f"dma_unmap_phys: {device.name} has no mapping at {dma_addr:#x}"
                                   + (" left (every one is unmapped already)" if bucket else ""))
    if first.size != nbytes or first.direction != d:
        raise errors.LifetimeError(f"dma_unmap_phys: {dma_addr:#x} was mapped {first.size:#x} bytes "
                                   f"{first.direction.name}, unmapped {nbytes:#x} bytes {d.name}")
    raise errors.LifetimeError(f"dma_unmap_phys: {dma_addr:#x} mapped and unmapped with different MMIO attributes")


def _unrecord(device: Device, dma_addr: int, single: _Single) -> None:
    """dma-debug's ``hash_bucket_del()`` of one entry.  Call with
    ``_singles_lock`` held."""
    reg = _singles(device)
    bucket = reg[dma_addr]
    bucket.remove(single)  # by identity (_Single compares as an object)
    if not bucket:
        del reg[dma_addr]


def dma_map_phys(device: Device, phys: int, nbytes: int, direction: DmaDirection | int,
                 attrs: int = 0) -> int:
    """``dma_map_phys()``: the DMA address of ``[phys, phys + nbytes)``.

    With :attr:`DmaAttrs.MMIO` the range is peer memory: never bounced, no
    dma_range_map translation on direct devices, ``IOMMU_MMIO`` in the PTEs.
    Where the kernel returns DMA_MAPPING_ERROR this raises OutOfMemory
    (what ``dma_mapping_error()`` callers turn it into), with the reason.
    """
    d = _dir(direction)
    a = _attrs(attrs)
    if type(device) is not Device:  # the common case without a call
        _need_device(device, "dma_map_phys")
    if not isinstance(phys, int) or not isinstance(nbytes, int):
        raise TypeError("phys and nbytes must be ints")
    if _bad_range(phys, nbytes):
        raise errors.InvalidArgument(f"dma_map_phys: bad range [{phys:#x}, +{nbytes:#x})")
    mmio = bool(a & DmaAttrs.MMIO)
    dom = device.domain
    if dom is None:
        pool = device.swiotlb
        if device.force_swiotlb:
            if mmio:
                raise errors.OutOfMemory(f"dma_map_phys: {device.name} must bounce and MMIO cannot bounce")
            if pool is None:  # swiotlb_tbl_map_single() with no io_tlb_mem: DMA_MAPPING_ERROR
                raise errors.OutOfMemory(f"dma_map_phys: {device.name} must bounce and has no swiotlb pool")
            dma = _swiotlb_map(device, pool, phys, nbytes, d, a)
            _record(device, dma, _Single(phys, nbytes, d, a, "direct", pool.tlb_of(dma, device)))
            return dma
        if mmio:
            if not device.dma_capable(phys, nbytes):
                raise errors.OutOfMemory(f"dma_map_phys: MMIO {phys:#x} is beyond {device.name}'s DMA mask")
            _record(device, phys, _Single(phys, nbytes, d, a, "direct"))
            return phys
        dma = device.phys_to_dma(phys)
        if device.dma_capable(dma, nbytes):
            _record(device, dma, _Single(phys, nbytes, d, a, "direct"))
            return dma
        if pool is None:
            raise errors.OutOfMemory(f"dma_map_phys: {phys:#x} is out of {device.name}'s reach and it has "
                                     "no bounce buffer")
        dma = _swiotlb_map(device, pool, phys, nbytes, d, a)
        _record(device, dma, _Single(phys, nbytes, d, a, "direct", pool.tlb_of(dma, device)))
        return dma
    # iommu_dma_map_phys()
    tlb = None
    bounce_pool = None
    target = phys
    if not mmio and device.untrusted and ((phys | nbytes) & GMASK):
        bounce_pool = _pool(device)
        if bounce_pool is None:
            raise errors.OutOfMemory(f"dma_map_phys: {device.name} must bounce and has no pool")
        tlb = _bounce_in(device, bounce_pool, phys, nbytes, d, a, align_mask=GMASK)
        target = tlb
    elif mmio and device.untrusted and ((phys | nbytes) & GMASK):
        raise errors.OutOfMemory("dma_map_phys: unaligned MMIO on a device that must bounce")
    try:
        dma, p32 = _core.map_single(dom, target, nbytes, _prot(device, d, a), device.dma_limit,
                                     device.prefer_32bit_iova, _cpu(device))
    except errors.DmaBufError as e:
        if bounce_pool is not None and tlb is not None:
            bounce_pool.free(tlb)
        if isinstance(e, errors.OutOfRange):
            # __iommu_dma_map() turns iommu_map()'s -ERANGE into
            # DMA_MAPPING_ERROR like every other failure: ENOMEM here.
            raise errors.OutOfMemory(e.strerror) from None
        raise
    device.prefer_32bit_iova = bool(p32)
    _record(device, dma, _Single(phys, nbytes, d, a, "iommu", tlb))
    return int(dma)


def dma_unmap_phys(device: Device, dma_addr: int, nbytes: int, direction: DmaDirection | int,
                   attrs: int = 0) -> None:
    """``dma_unmap_phys()``: size, direction and attributes must be those
    of the map (LifetimeError otherwise, as DMA-API debugging reports).

    Each live mapping is its own entry, as in dma-debug: a device without
    an IOMMU that maps the same range twice gets the same DMA address
    twice, and each unmap consumes exactly one of the two."""
    d = _dir(direction)
    a = _attrs(attrs)
    if type(device) is not Device:
        _need_device(device, "dma_unmap_phys")
    if type(dma_addr) is not int or type(nbytes) is not int:
        _need_int("dma_unmap_phys", dma_addr=dma_addr, nbytes=nbytes)
    # The entry is claimed (taken out of its bucket) under the lock, so two
    # threads unmapping two identical mappings consume one entry each; a
    # teardown that fails puts it back.
    with _singles_lock:
        s = _match(device, dma_addr, nbytes, d, a)
        _unrecord(device, dma_addr, s)
    try:
        if s.kind == "iommu":
            _mapped_domain(device).unmap_dma(dma_addr, nbytes, _cpu(device))
            if s.tlb is not None:
                _bounce_out(device, _pool(device), s.tlb, d, a)
        elif s.tlb is not None:
            _bounce_out(device, device.swiotlb, s.tlb, d, a)
    except BaseException:
        _record(device, dma_addr, s)
        raise


@dataclass(eq=False)
class PhysBatch(Owner):
    """The mappings of one :func:`dma_map_phys_many` call: what a driver
    that maps range by range keeps per segment, ``{dma_addr, len}``.

    ``dma_ranges`` is an (N, 2) u64 array of (DMA address, nbytes) rows in
    the order of the input; ``metadata_nbytes`` is 16 bytes per row.
    Give it back with :func:`dma_unmap_phys_many` (or ``close()``, or a
    ``with`` block); a batch collected while still mapped warns with a
    ResourceWarning.
    """

    device: Device
    direction: DmaDirection
    attrs: DmaAttrs
    dma_ranges: np.ndarray
    kind: str  # "iommu", "direct" or "singles" (one dma_map_phys each, for bounces)
    live: bool = True

    @property
    def metadata_nbytes(self) -> int:
        return 16 * len(self.dma_ranges)

    def _owns(self) -> bool:
        return self.live

    def close(self) -> None:
        """:func:`dma_unmap_phys_many` with the batch's own direction and
        attributes; nothing if it was unmapped already."""
        if self.live:
            dma_unmap_phys_many(self)

    def __repr__(self) -> str:
        return (f"<PhysBatch {self.device.name} {len(self.dma_ranges)} range(s) {self.kind}"
                f"{'' if self.live else ' unmapped'}>")


def dma_map_phys_many(device: Device, ranges: Any, direction: DmaDirection | int, attrs: int = 0) -> PhysBatch:
    """:func:`dma_map_phys` for every (phys, nbytes) row of ``ranges``, in
    one call: the loop a driver runs when it maps segment by segment (the
    block layer's fallback when it cannot use one IOVA range).

    Behind an IOMMU each row gets its own IOVA (``__iommu_dma_map()`` per
    row, in the core, without the GIL); with direct DMA the addresses are
    computed in bulk.  Rows that must bounce (an untrusted device's
    unaligned RAM, memory out of a direct device's reach, forced swiotlb)
    take the single-range path one by one.  All or nothing: a failure
    unmaps what this call mapped and raises as :func:`dma_map_phys` does.
    """
    _need_device(device, "dma_map_phys_many")
    d = _dir(direction)
    a = _attrs(attrs)
    rows = _core.u64_pairs(ranges, "dma_map_phys_many ranges")
    if len(rows) and ((rows[:, 1] == 0).any() or (rows[:, 0] + (rows[:, 1] - np.uint64(1)) < rows[:, 0]).any()):
        raise errors.InvalidArgument("dma_map_phys: an empty range, or one that wraps past 2**64 - 1")
    mmio = bool(a & DmaAttrs.MMIO)
    dom = device.domain
    out = rows.copy()
    if dom is not None and not (device.untrusted and ((rows[:, 0] | rows[:, 1]) & np.uint64(GMASK)).any()):
        dmas, p32 = _core.map_single_many(dom, rows, _prot(device, d, a), device.dma_limit,
                                           device.prefer_32bit_iova, _cpu(device))
        device.prefer_32bit_iova = bool(p32)
        out[:, 0] = dmas
        return PhysBatch(device, d, a, out, "iommu")
    if dom is None and not device.force_swiotlb:
        if mmio or not device.dma_ranges:
            dmas = rows[:, 0].copy()
        else:
            dmas = np.full(len(rows), DMA_MAPPING_ERROR, dtype=np.uint64)
            for cpu_start, dma_start, size in dma_direct.dma_range_map(device).reshape(-1, 3):  # a few windows
                inside = (rows[:, 0] >= cpu_start) & (rows[:, 0] - cpu_start < size)
                dmas = np.where(inside & (dmas == np.uint64(DMA_MAPPING_ERROR)), rows[:, 0] - cpu_start + dma_start,
                                dmas)
        ok = (dmas != np.uint64(DMA_MAPPING_ERROR)) & (dmas + (rows[:, 1] - np.uint64(1)) <= np.uint64(device.dma_limit))
        if ok.all():
            out[:, 0] = dmas
            return PhysBatch(device, d, a, out, "direct")
    # Bounces: one range at a time, as dma_map_phys() would.
    done: list[tuple[int, int]] = []
    try:
        for p, n in rows.tolist():
            done.append((dma_map_phys(device, p, n, d, a), n))
    except errors.DmaBufError:
        for dma, n in done:
            dma_unmap_phys(device, dma, n, d, a | DmaAttrs.SKIP_CPU_SYNC)
        raise
    out[:, 0] = [dma for dma, _ in done]
    return PhysBatch(device, d, a, out, "singles")


def dma_unmap_phys_many(batch: PhysBatch, direction: DmaDirection | int | None = None, attrs: int | None = None) -> None:
    """Undo :func:`dma_map_phys_many` (every row; direction and attributes
    must be those of the map: LifetimeError otherwise, as for a double
    unmap)."""
    if not isinstance(batch, PhysBatch):
        raise TypeError("batch must be a PhysBatch")
    if not batch.live:
        raise errors.LifetimeError(f"dma_unmap_phys: {batch!r} was unmapped already")
    if direction is not None and _dir(direction) != batch.direction:
        raise errors.LifetimeError(f"dma_unmap_phys: mapped {batch.direction.name}, unmapped {_dir(direction).name}")
    if attrs is not None and bool(_attrs(attrs) & DmaAttrs.MMIO) != bool(batch.attrs & DmaAttrs.MMIO):
        raise errors.LifetimeError("dma_unmap_phys: mapped and unmapped with different MMIO attributes")
    dev = batch.device
    if batch.kind == "iommu":
        _core.unmap_single_many(_mapped_domain(dev), batch.dma_ranges, _cpu(dev))
    elif batch.kind == "singles":
        rows = batch.dma_ranges.tolist()
        taken: dict[int, int] = {}
        with _singles_lock:  # all or nothing: every row is still live before the first goes
            for dma, n in rows:
                _match(dev, dma, n, batch.direction, batch.attrs, taken)
        for dma, n in rows:
            dma_unmap_phys(dev, dma, n, batch.direction, batch.attrs)
    batch.live = False
