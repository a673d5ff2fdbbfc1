# cython: language_level=3
#
# C declarations of pydmabuf._core_iommu (src/_core_iommu.pyx): the IO
# page tables (io-pgtable-arm) and the IOMMU domain on top of them
# (drivers/iommu/iommu.c, dma-iommu.c's IOVA policy and flush queue).

from pydmabuf._core_base cimport *
from pydmabuf._core_iova cimport *
from pydmabuf._core_ww cimport pdb_now_ns

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
# The leaf holding iova: output address, IOMMU_* prot bits, leaf size
# (0, or -ENOENT when nothing maps iova).  prot and leaf_size may be NULL:
# with both NULL this is iommu_iova_to_phys().
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

