# cython: language_level=3
#
# C declarations of pydmabuf._core_iova (src/_core_iova.pyx): the range
# table (an augmented AVL tree of inclusive u64 ranges) and the IOVA
# allocator built on it (drivers/iommu/iova.c).

from pydmabuf._core_base cimport *

# ------------------------------------------------------------- range table
#
# A sorted set of non-overlapping inclusive ranges [start, last] of u64,
# kept in an AVL tree whose nodes live in one pool (index 0 is the nil
# node).  Every node also carries the span of its subtree and the largest
# free gap strictly inside it, so gap searches prune whole subtrees.

cdef struct rt_node:
    uint64_t start
    uint64_t last
    uint64_t owner
    uint64_t min_start      # smallest start in this subtree
    uint64_t max_last       # largest last in this subtree
    uint64_t max_gap        # largest count of free addresses between two
                            # consecutive ranges of this subtree (0: none)
    uint32_t flags
    uint32_t left
    uint32_t right
    uint8_t kind
    int8_t height

cdef struct range_table:
    rt_node *nodes          # pool; nodes[0] is the nil node
    uint32_t cap            # nodes allocated in the pool
    uint32_t used           # high-water mark of the pool
    uint32_t free_head      # free list threaded through .left
    uint32_t root
    uint64_t count          # live ranges
    uint64_t nbytes_lo      # total bytes covered, as a 128-bit number
    uint64_t nbytes_hi

cdef int rt_init(range_table *t) noexcept nogil
cdef void rt_destroy(range_table *t) noexcept nogil
cdef int rt_reserve(range_table *t, uint64_t extra) noexcept nogil
cdef int rt_insert(range_table *t, uint64_t start, uint64_t last, uint8_t kind,
                   uint64_t owner, uint32_t flags) noexcept nogil
cdef int rt_remove_at(range_table *t, uint64_t addr, rt_node *out) noexcept nogil
cdef int rt_erase(range_table *t, uint64_t start, uint64_t last,
                  uint64_t *erased_lo, uint64_t *erased_hi) noexcept nogil
cdef const rt_node *rt_lookup(const range_table *t, uint64_t addr) noexcept nogil
cdef const rt_node *rt_first_overlap(const range_table *t, uint64_t start,
                                     uint64_t last) noexcept nogil
cdef const rt_node *rt_next(const range_table *t, uint64_t start) noexcept nogil
cdef const rt_node *rt_prev(const range_table *t, uint64_t start) noexcept nogil
cdef int rt_find_gap(const range_table *t, uint64_t sizem1, uint64_t align,
                     uint64_t lo, uint64_t hi, bint top_down,
                     uint64_t *out) noexcept nogil

cdef class RangeTable:
    cdef range_table t
    cdef PyThread_type_lock lock
    cdef list _collect(self, uint64_t first, uint64_t last)
    cdef str _insert_error(self, int rc, uint64_t first, uint64_t last)

# ---------------------------------------------------------- IOVA allocator
#
# drivers/iommu/iova.c.  The ranges of a domain (allocated and reserved, in
# granule units: "pfn" below means IOVA >> shift) live in a range_table,
# with an anchor range at pfn 2**64 - 1 as in the kernel.  Placement is the
# kernel's exactly (cached nodes, the retry above the cached node, the
# 32-bit fast-fail size, size alignment).  Per-CPU magazine caches (the
# rcache: 6 bins of 1..32 granules, magazines of 127 pfns, a depot of full
# magazines per bin) sit in front of the tree for alloc_fast/free_fast.
#
# Locking: every iova_* kernel expects the caller to hold the owner's lock
# (IovaDomain.lock, or IommuDomain.lock for a domain's allocator).
# Return codes: 0 or a count >= 0, else -EINVAL (bad argument), -ENOMEM
# (nothing fits, or host memory), -ENOENT (no such allocated range).

cdef enum:
    PDB_IOVA_RANGE_CACHE_MAX_SIZE = 6   # log2 of the largest cached size + 1
    PDB_IOVA_MAG_SIZE = 127             # pfns per magazine
    PDB_IOVA_MAX_CPUS = 1024
    # range_table kinds and flags of the nodes of an iova_domain
    PDB_IOVA_KIND_ANCHOR = 0
    PDB_IOVA_KIND_RESERVED = 4          # RangeKind.RESERVED
    PDB_IOVA_KIND_ALLOC = 5             # RangeKind.IOVA
    PDB_IOVA_FLAG_CACHED = 1            # allocated, but held by an rcache
    PDB_IOVA_FLAG_MARK = 2              # scratch bit of bulk calls (always clear between calls)
    PDB_IOVA_FLAG_QUEUED = 4            # allocated, waiting on a flush queue

cdef struct iova_magazine:
    uint64_t size
    iova_magazine *next                 # depot link
    uint64_t pfns[127]

cdef struct iova_cpu_rcache:
    iova_magazine *loaded
    iova_magazine *prev

cdef struct iova_rcache:
    iova_magazine *depot                # full magazines, newest first
    uint64_t depot_size
    iova_cpu_rcache *cpu                # ncpus entries

cdef struct iova_counters:
    uint64_t alloc_ranges               # nodes of kind ALLOC (cached ones too)
    uint64_t alloc_pages
    uint64_t cached_ranges              # ALLOC nodes held by an rcache magazine
    uint64_t cached_pages
    uint64_t queued_ranges              # ALLOC nodes waiting on a flush queue
    uint64_t queued_pages
    uint64_t reserved_ranges
    uint64_t reserved_pages
    uint64_t tree_allocs                # successful alloc_iova
    uint64_t tree_alloc_failures        # alloc_iova that found no room
    uint64_t tree_fast_fails            # ... of which refused by max32_alloc_size
    uint64_t tree_frees                 # nodes removed from the tree
    uint64_t rcache_hits
    uint64_t rcache_misses              # cacheable sizes the rcache could not serve
    uint64_t rcache_inserts             # free_fast calls that went into a magazine
    uint64_t rcache_flushes             # flush_rcache retries of alloc_fast
    uint64_t depot_pushes
    uint64_t depot_reclaimed            # magazines freed by reclaim_depot

cdef struct iova_domain:
    range_table tree
    uint64_t granule
    uint32_t shift
    uint32_t ncpus
    uint64_t start_pfn
    uint64_t dma_32bit_pfn              # 1 << (32 - shift)
    uint64_t max32_alloc_size
    uint64_t cached_node                # pfn_lo of a live node (or the anchor)
    uint64_t cached32_node
    iova_rcache rcaches[6]
    iova_counters c

cdef int iova_domain_init(iova_domain *d, uint64_t granule, uint64_t start_pfn,
                          uint32_t ncpus) noexcept nogil
cdef void iova_domain_destroy(iova_domain *d) noexcept nogil
# alloc_iova(): size granules at or below limit_pfn (inclusive); -ENOMEM if
# nothing fits (the kernel returns NULL), -EINVAL for size 0 or
# limit_pfn == 2**64 - 1.
cdef int iova_alloc(iova_domain *d, uint64_t size, uint64_t limit_pfn,
                    bint size_aligned, uint64_t *pfn) noexcept nogil
# free_iova(): frees the allocated range holding pfn; -ENOENT if none (or it
# is reserved, sits in an rcache or waits on a flush queue).
cdef int iova_free(iova_domain *d, uint64_t pfn) noexcept nogil
# reserve_iova(): 0, or -EINVAL (pfn_lo > pfn_hi, pfns the kernel rejects).
cdef int iova_reserve(iova_domain *d, uint64_t pfn_lo, uint64_t pfn_hi) noexcept nogil
# find_iova(): the node holding pfn (allocated, cached or reserved), or NULL.
cdef const rt_node *iova_find(const iova_domain *d, uint64_t pfn) noexcept nogil
# alloc_iova_fast() / free_iova_fast() on CPU cpu (< ncpus).
cdef int iova_alloc_fast(iova_domain *d, uint64_t size, uint64_t limit_pfn,
                         bint flush_rcache, uint32_t cpu, uint64_t *pfn) noexcept nogil
cdef int iova_free_fast(iova_domain *d, uint64_t pfn, uint64_t size,
                        uint32_t cpu) noexcept nogil
# What free_fast would refuse, without doing anything: 0, -ENOENT, -EINVAL.
cdef int iova_check_free_fast(const iova_domain *d, uint64_t pfn,
                              uint64_t size) noexcept nogil
# Every CPU's magazines and the depots back to the tree (the retry path of
# alloc_iova_fast); free_cpu_cached: one CPU's (CPU hot-unplug).
cdef void iova_flush_rcache(iova_domain *d) noexcept nogil
cdef void iova_free_cpu_cached(iova_domain *d, uint32_t cpu) noexcept nogil
# The depot's delayed work, run `runs` times per bin (0: until it stops);
# returns the magazines freed.
cdef uint64_t iova_reclaim_depot(iova_domain *d, uint64_t runs) noexcept nogil
# iommu_dma_alloc_iova() without the aperture clip: size_bytes granule
# aligned; with *prefer32 set and dma_limit above 32 bits the 32-bit space
# is tried first (no rcache flush) and a failure clears *prefer32.
cdef int dma_alloc_iova(iova_domain *d, uint64_t size_bytes, uint64_t dma_limit,
                        bint *prefer32, uint32_t cpu, uint64_t *iova) noexcept nogil

cdef class IovaDomain:
    cdef iova_domain *d
    cdef PyThread_type_lock lock
    cdef bint owns                      # False for a view into an IommuDomain
    cdef object owner


# The helpers the IOMMU domain (pydmabuf._core_iommu) shares with the
# allocator: node flags with their counters, the flush queue's direct
# free, the domain's stats and its IovaDomain view.

cdef inline rt_node *_iova_node(const iova_domain *d, uint64_t pfn) noexcept nogil:
    # The range table hands out const nodes; the allocator owns the table
    # and flips only the flags word, which no tree invariant depends on.
    return <rt_node *>rt_lookup(&d.tree, pfn)


cdef inline void _iova_account(iova_domain *d, const rt_node *n, int sign) noexcept nogil:
    """Count node ``n`` in (``sign`` 1) or out of (``sign`` -1) the domain's
    counters: the u64 counters wrap, so adding the negated delta subtracts."""
    cdef uint64_t r = <uint64_t>(<int64_t>sign)
    cdef uint64_t p = r * (n.last - n.start + 1)
    if n.kind == PDB_IOVA_KIND_ALLOC:
        d.c.alloc_ranges += r
        d.c.alloc_pages += p
        if n.flags & PDB_IOVA_FLAG_CACHED:
            d.c.cached_ranges += r
            d.c.cached_pages += p
        if n.flags & PDB_IOVA_FLAG_QUEUED:
            d.c.queued_ranges += r
            d.c.queued_pages += p
    elif n.kind == PDB_IOVA_KIND_RESERVED:
        d.c.reserved_ranges += r
        d.c.reserved_pages += p


cdef inline void _iova_set_flag(iova_domain *d, rt_node *n, uint32_t flag, bint on) noexcept nogil:
    """Set or clear CACHED or QUEUED on an allocated node, keeping counts."""
    _iova_account(d, n, -1)
    if on:
        n.flags |= flag
    else:
        n.flags &= ~flag
    _iova_account(d, n, 1)

cdef int _iova_check_free_fast(const iova_domain *d, uint64_t pfn, uint64_t size,
                               rt_node **node) noexcept nogil
# What a row of _iova_claim_distinct() is (see there).
cdef enum:
    PDB_IOVA_CLAIM_LIVE = 0
    PDB_IOVA_CLAIM_FAST = 1
    PDB_IOVA_CLAIM_DMA = 2
cdef rt_node **_iova_claim_distinct(iova_domain *d, const uint64_t *rows, const uint64_t *sizes,
                                    uint64_t size_each, uint64_t n, int how, uint64_t *bad,
                                    int *err) noexcept nogil
cdef void _iova_free_fast_node(iova_domain *d, rt_node *n, uint64_t pfn, uint64_t size,
                               uint32_t cpu) noexcept nogil
cdef _iova_stats_dict(const iova_domain *d)
cdef uint32_t _cpu_arg(object cpu, uint32_t ncpus) except? 0xFFFFFFFF
cdef IovaDomain _iova_view(object owner, iova_domain *d, PyThread_type_lock lock)
