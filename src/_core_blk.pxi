# The block layer's side of DMA mapping (block/blk-mq-dma.c): merging a
# request's bio_vecs into physical segments as blk_map_iter_next() does,
# and, for the per-segment fallback of blk_rq_dma_map_iter_start/next(),
# many single-range IOMMU mappings (one __iommu_dma_map() each) in one
# call.  pydmabuf.importers.nvme is the Python API over these kernels.

# ------------------------------------------------------------- bvec merge

cdef uint64_t blk_max_segment(uint64_t paddr, uint64_t seg_mask, uint64_t max_seg) noexcept nogil:
    """get_max_segment_size(lim, paddr, UINT_MAX): the bytes from ``paddr``
    to the next segment boundary, capped by the queue's max segment size
    and by UINT_MAX.  As the kernel does, the two are compared minus one so
    a boundary window of 2**64 bytes cannot wrap (min_not_zero, then +1)."""
    cdef uint64_t to_boundary = seg_mask - (seg_mask & paddr)
    cdef uint64_t cap = (max_seg if max_seg < 0xFFFFFFFFULL else 0xFFFFFFFFULL) - 1
    if to_boundary == 0:
        return cap + 1
    if cap == 0:
        return to_boundary + 1
    return (to_boundary if to_boundary < cap else cap) + 1


cdef int64_t blk_map_phys_vecs(const uint64_t *bvecs, uint64_t n, uint64_t max_seg,
                               uint64_t seg_mask, p2p_ctx *pc, uint64_t *out,
                               blk_walk *w) noexcept nogil:
    """Every phys_vec blk_map_iter_next() would produce for the bvecs
    ``(paddr, len)`` rows, written to ``out`` as (paddr, len) rows.

    A vec starts at the current position (a bvec, or the rest of one that
    was split), is clipped to blk_max_segment() of its start, and when it
    finished its bvec, greedily takes the following whole bvecs while the
    sum fits and they are biovec_phys_mergeable(): physically contiguous,
    in the same segment-boundary window as the vec's start, and the same
    kind of memory (same P2P route and bus offset).  ``w`` receives the
    first vec's P2P kind and bus offset (pci_p2pdma_state() of the first
    page decides the whole request), whether any vec differs (the block
    layer never builds such a request), the OR of every interior seam
    (end of a vec | start of the next: req_phys_gap_mask()) and the total.
    With ``out`` NULL it only counts.  Returns the number of vecs, or
    -EINVAL (``w.bad`` = the bvec) for a zero length, a range that wraps, or a total above UINT_MAX (a request's
    ``__data_len`` is an unsigned int)."""
    cdef uint64_t i = 0, done = 0, k = 0
    cdef uint64_t paddr, left, maxsz, take, nxt, nlen, total = 0, end, prev_end = 0
    cdef uint64_t off = 0, noff = 0
    cdef uint8_t kind, nkind
    w.gap = 0
    w.mixed = False
    w.kind = PDB_P2P_NONE
    w.bus_offset = 0
    w.bad = 0
    for i in range(n):
        if bvecs[2 * i + 1] == 0 or pdb_add_overflow(bvecs[2 * i], bvecs[2 * i + 1] - 1, &end):
            w.bad = i
            return -EINVAL
        if pdb_add_overflow(total, bvecs[2 * i + 1], &total) or total > 0xFFFFFFFFULL:
            w.bad = i
            return -EINVAL
    w.total = total
    i = 0
    while i < n:
        paddr = bvecs[2 * i] + done
        left = bvecs[2 * i + 1] - done
        maxsz = blk_max_segment(paddr, seg_mask, max_seg)
        take = left if left < maxsz else maxsz
        kind = p2p_classify(pc, paddr, &off)
        if k == 0:
            w.kind = kind
            w.bus_offset = off
        elif kind != w.kind or off != w.bus_offset:
            w.mixed = True
        done += take
        if done == bvecs[2 * i + 1]:
            i += 1
            done = 0
            while i < n:
                nxt = bvecs[2 * i]
                nlen = bvecs[2 * i + 1]
                if take + nlen > maxsz or paddr + take != nxt:
                    break
                if (paddr | seg_mask) != ((nxt + nlen - 1) | seg_mask):
                    break
                nkind = p2p_classify(pc, nxt, &noff)
                if nkind != kind or noff != off:
                    break
                take += nlen
                i += 1
        if k > 0:
            w.gap |= prev_end | paddr
        if out != NULL:
            out[2 * k] = paddr
            out[2 * k + 1] = take
        prev_end = paddr + take
        k += 1
    return <int64_t>k


# ------------------------------------------------- many single mappings

cdef int64_t iommu_dma_map_ranges(iommu_domain *dom, const uint64_t *pairs, uint64_t n,
                                  uint32_t prot, uint64_t dma_limit, bint *prefer32,
                                  uint32_t cpu, uint64_t *out, uint64_t *bad) noexcept nogil:
    """iommu_dma_map() for each (phys, nbytes) row, DMA addresses to
    ``out``: what a loop of dma_map_phys() does on a device behind an IOMMU
    that need not bounce.  All or nothing: on a failure at row ``bad`` the
    rows before it are unmapped again and the error returned."""
    cdef uint64_t i, j
    cdef int rc
    for i in range(n):
        rc = iommu_dma_map(dom, pairs[2 * i], pairs[2 * i + 1], prot, dma_limit, prefer32, cpu, &out[i])
        if rc < 0:
            bad[0] = i
            for j in range(i):
                iommu_dma_unmap(dom, out[j], pairs[2 * j + 1], cpu)
            return rc
    return <int64_t>n


cdef int64_t iommu_dma_unmap_ranges(iommu_domain *dom, const uint64_t *pairs, uint64_t n,
                                    uint32_t cpu, uint64_t *bad) noexcept nogil:
    """iommu_dma_unmap() for each (dma, nbytes) row.  Every row is checked
    to be a live IOVA range first, and a distinct one: a scratch mark on
    each range finds one named twice, which the second unmap would find
    gone (-EINVAL / -ENOENT at row ``bad`` with nothing changed; -ENOMEM
    for the scratch array).  Returns the bytes unmapped."""
    cdef uint64_t i
    cdef int64_t rc = 0, total = 0
    cdef int err = 0
    cdef rt_node **nodes = _iova_claim_distinct(&dom.iovad, pairs, NULL, 0, n, PDB_IOVA_CLAIM_DMA, bad, &err)
    if nodes == NULL:
        return err
    free(nodes)
    for i in range(n):
        rc = iommu_dma_unmap(dom, pairs[2 * i], pairs[2 * i + 1], cpu)
        if rc > 0:
            total += rc
    return total


# ------------------------------------------------------------------ Python

def blk_map_iter(bvecs, max_segment_size, seg_boundary_mask, P2pContext pc=None):
    """Merge a request's bio_vecs into phys_vecs (blk_map_iter_next()).

    ``bvecs`` is an (N, 2) u64 buffer of (physical address, nbytes) rows.
    Returns ``(vecs, gap, kind, bus_offset, mixed, total)``: the (M, 2)
    phys_vec rows, the OR of the interior seams, the first vec's
    P2PMapType value and bus offset, whether the vecs differ in kind, and
    the payload bytes.  InvalidArgument for an empty request, a zero
    length, a wrapping range or more than UINT_MAX bytes."""
    cdef const uint64_t[::1] flat = _pairs_view(bvecs, "bvecs")
    cdef uint64_t n = flat.shape[0] // 2
    cdef uint64_t max_seg = _u64(max_segment_size, "max_segment_size")
    cdef uint64_t mask = _u64(seg_boundary_mask, "seg_boundary_mask")
    cdef p2p_ctx c
    cdef blk_walk w
    cdef _Buffer b
    cdef int64_t rc
    if n == 0:
        raise _errors.InvalidArgument("blk_rq_dma_map: a request needs at least one bio_vec")
    if max_seg < PDB_PAGE_SIZE:
        raise _errors.InvalidArgument(f"max_segment_size {max_seg:#x} is below the block layer's minimum "
                                      f"of {PDB_PAGE_SIZE:#x}")
    if mask < PDB_PAGE_SIZE - 1:
        raise _errors.InvalidArgument(f"seg_boundary_mask {mask:#x} is below PAGE_SIZE - 1")
    if pc is not None:
        pc.fill(&c)
    # Count, then fill a buffer of exactly that many rows (a bound would be
    # several times larger for page-sized bvecs, and zeroing it costs more
    # than a second walk).
    with nogil:
        rc = blk_map_phys_vecs(&flat[0], n, max_seg, mask, &c if pc is not None else NULL, NULL, &w)
    if rc >= 0:
        b = _new_buffer(<Py_ssize_t>rc, 2, 8, b"Q")
        with nogil:
            rc = blk_map_phys_vecs(&flat[0], n, max_seg, mask, &c if pc is not None else NULL,
                                   <uint64_t *>b.data, &w)
    if rc < 0:
        j = w.bad
        raise _errors.InvalidArgument(
            f"blk_rq_dma_map: bio_vec {j} ({flat[2 * j]:#x}, {flat[2 * j + 1]:#x}) is empty, wraps past "
            f"2**64 - 1, or takes the request past UINT_MAX bytes")
    return _np().asarray(b)[:rc], w.gap, w.kind, w.bus_offset, bool(w.mixed), w.total


def map_single_many(IommuDomain dom, pairs, uint32_t prot, uint64_t dma_limit, bint prefer32, uint32_t cpu):
    """iommu_dma_map() per (phys, nbytes) row; returns (dma u64 array,
    prefer32).  All or nothing."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef const uint64_t[::1] flat = _pairs_view(pairs, "ranges")
    cdef uint64_t n = flat.shape[0] // 2
    cdef uint64_t bad = 0
    cdef bint p32 = prefer32
    cdef _Buffer b = _new_buffer(n, 0, 8, b"Q")
    cdef int64_t rc
    if cpu >= d.iovad.ncpus:
        raise _errors.InvalidArgument(f"cpu {cpu} >= the domain's {d.iovad.ncpus} CPUs")
    if n == 0:
        return _np().asarray(b), p32
    _acquire(dom.lock)
    with nogil:
        rc = iommu_dma_map_ranges(d, &flat[0], n, prot, dma_limit, &p32, cpu, <uint64_t *>b.data, &bad)
    _release(dom.lock)
    if rc < 0:
        raise _errors.from_errno(-rc, f"dma_map_phys: range {bad} ({flat[2 * bad]:#x}, +{flat[2 * bad + 1]:#x}): " + {
            -ENOMEM: "no IOVA left", -ERANGE: "beyond the IOMMU's output range",
            -EINVAL: "empty or wrapping range"}.get(rc, _os_strerror(-rc)))
    return _np().asarray(b), p32


def unmap_single_many(IommuDomain dom, pairs, uint32_t cpu):
    """iommu_dma_unmap() per (dma, nbytes) row; nothing changes if any row
    is not a live IOVA range, or names a range an earlier row names
    (NotFound / InvalidArgument)."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef const uint64_t[::1] flat = _pairs_view(pairs, "ranges")
    cdef uint64_t n = flat.shape[0] // 2
    cdef uint64_t bad = 0
    cdef int64_t rc
    if cpu >= d.iovad.ncpus:
        raise _errors.InvalidArgument(f"cpu {cpu} >= the domain's {d.iovad.ncpus} CPUs")
    if n == 0:
        return 0
    _acquire(dom.lock)
    with nogil:
        rc = iommu_dma_unmap_ranges(d, &flat[0], n, cpu, &bad)
    _release(dom.lock)
    if rc == -ENOMEM:
        raise _errors.OutOfMemory(f"dma_unmap_phys: no memory for the check of {n} ranges")
    if rc < 0:
        raise _errors.from_errno(-rc, f"dma_unmap_phys: range {bad} ({flat[2 * bad]:#x}, +{flat[2 * bad + 1]:#x}) "
                                      "is not a live IOVA mapping, or an earlier row names it too")
    return rc


