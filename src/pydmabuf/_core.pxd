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

from libc.stdint cimport int8_t, int64_t, uint8_t, uint32_t, uint64_t
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
