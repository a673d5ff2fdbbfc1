# IO page tables: the model of io-pgtable-arm (LPAE, 4 KiB granule) under
# the core's iommu_map() / __iommu_unmap() loops (drivers/iommu/iommu.c).
#
# Tables are real 4 KiB arrays of 512 u64 entries, allocated on demand and
# linked by descriptors holding the table's address.  Leaves are 4K pages
# at level 3 and 2M / 1G blocks at levels 2 / 1.  A map call is checked in
# full before anything is written (alignment, sizes, prot, and that no leaf
# lies in the IOVA span), so the only failure left while writing is a host
# allocation failure, which is rolled back with a journal of the tables the
# call installed.  A cursor remembers the last level-3 table written so that
# back-to-back small maps skip the walk from the top.

from libc.stdint cimport uintptr_t

cdef extern from "pdb_pgtable.h":
    uint64_t *pdb_table_alloc() nogil

cdef enum:
    _PTE_TYPE_MASK = 3
    _PTE_TYPE_BLOCK = 1
    _PTE_TYPE_TABLE = 3                 # also a level-3 page
    _PTE_PROT_SHIFT = 2
    _SZ_4K = 0x1000
    _SZ_2M = 0x200000
    _SZ_1G = 0x40000000

cdef extern from "pdb_pgtable.h":
    const uint64_t PDB_PTE_ADDR_MASK
    const uint64_t PDB_PGSIZE_BITMAP


cdef inline uint32_t _lvl_shift(int l) noexcept nogil:
    return 12 + 9 * (3 - l)


cdef inline uint64_t _blk(int l) noexcept nogil:
    return (<uint64_t>1) << _lvl_shift(l)


cdef inline uint64_t _nent(const io_pgtable *pt, int l) noexcept nogil:
    return pt.pgd_entries if l == pt.start_level else PDB_PGT_ENTRIES


cdef inline uint64_t _idx(const io_pgtable *pt, uint64_t iova, int l) noexcept nogil:
    return (iova >> _lvl_shift(l)) & (_nent(pt, l) - 1)


cdef inline bint _is_leaf(uint64_t e, int l) noexcept nogil:
    if l == 3:
        return (e & _PTE_TYPE_MASK) == _PTE_TYPE_TABLE
    return (e & _PTE_TYPE_MASK) == _PTE_TYPE_BLOCK


cdef inline uint64_t *_tbl(uint64_t e) noexcept nogil:
    return <uint64_t *><uintptr_t>(e & ~(<uint64_t>0xFFF))


cdef inline uint64_t _genmask(int h) noexcept nogil:
    """GENMASK(h, 0)."""
    return PDB_U64_MAX if h >= 63 else ((<uint64_t>1) << (h + 1)) - 1


cdef uint64_t _iommu_pgsize(uint64_t iova, uint64_t paddr, uint64_t size,
                            uint64_t *count) noexcept nogil:
    """iommu_pgsize(): the largest page size that the alignment of iova and
    paddr and the remaining size allow; count stops at the next larger
    size's boundary when iova and paddr are equally placed within it and a
    larger page would fit there."""
    cdef uint64_t addr_merge = paddr | iova
    cdef uint64_t pgsizes = PDB_PGSIZE_BITMAP & _genmask(_fls64(size) - 1)
    cdef uint64_t pgsize, nxt, pgsize_next, offset, offset_end
    cdef int idx
    if addr_merge:
        pgsizes &= _genmask(pdb_ctz64(addr_merge))
    idx = _fls64(pgsizes) - 1
    pgsize = (<uint64_t>1) << idx
    nxt = PDB_PGSIZE_BITMAP & ~_genmask(idx)
    if nxt:
        pgsize_next = (<uint64_t>1) << pdb_ctz64(nxt)
        if ((iova ^ paddr) & (pgsize_next - 1)) == 0:
            offset = pgsize_next - (addr_merge & (pgsize_next - 1))
            if not pdb_add_overflow(offset, pgsize_next, &offset_end) and offset_end <= size:
                size = offset
    count[0] = size >> idx
    return pgsize


# ------------------------------------------------------------ set-up

cdef void _pgt_free_all(uint64_t *tbl, int l) noexcept nogil:
    cdef uint64_t e
    cdef int i
    if l < 3:
        for i in range(PDB_PGT_ENTRIES):
            e = tbl[i]
            if e != 0 and not _is_leaf(e, l):
                _pgt_free_all(_tbl(e), l + 1)
    free(tbl)


cdef int pgt_init(io_pgtable *pt, uint32_t ias, uint32_t oas,
                  bint defer_table_free) noexcept nogil:
    """ias: input (IOVA) bits, 32..48; oas: output (physical) bits, 32..52."""
    cdef uint32_t va_bits, levels
    memset(pt, 0, sizeof(io_pgtable))
    if ias < 32 or ias > 48 or oas < 32 or oas > 52:
        return -EINVAL
    va_bits = ias - 12
    levels = (va_bits + 8) // 9
    pt.ias = ias
    pt.oas = oas
    pt.start_level = <int32_t>(4 - levels)
    pt.pgd_entries = (<uint32_t>1) << (va_bits - 9 * (levels - 1))
    pt.defer_table_free = defer_table_free
    pt.fail_alloc_after = PDB_U64_MAX
    pt.pgd = pdb_table_alloc()
    if pt.pgd == NULL:
        return -ENOMEM
    pt.c.table_pages = 1
    return 0


cdef void pgt_destroy(io_pgtable *pt) noexcept nogil:
    cdef uint64_t *nxt
    if pt.pgd != NULL:
        _pgt_free_all(pt.pgd, pt.start_level)
        pt.pgd = NULL
    while pt.pool != NULL:
        nxt = <uint64_t *><uintptr_t>pt.pool[0]
        free(pt.pool)
        pt.pool = nxt
    pt.pool_len = 0
    free(pt.journal)
    pt.journal = NULL
    pt.cur_pte = NULL


cdef uint64_t *_pgt_alloc_table(io_pgtable *pt) noexcept nogil:
    """A zeroed table page: a pooled one if any (the host's page allocator
    is not what the model measures), else fresh memory."""
    cdef uint64_t *t
    if pt.fail_alloc_after != PDB_U64_MAX:
        if pt.fail_alloc_after == 0:
            pt.fail_alloc_after = PDB_U64_MAX
            return NULL
        pt.fail_alloc_after -= 1
    if pt.pool != NULL:
        t = pt.pool
        pt.pool = <uint64_t *><uintptr_t>t[0]
        pt.pool_len -= 1
        memset(t, 0, PDB_PAGE_SIZE)
        return t
    return pdb_table_alloc()


cdef inline void _pgt_give_table(io_pgtable *pt, uint64_t *t) noexcept nogil:
    if pt.pool_len < PDB_PGT_POOL_MAX:
        t[0] = <uint64_t><uintptr_t>pt.pool
        pt.pool = t
        pt.pool_len += 1
    else:
        free(t)


# ------------------------------------------------------------ gathers

cdef void pgt_gather_init(pgt_gather *g) noexcept nogil:
    """iommu_iotlb_gather_init(); the freelist must be empty."""
    g.start = PDB_U64_MAX
    g.end = 0
    g.pgsize = 0
    g.queued = False
    g.freelist = NULL
    g.nfree = 0


cdef void pgt_release_tables(io_pgtable *pt, uint64_t *freelist) noexcept nogil:
    """Give back table pages whose invalidation is done."""
    cdef uint64_t *nxt
    while freelist != NULL:
        nxt = <uint64_t *><uintptr_t>freelist[0]
        _pgt_give_table(pt, freelist)
        pt.c.table_pages_pending -= 1
        freelist = nxt


cdef void pgt_iotlb_sync(io_pgtable *pt, pgt_gather *g) noexcept nogil:
    """iommu_iotlb_sync(): one range invalidation for what was gathered
    (nothing if the gather is empty), then the gather's table pages go."""
    if g.pgsize:
        pt.c.range_invalidations += 1
    pgt_release_tables(pt, g.freelist)
    pgt_gather_init(g)


cdef void pgt_gather_add_page(io_pgtable *pt, pgt_gather *g, uint64_t iova,
                              uint64_t size) noexcept nogil:
    """iommu_iotlb_gather_add_page(): a page of another size, or one
    disjoint from the gathered range, syncs what was gathered first."""
    cdef uint64_t end = iova + size - 1
    if (g.pgsize and g.pgsize != size) or (g.end != 0 and (end + 1 < g.start or iova > g.end + 1)):
        pgt_iotlb_sync(pt, g)
    g.pgsize = size
    if g.start > iova:
        g.start = iova
    if g.end < end:
        g.end = end


cdef void pgt_flush_iotlb_all(io_pgtable *pt) noexcept nogil:
    pt.c.full_flushes += 1


# ------------------------------------------------------------ freeing

cdef void _pgt_free_tree(io_pgtable *pt, uint64_t *tbl, int l, pgt_gather *g) noexcept nogil:
    """Free table tbl (at level l) and everything under it; its leaves stop
    counting as mapped.  With defer_table_free and a gather the pages wait
    on the gather's freelist (or the flush queue) instead."""
    cdef uint64_t e, leaves = 0
    cdef int i
    if l == 3:
        # Every non-zero entry of a level-3 table is a page: count them in
        # one branch-free pass into a local (a counter in *pt would be
        # re-read and re-written per entry, since tbl may alias it).  Like
        # __arm_lpae_free_pgtable(), the entries themselves are not
        # written: the whole page goes.
        for i in range(PDB_PGT_ENTRIES):
            leaves += tbl[i] != 0
        pt.c.mapped_nbytes -= leaves << 12
    else:
        for i in range(PDB_PGT_ENTRIES):
            e = tbl[i]
            if e == 0:
                continue
            if _is_leaf(e, l):
                leaves += 1
            else:
                _pgt_free_tree(pt, _tbl(e), l + 1, g)
        pt.c.mapped_nbytes -= leaves * _blk(l)
    pt.c.table_pages -= 1
    pt.c.table_pages_freed += 1
    if g != NULL and pt.defer_table_free:
        tbl[0] = <uint64_t><uintptr_t>g.freelist
        g.freelist = tbl
        g.nfree += 1
        pt.c.table_pages_pending += 1
    else:
        _pgt_give_table(pt, tbl)


cdef void _pgt_clear_table_entry(io_pgtable *pt, uint64_t *ep, int l, pgt_gather *g) noexcept nogil:
    """Clear a table descriptor at level l and free what it points to; the
    walk caches are invalidated at once unless the pages wait for a flush."""
    cdef uint64_t *child = _tbl(ep[0])
    ep[0] = 0
    pt.c.table_clears += 1
    pt.cur_pte = NULL
    if not (g != NULL and pt.defer_table_free):
        pt.c.walk_invalidations += 1
    _pgt_free_tree(pt, child, l + 1, g)


# ------------------------------------------------------------ map

cdef int _pgt_check_map(const io_pgtable *pt, uint64_t iova, uint64_t phys, uint64_t size,
                        uint32_t prot) noexcept nogil:
    """The refusals of iommu_map_nosync() and map_pages, in their order."""
    cdef uint64_t last
    if (iova | phys | size) & (_SZ_4K - 1):
        return -EINVAL
    if size == 0:
        return 0
    if pdb_add_overflow(iova, size - 1, &last) or (last >> pt.ias) != 0:
        return -ERANGE
    if pdb_add_overflow(phys, size - 1, &last) or (last >> pt.oas) != 0:
        return -ERANGE
    if (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) == 0 or (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)):
        return -EINVAL
    return 0


cdef bint _pgt_span_has_leaf(const io_pgtable *pt, const uint64_t *tbl, int l,
                             uint64_t lo, uint64_t hi) noexcept nogil:
    """Is any part of [lo, hi] (inside tbl's reach) mapped by a leaf?"""
    cdef uint32_t sh = _lvl_shift(l)
    cdef uint64_t mask = _nent(pt, l) - 1
    cdef uint64_t i0 = (lo >> sh) & mask
    cdef uint64_t i1 = (hi >> sh) & mask
    cdef uint64_t i, e, base, top, clo, chi
    if l == 3:
        for i in range(i0, i1 + 1):
            if tbl[i] != 0:
                return True
        return False
    for i in range(i0, i1 + 1):
        e = tbl[i]
        if e == 0:
            continue
        if _is_leaf(e, l):
            return True
        base = ((lo >> sh) + (i - i0)) << sh
        top = base + (((<uint64_t>1) << sh) - 1)
        clo = lo if lo > base else base
        chi = hi if hi < top else top
        if _pgt_span_has_leaf(pt, _tbl(e), l + 1, clo, chi):
            return True
    return False


cdef void _pgt_clear_leaves(io_pgtable *pt, uint64_t *tbl, int l, uint64_t lo,
                            uint64_t hi) noexcept nogil:
    """Zero the leaves in [lo, hi] without counting (rollback only)."""
    cdef uint32_t sh = _lvl_shift(l)
    cdef uint64_t mask = _nent(pt, l) - 1
    cdef uint64_t i0 = (lo >> sh) & mask
    cdef uint64_t i1 = (hi >> sh) & mask
    cdef uint64_t i, e, base, top, clo, chi
    for i in range(i0, i1 + 1):
        e = tbl[i]
        if e == 0:
            continue
        if _is_leaf(e, l):
            tbl[i] = 0
            continue
        base = ((lo >> sh) + (i - i0)) << sh
        top = base + (((<uint64_t>1) << sh) - 1)
        clo = lo if lo > base else base
        chi = hi if hi < top else top
        _pgt_clear_leaves(pt, _tbl(e), l + 1, clo, chi)


cdef inline void _pgt_journal_reset(io_pgtable *pt) noexcept nogil:
    pt.journal_len = 0
    pt.torn_tables = 0
    pt.torn_walks = 0


cdef void _pgt_rollback(io_pgtable *pt, uint64_t iova, uint64_t nbytes,
                        const pgt_counters *snap) noexcept nogil:
    """Undo a map that failed on a host allocation: clear its leaves, free
    the tables it installed (newest first), restore the counters.  Empty
    tables a block replaced stay freed (their counts are kept)."""
    cdef uint64_t *ep
    cdef uint64_t torn = pt.torn_tables
    cdef uint64_t walks = pt.torn_walks
    if nbytes:
        _pgt_clear_leaves(pt, pt.pgd, pt.start_level, iova, iova + nbytes - 1)
    while pt.journal_len:
        pt.journal_len -= 1
        ep = pt.journal[pt.journal_len]
        _pgt_give_table(pt, _tbl(ep[0]))
        ep[0] = 0
    pt.c = snap[0]
    pt.c.table_pages -= torn
    pt.c.table_pages_freed += torn
    pt.c.table_clears += walks
    pt.c.walk_invalidations += walks
    pt.cur_pte = NULL
    _pgt_journal_reset(pt)


cdef int64_t _pgt_map_pages(io_pgtable *pt, uint64_t iova, uint64_t phys, uint64_t pgsize,
                            uint64_t count, uint64_t pbits) noexcept nogil:
    """arm_lpae_map_pages() on a checked span: up to count leaves of pgsize
    in one table; returns the bytes mapped or -ENOMEM."""
    cdef int lvl = 3 if pgsize == _SZ_4K else (2 if pgsize == _SZ_2M else 1)
    cdef int l = pt.start_level
    cdef uint64_t *tbl = pt.pgd
    cdef uint64_t *child
    cdef uint64_t **j
    cdef uint64_t idx, e, n, i, pte, freed
    while l < lvl:
        idx = _idx(pt, iova, l)
        e = tbl[idx]
        if e == 0:
            if pt.journal_len == pt.journal_cap:
                n = pt.journal_cap * 2 if pt.journal_cap else 16
                j = <uint64_t **>realloc(pt.journal, n * sizeof(uint64_t *))
                if j == NULL:
                    return -ENOMEM
                pt.journal = j
                pt.journal_cap = n
            child = _pgt_alloc_table(pt)
            if child == NULL:
                return -ENOMEM
            tbl[idx] = <uint64_t><uintptr_t>child | _PTE_TYPE_TABLE
            pt.journal[pt.journal_len] = &tbl[idx]
            pt.journal_len += 1
            pt.c.table_sets += 1
            pt.c.table_pages += 1
            pt.c.table_pages_allocated += 1
            tbl = child
        else:
            tbl = _tbl(e)
        l += 1
    idx = _idx(pt, iova, lvl)
    n = _nent(pt, lvl) - idx
    if count < n:
        n = count
    pte = phys | pbits | (_PTE_TYPE_TABLE if lvl == 3 else _PTE_TYPE_BLOCK)
    if lvl < 3:
        for i in range(n):
            if tbl[idx + i] != 0:
                # A table with no leaf under it: arm_lpae_init_pte() unmaps
                # it (descriptor cleared, walk caches flushed, pages freed)
                # before the block goes in.
                freed = pt.c.table_pages_freed
                _pgt_clear_table_entry(pt, &tbl[idx + i], lvl, NULL)
                pt.torn_tables += pt.c.table_pages_freed - freed
                pt.torn_walks += 1
    for i in range(n):
        tbl[idx + i] = pte + i * pgsize
    pt.c.leaf_sets += n
    pt.c.mapped_nbytes += n * pgsize
    if lvl == 3:
        pt.cur_pte = tbl
        pt.cur_base = iova >> 21
    return <int64_t>(n * pgsize)


cdef int _pgt_map_range(io_pgtable *pt, uint64_t iova, uint64_t phys, uint64_t size,
                        uint64_t pbits, uint64_t *done) noexcept nogil:
    """The iommu_map_nosync() loop over a checked span.  Each caller has
    already written a span that fits the cursor's level-3 table itself."""
    cdef uint64_t pgsize, count
    cdef int64_t r
    while size:
        pgsize = _iommu_pgsize(iova, phys, size, &count)
        r = _pgt_map_pages(pt, iova, phys, pgsize, count, pbits)
        if r < 0:
            return <int>r
        done[0] += <uint64_t>r
        iova += <uint64_t>r
        phys += <uint64_t>r
        size -= <uint64_t>r
    return 0


cdef int _pgt_map_in_cursor(io_pgtable *pt, uint64_t iova, uint64_t phys, uint64_t size,
                            uint32_t prot) noexcept nogil:
    cdef uint64_t *ep = &pt.cur_pte[(iova >> 12) & (PDB_PGT_ENTRIES - 1)]
    cdef uint64_t n = size >> 12, i
    cdef uint64_t pte = phys | (<uint64_t>prot << _PTE_PROT_SHIFT) | _PTE_TYPE_TABLE
    for i in range(n):
        if ep[i] != 0:
            return -EEXIST
    for i in range(n):
        ep[i] = pte + (i << 12)
    pt.c.leaf_sets += n
    pt.c.mapped_nbytes += size
    return 0


cdef int pgt_map(io_pgtable *pt, uint64_t iova, uint64_t phys, uint64_t size,
                 uint32_t prot) noexcept nogil:
    cdef uint64_t done = 0
    cdef pgt_counters snap
    cdef int rc
    rc = _pgt_check_map(pt, iova, phys, size, prot)
    if rc < 0 or size == 0:
        return rc
    # A span of pages inside the cursor's level-3 table (below 2M the
    # page-size selection can only pick 4K): check and write, no walk.
    if size < _SZ_2M and pt.cur_pte != NULL and (iova >> 21) == pt.cur_base \
            and ((iova + size - 1) >> 21) == pt.cur_base:
        return _pgt_map_in_cursor(pt, iova, phys, size, prot)
    if _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, iova, iova + size - 1):
        return -EEXIST
    snap = pt.c
    _pgt_journal_reset(pt)
    rc = _pgt_map_range(pt, iova, phys, size, <uint64_t>prot << _PTE_PROT_SHIFT, &done)
    if rc < 0:
        _pgt_rollback(pt, iova, done, &snap)
        return rc
    _pgt_journal_reset(pt)
    return 0


cdef int64_t _pgt_check_bulk(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                             const uint64_t *lens, uint64_t len_each, uint64_t n,
                             uint32_t prot, uint64_t *bad, uint64_t stride=1) noexcept nogil:
    """Check every range of a bulk map; the total bytes or -errno."""
    cdef uint64_t i, ln, total = 0, at
    cdef int rc
    for i in range(n):
        ln = lens[i * stride] if lens != NULL else len_each
        if pdb_add_overflow(iova, total, &at):
            bad[0] = i
            return -ERANGE
        rc = _pgt_check_map(pt, at, phys[i * stride], ln, prot)
        if rc < 0:
            bad[0] = i
            return rc
        total += ln
    if total and _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, iova, iova + total - 1):
        at = iova
        for i in range(n):
            ln = lens[i * stride] if lens != NULL else len_each
            if ln and _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, at, at + ln - 1):
                bad[0] = i
                break
            at += ln
        return -EEXIST
    return <int64_t>total


cdef bint _pgt_bulk_plain(const io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                          uint64_t len_each, uint64_t n, uint32_t prot, uint64_t stride=1) noexcept nogil:
    """For ranges of one length: are they all obviously fine (aligned, in
    range, good prot)?  A reduction the compiler vectorises; anything
    doubtful goes through the per-range checks for the exact error."""
    cdef uint64_t acc = 0, top = 0, i, p, total
    if len_each == 0 or (len_each & (_SZ_4K - 1)) or n > (PDB_U64_MAX >> 1) // len_each:
        return False
    if (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) == 0 or (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)):
        return False
    total = n * len_each
    if (iova & (_SZ_4K - 1)) or pdb_add_overflow(iova, total - 1, &p) or (p >> pt.ias):
        return False
    if len_each == _SZ_4K:
        # For aligned pages p + 4095 == p | 4095: one OR covers both checks.
        for i in range(n):
            acc |= phys[i * stride]
        return (acc & (_SZ_4K - 1)) == 0 and (acc >> pt.oas) == 0
    for i in range(n):
        p = phys[i * stride]
        acc |= p
        top = p if p > top else top
    if acc & (_SZ_4K - 1):
        return False
    return not (pdb_add_overflow(top, len_each - 1, &p) or (p >> pt.oas))


cdef int64_t pgt_map_bulk(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                          const uint64_t *lens, uint64_t len_each, uint64_t n,
                          uint32_t prot, uint64_t *bad) noexcept nogil:
    return pgt_map_bulk_strided(pt, iova, phys, lens, len_each, n, 1, prot, bad)


cdef int64_t pgt_map_bulk_strided(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                  const uint64_t *lens, uint64_t len_each, uint64_t n,
                                  uint64_t stride, uint32_t prot, uint64_t *bad) noexcept nogil:
    return _pgt_map_bulk_impl(pt, iova, phys, lens, len_each, n, stride, prot, bad, 0)


cdef int64_t pgt_map_bulk_prechecked(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                     const uint64_t *lens, uint64_t len_each, uint64_t n,
                                     uint64_t stride, uint32_t prot, uint64_t total,
                                     uint64_t *bad) noexcept nogil:
    """pgt_map_bulk_strided() for a caller that has already checked every
    range is granule aligned and non-empty, ``total`` is their sum, the
    output addresses fit ``oas`` bits, ``[iova, iova + total)`` fits
    ``ias`` bits and ``prot`` is valid: only the leaves in the way are
    looked for (-EEXIST then, as the full check would say)."""
    return _pgt_map_bulk_impl(pt, iova, phys, lens, len_each, n, stride, prot, bad, total)


cdef int64_t _pgt_map_bulk_impl(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                const uint64_t *lens, uint64_t len_each, uint64_t n,
                                uint64_t stride, uint32_t prot, uint64_t *bad,
                                uint64_t prechecked) noexcept nogil:
    cdef int64_t total
    cdef uint64_t pbits = <uint64_t>prot << _PTE_PROT_SHIFT
    cdef uint64_t i, j, k, ln, at = iova, done = 0, idx, pte
    cdef uint64_t *tbl
    cdef pgt_counters snap
    cdef int rc
    if prechecked:
        total = <int64_t>prechecked
        if _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, iova, iova + <uint64_t>total - 1):
            total = _pgt_check_bulk(pt, iova, phys, lens, len_each, n, prot, bad, stride)
    elif lens == NULL and _pgt_bulk_plain(pt, iova, phys, len_each, n, prot, stride):
        total = <int64_t>(n * len_each)
        if _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, iova, iova + <uint64_t>total - 1):
            total = _pgt_check_bulk(pt, iova, phys, lens, len_each, n, prot, bad, stride)
    else:
        total = _pgt_check_bulk(pt, iova, phys, lens, len_each, n, prot, bad, stride)
    if total <= 0:
        return total
    snap = pt.c
    _pgt_journal_reset(pt)
    i = 0
    while i < n:
        ln = lens[i * stride] if lens != NULL else len_each
        if ln == _SZ_4K and pt.cur_pte != NULL and (at >> 21) == pt.cur_base:
            # A run of single pages inside the cursor's table: what
            # iommu_map_nosync() writes for each, without the walk.
            tbl = pt.cur_pte
            idx = (at >> 12) & (PDB_PGT_ENTRIES - 1)
            k = PDB_PGT_ENTRIES - idx
            if k > n - i:
                k = n - i
            if lens != NULL:
                j = 1
                while j < k and lens[(i + j) * stride] == _SZ_4K:
                    j += 1
                k = j
            for j in range(k):
                tbl[idx + j] = phys[(i + j) * stride] | pbits | _PTE_TYPE_TABLE
            pt.c.leaf_sets += k
            pt.c.mapped_nbytes += k << 12
            done += k << 12
            at += k << 12
            i += k
            continue
        if ln and ln < _SZ_2M and pt.cur_pte != NULL and (at >> 21) == pt.cur_base \
                and ((at + ln - 1) >> 21) == pt.cur_base:
            # A run of pages inside the cursor's table (the span was checked
            # for leaves above): what the map_pages call writes, no walk.
            tbl = pt.cur_pte
            idx = (at >> 12) & (PDB_PGT_ENTRIES - 1)
            k = ln >> 12
            pte = phys[i * stride] | pbits | _PTE_TYPE_TABLE
            for j in range(k):
                tbl[idx + j] = pte + (j << 12)
            pt.c.leaf_sets += k
            pt.c.mapped_nbytes += ln
            done += ln
            at += ln
            i += 1
            continue
        if ln:
            rc = _pgt_map_range(pt, at, phys[i * stride], ln, pbits, &done)
            if rc < 0:
                bad[0] = i
                _pgt_rollback(pt, iova, done, &snap)
                return rc
        at += ln
        i += 1
    _pgt_journal_reset(pt)
    return total


cdef int64_t pgt_map_pages_fused(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                 const uint64_t *lens, uint64_t n, uint64_t stride, uint32_t prot,
                                 uint64_t *bad) noexcept nogil:
    """Map n 4 KiB pages at consecutive IOVAs from iova (page i at
    phys[i * stride]) in ONE pass over the input: the pages are checked as
    they are written, and a bad page (unaligned, beyond the output size)
    rolls the whole call back and lets the checked path report it.  Same
    result, errors and counters as pgt_map_bulk_strided().  With ``lens``
    (lens[i * stride] must all be 4096) a length that is not one page rolls
    back too and returns -EAGAIN: the caller takes its general path."""
    cdef uint64_t pbits = <uint64_t>prot << _PTE_PROT_SHIFT
    cdef uint64_t i, j, k, v, at = iova, done = 0, idx, acc = 0, accl = 0, total, last
    cdef uint64_t *tbl
    cdef pgt_counters snap
    cdef int rc
    if n == 0 or (iova & (_SZ_4K - 1)) or n > (PDB_U64_MAX >> 13) \
            or pdb_add_overflow(iova, (n << 12) - 1, &last) or (last >> pt.ias) \
            or (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) == 0 or (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)) \
            or _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, iova, last):
        return _pgt_map_bulk_impl(pt, iova, phys, NULL, _SZ_4K, n, stride, prot, bad, 0)
    total = n << 12
    snap = pt.c
    _pgt_journal_reset(pt)
    i = 0
    while i < n:
        if pt.cur_pte != NULL and (at >> 21) == pt.cur_base:
            tbl = pt.cur_pte
            idx = (at >> 12) & (PDB_PGT_ENTRIES - 1)
            k = PDB_PGT_ENTRIES - idx
            if k > n - i:
                k = n - i
            if lens != NULL:
                for j in range(k):
                    v = phys[(i + j) * stride]
                    acc |= v
                    accl |= lens[(i + j) * stride] ^ _SZ_4K
                    tbl[idx + j] = v | pbits | _PTE_TYPE_TABLE
            else:
                for j in range(k):
                    v = phys[(i + j) * stride]
                    acc |= v
                    tbl[idx + j] = v | pbits | _PTE_TYPE_TABLE
            pt.c.leaf_sets += k
            pt.c.mapped_nbytes += k << 12
            done += k << 12
            at += k << 12
            i += k
            continue
        v = phys[i * stride]
        acc |= v
        if lens != NULL:
            accl |= lens[i * stride] ^ _SZ_4K
        rc = _pgt_map_range(pt, at, v & ~(<uint64_t>_SZ_4K - 1), _SZ_4K, pbits, &done)
        if rc < 0:
            bad[0] = i
            _pgt_rollback(pt, iova, done, &snap)
            return rc
        at += _SZ_4K
        i += 1
    if accl:
        _pgt_rollback(pt, iova, done, &snap)
        return -EAGAIN
    if (acc & (_SZ_4K - 1)) or (acc >> pt.oas):
        _pgt_rollback(pt, iova, done, &snap)
        return _pgt_map_bulk_impl(pt, iova, phys, NULL, _SZ_4K, n, stride, prot, bad, 0)
    _pgt_journal_reset(pt)
    return <int64_t>total


cdef int64_t _pgt_map_each(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                           const uint64_t *lens, uint64_t len_each, uint64_t n,
                           uint32_t prot, uint64_t *bad) noexcept nogil:
    """What a walk linking range by range does: one pgt_map() per range.
    Checked in full first, so only a host allocation failure can stop it;
    then the leaves written so far are cleared and the leaf counters
    restored (tables installed by the earlier calls stay, empty)."""
    cdef int64_t total
    cdef uint64_t i, ln, at = iova
    cdef uint64_t leaf_sets = pt.c.leaf_sets
    cdef uint64_t mapped = pt.c.mapped_nbytes
    cdef int rc
    if lens == NULL and _pgt_bulk_plain(pt, iova, phys, len_each, n, prot) \
            and not _pgt_span_has_leaf(pt, pt.pgd, pt.start_level, iova, iova + n * len_each - 1):
        total = <int64_t>(n * len_each)
    else:
        total = _pgt_check_bulk(pt, iova, phys, lens, len_each, n, prot, bad)
    if total <= 0:
        return total
    for i in range(n):
        ln = lens[i] if lens != NULL else len_each
        if ln == _SZ_4K:
            rc = pgt_map_page(pt, at, phys[i], prot)
        else:
            rc = pgt_map(pt, at, phys[i], ln, prot)
        if rc < 0:
            bad[0] = i
            if at > iova:
                _pgt_clear_leaves(pt, pt.pgd, pt.start_level, iova, at - 1)
            pt.c.leaf_sets = leaf_sets
            pt.c.mapped_nbytes = mapped
            pt.cur_pte = NULL
            return rc
        at += ln
    return total


# ------------------------------------------------------------ unmap

cdef uint64_t _pgt_unmap_pages(io_pgtable *pt, uint64_t iova, uint64_t pgsize, uint64_t count,
                               pgt_gather *g) noexcept nogil:
    """__arm_lpae_unmap() from the top: the bytes unmapped, 0 at a hole or
    at a block larger than pgsize (a partial block unmap is refused)."""
    cdef int l = pt.start_level
    cdef uint64_t *tbl = pt.pgd
    cdef uint64_t idx, e, n, i
    if iova >> pt.ias:
        return 0
    while True:
        idx = _idx(pt, iova, l)
        e = tbl[idx]
        if e == 0:
            return 0
        if pgsize == _blk(l):
            n = _nent(pt, l) - idx
            if count < n:
                n = count
            i = 0
            if l == 3:
                # Pages only: clear the run up to the first hole, counting
                # into a local (one update of the counters per table).
                while i < n and tbl[idx + i] != 0:
                    tbl[idx + i] = 0
                    i += 1
                pt.c.leaf_clears += i
                pt.c.mapped_nbytes -= i << 12
            while i < n:
                e = tbl[idx + i]
                if e == 0:
                    break
                if _is_leaf(e, l):
                    tbl[idx + i] = 0
                    pt.c.leaf_clears += 1
                    pt.c.mapped_nbytes -= pgsize
                else:
                    _pgt_clear_table_entry(pt, &tbl[idx + i], l, g)
                i += 1
            if g != NULL and not g.queued and i:
                # One add per cleared entry in the kernel; they are adjacent
                # and of one size, so only the first can force a sync.
                pgt_gather_add_page(pt, g, iova, pgsize)
                if i > 1:
                    g.end = iova + i * pgsize - 1
            return i * pgsize
        if _is_leaf(e, l):
            return 0
        tbl = _tbl(e)
        l += 1


cdef int64_t pgt_unmap(io_pgtable *pt, uint64_t iova, uint64_t size,
                       pgt_gather *gather) noexcept nogil:
    cdef uint64_t unmapped = 0
    cdef uint64_t pgsize, count, got
    if (iova | size) & (_SZ_4K - 1):
        return -EINVAL
    while unmapped < size:
        pgsize = _iommu_pgsize(iova, iova, size - unmapped, &count)
        got = _pgt_unmap_pages(pt, iova, pgsize, count, gather)
        if got == 0:
            break
        iova += got
        unmapped += got
    return <int64_t>unmapped


# ------------------------------------------------------------ lookups

cdef int pgt_lookup(const io_pgtable *pt, uint64_t iova, uint64_t *phys, uint32_t *prot,
                    uint64_t *leaf_size) noexcept nogil:
    """The leaf mapping ``iova``: its output address for ``iova``, its prot
    bits and its size (4K, 2M or 1G); -ENOENT when nothing maps it.
    ``prot`` and ``leaf_size`` may be NULL (iommu_iova_to_phys())."""
    cdef int l = pt.start_level
    cdef const uint64_t *tbl = pt.pgd
    cdef uint64_t e
    if iova >> pt.ias:
        return -ENOENT
    while True:
        e = tbl[_idx(pt, iova, l)]
        if e == 0:
            return -ENOENT
        if _is_leaf(e, l):
            phys[0] = (e & PDB_PTE_ADDR_MASK) | (iova & (_blk(l) - 1))
            if prot != NULL:
                prot[0] = <uint32_t>((e >> _PTE_PROT_SHIFT) & PDB_IOMMU_PROT_MASK)
            if leaf_size != NULL:
                leaf_size[0] = _blk(l)
            return 0
        tbl = _tbl(e)
        l += 1


cdef uint64_t _pgt_walk_leaves(const uint64_t *tbl, int l, uint64_t base, uint64_t nent,
                               uint64_t *out, uint64_t k) noexcept nogil:
    """Append (iova, phys, size, prot) rows for every leaf (out may be NULL
    to count); returns the new row count."""
    cdef uint64_t i, e
    cdef uint32_t sh = _lvl_shift(l)
    for i in range(nent):
        e = tbl[i]
        if e == 0:
            continue
        if _is_leaf(e, l):
            if out != NULL:
                out[4 * k] = base + (i << sh)
                out[4 * k + 1] = e & PDB_PTE_ADDR_MASK
                out[4 * k + 2] = (<uint64_t>1) << sh
                out[4 * k + 3] = (e >> _PTE_PROT_SHIFT) & PDB_IOMMU_PROT_MASK
            k += 1
        else:
            k = _pgt_walk_leaves(_tbl(e), l + 1, base + (i << sh), PDB_PGT_ENTRIES, out, k)
    return k


cdef void _pgt_count(const uint64_t *tbl, int l, uint64_t nent, uint64_t *tables,
                     uint64_t *nbytes) noexcept nogil:
    cdef uint64_t i, e
    tables[0] += 1
    for i in range(nent):
        e = tbl[i]
        if e == 0:
            continue
        if _is_leaf(e, l):
            nbytes[0] += _blk(l)
        else:
            _pgt_count(_tbl(e), l + 1, PDB_PGT_ENTRIES, tables, nbytes)


# ------------------------------------------------------------ Python class

cdef object _PGT_VIEW = object()


cdef uint32_t _prot_arg(object prot) except? 0xFFFFFFFF:
    if not isinstance(prot, int):
        raise TypeError(f"prot must be an IommuProt or an int, not {type(prot).__name__}")
    if prot < 0 or prot > 0xFFFFFFFF:
        raise _errors.InvalidArgument(f"prot {prot:#x} is not a set of IOMMU_* bits")
    return <uint32_t>prot


cdef object _map_error(int rc, uint64_t iova, uint64_t phys, uint64_t size, uint32_t prot,
                       uint32_t ias, uint32_t oas):
    if rc == -EINVAL:
        if (iova | phys | size) & (_SZ_4K - 1):
            return (f"iommu_map: iova {iova:#x}, phys {phys:#x} and size {size:#x} "
                    "must all be multiples of 4 KiB")
        return f"iommu_map: prot {prot:#x} must allow READ or WRITE and hold only IOMMU_* bits"
    if rc == -ERANGE:
        return (f"iommu_map: [{iova:#x}, +{size:#x}) -> {phys:#x} runs past the "
                f"{ias}-bit input or {oas}-bit output range")
    if rc == -EEXIST:
        return f"iommu_map: part of [{iova:#x}, +{size:#x}) is already mapped"
    return "iommu_map: out of memory for page tables"


cdef _pgt_stats_dict(const pgt_counters *c):
    return {
        "pte_writes": c.leaf_sets + c.leaf_clears + c.table_sets + c.table_clears,
        "leaf_pte_writes": c.leaf_sets + c.leaf_clears,
        "leaf_sets": c.leaf_sets,
        "leaf_clears": c.leaf_clears,
        "table_pte_writes": c.table_sets + c.table_clears,
        "table_sets": c.table_sets,
        "table_clears": c.table_clears,
        "table_pages": c.table_pages,
        "table_pages_allocated": c.table_pages_allocated,
        "table_pages_freed": c.table_pages_freed,
        "table_pages_pending": c.table_pages_pending,
        "mapped_nbytes": c.mapped_nbytes,
        "iotlb_invalidations": c.range_invalidations + c.walk_invalidations + c.full_flushes,
        "iotlb_range_invalidations": c.range_invalidations,
        "iotlb_walk_invalidations": c.walk_invalidations,
        "iotlb_full_flushes": c.full_flushes,
        "sync_map_calls": c.sync_map_calls,
    }


cdef class IoPageTable:
    """An IO page table in the io-pgtable-arm (LPAE) format, 4 KiB granule.

    512-entry tables of 8-byte entries, 4 levels for a 48-bit input (3 for
    39 bits or less); 4K pages at level 3, 2M and 1G blocks at levels 2 and
    1; tables allocated when first needed.  :meth:`map` is the kernel's
    ``iommu_map_nosync()``: each step maps with the largest page size the
    alignment of the IOVA and the physical address and the remaining
    length allow (``iommu_pgsize()``).  :meth:`unmap` is ``iommu_unmap()``.

    Parameters
    ----------
    ias : int
        Input (IOVA) address bits, 32..48.
    oas : int
        Output (physical) address bits, 32..52.
    defer_table_free : bool
        How table pages freed by an unmap are given back.  False (the
        io-pgtable-arm way): at once, after invalidating the walk caches
        for them (one walk invalidation each).  True (the VT-d way): they
        wait on the unmap's gather and go after its IOTLB sync, or ride a
        flush-queue entry in a lazy :class:`IommuDomain`.

    Notes
    -----
    Counters (:attr:`stats`) count entry changes: a leaf written or cleared,
    a table descriptor installed or cleared.  Where the kernel is loose the
    model refuses: mapping a block over a table that still holds leaves is
    ``EEXIST`` (io-pgtable-arm would free the table and its leaves), and a
    refused map changes nothing, counters included (the kernel writes and
    clears the leaves before the one in the way and syncs the IOTLB).
    Tables a leaf-level unmap empties stay until an aligned unmap covers
    them, as in the kernel.
    """

    def __cinit__(self, ias=48, oas=52, defer_table_free=False, *, _view=None):
        cdef int rc
        self.pt = NULL
        self.lock = NULL
        self.owns = False
        if _view is _PGT_VIEW:
            return
        if not isinstance(ias, int) or not isinstance(oas, int):
            raise TypeError("ias and oas must be ints")
        if ias < 32 or ias > 48:
            raise _errors.InvalidArgument(f"ias must be in 32..48 (got {ias})")
        if oas < 32 or oas > 52:
            raise _errors.InvalidArgument(f"oas must be in 32..52 (got {oas})")
        self.lock = _new_lock()
        self.pt = <io_pgtable *>calloc(1, sizeof(io_pgtable))
        if self.pt == NULL:
            raise MemoryError("cannot allocate a page table")
        rc = pgt_init(self.pt, <uint32_t>ias, <uint32_t>oas, bool(defer_table_free))
        if rc < 0:
            free(self.pt)
            self.pt = NULL
            raise MemoryError("cannot allocate a page table")
        self.owns = True

    def __dealloc__(self):
        if self.owns:
            if self.pt != NULL:
                pgt_destroy(self.pt)
                free(self.pt)
            if self.lock != NULL:
                PyThread_free_lock(self.lock)
        self.pt = NULL
        self.lock = NULL

    @property
    def ias(self):
        """Input address bits."""
        return self.pt.ias

    @property
    def oas(self):
        """Output address bits."""
        return self.pt.oas

    @property
    def levels(self):
        """Levels of tables (4 for a 48-bit input)."""
        return 4 - self.pt.start_level

    def map(self, iova, phys, nbytes, prot=PDB_IOMMU_READ | PDB_IOMMU_WRITE):
        """Map ``[iova, iova + nbytes)`` to ``[phys, phys + nbytes)``.

        Uses the largest leaves (4K, 2M, 1G) the common alignment of
        ``iova`` and ``phys`` allows.  0 bytes is a no-op.

        Raises
        ------
        InvalidArgument
            (EINVAL) ``iova``, ``phys`` or ``nbytes`` is not a multiple of
            4 KiB, or ``prot`` has neither READ nor WRITE (or unknown bits).
        OutOfRange
            (ERANGE) the IOVA range passes the input size or the physical
            range the output size.
        AlreadyExists
            (EEXIST) some of the IOVA range is already mapped.
        OutOfMemory
            (ENOMEM) no host memory for a table.  Nothing is changed by any
            failure.
        """
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t p = _u64(phys, "phys")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint32_t pr = _prot_arg(prot)
        cdef int rc
        _acquire(self.lock)
        with nogil:
            rc = pgt_map(self.pt, i, p, n, pr)
        _release(self.lock)
        if rc < 0:
            _check(rc, _map_error(rc, i, p, n, pr, self.pt.ias, self.pt.oas))

    def map_many(self, iova, phys, nbytes, prot=PDB_IOMMU_READ | PDB_IOMMU_WRITE, per_call=False):
        """Map ranges back to back from ``iova``: range ``k`` is
        ``(phys[k], nbytes[k])`` and lands right after range ``k - 1``.

        Parameters
        ----------
        iova : int
            Where the first range goes.
        phys : buffer of u64
            Physical addresses (4 KiB aligned).
        nbytes : int or buffer of u64
            One length for all, or one per range (multiples of 4 KiB).
        per_call : bool
            False: one bulk kernel (the whole span is checked once).  True:
            one map call per range, as a walk that links range by range
            does.  Same result and counters.

        Returns
        -------
        int
            Bytes mapped.  All or nothing; raises as :meth:`map` does, the
            message naming the range at fault.
        """
        cdef const uint64_t[::1] pv = _as_u64_view(phys, "phys")
        cdef const uint64_t[::1] lv
        cdef const uint64_t *lp = NULL
        cdef uint64_t each = 0
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t n = pv.shape[0]
        cdef uint32_t pr = _prot_arg(prot)
        cdef uint64_t bad = 0
        cdef bint each_call = bool(per_call)
        cdef int64_t rc
        cdef uint64_t at, k
        if isinstance(nbytes, int):
            each = _u64(nbytes, "nbytes")
        else:
            lv = _as_u64_view(nbytes, "nbytes")
            if <uint64_t>lv.shape[0] != n:
                raise ValueError(f"phys and nbytes differ in length ({n} != {lv.shape[0]})")
            if n:
                lp = &lv[0]
        if n == 0:
            return 0
        _acquire(self.lock)
        with nogil:
            if each_call:
                rc = _pgt_map_each(self.pt, i, &pv[0], lp, each, n, pr, &bad)
            else:
                rc = pgt_map_bulk(self.pt, i, &pv[0], lp, each, n, pr, &bad)
        _release(self.lock)
        if rc < 0:
            at = i
            for k in range(bad):
                at += lp[k] if lp != NULL else each
            _check(rc, f"map_many: range {bad}: " + _map_error(
                <int>rc, at, pv[bad], lp[bad] if lp != NULL else each, pr, self.pt.ias, self.pt.oas))
        return rc

    def unmap(self, iova, nbytes):
        """``iommu_unmap()``: unmap from ``iova`` on, then sync the IOTLB.

        Each step unmaps with the largest size the IOVA's alignment allows;
        clearing a table descriptor frees its whole sub-table.  Stops at the
        first hole, and before a block the range covers only in part.

        Returns
        -------
        int
            Bytes unmapped (may be less than ``nbytes``, or 0).

        Raises
        ------
        InvalidArgument
            (EINVAL) ``iova`` or ``nbytes`` is not a multiple of 4 KiB (the
            kernel logs and returns 0).
        """
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef pgt_gather g
        cdef int64_t rc
        pgt_gather_init(&g)
        _acquire(self.lock)
        with nogil:
            rc = pgt_unmap(self.pt, i, n, &g)
            if rc >= 0:
                pgt_iotlb_sync(self.pt, &g)
        _release(self.lock)
        _check(rc, lambda: f"iommu_unmap: iova {i:#x} and size {n:#x} must be multiples of 4 KiB")
        return rc

    def iova_to_phys(self, iova):
        """The physical address ``iova`` translates to, or ``None`` when
        nothing maps it (the kernel returns 0)."""
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t p = 0
        cdef int rc
        _acquire(self.lock)
        rc = pgt_lookup(self.pt, i, &p, NULL, NULL)
        _release(self.lock)
        return p if rc == 0 else None

    def iova_to_phys_many(self, iovas):
        """Translate a buffer of IOVAs; a u64 NumPy array with
        ``2**64 - 1`` where nothing is mapped."""
        cdef const uint64_t[::1] v = _as_u64_view(iovas, "iovas")
        cdef uint64_t n = v.shape[0]
        cdef _Buffer b = _new_buffer(<Py_ssize_t>n, 0, 8, b"Q")
        cdef uint64_t *out = <uint64_t *>b.data
        cdef uint64_t k
        _acquire(self.lock)
        with nogil:
            for k in range(n):
                if pgt_lookup(self.pt, v[k], &out[k], NULL, NULL) < 0:
                    out[k] = PDB_U64_MAX
        _release(self.lock)
        return _np().asarray(b)

    def leaves(self):
        """Every leaf as an ``(n, 4)`` u64 array of ``(iova, phys, size,
        prot)`` rows, in IOVA order (a copy)."""
        cdef uint64_t k
        cdef _Buffer b
        _acquire(self.lock)
        try:
            k = _pgt_walk_leaves(self.pt.pgd, self.pt.start_level, 0, self.pt.pgd_entries, NULL, 0)
            b = _new_buffer(<Py_ssize_t>k, 4, 8, b"Q")
            _pgt_walk_leaves(self.pt.pgd, self.pt.start_level, 0, self.pt.pgd_entries,
                             <uint64_t *>b.data, 0)
        finally:
            _release(self.lock)
        return _np().asarray(b)

    @property
    def stats(self):
        """Counters, as a dict.

        ``pte_writes`` (= ``leaf_pte_writes`` + ``table_pte_writes``; each
        is sets + clears), ``table_pages`` (live, the top table included),
        ``table_pages_allocated`` / ``_freed`` / ``_pending`` (freed but
        waiting for an IOTLB flush), ``mapped_nbytes``,
        ``iotlb_invalidations`` (= range + walk invalidations + full
        flushes, also given apart) and ``sync_map_calls``.
        """
        _acquire(self.lock)
        try:
            return _pgt_stats_dict(&self.pt.c)
        finally:
            _release(self.lock)

    def check(self):
        """Recount tables and mapped bytes from the tables themselves and
        compare with the counters; raises AssertionError.  For tests."""
        cdef uint64_t tables = 0, nbytes = 0
        _acquire(self.lock)
        try:
            _pgt_count(self.pt.pgd, self.pt.start_level, self.pt.pgd_entries, &tables, &nbytes)
            assert tables == self.pt.c.table_pages, f"table pages {tables} != {self.pt.c.table_pages}"
            assert nbytes == self.pt.c.mapped_nbytes, f"mapped {nbytes} != {self.pt.c.mapped_nbytes}"
            assert (self.pt.c.table_pages_allocated + 1 ==
                    self.pt.c.table_pages + self.pt.c.table_pages_freed), "table page balance"
        finally:
            _release(self.lock)
        return True

    def _fail_alloc_after(self, n):
        """Test hook: let ``n`` more table allocations succeed, fail the
        next one (once); ``None`` turns it off."""
        cdef uint64_t after = PDB_U64_MAX if n is None else _u64(n, "n")
        _acquire(self.lock)
        self.pt.fail_alloc_after = after
        _release(self.lock)

    def __repr__(self):
        return (f"<IoPageTable {self.pt.ias}-bit IOVA, {4 - self.pt.start_level} levels, "
                f"{_fmt_size(self.pt.c.mapped_nbytes)} mapped, {self.pt.c.table_pages} table pages, "
                f"{self.pt.c.leaf_sets + self.pt.c.leaf_clears + self.pt.c.table_sets + self.pt.c.table_clears}"
                f" PTE writes>")


cdef IoPageTable _pgt_view(object owner, io_pgtable *pt, PyThread_type_lock lock):
    cdef IoPageTable v = IoPageTable.__new__(IoPageTable, _view=_PGT_VIEW)
    v.pt = pt
    v.lock = lock
    v.owns = False
    v.owner = owner
    return v
