# cython: language_level=3
#
# Public C declarations of pydmabuf._core.
#
# Another Cython module can ``cimport pydmabuf._core as core`` and use the
# structures and kernels below without going through Python.  Kernels are
# ``noexcept nogil``: they never touch Python objects and return a count
# >= 0 or a negative errno (``-errno.EINVAL`` ...).  Callers hold the owning
# object's lock (``obj.lock``) around a kernel when the object may be shared
# between threads.

from libc.errno cimport EEXIST
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock

# ---------------------------------------------------------------- constants

cdef enum:
    PDB_PAGE_SHIFT = 12
    PDB_PAGE_SIZE = 4096
    # Low bits of sg_entry.page_link, as in the kernel.
    PDB_SG_CHAIN = 0x01
    PDB_SG_END = 0x02
    # sg_entry.dma_flags bits.
    PDB_SG_DMA_BUS_ADDRESS = 0x01
    PDB_SG_DMA_SWIOTLB = 0x02
    # One chunk of scatterlist entries is one page: 4096 / 32.
    PDB_SG_MAX_SINGLE_ALLOC = 128

cdef extern from *:
    """
    #define PDB_MAX_SG_ENT_SZ 0xFFFFF000ULL
    #define PDB_SCATTERLIST_MAX_SEGMENT 0xFFFFF000ULL
    #define PDB_PFN_LIMIT (1ULL << 40)
    #ifndef PYDMABUF_DEBUG
    #define PYDMABUF_DEBUG 0
    #endif
    """
    # The largest DMA-only scatterlist entry: UINT_MAX rounded down to a page.
    const uint64_t PDB_MAX_SG_ENT_SZ
    # The kernel's default max_segment (UINT_MAX behaves the same).
    const uint64_t PDB_SCATTERLIST_MAX_SEGMENT
    # PFNs must be below this: 52-bit physical addresses.
    const uint64_t PDB_PFN_LIMIT
    # 1 in the debug build (PYDMABUF_DEBUG=1 at build time).
    const int PYDMABUF_DEBUG

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

# ------------------------------------------------------------ scatterlists
#
# struct scatterlist as on 64-bit Linux with CONFIG_NEED_SG_DMA_LENGTH and
# CONFIG_NEED_SG_DMA_FLAGS: 32 bytes.  page_link holds the physical address
# of the page (page aligned) with SG_CHAIN / SG_END in its low bits; a chain
# slot holds the address of the next chunk's first slot instead.

cdef struct sg_entry:
    uint64_t page_link
    uint32_t offset
    uint32_t length
    uint64_t dma_address
    uint32_t dma_length
    uint32_t dma_flags

# struct sg_append_table.  Chunks are laid out one after another in one
# arena (``slots``); each chunk is what the kernel allocates in one
# sg_kmalloc() call and is linked to the next by its last slot.
cdef struct sg_table:
    sg_entry *slots
    uint64_t nslots         # slots in all chunks
    uint64_t cap            # arena capacity, in slots
    uint64_t nchunks
    uint64_t last_chunk     # first slot of the newest chunk
    uint64_t meta_bytes     # bytes the kernel's allocator would hand out
    int64_t prv             # last populated slot, -1 when none
    uint32_t nents          # DMA segments (after mapping) / entries
    uint32_t orig_nents     # CPU entries (0 for DMA-only tables)
    uint32_t total_nents    # data slots allocated (append tables)
    uint32_t no_move        # set while exported: growing must not move
                            # the arena (-EBUSY instead)

cdef void sg_table_free(sg_table *t) noexcept nogil
cdef int sg_alloc(sg_table *t, uint32_t nents) noexcept nogil
cdef int64_t sg_next(const sg_table *t, int64_t i) noexcept nogil
cdef int64_t sg_first(const sg_table *t) noexcept nogil
cdef int64_t sg_nents_for_len(const sg_table *t, uint64_t nbytes) noexcept nogil
cdef int sg_append_pages(sg_table *t, const uint64_t *pfns, uint64_t n,
                         uint32_t offset, uint64_t size, uint64_t max_segment,
                         uint32_t left_pages) noexcept nogil
cdef int sg_from_dma_ranges(sg_table *t, const uint64_t *pairs,
                            uint64_t n) noexcept nogil
cdef int64_t sg_cpu_ranges(const sg_table *t, uint64_t *out) noexcept nogil
cdef int64_t sg_dma_ranges(const sg_table *t, uint64_t *out) noexcept nogil

cdef class SgTable:
    cdef sg_table t
    cdef PyThread_type_lock lock
    cdef Py_ssize_t exports
    # Set by the DMA mapping layer while the table is mapped for a device.
    cdef public object mapping
    cdef object __weakref__
    cdef object _ranges(self, bint dma)
    cdef int _append(self, const uint64_t *p, Py_ssize_t n, uint32_t off, uint64_t size, uint64_t maxseg,
                     uint32_t left) except -1

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

# -------------------------------------------------------- IO page tables
#
# io-pgtable-arm (LPAE) with the 4 KiB granule: 8-byte entries, 512 per
# table, up to 4 levels (48-bit input), 4K pages at level 3 and 2M / 1G
# blocks at levels 2 / 1; tables allocated on demand.  Entry encoding (the
# model's): bits 0-1 type (1 block, 3 table or level-3 page), bits 2-7 the
# IOMMU_* prot, bits 12-51 the output address (or the table's address).
#
# pgt_map is iommu_map_nosync(): the iommu_pgsize() loop over map_pages.
# It refuses -EINVAL (iova|phys|size not 4K aligned, no READ/WRITE, unknown
# prot bits), -ERANGE (beyond the input or output size), -EEXIST (a leaf in
# the way) before writing anything; -ENOMEM (host memory) is rolled back.
# pgt_unmap is __iommu_unmap(): returns the bytes unmapped (stops at the
# first hole or a partly covered block), -EINVAL if iova|size unaligned.

cdef enum:
    PDB_IOMMU_READ = 1
    PDB_IOMMU_WRITE = 2
    PDB_IOMMU_CACHE = 4
    PDB_IOMMU_NOEXEC = 8
    PDB_IOMMU_MMIO = 16
    PDB_IOMMU_PRIV = 32
    PDB_IOMMU_PROT_MASK = 63
    PDB_PGT_ENTRIES = 512
    PDB_PGT_POOL_MAX = 4096             # table pages a page table keeps for reuse

# struct iommu_iotlb_gather (SMMUv3 style: one range, one page size).
cdef struct pgt_gather:
    uint64_t start
    uint64_t end
    uint64_t pgsize                     # 0: nothing gathered
    bint queued                         # lazy: leaves are not gathered
    uint64_t *freelist                  # table pages waiting for the flush
    uint64_t nfree

cdef struct pgt_counters:
    uint64_t leaf_sets                  # leaf entries written
    uint64_t leaf_clears                # leaf entries cleared
    uint64_t table_sets                 # table descriptors installed
    uint64_t table_clears               # table descriptors cleared
    uint64_t table_pages                # live tables, the top one included
    uint64_t table_pages_allocated      # by map (the top table not counted)
    uint64_t table_pages_freed
    uint64_t table_pages_pending        # freed, waiting on a gather or the FQ
    uint64_t mapped_nbytes              # bytes covered by leaves
    uint64_t range_invalidations        # iotlb_sync of a non-empty gather
    uint64_t walk_invalidations         # io_pgtable_tlb_flush_walk
    uint64_t full_flushes               # flush_iotlb_all
    uint64_t sync_map_calls             # iotlb_sync_map

cdef struct io_pgtable:
    uint64_t *pgd
    uint32_t ias
    uint32_t oas
    int32_t start_level
    uint32_t pgd_entries
    bint defer_table_free               # freed tables ride the gather/FQ
    uint64_t *cur_pte                   # cursor: the last level-3 table used
    uint64_t cur_base                   # ... and its IOVA >> 21
    uint64_t **journal                  # tables installed by the current map
    uint64_t journal_len
    uint64_t journal_cap
    uint64_t torn_tables                # tables a block replaced in this map
    uint64_t torn_walks
    uint64_t fail_alloc_after           # test hook: fail the n+1-th table alloc
    uint64_t *pool                      # freed table pages kept for reuse
    uint64_t pool_len
    pgt_counters c

cdef int pgt_init(io_pgtable *pt, uint32_t ias, uint32_t oas,
                  bint defer_table_free) noexcept nogil
cdef void pgt_destroy(io_pgtable *pt) noexcept nogil
cdef int pgt_map(io_pgtable *pt, uint64_t iova, uint64_t phys, uint64_t size,
                 uint32_t prot) noexcept nogil

# pgt_map() for one 4 KiB page, inlined into the caller: when the page
# falls in the cursor's level-3 table it is checked and written here, else
# pgt_map() does the whole job.  Same result, errors and counters.
cdef inline int pgt_map_page(io_pgtable *pt, uint64_t iova, uint64_t phys,
                             uint32_t prot) noexcept nogil:
    cdef uint64_t *ep
    if pt.cur_pte != NULL and (iova >> 21) == pt.cur_base \
            and ((iova | phys) & 0xFFF) == 0 and (phys >> pt.oas) == 0 \
            and (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) != 0 \
            and (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)) == 0:
        ep = &pt.cur_pte[(iova >> 12) & 511]
        if ep[0] != 0:
            return -EEXIST
        ep[0] = phys | (<uint64_t>prot << 2) | 3
        pt.c.leaf_sets += 1
        pt.c.mapped_nbytes += 4096
        return 0
    return pgt_map(pt, iova, phys, 4096, prot)
# Map n ranges back to back from iova: range i is (phys[i], lens[i]), or
# (phys[i], len_each) when lens is NULL.  All or nothing; returns the bytes
# mapped or a negative errno (*bad = the index of the range at fault).
cdef int64_t pgt_map_bulk(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                          const uint64_t *lens, uint64_t len_each, uint64_t n,
                          uint32_t prot, uint64_t *bad) noexcept nogil
# The same over strided arrays: range i is (phys[i * stride], lens[i * stride]),
# e.g. stride 2 over interleaved (phys, nbytes) rows.
cdef int64_t pgt_map_bulk_strided(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                  const uint64_t *lens, uint64_t len_each, uint64_t n,
                                  uint64_t stride, uint32_t prot, uint64_t *bad) noexcept nogil
# n 4 KiB pages at consecutive IOVAs, page i at phys[i * stride], checked
# while written (one pass over the input; a bad page rolls back).
cdef int64_t pgt_map_pages_fused(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                 const uint64_t *lens, uint64_t n, uint64_t stride, uint32_t prot,
                                 uint64_t *bad) noexcept nogil
# The same for a caller that checked alignment, lengths, total, address
# widths and prot itself; only leaves in the way are still looked for.
cdef int64_t pgt_map_bulk_prechecked(io_pgtable *pt, uint64_t iova, const uint64_t *phys,
                                     const uint64_t *lens, uint64_t len_each, uint64_t n,
                                     uint64_t stride, uint32_t prot, uint64_t total,
                                     uint64_t *bad) noexcept nogil
cdef int64_t pgt_unmap(io_pgtable *pt, uint64_t iova, uint64_t size,
                       pgt_gather *gather) noexcept nogil
# 0 and *phys, or -ENOENT when nothing maps iova.
cdef int pgt_iova_to_phys(const io_pgtable *pt, uint64_t iova,
                          uint64_t *phys) noexcept nogil
# The leaf holding iova: output address, IOMMU_* prot bits, leaf size.
cdef int pgt_lookup(const io_pgtable *pt, uint64_t iova, uint64_t *phys,
                    uint32_t *prot, uint64_t *leaf_size) noexcept nogil
cdef void pgt_gather_init(pgt_gather *g) noexcept nogil
cdef void pgt_gather_add_page(io_pgtable *pt, pgt_gather *g, uint64_t iova,
                              uint64_t size) noexcept nogil
cdef void pgt_iotlb_sync(io_pgtable *pt, pgt_gather *g) noexcept nogil
cdef void pgt_flush_iotlb_all(io_pgtable *pt) noexcept nogil
cdef void pgt_release_tables(io_pgtable *pt, uint64_t *freelist) noexcept nogil

cdef class IoPageTable:
    cdef io_pgtable *pt
    cdef PyThread_type_lock lock
    cdef bint owns
    cdef object owner

# ------------------------------------------------------------ IOMMU domain
#
# An IOMMU_DOMAIN_DMA (strict) or IOMMU_DOMAIN_DMA_FQ (lazy) domain: one
# io_pgtable, one iova_domain (granule 4096, start_pfn 1) and, when lazy,
# a flush queue per CPU (rings of fq_size entries, one slot kept empty) with
# a timeout.  Walks take IommuDomain.lock around a whole walk and call:
#
#   iommu_map_nosync / iommu_sync_map      link ranges, then one sync
#   iommu_map                              both (iommu_map())
#   iommu_unmap_fast + iommu_iotlb_sync    unmap with a gather
#   iommu_unmap                            both (iommu_unmap(): always syncs)
#   iommu_dma_alloc_iova                   the IOVA policy (PCI 32-bit first)
#   iommu_dma_free_iova                    free now, or queue if gather->queued
#   iommu_dma_unmap                        __iommu_dma_unmap(): strict or lazy
#   iommu_dma_map                          __iommu_dma_map() for one range

cdef enum:
    PDB_IOVA_DEFAULT_FQ_SIZE = 256
    PDB_IOVA_DEFAULT_FQ_TIMEOUT_MS = 10

cdef struct iova_fq_entry:
    uint64_t pfn
    uint64_t pages
    uint64_t counter                    # fq_flush_start_cnt when queued
    uint64_t *freelist
    uint64_t nfree

cdef struct iova_fq:
    uint32_t head
    uint32_t tail
    uint32_t mod_mask
    iova_fq_entry *entries

cdef struct iommu_domain:
    iova_domain iovad
    io_pgtable pgt
    bint strict
    uint32_t aperture_bits
    uint64_t aperture_end
    iova_fq *fq                         # ncpus rings; NULL when strict
    uint32_t fq_size
    uint64_t fq_timeout_ns              # 0: entries leave only on flush()
    uint64_t fq_flush_start_cnt
    uint64_t fq_flush_finish_cnt
    bint fq_timer_on
    uint32_t fq_timer_cpu
    uint64_t fq_deadline_ns
    uint64_t fq_pending
    uint64_t fq_queued
    uint64_t fq_released
    uint64_t fq_full_flushes            # flushes forced by a full ring
    uint64_t fq_timeouts                # timer (or flush()) runs that flushed

cdef int iommu_map_nosync(iommu_domain *dom, uint64_t iova, uint64_t phys,
                          uint64_t size, uint32_t prot) noexcept nogil
cdef int iommu_sync_map(iommu_domain *dom, uint64_t iova, uint64_t size) noexcept nogil
cdef int iommu_map(iommu_domain *dom, uint64_t iova, uint64_t phys,
                   uint64_t size, uint32_t prot) noexcept nogil
cdef int64_t iommu_unmap_fast(iommu_domain *dom, uint64_t iova, uint64_t size,
                              pgt_gather *gather) noexcept nogil
cdef void iommu_iotlb_sync(iommu_domain *dom, pgt_gather *gather) noexcept nogil
cdef int64_t iommu_unmap(iommu_domain *dom, uint64_t iova, uint64_t size) noexcept nogil
cdef int iommu_dma_alloc_iova(iommu_domain *dom, uint64_t size, uint64_t dma_limit,
                              bint *prefer32, uint32_t cpu, uint64_t *iova) noexcept nogil
cdef int iommu_dma_free_iova(iommu_domain *dom, uint64_t iova, uint64_t size,
                             pgt_gather *gather, uint32_t cpu) noexcept nogil
cdef int64_t iommu_dma_unmap(iommu_domain *dom, uint64_t dma_addr, uint64_t size,
                             uint32_t cpu) noexcept nogil
cdef int iommu_dma_map(iommu_domain *dom, uint64_t phys, uint64_t size,
                       uint32_t prot, uint64_t dma_limit, bint *prefer32,
                       uint32_t cpu, uint64_t *dma_addr) noexcept nogil
cdef void iommu_flush_iotlb_all(iommu_domain *dom) noexcept nogil
# The flush-queue timer's work (flush_iotlb_all + release every ring);
# returns the entries released.  fq_poll runs it if the timeout passed.
cdef uint64_t iommu_fq_flush(iommu_domain *dom) noexcept nogil
cdef uint64_t iommu_fq_poll(iommu_domain *dom) noexcept nogil

cdef class IommuDomain:
    cdef iommu_domain *d
    cdef PyThread_type_lock lock
    cdef object _iovad
    cdef object _pgtable

# ------------------------------------------------------ DMA mapping walks
#
# kernel/dma/direct.c, drivers/iommu/dma-iommu.c (iommu_dma_map_sg and the
# dma_iova_* two-step API) and iommu_map_sg().  The caller holds the
# table's lock and the domain's lock (IommuDomain.lock) around a walk.

cdef enum:
    PDB_RANGE_MMIO = 2                  # RangeKind.MMIO
    # enum pci_p2pdma_map_type (pydmabuf.P2PMapType)
    PDB_P2P_NONE = 1
    PDB_P2P_NOT_SUPPORTED = 2
    PDB_P2P_BUS_ADDR = 3
    PDB_P2P_THRU_HOST_BRIDGE = 4
    # enum dma_data_direction
    PDB_DMA_BIDIRECTIONAL = 0
    PDB_DMA_TO_DEVICE = 1
    PDB_DMA_FROM_DEVICE = 2
    PDB_DMA_NONE = 3
    # DMA_ATTR_* bits used by the walks
    PDB_DMA_ATTR_SKIP_CPU_SYNC = 1 << 5
    PDB_DMA_ATTR_PRIVILEGED = 1 << 9
    PDB_DMA_ATTR_MMIO = 1 << 10

cdef extern from *:
    """
    #define PDB_DMA_MAPPING_ERROR (~0ULL)
    """
    const uint64_t PDB_DMA_MAPPING_ERROR

# What one client device sees of the machine: the address map, and per
# range owner (a BAR) the P2P route and bus offset.  The last lookup is
# cached (consecutive entries usually fall in one range).
cdef struct p2p_ctx:
    const range_table *amap
    const uint8_t *state
    const uint64_t *bus_offset
    uint64_t nowners
    bint c_valid
    uint64_t c_start
    uint64_t c_last
    uint8_t c_state
    uint64_t c_off

cdef class P2pContext:
    cdef RangeTable amap
    cdef uint8_t *state
    cdef uint64_t *offset
    cdef uint64_t n
    cdef void fill(self, p2p_ctx *c) noexcept

cdef int64_t dma_direct_map_sg(sg_table *t, uint64_t dma_limit, const uint64_t *ranges,
                               uint64_t nranges, bint force_swiotlb, bint has_swiotlb,
                               uint64_t attrs, p2p_ctx *pc, uint64_t *bounce) noexcept nogil
cdef int64_t iommu_dma_map_sg(sg_table *t, iommu_domain *dom, uint64_t dma_limit,
                              uint64_t seg_mask, uint64_t max_seg, bint *prefer32,
                              uint32_t cpu, uint32_t prot, p2p_ctx *pc,
                              uint64_t *iova_out, uint64_t *iova_len_out) noexcept nogil
cdef int64_t iommu_dma_unmap_sg(sg_table *t, iommu_domain *dom, uint32_t cpu) noexcept nogil
cdef int dma_iova_link_one(iommu_domain *dom, uint64_t state_addr, uint64_t phys,
                           uint64_t offset, uint64_t size, uint32_t prot) noexcept nogil
cdef int64_t dma_iova_link_ranges(iommu_domain *dom, uint64_t state_addr, uint64_t offset,
                                  const uint64_t *pairs, uint64_t n, uint32_t prot,
                                  bint all_at_offset, uint64_t max_total, uint64_t *bad) noexcept nogil
cdef int64_t iommu_translate(iommu_domain *dom, uint64_t iova, uint64_t nbytes,
                             uint32_t need, uint64_t *out, uint64_t maxout,
                             uint64_t *fault_at, uint32_t *fault_prot) noexcept nogil


# ------------------------------------------------- block layer DMA helpers
#
# block/blk-mq-dma.c: blk_map_iter_next()'s merge of a request's bio_vecs
# into phys_vecs, and many __iommu_dma_map() / __iommu_dma_unmap() calls
# in one walk (the per-segment fallback of blk_rq_dma_map_iter_*).

cdef struct blk_walk:
    uint64_t gap                        # OR of every interior seam
    uint64_t total                      # payload bytes
    uint64_t bus_offset                 # of the first vec (BUS_ADDR P2P)
    uint64_t bad                        # the bvec a -EINVAL names
    uint8_t kind                        # PDB_P2P_* of the first vec
    bint mixed                          # a later vec differs in kind

cdef uint64_t blk_max_segment(uint64_t paddr, uint64_t seg_mask, uint64_t max_seg) noexcept nogil
cdef int64_t blk_map_phys_vecs(const uint64_t *bvecs, uint64_t n, uint64_t max_seg,
                               uint64_t seg_mask, p2p_ctx *pc, uint64_t *out,
                               blk_walk *w) noexcept nogil
cdef int64_t iommu_dma_map_ranges(iommu_domain *dom, const uint64_t *pairs, uint64_t n,
                                  uint32_t prot, uint64_t dma_limit, bint *prefer32,
                                  uint32_t cpu, uint64_t *out, uint64_t *bad) noexcept nogil
cdef int64_t iommu_dma_unmap_ranges(iommu_domain *dom, const uint64_t *pairs, uint64_t n,
                                    uint32_t cpu, uint64_t *bad) noexcept nogil


# ---------------------------------------------------- reservation locking
#
# Wound/wait mutexes (struct ww_mutex, ww_acquire_ctx, ww_class), fences
# (struct dma_fence) and the per-thread state they need.  The structures
# are plain C so Cython consumers can embed and call them; the Python
# classes below own one each.
#
# Threads.  Every thread that blocks or locks gets a ``pdb_task`` (the
# model's task_struct): a private mutex + condition variable pair used as
# a parking spot with a wake token (so a wake-up can never be lost), a
# modelled "signal pending" flag for interruptible waits, and the
# bookkeeping of the lock checker.  A task is reference counted; the
# thread holds one reference until it exits, every acquire context one
# more.
#
# Locking rule of the C layer: a ``wait_lock`` / fence ``mu`` is held only
# for short C sections that never take the GIL, never call Python and
# never block on anything but a task's ``mu`` (always taken last), so a
# thread holding the GIL may take them.

cdef extern from *:
    """
    #include <pthread.h>
    #include <stdint.h>
    #include <stddef.h>

    #define PDB_TASK_CLASSES 4

    typedef struct pdb_task {
        pthread_mutex_t mu;
        pthread_cond_t cv;
        int token;              /* a wake-up is pending */
        int sigpending;         /* modelled signal for interruptible waits */
        int alive;              /* the thread has not exited */
        long refs;
        unsigned long ident;    /* PyThread_get_thread_ident() */
        struct pdb_task *next, *prev;       /* registry of all tasks */
        /* Touched by the owning thread only (with the GIL). */
        int sig_depth;          /* inside a fence-signalling section */
        void *sig_frame;        /* frame that called Fence.signal() */
        void *sig_site;         /* owned str: where begin_signalling() ran */
        void *sig_fence;        /* the fence being signalled (borrowed) */
        unsigned int held_total;            /* ww mutexes held */
        void *held_cls[PDB_TASK_CLASSES];   /* per class: */
        unsigned int held_plain[PDB_TASK_CLASSES];  /* held without ctx */
        unsigned int held_ctx[PDB_TASK_CLASSES];    /* held through a ctx */
    } pdb_task;

    typedef struct pdb_ww_class {
        unsigned long stamp;    /* last stamp handed out (atomic) */
        int is_wait_die;
        int is_reservation;     /* reservation_ww_class: no locking while
                                   signalling fences */
    } pdb_ww_class;

    struct pdb_ww_mutex;

    typedef struct pdb_ww_ctx {
        pdb_task *task;         /* owner (a reference) */
        unsigned long stamp;
        unsigned int acquired;  /* written by the owner, read by others */
        int wounded;            /* atomic */
        int is_wait_die;
        int done_acquire;
        int finished;
        pdb_ww_class *cls;
        struct pdb_ww_mutex *contending;    /* set by -EDEADLK */
        struct pdb_ww_mutex *held;          /* list of held mutexes */
        unsigned int inject_interval;       /* deadlock injection */
        unsigned int inject_countdown;
        int inject;
        void *pyobj;            /* the AcquireContext (borrowed) */
    } pdb_ww_ctx;

    typedef struct pdb_ww_waiter {
        struct pdb_ww_waiter *next, *prev;
        pdb_task *task;
        pdb_ww_ctx *ctx;
    } pdb_ww_waiter;

    #define PDB_MUTEX_WAITERS ((size_t)1)

    typedef struct pdb_ww_mutex {
        pthread_mutex_t wait_lock;
        size_t owner;           /* pdb_task * | PDB_MUTEX_WAITERS (atomic) */
        unsigned long owner_ident;
        pdb_ww_ctx *ctx;        /* atomic; changed under wait_lock except
                                   when set by the lock fast path */
        pdb_ww_class *cls;
        pdb_ww_waiter *wait_first, *wait_last;  /* stamp order for ctxs */
        struct pdb_ww_mutex *held_next, *held_prev;
        void *pyobj;            /* the WwMutex (borrowed) */
        int destroyed;
        int is_resv;
    } pdb_ww_mutex;

    typedef struct pdb_fence_waiter {
        struct pdb_fence_waiter *next, *prev;
        pdb_task *task;
    } pdb_fence_waiter;

    #define PDB_FENCE_SIGNALED 1u
    #define PDB_FENCE_TIMESTAMP 2u
    #define PDB_FENCE_ENABLE_SIGNAL 4u
    #define PDB_FENCE_CB_DONE 8u     /* callbacks have run; waiters may go */
    #define PDB_FENCE_SEQNO64 16u

    typedef struct pdb_fence {
        pthread_mutex_t mu;
        unsigned int flags;     /* atomic */
        int error;
        uint64_t context;
        uint64_t seqno;
        int64_t timestamp;      /* CLOCK_MONOTONIC ns */
        pdb_fence_waiter *waiters;
    } pdb_fence;

    static inline size_t pdb_load_sz(size_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline int pdb_cas_sz(size_t *p, size_t *expect, size_t desired) {
        return __atomic_compare_exchange_n(p, expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline void pdb_or_sz(size_t *p, size_t v) { __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline void pdb_and_sz(size_t *p, size_t v) { __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
    static inline int pdb_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void pdb_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int pdb_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline unsigned int pdb_load_uint(unsigned int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void pdb_store_uint(unsigned int *p, unsigned int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline unsigned int pdb_load_flags(unsigned int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void pdb_or_flags(unsigned int *p, unsigned int v) { __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline pdb_ww_ctx *pdb_load_ctx(pdb_ww_ctx **p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void pdb_store_ctx(pdb_ww_ctx **p, pdb_ww_ctx *v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline unsigned long pdb_inc_ulong(unsigned long *p) { return __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    static inline uint64_t pdb_fetch_add_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    """
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass

    enum:
        PDB_TASK_CLASSES
    const size_t PDB_MUTEX_WAITERS
    const unsigned int PDB_FENCE_SIGNALED
    const unsigned int PDB_FENCE_TIMESTAMP
    const unsigned int PDB_FENCE_ENABLE_SIGNAL
    const unsigned int PDB_FENCE_CB_DONE
    const unsigned int PDB_FENCE_SEQNO64

    ctypedef struct pdb_task:
        pthread_mutex_t mu
        pthread_cond_t cv
        int token
        int sigpending
        int alive
        long refs
        unsigned long ident
        int sig_depth
        void *sig_frame
        void *sig_site
        void *sig_fence
        unsigned int held_total
        void *held_cls[PDB_TASK_CLASSES]
        unsigned int held_plain[PDB_TASK_CLASSES]
        unsigned int held_ctx[PDB_TASK_CLASSES]

    ctypedef struct pdb_ww_class:
        unsigned long stamp
        int is_wait_die
        int is_reservation

    ctypedef struct pdb_ww_mutex

    ctypedef struct pdb_ww_ctx:
        pdb_task *task
        unsigned long stamp
        unsigned int acquired
        int wounded
        int is_wait_die
        int done_acquire
        int finished
        pdb_ww_class *cls
        pdb_ww_mutex *contending
        pdb_ww_mutex *held
        unsigned int inject_interval
        unsigned int inject_countdown
        int inject
        void *pyobj

    ctypedef struct pdb_ww_waiter:
        pdb_ww_waiter *next
        pdb_ww_waiter *prev
        pdb_task *task
        pdb_ww_ctx *ctx

    ctypedef struct pdb_ww_mutex:
        pthread_mutex_t wait_lock
        size_t owner
        unsigned long owner_ident
        pdb_ww_ctx *ctx
        pdb_ww_class *cls
        pdb_ww_waiter *wait_first
        pdb_ww_waiter *wait_last
        pdb_ww_mutex *held_next
        pdb_ww_mutex *held_prev
        void *pyobj
        int destroyed
        int is_resv

    ctypedef struct pdb_fence_waiter:
        pdb_fence_waiter *next
        pdb_fence_waiter *prev
        pdb_task *task

    ctypedef struct pdb_fence:
        pthread_mutex_t mu
        unsigned int flags
        int error
        uint64_t context
        uint64_t seqno
        int64_t timestamp
        pdb_fence_waiter *waiters

    size_t pdb_load_sz(size_t *p) nogil
    bint pdb_cas_sz(size_t *p, size_t *expect, size_t desired) nogil
    void pdb_or_sz(size_t *p, size_t v) nogil
    void pdb_and_sz(size_t *p, size_t v) nogil
    int pdb_load_int(int *p) nogil
    void pdb_store_int(int *p, int v) nogil
    int pdb_xchg_int(int *p, int v) nogil
    unsigned int pdb_load_uint(unsigned int *p) nogil
    void pdb_store_uint(unsigned int *p, unsigned int v) nogil
    unsigned int pdb_load_flags(unsigned int *p) nogil
    void pdb_or_flags(unsigned int *p, unsigned int v) nogil
    pdb_ww_ctx *pdb_load_ctx(pdb_ww_ctx **p) nogil
    void pdb_store_ctx(pdb_ww_ctx **p, pdb_ww_ctx *v) nogil
    unsigned long pdb_inc_ulong(unsigned long *p) nogil
    uint64_t pdb_fetch_add_u64(uint64_t *p, uint64_t v) nogil

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

# Tasks (threads).  pdb_current_task() returns NULL only when out of memory.
cdef pdb_task *pdb_current_task() noexcept nogil
cdef void pdb_wake(pdb_task *t) noexcept nogil
# Sleep until woken (0) or until CLOCK_MONOTONIC ``deadline_ns`` (-ETIMEDOUT);
# a negative deadline waits forever.  Spurious returns are possible.
cdef int pdb_park(pdb_task *t, int64_t deadline_ns) noexcept nogil
cdef int64_t pdb_now_ns() noexcept nogil

# Wound/wait mutexes.  ww_lock_fast() is the uncontended path (1: taken,
# 0: go slow); ww_lock_slow() blocks: 0, -EDEADLK, -EINTR.  ww_trylock():
# 1/0.  ww_unlock() must be called by the owner.  The debug checks
# (pydmabuf.errors.LockingError) are made by the Python layer only; these
# kernels trust their caller.  A caller that locks with a ctx must keep
# that ctx alive until the mutex is unlocked.
cdef int ww_mutex_init(pdb_ww_mutex *m, pdb_ww_class *cls) noexcept nogil
cdef bint ww_lock_fast(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t) noexcept nogil
cdef int ww_lock_slow(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t,
                      bint interruptible) noexcept nogil
cdef bint ww_trylock(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t) noexcept nogil
cdef void ww_unlock(pdb_ww_mutex *m, pdb_task *t) noexcept nogil

# Fences.  fence_wait(): 1 once signalled and its callbacks have run, 0 at
# the deadline, -ERESTARTSYS when interruptible and a signal is pending.
cdef int fence_init(pdb_fence *f, uint64_t context, uint64_t seqno) noexcept nogil
cdef int fence_wait(pdb_fence *f, pdb_task *t, int64_t deadline_ns,
                    bint interruptible) noexcept nogil
cdef bint fence_is_later(const pdb_fence *a, const pdb_fence *b) noexcept nogil

cdef class WwClass:
    cdef pdb_ww_class c
    cdef readonly str name

cdef class WwMutex:
    cdef pdb_ww_mutex m
    cdef readonly WwClass ww_class
    cdef void *ctx_ref              # the AcquireContext reference the lock holds
    cdef object __weakref__
    cdef int _unlock(self) except -1

cdef class AcquireContext:
    cdef pdb_ww_ctx c
    cdef readonly WwClass ww_class
    cdef object _contending

cdef class FenceCallback:
    cdef object fn
    cdef int state
    cdef int _fire(self, Fence fence) except -1

cdef class Fence:
    cdef pdb_fence f
    cdef list _callbacks
    cdef int _hooks
    cdef object __weakref__
    cdef int _signal(self, int64_t timestamp, bint strict) except -1
    cdef bint _add(self, FenceCallback cb) except -1
    cdef bint _op_signaled(self) except -1
    cdef bint _op_enable_signaling(self) except -1
    cdef int _op_set_deadline(self, int64_t deadline) except -1
    cdef bint _is_signaled(self) except -1

cdef struct resv_entry:
    void *fence                     # a Fence reference
    unsigned int usage

cdef class Resv(WwMutex):
    cdef resv_entry *table
    cdef unsigned int num
    cdef unsigned int max
    cdef uint64_t gen               # bumped whenever a new list is published
    cdef PyThread_type_lock lock
