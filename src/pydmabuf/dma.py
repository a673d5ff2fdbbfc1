"""The DMA API a driver calls: scatterlists, single ranges, the two-step
IOVA API, and device accesses through the result.

* :func:`dma_map_sgtable` / :func:`dma_unmap_sgtable`: ``iommu_dma_map_sg``
  (one IOVA range for the whole table, segments merged within the device's
  ``max_segment_size`` and segment boundary) when the device is behind an
  IOMMU, ``dma_direct_map_sg`` (one segment per entry, swiotlb bounces for
  what the device cannot reach) otherwise.
* :func:`dma_map_phys` / :func:`dma_unmap_phys`: one physical range, with
  :attr:`DmaAttrs.MMIO` for peer memory reached through the host bridge.
* :class:`IovaState`: ``dma_iova_try_alloc`` / ``link`` / ``sync`` /
  ``unlink`` / ``destroy`` / ``free``, the list-free two-step API.
* :func:`dma_buf_phys_vec_to_sgt` / :func:`dma_buf_free_sgt`: the dma-buf
  helper that turns an exporter's MMIO ranges into a DMA-only table.
* :func:`device_read` / :func:`device_write` (also ``Device.dma_read`` /
  ``dma_write``): what the device sees at a DMA address.

Errors carry the kernel's codes: EINVAL (bad or unaligned use), ENOMEM (out
of IOVA space or bounce slots), EIO (a segment the device cannot reach and
nothing to bounce through), EREMOTEIO (peer memory the device cannot
reach).  Breaking the API's rules (unmapping what is not mapped, with
another device or direction, using a destroyed IOVA state) raises
:class:`~pydmabuf.errors.LifetimeError`, as ``CONFIG_DMA_API_DEBUG`` would
report it.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pydmabuf import _core, access, errors
from pydmabuf._core import SgTable
from pydmabuf._types import PAGE_SIZE, DmaDirection, IommuProt
from pydmabuf.machine import DMA_MAPPING_ERROR, U64_MAX, Bar, Device, HostBridge, P2pProvider, P2PMapType, SwiotlbPool

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
    "dma_buf_phys_vec_to_sgt",
    "dma_buf_free_sgt",
    "device_read",
    "device_write",
    "p2p_context",
]

G = PAGE_SIZE
GMASK = G - 1
_SG_LINK_MASK = ~np.uint64(3)


class DmaAttrs(enum.IntFlag):
    """``DMA_ATTR_*``."""

    NONE = 0
    WEAK_ORDERING = 1 << 1
    WRITE_COMBINE = 1 << 2
    NO_KERNEL_MAPPING = 1 << 4
    SKIP_CPU_SYNC = 1 << 5
    FORCE_CONTIGUOUS = 1 << 6
    ALLOC_SINGLE_PAGES = 1 << 7
    NO_WARN = 1 << 8
    PRIVILEGED = 1 << 9
    #: Not RAM: no swiotlb, no cache maintenance, IOMMU_MMIO in the PTEs.
    MMIO = 1 << 10


#: The directions one can map with, by value (a dict lookup is the fast path).
_DIRS: dict[int, DmaDirection] = {int(d): d for d in DmaDirection if d != DmaDirection.NONE}


def _dir(direction: Any) -> DmaDirection:
    if type(direction) is int or type(direction) is DmaDirection:
        d = _DIRS.get(direction)
        if d is not None:
            return d
    if not isinstance(direction, int):  # DmaDirection(0.0) would be BIDIRECTIONAL
        raise errors.InvalidArgument(f"{direction!r} is not a DMA direction")
    try:
        d = DmaDirection(direction)
    except ValueError:
        raise errors.InvalidArgument(f"{direction!r} is not a DMA direction") from None
    if d == DmaDirection.NONE:
        raise errors.InvalidArgument("DMA_NONE is not a direction one can map with")
    return d


_ATTRS: dict[int, DmaAttrs] = {}


def _attrs(attrs: Any) -> DmaAttrs:
    a = _ATTRS.get(attrs) if type(attrs) is int or type(attrs) is DmaAttrs else None
    if a is not None:
        return a
    if not isinstance(attrs, int) or attrs < 0 or attrs >= 1 << 11:
        raise errors.InvalidArgument(f"{attrs!r} is not a set of DMA attributes")
    a = _ATTRS[int(attrs)] = DmaAttrs(attrs)
    return a


def _need_device(device: Any, what: str) -> Device:
    if not isinstance(device, Device):
        raise TypeError(f"{what}: device must be a pydmabuf Device, not {type(device).__name__}")
    return device


def _need_table(table: Any, what: str) -> SgTable:
    if not isinstance(table, SgTable):
        raise TypeError(f"{what}: table must be an SgTable, not {type(table).__name__}")
    return table


def _need_int(what: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int):
            raise TypeError(f"{what}: {name} must be an int, not {type(v).__name__}")


_tls = threading.local()


def _cpu(device: Device) -> int:
    """The CPU this thread stands for (per-CPU IOVA caches, flush queues):
    its native thread id, read once per thread."""
    g = device.iommu_group
    n = g.iommu.ncpus if g is not None else 1
    try:
        tid: int = _tls.tid
    except AttributeError:
        tid = _tls.tid = threading.get_native_id()
    return tid % n


_PROTS: dict[tuple[bool, int, int], int] = {}

#: (direction, attrs, device.coherent) -> (_dir(direction), _attrs(attrs),
#: _prot(...)) for the list-free calls, filled only for arguments of exactly
#: these types (a float 1.0 hashes like 1 and must still be refused).
_DIR_TYPES = (int, DmaDirection)
_ATTR_TYPES = (int, DmaAttrs)
_LINK_ARGS: dict[tuple[int, int, bool], tuple[DmaDirection, DmaAttrs, int]] = {}
_DIR_ATTRS: dict[tuple[int, int], tuple[DmaDirection, DmaAttrs]] = {}


def _dir_attrs(direction: Any, attrs: Any) -> tuple[DmaDirection, DmaAttrs]:
    """``(_dir(direction), _attrs(attrs))``, remembered for arguments of
    exactly the int / enum types (the hot paths look the pair up first)."""
    da = (_dir(direction), _attrs(attrs))
    if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES:
        _DIR_ATTRS[(direction, attrs)] = da
    return da


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


def _pool(device: Device) -> SwiotlbPool | None:
    if device.swiotlb is not None:
        return device.swiotlb
    return next(iter(device.machine.swiotlb_pools.values()), None)


def p2p_context(device: Device) -> _core.P2pContext:
    """The P2P routes from ``device`` to every BAR of its machine, for the
    walks (cached; rebuilt when the machine gains ranges)."""
    m = device.machine
    cache: tuple[int, _core.P2pContext] | None = getattr(device, "_p2p_ctx", None)
    if cache is not None and cache[0] == len(m._owners):
        return cache[1]
    n = len(m._owners)
    states = np.full(n, int(P2PMapType.NONE), dtype=np.uint64)
    offs = np.zeros(n, dtype=np.uint64)
    for i, o in enumerate(m._owners):
        if isinstance(o, Bar):
            states[i] = int(m.p2p_map_type(o.owner, device))
            offs[i] = o.bus_offset & U64_MAX
    ctx = _core.P2pContext(m.address_map, states, offs)
    device._p2p_ctx = (n, ctx)  # type: ignore[attr-defined]  # this module's cache, kept on the device
    return ctx


# ------------------------------------------------------------ scatterlists


@dataclass(eq=False)
class SgMapping:
    """What a mapped table remembers (``table.mapping``)."""

    device: Device
    direction: DmaDirection
    attrs: DmaAttrs
    kind: str  # "direct", "iommu", "iommu-swiotlb"
    iova: int = 0
    iova_nbytes: int = 0
    bounces: list[tuple[int, int, int, int]] = field(default_factory=list)  # (slot, tlb, orig, size)
    singles: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, dma, size)

    @property
    def device_name(self) -> str:
        return self.device.name


def _entry_phys(table: SgTable, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = table.entries[slots]
    return (e["page_link"] & _SG_LINK_MASK) + e["offset"].astype(np.uint64), e["length"].astype(np.uint64)


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


def dma_map_sgtable(device: Device, table: SgTable, direction: DmaDirection | int,
                    attrs: int = 0) -> int:
    """``dma_map_sgtable()``: map the ``orig_nents`` CPU entries for ``device``.

    Sets ``table.nents`` to the number of DMA segments and returns it; the
    DMA side is read with :meth:`SgTable.dma_ranges`.

    Raises
    ------
    InvalidArgument
        (EINVAL) a DMA-only table, a bad direction, or a layout the IOMMU
        cannot map.
    OutOfMemory
        (ENOMEM) out of IOVA space.
    IOFailure
        (EIO) a segment out of the device's reach with no bounce buffer
        able to take it.
    RemoteIO
        (EREMOTEIO) peer memory the device cannot reach.
    Busy
        (EBUSY) the table is already mapped.

    Examples
    --------
    >>> import numpy as np
    >>> from pydmabuf import DmaDirection, Machine, SgTable
    >>> gpu = Machine.default().device("gpu0")
    >>> t = SgTable.from_pages(np.array([0x100000, 0x100001, 0x100007], dtype=np.uint64))
    >>> dma_map_sgtable(gpu, t, DmaDirection.TO_DEVICE)       # nents: one IOVA segment
    1
    >>> dma_unmap_sgtable(gpu, t, DmaDirection.TO_DEVICE)
    """
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
    if table.mapping is not None:
        raise errors.Busy(f"dma_map_sgtable: the table is already mapped by {table.mapping.device_name}")
    ctx = p2p_context(device)
    g = device.iommu_group
    dom = g.domain if g is not None else None  # device.domain, without the property call
    if dom is None:
        m = _map_sg_direct(device, table, d, a, ctx)
    elif device.untrusted:
        m = _map_sg_iommu_swiotlb(device, table, d, a)
    else:
        if prot < 0:
            prot = _prot(device, d, a)
            if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES and type(device.coherent) is bool:
                _LINK_ARGS[(direction, attrs, device.coherent)] = (d, a, prot)
        nents, iova, ilen, p32 = _core._map_sg_iommu(
            table, dom, device.dma_limit, device.dma_get_seg_boundary(), device.dma_get_max_seg_size(),
            device.prefer_32bit_iova, _cpu(device), prot, ctx)
        device.prefer_32bit_iova = p32
        table.mapping = SgMapping(device, d, a, "iommu", iova, ilen)
        return nents  # the core set table.nents to it
    table.mapping = m
    return int(table.nents)


def _dma_range_map(device: Device) -> np.ndarray:
    """The device's ``dma_range_map`` as flat u64 (cpu_start, dma_start,
    size) triples; a window of 2**64 bytes (a plain offset) is clamped to
    2**64 - 1, which no u64 comparison can tell apart."""
    return np.array([[r.cpu_start, r.dma_start, min(r.size, U64_MAX)] for r in device.dma_ranges],
                    dtype=np.uint64).reshape(-1)


def _map_sg_direct(device: Device, table: SgTable, d: DmaDirection, a: DmaAttrs,
                   ctx: _core.P2pContext) -> SgMapping:
    pool = device.swiotlb
    slots = _core._map_sg_direct(table, device.dma_limit, _dma_range_map(device), device.force_swiotlb, pool is not None,
                                 int(a), ctx)
    m = SgMapping(device, d, a, "direct")
    if len(slots):
        if pool is None:
            # Only force_swiotlb without a pool gets here: with no io_tlb_mem
            # swiotlb_tbl_map_single() fails, so dma_direct_map_sg() is -EIO.
            _core._clear_dma(table)
            raise errors.IOFailure(f"dma_map_sgtable: {device.name} must bounce and has no swiotlb pool")
        phys, lens = _entry_phys(table, slots)
        dmas = []
        try:
            for slot, p, n in zip(slots.tolist(), phys.tolist(), lens.tolist()):
                dma = _swiotlb_map(device, pool, p, n, d, a)
                m.bounces.append((slot, pool.tlb_of(dma, device), p, n))
                dmas.append(dma)
        except errors.DmaBufError as e:
            for _, tlb, _, _ in m.bounces:
                pool.free(tlb)
            _core._clear_dma(table)
            if isinstance(e, errors.IommuFault):  # the access gate refused the bounce: its fault as it is
                raise
            raise errors.IOFailure(f"dma_map_sgtable: {device.name} cannot reach a segment and bouncing "
                                   f"failed: {e.strerror}") from None
        _core._set_dma(table, np.asarray(slots, dtype=np.uint64), np.asarray(dmas, dtype=np.uint64))
    return m


def _map_sg_iommu_swiotlb(device: Device, table: SgTable, d: DmaDirection, a: DmaAttrs) -> SgMapping:
    """iommu_dma_map_sg_swiotlb(): an untrusted device maps every entry on
    its own (own IOVA, sub-granule buffers bounced); no merging."""
    m = SgMapping(device, d, a, "iommu-swiotlb")
    slots = np.flatnonzero((table.entries["page_link"] & np.uint64(1)) == 0)[: table.orig_nents]
    phys, lens = _entry_phys(table, slots)
    dmas = []
    try:
        for slot, p, n in zip(slots.tolist(), phys.tolist(), lens.tolist()):
            dma = dma_map_phys(device, p, n, d, a)
            m.singles.append((slot, dma, n))
            dmas.append(dma)
    except errors.DmaBufError as err:
        for _, dma, n in m.singles:
            dma_unmap_phys(device, dma, n, d, a | DmaAttrs.SKIP_CPU_SYNC)
        _core._clear_dma(table)
        if isinstance(err, errors.IommuFault):  # the access gate refused a bounce: its fault as it is
            raise
        raise errors.IOFailure("dma_map_sgtable: mapping an entry of the untrusted device failed") from None
    if m.singles:
        _core._set_dma(table, np.asarray(slots, dtype=np.uint64), np.asarray(dmas, dtype=np.uint64))
        e = table.entries
        e["dma_length"][slots] = e["length"][slots]
        e["dma_flags"][slots[0]] |= _core.SG_DMA_SWIOTLB
    return m


def dma_unmap_sgtable(device: Device, table: SgTable, direction: DmaDirection | int, attrs: int = 0) -> None:
    """``dma_unmap_sgtable()``: undo :func:`dma_map_sgtable` exactly.

    The IOVA goes back (strict domains) or onto the flush queue (lazy),
    bounce slots are copied back (FROM_DEVICE / BIDIRECTIONAL) and freed,
    and the table's DMA side is cleared (``nents`` back to ``orig_nents``).
    Unmapping a table that is not mapped, or with another device or
    direction than it was mapped with, raises LifetimeError.

    Examples
    --------
    >>> import numpy as np
    >>> from pydmabuf import DmaDirection, Machine, SgTable
    >>> gpu = Machine.default().device("gpu0")
    >>> t = SgTable.from_pages(np.arange(0x100000, 0x100004, dtype=np.uint64))
    >>> n = dma_map_sgtable(gpu, t, DmaDirection.FROM_DEVICE)
    >>> dma_unmap_sgtable(gpu, t, DmaDirection.FROM_DEVICE)
    >>> t.mapping is None
    True
    """
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
        _core._clear_dma(table)
    elif m.kind == "iommu":
        g = device.iommu_group
        _core._unmap_sg_iommu(table, g.domain if g is not None else None, _cpu(device))
    else:
        for _, dma, n in m.singles:
            dma_unmap_phys(device, dma, n, d, a)
        _core._clear_dma(table)
    table.mapping = None


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


def _bad_range(start: int, nbytes: int) -> bool:
    """``[start, start + nbytes)`` is not a byte range the DMA API can
    take: empty, below 0, past 2**64 - 1, or a size that does not fit a
    size_t (2**64, even from 0)."""
    return nbytes <= 0 or nbytes > U64_MAX or start < 0 or start + nbytes - 1 > U64_MAX


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
        dma, p32 = _core._map_single(dom, target, nbytes, _prot(device, d, a), device.dma_limit,
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
            device.domain.unmap_dma(dma_addr, nbytes, _cpu(device))
            if s.tlb is not None:
                _bounce_out(device, _pool(device), s.tlb, d, a)
        elif s.tlb is not None:
            _bounce_out(device, device.swiotlb, s.tlb, d, a)
    except BaseException:
        _record(device, dma_addr, s)
        raise


@dataclass(eq=False)
class PhysBatch:
    """The mappings of one :func:`dma_map_phys_many` call: what a driver
    that maps range by range keeps per segment, ``{dma_addr, len}``.

    ``dma_ranges`` is an (N, 2) u64 array of (DMA address, nbytes) rows in
    the order of the input; ``metadata_nbytes`` is 16 bytes per row.
    Give it back with :func:`dma_unmap_phys_many`.
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
    rows = _core._u64_pairs(ranges, "dma_map_phys_many ranges")
    if len(rows) and ((rows[:, 1] == 0).any() or (rows[:, 0] + (rows[:, 1] - np.uint64(1)) < rows[:, 0]).any()):
        raise errors.InvalidArgument("dma_map_phys: an empty range, or one that wraps past 2**64 - 1")
    mmio = bool(a & DmaAttrs.MMIO)
    dom = device.domain
    out = rows.copy()
    if dom is not None and not (device.untrusted and ((rows[:, 0] | rows[:, 1]) & np.uint64(GMASK)).any()):
        dmas, p32 = _core._map_single_many(dom, rows, _prot(device, d, a), device.dma_limit,
                                           device.prefer_32bit_iova, _cpu(device))
        device.prefer_32bit_iova = bool(p32)
        out[:, 0] = dmas
        return PhysBatch(device, d, a, out, "iommu")
    if dom is None and not device.force_swiotlb:
        if mmio or not device.dma_ranges:
            dmas = rows[:, 0].copy()
        else:
            dmas = np.full(len(rows), DMA_MAPPING_ERROR, dtype=np.uint64)
            for cpu_start, dma_start, size in _dma_range_map(device).reshape(-1, 3):  # a few windows
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
        _core._unmap_single_many(dev.domain, batch.dma_ranges, _cpu(dev))
    elif batch.kind == "singles":
        rows = batch.dma_ranges.tolist()
        taken: dict[int, int] = {}
        with _singles_lock:  # all or nothing: every row is still live before the first goes
            for dma, n in rows:
                _match(dev, dma, n, batch.direction, batch.attrs, taken)
        for dma, n in rows:
            dma_unmap_phys(dev, dma, n, batch.direction, batch.attrs)
    batch.live = False


# ------------------------------------------------------- two-step IOVA API


class IovaState(_core._IovaStateCore):
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
    live in the core (``_core._IovaStateCore``); this class adds directions,
    attributes and the swiotlb bounces of a device that must bounce.
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
        if (type(phys) is not int or type(nbytes) is not int) and \
                (not isinstance(phys, int) or not isinstance(nbytes, int)):
            raise TypeError("phys and nbytes must be ints")
        if dom is None or nbytes <= 0 or nbytes >> 63 or phys < 0:
            return self
        p32 = self._reserve(phys, nbytes, device.dma_limit, device.prefer_32bit_iova)
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
            return self._link(ranges, prot, offset, bool(_all_at_offset))
        rows = _core._u64_pairs(ranges, "dma_iova_link ranges")
        if len(rows) == 0:
            return 0
        _need_int("dma_iova_link", offset=offset)
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
                    _core._link_ranges(dom, self.addr, off, np.array([[target, ln]], dtype=np.uint64), prot)
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
        self._check_window("unlink", offset, nbytes)
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
        self._need("destroy")
        da = _DIR_ATTRS.get((direction, attrs)) if type(direction) in _DIR_TYPES and type(attrs) in _ATTR_TYPES else None
        d, a = da if da is not None else _dir_attrs(direction, attrs)
        # The checks, the unmap and the free in the core; False for 0 bytes.
        if not self._destroy(mapped_nbytes, _cpu(self.device)):
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

    def __enter__(self) -> IovaState:
        return self

    def __exit__(self, *exc: Any) -> None:
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


# ------------------------------------------------ dma-buf's phys_vec helper

MAX_SG_ENT_SZ = _core.MAX_SG_ENT_SZ


@dataclass(eq=False)
class PhysVecMapping:
    """What a table from :func:`dma_buf_phys_vec_to_sgt` remembers."""

    device: Device
    route: P2PMapType
    direction: DmaDirection
    nbytes: int
    state: IovaState | None = None
    singles: list[tuple[int, int]] = field(default_factory=list)
    leaked_iova: bool = False

    @property
    def device_name(self) -> str:
        return self.device.name


def dma_buf_phys_vec_to_sgt(device: Any, provider: P2pProvider | None, ranges: Any,
                            nbytes: int | None = None, direction: DmaDirection | int = DmaDirection.BIDIRECTIONAL,
                            *, kernel_compat: bool = False) -> SgTable:
    """``dma_buf_phys_vec_to_sgt()``: a DMA-only table for MMIO ranges.

    ``device`` is a :class:`Device`, or an :class:`~pydmabuf.dmabuf.Attachment`
    (then its reservation lock must be held, as the kernel asserts).  The
    route is ``pci_p2pdma_map_type(provider, device)``: BUS_ADDR
    entries are ``phys + bus_offset`` (nothing mapped); THRU_HOST_BRIDGE
    reserves one IOVA range and links every range into it (one sync), or
    without an IOMMU maps each range with :func:`dma_map_phys` (MMIO);
    anything else is EINVAL.  Entries longer than MAX_SG_ENT_SZ are split.

    The kernel links every range at IOVA offset 0, so a second range
    collides; and it leaks the IOVA when the first link fails.  The model
    links each range at its running offset.  ``kernel_compat=True`` does
    what the kernel does, to show both.
    """
    from pydmabuf.dmabuf import Attachment

    d = _dir(direction)
    if not isinstance(device, (Device, Attachment)):
        raise TypeError(f"dma_buf_phys_vec_to_sgt: device must be a Device or an Attachment, "
                        f"not {type(device).__name__}")
    if not isinstance(device, Device):
        # An attachment: the dma-buf helper proper, under its reservation lock.
        attach = device
        if not attach.dmabuf.resv.held_by_current_thread():
            from pydmabuf import checks

            checks.checker.locking("phys-vec-to-sgt-without-resv",
                                   "dma_buf_phys_vec_to_sgt without the reservation lock", attach)
        device = attach.device
    if provider is None:
        raise errors.InvalidArgument("dma_buf_phys_vec_to_sgt: no P2P provider (not MMIO)")
    if not isinstance(provider, P2pProvider):
        raise TypeError(f"dma_buf_phys_vec_to_sgt: provider must be a P2pProvider, not {type(provider).__name__}")
    rows = _core._u64_pairs(ranges, "dma_buf_phys_vec_to_sgt ranges")  # no copy for a u64 table
    total = int(_core._ranges_total(rows, "dma_buf_phys_vec_to_sgt"))
    if nbytes is None:
        nbytes = total
    _need_int("dma_buf_phys_vec_to_sgt", nbytes=nbytes)
    if nbytes <= 0:
        raise errors.InvalidArgument(f"dma_buf_phys_vec_to_sgt: size {nbytes} must be positive")
    if not device.is_pci:
        raise errors.InvalidArgument(f"dma_buf_phys_vec_to_sgt: {device.name} is not a PCI device")
    route = device.machine.p2p_map_type(provider, device)
    m = PhysVecMapping(device, route, d, nbytes)
    if route == P2PMapType.BUS_ADDR:
        bus = rows.copy()
        bus[:, 0] = (rows[:, 0] + np.uint64(provider.bus_offset & U64_MAX))
        table = SgTable.from_ranges(bus)
    elif route == P2PMapType.THRU_HOST_BRIDGE:
        st = IovaState.try_alloc(device, 0, nbytes)
        if st.uses_iova:
            if kernel_compat:
                mapped = _compat_link(st, rows, d)
            else:
                try:
                    mapped = st.link_ranges(rows, d, DmaAttrs.MMIO)
                except errors.DmaBufError:
                    st.free()
                    raise
            st.sync(0, mapped)
            table = SgTable.from_ranges([[st.addr, mapped]])
            m.state = st
        else:
            addrs = []
            try:
                for p, n in rows.tolist():
                    dma = dma_map_phys(device, p, n, d, DmaAttrs.MMIO)
                    m.singles.append((dma, n))
                    addrs.append([dma, n])
            except errors.DmaBufError:
                for dma, n in m.singles:
                    dma_unmap_phys(device, dma, n, d, DmaAttrs.MMIO)
                raise
            table = SgTable.from_ranges(addrs)
    else:
        raise errors.InvalidArgument(f"dma_buf_phys_vec_to_sgt: {device.name} cannot reach "
                                     f"{provider.owner.name}'s BAR ({route.name})")
    table.mapping = m
    return table


#: IOVA reservations leaked by ``kernel_compat`` runs: (device, iova, nbytes).
leaked: list[tuple[Device, int, int]] = []


def _compat_link(st: IovaState, rows: np.ndarray, d: DmaDirection) -> int:
    """The kernel helper's loop: every range linked at IOVA offset 0; on a
    failure, destroy what was mapped, except when the first link failed
    (then the reservation leaks, as upstream)."""
    mapped = 0
    for i, (p, n) in enumerate(rows.tolist()):
        try:
            st.link_ranges(np.array([[p, n]], dtype=np.uint64), d, DmaAttrs.MMIO, _all_at_offset=True)
        except errors.DmaBufError:
            if i == 0:
                st._live = False
                leaked.append((st.device, st.addr - st._offset, st._reserved))
                log.warning("dma_buf_phys_vec_to_sgt (kernel_compat): IOVA [%#x, +%#x] leaked",
                            st.addr, st._reserved)
            else:
                st.destroy(st.linked_nbytes, d, DmaAttrs.MMIO)
            raise
        mapped += n
    return mapped


def dma_buf_free_sgt(table: SgTable, direction: DmaDirection | int | None = None) -> None:
    """``dma_buf_free_sgt()``: undo :func:`dma_buf_phys_vec_to_sgt`."""
    m = _need_table(table, "dma_buf_free_sgt").mapping
    if not isinstance(m, PhysVecMapping):
        raise errors.LifetimeError("dma_buf_free_sgt: the table did not come from dma_buf_phys_vec_to_sgt "
                                   "or was freed already")
    if direction is not None and _dir(direction) != m.direction:
        raise errors.LifetimeError(f"dma_buf_free_sgt: mapped {m.direction.name}, freed {_dir(direction).name}")
    if m.singles:
        # All or nothing: every range must still be a live mapping before
        # the first is unmapped (a failed call changes nothing).
        taken: dict[int, int] = {}
        with _singles_lock:
            for dma, n in m.singles:
                _match(m.device, dma, n, m.direction, DmaAttrs.MMIO, taken)
    if m.state is not None:
        m.state.destroy(m.state.linked_nbytes, m.direction, DmaAttrs.MMIO)
    for dma, n in m.singles:
        dma_unmap_phys(m.device, dma, n, m.direction, DmaAttrs.MMIO)
    table.mapping = None


# ----------------------------------------------------------- device access


def _fault(device: Device, addr: int, reason: str) -> errors.IommuFault:
    return errors.IommuFault(f"{device.name}: DMA fault at {addr:#x}: {reason}")


def accessor(device: Device) -> access.Accessor:
    """The device as the access gate sees it (made once per device): its
    refusals are IOMMU faults (EFAULT) naming it; it may reach
    confidential memory only while ``cc_trusted``."""
    acc: access.Accessor | None = getattr(device, "_gate", None)
    if acc is None:
        acc = access.Accessor(access.DEVICE, device.name, device.machine, device,
                              lambda addr, reason: _fault(device, addr, reason),
                              lambda: bool(device.cc_trusted))
        device._gate = acc  # type: ignore[attr-defined]  # this module's cache, kept on the device
    return acc


def _peer_bus_target(device: Device, addr: int, nbytes: int) -> int | None:
    """A PCI bus address that a switch routes straight to a peer's BAR (the
    BUS_ADDR route bypasses the IOMMU): its CPU physical address."""
    if device.bdf is None:  # not PCI
        return None
    # Bus addresses mean something only inside the device's own PCI
    # hierarchy: a switch routes them to a peer below the same host bridge.
    # The bridge is found once per device (walking up the tree on every
    # access cost a tenth of a small access).  The PCI tree is fixed once
    # built (nothing re-parents a node); the parent it was found through is
    # kept beside it as a guard all the same.
    hb: tuple[Any, HostBridge] | None = getattr(device, "_dma_host_bridge", None)
    if hb is None or hb[0] is not device.parent:
        hb = (device.parent, device.host_bridge)
        device._dma_host_bridge = hb  # type: ignore[attr-defined]  # this module's cache, like _gate
    m = device.machine
    for w in hb[1].windows:
        if w.bus_start <= addr < w.bus_start + w.nbytes:
            cpu = (addr - w.bus_offset) & U64_MAX
            bar = m.bar_at(cpu)
            if bar is not None and m.p2p_map_type(bar.owner, device) == P2PMapType.BUS_ADDR:
                if cpu + nbytes - 1 > bar.last:
                    raise _fault(device, addr, "access runs past the peer's BAR")
                return cpu
    return None


def _translate(device: Device, addr: int, nbytes: int, write: bool) -> list[tuple[int, int]] | access.Translation:
    """The device's own translation of a DMA address (peer bus address,
    IOMMU page table and IOTLB, or dma-direct): physical runs.  The checks
    of what lies there are the gate's (:mod:`pydmabuf.access`)."""
    cpu = _peer_bus_target(device, addr, nbytes)
    if cpu is not None:
        return [(cpu, nbytes)]
    dom = device.domain
    if dom is not None:
        need = int(IommuProt.WRITE if write else IommuProt.READ)

        def walk(a: int, n: int) -> tuple[Any, int, int]:
            r: tuple[Any, int, int] = _core._translate(dom, a, n, need)
            return r

        def fault(at: int, fprot: int) -> errors.IommuFault:
            if fprot:
                return _fault(device, at, f"{'write' if write else 'read'} not permitted by the mapping "
                                          f"(prot {IommuProt(fprot)!r})")
            return _fault(device, at, "no IOMMU mapping (unmapped or stale IOVA)")

        assert device.iommu_group is not None  # a device with a domain is in a group
        runs, stale = device.iommu_group.iommu.iotlb.translate(device, dom, addr, nbytes, need, walk, fault)
        return access.Translation(runs, stale) if stale else runs
    if not device.dma_capable(addr, nbytes):
        raise _fault(device, addr, f"beyond the device's {device.dma_limit.bit_length()}-bit DMA limit")
    phys = device.dma_to_phys(addr)
    if phys is None:
        raise _fault(device, addr, "outside the device's dma-ranges")
    return [(phys, nbytes)]


def _need_access(addr: int, nbytes: int) -> None:
    if type(addr) is not int or type(nbytes) is not int:
        if not isinstance(addr, int) or not isinstance(nbytes, int):
            raise TypeError("addr and nbytes must be ints")
    if _bad_range(addr, nbytes):
        raise errors.InvalidArgument(f"bad access [{addr:#x}, +{nbytes:#x})")


def device_read(device: Device, addr: int, nbytes: int) -> bytes:
    """What ``device`` reads at DMA address ``addr`` (see ``Device.dma_read``),
    through the access gate."""
    _need_access(addr, nbytes)
    out = access.access(accessor(device), addr, nbytes, lambda: _translate(device, addr, nbytes, False))
    assert out is not None  # a read returns the bytes
    return out


def device_write(device: Device, addr: int, data: bytes | bytearray | memoryview) -> None:
    """``device`` writes ``data`` at DMA address ``addr``, through the access gate."""
    buf = memoryview(data).cast("B")
    n = len(buf)
    _need_access(addr, n)
    access.access(accessor(device), addr, n, lambda: _translate(device, addr, n, True), data=buf)
