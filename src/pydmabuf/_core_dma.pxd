# cython: language_level=3
#
# C declarations of pydmabuf._core_dma (src/_core_dma.pyx): scatterlists
# (lib/scatterlist.c) and the DMA mapping walks over them (dma-direct,
# dma-iommu's map_sg and the dma_iova_* two-step API, the block layer's
# helpers).  The per-entry loops and the tables they walk stay in this one
# module.

from pydmabuf._core_base cimport *
from pydmabuf._core_iova cimport *
from pydmabuf._core_iommu cimport *

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
    # What the last IOMMU map's layout pass found, for the next map of the
    # same entries (see _iommu_dma_map_sg_aligned): the IOVA length, the
    # lowest and highest entry start, the longest entry, and the number of
    # entries described (0: no hint).  Code that writes entries through
    # this struct sets hint_n to 0.
    uint64_t hint_len
    uint64_t hint_pmin
    uint64_t hint_pmax
    uint32_t hint_maxlen
    uint32_t hint_n

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
    # Set by the dma-buf layer while the table is a live dma-buf mapping:
    # a weak reference to its record (pydmabuf.dmabuf_attach), so an unmap
    # finds the record from the table alone.  Opaque to the core.
    cdef public object _dmabuf_ref
    cdef object __weakref__
    cdef object _ranges(self, bint dma)
    cdef int _append(self, const uint64_t *p, Py_ssize_t n, uint32_t off, uint64_t size, uint64_t maxseg,
                     uint32_t left) except -1

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
# The two walks above with the table's and the domain's locks taken and the
# errno raised (what map_sg_iommu / unmap_sg_iommu and the DMA API's
# per-call path in pydmabuf._dma_api run).
cdef int64_t sg_iommu_map(SgTable table, IommuDomain dom, uint64_t dma_limit, uint64_t seg_mask,
                          uint64_t max_seg, bint *prefer32, uint32_t cpu, uint32_t prot, P2pContext pc,
                          uint64_t *iova, uint64_t *ilen, object claim) except -1
cdef int64_t sg_iommu_unmap(SgTable table, IommuDomain dom, uint32_t cpu) except -1
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



# ------------------------------------------------ the two-step IOVA API
#
# struct dma_iova_state and the record of linked windows, the core half of
# pydmabuf.IovaState (src/_core_iovastate.pxi).

cdef class IovaStateCore:
    cdef public object device
    cdef public object _dom
    cdef public uint64_t addr
    cdef public uint64_t size
    cdef public uint64_t _offset
    cdef public uint64_t _reserved
    cdef public bint uses_swiotlb
    cdef public bint _live
    cdef public uint32_t _ncpus         # the IOMMU's CPUs: a thread's CPU for the per-CPU caches
    cdef uint64_t *win                  # 2 * nwin u64: [start, end) pairs
    cdef Py_ssize_t nwin
    cdef Py_ssize_t capwin
    cdef object __weakref__
    cdef int _win_room(self, Py_ssize_t n) except -1
    cdef int _win_mark(self, uint64_t lo, uint64_t hi) except -1
    cdef uint64_t _win_covered(self, uint64_t lo, uint64_t hi) noexcept
    cdef int _win_cut(self, uint64_t lo, uint64_t hi) except -1
    cdef uint64_t _win_total(self) noexcept
    cpdef object _need(self, str what)
    cpdef tuple _check_window(self, str what, object offset, object nbytes)
    # dma_iova_link of (N, 2) (phys, nbytes) rows for a device that does not
    # bounce, and dma_iova_destroy of what is linked (False for 0 bytes).
    cdef object link(self, object ranges, uint32_t prot, object offset, bint all_at_offset)
    cdef object _link_pairs(self, const uint64_t *pairs, uint64_t n, uint32_t prot, object offset,
                            bint all_at_offset)
    cdef bint destroy_linked(self, object mapped_nbytes) except -1
