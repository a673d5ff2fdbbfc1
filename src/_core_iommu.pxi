# IOMMU DMA domains: an io_pgtable and an iova_domain under the policies of
# drivers/iommu/dma-iommu.c and the core calls of drivers/iommu/iommu.c.
#
# Strict (IOMMU_DOMAIN_DMA): an unmap gathers the cleared leaves, syncs the
# IOTLB once (one range invalidation) and frees the IOVA at once.  Lazy
# (IOMMU_DOMAIN_DMA_FQ): the unmap gathers nothing and the IOVA (with any
# table pages waiting on the gather) goes on the CPU's flush queue; queued
# entries are released after a flush_iotlb_all that began after they were
# queued: when a ring is full, when the queue's timer fires (fq_timeout
# after it was armed, checked at the next domain operation against the
# monotonic clock), or on an explicit flush().

import logging as _logging

_log = _logging.getLogger("pydmabuf.iommu")


cdef int _iommu_domain_init(iommu_domain *dom, bint strict, uint32_t aperture_bits,
                            uint32_t ncpus, uint32_t fq_size, uint64_t fq_timeout_ns,
                            bint defer_table_free) noexcept nogil:
    cdef uint32_t c
    cdef int rc
    memset(dom, 0, sizeof(iommu_domain))
    if fq_size < 2 or not _is_pow2(fq_size):
        return -EINVAL
    rc = pgt_init(&dom.pgt, aperture_bits, 52, defer_table_free)
    if rc < 0:
        return rc
    rc = iova_domain_init(&dom.iovad, PDB_PAGE_SIZE, 1, ncpus)
    if rc < 0:
        pgt_destroy(&dom.pgt)
        return rc
    dom.strict = strict
    dom.aperture_bits = aperture_bits
    dom.aperture_end = ((<uint64_t>1) << aperture_bits) - 1
    dom.fq_size = fq_size
    dom.fq_timeout_ns = fq_timeout_ns
    if not strict:
        dom.fq = <iova_fq *>calloc(ncpus, sizeof(iova_fq))
        if dom.fq == NULL:
            _iommu_domain_destroy(dom)
            return -ENOMEM
        for c in range(ncpus):
            dom.fq[c].mod_mask = fq_size - 1
            dom.fq[c].entries = <iova_fq_entry *>calloc(fq_size, sizeof(iova_fq_entry))
            if dom.fq[c].entries == NULL:
                _iommu_domain_destroy(dom)
                return -ENOMEM
    return 0


cdef void _iommu_domain_destroy(iommu_domain *dom) noexcept nogil:
    cdef uint32_t c, i
    cdef iova_fq *fq
    if dom.fq != NULL:
        for c in range(dom.iovad.ncpus):
            fq = &dom.fq[c]
            if fq.entries != NULL:
                i = fq.head
                while i != fq.tail:
                    pgt_release_tables(&dom.pgt, fq.entries[i].freelist)
                    i = (i + 1) & fq.mod_mask
                free(fq.entries)
        free(dom.fq)
        dom.fq = NULL
    iova_domain_destroy(&dom.iovad)
    pgt_destroy(&dom.pgt)


# ---------------------------------------------------------- core calls

cdef int iommu_map_nosync(iommu_domain *dom, uint64_t iova, uint64_t phys,
                          uint64_t size, uint32_t prot) noexcept nogil:
    return pgt_map(&dom.pgt, iova, phys, size, prot)


cdef int iommu_sync_map(iommu_domain *dom, uint64_t iova, uint64_t size) noexcept nogil:
    """The driver's iotlb_sync_map for [iova, iova + size): counted only
    (IOMMUs that cache non-present entries need it; it cannot fail here)."""
    dom.pgt.c.sync_map_calls += 1
    return 0


cdef int iommu_map(iommu_domain *dom, uint64_t iova, uint64_t phys,
                   uint64_t size, uint32_t prot) noexcept nogil:
    cdef int rc = pgt_map(&dom.pgt, iova, phys, size, prot)
    if rc == 0:
        rc = iommu_sync_map(dom, iova, size)
    return rc


cdef int64_t iommu_unmap_fast(iommu_domain *dom, uint64_t iova, uint64_t size,
                              pgt_gather *gather) noexcept nogil:
    return pgt_unmap(&dom.pgt, iova, size, gather)


cdef void iommu_iotlb_sync(iommu_domain *dom, pgt_gather *gather) noexcept nogil:
    pgt_iotlb_sync(&dom.pgt, gather)


cdef int64_t iommu_unmap(iommu_domain *dom, uint64_t iova, uint64_t size) noexcept nogil:
    """iommu_unmap(): always syncs, whatever the domain's mode."""
    cdef pgt_gather g
    cdef int64_t r
    pgt_gather_init(&g)
    r = pgt_unmap(&dom.pgt, iova, size, &g)
    if r >= 0:
        pgt_iotlb_sync(&dom.pgt, &g)
    return r


cdef void iommu_flush_iotlb_all(iommu_domain *dom) noexcept nogil:
    pgt_flush_iotlb_all(&dom.pgt)


# ---------------------------------------------------------- flush queue

cdef void _fq_flush_iotlb(iommu_domain *dom) noexcept nogil:
    """fq_flush_iotlb(): a domain-wide flush between the start and finish
    counters the entries are stamped with."""
    dom.fq_flush_start_cnt += 1
    pgt_flush_iotlb_all(&dom.pgt)
    dom.fq_flush_finish_cnt += 1


cdef void _fq_ring_free(iommu_domain *dom, iova_fq *fq, uint32_t cpu) noexcept nogil:
    """fq_ring_free_locked(): release the entries, oldest first, that a
    finished flush covers."""
    cdef uint64_t counter = dom.fq_flush_finish_cnt
    cdef iova_fq_entry *e
    cdef rt_node *n
    while fq.head != fq.tail:
        e = &fq.entries[fq.head]
        if e.counter >= counter:
            break
        pgt_release_tables(&dom.pgt, e.freelist)
        e.freelist = NULL
        e.nfree = 0
        # Checked when queued, and nothing else can free a queued range.
        n = _iova_node(&dom.iovad, e.pfn)
        _iova_set_flag(&dom.iovad, n, PDB_IOVA_FLAG_QUEUED, False)
        _iova_free_fast_node(&dom.iovad, n, e.pfn, e.pages, cpu)
        fq.head = (fq.head + 1) & fq.mod_mask
        dom.fq_pending -= 1
        dom.fq_released += 1


cdef void _queue_iova(iommu_domain *dom, uint64_t pfn, uint64_t pages, pgt_gather *g,
                      uint32_t cpu) noexcept nogil:
    cdef iova_fq *fq = &dom.fq[cpu]
    cdef uint32_t idx
    _iova_set_flag(&dom.iovad, _iova_node(&dom.iovad, pfn), PDB_IOVA_FLAG_QUEUED, True)
    _fq_ring_free(dom, fq, cpu)
    if ((fq.tail + 1) & fq.mod_mask) == fq.head:
        _fq_flush_iotlb(dom)
        dom.fq_full_flushes += 1
        _fq_ring_free(dom, fq, cpu)
    idx = fq.tail
    fq.tail = (idx + 1) & fq.mod_mask
    fq.entries[idx].pfn = pfn
    fq.entries[idx].pages = pages
    fq.entries[idx].counter = dom.fq_flush_start_cnt
    fq.entries[idx].freelist = g.freelist
    fq.entries[idx].nfree = g.nfree
    g.freelist = NULL
    g.nfree = 0
    dom.fq_pending += 1
    dom.fq_queued += 1
    if not dom.fq_timer_on:
        dom.fq_timer_on = True
        dom.fq_timer_cpu = cpu
        if dom.fq_timeout_ns:
            dom.fq_deadline_ns = <uint64_t>pdb_now_ns() + dom.fq_timeout_ns


cdef uint64_t iommu_fq_flush(iommu_domain *dom) noexcept nogil:
    """fq_flush_timeout(): flush the IOTLB and release every ring (on the
    CPU that armed the timer).  Nothing to do when no entry is queued."""
    cdef uint64_t before = dom.fq_released
    cdef uint32_t c
    if dom.fq == NULL or not dom.fq_timer_on:
        return 0
    dom.fq_timer_on = False
    _fq_flush_iotlb(dom)
    dom.fq_timeouts += 1
    for c in range(dom.iovad.ncpus):
        _fq_ring_free(dom, &dom.fq[c], dom.fq_timer_cpu)
    return dom.fq_released - before


cdef uint64_t iommu_fq_poll(iommu_domain *dom) noexcept nogil:
    if dom.fq != NULL and dom.fq_timer_on and dom.fq_timeout_ns and <uint64_t>pdb_now_ns() >= dom.fq_deadline_ns:
        return iommu_fq_flush(dom)
    return 0


# ---------------------------------------------------------- DMA API side

cdef int iommu_dma_alloc_iova(iommu_domain *dom, uint64_t size, uint64_t dma_limit,
                              bint *prefer32, uint32_t cpu, uint64_t *iova) noexcept nogil:
    """iommu_dma_alloc_iova() with the limit clipped to the aperture; the
    caller has applied the device's bus_dma_limit.  -ENOMEM when the space
    is exhausted (the kernel returns 0)."""
    if cpu >= dom.iovad.ncpus:
        return -EINVAL
    iommu_fq_poll(dom)
    if dma_limit > dom.aperture_end:
        dma_limit = dom.aperture_end
    return dma_alloc_iova(&dom.iovad, size, dma_limit, prefer32, cpu, iova)


cdef int iommu_dma_free_iova(iommu_domain *dom, uint64_t iova, uint64_t size,
                             pgt_gather *gather, uint32_t cpu) noexcept nogil:
    """iommu_dma_free_iova(): onto the flush queue when the gather is
    queued, else straight to free_iova_fast.  Checked first: -EINVAL (bad
    size, cpu, or a queued gather on a strict domain), -ENOENT (not an
    allocated range)."""
    cdef uint64_t pfn, pages
    cdef int rc
    if cpu >= dom.iovad.ncpus or size == 0 or ((iova | size) & (PDB_PAGE_SIZE - 1)):
        return -EINVAL
    pfn = iova >> PDB_PAGE_SHIFT
    pages = size >> PDB_PAGE_SHIFT
    rc = iova_check_free_fast(&dom.iovad, pfn, pages)
    if rc < 0:
        return rc
    if gather != NULL and gather.queued:
        if dom.fq == NULL:
            return -EINVAL
        _queue_iova(dom, pfn, pages, gather, cpu)
        return 0
    return iova_free_fast(&dom.iovad, pfn, pages, cpu)


cdef int64_t iommu_dma_unmap(iommu_domain *dom, uint64_t dma_addr, uint64_t size,
                             uint32_t cpu) noexcept nogil:
    """__iommu_dma_unmap(): unmap the granule-aligned span, sync and free
    the IOVA (strict) or queue it (lazy).  Returns the bytes unmapped (the
    kernel WARNs when that is not the whole span); -EINVAL / -ENOENT before
    anything changes if the span is not an allocated IOVA range."""
    cdef uint64_t off = dma_addr & (PDB_PAGE_SIZE - 1)
    cdef uint64_t span
    cdef pgt_gather g
    cdef int64_t unmapped
    cdef int rc
    if cpu >= dom.iovad.ncpus or size == 0:
        return -EINVAL
    if pdb_add_overflow(size, off + PDB_PAGE_SIZE - 1, &span):
        return -EINVAL
    span &= ~(<uint64_t>PDB_PAGE_SIZE - 1)
    dma_addr -= off
    rc = iova_check_free_fast(&dom.iovad, dma_addr >> PDB_PAGE_SHIFT, span >> PDB_PAGE_SHIFT)
    if rc < 0:
        return rc
    iommu_fq_poll(dom)
    pgt_gather_init(&g)
    g.queued = dom.fq != NULL
    unmapped = pgt_unmap(&dom.pgt, dma_addr, span, &g)
    if not g.queued:
        pgt_iotlb_sync(&dom.pgt, &g)
    iommu_dma_free_iova(dom, dma_addr, span, &g, cpu)
    pgt_release_tables(&dom.pgt, g.freelist)
    return unmapped


cdef int iommu_dma_map(iommu_domain *dom, uint64_t phys, uint64_t size,
                       uint32_t prot, uint64_t dma_limit, bint *prefer32,
                       uint32_t cpu, uint64_t *dma_addr) noexcept nogil:
    """__iommu_dma_map(): allocate an IOVA for the granules [phys, +size)
    touches, map them (with sync_map), return the DMA address of phys.
    The arguments are checked before the IOVA is taken."""
    cdef uint64_t off = phys & (PDB_PAGE_SIZE - 1)
    cdef uint64_t span, iova = 0, last
    cdef int rc
    if size == 0 or pdb_add_overflow(size, off + PDB_PAGE_SIZE - 1, &span):
        return -EINVAL
    span &= ~(<uint64_t>PDB_PAGE_SIZE - 1)
    if (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) == 0 or (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)):
        return -EINVAL
    if pdb_add_overflow(phys - off, span - 1, &last) or (last >> dom.pgt.oas) != 0:
        return -ERANGE
    rc = iommu_dma_alloc_iova(dom, span, dma_limit, prefer32, cpu, &iova)
    if rc < 0:
        return rc
    rc = iommu_map(dom, iova, phys - off, span, prot)
    if rc < 0:
        iommu_dma_free_iova(dom, iova, span, NULL, cpu)
        return rc
    dma_addr[0] = iova + off
    return 0


# ---------------------------------------------------------- Python class

cdef uint64_t _fq_timeout_arg(object fq_timeout) except? 0xFFFFFFFFFFFFFFFF:
    if fq_timeout is None:
        return 0
    if not isinstance(fq_timeout, (int, float)):
        raise TypeError("fq_timeout must be a number of seconds or None")
    if not (fq_timeout > 0) or fq_timeout > 3600:
        raise _errors.InvalidArgument(f"fq_timeout must be in (0, 3600] seconds or None (got {fq_timeout})")
    return max(<uint64_t>1, <uint64_t>(fq_timeout * 1e9))


@cython.final
cdef class IommuDomain:
    """An IOMMU DMA domain: IO page table + IOVA allocator + invalidation.

    Models ``IOMMU_DOMAIN_DMA`` (``strict=True``: every unmap invalidates
    the IOTLB for the range and frees the IOVA at once) and
    ``IOMMU_DOMAIN_DMA_FQ`` (``strict=False``: unmaps invalidate nothing;
    the IOVA waits on a per-CPU flush queue until a domain-wide IOTLB flush
    covers it, and may not be reused before).

    Parameters
    ----------
    strict : bool
        Strict or lazy (flush-queue) invalidation.
    aperture_bits : int
        IOVA bits (32..48): the page table's input size and the allocator's
        ceiling.
    granule : int
        The IOVA granule; only 4096 is modelled.
    ncpus : int
        CPUs (each has its IOVA caches and, when lazy, its flush queue).
    fq_size : int
        Flush-queue ring size, a power of two (the kernel's 256; one slot
        stays empty, so a ring holds ``fq_size - 1`` entries).
    fq_timeout : float or None
        Seconds after the first queued entry until the queue's timer
        flushes (the kernel's 10 ms).  The model checks the timer against
        the monotonic clock at the next domain operation; ``None`` makes
        the model deterministic: entries leave only on :meth:`flush` or a
        full ring.
    defer_table_free : bool
        See :class:`IoPageTable`.

    Notes
    -----
    ``iovad`` and ``pgtable`` are views sharing this domain's lock.  The
    allocator starts at pfn 1 (IOVA 0 is never handed out) and uses the
    4096-byte granule.
    """

    def __cinit__(self, strict=True, aperture_bits=48, granule=4096, ncpus=1,
                  fq_size=PDB_IOVA_DEFAULT_FQ_SIZE, fq_timeout=PDB_IOVA_DEFAULT_FQ_TIMEOUT_MS / 1000.0,
                  defer_table_free=False):
        cdef uint64_t tmo
        cdef int rc
        self.d = NULL
        self.lock = NULL
        if not isinstance(aperture_bits, int) or not isinstance(ncpus, int) or not isinstance(fq_size, int) \
                or not isinstance(granule, int):
            raise TypeError("aperture_bits, granule, ncpus and fq_size must be ints")
        if granule != PDB_PAGE_SIZE:
            raise _errors.NotSupported(f"only a 4096-byte IOVA granule is modelled (got {granule})")
        if aperture_bits < 32 or aperture_bits > 48:
            raise _errors.InvalidArgument(f"aperture_bits must be in 32..48 (got {aperture_bits})")
        if ncpus < 1 or ncpus > PDB_IOVA_MAX_CPUS:
            raise _errors.InvalidArgument(f"ncpus must be in 1..{PDB_IOVA_MAX_CPUS} (got {ncpus})")
        if fq_size < 2 or fq_size > (1 << 20) or not _is_pow2(fq_size):
            raise _errors.InvalidArgument(f"fq_size must be a power of two in 2..2**20 (got {fq_size})")
        tmo = _fq_timeout_arg(fq_timeout)
        self.lock = _new_lock()
        self.d = <iommu_domain *>calloc(1, sizeof(iommu_domain))
        if self.d == NULL:
            raise MemoryError("cannot allocate an IOMMU domain")
        rc = _iommu_domain_init(self.d, bool(strict), <uint32_t>aperture_bits, <uint32_t>ncpus,
                                <uint32_t>fq_size, tmo, bool(defer_table_free))
        if rc < 0:
            free(self.d)
            self.d = NULL
            raise MemoryError("cannot allocate an IOMMU domain")
        self._iovad = _iova_view(self, &self.d.iovad, self.lock)
        self._pgtable = _pgt_view(self, &self.d.pgt, self.lock)

    def __dealloc__(self):
        if self.d != NULL:
            _iommu_domain_destroy(self.d)
            free(self.d)
            self.d = NULL
        if self.lock != NULL:
            PyThread_free_lock(self.lock)
            self.lock = NULL

    @property
    def iovad(self):
        """The domain's :class:`IovaDomain` (a view; same lock)."""
        return self._iovad

    @property
    def pgtable(self):
        """The domain's :class:`IoPageTable` (a view; same lock)."""
        return self._pgtable

    @property
    def strict(self):
        """True for IOMMU_DOMAIN_DMA, False for IOMMU_DOMAIN_DMA_FQ."""
        return bool(self.d.strict)

    @property
    def type(self):
        """The domain type as sysfs names it: ``"DMA"`` or ``"DMA-FQ"``."""
        return "DMA" if self.d.strict else "DMA-FQ"

    @property
    def aperture_end(self):
        """The highest IOVA (inclusive)."""
        return self.d.aperture_end

    def map(self, iova, phys, nbytes, prot=PDB_IOMMU_READ | PDB_IOMMU_WRITE):
        """``iommu_map()``: map and ``iotlb_sync_map`` once.  Raises as
        :meth:`IoPageTable.map` does."""
        return self._map(iova, phys, nbytes, prot, True)

    def map_nosync(self, iova, phys, nbytes, prot=PDB_IOMMU_READ | PDB_IOMMU_WRITE):
        """``iommu_map_nosync()``: map without the sync (see :meth:`sync_map`)."""
        return self._map(iova, phys, nbytes, prot, False)

    def _map(self, iova, phys, nbytes, prot, bint sync):
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t p = _u64(phys, "phys")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint32_t pr = _prot_arg(prot)
        cdef int rc
        _acquire(self.lock)
        with nogil:
            rc = iommu_map(self.d, i, p, n, pr) if sync else iommu_map_nosync(self.d, i, p, n, pr)
        _release(self.lock)
        if rc < 0:
            _check(rc, _map_error(rc, i, p, n, pr, self.d.pgt.ias, self.d.pgt.oas))

    def sync_map(self, iova, nbytes):
        """``iommu_sync_map()``: one ``iotlb_sync_map`` for a batch of
        :meth:`map_nosync` calls (counted in ``sync_map_calls``)."""
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        _acquire(self.lock)
        iommu_sync_map(self.d, i, n)
        _release(self.lock)

    def unmap(self, iova, nbytes):
        """``iommu_unmap()``: unmap and sync the IOTLB at once, in either
        mode (the flush queue is for the DMA API's unmaps, see
        :meth:`unmap_dma`).  Returns the bytes unmapped; raises
        :class:`~pydmabuf.errors.InvalidArgument` if unaligned."""
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef int64_t rc
        _acquire(self.lock)
        with nogil:
            rc = iommu_unmap(self.d, i, n)
        _release(self.lock)
        _check(rc, lambda: f"iommu_unmap: iova {i:#x} and size {n:#x} must be multiples of 4 KiB")
        return rc

    def iova_to_phys(self, iova):
        """The physical address ``iova`` translates to, or ``None``."""
        return self._pgtable.iova_to_phys(iova)

    def alloc_iova(self, nbytes, dma_limit=_U64_MAX, cpu=0):
        """``iommu_dma_alloc_iova()`` for a device without the PCI 32-bit
        preference: ``nbytes`` (a multiple of 4096) of IOVA at or below
        ``dma_limit`` (clipped to the aperture), through CPU ``cpu``'s
        caches.  Returns the IOVA; raises
        :class:`~pydmabuf.errors.OutOfMemory` when the space is exhausted."""
        return self._alloc_iova(nbytes, dma_limit, cpu, None)[0]

    def alloc_iova_pci(self, nbytes, dma_limit, prefer32, cpu=0):
        """``iommu_dma_alloc_iova()`` for a PCI device.

        While ``prefer32`` holds and ``dma_limit`` is above 32 bits, the
        32-bit space is tried first (without flushing the IOVA caches); if
        that fails the device loses the preference for good (the kernel
        logs "Using N-bit DMA addresses") and the full limit is used.

        Returns
        -------
        (int, bool)
            The IOVA and the device's preference after the call.
        """
        return self._alloc_iova(nbytes, dma_limit, cpu, bool(prefer32))

    def _alloc_iova(self, nbytes, dma_limit, cpu, prefer32):
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint64_t lim = _u64(dma_limit, "dma_limit")
        cdef uint32_t c = _cpu_arg(cpu, self.d.iovad.ncpus)
        cdef bint p32 = prefer32 is True
        cdef uint64_t iova = 0
        cdef int rc
        if n == 0 or n & (PDB_PAGE_SIZE - 1):
            raise _errors.InvalidArgument(f"alloc_iova: nbytes {n:#x} must be a positive multiple of 4096")
        _acquire(self.lock)
        rc = iommu_dma_alloc_iova(self.d, n, lim, &p32, c, &iova)
        _release(self.lock)
        if prefer32 is True and not p32:
            _log.info("IOMMU domain: Using %d-bit DMA addresses", _fls64(min(lim, self.d.aperture_end)))
        _check(rc, lambda: f"alloc_iova: no {n:#x}-byte IOVA range at or below {lim:#x}")
        return (iova, p32)

    def free_iova(self, iova, nbytes, cpu=0):
        """``iommu_dma_free_iova()`` without a gather: give the IOVA back at
        once (no unmap, no flush queue).

        Raises :class:`~pydmabuf.errors.NotFound` if it is not an allocated
        range, :class:`~pydmabuf.errors.InvalidArgument` if unaligned."""
        cdef uint64_t i = _u64(iova, "iova")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint32_t c = _cpu_arg(cpu, self.d.iovad.ncpus)
        cdef int rc
        _acquire(self.lock)
        rc = iommu_dma_free_iova(self.d, i, n, NULL, c)
        _release(self.lock)
        _check(rc, lambda: f"free_iova: [{i:#x}, +{n:#x}) is not an allocated IOVA range"
               if rc == -ENOENT else f"free_iova: bad IOVA range [{i:#x}, +{n:#x})")

    def map_dma(self, phys, nbytes, prot=PDB_IOMMU_READ | PDB_IOMMU_WRITE, dma_limit=_U64_MAX, cpu=0):
        """``__iommu_dma_map()``: allocate IOVA for the granules
        ``[phys, phys + nbytes)`` touches, map them, and return the DMA
        address of ``phys`` (its offset in the granule kept).

        Raises OutOfMemory (ENOMEM: no IOVA), InvalidArgument, OutOfRange;
        nothing is changed by a failure."""
        cdef uint64_t p = _u64(phys, "phys")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint32_t pr = _prot_arg(prot)
        cdef uint64_t lim = _u64(dma_limit, "dma_limit")
        cdef uint32_t c = _cpu_arg(cpu, self.d.iovad.ncpus)
        cdef uint64_t dma = 0
        cdef int rc
        _acquire(self.lock)
        rc = iommu_dma_map(self.d, p, n, pr, lim, NULL, c, &dma)
        _release(self.lock)
        if rc < 0:
            _check(rc, {-ENOMEM: f"map_dma: no IOVA for [{p:#x}, +{n:#x}) at or below {lim:#x}",
                        -ERANGE: f"map_dma: [{p:#x}, +{n:#x}) runs past the {self.d.pgt.oas}-bit output range",
                        -EINVAL: f"map_dma: nbytes {n} must be positive and prot {pr:#x} must allow "
                                 "READ or WRITE and hold only IOMMU_* bits"}.get(rc, "map_dma"))
        return dma

    def unmap_dma(self, dma_addr, nbytes, cpu=0):
        """``__iommu_dma_unmap()``: unmap the granules of
        ``[dma_addr, dma_addr + nbytes)`` and free their IOVA, at once with
        one IOTLB range invalidation (strict), or through CPU ``cpu``'s
        flush queue with no invalidation now (lazy).

        Returns the bytes unmapped.  Raises
        :class:`~pydmabuf.errors.NotFound` (nothing changed) if the span is
        not an allocated IOVA range."""
        cdef uint64_t a = _u64(dma_addr, "dma_addr")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint32_t c = _cpu_arg(cpu, self.d.iovad.ncpus)
        cdef int64_t rc
        _acquire(self.lock)
        with nogil:
            rc = iommu_dma_unmap(self.d, a, n, c)
        _release(self.lock)
        _check(rc, lambda: f"unmap_dma: [{a:#x}, +{n:#x}) is not an allocated IOVA range"
               if rc == -ENOENT else f"unmap_dma: bad range [{a:#x}, +{n:#x})")
        return rc

    def flush(self):
        """Run the flush queue's timer work now: one ``flush_iotlb_all``,
        then every queued IOVA (and table page) is released.  Returns the
        entries released (0, and no flush, when nothing is queued or the
        domain is strict)."""
        cdef uint64_t r
        _acquire(self.lock)
        r = iommu_fq_flush(self.d)
        _release(self.lock)
        return r

    def poll(self):
        """Fire the flush queue's timer if its timeout has passed (what the
        domain's own operations do first).  Returns the entries released."""
        cdef uint64_t r
        _acquire(self.lock)
        r = iommu_fq_poll(self.d)
        _release(self.lock)
        return r

    def queued(self):
        """The flush queues' entries, oldest first per CPU: an ``(n, 3)`` u64
        array of ``(iova, nbytes, cpu)`` rows (a copy).  These IOVAs are
        unmapped but not yet reusable."""
        cdef _Buffer b
        cdef uint64_t *out
        cdef uint64_t k = 0
        cdef uint32_t c, i
        cdef iova_fq *fq
        _acquire(self.lock)
        try:
            b = _new_buffer(<Py_ssize_t>self.d.fq_pending, 3, 8, b"Q")
            out = <uint64_t *>b.data
            if self.d.fq != NULL:
                for c in range(self.d.iovad.ncpus):
                    fq = &self.d.fq[c]
                    i = fq.head
                    while i != fq.tail:
                        out[3 * k] = fq.entries[i].pfn << PDB_PAGE_SHIFT
                        out[3 * k + 1] = fq.entries[i].pages << PDB_PAGE_SHIFT
                        out[3 * k + 2] = c
                        k += 1
                        i = (i + 1) & fq.mod_mask
        finally:
            _release(self.lock)
        return _np().asarray(b)

    def flush_iotlb_all(self):
        """Invalidate the whole IOTLB (counted; releases nothing)."""
        _acquire(self.lock)
        iommu_flush_iotlb_all(self.d)
        _release(self.lock)

    @property
    def stats(self):
        """Counters, as a dict: the page table's (``pte_writes``,
        ``iotlb_invalidations`` = range + walk invalidations + full flushes,
        each also given, ``table_pages``, ``mapped_nbytes``,
        ``sync_map_calls`` ...), the flush queue's (``fq_pending``,
        ``fq_queued``, ``fq_released``, ``fq_full_flushes``,
        ``fq_timeouts``) and the IOVA allocator's, prefixed ``iova_``
        (``iova_live_ranges``, ``iova_live_nbytes`` ...)."""
        _acquire(self.lock)
        try:
            s = _pgt_stats_dict(&self.d.pgt.c)
            s.update(fq_pending=self.d.fq_pending, fq_queued=self.d.fq_queued,
                     fq_released=self.d.fq_released, fq_full_flushes=self.d.fq_full_flushes,
                     fq_timeouts=self.d.fq_timeouts)
            for k, v in _iova_stats_dict(&self.d.iovad).items():
                s["iova_" + k] = v
        finally:
            _release(self.lock)
        return s

    def __repr__(self):
        return (f"<IommuDomain {self.type}, {self.d.aperture_bits}-bit aperture, "
                f"{_fmt_size(self.d.pgt.c.mapped_nbytes)} mapped, "
                f"{self.d.iovad.c.alloc_ranges - self.d.iovad.c.cached_ranges} live IOVA ranges, "
                f"{self.d.pgt.c.range_invalidations + self.d.pgt.c.walk_invalidations + self.d.pgt.c.full_flushes}"
                f" invalidations, {self.d.fq_pending} queued>")
