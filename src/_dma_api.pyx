# cython: language_level=3
"""pydmabuf._dma_api: the DMA API's per-call paths, compiled, and the
record a mapped table keeps.

Each function here takes one common case of a call whose API is Python
(:mod:`pydmabuf.dma`, :class:`pydmabuf.IovaState`) and does it without
going back through Python:

* :func:`map_iommu` / :func:`unmap_iommu`: ``dma_map_sgtable`` /
  ``dma_unmap_sgtable`` for a trusted device behind an IOMMU domain: read
  the device's DMA limits and call the core's locked walk
  (``sg_iommu_map`` / ``sg_iommu_unmap``).  :func:`dma_map_sgtable` and
  :func:`dma_unmap_sgtable` themselves are here too, with their
  documentation (:mod:`pydmabuf.dma` exports them under its own name):
  they try that case and call the Python module's general path for the
  rest (bound by :func:`bind_sgtable`).
* :func:`iova_link` / :func:`iova_destroy`: ``IovaState.link_ranges`` and
  ``destroy`` for a state of a device that does not bounce.

The common case is: a :class:`~pydmabuf.device.Device`, arguments of the
plain types, direction and attributes already seen once (their parsed
form and IOMMU prot are cached in :mod:`pydmabuf._args`), and nothing that
would fail before the core's walk.  Anything else returns -1 / False with
nothing done, and the caller takes its general path, which makes the
checks and raises the errors.  The walks, their results, counters and
errors are the core's in both paths.

The module sits at the DMA API's layer (docs/layers.md): it reads a
:class:`~pydmabuf.device.Device`, which the core below does not know.
"""

from pydmabuf._core_base cimport *
from pydmabuf._core_iommu cimport IommuDomain
from pydmabuf._core_dma cimport IovaStateCore, P2pContext, SgTable, sg_iommu_map, sg_iommu_unmap

from pydmabuf._args import _DIR_ATTRS as _dir_attrs_cache
from pydmabuf._args import _LINK_ARGS as _link_args_cache
from pydmabuf._types import DmaAttrs as _DmaAttrs
from pydmabuf._types import DmaDirection as _DmaDirection
from pydmabuf.device import DEFAULT_MAX_SEGMENT_SIZE as _DEFAULT_MAX_SEG
from pydmabuf.device import Device as _Device

__all__ = ["SgMapping", "claim", "map_iommu", "unmap_iommu", "bind_sgtable", "dma_map_sgtable", "dma_unmap_sgtable",
           "iova_link", "iova_destroy"]

cdef uint64_t _U64 = 0xFFFFFFFFFFFFFFFF
# The argument caches the Python layer fills (typed: a dict look-up in C).
cdef dict _LINK_ARGS = _link_args_cache
cdef dict _DIR_ATTRS = _dir_attrs_cache
cdef str _IOMMU = "iommu"


cdef class SgMapping:
    """What a mapped table remembers (``table.mapping``): the device, the
    direction and attributes it was mapped with, the path (``kind``:
    ``"direct"``, ``"iommu"`` or ``"iommu-swiotlb"``), the IOVA range of an
    IOMMU mapping, and what a bounce left to give back (``bounces``:
    ``(slot, tlb, orig, size)``; ``singles``: ``(slot, dma, size)``)."""

    cdef public object device
    cdef public object direction
    cdef public object attrs
    cdef public str kind
    cdef public uint64_t iova
    cdef public uint64_t iova_nbytes
    cdef public list bounces
    cdef public list singles

    def __init__(self, device, direction, attrs, str kind not None, uint64_t iova=0, uint64_t iova_nbytes=0,
                 list bounces=None, list singles=None):
        self.device = device
        self.direction = direction
        self.attrs = attrs
        self.kind = kind
        self.iova = iova
        self.iova_nbytes = iova_nbytes
        self.bounces = [] if bounces is None else bounces
        self.singles = [] if singles is None else singles

    @property
    def device_name(self):
        return self.device.name

    def __repr__(self):
        return (f"SgMapping(device={self.device!r}, direction={self.direction!r}, attrs={self.attrs!r}, "
                f"kind={self.kind!r}, iova={self.iova:#x}, iova_nbytes={self.iova_nbytes:#x})")


cpdef object claim(SgTable table, object record):
    """Claim ``table`` for a map: set ``table.mapping`` to ``record`` if it
    is None and return None; else return what is there and change nothing.
    One step with the GIL held and no Python code run, so of two threads
    mapping the same table one wins and the other is told Busy (the
    walk itself may run without the GIL, so checking ``table.mapping``
    before it and setting it after would let both map)."""
    if table is None:
        raise TypeError("claim: table must be an SgTable, not None")
    cur = table.mapping
    if cur is not None:
        return cur
    table.mapping = record
    return None


cdef inline bint _plain(object direction, object attrs):
    """Arguments of exactly the types the caches are filled for (a float
    1.0 hashes like 1 and must still reach the general path's refusal)."""
    t = type(direction)
    u = type(attrs)
    return (t is int or t is _DmaDirection) and (u is int or u is _DmaAttrs)


cdef tuple _trusted_args(object device, object direction, object attrs):
    """``(direction, attrs, prot)`` parsed, for a :class:`Device` that does
    not bounce and plain arguments seen before; None otherwise."""
    if type(device) is not _Device or not _plain(direction, attrs) or device.untrusted:
        return None
    hit = _LINK_ARGS.get((direction, attrs, device.coherent))
    return <tuple>hit if type(hit) is tuple and len(<tuple>hit) == 3 else None


cdef IommuDomain _iommu_of(object device, uint32_t *cpu):
    """The device's IOMMU domain, when it is a core domain, with ``cpu``
    set to the CPU the calling thread stands for among its IOMMU's; None
    otherwise."""
    g = device.iommu_group
    if g is None:
        return None
    dom = g.domain
    if type(dom) is not IommuDomain:
        return None
    ncpus = g.iommu.ncpus
    if type(ncpus) is not int or not 0 < ncpus <= 0xFFFFFFFF:
        return None
    cpu[0] = pdb_thread_cpu(ncpus)
    return <IommuDomain>dom


def map_iommu(device, table, direction, attrs):
    """``iommu_dma_map_sg()`` for ``dma_map_sgtable``'s common case.

    Returns the number of DMA segments (the table is mapped and its
    ``mapping`` set), or -1 when the call is not the common case and
    nothing was done."""
    return _map_iommu(device, table, direction, attrs)


cdef int64_t _map_iommu(object device, object table, object direction, object attrs) except -2:
    if type(table) is not SgTable:
        return -1
    cdef SgTable t = <SgTable>table
    if t.t.orig_nents == 0 or t.mapping is not None:
        return -1
    hit = _trusted_args(device, direction, attrs)
    if hit is None:
        return -1
    cdef uint32_t cpu = 0
    cdef IommuDomain dom = _iommu_of(device, &cpu)
    if dom is None:
        return -1
    d, a, prot = hit
    # pydmabuf.pci.p2p_context's cache, read here: (owners seen, context).
    # Anything else (a miss, or junk) is the general path's to rebuild or
    # refuse.
    cache = getattr(device, "_p2p_ctx", None)
    if type(cache) is not tuple or len(<tuple>cache) != 2 or type((<tuple>cache)[1]) is not P2pContext \
            or (<tuple>cache)[0] != len(device.machine._owners):
        return -1
    ctx = (<tuple>cache)[1]
    # Device.dma_limit, dma_get_seg_boundary(), dma_get_max_seg_size().
    limit = device.dma_mask
    bus = device.bus_dma_limit
    if bus and bus < limit:
        limit = bus
    seg = device.seg_boundary_mask
    maxseg = device.max_segment_size
    cdef bint p32 = device.prefer_32bit_iova
    cdef uint64_t iova = 0, ilen = 0
    cdef int64_t rc
    cdef SgMapping m = SgMapping.__new__(SgMapping)
    m.device = device
    m.direction = d
    m.attrs = a
    m.kind = _IOMMU
    m.bounces = []
    m.singles = []
    if claim(t, m) is not None:  # claimed since the check above: the general path says Busy
        return -1
    try:
        rc = sg_iommu_map(t, dom, limit, _U64 if seg is None else seg,
                          _DEFAULT_MAX_SEG if maxseg is None else maxseg, &p32,
                          cpu, prot, <P2pContext>ctx, &iova, &ilen, m)
    except BaseException:
        if t.mapping is m:
            t.mapping = None
        raise
    device.prefer_32bit_iova = p32
    m.iova = iova
    m.iova_nbytes = ilen
    return rc


def unmap_iommu(device, table, direction, attrs):
    """``iommu_dma_unmap_sg()`` for ``dma_unmap_sgtable``'s common case: a
    table this device mapped through its IOMMU, unmapped with the same
    direction.  True when done; False when not that case and nothing was
    done (the caller's general path checks and raises)."""
    return _unmap_iommu(device, table, direction, attrs)


cdef bint _unmap_iommu(object device, object table, object direction, object attrs) except -1:
    if type(device) is not _Device or type(table) is not SgTable or not _plain(direction, attrs):
        return False
    cdef SgTable t = <SgTable>table
    m = t.mapping
    if type(m) is not SgMapping:
        return False
    cdef SgMapping sm = <SgMapping>m
    if sm.device is not device or sm.kind != _IOMMU:
        return False
    da = _DIR_ATTRS.get((direction, attrs))
    if type(da) is not tuple or len(<tuple>da) != 2 or (<tuple>da)[0] != sm.direction:
        return False
    cdef uint32_t cpu = 0
    cdef IommuDomain dom = _iommu_of(device, &cpu)
    if dom is None:
        return False
    sg_iommu_unmap(t, dom, cpu)
    t.mapping = None
    return True


# ------------------------------------------------ dma_map_sgtable's entry

cdef object _map_general = None    # pydmabuf.dma._map_sgtable
cdef object _unmap_general = None  # pydmabuf.dma._unmap_sgtable


def bind_sgtable(map_general, unmap_general):
    """Called once by :mod:`pydmabuf.dma`: the general paths of the two
    entry points below."""
    global _map_general, _unmap_general
    if not callable(map_general) or not callable(unmap_general):
        raise TypeError("bind_sgtable: two callables")
    _map_general, _unmap_general = map_general, unmap_general


def dma_map_sgtable(device, table, direction, attrs=0):
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
    # A trusted device behind an IOMMU, plain arguments seen before: the
    # core walk from here; anything else is the general path's.
    cdef int64_t nents = _map_iommu(device, table, direction, attrs)
    if nents >= 0:
        return nents
    return _map_general(device, table, direction, attrs)


def dma_unmap_sgtable(device, table, direction, attrs=0):
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
    if not _unmap_iommu(device, table, direction, attrs):
        _unmap_general(device, table, direction, attrs)


def iova_link(IovaStateCore st not None, ranges, direction, attrs, offset, all_at_offset):
    """``dma_iova_link()`` of ``IovaState.link_ranges``'s common case: a
    live state of a device that does not bounce.  Returns the bytes linked
    (the core parses the rows, checks them and the offset, links and
    records the window), or -1 when not that case and nothing was done."""
    if not st._live or st._dom is None or st.size == 0:
        return -1
    hit = _trusted_args(st.device, direction, attrs)
    if hit is None:
        return -1
    return st.link(ranges, hit[2], offset, all_at_offset)


def iova_destroy(IovaStateCore st not None, mapped_nbytes, direction, attrs):
    """``dma_iova_destroy()`` of ``IovaState.destroy``'s common case: a live
    state with nothing bounced and ``mapped_nbytes`` > 0 (the core checks
    it against what is linked, unmaps and frees).  True when done; False
    when not that case and nothing was done."""
    if not st._live or st._dom is None or st.size == 0 or st.uses_swiotlb or not _plain(direction, attrs):
        return False
    if type(mapped_nbytes) is not int or mapped_nbytes == 0:
        return False
    da = _DIR_ATTRS.get((direction, attrs))
    if type(da) is not tuple or len(<tuple>da) != 2:
        return False
    st.destroy_linked(mapped_nbytes)
    st._live = False
    return True
