# Scatterlists: struct sg_table / sg_append_table as on 64-bit Linux.
#
# Entries are 32 bytes.  The kernel allocates them in chunks (at most one
# page, 128 entries, per sg_kmalloc() call) and turns the last slot of a
# chunk into a link to the next chunk when more entries are needed.  Here
# the chunks are laid out one after another in one arena so the whole list
# can be exported as one NumPy array; the link slots stay where the kernel
# puts them, hold the address of the next chunk with SG_CHAIN set, and are
# skipped by sg_next() exactly as in the kernel.
#
# Where the kernel is loose the model is strict (each a documented
# deviation): an empty page list, an offset of a page or more, or a size
# that does not end inside the last page are -EINVAL instead of reading
# past the array or wrapping the remaining size.

from libc.stdint cimport UINT32_MAX

cdef uint64_t _SG_LINK_MASK = ~(<uint64_t>(PDB_SG_CHAIN | PDB_SG_END))
cdef sg_entry _sg_dummy_entry


cdef inline uint64_t _kmalloc_bytes(uint64_t nslots) noexcept nogil:
    """Bytes the kernel spends on one chunk: a page for a full chunk, else
    the kmalloc size class that holds nslots * 32 bytes."""
    cdef uint64_t b = nslots * sizeof(sg_entry)
    if nslots == PDB_SG_MAX_SINGLE_ALLOC:
        return PDB_PAGE_SIZE
    if b <= 32:
        return 32
    if b <= 64:
        return 64
    if b <= 96:
        return 96
    if b <= 128:
        return 128
    if b <= 192:
        return 192
    cdef uint64_t c = 256
    while c < b:
        c <<= 1
    return c


# A small cache of freed arenas, the model's stand-in for the kernel's
# slab and per-CPU page caches: a table built right after another one was
# freed reuses warm memory instead of faulting in fresh pages.  Bounded;
# small arenas go straight back to malloc.
cdef extern from "pdb_sg.h":
    void *pdb_pool_get(uint64_t want, uint64_t esz, uint64_t *cap) nogil
    void pdb_pool_put(void *p, uint64_t cap, uint64_t esz) nogil
    void pdb_pool_drain() nogil
    uint64_t pdb_pool_bytes


def drain_arena_cache():
    """Free the arenas cached for reuse by new scatterlists; returns the
    bytes that were cached."""
    cdef uint64_t n = pdb_pool_bytes
    pdb_pool_drain()
    return n


cdef void sg_table_free(sg_table *t) noexcept nogil:
    pdb_pool_put(t.slots, t.cap, sizeof(sg_entry))
    memset(t, 0, sizeof(sg_table))
    t.prv = -1


cdef inline void _sg_fix_chains(sg_table *t) noexcept nogil:
    """Rewrite every link after the arena moved."""
    cdef uint64_t i
    for i in range(t.nslots):
        if t.slots[i].page_link & PDB_SG_CHAIN:
            t.slots[i].page_link = (<uint64_t><size_t>&t.slots[i + 1]) | PDB_SG_CHAIN


cdef int _sg_reserve(sg_table *t, uint64_t extra) noexcept nogil:
    """Room for ``extra`` more slots without moving the arena again."""
    cdef uint64_t want, cap = 0
    cdef sg_entry *p
    if t.cap - t.nslots >= extra:
        return 0
    if t.no_move:
        return -EBUSY
    want = t.cap * 2
    if want < t.nslots + extra:
        want = t.nslots + extra
    if want < 4:
        want = 4
    if want > (<uint64_t>1 << 40):
        return -ENOMEM
    p = <sg_entry *>pdb_pool_get(want, sizeof(sg_entry), &cap)
    if p == NULL:
        return -ENOMEM
    if t.nslots:
        memcpy(p, t.slots, t.nslots * sizeof(sg_entry))
    pdb_pool_put(t.slots, t.cap, sizeof(sg_entry))
    t.slots = p
    t.cap = cap
    _sg_fix_chains(t)
    return 0


cdef inline uint64_t _sg_open_chunk(sg_table *t, uint64_t alloc) noexcept nogil:
    """Account one sg_kmalloc() of ``alloc`` slots at the end of the arena
    (room reserved).  Returns its first slot; its contents are written by
    the caller (every slot is either filled or cleared before returning)."""
    cdef uint64_t first = t.nslots
    t.nslots += alloc
    t.nchunks += 1
    t.last_chunk = first
    t.meta_bytes += _kmalloc_bytes(alloc)
    return first


cdef inline void _sg_make_link(sg_table *t, uint64_t i) noexcept nogil:
    t.slots[i].page_link = (<uint64_t><size_t>&t.slots[i + 1]) | PDB_SG_CHAIN
    t.slots[i].offset = 0
    t.slots[i].length = 0
    t.slots[i].dma_address = 0
    t.slots[i].dma_length = 0
    t.slots[i].dma_flags = 0


cdef inline void _sg_clear(sg_table *t, uint64_t i) noexcept nogil:
    memset(&t.slots[i], 0, sizeof(sg_entry))


cdef int64_t sg_next(const sg_table *t, int64_t i) noexcept nogil:
    """sg_next(): the slot after ``i``, following a link; -1 at the end."""
    cdef uint64_t j
    if i < 0 or t.slots[i].page_link & PDB_SG_END:
        return -1
    j = <uint64_t>i + 1
    if j >= t.nslots:
        return -1
    if t.slots[j].page_link & PDB_SG_CHAIN:
        j += 1              # chunks are laid out back to back
        if j >= t.nslots:
            return -1
    return <int64_t>j


cdef int64_t sg_first(const sg_table *t) noexcept nogil:
    return 0 if t.nslots > 0 else -1


cdef int64_t sg_nents_for_len(const sg_table *t, uint64_t nbytes) noexcept nogil:
    """sg_nents_for_len(): entries needed to cover ``nbytes``; -EINVAL."""
    cdef int64_t i = sg_first(t)
    cdef int64_t n = 0
    cdef uint64_t total = 0
    if nbytes == 0:
        return 0
    while i >= 0:
        n += 1
        total += t.slots[i].length
        if total >= nbytes:
            return n
        i = sg_next(t, i)
    return -EINVAL


cdef int sg_alloc(sg_table *t, uint32_t nents) noexcept nogil:
    """sg_alloc_table(): ``nents`` zeroed entries in chained page chunks.

    ``t`` must be empty.  Each chunk but the last holds 127 entries and a
    link.  -EINVAL for 0 entries, -ENOMEM.
    """
    cdef uint64_t left = nents
    cdef uint64_t alloc, data, first, total
    cdef int rc
    t.hint_n = 0                # the entries change: no layout hint
    if nents == 0:
        return -EINVAL
    total = <uint64_t>nents + (<uint64_t>nents) // (PDB_SG_MAX_SINGLE_ALLOC - 1) + 1
    rc = _sg_reserve(t, total)
    if rc < 0:
        return rc
    while left:
        alloc = left
        if alloc > PDB_SG_MAX_SINGLE_ALLOC:
            alloc = PDB_SG_MAX_SINGLE_ALLOC
            data = alloc - 1
        else:
            data = alloc
        left -= data
        first = _sg_open_chunk(t, alloc)
        memset(&t.slots[first], 0, alloc * sizeof(sg_entry))
        if left:
            _sg_make_link(t, first + alloc - 1)
        else:
            t.slots[first + data - 1].page_link = PDB_SG_END
            t.prv = <int64_t>(first + data - 1)
    t.nents = nents
    t.orig_nents = nents
    t.total_nents = nents
    return 0


cdef enum:
    _SG_BLOCK = 1024

cdef extern from "pdb_sg.h":
    uint64_t pdb_sg_mark(const uint64_t *p, uint64_t m, uint64_t *dif, uint64_t *acc) nogil


cdef inline void _sg_put(sg_entry *e, uint64_t *sl, uint64_t pfn, uint64_t npages,
                         uint32_t *first_off) noexcept nogil:
    """Write one entry of ``npages`` pages at slot sl, then step over a
    link position (every 128th slot)."""
    cdef uint64_t s = sl[0]
    e[s].page_link = pfn << PDB_PAGE_SHIFT
    e[s].offset = first_off[0]
    e[s].length = <uint32_t>((npages << PDB_PAGE_SHIFT) - first_off[0])
    e[s].dma_address = 0
    e[s].dma_length = 0
    e[s].dma_flags = 0
    first_off[0] = 0
    s += 1
    if (s & (PDB_SG_MAX_SINGLE_ALLOC - 1)) == PDB_SG_MAX_SINGLE_ALLOC - 1:
        s += 1
    sl[0] = s


cdef int _sg_fresh_pages(sg_table *t, const uint64_t *pfns, uint64_t n, uint32_t offset,
                         uint64_t size, uint64_t maxseg, uint32_t lp) noexcept nogil:
    """The first call on an empty table, in one pass over the pages.

    Same result as the general path below.  In a fresh table every chunk
    but the last is a full page of 127 entries and a link (a chunk smaller
    than a page is only ever the last one), so entry k lives in slot
    k + k // 127 and can be written before the number of entries is known;
    the chunk layout is settled afterwards.  The one exception, a last
    chunk of exactly 128 entries with no pages left to come, moves only the
    last entry.
    """
    cdef uint64_t cap = n + n // (PDB_SG_MAX_SINGLE_ALLOC - 1) + PDB_SG_MAX_SINGLE_ALLOC + 2
    cdef uint64_t i, j, m, k = 0, sl = 0, acc = 0, blk_end, run_start, b, ln, base, d, nb, maxp
    cdef uint64_t full, r, a, nfull, tail, last_slot
    cdef uint32_t first_off = offset
    cdef uint32_t brk[_SG_BLOCK + 8]
    cdef uint64_t dif[_SG_BLOCK]
    cdef bint dense = False
    cdef sg_entry *e
    cdef int rc = _sg_reserve(t, cap)
    t.hint_n = 0                # the entries change: no layout hint
    if rc < 0:
        return rc
    e = t.slots
    maxp = maxseg >> PDB_PAGE_SHIFT
    # Runs of consecutive PFNs are found a block of pages at a time without
    # data-dependent branches, then each run becomes entries of at most
    # max_segment bytes.  Where nearly every page is its own run, a plain
    # branchy pass (then predictable) is faster and is used instead.
    acc = pfns[0]
    run_start = 0
    i = 1
    while i < n:
        blk_end = i + _SG_BLOCK
        if blk_end > n:
            blk_end = n
        m = blk_end - i
        if dense:
            # Nearly every page starts a run (the last block said so): the
            # branch below is predictable, one pass is cheapest.
            nb = 0
            for j in range(i, blk_end):
                acc |= pfns[j]
                if pfns[j] != pfns[j - 1] + 1:
                    nb += 1
                    ln = j - run_start
                    while ln > maxp:
                        _sg_put(e, &sl, pfns[run_start], maxp, &first_off)
                        run_start += maxp
                        ln -= maxp
                    _sg_put(e, &sl, pfns[run_start], ln, &first_off)
                    run_start = j
            dense = nb * 4 > m * 3
            i = blk_end
            continue
        # Phase 1, branch-free and vectorised: how far each page is from
        # continuing the previous one (0 = it does).
        d = pdb_sg_mark(&pfns[i], m, dif, &acc)
        if d == 0:
            i = blk_end         # the whole block continues the current run
            continue
        # Phase 2: compact the breaks into positions (the cursor only moves
        # at a break; no data-dependent branch).
        nb = 0
        for j in range(m):
            brk[nb] = <uint32_t>j
            nb += dif[j] != 0
        for b in range(nb):
            j = i + brk[b]
            ln = j - run_start
            while ln > maxp:
                _sg_put(e, &sl, pfns[run_start], maxp, &first_off)
                run_start += maxp
                ln -= maxp
            _sg_put(e, &sl, pfns[run_start], ln, &first_off)
            run_start = j
        dense = nb * 4 > m * 3
        i = blk_end
    ln = n - run_start
    while ln > maxp:
        _sg_put(e, &sl, pfns[run_start], maxp, &first_off)
        run_start += maxp
        ln -= maxp
    _sg_put(e, &sl, pfns[run_start], ln, &first_off)
    # _sg_put advanced past the last entry; step back to it, and count the
    # entries from the slot (entry k sits in slot k + k // 127).
    sl -= 1
    if (sl & (PDB_SG_MAX_SINGLE_ALLOC - 1)) == PDB_SG_MAX_SINGLE_ALLOC - 1:
        sl -= 1
    k = sl - sl // PDB_SG_MAX_SINGLE_ALLOC + 1
    if acc >= PDB_PFN_LIMIT:
        sg_table_free(t)
        return -ERANGE
    # The last entry ends where size ends (validated to be in the last page).
    full = n * PDB_PAGE_SIZE - offset
    e[sl].length -= <uint32_t>(full - size)

    # Settle the chunks: nfull full chunks (127 entries and a link each),
    # then a last chunk of ``tail`` slots, as get_next_sg() allocates them.
    nfull = 0
    r = k
    while True:
        a = r + lp
        if a > PDB_SG_MAX_SINGLE_ALLOC:
            a = PDB_SG_MAX_SINGLE_ALLOC
        if r > a or (r == a and lp > 0):
            nfull += 1
            r -= PDB_SG_MAX_SINGLE_ALLOC - 1
            continue
        tail = a
        break
    last_slot = nfull * PDB_SG_MAX_SINGLE_ALLOC + r - 1
    if last_slot != sl:
        # A last chunk holding exactly 128 entries: its last entry sits in
        # the slot that would otherwise have been a link.
        e[last_slot] = e[sl]
        sl = last_slot
    t.nslots = nfull * PDB_SG_MAX_SINGLE_ALLOC + tail
    for j in range(nfull):
        _sg_make_link(t, j * PDB_SG_MAX_SINGLE_ALLOC + PDB_SG_MAX_SINGLE_ALLOC - 1)
    for j in range(sl + 1, t.nslots):
        _sg_clear(t, j)
    t.slots[t.nslots - 1].page_link |= PDB_SG_END
    if lp == 0:
        t.slots[sl].page_link |= PDB_SG_END
    t.nchunks = nfull + 1
    t.last_chunk = nfull * PDB_SG_MAX_SINGLE_ALLOC
    t.meta_bytes = nfull * PDB_PAGE_SIZE + _kmalloc_bytes(tail)
    t.total_nents = <uint32_t>(nfull * (PDB_SG_MAX_SINGLE_ALLOC - 1) + tail)
    t.nents = <uint32_t>k
    t.orig_nents = <uint32_t>k
    t.prv = <int64_t>sl
    _sg_shrink(t)
    return 0


cdef void _sg_shrink(sg_table *t) noexcept nogil:
    """Give back arena capacity far beyond what the table holds."""
    cdef sg_entry *p
    cdef uint64_t n = t.nslots if t.nslots else 1
    t.hint_n = 0                # the entries change: no layout hint
    if t.no_move or t.cap <= 2 * t.nslots + 64:
        return
    p = <sg_entry *>malloc(n * sizeof(sg_entry))
    if p == NULL:
        return
    memcpy(p, t.slots, t.nslots * sizeof(sg_entry))
    pdb_pool_put(t.slots, t.cap, sizeof(sg_entry))
    t.slots = p
    t.cap = n
    _sg_fix_chains(t)


cdef int sg_append_pages(sg_table *t, const uint64_t *pfns, uint64_t n,
                         uint32_t offset, uint64_t size, uint64_t max_segment,
                         uint32_t left_pages) noexcept nogil:
    """sg_alloc_append_table_from_pages() on the append table ``t``.

    ``size`` is the byte count after ``offset``; the caller has validated
    n >= 1, offset < PAGE_SIZE and size ending inside the last page.
    All or nothing: 0, -EINVAL, -ERANGE (a PFN beyond 52-bit physical
    addresses), -ENOMEM, -EBUSY (the arena would move while exported).
    """
    cdef uint64_t maxseg = max_segment & ~(<uint64_t>PDB_PAGE_SIZE - 1)
    cdef uint64_t acc = 0
    cdef uint64_t merged = 0
    cdef uint64_t i, j, k, chunks, seg_len, cur_page, needed, alloc, bound, first
    cdef uint64_t prv_end_phys, next_pfn, chunk_size, page_phys
    cdef int64_t cur, nxt
    cdef uint32_t added = 0
    cdef sg_entry *prv
    cdef sg_entry saved
    cdef int rc
    cdef bint relocate = False
    cdef bint closed = False
    t.hint_n = 0                # the entries change: no layout hint

    if maxseg < PDB_PAGE_SIZE or n == 0:
        return -EINVAL
    if t.nslots == 0:
        return _sg_fresh_pages(t, pfns, n, offset, size, maxseg, left_pages)
    for i in range(n):
        acc |= pfns[i]
    if acc >= PDB_PFN_LIMIT:
        return -ERANGE

    # 1. How many pages merge into the previous last entry (nothing written
    #    yet, so a failure below leaves the table as it was).
    if t.prv >= 0:
        if offset != 0:
            return -EINVAL
        prv = &t.slots[t.prv]
        prv_end_phys = (prv.page_link & ~(<uint64_t>PDB_PAGE_SIZE - 1)) + prv.offset + prv.length
        next_pfn = prv_end_phys >> PDB_PAGE_SHIFT
        if pfns[0] == next_pfn:
            k = prv.length
            while merged < n:
                if merged > 0 and pfns[merged] != pfns[merged - 1] + 1:
                    break
                if k + PDB_PAGE_SIZE > maxseg:
                    break
                k += PDB_PAGE_SIZE
                merged += 1
        closed = (prv.page_link & PDB_SG_END) != 0

    if merged == n:
        prv = &t.slots[t.prv]
        prv.length += <uint32_t>(merged * PDB_PAGE_SIZE)
        if left_pages == 0:
            prv.page_link = (prv.page_link & ~(<uint64_t>PDB_SG_CHAIN)) | PDB_SG_END
        return 0

    pfns += merged
    n -= merged

    # 2. Count the new entries: a run of consecutive PFNs, cut every
    #    max_segment bytes.  (The kernel's own rule, in one pass.)
    chunks = 1
    if (n - 1) * PDB_PAGE_SIZE < maxseg:
        for i in range(1, n):
            chunks += pfns[i] != pfns[i - 1] + 1
    else:
        seg_len = 0
        for i in range(1, n):
            seg_len += PDB_PAGE_SIZE
            if seg_len >= maxseg or pfns[i] != pfns[i - 1] + 1:
                chunks += 1
                seg_len = 0
    if t.nents + chunks > UINT32_MAX:
        return -EINVAL

    # 3. Reserve the arena for the worst case before touching anything.
    bound = chunks + chunks // (PDB_SG_MAX_SINGLE_ALLOC - 1) + PDB_SG_MAX_SINGLE_ALLOC + 2
    rc = _sg_reserve(t, bound)
    if rc < 0:
        return rc

    # 4. Commit: grow the previous entry, reopen a closed table, then fill.
    cur = t.prv
    if cur >= 0:
        prv = &t.slots[cur]
        prv.length += <uint32_t>(merged * PDB_PAGE_SIZE)
        if closed:
            # The kernel needs left_pages on every call but the last; a
            # closed table (a from_pages() result) is reopened here.  If the
            # last entry fills its chunk there is no slot for the link: move
            # the entry into the new chunk and put the link where it was.
            prv.page_link &= ~(<uint64_t>PDB_SG_END)
            needed = chunks + left_pages + 1
            alloc = needed if needed < PDB_SG_MAX_SINGLE_ALLOC else PDB_SG_MAX_SINGLE_ALLOC
            if <uint64_t>cur == t.nslots - 1 and t.nslots == 1:
                # A one-entry table: its only chunk grows, as if it had
                # been allocated with room for the new entries.
                t.meta_bytes += _kmalloc_bytes(alloc) - _kmalloc_bytes(1)
                t.nslots = alloc
                t.total_nents += <uint32_t>(alloc - 1)
            elif <uint64_t>cur == t.nslots - 1:
                saved = prv[0]
                first = _sg_open_chunk(t, alloc)
                t.total_nents += <uint32_t>(alloc - 1)
                _sg_make_link(t, <uint64_t>cur)
                t.slots[first] = saved
                cur = <int64_t>first
                t.prv = cur

    cur_page = 0
    for i in range(chunks):
        seg_len = 0
        j = cur_page + 1
        while j < n:
            seg_len += PDB_PAGE_SIZE
            if seg_len >= maxseg or pfns[j] != pfns[j - 1] + 1:
                break
            j += 1
        # get_next_sg(): the next slot, unless it is the last slot of the
        # newest chunk and more than one entry is still wanted, in which
        # case that slot becomes a link to a new chunk.
        needed = chunks - i + left_pages
        if cur < 0:
            alloc = needed if needed < PDB_SG_MAX_SINGLE_ALLOC else PDB_SG_MAX_SINGLE_ALLOC
            nxt = <int64_t>_sg_open_chunk(t, alloc)
            t.total_nents = <uint32_t>alloc
        else:
            nxt = cur + 1
            if <uint64_t>nxt == t.nslots - 1 and needed > 1:
                alloc = needed if needed < PDB_SG_MAX_SINGLE_ALLOC else PDB_SG_MAX_SINGLE_ALLOC
                _sg_make_link(t, <uint64_t>nxt)
                nxt = <int64_t>_sg_open_chunk(t, alloc)
                t.total_nents += <uint32_t>(alloc - 1)
        cur = nxt
        chunk_size = <uint32_t>(((j - cur_page) << PDB_PAGE_SHIFT) - offset)
        t.slots[cur].page_link = (pfns[cur_page] << PDB_PAGE_SHIFT) | (
            PDB_SG_END if <uint64_t>cur == t.nslots - 1 else 0)
        t.slots[cur].offset = offset
        t.slots[cur].length = <uint32_t>(size if size < chunk_size else chunk_size)
        t.slots[cur].dma_address = 0
        t.slots[cur].dma_length = 0
        t.slots[cur].dma_flags = 0
        added += 1
        size -= chunk_size
        offset = 0
        cur_page = j

    # Slots of the newest chunk past the last entry are left as
    # sg_init_table() leaves them: zero, END on the chunk's last slot.
    for k in range(<uint64_t>cur + 1, t.nslots):
        _sg_clear(t, k)
        if k == t.nslots - 1:
            t.slots[k].page_link = PDB_SG_END

    t.nents += added
    t.orig_nents = t.nents
    t.prv = cur
    if left_pages == 0:
        t.slots[cur].page_link = (t.slots[cur].page_link & ~(<uint64_t>PDB_SG_CHAIN)) | PDB_SG_END
    return 0


cdef int sg_from_dma_ranges(sg_table *t, const uint64_t *pairs, uint64_t n) noexcept nogil:
    """A DMA-only table over (dma_address, nbytes) pairs.

    Like the kernel's phys-vec helper: no CPU side (page 0, offset and
    length 0, ``orig_nents == 0``), a range longer than MAX_SG_ENT_SZ is
    split into consecutive entries.  ``t`` must be empty.  -EINVAL for a
    zero length or too many entries, -EOVERFLOW for a range past 2**64.
    """
    cdef uint64_t i, count = 0, addr, left, step, last
    cdef int64_t s
    cdef int rc
    t.hint_n = 0                # the entries change: no layout hint
    if n == 0:
        return -EINVAL
    for i in range(n):
        if pairs[2 * i + 1] == 0:
            return -EINVAL
        if pdb_add_overflow(pairs[2 * i], pairs[2 * i + 1] - 1, &last):
            return -EOVERFLOW
        count += (pairs[2 * i + 1] + PDB_MAX_SG_ENT_SZ - 1) // PDB_MAX_SG_ENT_SZ
        if count > UINT32_MAX:
            return -EINVAL
    rc = sg_alloc(t, <uint32_t>count)
    if rc < 0:
        return rc
    s = sg_first(t)
    for i in range(n):
        addr = pairs[2 * i]
        left = pairs[2 * i + 1]
        while left:
            step = left if left < PDB_MAX_SG_ENT_SZ else PDB_MAX_SG_ENT_SZ
            t.slots[s].dma_address = addr
            t.slots[s].dma_length = <uint32_t>step
            addr += step
            left -= step
            s = sg_next(t, s)
    t.orig_nents = 0
    return 0


cdef int64_t sg_cpu_ranges(const sg_table *t, uint64_t *out) noexcept nogil:
    """(physical address, length) of each of the ``orig_nents`` entries."""
    cdef int64_t s = sg_first(t)
    cdef uint64_t k = 0
    while s >= 0 and k < t.orig_nents:
        out[2 * k] = (t.slots[s].page_link & _SG_LINK_MASK) + t.slots[s].offset
        out[2 * k + 1] = t.slots[s].length
        k += 1
        s = sg_next(t, s)
    return <int64_t>k


cdef int64_t sg_dma_ranges(const sg_table *t, uint64_t *out) noexcept nogil:
    """(DMA address, DMA length) of each of the ``nents`` DMA segments."""
    cdef int64_t s = sg_first(t)
    cdef uint64_t k = 0
    while s >= 0 and k < t.nents:
        out[2 * k] = t.slots[s].dma_address
        out[2 * k + 1] = t.slots[s].dma_length
        k += 1
        s = sg_next(t, s)
    return <int64_t>k


cdef int _sg_verify(const sg_table *t) noexcept nogil:
    """Debug-build invariants: links point at the next slot, the walk from
    the first slot reaches ``orig_nents`` data entries, ``prv`` is the last
    of them, the arena holds what the chunks say.  0 or -(check number)."""
    cdef uint64_t i, k = 0
    cdef int64_t s, last = -1
    if t.nslots > t.cap:
        return -1
    for i in range(t.nslots):
        if t.slots[i].page_link & PDB_SG_CHAIN:
            if i + 1 >= t.nslots:
                return -2
            if (t.slots[i].page_link & _SG_LINK_MASK) != <uint64_t><size_t>&t.slots[i + 1]:
                return -3
    if t.orig_nents == 0:
        return 0
    s = sg_first(t)
    while s >= 0 and k < t.orig_nents:
        if t.slots[s].page_link & PDB_SG_CHAIN:
            return -4
        last = s
        k += 1
        s = sg_next(t, s)
    if k != t.orig_nents:
        return -5
    if last != t.prv:
        return -6
    return 0


cdef int64_t _sg_count_pages(const sg_table *t) noexcept nogil:
    cdef int64_t s = sg_first(t)
    cdef uint64_t k = 0
    cdef int64_t total = 0
    while s >= 0 and k < t.orig_nents:
        total += (t.slots[s].offset + <uint64_t>t.slots[s].length + PDB_PAGE_SIZE - 1) >> PDB_PAGE_SHIFT
        k += 1
        s = sg_next(t, s)
    return total


cdef void _sg_fill_pages(const sg_table *t, uint64_t *out) noexcept nogil:
    cdef int64_t s = sg_first(t)
    cdef uint64_t k = 0, p, np_, pfn, m = 0
    while s >= 0 and k < t.orig_nents:
        np_ = (t.slots[s].offset + <uint64_t>t.slots[s].length + PDB_PAGE_SIZE - 1) >> PDB_PAGE_SHIFT
        pfn = (t.slots[s].page_link & _SG_LINK_MASK) >> PDB_PAGE_SHIFT
        for p in range(np_):
            out[m] = pfn + p
            m += 1
        k += 1
        s = sg_next(t, s)


# ------------------------------------------------------------------ Python

SCATTERLIST_MAX_SEGMENT = 0xFFFFF000
MAX_SG_ENT_SZ = 0xFFFFF000
SG_MAX_SINGLE_ALLOC = PDB_SG_MAX_SINGLE_ALLOC
SG_CHAIN = PDB_SG_CHAIN
SG_END = PDB_SG_END
SG_DMA_BUS_ADDRESS = PDB_SG_DMA_BUS_ADDRESS
SG_DMA_SWIOTLB = PDB_SG_DMA_SWIOTLB

cdef bytes _SG_FORMAT = b"T{Q:page_link:I:offset:I:length:Q:dma_address:I:dma_length:I:dma_flags:}"


cdef object _pages_args(object pfns_obj, object offset, object nbytes, object max_segment,
                        object left_pages, uint32_t *off, uint64_t *size, uint64_t *maxseg,
                        uint32_t *left):
    """Validate the arguments of from_pages/append_pages with clear errors."""
    cdef const uint64_t[::1] p = _as_u64_view(pfns_obj, "pfns")
    cdef uint64_t n = p.shape[0]
    if n == 0:
        raise _errors.InvalidArgument("pfns is empty: a scatterlist needs at least one page")
    if n > UINT32_MAX:
        raise _errors.InvalidArgument(f"{n} pages: n_pages is an unsigned int in the kernel")
    if nbytes is None and type(offset) is int and offset == 0 and max_segment is SCATTERLIST_MAX_SEGMENT \
            and type(left_pages) is int and left_pages == 0:
        # The defaults (what from_pages(pfns) passes): nothing to check
        # beyond the pages, and no Python arithmetic.
        off[0] = 0
        size[0] = n * PDB_PAGE_SIZE
        maxseg[0] = SCATTERLIST_MAX_SEGMENT
        left[0] = 0
        return p
    if not isinstance(offset, int):
        raise TypeError("offset must be an int")
    if offset < 0 or offset >= PDB_PAGE_SIZE:
        raise _errors.InvalidArgument(
            f"offset {offset:#x} must be inside the first page (0 <= offset < {PDB_PAGE_SIZE:#x})")
    off[0] = offset
    cdef object full = n * PDB_PAGE_SIZE - offset
    if nbytes is None:
        nbytes = full
    if not isinstance(nbytes, int):
        raise TypeError("nbytes must be an int or None")
    if nbytes < 0 or nbytes > full or nbytes <= full - PDB_PAGE_SIZE:
        raise _errors.InvalidArgument(
            f"nbytes {nbytes:#x} must end inside the last of the {n} pages "
            f"(after offset {offset:#x}: {max(full - PDB_PAGE_SIZE + 1, 0):#x} .. {full:#x})")
    size[0] = nbytes
    if not isinstance(max_segment, int):
        raise TypeError("max_segment must be an int")
    if max_segment < 0 or max_segment > UINT32_MAX:
        raise _errors.InvalidArgument(
            f"max_segment {max_segment:#x} does not fit an unsigned int")
    if (max_segment & ~(PDB_PAGE_SIZE - 1)) < PDB_PAGE_SIZE:
        raise _errors.InvalidArgument(
            f"max_segment {max_segment:#x} rounds down below PAGE_SIZE")
    maxseg[0] = max_segment
    if not isinstance(left_pages, int):
        raise TypeError("left_pages must be an int")
    if left_pages < 0 or left_pages > UINT32_MAX:
        raise _errors.InvalidArgument("left_pages must fit an unsigned int")
    left[0] = left_pages
    return p


# See SgTable.__enter__; set by set_sg_with_hook.
cdef object _sg_with_hook = None


from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE


cdef bint _fast_u64(object obj, Py_buffer *view) except -1:
    """A fast path beside ``_as_u64_view`` for the common argument, a
    non-empty C-contiguous 1-D buffer of native u64 (format ``Q`` or
    ``L``): take the buffer itself (held until the caller releases it).
    False, with nothing held, for anything else: the caller then parses
    with ``_as_u64_view`` (same accepted inputs, same errors)."""
    cdef const char *f
    if obj is None or type(obj) is list or type(obj) is tuple:
        return False
    try:
        PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except Exception:       # not a buffer, or not contiguous: the general path says why
        return False
    f = view.format
    if view.ndim == 1 and view.itemsize == 8 and view.shape[0] > 0 and f != NULL \
            and (f[0] == b'Q' or f[0] == b'L') and f[1] == 0:
        return True
    PyBuffer_Release(view)
    return False


@cython.final
cdef class SgTable:
    """A scatterlist table, ``struct sg_table`` as on 64-bit Linux.

    Entries are 32 bytes (``page_link``, ``offset``, ``length``,
    ``dma_address``, ``dma_length``, ``dma_flags``) in chunks of at most one
    page (128 entries); the last slot of a chunk that is followed by another
    chunk is a link.  ``orig_nents`` counts CPU entries, ``nents`` DMA
    segments (equal until the table is mapped; a DMA-only table has
    ``orig_nents == 0``).

    Build one with :meth:`from_pages`, :meth:`from_ranges`, :meth:`alloc`,
    or start empty with ``SgTable()`` and :meth:`append_pages`.

    The table exports its slots through the buffer protocol:
    ``numpy.asarray(table)`` (or :attr:`entries`) is a structured array over
    the table's own memory.  While such a view exists, a call that would
    have to move the slots raises ``BufferError``.
    """

    def __cinit__(self):
        memset(&self.t, 0, sizeof(sg_table))
        self.t.prv = -1
        self.exports = 0
        self.lock = _new_lock()

    def __dealloc__(self):
        sg_table_free(&self.t)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)
            self.lock = NULL

    # ---------------------------------------------------------- builders

    @staticmethod
    def from_pages(pfns, offset=0, nbytes=None, max_segment=SCATTERLIST_MAX_SEGMENT):
        """``sg_alloc_table_from_pages_segment()``: merge consecutive pages.

        Parameters
        ----------
        pfns : buffer of u64
            Page frame numbers, in buffer order (NumPy array, memoryview,
            ``array('Q')``; a list is copied).
        offset : int
            Byte offset of the data in the first page, ``0 <= offset < 4096``.
        nbytes : int, optional
            Bytes of data after ``offset``; must end inside the last page.
            Default: to the end of the last page.
        max_segment : int
            Largest entry in bytes; rounded down to a page multiple, and
            must stay at least one page.

        Returns
        -------
        SgTable
            A new table with ``nents == orig_nents`` entries.  Each run of
            consecutive PFNs becomes one entry, cut every ``max_segment``
            bytes; the first entry starts at ``offset``, the last ends where
            ``nbytes`` ends.

        Raises
        ------
        InvalidArgument
            (EINVAL) empty ``pfns``, ``max_segment`` below a page, an
            offset or ``nbytes`` outside the pages.
        OutOfRange
            (ERANGE) a PFN beyond 52-bit physical addresses.

        Examples
        --------
        >>> import numpy as np
        >>> t = SgTable.from_pages(np.array([10, 11, 12, 40], dtype=np.uint64), offset=0x100)
        >>> t.nents, [[hex(a), hex(n)] for a, n in t.cpu_ranges().tolist()]
        (2, [['0xa100', '0x2f00'], ['0x28000', '0x1000']])
        """
        cdef SgTable t = SgTable.__new__(SgTable)
        cdef uint32_t off, left
        cdef uint64_t size, maxseg
        cdef const uint64_t[::1] p
        cdef Py_buffer view
        cdef uint64_t n, full, c_off
        if type(offset) is int and (nbytes is None or type(nbytes) is int) \
                and max_segment is SCATTERLIST_MAX_SEGMENT and _fast_u64(pfns, &view):
            # A plain u64 array, the default segment, and an offset and
            # length that need no error message: no view object, no Python
            # arithmetic.  Anything else takes _pages_args and its checks.
            try:
                n = <uint64_t>view.shape[0]
                if offset == 0:
                    c_off = 0
                elif 0 < offset < PDB_PAGE_SIZE:
                    c_off = <uint64_t>offset
                else:
                    c_off = PDB_PAGE_SIZE  # out of range: the parser's error
                if n <= UINT32_MAX and c_off < PDB_PAGE_SIZE and (n > 0 or (nbytes is None and c_off == 0)):
                    full = n * PDB_PAGE_SIZE - c_off
                    if nbytes is None:
                        size = full
                    elif 0 < nbytes <= full and (full <= PDB_PAGE_SIZE or nbytes > full - PDB_PAGE_SIZE):
                        size = <uint64_t>nbytes
                    else:
                        size = 0
                    if size != 0 or n == 0:
                        t._append(<const uint64_t *>view.buf, view.shape[0], <uint32_t>c_off, size,
                                  SCATTERLIST_MAX_SEGMENT, 0)
                        return t
            finally:
                PyBuffer_Release(&view)
        p = _pages_args(pfns, offset, nbytes, max_segment, 0, &off, &size, &maxseg, &left)
        t._append(&p[0], p.shape[0], off, size, maxseg, left)
        return t

    @staticmethod
    def alloc(nents):
        """``sg_alloc_table()``: ``nents`` zeroed entries (EINVAL for 0)."""
        cdef SgTable t = SgTable.__new__(SgTable)
        if not isinstance(nents, int):
            raise TypeError("nents must be an int")
        if nents <= 0 or nents > UINT32_MAX:
            raise _errors.InvalidArgument(f"sg_alloc_table: nents {nents} must be in 1 .. 2**32 - 1")
        _check(sg_alloc(&t.t, <uint32_t>nents), "sg_alloc_table")
        return t

    @staticmethod
    def from_ranges(pairs):
        """A DMA-only table from an (N, 2) buffer of (address, nbytes) rows.

        Models the tables the kernel's ``dma_buf_phys_vec_to_sgt()`` hands
        out: no CPU side (``orig_nents == 0``, pages and CPU lengths 0), only
        DMA addresses and lengths; a range longer than ``MAX_SG_ENT_SZ``
        (0xFFFFF000) is split into consecutive entries.

        Raises InvalidArgument for an empty input or a zero length, Overflow
        for a range running past 2**64.

        Examples
        --------
        >>> t = SgTable.from_ranges([[0x8000_0000_0000, 5 << 30]])   # split at 0xFFFFF000
        >>> t.orig_nents, t.nents
        (0, 2)
        """
        cdef const uint64_t[::1] flat
        cdef SgTable t = SgTable.__new__(SgTable)
        cdef uint64_t n
        cdef int rc
        flat = _pairs_view(pairs, "pairs")
        n = flat.shape[0] // 2
        if n == 0:
            raise _errors.InvalidArgument("from_ranges: no ranges")
        with nogil:
            rc = sg_from_dma_ranges(&t.t, &flat[0], n)
        _check(rc, lambda: {-EINVAL: "from_ranges: a range has length 0, or too many entries",
                            -EOVERFLOW: "from_ranges: a range runs past 2**64 - 1"}.get(rc, "from_ranges"))
        return t

    @staticmethod
    def from_buffer(buffer, max_segment=SCATTERLIST_MAX_SEGMENT):
        """The pages behind a Python buffer, read through :func:`pagemap`.

        Examples
        --------
        >>> from pydmabuf import errors
        >>> buf = bytearray(1 << 16)
        >>> try:
        ...     t = SgTable.from_buffer(buf)
        ...     print(t.cpu_nbytes)
        ... except errors.NotPermitted:         # reading PFNs needs CAP_SYS_ADMIN
        ...     print(len(buf))
        65536
        """
        cdef uint64_t addr, length
        pfns = pagemap(buffer)
        addr, length = _buffer_span(buffer)
        return SgTable.from_pages(pfns, offset=addr & (PDB_PAGE_SIZE - 1), nbytes=length,
                                  max_segment=max_segment)

    def append_pages(self, pfns, offset=0, nbytes=None, max_segment=SCATTERLIST_MAX_SEGMENT,
                     left_pages=0):
        """``sg_alloc_append_table_from_pages()``: add pages to this table.

        Pages that continue the table's last entry are merged into it (up to
        ``max_segment``; ``nbytes`` is not consulted for them, as in the
        kernel), the rest become new entries.  ``offset`` must be 0 when the
        table already has entries.  ``left_pages`` says how many more pages
        later calls will add: the kernel allocates room for them now and
        leaves the table open; with 0 the last entry is marked as the end.
        Appending to a closed table reopens it (the kernel would need
        ``left_pages`` on the earlier call).

        On failure the table is unchanged.  Raises as :meth:`from_pages`,
        plus ``BufferError`` if the slots must move while exported.

        Examples
        --------
        >>> t = SgTable.from_pages([10, 11])
        >>> t.append_pages([12, 40])           # 12 continues the last entry, 40 starts one
        >>> t.cpu_ranges().tolist()
        [[40960, 12288], [163840, 4096]]
        """
        cdef const uint64_t[::1] p
        cdef uint32_t off, left
        cdef uint64_t size, maxseg
        cdef int rc
        p = _pages_args(pfns, offset, nbytes, max_segment, left_pages, &off, &size, &maxseg, &left)
        self._append(&p[0], p.shape[0], off, size, maxseg, left)

    cdef int _append(self, const uint64_t *p, Py_ssize_t n, uint32_t off, uint64_t size, uint64_t maxseg,
                     uint32_t left) except -1:
        """append_pages() on checked arguments: n >= 1 pages at p (from_pages
        calls it directly)."""
        cdef int rc
        if self.t.prv >= 0 and off != 0:
            raise _errors.InvalidArgument("append_pages: offset must be 0 when the table has entries")
        if self.mapping is not None:
            raise _errors.Busy("append_pages: the table is mapped for DMA; unmap it first")
        _acquire(self.lock)
        if self.t.orig_nents == 0 and self.t.nents > 0:
            rc = -ENOENT
        else:
            self.t.no_move = _atomic_load(&self.exports) > 0
            # Releasing the GIL costs more than a short table takes to build.
            if n > 256:
                with nogil:
                    rc = sg_append_pages(&self.t, p, n, off, size, maxseg, left)
            else:
                rc = sg_append_pages(&self.t, p, n, off, size, maxseg, left)
            self.t.no_move = 0
        _release(self.lock)
        if rc == -ENOENT:
            raise _errors.InvalidArgument("append_pages: a DMA-only table has no CPU side")
        if rc == -EBUSY:
            raise BufferError("append_pages: the table is exported (a NumPy view of its "
                              "entries exists) and its slots would have to move")
        if rc < 0:
            _check(rc, {-ERANGE: "append_pages: a PFN is beyond 52-bit physical addresses",
                        -ENOMEM: "append_pages: cannot allocate the table's chunks"}.get(rc, "append_pages"))
        if PYDMABUF_DEBUG:
            _acquire(self.lock)
            rc = _sg_verify(&self.t)
            _release(self.lock)
            if rc < 0:
                raise AssertionError(f"SgTable invariant {-rc} broken after append_pages")

    # ------------------------------------------------------------ views

    @property
    def nents(self):
        """DMA segments (``sgt->nents``); equals ``orig_nents`` until mapped."""
        return self.t.nents

    @property
    def orig_nents(self):
        """CPU entries (``sgt->orig_nents``); 0 for a DMA-only table."""
        return self.t.orig_nents

    @property
    def total_nents(self):
        """Data slots allocated (``sg_append_table.total_nents``)."""
        return self.t.total_nents

    @property
    def nchunks(self):
        """Allocations the kernel would have made for this table."""
        return self.t.nchunks

    @property
    def nslots(self):
        """Slots in all chunks, links and spare slots included."""
        return self.t.nslots

    @property
    def metadata_nbytes(self):
        """Bytes the kernel's allocator would spend on the chunks."""
        return self.t.meta_bytes

    @property
    def is_dma_only(self):
        """True for a table with no CPU side (``orig_nents == 0``)."""
        return self.t.orig_nents == 0 and self.t.nents > 0

    @property
    def cpu_nbytes(self):
        """Sum of the CPU lengths of the ``orig_nents`` entries."""
        cdef int64_t s
        cdef uint64_t k = 0, total = 0
        _acquire(self.lock)
        s = sg_first(&self.t)
        with nogil:
            while s >= 0 and k < self.t.orig_nents:
                total += self.t.slots[s].length
                k += 1
                s = sg_next(&self.t, s)
        _release(self.lock)
        return total

    @property
    def dma_nbytes(self):
        """Sum of the DMA lengths of the ``nents`` segments."""
        cdef int64_t s
        cdef uint64_t k = 0, total = 0
        _acquire(self.lock)
        s = sg_first(&self.t)
        with nogil:
            while s >= 0 and k < self.t.nents:
                total += self.t.slots[s].dma_length
                k += 1
                s = sg_next(&self.t, s)
        _release(self.lock)
        return total

    @property
    def total_nbytes(self):
        """Bytes described: the CPU side, or the DMA side of a DMA-only table."""
        return self.dma_nbytes if self.t.orig_nents == 0 else self.cpu_nbytes

    @property
    def entries(self):
        """Every slot as a NumPy structured array, without copying.

        One row per slot in memory order: data entries, link slots
        (``page_link & SG_CHAIN``) and spare slots after the end.  Fields
        ``page_link``, ``offset``, ``length``, ``dma_address``,
        ``dma_length``, ``dma_flags``.  Use :meth:`cpu_ranges` and
        :meth:`dma_ranges` for one row per segment.
        """
        return _np().asarray(self)

    def cpu_ranges(self):
        """(orig_nents, 2) u64 array of (physical address, nbytes) rows.

        Examples
        --------
        >>> SgTable.from_pages([10, 11, 40]).cpu_ranges().tolist()
        [[40960, 8192], [163840, 4096]]
        """
        return self._ranges(False)

    def dma_ranges(self):
        """(nents, 2) u64 array of (DMA address, nbytes) rows.

        Examples
        --------
        >>> SgTable.from_ranges([[0x1000, 0x3000]]).dma_ranges().tolist()
        [[4096, 12288]]
        """
        return self._ranges(True)

    def _dma_snapshot(self):
        """The (DMA address, nbytes) rows as ``bytes`` of native u64 pairs:
        the dma-buf layer's record of what a mapping covers
        (:func:`ranges_touch` reads it), without an array's cost."""
        cdef bytes out
        cdef uint64_t want
        while True:
            want = self.t.nents
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(want * 16))
            _acquire(self.lock)
            if want == self.t.nents:
                break
            _release(self.lock)     # changed meanwhile: size again
        if want:
            sg_dma_ranges(&self.t, <uint64_t *>PyBytes_AS_STRING(out))
        _release(self.lock)
        return out

    cdef object _ranges(self, bint dma):
        cdef _Buffer b
        cdef uint64_t want
        while True:
            b = _new_buffer(self.t.nents if dma else self.t.orig_nents, 2, 8, b"Q")
            _acquire(self.lock)
            want = self.t.nents if dma else self.t.orig_nents
            if want == <uint64_t>b.shape[0]:
                break
            _release(self.lock)     # changed meanwhile: size again
        with nogil:
            if dma:
                sg_dma_ranges(&self.t, <uint64_t *>b.data)
            else:
                sg_cpu_ranges(&self.t, <uint64_t *>b.data)
        _release(self.lock)
        return _np().asarray(b)

    def cpu_segments(self):
        """Iterate over (physical address, nbytes) of the CPU entries."""
        for addr, n in self.cpu_ranges().tolist():
            yield addr, n

    def dma_segments(self):
        """Iterate over (DMA address, nbytes) of the DMA segments."""
        for addr, n in self.dma_ranges().tolist():
            yield addr, n

    def pfns(self):
        """The PFN of every page the CPU entries touch, in order (u64 array)."""
        cdef int64_t total
        cdef _Buffer b
        while True:
            _acquire(self.lock)
            total = _sg_count_pages(&self.t)
            _release(self.lock)
            b = _new_buffer(total, 0, 8, b"Q")
            _acquire(self.lock)
            if _sg_count_pages(&self.t) == total:
                break
            _release(self.lock)
        with nogil:
            _sg_fill_pages(&self.t, <uint64_t *>b.data)
        _release(self.lock)
        return _np().asarray(b)

    def nents_for_len(self, nbytes):
        """``sg_nents_for_len()``: entries needed to cover ``nbytes``."""
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef int64_t rc
        _acquire(self.lock)
        rc = sg_nents_for_len(&self.t, n)
        _release(self.lock)
        return _check(rc, lambda: f"the table holds fewer than {n:#x} bytes")

    def sg_nents(self):
        """``sg_nents()``: entries up to the end mark, links not counted."""
        cdef int64_t s
        cdef int64_t n = 0
        _acquire(self.lock)
        s = sg_first(&self.t)
        with nogil:
            while s >= 0:
                n += 1
                s = sg_next(&self.t, s)
        _release(self.lock)
        return n

    # ---------------------------------------------------- buffer protocol

    def __getbuffer__(self, Py_buffer *view, int flags):
        cdef Py_ssize_t *shape = <Py_ssize_t *>malloc(sizeof(Py_ssize_t))
        if shape == NULL:
            raise MemoryError()
        _acquire(self.lock)
        _atomic_add(&self.exports, 1)
        self.t.hint_n = 0           # the view can write the entries
        shape[0] = <Py_ssize_t>self.t.nslots
        view.buf = <void *>self.t.slots if self.t.slots != NULL else <void *>&_sg_dummy_entry
        _release(self.lock)
        view.obj = self
        view.len = shape[0] * <Py_ssize_t>sizeof(sg_entry)
        view.readonly = 0
        view.itemsize = sizeof(sg_entry)
        view.format = <char *>_SG_FORMAT if (flags & PyBUF_FORMAT) else NULL
        view.ndim = 1
        view.shape = shape if (flags & PyBUF_ND) else NULL
        view.strides = &view.itemsize if (flags & PyBUF_STRIDES) else NULL
        view.suboffsets = NULL
        view.internal = <void *>shape

    def __releasebuffer__(self, Py_buffer *view):
        # No lock here: a view may be released by the garbage collector
        # while this thread holds the table's lock.
        free(view.internal)
        view.internal = NULL
        _atomic_add(&self.exports, -1)

    def __len__(self):
        return self.t.nents

    def __del__(self):
        # A table collected while mapped leaves its IOVA, page-table
        # entries or bounce slots behind (the DMA API never frees them).
        # At interpreter shutdown this may run after modules are torn down:
        # it imports nothing, and a repr that fails only shortens the
        # message (the warning itself still goes out).
        cdef object warn
        if self.mapping is None:
            return
        try:
            what = repr(self)
        except Exception:
            what = f"<SgTable {self.t.orig_nents} entries>"
        warn = getattr(_warnings, "warn", None)
        if warn is not None:
            warn(f"{what} collected while mapped: unmap it first", ResourceWarning, stacklevel=2)

    def __repr__(self):
        if self.t.nslots == 0:
            return "<SgTable empty>"
        state = f", mapped by {self.mapping.device_name}" if self.mapping is not None else ""
        if self.t.orig_nents == 0:
            return (f"<SgTable DMA-only: {self.t.nents} segment{'s' if self.t.nents != 1 else ''}, "
                    f"{_fmt_size(self.dma_nbytes)}{state}>")
        return (f"<SgTable {self.t.orig_nents} entr{'ies' if self.t.orig_nents != 1 else 'y'} "
                f"({_fmt_size(self.cpu_nbytes)}), nents={self.t.nents}, "
                f"{self.t.nchunks} chunk{'s' if self.t.nchunks != 1 else ''}{state}>")

    # ``with attachment.map(direction) as table:`` unmaps at the end.  Who
    # owns a mapped table is the dma-buf layer's business, so the table asks
    # it through one hook (pydmabuf.dmabuf registers it on import); a table
    # that is not a dma-buf mapping refuses the with statement.
    def __enter__(self):
        if _sg_with_hook is None:
            raise TypeError("only a dma-buf mapping (Attachment.map) is a context manager")
        _sg_with_hook(self, True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if _sg_with_hook is not None:
            _sg_with_hook(self, False)
        return False


def set_sg_with_hook(hook):
    """Register ``hook(table, entering)``, run by ``SgTable.__enter__`` and
    ``__exit__`` (pydmabuf.dmabuf's, which unmaps the mapping at exit)."""
    global _sg_with_hook
    _sg_with_hook = hook


