"""Kernel work, counted: what the kernel does on each path of the study.

For one cell of ``pydmabuf bench`` (one map + unmap of one buffer by one
strategy) :func:`kernel_work` returns the count of each kernel operation on
that path for that input, worked out from the kernel's algorithm and not
read from the model's own counters:

================== ===========================================================
``iova_allocs``     ``alloc_iova_fast`` calls that hand out the range
                    (``iommu_dma_alloc_iova``; a failed first try below 4 GiB
                    for a PCI device is not counted)
``iova_frees``      ``free_iova_fast`` calls, or ``queue_iova`` on a domain
                    with a flush queue (``iommu_dma_free_iova``)
``iommu_map_calls`` ``iommu_map_nosync`` calls: one per physically contiguous
                    run from ``iommu_map_sg``, one per ``dma_iova_link``
``iommu_unmap_calls`` ``iommu_unmap_fast`` calls
``iotlb_sync_map``  ``iommu_sync_map`` calls after mapping
``iotlb_invalidations`` invalidations the unmap issues (walk-cache flushes of
                    freed tables, the strict ``iommu_iotlb_sync`` of the
                    gather) or queues (one flush-queue entry, issued later
                    inside a ``flush_iotlb_all``)
``pte_writes``      page-table entries written by map and unmap, leaves and
                    table descriptors
``pt_walks``        descents from the root: one per ``map_pages`` /
                    ``unmap_pages`` call of ``__iommu_map`` / ``__iommu_unmap``
``sg_entries``      scatterlist entries allocated (data entries)
``sg_entry_visits`` entries visited by the kernel's passes over the list
``metadata_bytes``  bytes of mapping metadata allocated (scatterlist chunks
                    at their slab size, ``dma_iova_state``, ``dma_buf_dma``)
================== ===========================================================

The page table is io-pgtable-arm's 4-level LPAE format with a 4 KiB granule
(leaves of 4 KiB, 2 MiB and 1 GiB), the format the model's domains use.
Table descriptors depend on which tables exist before the map; the counts
are those of the *steady state* of repeating the same map + unmap at the
same IOVA: a table survives an unmap unless the unmap cleared the entry
pointing at it (``__arm_lpae_unmap`` frees a table only when a whole
aligned block is unmapped at the level above), so the map installs exactly
the tables the previous unmap freed.  The IOVA range is size-aligned
(``alloc_iova`` aligns to the size rounded up to a power of two), which
fixes its alignment to every block a huge leaf could fill.

Not counted (no key for them): reads of the caller's page array by
``sg_alloc_table_from_pages`` (two per page), lock and atomic operations,
the page-table pages allocated for new tables, cache maintenance for
non-coherent devices (the study's devices are coherent).
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf._types import PAGE_SIZE
from pydmabuf.workloads import numpy_coalesce

if TYPE_CHECKING:
    from pydmabuf.machine import Device

__all__ = ["KEYS", "PATHS", "kernel_work", "sg_chunk_bytes", "map_walk", "unmap_walk", "pagetable_work",
           "load_profile", "measure_units", "unit_costs", "estimate_terms", "estimate_ns_per_page",
           "parse_cell", "format_explain"]

#: The keys of every ``kernel_work`` object, in the order the study prints them.
KEYS = ("iova_allocs", "iova_frees", "iommu_map_calls", "iommu_unmap_calls", "iotlb_sync_map",
        "iotlb_invalidations", "pte_writes", "pt_walks", "sg_entries", "sg_entry_visits", "metadata_bytes")

_U64: type[np.uint64] = np.uint64
#: io-pgtable-arm, 4 KiB granule: leaf sizes as shifts (L3 page, L2 block, L1 block).
_SHIFTS = (12, 21, 30)
_PTES_PER_TABLE = 512
#: include/linux/scatterlist.h: SG_MAX_SINGLE_ALLOC = PAGE_SIZE / sizeof(struct scatterlist)
_SG_MAX_SINGLE_ALLOC = 128
_SG_ENTRY = 32
#: sg_alloc_table_from_pages(): max_segment UINT_MAX, aligned down to a page
_SG_MAX_SEGMENT = 0xFFFFF000
#: struct dma_iova_state (dma_addr_t addr; u64 __size), kzalloc'ed or embedded
_IOVA_STATE = 16
#: drivers/dma-buf/dma-buf-mapping.c: struct dma_buf_dma { sg_table (16), state *, size }
_DMA_BUF_DMA = 32
_UINT_MAX = 0xFFFFFFFF


def _kmalloc_size(nbytes: int) -> int:
    """The slab size class kmalloc hands out for ``nbytes`` (the generic
    caches: 8, 16, 32, 64, 96, 128, 192, then powers of two)."""
    for c in (8, 16, 32, 64, 96, 128, 192):
        if nbytes <= c:
            return c
    c = 256
    while c < nbytes:
        c <<= 1
    return c


def sg_chunk_bytes(nents: int) -> int:
    """Bytes ``sg_alloc_table`` / ``get_next_sg`` allocate for ``nents``
    data entries (lib/scatterlist.c): chunks of at most
    ``SG_MAX_SINGLE_ALLOC`` (128) slots, every chunk but the last giving its
    last slot to the chain link; ``sg_kmalloc`` takes a whole page for a
    128-slot chunk and ``kmalloc_array(n, 32)`` otherwise."""
    if nents <= 0:
        return 0
    if nents <= _SG_MAX_SINGLE_ALLOC:
        return PAGE_SIZE if nents == _SG_MAX_SINGLE_ALLOC else _kmalloc_size(nents * _SG_ENTRY)
    rest = nents - (_SG_MAX_SINGLE_ALLOC - 1)  # after the first, full chunk
    full = 0 if rest <= _SG_MAX_SINGLE_ALLOC else -(-(rest - _SG_MAX_SINGLE_ALLOC) // (_SG_MAX_SINGLE_ALLOC - 1))
    last = rest - full * (_SG_MAX_SINGLE_ALLOC - 1)
    return (1 + full) * PAGE_SIZE + (PAGE_SIZE if last == _SG_MAX_SINGLE_ALLOC else _kmalloc_size(last * _SG_ENTRY))


# ------------------------------------------------------------- page tables


def _walk(iova: np.ndarray, paddr: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The loop of ``__iommu_map`` (and, with ``paddr == iova``, of
    ``__iommu_unmap``) over many calls at once, with io-pgtable-arm's
    ``map_pages`` / ``unmap_pages`` under it.

    Each step of each call is ``iommu_pgsize()`` -- the largest leaf size
    that fits the rest and to which both addresses are aligned, and a count
    cut short at the next larger size's boundary when both addresses can
    reach it together and a whole larger leaf follows -- then one descent
    that writes ``min(count, entries left in that table)`` entries
    (``__arm_lpae_map`` / ``__arm_lpae_unmap`` stop at the end of the table).

    Returns the chunks, one per descent: (call index, iova, shift, entries).
    Vectorised over the calls; the loop runs as many times as the longest
    call has descents.
    """
    iova = iova.astype(_U64, copy=True)
    paddr = paddr.astype(_U64, copy=True)
    size = size.astype(_U64, copy=True)
    idx = np.arange(len(size))
    out_c, out_i, out_s, out_n = [], [], [], []
    # A one-granule call is one descent writing one 4 KiB entry: take those
    # out first (page lists have nothing else).
    single = size == _U64(PAGE_SIZE)
    if single.any():
        out_c.append(idx[single])
        out_i.append(iova[single])
        out_s.append(np.full(int(single.sum()), 12, dtype=_U64))
        out_n.append(np.ones(int(single.sum()), dtype=_U64))
    act = np.flatnonzero((size > 0) & ~single)
    one = _U64(1)
    while len(act):
        i, p, s = iova[act], paddr[act], size[act]
        merge = i | p
        sh = np.full(len(act), 12, dtype=_U64)
        for cand in (21, 30):
            blk = one << _U64(cand)
            ok = (s >= blk) & ((merge & (blk - one)) == 0)
            sh = np.where(ok, _U64(cand), sh)
        nxt = np.where(sh == 12, _U64(21), np.where(sh == 21, _U64(30), _U64(0)))
        nblk = np.where(nxt > 0, one << nxt, _U64(0))
        nmask = np.where(nxt > 0, nblk - one, _U64(0))
        count = s >> sh
        compat = (nxt > 0) & (((i ^ p) & nmask) == 0)
        off = nblk - (merge & nmask)
        cut = compat & (off + nblk <= s)
        count = np.where(cut, off >> sh, count)
        room = _U64(_PTES_PER_TABLE) - ((i >> sh) & _U64(_PTES_PER_TABLE - 1))
        n = np.minimum(count, room)
        step = n << sh
        out_c.append(idx[act])
        out_i.append(i)
        out_s.append(sh)
        out_n.append(n)
        iova[act] += step
        paddr[act] += step
        size[act] -= step
        act = act[size[act] > 0]
    if not out_c:
        z = np.zeros(0, dtype=_U64)
        return np.zeros(0, dtype=np.int64), z, z, z
    return (np.concatenate(out_c), np.concatenate(out_i), np.concatenate(out_s), np.concatenate(out_n))


def map_walk(iova: np.ndarray, paddr: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Descents of ``iommu_map_nosync(iova[k], paddr[k], size[k])`` for
    every k (``__iommu_map`` -> ``arm_lpae_map_pages``): see :func:`_walk`."""
    return _walk(iova, paddr, size)


def unmap_walk(iova: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Descents of one ``iommu_unmap_fast(iova, size)`` (``__iommu_unmap``
    chooses sizes with ``iommu_pgsize(iova, iova, ...)``: by IOVA alignment
    only)."""
    a = np.array([iova], dtype=_U64)
    return _walk(a, a, np.array([size], dtype=_U64))


def pagetable_work(iova: np.ndarray, paddr: np.ndarray, size: np.ndarray, span: tuple[int, int],
                   *, strict: bool) -> dict[str, int]:
    """Page-table work of mapping calls ``(iova[k], paddr[k], size[k])``
    and one unmap of ``span = (iova, nbytes)``, in the steady state (see
    the module's docstring).

    Returns ``iommu_map_calls``, ``iommu_unmap_calls``, ``pte_writes``,
    ``pt_walks``, ``iotlb_invalidations`` and the detail behind them.
    """
    _, mi, msh, mn = map_walk(iova, paddr, size)
    m_leaves = {sh: int(mn[msh == sh].sum()) for sh in _SHIFTS}
    _, ui, ush, un = unmap_walk(*span)
    u1 = int(un[ush == 30].sum())          # whole aligned 1 GiB blocks, cleared at L1
    u2 = int(un[ush == 21].sum())          # whole aligned 2 MiB blocks outside them, at L2
    u3 = int(un[ush == 12].sum())          # 4 KiB leaves outside both, at L3
    k1 = m_leaves[30]                      # of the u1 blocks, those a 1 GiB leaf maps
    if u1:
        lo = int(ui[ush == 30].min())
        hi = lo + (u1 << 30)
        sel = (msh == 21) & (mi >= _U64(lo)) & (mi < _U64(hi))
        k2_in1 = int(mn[sel].sum())
    else:
        k2_in1 = 0
    k2 = m_leaves[21] - k2_in1             # of the u2 blocks, those a 2 MiB leaf maps
    # __arm_lpae_unmap at a block level finds a table where the map put
    # smaller leaves: it clears that entry, flushes the walk cache for it
    # and frees the table (and everything under it) ...
    l2_freed = u1 - k1
    l3_freed = u2 - k2
    tables_cleared = l2_freed + l3_freed
    # ... so the next map installs them again (arm_lpae_install_table, one
    # descriptor each): an L2 table per freed L1 entry and, under it, an L3
    # table for every 2 MiB block not mapped by a 2 MiB leaf.
    l3_installed = l3_freed + _PTES_PER_TABLE * l2_freed - k2_in1
    map_writes = sum(m_leaves.values()) + l2_freed + l3_installed
    # Unmap: every entry in the range is cleared once by
    # __arm_lpae_clear_pte(ptep, i); a table entry was cleared once before
    # (the non-leaf loop), so it is written twice.
    unmap_writes = u1 + u2 + u3 + tables_cleared
    # Invalidations: one io_pgtable_tlb_flush_walk per table entry cleared;
    # strict: iommu_iotlb_sync of the gather, plus one each time the leaf
    # size changes between gathered pages (iommu_iotlb_gather_add_page
    # syncs before a size change); lazy: one flush-queue entry (queue_iova),
    # issued later inside the queue's flush_iotlb_all.
    if strict:
        changes = int(np.count_nonzero(ush[1:] != ush[:-1])) if len(ush) else 0
        unmap_inv = (changes + 1) if len(ush) else 0
    else:
        unmap_inv = 1
    return {
        "iommu_map_calls": int(len(size)),
        "iommu_unmap_calls": 1,
        "pte_writes": map_writes + unmap_writes,
        "pt_walks": int(len(mn) + len(un)),
        "iotlb_invalidations": tables_cleared + unmap_inv,
        "_leaves_4k": m_leaves[12], "_leaves_2m": m_leaves[21], "_leaves_1g": m_leaves[30],
        "_tables_installed": l2_freed + l3_installed, "_tables_cleared": tables_cleared,
        "_walk_invalidations": tables_cleared, "_unmap_invalidations": unmap_inv,
        "_map_walks": int(len(mn)), "_unmap_walks": int(len(un)), "_queued": int(not strict),
    }


# ------------------------------------------------------------------ paths


def _runs(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Physically contiguous runs of a PFN array: (phys, nbytes), unsplit."""
    pfns = np.asarray(pfns, dtype=_U64)
    if len(pfns) == 0:
        z = np.zeros(0, dtype=_U64)
        return z, z
    brk = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(pfns)]))
    return pfns[starts] << _U64(12), (ends - starts).astype(_U64) << _U64(12)


def _sg_entries(run_lens: np.ndarray) -> int:
    """Entries sg_alloc_table_from_pages_segment() makes: a run splits every
    max_segment (UINT_MAX aligned down to a page) bytes."""
    return int((-(-run_lens.astype(np.int64) // _SG_MAX_SEGMENT)).sum())


def _sg_entry_lens(run_lens: np.ndarray) -> np.ndarray:
    n = -(-run_lens.astype(np.int64) // _SG_MAX_SEGMENT)
    first = np.repeat(np.cumsum(n) - n, n)
    k = np.arange(int(n.sum())) - first
    total = np.repeat(run_lens.astype(np.int64), n)
    out: np.ndarray = np.minimum(total - k * _SG_MAX_SEGMENT, _SG_MAX_SEGMENT)
    return out


def _finalise_count(entry_lens: np.ndarray, max_len: int) -> int:
    """Segments __finalise_sg() makes of granule-aligned entries on a device
    with no segment boundary: an entry joins the current segment while
    ``max_len - cur_len >= s_length`` (unsigned int), else starts one."""
    cum = np.concatenate(([0], np.cumsum(entry_lens.astype(np.int64))))
    count, start, n = 0, 0, len(entry_lens)
    while start < n:  # one step per output segment, not per entry
        end = int(np.searchsorted(cum, cum[start] + max_len, side="right")) - 1
        end = max(end, start + 1)
        count += 1
        start = end
    return count


#: The mapping strategies :func:`kernel_work` knows, and the kernel path each follows.
PATHS = {
    "sg_iommu": "sg_alloc_table_from_pages + dma_map_sgtable (iommu_dma_map_sg) / dma_unmap_sgtable",
    "sg_direct": "sg_alloc_table_from_pages + dma_map_sgtable (dma_direct_map_sg) / dma_unmap_sgtable",
    "link_pages": "dma_iova_try_alloc + dma_iova_link per page + dma_iova_sync / dma_iova_destroy",
    "link_runs": "dma_iova_try_alloc + dma_iova_link per run + dma_iova_sync / dma_iova_destroy",
    "ranges_to_table": "dma_buf_phys_vec_to_sgt / dma_buf_free_sgt",
    "dmabuf_static": "system heap attach (dup_sg_table) + dma_map_sgtable / dma_unmap_sgtable + detach",
    "dmabuf_dynamic": "as dmabuf_static, mapped under the reservation lock",
    "dmabuf_ranges": "attach; importer links the exporter's phys_vec ranges; dma_iova_destroy",
    "dmabuf_pal": "mapping-types attach [PAL]; dma_buf_pal_map_phys (the exporter kvmalloc's the list); "
                  "importer links the ranges; dma_iova_destroy; dma_buf_pal_unmap_phys",
    "pte_floor": "reference: one 8-byte entry write per page, no kernel path",
    "sg_from_pages": "sg_alloc_table_from_pages alone",
}

_IOVA_BASE = 1 << 39  # any size-aligned base gives the same counts (module docstring)


def _link_work(lens: np.ndarray, phys: np.ndarray, strict: bool) -> dict[str, int]:
    """dma_iova_try_alloc + one dma_iova_link per range (back to back) +
    dma_iova_sync; dma_iova_destroy."""
    total = int(lens.sum())
    offs = np.concatenate(([0], np.cumsum(lens.astype(np.int64))[:-1])).astype(_U64)
    # dma_iova_link -> __dma_iova_link -> iommu_map_nosync, once per call
    pt = pagetable_work(_U64(_IOVA_BASE) + offs, phys, lens, (_IOVA_BASE, total), strict=strict)
    return {
        "_iova_granules": -(-total // PAGE_SIZE),
        "iova_allocs": 1,       # dma_iova_try_alloc -> iommu_dma_alloc_iova -> alloc_iova_fast
        "iova_frees": 1,        # dma_iova_destroy -> __iommu_dma_iova_unlink -> iommu_dma_free_iova
        "iotlb_sync_map": 1,    # dma_iova_sync -> iommu_sync_map
        **pt,                   # iommu_unmap_fast once in __iommu_dma_iova_unlink
        "sg_entries": 0,
        "sg_entry_visits": 0,
        "metadata_bytes": _IOVA_STATE,
    }


def _sg_map_iommu(entry_lens: np.ndarray, run_phys: np.ndarray, run_lens: np.ndarray, max_seg: int,
                  strict: bool) -> dict[str, int]:
    """iommu_dma_map_sg + iommu_dma_unmap_sg of a table of ``entry_lens``
    (coherent, trusted device, no segment boundary)."""
    n = len(entry_lens)
    if n and int(entry_lens.max()) > max_seg:
        # __finalise_sg's unsigned max_len - cur_len wraps past such an
        # entry and merges what follows: not counted here
        raise ValueError(f"kernel_work: an entry longer than the device's max segment ({max_seg:#x}) is not counted")
    total = int(run_lens.sum())
    offs = np.concatenate(([0], np.cumsum(run_lens.astype(np.int64))[:-1])).astype(_U64)
    # iommu_map_sg: one iommu_map_nosync per physically contiguous run of
    # entries (entries split at max_segment are joined again), one
    # iommu_sync_map; __iommu_dma_unmap: one iommu_unmap_fast of the span.
    pt = pagetable_work(_U64(_IOVA_BASE) + offs, run_phys, run_lens, (_IOVA_BASE, total), strict=strict)
    count = _finalise_count(entry_lens, max_seg)
    # Passes: iommu_dma_map_sg's layout loop (n), iommu_map_sg's loop runs
    # i = 0..nents and reads sg_phys() each time (n + 1), __finalise_sg (n);
    # iommu_dma_unmap_sg: the first loop stops at the first entry (1), the
    # second restarts there and runs over the `count` segments, plus the
    # first empty one when count < nents.  The sync_sg loops do nothing
    # for a coherent device without swiotlb (dev_use_sg_swiotlb is false).
    visits = n + (n + 1) + n + 1 + count + (1 if count < n else 0)
    return {"iova_allocs": 1, "iova_frees": 1, "iotlb_sync_map": 1, **pt, "sg_entry_visits": visits,
            "_segments": count, "_iova_granules": -(-total // PAGE_SIZE)}


def kernel_work(strategy: str, pfns: np.ndarray, *, strict: bool = False, max_segment_size: int = _UINT_MAX,
                seg_boundary: int = (1 << 64) - 1, bar_ranges: np.ndarray | None = None,
                p2p_iova: bool = True, detail: bool = False, cache: dict[Any, Any] | None = None) -> dict[str, int]:
    """The kernel's work for one map + unmap of the buffer ``pfns`` by
    ``strategy`` (a name of :data:`PATHS`).

    Parameters
    ----------
    strategy : str
        The study's strategy name.
    pfns : array of uint64
        The buffer's page frames, in buffer order (4 KiB pages).
    strict : bool
        The importer's domain invalidates at unmap (``IOMMU_DOMAIN_DMA``)
        rather than through a flush queue (``DMA-FQ``).
    max_segment_size, seg_boundary : int
        ``dma_get_max_seg_size`` / ``dma_get_seg_boundary`` of the importer.
    bar_ranges : (n, 2) array of uint64, optional
        ``ranges_to_table``: the exporter's (phys, nbytes) ranges.
    p2p_iova : bool
        ``ranges_to_table``: the route is THRU_HOST_BRIDGE (linked into an
        IOVA range), not BUS_ADDR (nothing mapped).
    detail : bool
        Also return the terms behind the counts (keys starting with ``_``).
    cache : dict, optional
        Shared by calls on the same ``pfns`` (and device): the page-table
        work common to several paths (the scatterlist paths, the run
        links) is worked out once.  Pass a fresh dict for other pages.

    Returns
    -------
    dict
        The counts under :data:`KEYS` (exact ints), plus the detail when
        asked.  ValueError for an unknown strategy or a device with a
        segment boundary (whose layout pass pads; not modelled here).
    """
    if strategy not in PATHS:
        raise ValueError(f"kernel_work: unknown strategy {strategy!r}; known: {', '.join(PATHS)}")
    if seg_boundary != (1 << 64) - 1:
        raise ValueError("kernel_work: devices with a segment boundary are not counted (layout padding)")
    pfns = np.ascontiguousarray(pfns, dtype=_U64)
    npages = len(pfns)
    run_phys, run_lens = _runs(pfns)
    nents = _sg_entries(run_lens)
    zero = {k: 0 for k in KEYS}
    w: dict[str, int]
    if strategy == "sg_from_pages":
        # sg_alloc_append_table_from_pages: each entry written once (sg_set_page)
        w = {**zero, "sg_entries": nents, "sg_entry_visits": nents, "metadata_bytes": sg_chunk_bytes(nents)}
    elif strategy == "pte_floor":
        w = {**zero, "pte_writes": npages}
    elif strategy == "sg_direct":
        # build (n writes); dma_direct_map_sg: one pass, one segment per
        # entry; dma_direct_unmap_sg: one pass.  No IOMMU, no IOVA.
        w = {**zero, "sg_entries": nents, "sg_entry_visits": 3 * nents, "metadata_bytes": sg_chunk_bytes(nents)}
    elif strategy in ("sg_iommu", "dmabuf_static", "dmabuf_dynamic"):
        entry_lens = _sg_entry_lens(run_lens)
        key: tuple[Any, ...] = ("sg", strict, max_segment_size)
        if cache is None or key not in cache:
            got = _sg_map_iommu(entry_lens, run_phys, run_lens, max_segment_size, strict)
            if cache is not None:
                cache[key] = got
        else:
            got = cache[key]
        w = {**zero, **got}
        w["sg_entries"] = nents
        if strategy == "sg_iommu":
            w["sg_entry_visits"] += nents           # the builder writes each entry once
            w["metadata_bytes"] = sg_chunk_bytes(nents)
        else:
            # system heap attach: dup_sg_table() kzalloc's an sg_table (16)
            # and sg_alloc_table(orig_nents), then copies entry by entry
            # (one read of the heap's entry, one write of the copy).
            w["sg_entry_visits"] += 2 * nents
            w["metadata_bytes"] = sg_chunk_bytes(nents) + _kmalloc_size(16)
    elif strategy == "link_pages":
        phys = pfns << _U64(12)
        w = {**zero, **_link_work(np.full(npages, PAGE_SIZE, dtype=_U64), phys, strict)}
    elif strategy in ("link_runs", "dmabuf_ranges", "dmabuf_pal"):
        # the runs the study links: numpy_coalesce (split at 0xFFFFF pages),
        # the same ranges the system heap's phys_vec holds
        key = ("runs", strict)
        if cache is None or key not in cache:
            phys, lens = numpy_coalesce(pfns)
            got = _link_work(lens, phys, strict)
            if cache is not None:
                cache[key] = got
        else:
            got = cache[key]
        w = {**zero, **got}
        if strategy == "dmabuf_pal":
            # The exporter's map_phys kvmalloc's a struct dma_buf_phys_list:
            # its entry count (a size_t) and one {paddr, len} pair of 16
            # bytes per run; the importer gives it back (kfree) at unmap.
            nruns = len(numpy_coalesce(pfns)[1])   # the heap's phys_vec: the same runs
            w["metadata_bytes"] += _kmalloc_size(8 + 16 * nruns)
    else:  # ranges_to_table
        if bar_ranges is None:
            raise ValueError("kernel_work: ranges_to_table needs bar_ranges")
        rows = np.asarray(bar_ranges, dtype=_U64).reshape(-1, 2)
        size = int(rows[:, 1].sum())
        if p2p_iova:
            # dma_iova_try_alloc, one dma_iova_link per range, one
            # dma_iova_sync; dma_buf_free_sgt -> dma_iova_destroy.  The
            # kernel links every range at offset 0 (they collide from the
            # second on); the model and these counts use the running offset
            # the helper means -- the same calls, each at its own IOVA.
            w = {**zero, **_link_work(rows[:, 1].copy(), rows[:, 0].copy(), strict)}
            ents = -(-size // _SG_MAX_SEGMENT)   # calc_sg_nents, IOVA case
            meta = _kmalloc_size(_DMA_BUF_DMA) + _kmalloc_size(_IOVA_STATE) + sg_chunk_bytes(ents)
        else:
            ents = int((-(-rows[:, 1].astype(np.int64) // _SG_MAX_SEGMENT)).sum())
            w = dict(zero)
            meta = _kmalloc_size(_DMA_BUF_DMA) + sg_chunk_bytes(ents)
        # fill_sg_entry writes each entry once; dma_buf_free_sgt does not
        # walk the list on the IOVA or bus-address routes.
        w.update(sg_entries=ents, sg_entry_visits=ents, metadata_bytes=meta)
    out = {k: int(w[k]) for k in KEYS}
    if detail:
        out.update({k: int(v) for k, v in w.items() if k.startswith("_")})
    return out


def describe(strategy: str) -> str:
    """The kernel path a strategy's counts follow."""
    return PATHS[strategy]


def cell_kernel_work(strategy: str, pfns: np.ndarray, dev: Device | None, **kw: Any) -> dict[str, int]:
    """:func:`kernel_work` for a device of the model (its domain's mode and
    its DMA limits)."""
    dom = dev.domain if dev is not None else None
    strict = bool(dom.strict) if dom is not None else True
    max_seg = int(dev.dma_get_max_seg_size()) if dev is not None else _UINT_MAX
    bound = int(dev.dma_get_seg_boundary()) if dev is not None else (1 << 64) - 1
    return kernel_work(strategy, pfns, strict=strict, max_segment_size=max_seg, seg_boundary=bound, **kw)


# ---------------------------------------------------------------- the estimate

#: Unit costs the study measures on the host (:func:`measure_units`), and
#: what each is.  A cost profile may pin any of them.
MEASURED_UNITS = {
    "walk": "one 4-level descent from the root, io-pgtable-arm's recursive __arm_lpae_map shape, on "
            "consecutive IOVAs (descent + leaf write, less the least batched write)",
    "iommu_map_call": "the fixed cost of one iommu_map_nosync call: a loop of the same shape (alignment "
                      "check, iommu_pgsize, the indirect map_pages call, its argument checks) less the "
                      "descent and write",
    "iommu_unmap_call": "the fixed cost of one iommu_unmap_fast call, taken as iommu_map_call's: "
                        "__iommu_unmap has the same shape (iommu_pgsize, the indirect unmap_pages call)",
    "pte_write": "one 8-byte entry written in a batch of 512 consecutive entries",
    "entry_visit": "one 32-byte scatterlist entry visited by a pass (__finalise_sg's work per entry)",
    "metadata_byte": "one byte of a zeroed 4 KiB allocation and its free (kzalloc + kfree; a small "
                     "kmalloc costs more per byte, its fixed cost is not counted)",
    "iova_alloc": "IOVA tree path (> 32 granules, alloc_iova): half a node allocate + red-black-tree "
                  "insert + erase + free, 1024 live ranges",
    "iova_free": "IOVA tree path (> 32 granules, __free_iova): as iova_alloc",
    "iova_rcache_alloc": "IOVA rcache path (<= 32 granules, iova_rcache_get): one pfn popped from a "
                         "127-entry magazine under a spin lock",
    "iova_rcache_free": "IOVA rcache path (<= 32 granules, iova_rcache_insert): one pfn pushed back into "
                        "the magazine under a spin lock",
}
#: Unit costs only a cost profile gives.
PROFILE_UNITS = ("iotlb_invalidation", "iotlb_invalidation_queued", "iotlb_sync_map")

DEFAULT_PROFILE = "cost_profiles/default.toml"


def load_profile(path: str | None = None) -> dict[str, dict[str, Any]]:
    """Read a cost profile (TOML): ``{unit: {"ns": float, "source": str}}``.

    ``path`` None reads the profile shipped with the package.  Every unit
    of :data:`PROFILE_UNITS` must be there; units of :data:`MEASURED_UNITS`
    may be.  ValueError naming the file and the fault for anything else (a
    file that is not TOML, an unknown unit, a missing or negative ``ns``,
    a missing ``source``); OSError when the file cannot be read.
    """
    if path is None:
        where = f"pydmabuf/{DEFAULT_PROFILE}"
        text = resources.files("pydmabuf").joinpath(DEFAULT_PROFILE).read_text()
    else:
        where = str(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"cost profile {where}: not TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for unit, v in data.items():
        if unit not in PROFILE_UNITS and unit not in MEASURED_UNITS:
            raise ValueError(f"cost profile {where}: unknown unit [{unit}]; known: "
                             f"{', '.join(PROFILE_UNITS + tuple(MEASURED_UNITS))}")
        if not isinstance(v, dict):
            raise ValueError(f"cost profile {where}: [{unit}] must be a table with ns and source")
        extra = set(v) - {"ns", "source"}
        if extra:
            raise ValueError(f"cost profile {where}: [{unit}] has unknown keys {', '.join(sorted(extra))}")
        ns = v.get("ns")
        if isinstance(ns, bool) or not isinstance(ns, (int, float)) or not math.isfinite(ns) or ns < 0:
            raise ValueError(f"cost profile {where}: [{unit}] ns must be a number >= 0, not {ns!r}")
        src = v.get("source")
        if not isinstance(src, str) or not src.strip():
            raise ValueError(f"cost profile {where}: [{unit}] needs a source (where the number comes from)")
        out[unit] = {"ns": float(ns), "source": f"profile {where}: {' '.join(src.split())}"}
    missing = [u for u in PROFILE_UNITS if u not in out]
    if missing:
        raise ValueError(f"cost profile {where}: missing {', '.join(f'[{u}]' for u in missing)}")
    return out


def measure_units(rounds: int = 7) -> dict[str, dict[str, Any]]:
    """Measure the host's unit costs with the C loops of
    ``pydmabuf._calibrate``, interleaved over ``rounds`` rounds: for each
    unit the median ns, its interquartile range and the samples.
    RuntimeError when the extension is not built."""
    return units_from_raw(calibrate(rounds))


def calibrate(rounds: int = 7, into: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """``rounds`` more rounds of the C loops of ``pydmabuf._calibrate``
    (one of each loop per round, interleaved): ``{loop: [ns per unit of
    each round]}``, appended to ``into`` when given (and returned).

    A study calls it at its start, between its groups and at its end, and
    takes each unit from all those rounds (:func:`units_from_raw`): on a
    shared host a neighbour slows the loops for seconds at a time, and
    rounds spread over the whole run find the host's quiet moments where
    rounds at one moment may find none.  RuntimeError when the extension
    is not built."""
    try:
        # Imported here on purpose: the compiled unit-cost loops are an
        # extension of their own, absent from an unbuilt tree, and only a
        # run that estimates kernel costs needs them.
        from pydmabuf import _calibrate
    except ImportError:
        raise RuntimeError("the unit-cost loops (pydmabuf._calibrate) are not built: "
                           "python setup.py build_ext --inplace") from None
    raw = _calibrate.measure(rounds=rounds)
    if into is None:
        return {k: list(v) for k, v in raw.items()}
    for k, v in raw.items():
        into.setdefault(k, []).extend(v)
    return into


def units_from_raw(raw: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """The measured units from rounds of the loops (:func:`calibrate`):
    for each unit the least of the rounds as its cost, with the median,
    quartiles and samples beside it."""
    if not raw or not all(raw.get(k) for k in ("pte_write", "walk_write", "map_call", "entry_visit", "alloc_4k",
                                                "tree_pair", "magazine_pair")):
        raise ValueError("units_from_raw: every loop needs at least one round")
    # a descent = a descent ending in one write, less one write (the least
    # write time of the run: a round preempted mid-batch must not make a
    # walk look free)
    least_write = min(raw["pte_write"])
    walk = [w - least_write for w in raw["walk_write"]]
    # a call less its descent and write (the least of those rounds); never
    # below 0 -- a call always does the descent too
    least_walk = min(raw["walk_write"])
    call = [max(c - least_walk, 0.0) for c in raw["map_call"]]
    per = {
        "walk": walk,
        "iommu_map_call": call,
        "iommu_unmap_call": call,
        "pte_write": raw["pte_write"],
        "entry_visit": raw["entry_visit"],
        "metadata_byte": [a / PAGE_SIZE for a in raw["alloc_4k"]],
        "iova_alloc": [t / 2 for t in raw["tree_pair"]],
        "iova_free": [t / 2 for t in raw["tree_pair"]],
        "iova_rcache_alloc": [t / 2 for t in raw["magazine_pair"]],
        "iova_rcache_free": [t / 2 for t in raw["magazine_pair"]],
    }
    out = {}
    for unit, xs in per.items():
        # The least of the rounds: on a shared machine the slower rounds
        # carry other processes' interference, not the operation's cost.
        # The median and quartiles are kept to show the spread.
        q1, med, q3 = np.percentile(xs, [25, 50, 75])
        out[unit] = {"ns": float(min(xs)), "median": float(med), "q1": float(q1), "q3": float(q3),
                     "samples": [float(x) for x in xs],
                     "source": f"measured on this host: {MEASURED_UNITS[unit]} "
                               f"(least of {len(xs)} rounds of the loops, interleaved)"}
    return out


def unit_costs(profile: dict[str, dict[str, Any]] | None = None, *, rounds: int = 7,
               raw: dict[str, list[float]] | None = None) -> dict[str, dict[str, Any]]:
    """Every unit cost the estimate needs: measured on the host unless the
    profile pins it, the rest from the profile (the shipped one when
    ``profile`` is None).  ``raw``: rounds of the loops already measured
    (:func:`calibrate`) to take the measured units from, instead of
    measuring ``rounds`` now."""
    prof = load_profile() if profile is None else profile
    todo = [u for u in MEASURED_UNITS if u not in prof]
    units = dict(prof)
    if todo:
        measured = measure_units(rounds) if raw is None else units_from_raw(raw)
        for u in todo:
            units[u] = measured[u]
    return units


def needs_calibration(profile: dict[str, dict[str, Any]]) -> bool:
    """Whether some unit of :data:`MEASURED_UNITS` is left for the host to
    measure (not pinned by ``profile``)."""
    return any(u not in profile for u in MEASURED_UNITS)


def estimate_terms(work: dict[str, int], units: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The terms of the kernel-cost estimate of one cell: for each count, the
    count, the unit cost it is multiplied by and the product (ns).

    ``work`` is :func:`kernel_work` with ``detail=True`` (the split of the
    invalidations into those issued now and those queued is in the detail).
    """
    inv_now = work.get("_walk_invalidations", 0)
    unmap_inv = work.get("_unmap_invalidations", 0)
    queued = bool(work.get("_queued", 0))
    if queued:
        inv_queued = unmap_inv
    else:
        inv_now += unmap_inv
        inv_queued = 0
    if inv_now + inv_queued != work["iotlb_invalidations"]:
        raise ValueError("estimate_terms: the work lacks its detail (kernel_work(..., detail=True))")
    # alloc_iova_fast rounds a request below 32 granules up to a power of
    # two and serves every size up to 32 from the per-CPU rcache
    # (iova_rcache_get; IOVA_RANGE_CACHE_MAX_SIZE = 6 bins); a repeated
    # map + unmap finds its range there again (free_iova_fast put it back).
    # Larger ranges take the tree both ways.
    small = 0 < work.get("_iova_granules", 0) <= 32
    rows = [
        ("iova_allocs", work["iova_allocs"], "iova_rcache_alloc" if small else "iova_alloc"),
        ("iova_frees", work["iova_frees"], "iova_rcache_free" if small else "iova_free"),
        ("iommu_map_calls", work["iommu_map_calls"], "iommu_map_call"),
        ("iommu_unmap_calls", work["iommu_unmap_calls"], "iommu_unmap_call"),
        ("iotlb_sync_map", work["iotlb_sync_map"], "iotlb_sync_map"),
        ("iotlb_invalidations (issued)", inv_now, "iotlb_invalidation"),
        ("iotlb_invalidations (queued)", inv_queued, "iotlb_invalidation_queued"),
        ("pte_writes", work["pte_writes"], "pte_write"),
        ("pt_walks", work["pt_walks"], "walk"),
        ("sg_entry_visits", work["sg_entry_visits"], "entry_visit"),
        ("metadata_bytes", work["metadata_bytes"], "metadata_byte"),
    ]
    return [{"count_of": name, "count": int(n), "unit": unit, "unit_ns": units[unit]["ns"],
             "ns": int(n) * units[unit]["ns"]} for name, n, unit in rows]


def estimate_ns_per_page(terms: list[dict[str, Any]], npages: int) -> float:
    """The estimate: the sum of the terms over the buffer's pages."""
    return float(sum(t["ns"] for t in terms)) / npages if npages else 0.0


def parse_cell(text: str) -> tuple[str, int, str]:
    """``LAYOUT:PAGES:STRATEGY`` (e.g. ``scattered:65536:sg_iommu``; PAGES
    may also be a size with a K/M/G suffix, e.g. ``scattered:256M:link_pages``)
    -> (layout, npages, strategy).  ValueError for anything else."""
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"cell {text!r}: expected LAYOUT:PAGES:STRATEGY, e.g. scattered:65536:sg_iommu")
    lay, size, strat = parts
    s = size.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if s and s[-1] in "KMG":
            nbytes = int(float(s[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[s[-1]])
            if nbytes % PAGE_SIZE or nbytes <= 0:
                raise ValueError
            npages = nbytes // PAGE_SIZE
        else:
            npages = int(s)
    except ValueError:
        raise ValueError(f"cell {text!r}: PAGES must be a page count or a size like 256M") from None
    if npages < 1:
        raise ValueError(f"cell {text!r}: PAGES must be at least 1")
    return lay, npages, strat


def format_explain(cell: dict[str, Any], units: dict[str, dict[str, Any]] | None = None) -> str:
    """One cell's estimate written out: each count x unit cost = ns, the
    total and per page, with the model's own CPU time beside it.  ``cell``
    is a cell of a study result (it must carry ``kernel_est_terms``)."""
    terms = cell.get("kernel_est_terms")
    if not terms:
        raise ValueError(f"cell {cell.get('layout')}:{cell.get('npages')}:{cell.get('strategy')} "
                         "has no kernel estimate")
    n = cell["npages"]
    lines = [f"{cell['layout']}:{n}:{cell['strategy']}  ({n} pages, {n * PAGE_SIZE} bytes)",
             f"kernel path: {PATHS.get(cell['strategy'], '?')}", ""]
    w = max(len(t["count_of"]) for t in terms)
    lines.append(f"{'count of':<{w}} {'count':>12}   {'unit (ns)':>10}   {'ns':>14}   unit")
    total = 0.0
    for t in terms:
        total += t["ns"]
        lines.append(f"{t['count_of']:<{w}} {t['count']:>12} x {t['unit_ns']:>10.4g} = {t['ns']:>14.1f}   {t['unit']}")
    lines.append(f"{'total':<{w}} {'':>12}   {'':>10}   {total:>14.1f}")
    lines.append(f"kernel estimate: {total / n:.3f} ns/page")
    k = cell.get("counters", {})
    lines.append(f"model CPU time (this model's implementation, not the kernel): {cell['ns_per_page']:.3f} ns/page"
                 + (f" (median of map + unmap; medians apart: map {k['map_ns_per_page']:.3f}, "
                    f"unmap {k['unmap_ns_per_page']:.3f})" if "map_ns_per_page" in k else ""))
    if units:
        lines.append("")
        lines.append("unit costs:")
        for u in sorted({t["unit"] for t in terms}):
            lines.append(f"  {u} = {units[u]['ns']:.4g} ns: {units[u]['source']}")
    return "\n".join(lines)
