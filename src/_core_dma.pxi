# The DMA mapping walks: dma-direct and IOMMU dma_map_sg, the list-free
# two-step IOVA API's link/unlink/destroy, and translation of device
# accesses.  kernel/dma/direct.c, drivers/iommu/dma-iommu.c and
# iommu_map_sg() in drivers/iommu/iommu.c are the spec; pydmabuf.dma is the
# Python API over these kernels.

from libc.errno cimport EFAULT, EIO, EREMOTEIO

# ------------------------------------------------------------- P2P context

@cython.final
cdef class P2pContext:
    """What one client device sees of the machine's memory, for the walks.

    Holds the machine's physical address map and, for every range owner
    that is a PCI BAR, the P2P route from this client (``P2PMapType``) and
    the BAR's bus offset.  Built by :mod:`pydmabuf.dma`; owners beyond the
    arrays (added after it was built) read as ordinary memory.
    """

    def __cinit__(self, RangeTable amap not None, states, offsets):
        cdef const uint64_t[::1] sv = _as_u64_view(states, "states")
        cdef const uint64_t[::1] ov = _as_u64_view(offsets, "offsets")
        cdef uint64_t i, n = sv.shape[0]
        if <uint64_t>ov.shape[0] != n:
            raise ValueError("states and offsets differ in length")
        self.amap = amap
        self.n = n
        self.state = <uint8_t *>malloc(n if n else 1)
        self.offset = <uint64_t *>malloc((n if n else 1) * sizeof(uint64_t))
        if self.state == NULL or self.offset == NULL:
            raise MemoryError()
        for i in range(n):
            if sv[i] > 255:
                raise ValueError("a state is not a P2PMapType")
            self.state[i] = <uint8_t>sv[i]
            self.offset[i] = ov[i]

    def __dealloc__(self):
        free(self.state)
        free(self.offset)

    cdef void fill(self, p2p_ctx *c) noexcept:
        c.amap = &self.amap.t
        c.state = self.state
        c.bus_offset = self.offset
        c.nowners = self.n
        c.c_valid = False


cdef inline uint8_t p2p_classify(p2p_ctx *c, uint64_t phys, uint64_t *off) noexcept nogil:
    """pci_p2pdma_state() for the page at ``phys``: NONE for memory that is
    not a peer's BAR, else the route of the BAR's owner and its bus offset."""
    cdef const rt_node *n
    cdef uint8_t st = PDB_P2P_NONE
    cdef uint64_t o = 0
    off[0] = 0
    if c == NULL or c.amap == NULL:
        return PDB_P2P_NONE
    if c.c_valid and c.c_start <= phys and phys <= c.c_last:
        off[0] = c.c_off
        return c.c_state
    n = rt_lookup(c.amap, phys)
    if n == NULL:
        return PDB_P2P_NONE
    if n.kind == PDB_RANGE_MMIO and n.owner < c.nowners:
        st = c.state[n.owner]
        o = c.bus_offset[n.owner]
        if st == 0:
            st = PDB_P2P_NONE
    c.c_valid = True
    c.c_start = n.start
    c.c_last = n.last
    c.c_state = st
    c.c_off = o
    off[0] = o
    return st


cdef inline uint32_t dma_info_to_prot(int direction, bint coherent, uint64_t attrs) noexcept nogil:
    """dma_info_to_prot(): IOMMU_* bits for a direction and attributes."""
    cdef uint32_t prot = PDB_IOMMU_CACHE if coherent else 0
    if attrs & PDB_DMA_ATTR_MMIO:
        prot = PDB_IOMMU_MMIO
    if attrs & PDB_DMA_ATTR_PRIVILEGED:
        prot |= PDB_IOMMU_PRIV
    if direction == PDB_DMA_BIDIRECTIONAL:
        return prot | PDB_IOMMU_READ | PDB_IOMMU_WRITE
    if direction == PDB_DMA_TO_DEVICE:
        return prot | PDB_IOMMU_READ
    if direction == PDB_DMA_FROM_DEVICE:
        return prot | PDB_IOMMU_WRITE
    return 0


cdef inline uint64_t _phys_to_dma(const uint64_t *ranges, uint64_t nranges, uint64_t phys) noexcept nogil:
    """phys_to_dma() through a dma_range_map of (cpu, dma, size) triples;
    no map: identity; outside every region: DMA_MAPPING_ERROR."""
    cdef uint64_t i
    if nranges == 0:
        return phys
    for i in range(nranges):
        if ranges[3 * i] <= phys and phys - ranges[3 * i] < ranges[3 * i + 2]:
            return ranges[3 * i + 1] + (phys - ranges[3 * i])
    return PDB_DMA_MAPPING_ERROR


cdef inline bint _dma_capable(uint64_t addr, uint64_t size, uint64_t limit) noexcept nogil:
    cdef uint64_t last
    if addr == PDB_DMA_MAPPING_ERROR:
        return False
    if size == 0:
        return addr <= limit
    if pdb_add_overflow(addr, size - 1, &last):
        return False
    return last <= limit


cdef inline uint64_t _sg_phys(const sg_entry *e) noexcept nogil:
    # the mask as a constant (_SG_LINK_MASK is a module variable, loaded
    # again per entry in the walks)
    return (e.page_link & ~(<uint64_t>(PDB_SG_CHAIN | PDB_SG_END))) + e.offset


cdef inline int64_t _sg_step(const sg_entry *slots, uint64_t nslots, int64_t i) noexcept nogil:
    """sg_next() over a table's ``slots`` / ``nslots`` read once by the
    caller, inlined into the per-entry loops of the map and the unmap."""
    cdef uint64_t j
    if i < 0 or slots[i].page_link & PDB_SG_END:
        return -1
    j = <uint64_t>i + 1
    if j >= nslots:
        return -1
    if slots[j].page_link & PDB_SG_CHAIN:
        j += 1
        if j >= nslots:
            return -1
    return <int64_t>j


cdef void _sg_clear_dma(sg_table *t, uint64_t n) noexcept nogil:
    """Zero the DMA side of the first n entries (an unmapped table's state)."""
    cdef sg_entry *slots = t.slots
    cdef uint64_t nslots = t.nslots
    cdef int64_t s = sg_first(t)
    cdef uint64_t k = 0
    while s >= 0 and k < n:
        slots[s].dma_address = 0
        slots[s].dma_length = 0
        slots[s].dma_flags = 0
        k += 1
        s = _sg_step(slots, nslots, s)


# -------------------------------------------------------------- dma-direct

cdef int64_t dma_direct_map_sg(sg_table *t, uint64_t dma_limit, const uint64_t *ranges,
                               uint64_t nranges, bint force_swiotlb, bint has_swiotlb,
                               uint64_t attrs, p2p_ctx *pc, uint64_t *bounce) noexcept nogil:
    """dma_direct_map_sg(): one DMA segment per entry, no merging.

    Bus-address P2P entries get ``phys + bus_offset`` and SG_DMA_BUS_ADDRESS;
    an entry the device cannot reach is listed in ``bounce`` (slot indices,
    DMA address left at DMA_MAPPING_ERROR) for the caller to bounce through
    swiotlb.  Returns the number of such entries, or -EREMOTEIO (a peer the
    device cannot reach) / -EIO (unreachable and nothing to bounce through,
    or MMIO that may not bounce), with the DMA side cleared again.
    """
    cdef uint64_t n = t.orig_nents, k = 0, nb = 0, phys, dma, off
    cdef int64_t s = sg_first(t)
    cdef int64_t rc = 0
    cdef uint8_t st
    cdef bint mmio
    cdef sg_entry *e
    while s >= 0 and k < n:
        e = &t.slots[s]
        phys = _sg_phys(e)
        st = p2p_classify(pc, phys, &off)
        e.dma_flags = 0
        if st == PDB_P2P_BUS_ADDR:
            e.dma_address = phys + off
            e.dma_length = e.length
            e.dma_flags = PDB_SG_DMA_BUS_ADDRESS
        elif st == PDB_P2P_NOT_SUPPORTED:
            rc = -EREMOTEIO
            break
        else:
            mmio = (attrs & PDB_DMA_ATTR_MMIO) != 0 or st == PDB_P2P_THRU_HOST_BRIDGE
            e.dma_length = e.length
            if force_swiotlb:
                if mmio:
                    rc = -EIO
                    break
                e.dma_address = PDB_DMA_MAPPING_ERROR
                bounce[nb] = <uint64_t>s
                nb += 1
            elif mmio:
                if not _dma_capable(phys, e.length, dma_limit):
                    rc = -EIO
                    break
                e.dma_address = phys
            else:
                dma = _phys_to_dma(ranges, nranges, phys)
                if _dma_capable(dma, e.length, dma_limit):
                    e.dma_address = dma
                elif has_swiotlb:
                    e.dma_address = PDB_DMA_MAPPING_ERROR
                    bounce[nb] = <uint64_t>s
                    nb += 1
                else:
                    rc = -EIO
                    break
        k += 1
        s = sg_next(t, s)
    if rc < 0:
        _sg_clear_dma(t, k + 1)
        return rc
    t.nents = t.orig_nents
    return <int64_t>nb


# ------------------------------------------------------------ IOMMU map_sg

cdef void _invalidate_sg(sg_table *t, uint64_t done) noexcept nogil:
    """__invalidate_sg() over the first ``done`` entries, then clear their
    DMA side: the CPU side is exactly what it was before the map."""
    cdef int64_t s = sg_first(t)
    cdef uint64_t k = 0
    cdef sg_entry *e
    while s >= 0 and k < done:
        e = &t.slots[s]
        if not (e.dma_flags & PDB_SG_DMA_BUS_ADDRESS):
            if e.dma_address != PDB_DMA_MAPPING_ERROR:
                e.offset += <uint32_t>e.dma_address
            if e.dma_length:
                e.length = e.dma_length
        e.dma_address = 0
        e.dma_length = 0
        e.dma_flags = 0
        k += 1
        s = sg_next(t, s)


cdef int64_t _finalise_sg(sg_table *t, uint64_t dma_addr, uint64_t seg_mask,
                          uint64_t max_len) noexcept nogil:
    """__finalise_sg(): restore each entry's offset and length, and write
    the DMA segments (merged where the kernel merges them) behind the read
    cursor.  Returns the segment count."""
    cdef uint64_t n = t.orig_nents, k = 0, s_dma
    cdef uint32_t s_iova_off, s_length, s_iova_len
    # unsigned int in the kernel, and it matters: once a segment is longer
    # than max_len (an entry may be), max_len - cur_len wraps and merges.
    cdef uint32_t cur_len = 0
    cdef uint32_t max32 = <uint32_t>max_len
    cdef int64_t s = sg_first(t), cur = s
    cdef int64_t count = 0
    cdef bint bus
    cdef sg_entry *e
    while s >= 0 and k < n:
        e = &t.slots[s]
        s_dma = e.dma_address
        s_iova_off = <uint32_t>e.dma_address
        s_length = e.dma_length
        s_iova_len = e.length
        bus = (e.dma_flags & PDB_SG_DMA_BUS_ADDRESS) != 0
        e.dma_address = PDB_DMA_MAPPING_ERROR
        e.dma_length = 0
        e.dma_flags = 0
        if bus:
            if k > 0:
                cur = sg_next(t, cur)
            t.slots[cur].dma_address = s_dma
            t.slots[cur].dma_length = s_length
            t.slots[cur].dma_flags |= PDB_SG_DMA_BUS_ADDRESS
            count += 1
            cur_len = 0
            k += 1
            s = sg_next(t, s)
            continue
        e.offset += s_iova_off
        e.length = s_length
        if cur_len and not s_iova_off and (dma_addr & seg_mask) and <uint32_t>(max32 - cur_len) >= s_length:
            cur_len += s_length
        else:
            if k > 0:
                cur = sg_next(t, cur)
            cur_len = s_length
            count += 1
            t.slots[cur].dma_address = dma_addr + s_iova_off
        t.slots[cur].dma_length = cur_len
        dma_addr += s_iova_len
        if <uint64_t>s_length + s_iova_off < s_iova_len:
            cur_len = 0
        k += 1
        s = sg_next(t, s)
    return count


cdef inline bint _p2p_plain(uint8_t st) noexcept nogil:
    """A route the aligned map takes like memory: not by bus address, not refused."""
    return st != PDB_P2P_BUS_ADDR and st != PDB_P2P_NOT_SUPPORTED


cdef int64_t _sg_layout(sg_table *t, uint64_t seg_mask, p2p_ctx *pc, uint64_t *iova_len_out) noexcept nogil:
    """The layout pass of iommu_dma_map_sg() for a table the aligned map
    can take (see _iommu_dma_map_sg_aligned): read only.  Returns 0 with
    the IOVA length, and records what it found in the table's layout hint;
    -EAGAIN for a table that needs the general path."""
    cdef uint64_t gmask = PDB_PAGE_SIZE - 1
    cdef uint64_t n = t.orig_nents, k = 0, iova_len = 0, pad_len, s_length, phys, off
    cdef uint64_t acc = 0, lo = 1, hi = 0, pmin = PDB_U64_MAX, pmax = 0
    cdef uint32_t maxlen = 0
    cdef int64_t s = sg_first(t)
    cdef uint8_t st
    cdef bint zero = False
    cdef sg_entry *e
    cdef sg_entry *slots = t.slots
    cdef uint64_t nslots = t.nslots
    t.hint_n = 0
    if n == 0:
        return -EAGAIN
    if pc == NULL or pc.amap == NULL:
        lo = 0                              # nothing is a peer's BAR
        hi = PDB_U64_MAX
    while s >= 0 and k < n:
        e = &slots[s]
        s_length = e.length
        acc |= e.offset | s_length
        zero |= s_length == 0
        if s_length > maxlen:
            maxlen = <uint32_t>s_length
        pad_len = (seg_mask - iova_len + 1) & seg_mask
        if pad_len and pad_len < s_length - 1:
            return -EAGAIN
        phys = _sg_phys(e)
        if phys < pmin:
            pmin = phys
        if phys > pmax:
            pmax = phys
        if phys < lo or phys > hi:
            # outside the owner range the last look-up found: classify it
            # (p2p_classify() caches that range in the context)
            st = p2p_classify(pc, phys, &off)
            if not _p2p_plain(st):
                return -EAGAIN
            if pc.c_valid and pc.c_start <= phys and phys <= pc.c_last:
                lo = pc.c_start
                hi = pc.c_last
        iova_len += s_length
        k += 1
        s = _sg_step(slots, nslots, s)
    if k < n or (acc & gmask) or zero:
        return -EAGAIN
    t.hint_len = iova_len
    t.hint_pmin = pmin
    t.hint_pmax = pmax
    t.hint_maxlen = maxlen
    t.hint_n = <uint32_t>n
    iova_len_out[0] = iova_len
    return 0


cdef inline bint _sg_hint_held(sg_table *t, uint64_t seg_mask, p2p_ctx *pc, uint64_t iova_len) noexcept nogil:
    """After a map with the hint failed: whether the layout pass agrees
    with the hint (the failure is the table's own), or not (the hint was
    wrong; the pass has recorded the right one or none)."""
    cdef uint64_t n
    return _sg_layout(t, seg_mask, pc, &n) == 0 and n == iova_len


cdef bint _sg_hint_usable(sg_table *t, uint64_t seg_mask, p2p_ctx *pc, uint64_t *lo,
                          uint64_t *hi) noexcept nogil:
    """Whether the table's layout hint lets this map skip the layout pass:
    it describes this many entries, no entry can cross a segment boundary
    (a boundary mask of one power of two, and every entry no longer than a
    granule or the whole layout within one segment), and every entry's
    start lies in one owner range that is not a peer's bus-address or
    refused BAR ([lo, hi], checked again for each entry by the map)."""
    cdef uint64_t off
    cdef uint8_t st
    if t.hint_n == 0 or t.hint_n != t.orig_nents:
        return False
    if (seg_mask & (seg_mask + 1)) != 0 or seg_mask < PDB_PAGE_SIZE - 1:
        return False
    if t.hint_maxlen > PDB_PAGE_SIZE and t.hint_len - 1 > seg_mask:
        return False
    if pc == NULL or pc.amap == NULL:
        lo[0] = 0
        hi[0] = PDB_U64_MAX
        return True
    st = p2p_classify(pc, t.hint_pmin, &off)
    if not _p2p_plain(st) or not pc.c_valid or pc.c_start > t.hint_pmin or pc.c_last < t.hint_pmax:
        return False
    lo[0] = pc.c_start
    hi[0] = pc.c_last
    return True


cdef struct _sg_walk_out:
    uint64_t dma_addr           # the IOVA after the last entry read
    uint64_t runlen             # the run not mapped yet (or the one that failed)
    uint64_t start              # ... and its physical start
    uint64_t bad                # (hinted) an entry the hint does not describe
    int64_t count               # DMA segments


# What the walk checks each entry against: the hint (see _sg_walk), or
# nothing.  A fused type, so that each has its own compiled walk.
cdef struct _sg_hint_check:
    uint64_t lo
    uint64_t span
    uint32_t hmax

cdef struct _sg_no_check:
    uint8_t unused

ctypedef fused _sg_check:
    _sg_hint_check
    _sg_no_check


cdef int _sg_walk(sg_table *t, iommu_domain *dom, uint64_t iova, uint64_t seg_mask,
                  uint64_t max_seg, uint32_t prot, _sg_check *h, _sg_walk_out *w) noexcept nogil:
    """The walk of _iommu_dma_map_sg_aligned over the table's orig_nents
    entries from ``iova``: returns 0, or the error of the map call that
    failed (the walk stops there).  With a _sg_hint_check, each entry
    must be granule aligned, 1 .. ``hmax`` bytes long (``(length - 1)`` as
    u32 below ``hmax``) and start in [lo, lo + span], and the table must
    not end early; ``w.bad`` says, after the walk, whether one did not.

    It writes a one-page run's leaf itself when it falls in the page
    table's cursor table, as pgt_map_page() would, with the cursor and the
    leaf count in locals: the stores into the entries could otherwise alias
    them and force a reload and a store per page."""
    cdef uint64_t G = PDB_PAGE_SIZE, gmask = PDB_PAGE_SIZE - 1
    cdef uint64_t k, s_length, phys, runlen = 0, start = 0, dma_addr, at, bad = 0
    cdef uint64_t acc = 0, pmin = PDB_U64_MAX, pmax = 0
    cdef uint32_t lmax = 0
    cdef uint32_t cur_len = 0, max32 = <uint32_t>max_seg
    cdef uint64_t notleaf
    cdef int64_t s, cur, count = 0
    cdef int rc = 0
    cdef bint prot_ok
    cdef sg_entry *e
    cdef sg_entry *slots = t.slots
    cdef uint64_t nslots = t.nslots
    cdef io_pgtable *pt = &dom.pgt
    cdef uint64_t *ctbl
    cdef uint64_t *ep
    cdef uint64_t cbase, nleaf = 0, pbits = (<uint64_t>prot << 2) | 3, head = 0
    # iommu_map_sg() and __finalise_sg() in step: the run is flushed when an
    # entry does not continue it, and one past the end.  dma_addr is the
    # IOVA of the entry read, so the pending run starts at dma_addr - runlen
    # and what is mapped ends there.  cbase is the cursor table's IOVA >> 21,
    # or all ones when the leaf cannot be written here (no cursor, or a prot
    # pgt_map() refuses).
    prot_ok = (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) != 0 \
        and (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)) == 0
    ctbl = pt.cur_pte
    cbase = pt.cur_base if ctbl != NULL and prot_ok else PDB_U64_MAX
    # the bits a page's address must not have: below a granule, above the output size
    notleaf = (PDB_PAGE_SIZE - 1) | (~(<uint64_t>0) << pt.oas if pt.oas < 64 else 0)
    dma_addr = iova
    k = t.orig_nents
    s = sg_first(t)
    cur = s
    while True:
        e = &slots[s]
        phys = _sg_phys(e)
        s_length = e.length
        if _sg_check is _sg_hint_check:
            # accumulated here, compared once after the walk
            acc |= e.offset | s_length
            if <uint32_t>(s_length - 1) > lmax:
                lmax = <uint32_t>(s_length - 1)
            if phys < pmin:
                pmin = phys
            if phys > pmax:
                pmax = phys
        if runlen and phys != start + runlen:
            at = dma_addr - runlen
            if runlen == G and (at >> 21) == cbase and (start & notleaf) == 0:
                ep = &ctbl[(at >> 12) & 511]
                if ep[0] != 0:
                    rc = -EEXIST
                    break
                ep[0] = start | pbits
                nleaf += 1
            else:
                pt.c.leaf_sets += nleaf
                pt.c.mapped_nbytes += nleaf << 12
                nleaf = 0
                if runlen == G:
                    rc = pgt_map_page(pt, at, start, prot)
                else:
                    rc = iommu_map_nosync(dom, at, start, runlen, prot)
                ctbl = pt.cur_pte
                cbase = pt.cur_base if ctbl != NULL and prot_ok else PDB_U64_MAX
                if rc < 0:
                    break
            runlen = 0
        if runlen:
            runlen += s_length
        else:
            runlen = s_length
            start = phys
        e.dma_address = PDB_DMA_MAPPING_ERROR
        e.dma_length = 0
        e.dma_flags = 0
        # The segment being merged is written when it closes: its head is
        # a slot at or behind this one, already given its cleared state.
        if cur_len and (dma_addr & seg_mask) and <uint32_t>(max32 - cur_len) >= s_length:
            cur_len += <uint32_t>s_length
        else:
            if count:
                # (not cur_len: a merged segment of exactly 4 GiB wraps it to 0)
                slots[cur].dma_address = head
                slots[cur].dma_length = cur_len
                cur = _sg_step(slots, nslots, cur)
            cur_len = <uint32_t>s_length
            count += 1
            head = dma_addr
        dma_addr += s_length
        k -= 1
        if k == 0:
            break
        s = _sg_step(slots, nslots, s)
        if s < 0:
            bad = 1                         # (hinted) fewer entries than the hint
            break
    # the last segment open (on failure the table is cleared below)
    slots[cur].dma_address = head
    slots[cur].dma_length = cur_len
    pt.c.leaf_sets += nleaf
    pt.c.mapped_nbytes += nleaf << 12
    if _sg_check is _sg_hint_check:
        bad |= (acc & gmask) | <uint64_t>(lmax >= h.hmax) | <uint64_t>(pmin - h.lo > h.span) \
            | <uint64_t>(pmax - h.lo > h.span)
    w.dma_addr = dma_addr
    w.runlen = runlen
    w.start = start
    w.bad = bad
    w.count = count
    return rc


cdef int64_t _iommu_dma_map_sg_aligned(sg_table *t, iommu_domain *dom, uint64_t dma_limit,
                                       uint64_t seg_mask, uint64_t max_seg, bint *prefer32,
                                       uint32_t cpu, uint32_t prot, p2p_ctx *pc,
                                       uint64_t *iova_out, uint64_t *iova_len_out,
                                       bint use_hint) noexcept nogil:
    """iommu_dma_map_sg() for the common table: every entry starts on a
    granule and is a whole number of granules, none is peer memory mapped
    by bus address or refused, and no segment boundary pads the layout.

    For such a table the kernel's layout pass changes no entry (the granule
    offset is 0 and the padded length is the length), so what is left of it
    is the IOVA length: one read-only pass finds it and checks the
    conditions (_sg_layout); the map of each physically contiguous run and
    __finalise_sg() then run together in one pass (each entry is read by
    the map step before the merge step writes behind it).  The map calls,
    their order and arguments, the IOVA allocation and the result are the
    general path's, so is every counter.  -EAGAIN, with nothing read
    written, for a table that needs the general path.

    The layout pass reads the whole table once more than the map does,
    and for a long table that pass is bound by memory.  It records what it
    found in the table (``hint_*``); a later map of the same table uses
    that instead of the pass when _sg_hint_usable() says it may.  Whatever
    changes a table's entries clears the hint (the builders, a buffer view
    of the entries), and the map checks every entry against the hint as it
    goes all the same: a hint that was wrong is found after the walk, the
    walk is undone and the map starts again with the layout pass.  (Only
    code writing entries through the C struct can make that happen, or a
    thread writing through a view while the table is mapped.  The undone
    walk then shows in the counters, and in the IOVA allocator: a lazy
    domain may hand out another IOVA than it would have.  The device's
    32-bit IOVA preference is put back.)"""
    cdef uint64_t G = PDB_PAGE_SIZE
    cdef uint64_t n = t.orig_nents, iova_len = 0, iova = 0, mapped, runlen, start, dma_addr
    cdef uint64_t lo = 0, hi = PDB_U64_MAX, bad
    cdef int64_t count
    cdef int rc
    cdef bint hinted
    cdef io_pgtable *pt = &dom.pgt
    cdef _sg_walk_out w
    cdef _sg_hint_check check
    cdef _sg_no_check no_check
    cdef bint p32 = prefer32[0]
    hinted = use_hint and _sg_hint_usable(t, seg_mask, pc, &lo, &hi)
    if hinted:
        iova_len = t.hint_len
    elif _sg_layout(t, seg_mask, pc, &iova_len) < 0:
        return -EAGAIN

    iova_out[0] = 0
    iova_len_out[0] = 0
    if iommu_dma_alloc_iova(dom, iova_len, dma_limit, prefer32, cpu, &iova) < 0:
        if hinted and not _sg_hint_held(t, seg_mask, pc, iova_len):
            prefer32[0] = p32
            return _iommu_dma_map_sg_aligned(t, dom, dma_limit, seg_mask, max_seg, prefer32, cpu,
                                             prot, pc, iova_out, iova_len_out, False)
        _sg_clear_dma(t, n)
        return -ENOMEM

    if hinted:
        check.lo = lo
        check.span = hi - lo
        check.hmax = t.hint_maxlen
        rc = _sg_walk(t, dom, iova, seg_mask, max_seg, prot, &check, &w)
    else:
        rc = _sg_walk(t, dom, iova, seg_mask, max_seg, prot, &no_check, &w)
    dma_addr, runlen, start, bad, count = w.dma_addr, w.runlen, w.start, w.bad, w.count
    mapped = dma_addr - iova - runlen
    if rc == 0 and not bad:
        if runlen == G:
            rc = pgt_map_page(pt, iova + mapped, start, prot)
        else:
            rc = iommu_map_nosync(dom, iova + mapped, start, runlen, prot)
        if rc == 0:
            mapped += runlen
    if hinted and (bad or (rc == 0 and dma_addr - iova != iova_len)
                   or (rc < 0 and not _sg_hint_held(t, seg_mask, pc, iova_len))):
        # The hint did not describe the table: undo the walk, start again.
        if mapped:
            iommu_unmap(dom, iova, mapped)
        iommu_dma_free_iova(dom, iova, iova_len, NULL, cpu)
        _sg_clear_dma(t, n)
        t.hint_n = 0
        prefer32[0] = p32
        return _iommu_dma_map_sg_aligned(t, dom, dma_limit, seg_mask, max_seg, prefer32, cpu,
                                         prot, pc, iova_out, iova_len_out, False)
    if rc == 0:
        rc = iommu_sync_map(dom, iova, mapped)
    if rc < 0 or mapped < iova_len:
        if mapped:
            iommu_unmap(dom, iova, mapped)
        iommu_dma_free_iova(dom, iova, iova_len, NULL, cpu)
        _sg_clear_dma(t, n)
        return -ENOMEM if rc == -ENOMEM else -EINVAL
    t.nents = <uint32_t>count
    iova_out[0] = iova
    iova_len_out[0] = iova_len
    return count


cdef int64_t iommu_dma_map_sg(sg_table *t, iommu_domain *dom, uint64_t dma_limit,
                              uint64_t seg_mask, uint64_t max_seg, bint *prefer32,
                              uint32_t cpu, uint32_t prot, p2p_ctx *pc,
                              uint64_t *iova_out, uint64_t *iova_len_out) noexcept nogil:
    """iommu_dma_map_sg() for a device that need not bounce: lay the
    entries out at granule alignment in place (reversibly), take ONE IOVA
    range for all of them, map runs of physically contiguous entries with
    one call each and one sync_map, then merge into DMA segments.

    Returns the segment count (also in ``t.nents``), or -EINVAL / -ENOMEM
    (IOVA space) / -EREMOTEIO with the table restored and nothing mapped.
    The caller holds the domain's lock.
    """
    cdef uint64_t G = PDB_PAGE_SIZE, gmask = PDB_PAGE_SIZE - 1
    cdef uint64_t n = t.orig_nents, k = 0, iova_len = 0, pad_len, s_iova_off, s_length
    cdef uint64_t phys, off, iova = 0, mapped = 0, runlen = 0, start = 0, s_phys, npl
    cdef int64_t s = sg_first(t), prev = -1, rc = 0
    cdef int64_t count
    cdef uint8_t st
    cdef sg_entry *e
    rc = _iommu_dma_map_sg_aligned(t, dom, dma_limit, seg_mask, max_seg, prefer32, cpu, prot, pc,
                                   iova_out, iova_len_out, True)
    if rc != -EAGAIN:
        return rc
    rc = 0
    iova_out[0] = 0
    iova_len_out[0] = 0
    while s >= 0 and k < n:
        e = &t.slots[s]
        s_iova_off = e.offset & gmask
        s_length = e.length
        pad_len = (seg_mask - iova_len + 1) & seg_mask
        phys = _sg_phys(e)
        st = p2p_classify(pc, phys, &off)
        if st == PDB_P2P_BUS_ADDR:
            e.dma_address = phys + off
            e.dma_length = e.length
            e.dma_flags = PDB_SG_DMA_BUS_ADDRESS
            k += 1
            s = sg_next(t, s)
            continue
        if st == PDB_P2P_NOT_SUPPORTED:
            rc = -EREMOTEIO
            break
        e.dma_flags = 0
        e.dma_address = s_iova_off
        e.dma_length = <uint32_t>s_length
        e.offset -= <uint32_t>s_iova_off
        s_length = (s_length + s_iova_off + gmask) & ~gmask
        if s_length > UINT32_MAX:
            k += 1
            rc = -EOVERFLOW
            break
        e.length = <uint32_t>s_length
        if pad_len and pad_len < s_length - 1:
            npl = t.slots[prev].length + pad_len
            if npl > UINT32_MAX:
                k += 1
                rc = -EOVERFLOW
                break
            t.slots[prev].length = <uint32_t>npl
            iova_len += pad_len
        iova_len += s_length
        prev = s
        k += 1
        s = sg_next(t, s)
    if rc == 0 and k < n:
        # The end mark comes before orig_nents entries: the kernel's walk
        # would run off the list (the map loop below must not).
        rc = -EINVAL
    if rc < 0:
        _invalidate_sg(t, k)
        return -EREMOTEIO if rc == -EREMOTEIO else -EINVAL

    if iova_len == 0:
        count = _finalise_sg(t, 0, seg_mask, max_seg)
        t.nents = <uint32_t>count
        return count

    rc = iommu_dma_alloc_iova(dom, iova_len, dma_limit, prefer32, cpu, &iova)
    if rc < 0:
        _invalidate_sg(t, n)
        return -ENOMEM

    # iommu_map_sg(): one map call per physically contiguous run (bus
    # entries skipped), the loop running once past the end to flush.
    k = 0
    s = sg_first(t)
    while k <= n:
        e = &t.slots[s]
        s_phys = _sg_phys(e)
        if runlen and s_phys != start + runlen:
            if runlen == PDB_PAGE_SIZE:
                rc = pgt_map_page(&dom.pgt, iova + mapped, start, prot)
            else:
                rc = iommu_map_nosync(dom, iova + mapped, start, runlen, prot)
            if rc < 0:
                break
            mapped += runlen
            runlen = 0
        if not (e.dma_flags & PDB_SG_DMA_BUS_ADDRESS):
            if runlen:
                runlen += e.length
            else:
                runlen = e.length
                start = s_phys
        k += 1
        if k < n:
            s = sg_next(t, s)
    if rc == 0:
        rc = iommu_sync_map(dom, iova, mapped)
    if rc < 0 or mapped < iova_len:
        if mapped:
            iommu_unmap(dom, iova, mapped)
        iommu_dma_free_iova(dom, iova, iova_len, NULL, cpu)
        _invalidate_sg(t, n)
        return -ENOMEM if rc == -ENOMEM else -EINVAL

    count = _finalise_sg(t, iova, seg_mask, max_seg)
    t.nents = <uint32_t>count
    iova_out[0] = iova
    iova_len_out[0] = iova_len
    return count


cdef int64_t iommu_dma_unmap_sg(sg_table *t, iommu_domain *dom, uint32_t cpu) noexcept nogil:
    """iommu_dma_unmap_sg(): unmap the span from the first to the end of
    the last DMA segment (bus-address segments skipped) in one go, free its
    IOVA (strict) or queue it (lazy), and clear the DMA side.  Returns the
    bytes unmapped, or a negative errno before anything changed."""
    cdef uint64_t k = 0, start = 0, end = 0
    cdef int64_t s = sg_first(t)
    cdef int64_t unmapped = 0
    cdef bint found = False
    cdef sg_entry *e
    while s >= 0 and k < t.nents:
        e = &t.slots[s]
        if not (e.dma_flags & PDB_SG_DMA_BUS_ADDRESS):
            if e.dma_length == 0:
                break
            if not found:
                start = e.dma_address
                found = True
            end = e.dma_address + e.dma_length
        k += 1
        s = _sg_step(t.slots, t.nslots, s)
    if found and end > start:
        unmapped = iommu_dma_unmap(dom, start, end - start, cpu)
        if unmapped < 0:
            return unmapped
    _sg_clear_dma(t, t.orig_nents if t.orig_nents > t.nents else t.nents)
    t.nents = t.orig_nents
    return unmapped


# ----------------------------------------------------- the two-step IOVA API

cdef int dma_iova_link_one(iommu_domain *dom, uint64_t state_addr, uint64_t phys,
                           uint64_t offset, uint64_t size, uint32_t prot) noexcept nogil:
    """dma_iova_link() without the bounce case: map [phys, +size) at
    state_addr + offset, no sync.  -EIO for an unaligned start past offset
    0, and the page table's -EINVAL/-EEXIST/-ERANGE/-ENOMEM (nothing
    changed on failure)."""
    cdef uint64_t p = phys & (PDB_PAGE_SIZE - 1)
    cdef uint64_t span
    if p and offset > 0:
        return -EIO
    if size == 0 or pdb_add_overflow(size, p + PDB_PAGE_SIZE - 1, &span):
        return -EINVAL
    span &= ~(<uint64_t>PDB_PAGE_SIZE - 1)
    return iommu_map_nosync(dom, state_addr + offset - p, phys - p, span, prot)


cdef int64_t dma_iova_link_ranges(iommu_domain *dom, uint64_t state_addr, uint64_t offset,
                                  const uint64_t *pairs, uint64_t n, uint32_t prot,
                                  bint all_at_offset, uint64_t max_total, uint64_t *bad) noexcept nogil:
    """Link n (phys, nbytes) ranges back to back from ``offset`` (or every
    one at ``offset`` when ``all_at_offset``, the kernel helper's way), as
    dma_iova_link() each.  All or nothing: returns the bytes linked, or a
    negative errno with ``*bad`` the failing range and everything this call
    linked unlinked again (without an IOTLB sync: nothing was synced).
    -EINVAL before anything is linked if the ranges add up to more than
    ``max_total`` (the rest of the reservation) or a length is 0."""
    cdef uint64_t i, off = offset, total = 0, p, span, iova0, first_iova = 0, done_span = 0
    cdef uint64_t acc = 0, zero = 0, diff = 0, each, ln, big = 0, end, top = 0
    cdef int64_t r
    cdef int rc = 0
    bad[0] = 0
    if n == 0:
        return 0
    # Page lists (every range one 4 KiB page, aligned IOVA): one fused
    # pass that checks while it writes.
    each = pairs[1]
    if not all_at_offset and each == PDB_PAGE_SIZE and ((state_addr + offset) & (PDB_PAGE_SIZE - 1)) == 0 \
            and n <= max_total >> PDB_PAGE_SHIFT:
        r = pgt_map_pages_fused(&dom.pgt, state_addr + offset, pairs, pairs + 1, n, 2, prot, bad)
        # A page that is not granule aligned fails the page table's check
        # (-EINVAL, nothing changed); dma_iova_link() refuses it earlier, with
        # -EIO, when it is not the first link at offset 0.
        if r == -EINVAL and (pairs[2 * bad[0]] & (PDB_PAGE_SIZE - 1)) and (offset > 0 or bad[0] > 0):
            return -EIO
        if r != -EAGAIN:
            return r
    # One branch-free pass: alignment, zero lengths, equal lengths, the
    # total and the highest output byte.
    for i in range(n):
        ln = pairs[2 * i + 1]
        acc |= pairs[2 * i] | ln
        zero |= ln == 0
        diff |= ln ^ each
        total += ln
        big |= ln >> 62
        end = pairs[2 * i] + ln - 1
        big |= end < pairs[2 * i]           # wraps past 2**64
        top = end if end > top else top
    if zero or big or (total > max_total if not all_at_offset else each > max_total):
        return -EINVAL
    # Fast path: every range granule aligned and a whole number of granules,
    # back to back from an aligned IOVA, inside both address widths: one
    # bulk call into the page table, which only looks for leaves in the way.
    if not all_at_offset and ((state_addr + offset) | acc) & (PDB_PAGE_SIZE - 1) == 0 \
            and (top >> dom.pgt.oas) == 0 and ((state_addr + offset + total - 1) >> dom.pgt.ias) == 0 \
            and (prot & (PDB_IOMMU_READ | PDB_IOMMU_WRITE)) and not (prot & ~(<uint32_t>PDB_IOMMU_PROT_MASK)):
        if diff == 0:
            return pgt_map_bulk_prechecked(&dom.pgt, state_addr + offset, pairs, NULL, each, n, 2, prot, total, bad)
        return pgt_map_bulk_prechecked(&dom.pgt, state_addr + offset, pairs, pairs + 1, 0, n, 2, prot, total, bad)
    total = 0
    for i in range(n):
        p = pairs[2 * i] & (PDB_PAGE_SIZE - 1)
        rc = dma_iova_link_one(dom, state_addr, pairs[2 * i], off, pairs[2 * i + 1], prot)
        if rc < 0:
            bad[0] = i
            break
        if pdb_add_overflow(pairs[2 * i + 1], p + PDB_PAGE_SIZE - 1, &span):
            span = 0
        span &= ~(<uint64_t>PDB_PAGE_SIZE - 1)
        if i == 0:
            first_iova = state_addr + off - p
        done_span += span
        total += pairs[2 * i + 1]
        if not all_at_offset:
            off += pairs[2 * i + 1]
    if rc < 0:
        if done_span and not all_at_offset:
            iommu_unmap_nolock_nosync(dom, first_iova, done_span)
        elif all_at_offset and i > 0:
            iommu_unmap_nolock_nosync(dom, state_addr + offset - (pairs[0] & (PDB_PAGE_SIZE - 1)),
                                      (pairs[1] + (pairs[0] & (PDB_PAGE_SIZE - 1)) + PDB_PAGE_SIZE - 1)
                                      & ~(<uint64_t>PDB_PAGE_SIZE - 1))
        return rc
    return <int64_t>total


cdef void iommu_unmap_nolock_nosync(iommu_domain *dom, uint64_t iova, uint64_t size) noexcept nogil:
    """Take back leaves this walk just wrote and never synced: no IOTLB
    entry can hold them yet, so no invalidation is issued or counted."""
    cdef pgt_gather g
    pgt_gather_init(&g)
    g.queued = True
    pgt_unmap(&dom.pgt, iova, size, &g)
    pgt_release_tables(&dom.pgt, g.freelist)


# ------------------------------------------------------------- translation

cdef int64_t iommu_translate(iommu_domain *dom, uint64_t iova, uint64_t nbytes,
                             uint32_t need, uint64_t *out, uint64_t maxout,
                             uint64_t *fault_at, uint32_t *fault_prot) noexcept nogil:
    """Walk the page table for a device access of ``nbytes`` at ``iova``
    needing the prot bits ``need``: fills (phys, nbytes) runs of physically
    contiguous bytes into ``out`` and returns their count.  -EFAULT when a
    byte is unmapped (``*fault_at`` its IOVA, ``*fault_prot`` 0) or mapped
    without a needed permission (``*fault_prot`` the leaf's prot); -ENOSPC
    if more than ``maxout`` runs would be needed."""
    cdef uint64_t pos = iova, left = nbytes, phys, leaf, take, k = 0
    cdef uint32_t prot
    while left:
        if pgt_lookup(&dom.pgt, pos, &phys, &prot, &leaf) < 0:
            fault_at[0] = pos
            fault_prot[0] = 0
            return -EFAULT
        if (prot & need) != need:
            fault_at[0] = pos
            fault_prot[0] = prot
            return -EFAULT
        take = leaf - (pos & (leaf - 1))
        if take > left:
            take = left
        if k and out[2 * (k - 1)] + out[2 * (k - 1) + 1] == phys:
            out[2 * (k - 1) + 1] += take
        else:
            if k == maxout:
                return -ENOSPC
            out[2 * k] = phys
            out[2 * k + 1] = take
            k += 1
        pos += take
        left -= take
    return <int64_t>k


# ------------------------------------------------------------------ Python

cdef inline iommu_domain *_dom_of(IommuDomain dom) except NULL:
    if dom.d == NULL:
        raise _errors.LifetimeError("the IOMMU domain is gone")
    return dom.d


def map_sg_direct(SgTable table not None, uint64_t dma_limit, dma_ranges, bint force_swiotlb,
                   bint has_swiotlb, uint64_t attrs, P2pContext pc, claim=None):
    """dma-direct map_sg over the table; returns a u64 array of the slot
    indices that must bounce (their DMA address is DMA_MAPPING_ERROR).
    ``claim``: the record the caller set as ``table.mapping`` to claim the
    table (None: the table must be unclaimed)."""
    cdef const uint64_t[::1] rv = _as_u64_view(dma_ranges, "dma_ranges")
    cdef p2p_ctx c
    cdef _Buffer b
    cdef int64_t rc
    cdef uint64_t nr = rv.shape[0] // 3
    if table.mapping is not claim:
        raise _errors.Busy("the table is already mapped for DMA")
    if pc is not None:
        pc.fill(&c)
    _acquire(table.lock)
    try:
        b = _new_buffer(table.t.orig_nents, 0, 8, b"Q")
        with nogil:
            rc = dma_direct_map_sg(&table.t, dma_limit, &rv[0] if nr else NULL, nr, force_swiotlb,
                                   has_swiotlb, attrs, &c if pc is not None else NULL, <uint64_t *>b.data)
    finally:
        _release(table.lock)
    _check(rc, lambda: {-EREMOTEIO: "dma_map_sgtable: a segment is peer memory this device cannot reach",
                        -EIO: "dma_map_sgtable: a segment is out of the device's reach and cannot bounce"}
           .get(rc, "dma_map_sgtable"))
    return _np().asarray(b)[:rc]


def sg_set_dma(SgTable table not None, slots, addrs):
    """Write DMA addresses into the given slots (the bounce results)."""
    cdef const uint64_t[::1] sv = _as_u64_view(slots, "slots")
    cdef const uint64_t[::1] av = _as_u64_view(addrs, "addrs")
    cdef uint64_t i
    if sv.shape[0] != av.shape[0]:
        raise ValueError("slots and addrs differ in length")
    _acquire(table.lock)
    for i in range(<uint64_t>sv.shape[0]):
        if sv[i] < table.t.nslots:
            table.t.slots[sv[i]].dma_address = av[i]
    _release(table.lock)


def sg_layout_hint(SgTable table not None):
    """The layout hint the table's last IOMMU map recorded, as (IOVA
    length, lowest entry start, highest entry start, longest entry,
    entries), or None.  For tests: see _iommu_dma_map_sg_aligned."""
    cdef sg_table *t = &table.t
    _acquire(table.lock)
    try:
        if t.hint_n == 0:
            return None
        return (t.hint_len, t.hint_pmin, t.hint_pmax, t.hint_maxlen, t.hint_n)
    finally:
        _release(table.lock)


def sg_write_cpu_raw(SgTable table not None, uint64_t slot, uint64_t page_link, uint32_t offset,
                     uint32_t length):
    """Write one slot's CPU side as C code holding the struct could,
    leaving the layout hint in place: for tests of the map's check of a
    hint that no longer describes the table."""
    _acquire(table.lock)
    try:
        if slot >= table.t.nslots:
            raise IndexError("slot out of range")
        table.t.slots[slot].page_link = page_link
        table.t.slots[slot].offset = offset
        table.t.slots[slot].length = length
    finally:
        _release(table.lock)


def sg_clear_dma(SgTable table not None):
    """Clear the DMA side and set nents back to orig_nents."""
    _acquire(table.lock)
    _sg_clear_dma(&table.t, table.t.orig_nents if table.t.orig_nents > table.t.nents else table.t.nents)
    table.t.nents = table.t.orig_nents
    _release(table.lock)


cdef int64_t sg_iommu_map(SgTable table, IommuDomain dom, uint64_t dma_limit, uint64_t seg_mask,
                          uint64_t max_seg, bint *prefer32, uint32_t cpu, uint32_t prot, P2pContext pc,
                          uint64_t *iova, uint64_t *ilen, object claim) except -1:
    """iommu_dma_map_sg over ``table`` under its lock and the domain's:
    the number of DMA segments, or the kernel's errno raised.  ``claim``:
    the record the caller set as ``table.mapping`` to claim the table
    against a concurrent map (None: the table must be unclaimed)."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef p2p_ctx c
    cdef int64_t rc
    cdef bint viewed
    if table.mapping is not claim:
        raise _errors.Busy("the table is already mapped for DMA")
    if cpu >= d.iovad.ncpus:
        raise _errors.InvalidArgument(f"cpu {cpu} >= the domain's {d.iovad.ncpus} CPUs")
    if pc is not None:
        pc.fill(&c)
    _acquire(table.lock)
    _acquire(dom.lock)
    # A view alive when the map begins may write the entries at any time,
    # and may be gone by its end: no hint is used or kept.  (No view can be
    # taken during the map: that needs the table's lock.)
    viewed = _atomic_load(&table.exports) != 0
    if viewed:
        table.t.hint_n = 0
    # Releasing the GIL costs more than mapping a short table.
    if table.t.orig_nents > 256:
        with nogil:
            rc = iommu_dma_map_sg(&table.t, d, dma_limit, seg_mask, max_seg, prefer32, cpu, prot,
                                  &c if pc is not None else NULL, iova, ilen)
    else:
        rc = iommu_dma_map_sg(&table.t, d, dma_limit, seg_mask, max_seg, prefer32, cpu, prot,
                              &c if pc is not None else NULL, iova, ilen)
    if viewed:
        table.t.hint_n = 0
    _release(dom.lock)
    _release(table.lock)
    if rc < 0:
        _check(rc, {-EREMOTEIO: "dma_map_sgtable: a segment is peer memory this device cannot reach",
                    -ENOMEM: "dma_map_sgtable: out of IOVA space",
                    -EINVAL: "dma_map_sgtable: the table cannot be laid out or mapped"}.get(rc, "dma_map_sgtable"))
    return rc


cdef int64_t sg_iommu_unmap(SgTable table, IommuDomain dom, uint32_t cpu) except -1:
    """iommu_dma_unmap_sg over ``table`` under its lock and the domain's:
    the bytes unmapped, or the kernel's errno raised."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef int64_t rc
    _acquire(table.lock)
    _acquire(dom.lock)
    if table.t.nents > 256:
        with nogil:
            rc = iommu_dma_unmap_sg(&table.t, d, cpu)
    else:
        rc = iommu_dma_unmap_sg(&table.t, d, cpu)
    _release(dom.lock)
    _release(table.lock)
    _check(rc, "dma_unmap_sgtable")
    return rc


def map_sg_iommu(SgTable table not None, IommuDomain dom, uint64_t dma_limit, uint64_t seg_mask,
                  uint64_t max_seg, bint prefer32, uint32_t cpu, uint32_t prot, P2pContext pc, claim=None):
    """iommu_dma_map_sg; returns (nents, iova, iova_len, prefer32).
    ``claim``: the record the caller set as ``table.mapping`` to claim the
    table (None: the table must be unclaimed)."""
    cdef uint64_t iova = 0, ilen = 0
    cdef bint p32 = prefer32
    cdef int64_t rc
    if dom is None:
        raise TypeError("map_sg_iommu: dom must be an IommuDomain, not None")
    rc = sg_iommu_map(table, dom, dma_limit, seg_mask, max_seg, &p32, cpu, prot, pc, &iova, &ilen, claim)
    return rc, iova, ilen, p32


def unmap_sg_iommu(SgTable table not None, IommuDomain dom, uint32_t cpu):
    if dom is None:
        raise TypeError("unmap_sg_iommu: dom must be an IommuDomain, not None")
    return sg_iommu_unmap(table, dom, cpu)


def iova_link_ranges(IommuDomain dom, uint64_t state_addr, uint64_t offset, pairs, uint32_t prot,
                 bint all_at_offset=False, uint64_t max_total=_U64_MAX):
    """dma_iova_link over (N, 2) (phys, nbytes) rows; bytes linked."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef const uint64_t[::1] flat = _pairs_view(pairs, "ranges")
    cdef uint64_t n = flat.shape[0] // 2
    cdef uint64_t bad = 0
    cdef int64_t rc
    if n == 0:
        return 0
    _acquire(dom.lock)
    with nogil:
        rc = dma_iova_link_ranges(d, state_addr, offset, &flat[0], n, prot, all_at_offset, max_total, &bad)
    _release(dom.lock)
    if rc < 0:
        raise _errors.from_errno(-rc, f"dma_iova_link: range {bad} ({flat[2 * bad]:#x}, {flat[2 * bad + 1]:#x}) "
                                 f"at offset {offset:#x}: " + {
                                     -EIO: "only the first link may start inside a granule",
                                     -EEXIST: "the IOVA is already mapped",
                                     -EINVAL: "a zero length, ranges beyond the reservation, or IOVA and "
                                              "physical address not granule aligned",
                                     -ERANGE: "beyond the page table's address width",
                                 }.get(rc, _os_strerror(-rc)))
    return rc


def u64_pairs(pairs, str name="ranges"):
    """``pairs`` as an (N, 2) NumPy array of u64 (address, nbytes) rows,
    parsed exactly as the core's entry points parse such buffers (same
    errors: TypeError, ValueError for a dtype, shape or layout, EINVAL for
    negative or too large ints in a list).  No copy for a u64 buffer."""
    # The array views the held argument, which keeps the caller's buffer
    # exported (or owns the conversion of a list) as long as it lives.
    return _np().asarray(_pairs_view(pairs, name)).reshape(-1, 2)


def ranges_touch(bytes pairs not None, addr, nbytes):
    """Does ``[addr, addr + nbytes)`` touch a non-empty row of ``pairs``
    (``bytes`` of native u64 (address, nbytes) pairs, as
    ``SgTable._dma_snapshot`` makes them)?  Compared on inclusive last
    bytes, so a row or an access may end exactly at 2**64."""
    cdef uint64_t a = _u64(addr, "addr")
    cdef uint64_t n = _u64(nbytes, "nbytes")
    cdef const uint64_t *p = <const uint64_t *>PyBytes_AS_STRING(pairs)
    cdef Py_ssize_t i, rows = PyBytes_GET_SIZE(pairs) // 16
    cdef uint64_t last
    if n == 0:
        return False
    last = a + (n - 1)
    if last < a:
        last = 0xFFFFFFFFFFFFFFFF   # past 2**64: clipped, as no row goes beyond
    for i in range(rows):
        if p[2 * i + 1] != 0 and p[2 * i] <= last and p[2 * i] + (p[2 * i + 1] - 1) >= a:
            return True
    return False


def u64_array(obj, str name="values"):
    """``obj`` as a 1-D NumPy array of u64, parsed exactly as the core's
    entry points parse their u64 buffers (``_as_u64_view``: TypeError,
    ValueError for a dtype, shape or layout, EINVAL for negative or too
    large ints in a list).  No copy for a u64 buffer."""
    return _np().asarray(_as_u64_view(obj, name))


def ranges_total(pairs, str what):
    """Validate (N, 2) (phys, nbytes) rows for the phys-vec helpers in one
    pass: at least one row, no zero length, total below 2**64 (EINVAL,
    EOVERFLOW).  Returns the total in bytes."""
    cdef const uint64_t[::1] flat = _pairs_view(pairs, "ranges")
    cdef Py_ssize_t n = flat.shape[0] // 2, i
    cdef uint64_t total = 0, ln
    cdef Py_ssize_t zero = -1
    cdef bint over = False
    with nogil:
        for i in range(n):
            ln = flat[2 * i + 1]
            if ln == 0:
                zero = i
                break
            if total + ln < total:
                over = True
                break
            total += ln
    if n == 0:
        raise _errors.InvalidArgument(f"{what}: no ranges")
    if zero >= 0:
        raise _errors.InvalidArgument(f"{what}: range {zero} has length 0")
    if over:
        raise _errors.Overflow(f"{what}: the ranges add up to more than 2**64 - 1 bytes")
    return total


def translate_iova(IommuDomain dom, uint64_t iova, uint64_t nbytes, uint32_t need):
    """Runs of (phys, nbytes) for a device access; raises IommuFault."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef uint64_t maxout = nbytes // PDB_PAGE_SIZE + 2
    cdef _Buffer b
    cdef uint64_t fault_at = 0
    cdef uint32_t fprot = 0
    cdef int64_t rc
    _acquire(dom.lock)
    try:
        # Every run is at least one mapped granule: no more runs than the
        # domain maps pages, however long the access (a 2**63-byte read
        # must fault, not size a buffer for 2**51 runs).
        if maxout > d.pgt.c.mapped_nbytes // PDB_PAGE_SIZE + 2:
            maxout = d.pgt.c.mapped_nbytes // PDB_PAGE_SIZE + 2
        b = _new_buffer(<Py_ssize_t>maxout, 2, 8, b"Q")
        with nogil:
            rc = iommu_translate(d, iova, nbytes, need, <uint64_t *>b.data, maxout, &fault_at, &fprot)
    finally:
        _release(dom.lock)
    if rc == -EFAULT:
        return None, fault_at, fprot
    _check(rc, "translate")
    return _np().asarray(b)[:rc], 0, 0


def map_single(IommuDomain dom, uint64_t phys, uint64_t nbytes, uint32_t prot, uint64_t dma_limit,
                bint prefer32, uint32_t cpu):
    """__iommu_dma_map() with the PCI 32-bit-first policy; (dma, prefer32)."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef bint p32 = prefer32
    cdef uint64_t dma = 0
    cdef int rc
    if cpu >= d.iovad.ncpus:
        raise _errors.InvalidArgument(f"cpu {cpu} >= the domain's {d.iovad.ncpus} CPUs")
    _acquire(dom.lock)
    rc = iommu_dma_map(d, phys, nbytes, prot, dma_limit, &p32, cpu, &dma)
    _release(dom.lock)
    _check(rc, lambda: {-ENOMEM: f"dma_map_phys: no IOVA for [{phys:#x}, +{nbytes:#x})",
                        -ERANGE: f"dma_map_phys: [{phys:#x}, +{nbytes:#x}) is beyond the IOMMU's output range"}
           .get(rc, f"dma_map_phys: cannot map [{phys:#x}, +{nbytes:#x})"))
    return dma, p32


cdef int64_t iova_destroy_span(IommuDomain dom, uint64_t base, uint64_t span, uint64_t reserved,
                               uint32_t cpu) except -1:
    """dma_iova_destroy(): unmap [base, base + span) with a gather queued
    when the domain is lazy, then free the whole ``reserved`` range (at once
    after an IOTLB sync, or onto the flush queue).  The bytes unmapped."""
    cdef iommu_domain *d = _dom_of(dom)
    cdef pgt_gather g
    cdef int64_t unmapped = 0
    cdef int rc
    if cpu >= d.iovad.ncpus:
        raise _errors.InvalidArgument(f"cpu {cpu} >= the domain's {d.iovad.ncpus} CPUs")
    _acquire(dom.lock)
    rc = iova_check_free_fast(&d.iovad, base >> PDB_PAGE_SHIFT, reserved >> PDB_PAGE_SHIFT)
    if rc == 0:
        iommu_fq_poll(d)
        pgt_gather_init(&g)
        g.queued = d.fq != NULL
        unmapped = pgt_unmap(&d.pgt, base, span, &g)
        if not g.queued:
            pgt_iotlb_sync(&d.pgt, &g)
        rc = iommu_dma_free_iova(d, base, reserved, &g, cpu)
        pgt_release_tables(&d.pgt, g.freelist)
    _release(dom.lock)
    if rc < 0:
        _check(rc, f"dma_iova_destroy: [{base:#x}, +{reserved:#x}) is not a live IOVA reservation")
    return unmapped


def destroy_iova_span(IommuDomain dom not None, uint64_t base, uint64_t span, uint64_t reserved, uint32_t cpu):
    """dma_iova_destroy(): unmap [base, base + span) with a gather queued
    when the domain is lazy, then free the whole ``reserved`` range (at once
    after an IOTLB sync, or onto the flush queue)."""
    return iova_destroy_span(dom, base, span, reserved, cpu)


