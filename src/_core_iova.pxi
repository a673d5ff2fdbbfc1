# IOVA allocator: the model of drivers/iommu/iova.c.
#
# The tree is a range_table in granule units (pfns), holding allocated
# ranges (kind ALLOC), reserved ranges (kind RESERVED) and the anchor at pfn
# 2**64 - 1.  Placement follows __alloc_and_insert_iova_range() exactly.
# One pass of the kernel's downward walk, started at node S with the
# exclusive limit L, returns the highest size-aligned start whose range is
# free and lies in [low, min(L, S.pfn_lo) - 1]: the walk visits the gaps
# below S from the top, and in each gap tries the highest aligned start,
# stopping at the first that fits (or the first below low).  The range
# table's augmented top-down gap search gives that answer in O(log n).
# The retry pass (from iova_find_limit) searches [retry_pfn + 1, L - 1]; the
# node iova_find_limit returns is either the one straddling L or the lowest
# one above it, and both give the same free space below L.

# PDB_U64_MAX, _fls64, _order_base_2, _roundup_pow2: pydmabuf/_core_base.pxd


# _iova_node, _iova_account, _iova_set_flag: pydmabuf/_core_iova.pxd


# ----------------------------------------------------------------- domain

cdef iova_magazine *_mag_alloc() noexcept nogil:
    cdef iova_magazine *m = <iova_magazine *>malloc(sizeof(iova_magazine))
    if m != NULL:
        m.size = 0
        m.next = NULL
    return m


cdef void _iova_free_rcaches(iova_domain *d) noexcept nogil:
    cdef uint32_t cpu
    cdef int b
    cdef iova_rcache *rc
    cdef iova_magazine *m
    for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
        rc = &d.rcaches[b]
        if rc.cpu != NULL:
            for cpu in range(d.ncpus):
                free(rc.cpu[cpu].loaded)
                free(rc.cpu[cpu].prev)
            free(rc.cpu)
            rc.cpu = NULL
        while rc.depot != NULL:
            m = rc.depot
            rc.depot = m.next
            free(m)
        rc.depot_size = 0


cdef int iova_domain_init(iova_domain *d, uint64_t granule, uint64_t start_pfn,
                          uint32_t ncpus) noexcept nogil:
    """init_iova_domain() + iova_domain_init_rcaches().

    granule: a power of two <= 4096; start_pfn >= 1 (pfn 0 is the fast
    path's "nothing" value, so the kernel's DMA domains never start at 0);
    1 <= ncpus <= PDB_IOVA_MAX_CPUS.  -EINVAL or -ENOMEM; on failure
    nothing is left allocated.
    """
    cdef uint32_t cpu
    cdef int b
    cdef iova_rcache *rc
    memset(d, 0, sizeof(iova_domain))
    if not _is_pow2(granule) or granule > PDB_PAGE_SIZE or start_pfn == 0:
        return -EINVAL
    if ncpus == 0 or ncpus > PDB_IOVA_MAX_CPUS:
        return -EINVAL
    if rt_init(&d.tree) < 0:
        return -ENOMEM
    d.granule = granule
    d.shift = <uint32_t>(_fls64(granule) - 1)
    d.ncpus = ncpus
    d.start_pfn = start_pfn
    d.dma_32bit_pfn = (<uint64_t>1) << (32 - d.shift)
    d.max32_alloc_size = d.dma_32bit_pfn
    d.cached_node = PDB_U64_MAX
    d.cached32_node = PDB_U64_MAX
    if rt_insert(&d.tree, PDB_U64_MAX, PDB_U64_MAX, PDB_IOVA_KIND_ANCHOR, 0, 0) < 0:
        rt_destroy(&d.tree)
        return -ENOMEM
    for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
        rc = &d.rcaches[b]
        rc.cpu = <iova_cpu_rcache *>calloc(ncpus, sizeof(iova_cpu_rcache))
        if rc.cpu == NULL:
            _iova_free_rcaches(d)
            rt_destroy(&d.tree)
            return -ENOMEM
        for cpu in range(ncpus):
            rc.cpu[cpu].loaded = _mag_alloc()
            rc.cpu[cpu].prev = _mag_alloc()
            if rc.cpu[cpu].loaded == NULL or rc.cpu[cpu].prev == NULL:
                _iova_free_rcaches(d)
                rt_destroy(&d.tree)
                return -ENOMEM
    return 0


cdef void iova_domain_destroy(iova_domain *d) noexcept nogil:
    """put_iova_domain(): drop every range and every magazine."""
    _iova_free_rcaches(d)
    rt_destroy(&d.tree)


# ------------------------------------------------------------- tree path

cdef void _iova_delete_update(iova_domain *d, uint64_t lo, uint64_t hi) noexcept nogil:
    """__cached_rbnode_delete_update(): before [lo, hi] leaves the tree.

    A cached node that is freed, or lies below the freed node, moves to the
    freed node's successor, so a cached node is always a live node (and
    its pfn_lo is the key we keep).
    """
    cdef const rt_node *nxt = rt_next(&d.tree, lo)
    cdef uint64_t nxt_lo = nxt.start if nxt != NULL else PDB_U64_MAX
    if lo == d.cached32_node or (hi < d.dma_32bit_pfn and lo >= d.cached32_node):
        d.cached32_node = nxt_lo
    if lo < d.dma_32bit_pfn:
        d.max32_alloc_size = d.dma_32bit_pfn
    if lo >= d.cached_node:
        d.cached_node = nxt_lo


cdef void _iova_free_node(iova_domain *d, rt_node *n) noexcept nogil:
    """remove_iova() + free_iova_mem() of a node in the tree."""
    cdef rt_node copy = n[0]
    _iova_delete_update(d, copy.start, copy.last)
    _rt_unlink_start(&d.tree, copy.start)
    _iova_account(d, &copy, -1)
    d.c.tree_frees += 1


cdef inline rt_node *_iova_live_node(const iova_domain *d, uint64_t pfn) noexcept nogil:
    """The allocated range holding pfn, unless it sits in an rcache or
    waits on a flush queue (both are freed as far as callers go)."""
    cdef rt_node *n = _iova_node(d, pfn)
    if n == NULL or n.kind != PDB_IOVA_KIND_ALLOC or (n.flags & (PDB_IOVA_FLAG_CACHED | PDB_IOVA_FLAG_QUEUED)):
        return NULL
    return n


cdef bint _iova_pass(iova_domain *d, uint64_t size, uint64_t align, uint64_t low,
                     uint64_t high, uint64_t *out) noexcept nogil:
    """One walk of __alloc_and_insert_iova_range(): the highest aligned
    free fit for size pfns in [low, high - 1] (high exclusive)."""
    if align == 0:
        # size > 2**63 and size-aligned: only pfn 0 is aligned, and every
        # window starts at start_pfn >= 1.
        return False
    if high == 0 or high - 1 < low:
        return False
    return rt_find_gap(&d.tree, size - 1, align, low, high - 1, True, out) == 0


cdef int iova_alloc(iova_domain *d, uint64_t size, uint64_t limit_pfn,
                    bint size_aligned, uint64_t *pfn) noexcept nogil:
    cdef uint64_t limit, align, high, new_pfn, retry_pfn
    cdef const rt_node *s
    cdef int shift
    cdef bint ok
    if size == 0 or limit_pfn == PDB_U64_MAX:
        return -EINVAL
    # alloc_iova() allocates the node before walking: a host allocation
    # failure leaves the domain as it was.
    if rt_reserve(&d.tree, 1) < 0:
        return -ENOMEM
    limit = limit_pfn + 1
    align = 1
    if size_aligned:
        shift = _fls64(size - 1)
        align = (<uint64_t>1) << shift if shift < 64 else 0
    # A size known to fail below 4 GiB fails at once.
    if limit <= d.dma_32bit_pfn and size >= d.max32_alloc_size:
        d.c.tree_alloc_failures += 1
        d.c.tree_fast_fails += 1
        return -ENOMEM
    s = rt_lookup(&d.tree, d.cached32_node if limit <= d.dma_32bit_pfn else d.cached_node)
    retry_pfn = s.last
    high = limit if limit < s.start else s.start
    ok = _iova_pass(d, size, align, d.start_pfn, high, &new_pfn)
    if not ok and retry_pfn < limit:
        # Retry covering only what lies above where the cached node began.
        ok = _iova_pass(d, size, align, retry_pfn + 1, limit, &new_pfn)
    if not ok:
        # Recorded whatever the limit was, as the kernel does.
        d.max32_alloc_size = size
        d.c.tree_alloc_failures += 1
        return -ENOMEM
    rt_insert(&d.tree, new_pfn, new_pfn + size - 1, PDB_IOVA_KIND_ALLOC, 0, 0)
    d.c.alloc_ranges += 1
    d.c.alloc_pages += size
    d.c.tree_allocs += 1
    # __cached_rbnode_insert_update()
    if new_pfn + size - 1 < d.dma_32bit_pfn:
        d.cached32_node = new_pfn
    else:
        d.cached_node = new_pfn
    pfn[0] = new_pfn
    return 0


cdef int iova_free(iova_domain *d, uint64_t pfn) noexcept nogil:
    cdef rt_node *n = _iova_live_node(d, pfn)
    if n == NULL:
        return -ENOENT
    _iova_free_node(d, n)
    return 0


cdef const rt_node *iova_find(const iova_domain *d, uint64_t pfn) noexcept nogil:
    cdef const rt_node *n = rt_lookup(&d.tree, pfn)
    if n == NULL or n.kind == PDB_IOVA_KIND_ANCHOR:
        return NULL
    return n


cdef void _iova_lower_start(iova_domain *d, uint64_t old_lo, uint64_t new_lo) noexcept nogil:
    """Move a node's pfn_lo down to new_lo (no node lies in between)."""
    cdef rt_node n
    rt_remove_at(&d.tree, old_lo, &n)
    _iova_account(d, &n, -1)
    n.start = new_lo
    # Cannot fail: the removal just returned a node to the pool.
    rt_insert(&d.tree, new_lo, n.last, n.kind, n.owner, n.flags)
    _iova_account(d, &n, 1)
    if d.cached_node == old_lo:
        d.cached_node = new_lo
    if d.cached32_node == old_lo:
        d.cached32_node = new_lo


cdef int iova_reserve(iova_domain *d, uint64_t pfn_lo, uint64_t pfn_hi) noexcept nogil:
    """reserve_iova(): the kernel scans the tree from its first node; an
    overlapped node is stretched down to the request's start, the request
    continues above it, and a node fully covering what is left ends it.
    What remains above the last overlapped node becomes a new node."""
    cdef const rt_node *n
    cdef uint64_t lo = pfn_lo
    cdef uint64_t hi = pfn_hi
    cdef uint64_t nlo, nhi
    cdef bint overlap = False
    if lo > hi or (lo | hi) > (PDB_U64_MAX >> d.shift) or hi == PDB_U64_MAX:
        return -EINVAL
    if rt_reserve(&d.tree, 1) < 0:
        return -ENOMEM
    # Nodes below the first overlapping one do not meet the request and the
    # kernel's scan passes them by.
    n = rt_first_overlap(&d.tree, lo, hi)
    while n != NULL:
        nlo = n.start
        nhi = n.last
        if lo <= nhi and hi >= nlo:
            if lo < nlo:
                _iova_lower_start(d, nlo, lo)
                nlo = lo
            if hi > nhi:
                lo = nhi + 1
            if lo >= nlo and hi <= nhi:
                return 0
            overlap = True
        elif overlap:
            break
        n = rt_next(&d.tree, nlo)
    rt_insert(&d.tree, lo, hi, PDB_IOVA_KIND_RESERVED, 0, 0)
    d.c.reserved_ranges += 1
    d.c.reserved_pages += hi - lo + 1
    return 0


# ------------------------------------------------------------------ rcache

cdef inline void _mag_push(iova_magazine *m, uint64_t pfn) noexcept nogil:
    m.pfns[m.size] = pfn
    m.size += 1


cdef uint64_t _mag_pop(iova_magazine *m, uint64_t limit_pfn) noexcept nogil:
    """iova_magazine_pop(): the topmost pfn <= limit_pfn, swap-removed; 0
    if none (the magazine is not empty)."""
    cdef uint64_t i = m.size - 1
    cdef uint64_t pfn
    while m.pfns[i] > limit_pfn:
        if i == 0:
            return 0
        i -= 1
    pfn = m.pfns[i]
    m.size -= 1
    m.pfns[i] = m.pfns[m.size]
    return pfn


cdef void _mag_free_pfns(iova_domain *d, iova_magazine *m) noexcept nogil:
    """iova_magazine_free_pfns(): every cached range back to the tree."""
    cdef uint64_t i
    cdef rt_node *n
    for i in range(m.size):
        n = _iova_node(d, m.pfns[i])
        if n == NULL or n.kind != PDB_IOVA_KIND_ALLOC:
            continue
        _iova_free_node(d, n)
    m.size = 0


cdef bint _iova_rcache_insert(iova_domain *d, uint64_t pfn, uint64_t size,
                              uint32_t cpu) noexcept nogil:
    cdef uint32_t b = _order_base_2(size)
    cdef iova_rcache *rc
    cdef iova_cpu_rcache *c
    cdef iova_magazine *m
    if b >= PDB_IOVA_RANGE_CACHE_MAX_SIZE:
        return False
    rc = &d.rcaches[b]
    c = &rc.cpu[cpu]
    if c.loaded.size == PDB_IOVA_MAG_SIZE:
        if c.prev.size < PDB_IOVA_MAG_SIZE:
            m = c.prev
            c.prev = c.loaded
            c.loaded = m
        else:
            m = _mag_alloc()
            if m == NULL:
                return False
            c.loaded.next = rc.depot
            rc.depot = c.loaded
            rc.depot_size += 1
            d.c.depot_pushes += 1
            c.loaded = m
    _mag_push(c.loaded, pfn)
    return True


cdef uint64_t _iova_rcache_get(iova_domain *d, uint64_t size, uint64_t limit,
                               uint32_t cpu) noexcept nogil:
    """iova_rcache_get(size, limit_pfn + 1): a cached pfn or 0."""
    cdef uint32_t b = _order_base_2(size)
    cdef iova_rcache *rc
    cdef iova_cpu_rcache *c
    cdef iova_magazine *m
    if b >= PDB_IOVA_RANGE_CACHE_MAX_SIZE:
        return 0
    if limit < size:
        # The kernel's limit - size would wrap and let any pfn through.
        return 0
    rc = &d.rcaches[b]
    c = &rc.cpu[cpu]
    if c.loaded.size == 0:
        if c.prev.size != 0:
            m = c.prev
            c.prev = c.loaded
            c.loaded = m
        elif rc.depot != NULL:
            free(c.loaded)
            m = rc.depot
            rc.depot = m.next
            m.next = NULL
            rc.depot_size -= 1
            c.loaded = m
        else:
            return 0
    return _mag_pop(c.loaded, limit - size)


cdef int iova_alloc_fast(iova_domain *d, uint64_t size, uint64_t limit_pfn,
                         bint flush_rcache, uint32_t cpu, uint64_t *pfn) noexcept nogil:
    cdef uint64_t p
    cdef int rc
    if size == 0 or size > (<uint64_t>1 << 63) or limit_pfn == PDB_U64_MAX or cpu >= d.ncpus:
        return -EINVAL
    # Small sizes are rounded to a power of two so that a cached range
    # always fits its bin exactly.
    if size < ((<uint64_t>1) << (PDB_IOVA_RANGE_CACHE_MAX_SIZE - 1)):
        size = _roundup_pow2(size)
    if _order_base_2(size) < PDB_IOVA_RANGE_CACHE_MAX_SIZE:
        p = _iova_rcache_get(d, size, limit_pfn + 1, cpu)
        if p != 0:
            _iova_set_flag(d, _iova_node(d, p), PDB_IOVA_FLAG_CACHED, False)
            d.c.rcache_hits += 1
            pfn[0] = p
            return 0
        d.c.rcache_misses += 1
    rc = iova_alloc(d, size, limit_pfn, True, pfn)
    if rc == -ENOMEM and flush_rcache:
        d.c.rcache_flushes += 1
        iova_flush_rcache(d)
        rc = iova_alloc(d, size, limit_pfn, True, pfn)
    return rc


cdef int _iova_check_free_fast(const iova_domain *d, uint64_t pfn, uint64_t size,
                               rt_node **node) noexcept nogil:
    cdef rt_node *n
    cdef uint32_t b
    if size == 0:
        return -EINVAL
    n = _iova_live_node(d, pfn)
    if n == NULL:
        return -ENOENT
    b = _order_base_2(size)
    # A cached pfn is later handed out as 2**b granules: the range must
    # hold them (the kernel trusts the caller here).
    if b < PDB_IOVA_RANGE_CACHE_MAX_SIZE and n.last - pfn < ((<uint64_t>1) << b) - 1:
        return -EINVAL
    node[0] = n
    return 0


cdef int iova_check_free_fast(const iova_domain *d, uint64_t pfn, uint64_t size) noexcept nogil:
    cdef rt_node *n
    return _iova_check_free_fast(d, pfn, size, &n)


cdef void _iova_free_fast_node(iova_domain *d, rt_node *n, uint64_t pfn, uint64_t size,
                               uint32_t cpu) noexcept nogil:
    if _iova_rcache_insert(d, pfn, size, cpu):
        _iova_set_flag(d, n, PDB_IOVA_FLAG_CACHED, True)
        d.c.rcache_inserts += 1
    else:
        _iova_free_node(d, n)


cdef int iova_free_fast(iova_domain *d, uint64_t pfn, uint64_t size,
                        uint32_t cpu) noexcept nogil:
    cdef rt_node *n
    cdef int rc
    if cpu >= d.ncpus:
        return -EINVAL
    rc = _iova_check_free_fast(d, pfn, size, &n)
    if rc < 0:
        return rc
    _iova_free_fast_node(d, n, pfn, size, cpu)
    return 0


cdef void iova_free_cpu_cached(iova_domain *d, uint32_t cpu) noexcept nogil:
    """free_cpu_cached_iovas(): every bin's loaded then prev magazine."""
    cdef int b
    if cpu >= d.ncpus:
        return
    for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
        _mag_free_pfns(d, d.rcaches[b].cpu[cpu].loaded)
        _mag_free_pfns(d, d.rcaches[b].cpu[cpu].prev)


cdef void iova_flush_rcache(iova_domain *d) noexcept nogil:
    """Each CPU's magazines, then each bin's depot (free_global_cached_iovas)."""
    cdef uint32_t cpu
    cdef int b
    cdef iova_rcache *rc
    cdef iova_magazine *m
    for cpu in range(d.ncpus):
        iova_free_cpu_cached(d, cpu)
    for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
        rc = &d.rcaches[b]
        while rc.depot != NULL:
            m = rc.depot
            rc.depot = m.next
            rc.depot_size -= 1
            _mag_free_pfns(d, m)
            free(m)


cdef uint64_t iova_reclaim_depot(iova_domain *d, uint64_t runs) noexcept nogil:
    """iova_depot_work_func(), run `runs` times per bin (0: until the depot
    holds no more magazines than there are CPUs, as repeated runs 100 ms
    apart would leave it)."""
    cdef int b
    cdef uint64_t k, freed = 0
    cdef iova_rcache *rc
    cdef iova_magazine *m
    for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
        rc = &d.rcaches[b]
        k = 0
        while rc.depot_size > d.ncpus and (runs == 0 or k < runs):
            m = rc.depot
            rc.depot = m.next
            rc.depot_size -= 1
            _mag_free_pfns(d, m)
            free(m)
            k += 1
            freed += 1
    d.c.depot_reclaimed += freed
    return freed


cdef int dma_alloc_iova(iova_domain *d, uint64_t size_bytes, uint64_t dma_limit,
                        bint *prefer32, uint32_t cpu, uint64_t *iova) noexcept nogil:
    cdef uint64_t npages = size_bytes >> d.shift
    cdef uint64_t mask32 = 0xFFFFFFFF
    cdef uint64_t pfn = 0
    cdef int rc
    if size_bytes == 0 or (size_bytes & (d.granule - 1)) or cpu >= d.ncpus:
        return -EINVAL
    # PCI devices try the 32-bit space first, without flushing the caches;
    # the first failure makes the device use its whole mask from then on.
    if dma_limit > mask32 and prefer32 != NULL and prefer32[0]:
        rc = iova_alloc_fast(d, npages, mask32 >> d.shift, False, cpu, &pfn)
        if rc == 0:
            iova[0] = pfn << d.shift
            return 0
        if rc != -ENOMEM:
            return rc
        prefer32[0] = False
    rc = iova_alloc_fast(d, npages, dma_limit >> d.shift, True, cpu, &pfn)
    if rc < 0:
        return rc
    iova[0] = pfn << d.shift
    return 0


# ------------------------------------------------------------ bulk calls

cdef uint64_t _iova_alloc_many(iova_domain *d, const uint64_t *sizes, uint64_t size_each,
                               uint64_t n, uint64_t limit_pfn, bint fast, bint size_aligned,
                               uint32_t cpu, uint64_t *out) noexcept nogil:
    """Allocate n ranges in order, stopping at the first that fails;
    returns how many were allocated."""
    cdef uint64_t i
    cdef int rc
    for i in range(n):
        if fast:
            rc = iova_alloc_fast(d, sizes[i] if sizes != NULL else size_each, limit_pfn, True, cpu, &out[i])
        else:
            rc = iova_alloc(d, sizes[i] if sizes != NULL else size_each, limit_pfn, size_aligned, &out[i])
        if rc < 0:
            return i
    return n


cdef rt_node **_iova_claim_distinct(iova_domain *d, const uint64_t *rows, const uint64_t *sizes,
                                    uint64_t size_each, uint64_t n, int how, uint64_t *bad,
                                    int *err) noexcept nogil:
    """The check half of every all-or-nothing bulk free: the node of each of
    n rows, refused unless every row names a distinct range it may free.

    ``how`` says what a row is and which ranges qualify:
    PDB_IOVA_CLAIM_LIVE (a pfn in an allocated, uncached range: free_iova),
    PDB_IOVA_CLAIM_FAST (a pfn and its size in granules, sizes[i] or
    size_each: free_iova_fast's rules) or PDB_IOVA_CLAIM_DMA (rows are
    (dma address, nbytes) pairs: iommu_dma_unmap()'s page span, then
    free_iova_fast's rules).  A scratch flag on each range found finds one
    named twice; every flag is clear again on return.  Returns the array of
    nodes (malloc'd, the caller frees it), or NULL with ``*err`` (-EINVAL,
    -ENOENT, -ENOMEM) and ``*bad`` (the row at fault; 0 for -ENOMEM).
    Freeing a range does not move the other nodes, so the pointers stay
    good while the caller frees them in order."""
    cdef uint64_t i, off, span
    cdef rt_node **nodes
    cdef rt_node *nd = NULL
    cdef int rc = 0
    nodes = <rt_node **>malloc((n if n else 1) * sizeof(rt_node *))
    if nodes == NULL:
        bad[0] = 0
        err[0] = -ENOMEM
        return NULL
    for i in range(n):
        if how == PDB_IOVA_CLAIM_LIVE:
            nd = _iova_live_node(d, rows[i])
            rc = 0 if nd != NULL else -ENOENT
        elif how == PDB_IOVA_CLAIM_FAST:
            rc = _iova_check_free_fast(d, rows[i], sizes[i] if sizes != NULL else size_each, &nd)
        else:
            off = rows[2 * i] & (PDB_PAGE_SIZE - 1)
            if rows[2 * i + 1] == 0 or pdb_add_overflow(rows[2 * i + 1], off + PDB_PAGE_SIZE - 1, &span):
                rc = -EINVAL
            else:
                span &= ~(<uint64_t>PDB_PAGE_SIZE - 1)
                rc = _iova_check_free_fast(d, (rows[2 * i] - off) >> PDB_PAGE_SHIFT,
                                           span >> PDB_PAGE_SHIFT, &nd)
        if rc == 0 and (nd.flags & PDB_IOVA_FLAG_MARK):
            rc = -ENOENT
        if rc < 0:
            bad[0] = i
            err[0] = rc
            while i > 0:
                i -= 1
                nodes[i].flags &= ~(<uint32_t>PDB_IOVA_FLAG_MARK)
            free(nodes)
            return NULL
        nd.flags |= PDB_IOVA_FLAG_MARK
        nodes[i] = nd
    # Clear every mark before anything is freed: freeing frees or queues
    # ranges, and nothing may see a stale scratch bit.
    for i in range(n):
        nodes[i].flags &= ~(<uint32_t>PDB_IOVA_FLAG_MARK)
    return nodes


cdef int64_t _iova_free_many(iova_domain *d, const uint64_t *pfns, const uint64_t *sizes,
                             uint64_t size_each, uint64_t n, bint fast, uint32_t cpu,
                             uint64_t *bad) noexcept nogil:
    """Free n ranges, all or nothing: each pfn must lie in a distinct
    allocated, uncached range (and suit its cache bin when fast)."""
    cdef uint64_t i
    cdef int rc = 0
    cdef rt_node **nodes = _iova_claim_distinct(d, pfns, sizes, size_each, n,
                                                PDB_IOVA_CLAIM_FAST if fast else PDB_IOVA_CLAIM_LIVE,
                                                bad, &rc)
    if nodes == NULL:
        return rc
    for i in range(n):
        if fast:
            _iova_free_fast_node(d, nodes[i], pfns[i], sizes[i] if sizes != NULL else size_each, cpu)
        else:
            _iova_free_node(d, nodes[i])
    free(nodes)
    return <int64_t>n


# ------------------------------------------------------------ Python class

cdef object _IOVA_VIEW = object()


cdef _iova_stats_dict(const iova_domain *d):
    cdef uint64_t depot = 0
    cdef int b
    for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
        depot += d.rcaches[b].depot_size
    g = d.granule
    return {
        "granule": g,
        "start_pfn": d.start_pfn,
        "dma_32bit_pfn": d.dma_32bit_pfn,
        "max32_alloc_size": d.max32_alloc_size,
        "ranges": d.tree.count - 1,
        "live_ranges": d.c.alloc_ranges - d.c.cached_ranges - d.c.queued_ranges,
        "live_pages": d.c.alloc_pages - d.c.cached_pages - d.c.queued_pages,
        "live_nbytes": (d.c.alloc_pages - d.c.cached_pages - d.c.queued_pages) * g,
        "alloc_ranges": d.c.alloc_ranges,
        "alloc_pages": d.c.alloc_pages,
        "cached_ranges": d.c.cached_ranges,
        "cached_pages": d.c.cached_pages,
        "queued_ranges": d.c.queued_ranges,
        "queued_pages": d.c.queued_pages,
        "reserved_ranges": d.c.reserved_ranges,
        "reserved_pages": d.c.reserved_pages,
        "tree_allocs": d.c.tree_allocs,
        "tree_alloc_failures": d.c.tree_alloc_failures,
        "tree_fast_fails": d.c.tree_fast_fails,
        "tree_frees": d.c.tree_frees,
        "rcache_hits": d.c.rcache_hits,
        "rcache_misses": d.c.rcache_misses,
        "rcache_inserts": d.c.rcache_inserts,
        "rcache_flushes": d.c.rcache_flushes,
        "depot_magazines": depot,
        "depot_pushes": d.c.depot_pushes,
        "depot_reclaimed": d.c.depot_reclaimed,
    }


cdef uint32_t _cpu_arg(object cpu, uint32_t ncpus) except? 0xFFFFFFFF:
    if not isinstance(cpu, int):
        raise TypeError(f"cpu must be an int, not {type(cpu).__name__}")
    if cpu < 0 or cpu >= ncpus:
        raise _errors.InvalidArgument(f"cpu {cpu} is not one of the domain's {ncpus} CPUs")
    return <uint32_t>cpu


cdef uint64_t _npages_arg(object npages) except? 0:
    cdef uint64_t n = _u64(npages, "npages")
    if n == 0:
        raise _errors.InvalidArgument("npages must be at least 1")
    return n


@cython.final
cdef class IovaDomain:
    """An IOVA allocator, ``struct iova_domain`` (``drivers/iommu/iova.c``).

    Hands out ranges of IO virtual addresses in units of ``granule`` bytes
    ("pfns": IOVA >> log2(granule)), top-down from a limit, placed exactly
    where Linux's ``alloc_iova()`` would put them for the same sequence of
    calls: the cached-node walk and its retry, the 32-bit fast-fail size
    (``max32_alloc_size``), size alignment and the holes it leaves.  The
    per-CPU range caches (rcache) of ``alloc_iova_fast()`` /
    ``free_iova_fast()`` sit in front of the tree.

    Parameters
    ----------
    granule : int
        The IOMMU's smallest page size: a power of two, at most 4096.
    start_pfn : int
        The lowest pfn handed out, at least 1 (pfn 0 is the fast path's
        failure value, and DMA domains keep IOVA 0 invalid).
    ncpus : int
        CPUs modelled by the rcache (each has its own magazines).

    Notes
    -----
    The tree operations are O(log n) (the kernel's walk is linear in the
    nodes it steps over; the answer is the same).  Where the kernel trusts
    its caller the model checks: freeing an unknown or cached range raises
    :class:`~pydmabuf.errors.NotFound`, and a ``free_fast`` whose size would
    let the cache hand out more than the range holds raises
    :class:`~pydmabuf.errors.InvalidArgument`.  All methods hold the
    domain's lock.
    """

    def __cinit__(self, granule=4096, start_pfn=1, ncpus=1, *, _view=None):
        cdef uint64_t g, s
        cdef int rc
        self.d = NULL
        self.lock = NULL
        self.owns = False
        if _view is _IOVA_VIEW:
            return
        g = _u64(granule, "granule")
        s = _u64(start_pfn, "start_pfn")
        if not isinstance(ncpus, int):
            raise TypeError("ncpus must be an int")
        if not _is_pow2(g) or g > PDB_PAGE_SIZE:
            raise _errors.InvalidArgument(f"granule must be a power of two <= 4096 (got {granule})")
        if s == 0:
            raise _errors.InvalidArgument("start_pfn must be at least 1 (pfn 0 is never handed out)")
        if ncpus < 1 or ncpus > PDB_IOVA_MAX_CPUS:
            raise _errors.InvalidArgument(f"ncpus must be in 1..{PDB_IOVA_MAX_CPUS} (got {ncpus})")
        self.lock = _new_lock()
        self.d = <iova_domain *>calloc(1, sizeof(iova_domain))
        if self.d == NULL:
            raise MemoryError("cannot allocate an IOVA domain")
        rc = iova_domain_init(self.d, g, s, <uint32_t>ncpus)
        if rc < 0:
            free(self.d)
            self.d = NULL
            raise MemoryError("cannot allocate an IOVA domain")
        self.owns = True

    def __dealloc__(self):
        if self.owns:
            if self.d != NULL:
                iova_domain_destroy(self.d)
                free(self.d)
            if self.lock != NULL:
                PyThread_free_lock(self.lock)
        self.d = NULL
        self.lock = NULL

    @property
    def granule(self):
        """The allocation unit in bytes."""
        return self.d.granule

    @property
    def start_pfn(self):
        """The lowest pfn the allocator hands out."""
        return self.d.start_pfn

    @property
    def ncpus(self):
        """CPUs modelled by the range caches."""
        return self.d.ncpus

    def alloc(self, npages, limit_pfn, size_aligned=True):
        """``alloc_iova()``: ``npages`` granules, as high as possible at or
        below ``limit_pfn`` (inclusive).

        With ``size_aligned`` the first pfn is a multiple of ``npages``
        rounded up to a power of two.  The tree only; see
        :meth:`alloc_fast` for the cached path.

        Returns
        -------
        int
            The first pfn of the new range.

        Raises
        ------
        OutOfMemory
            (ENOMEM) nothing fits below the limit (the kernel returns NULL).
        InvalidArgument
            (EINVAL) ``npages`` is 0 or ``limit_pfn`` is 2**64 - 1.
        """
        cdef uint64_t n = _npages_arg(npages)
        cdef uint64_t lim = _u64(limit_pfn, "limit_pfn")
        cdef bint al = bool(size_aligned)
        cdef uint64_t pfn = 0
        cdef int rc
        _acquire(self.lock)
        rc = iova_alloc(self.d, n, lim, al, &pfn)
        _release(self.lock)
        if rc < 0:
            _check(rc, lambda: f"alloc_iova: no room for {n} granules at or below pfn {lim:#x}"
                   if rc == -ENOMEM else f"alloc_iova: limit_pfn {lim:#x} is the anchor")
        return pfn

    def free(self, pfn):
        """``free_iova()``: free the allocated range that holds ``pfn``.

        Raises :class:`~pydmabuf.errors.NotFound` (ENOENT) if no allocated
        range holds it (the kernel silently ignores it), if it is reserved,
        if it sits in a range cache (already freed with :meth:`free_fast`)
        or waits on an IOMMU domain's flush queue.
        """
        cdef uint64_t p = _u64(pfn, "pfn")
        cdef int rc
        _acquire(self.lock)
        rc = iova_free(self.d, p)
        _release(self.lock)
        _check(rc, lambda: f"free_iova: no allocated range holds pfn {p:#x}")

    def reserve(self, pfn_lo, pfn_hi):
        """``reserve_iova()``: keep ``[pfn_lo, pfn_hi]`` (inclusive) out of
        every allocation.

        As in the kernel, ranges already in the tree that the reservation
        overlaps are stretched down to cover it (keeping their kind: an
        allocated range that is stretched stays allocated and grows), and
        only the part above the last overlapped range becomes a new
        reserved range; a reservation inside one range adds nothing.

        Raises
        ------
        InvalidArgument
            (EINVAL) ``pfn_lo > pfn_hi``, or a pfn beyond what the kernel
            accepts (``2**64 - 1 >> log2(granule)``).
        """
        cdef uint64_t lo = _u64(pfn_lo, "pfn_lo")
        cdef uint64_t hi = _u64(pfn_hi, "pfn_hi")
        cdef int rc
        _acquire(self.lock)
        rc = iova_reserve(self.d, lo, hi)
        _release(self.lock)
        _check(rc, lambda: f"reserve_iova: [{lo:#x}, {hi:#x}] is not a valid pfn range")

    def find(self, pfn):
        """``find_iova()``: ``(pfn_lo, pfn_hi)`` of the range holding ``pfn``
        (allocated, cached or reserved), or ``None``."""
        cdef uint64_t p = _u64(pfn, "pfn")
        cdef const rt_node *n
        _acquire(self.lock)
        try:
            n = iova_find(self.d, p)
            return (n.start, n.last) if n != NULL else None
        finally:
            _release(self.lock)

    def alloc_fast(self, npages, limit_pfn, flush_rcache=True, cpu=0):
        """``alloc_iova_fast()`` on CPU ``cpu``.

        Sizes below 32 granules are rounded up to a power of two; sizes up
        to 32 are served from ``cpu``'s magazines (then the bin's depot)
        when a cached range lies at or below the limit, else from the tree
        (always size-aligned).  If the tree has no room and
        ``flush_rcache`` is true, every cached range goes back to the tree
        and the tree is tried once more.

        Returns the first pfn; raises :class:`~pydmabuf.errors.OutOfMemory`
        (ENOMEM) when nothing fits (the kernel returns 0).
        """
        cdef uint64_t n = _npages_arg(npages)
        cdef uint64_t lim = _u64(limit_pfn, "limit_pfn")
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        cdef bint fl = bool(flush_rcache)
        cdef uint64_t pfn = 0
        cdef int rc
        _acquire(self.lock)
        rc = iova_alloc_fast(self.d, n, lim, fl, c, &pfn)
        _release(self.lock)
        if rc < 0:
            _check(rc, lambda: f"alloc_iova_fast: no room for {n} granules at or below pfn {lim:#x}"
                   if rc == -ENOMEM else f"alloc_iova_fast: bad size {n} or limit {lim:#x}")
        return pfn

    def free_fast(self, pfn, npages, cpu=0):
        """``free_iova_fast()`` on CPU ``cpu``: into ``cpu``'s magazine for
        sizes up to 32 granules (the range stays in the tree, marked
        cached), otherwise straight back to the tree.

        Raises
        ------
        NotFound
            (ENOENT) no allocated, uncached range holds ``pfn``.
        InvalidArgument
            (EINVAL) ``npages`` is 0, or rounds to a cache bin larger than
            what the range holds from ``pfn`` on (the cache would later hand
            out granules that belong to someone else).
        """
        cdef uint64_t p = _u64(pfn, "pfn")
        cdef uint64_t n = _npages_arg(npages)
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        cdef int rc
        _acquire(self.lock)
        rc = iova_free_fast(self.d, p, n, c)
        _release(self.lock)
        _check(rc, lambda: f"free_iova_fast: no allocated range holds pfn {p:#x}" if rc == -ENOENT
               else f"free_iova_fast: {n} granules is more than the range at pfn {p:#x} holds")

    def alloc_many(self, npages, count, limit_pfn, fast=True, size_aligned=True, cpu=0):
        """Allocate ``count`` ranges one after another, in the core.

        Parameters
        ----------
        npages : int or buffer of u64
            The size of every range, or one size per range (then ``count``
            must match its length).
        count : int
            How many ranges.
        limit_pfn : int
            Inclusive limit, as for :meth:`alloc`.
        fast : bool
            :meth:`alloc_fast` (rcache first, may flush it) or :meth:`alloc`.
        size_aligned : bool
            For the tree path (the fast path always aligns).

        Returns
        -------
        numpy.ndarray
            The first pfns, in call order.  Like a bulk page allocator it
            stops at the first range that does not fit: the array is then
            shorter than ``count`` (no exception).
        """
        cdef const uint64_t[::1] sv
        cdef const uint64_t *sp = NULL
        cdef uint64_t each = 0
        cdef uint64_t n = _u64(count, "count")
        cdef uint64_t lim = _u64(limit_pfn, "limit_pfn")
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        cdef bint f = bool(fast)
        cdef bint al = bool(size_aligned)
        cdef uint64_t k, i, cap
        cdef _Buffer b
        if isinstance(npages, int):
            each = _npages_arg(npages)
        else:
            sv = _as_u64_view(npages, "npages")
            if <uint64_t>sv.shape[0] != n:
                raise ValueError(f"npages has {sv.shape[0]} sizes for count {n}")
            for i in range(n):
                if sv[i] == 0:
                    raise _errors.InvalidArgument(f"alloc_many: npages[{i}] is 0")
            if n:
                sp = &sv[0]
        if lim == PDB_U64_MAX:
            raise _errors.InvalidArgument("alloc_many: limit_pfn 2**64 - 1 is the anchor")
        if sp == NULL and n:
            # At most (lim - start + 1) // each ranges of ``each`` pfns can be
            # live below the limit at once, so attempt cap + 1 stops the
            # loop: counting only that far is the same walk, and the result
            # buffer stays the size of what can be returned, not of ``count``.
            cap = 0 if lim < self.d.start_pfn else (lim - self.d.start_pfn + 1) // each
            if n > cap + 1:
                n = cap + 1
        # A count past Py_ssize_t casts negative: _new_buffer() refuses it,
        # and any count whose bytes do not fit, with OutOfMemory.
        b = _new_buffer(<Py_ssize_t>n, 0, 8, b"Q")
        _acquire(self.lock)
        with nogil:
            k = _iova_alloc_many(self.d, sp, each, n, lim, f, al, c, <uint64_t *>b.data)
        _release(self.lock)
        return _np().asarray(b)[:k]

    def free_many(self, pfns, npages=1, fast=True, cpu=0):
        """Free ranges in the core, all or nothing: with :meth:`free_fast`
        (``npages`` is then the size of each, or one per pfn) or
        :meth:`free`.  Raises as those do, naming the first bad pfn;
        nothing is freed then."""
        cdef const uint64_t[::1] pv = _as_u64_view(pfns, "pfns")
        cdef const uint64_t[::1] sv
        cdef const uint64_t *sp = NULL
        cdef uint64_t each = 0
        cdef uint64_t n = pv.shape[0]
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        cdef bint f = bool(fast)
        cdef uint64_t bad = 0
        cdef int64_t rc
        if isinstance(npages, int):
            each = _npages_arg(npages)
        else:
            sv = _as_u64_view(npages, "npages")
            if <uint64_t>sv.shape[0] != n:
                raise ValueError(f"pfns and npages differ in length ({n} != {sv.shape[0]})")
            if n:
                sp = &sv[0]
        if n == 0:
            return
        _acquire(self.lock)
        with nogil:
            rc = _iova_free_many(self.d, &pv[0], sp, each, n, f, c, &bad)
        _release(self.lock)
        if rc < 0:
            _check(rc, f"free_many: pfn {pv[bad]:#x} (index {bad}) is not a live allocation, "
                   "appears twice, or is smaller than its cache bin")

    def _roundtrips(self, rounds, npages, limit_pfn, fast=True, cpu=0):
        """Benchmark helper: ``rounds`` alloc + free pairs in the core (one
        buffer mapped and unmapped over and over).  Returns ``rounds``."""
        cdef uint64_t r = _u64(rounds, "rounds")
        cdef uint64_t n = _npages_arg(npages)
        cdef uint64_t lim = _u64(limit_pfn, "limit_pfn")
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        cdef bint f = bool(fast)
        cdef uint64_t i, pfn = 0
        cdef int rc = 0
        _acquire(self.lock)
        with nogil:
            for i in range(r):
                rc = iova_alloc_fast(self.d, n, lim, True, c, &pfn) if f else iova_alloc(self.d, n, lim, True, &pfn)
                if rc < 0:
                    break
                rc = iova_free_fast(self.d, pfn, n, c) if f else iova_free(self.d, pfn)
                if rc < 0:
                    break
        _release(self.lock)
        _check(rc, "roundtrips: allocation failed")
        return r

    def flush_rcache(self):
        """Return every cached range to the tree: each CPU's magazines,
        then each bin's depot (what ``alloc_iova_fast()`` does before its
        retry)."""
        _acquire(self.lock)
        iova_flush_rcache(self.d)
        _release(self.lock)

    def free_cpu_cached(self, cpu):
        """``free_cpu_cached_iovas()``: ``cpu``'s magazines back to the tree
        (what the kernel does when a CPU goes offline)."""
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        _acquire(self.lock)
        iova_free_cpu_cached(self.d, c)
        _release(self.lock)

    def reclaim_depot(self, runs=None):
        """Run the depot's delayed reclaim work.

        In the kernel, pushing a full magazine to a bin's depot schedules a
        work item that every 100 ms frees one depot magazine's ranges back
        to the tree while the depot holds more magazines than there are
        CPUs.  Time does not pass in the model: call this instead.

        Parameters
        ----------
        runs : int, optional
            How many times the work runs per bin (each run frees at most one
            magazine); ``None`` runs it until it stops.

        Returns
        -------
        int
            Magazines freed.
        """
        cdef uint64_t r = 0
        cdef uint64_t freed
        if runs is not None:
            r = _u64(runs, "runs")
            if r == 0:
                return 0
        _acquire(self.lock)
        freed = iova_reclaim_depot(self.d, r)
        _release(self.lock)
        return freed

    def ranges(self, with_state=False):
        """The ranges in the tree, in address order, as an ``(n, 2)`` u64
        array of inclusive ``(pfn_lo, pfn_hi)`` rows (a copy).

        Allocated ranges, ranges held by the range caches (they stay in the
        kernel's tree too) and reserved ranges are listed; the anchor is
        not.  With ``with_state`` a third column says which: 0 allocated,
        1 cached, 2 reserved, 3 waiting on an IOMMU domain's flush queue.
        """
        cdef _Buffer b
        cdef uint64_t i = 0
        cdef uint64_t *p
        cdef const rt_node *n
        cdef Py_ssize_t cols = 3 if with_state else 2
        _acquire(self.lock)
        try:
            b = _new_buffer(<Py_ssize_t>(self.d.tree.count - 1), cols, 8, b"Q")
            p = <uint64_t *>b.data
            n = rt_first_overlap(&self.d.tree, 0, PDB_U64_MAX)
            while n != NULL and n.kind != PDB_IOVA_KIND_ANCHOR:
                p[cols * i] = n.start
                p[cols * i + 1] = n.last
                if cols == 3:
                    p[3 * i + 2] = (2 if n.kind == PDB_IOVA_KIND_RESERVED
                                    else 1 if n.flags & PDB_IOVA_FLAG_CACHED
                                    else 3 if n.flags & PDB_IOVA_FLAG_QUEUED else 0)
                i += 1
                n = rt_next(&self.d.tree, n.start)
        finally:
            _release(self.lock)
        return _np().asarray(b)

    def rcache_state(self, cpu=0):
        """Per bin (size 1, 2, 4 ... 32 granules) for ``cpu``: a list of
        ``(loaded_pfns, prev_pfns, depot_size)``; the pfn lists are in
        magazine order (the next pop scans from the end).  For tests and
        debugging."""
        cdef uint32_t c = _cpu_arg(cpu, self.d.ncpus)
        cdef int b
        cdef iova_cpu_rcache *cc
        out = []
        _acquire(self.lock)
        try:
            for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
                cc = &self.d.rcaches[b].cpu[c]
                out.append(([cc.loaded.pfns[i] for i in range(cc.loaded.size)],
                            [cc.prev.pfns[i] for i in range(cc.prev.size)],
                            self.d.rcaches[b].depot_size))
        finally:
            _release(self.lock)
        return out

    @property
    def cached_nodes(self):
        """``(cached_node, cached32_node)`` as the pfn_lo of the nodes the
        next walks start from (2**64 - 1 is the anchor)."""
        return (self.d.cached_node, self.d.cached32_node)

    @property
    def stats(self):
        """Counters, as a dict.

        ``ranges`` (in the tree, reserved and cached ones included),
        ``live_ranges`` / ``live_pages`` / ``live_nbytes`` (allocated and
        held by callers), ``alloc_*`` (allocated, cached and queued
        included), ``cached_*``, ``queued_*`` (on a flush queue),
        ``reserved_*``, ``max32_alloc_size``, and the event
        counts ``tree_allocs``, ``tree_alloc_failures``,
        ``tree_fast_fails``, ``tree_frees``, ``rcache_hits``,
        ``rcache_misses``, ``rcache_inserts``, ``rcache_flushes``,
        ``depot_magazines``, ``depot_pushes``, ``depot_reclaimed``.
        """
        _acquire(self.lock)
        try:
            return _iova_stats_dict(self.d)
        finally:
            _release(self.lock)

    def __len__(self):
        """Ranges in the tree (as listed by :meth:`ranges`)."""
        return self.d.tree.count - 1

    def check(self):
        """Verify the allocator's invariants (tree, counters, cached nodes,
        magazines); raises AssertionError.  For tests."""
        cdef const rt_node *n
        cdef uint64_t ar = 0, ap = 0, cr = 0, cp = 0, rr = 0, rp = 0, qr = 0, qp = 0, mags = 0
        cdef int b
        cdef uint32_t c
        cdef uint64_t i
        cdef iova_magazine *m
        _acquire(self.lock)
        try:
            n = rt_first_overlap(&self.d.tree, 0, PDB_U64_MAX)
            while n != NULL:
                if n.kind == PDB_IOVA_KIND_ALLOC:
                    ar += 1
                    ap += n.last - n.start + 1
                    if n.flags & PDB_IOVA_FLAG_CACHED:
                        cr += 1
                        cp += n.last - n.start + 1
                    if n.flags & PDB_IOVA_FLAG_QUEUED:
                        qr += 1
                        qp += n.last - n.start + 1
                    assert not (n.flags & PDB_IOVA_FLAG_MARK), "stale mark"
                    assert (n.flags & 5) != 5, "cached and queued"
                elif n.kind == PDB_IOVA_KIND_RESERVED:
                    rr += 1
                    rp += n.last - n.start + 1
                n = rt_next(&self.d.tree, n.start)
            assert (ar, ap, cr, cp, qr, qp, rr, rp) == (
                self.d.c.alloc_ranges, self.d.c.alloc_pages, self.d.c.cached_ranges,
                self.d.c.cached_pages, self.d.c.queued_ranges, self.d.c.queued_pages,
                self.d.c.reserved_ranges, self.d.c.reserved_pages), "counters"
            for key in (self.d.cached_node, self.d.cached32_node):
                n = rt_lookup(&self.d.tree, key)
                assert n != NULL and n.start == key, f"cached node {key:#x} is not a live node"
            for b in range(PDB_IOVA_RANGE_CACHE_MAX_SIZE):
                for c in range(2 * self.d.ncpus):
                    m = (self.d.rcaches[b].cpu[c // 2].loaded if c % 2 == 0
                         else self.d.rcaches[b].cpu[c // 2].prev)
                    assert m.size <= PDB_IOVA_MAG_SIZE
                    for i in range(m.size):
                        n = rt_lookup(&self.d.tree, m.pfns[i])
                        assert n != NULL and (n.flags & PDB_IOVA_FLAG_CACHED), "magazine pfn"
                        mags += 1
                m = self.d.rcaches[b].depot
                i = 0
                while m != NULL:
                    assert m.size == PDB_IOVA_MAG_SIZE, "depot magazine not full"
                    mags += m.size
                    i += 1
                    m = m.next
                assert i == self.d.rcaches[b].depot_size, "depot size"
            assert mags == cr, "cached ranges vs magazine contents"
        finally:
            _release(self.lock)
        return True

    def __repr__(self):
        live = self.d.c.alloc_ranges - self.d.c.cached_ranges - self.d.c.queued_ranges
        nb = (self.d.c.alloc_pages - self.d.c.cached_pages - self.d.c.queued_pages) * self.d.granule
        return (f"<IovaDomain granule {_fmt_size(self.d.granule)}, start_pfn {self.d.start_pfn:#x}, "
                f"{live} live range{'s' if live != 1 else ''} ({_fmt_size(nb)}), "
                f"{self.d.c.cached_ranges} cached, {self.d.c.reserved_ranges} reserved, "
                f"{self.d.ncpus} cpu{'s' if self.d.ncpus != 1 else ''}>")


cdef IovaDomain _iova_view(object owner, iova_domain *d, PyThread_type_lock lock):
    """An IovaDomain over a domain owned by ``owner`` (sharing its lock)."""
    cdef IovaDomain v = IovaDomain.__new__(IovaDomain, _view=_IOVA_VIEW)
    v.d = d
    v.lock = lock
    v.owns = False
    v.owner = owner
    return v
