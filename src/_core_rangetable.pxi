# Range tables: a sorted set of non-overlapping inclusive u64 ranges with
# attributes, in an AVL tree augmented with each subtree's span and its
# largest internal gap.  Every operation is O(log n); a gap search visits
# only subtrees whose largest gap is big enough and which meet the window.

from libc.stdint cimport UINT32_MAX
from libc.stdlib cimport qsort

from pydmabuf._types import Range as _Range
from pydmabuf._types import RangeKind as _RangeKind

cdef object _KIND_OBJ = tuple(
    _RangeKind(k) if k in _RangeKind._value2member_map_ else k for k in range(256))

cdef enum:
    _RT_MAX_NODES = 0xFFFFFFF0


# ------------------------------------------------------------ tree kernels

cdef inline int _rt_h(const rt_node *N, uint32_t i) noexcept nogil:
    return N[i].height if i else 0


cdef inline void _rt_update(rt_node *N, uint32_t i) noexcept nogil:
    cdef rt_node *n = &N[i]
    cdef uint32_t l = n.left
    cdef uint32_t r = n.right
    cdef uint64_t g = 0
    cdef uint64_t d
    cdef int hl = 0
    cdef int hr = 0
    if l:
        n.min_start = N[l].min_start
        g = N[l].max_gap
        d = n.start - N[l].max_last - 1
        if d > g:
            g = d
        hl = N[l].height
    else:
        n.min_start = n.start
    if r:
        n.max_last = N[r].max_last
        if N[r].max_gap > g:
            g = N[r].max_gap
        d = N[r].min_start - n.last - 1
        if d > g:
            g = d
        hr = N[r].height
    else:
        n.max_last = n.last
    n.max_gap = g
    n.height = <int8_t>(1 + (hl if hl > hr else hr))


cdef inline uint32_t _rt_rot_right(rt_node *N, uint32_t y) noexcept nogil:
    cdef uint32_t x = N[y].left
    N[y].left = N[x].right
    N[x].right = y
    _rt_update(N, y)
    _rt_update(N, x)
    return x


cdef inline uint32_t _rt_rot_left(rt_node *N, uint32_t x) noexcept nogil:
    cdef uint32_t y = N[x].right
    N[x].right = N[y].left
    N[y].left = x
    _rt_update(N, x)
    _rt_update(N, y)
    return y


cdef uint32_t _rt_balance(rt_node *N, uint32_t n) noexcept nogil:
    cdef int bf
    cdef uint32_t c
    _rt_update(N, n)
    bf = _rt_h(N, N[n].left) - _rt_h(N, N[n].right)
    if bf > 1:
        c = N[n].left
        if _rt_h(N, N[c].left) < _rt_h(N, N[c].right):
            N[n].left = _rt_rot_left(N, c)
        return _rt_rot_right(N, n)
    if bf < -1:
        c = N[n].right
        if _rt_h(N, N[c].right) < _rt_h(N, N[c].left):
            N[n].right = _rt_rot_right(N, c)
        return _rt_rot_left(N, n)
    return n


cdef uint32_t _rt_insert_node(rt_node *N, uint32_t n, uint32_t new) noexcept nogil:
    if n == 0:
        return new
    if N[new].start < N[n].start:
        N[n].left = _rt_insert_node(N, N[n].left, new)
    else:
        N[n].right = _rt_insert_node(N, N[n].right, new)
    return _rt_balance(N, n)


cdef uint32_t _rt_unlink_min(rt_node *N, uint32_t n, uint32_t *minnode) noexcept nogil:
    if N[n].left == 0:
        minnode[0] = n
        return N[n].right
    N[n].left = _rt_unlink_min(N, N[n].left, minnode)
    return _rt_balance(N, n)


cdef uint32_t _rt_unlink(rt_node *N, uint32_t n, uint64_t key, uint32_t *gone) noexcept nogil:
    """Unlink the node whose start is ``key`` from subtree ``n``."""
    cdef uint32_t m = 0
    cdef uint32_t child
    if n == 0:
        return 0
    if key < N[n].start:
        N[n].left = _rt_unlink(N, N[n].left, key, gone)
    elif key > N[n].start:
        N[n].right = _rt_unlink(N, N[n].right, key, gone)
    else:
        gone[0] = n
        if N[n].left == 0 or N[n].right == 0:
            child = N[n].left if N[n].left else N[n].right
            return child
        N[n].right = _rt_unlink_min(N, N[n].right, &m)
        N[m].left = N[n].left
        N[m].right = N[n].right
        return _rt_balance(N, m)
    return _rt_balance(N, n)


cdef inline void _u128_add(uint64_t *lo, uint64_t *hi, uint64_t a_lo, uint64_t a_hi) noexcept nogil:
    cdef uint64_t r = lo[0] + a_lo
    hi[0] += a_hi + (1 if r < lo[0] else 0)
    lo[0] = r


cdef inline void _u128_sub(uint64_t *lo, uint64_t *hi, uint64_t a_lo, uint64_t a_hi) noexcept nogil:
    cdef uint64_t r = lo[0] - a_lo
    hi[0] -= a_hi + (1 if r > lo[0] else 0)
    lo[0] = r


cdef inline void _span_nbytes(uint64_t start, uint64_t last, uint64_t *lo, uint64_t *hi) noexcept nogil:
    # last - start + 1, as 128 bits (the full space is 2**64 bytes)
    lo[0] = last - start + 1
    hi[0] = 1 if (lo[0] == 0) else 0


cdef int rt_init(range_table *t) noexcept nogil:
    memset(t, 0, sizeof(range_table))
    t.nodes = <rt_node *>calloc(16, sizeof(rt_node))
    if t.nodes == NULL:
        return -ENOMEM
    t.cap = 16
    t.used = 1
    return 0


cdef void rt_destroy(range_table *t) noexcept nogil:
    free(t.nodes)
    t.nodes = NULL
    t.cap = 0
    t.used = 0
    t.root = 0
    t.count = 0
    t.free_head = 0


cdef int rt_reserve(range_table *t, uint64_t extra) noexcept nogil:
    """Make sure ``extra`` more nodes can be taken without allocating."""
    cdef uint64_t avail = <uint64_t>t.cap - 1 - t.count
    cdef uint64_t want
    cdef rt_node *p
    if avail >= extra:
        return 0
    want = <uint64_t>t.cap * 2
    if want < t.count + 1 + extra:
        want = t.count + 1 + extra
    if want > _RT_MAX_NODES:
        if t.count + 1 + extra > _RT_MAX_NODES:
            return -ENOMEM
        want = _RT_MAX_NODES
    p = <rt_node *>realloc(t.nodes, want * sizeof(rt_node))
    if p == NULL:
        return -ENOMEM
    t.nodes = p
    t.cap = <uint32_t>want
    return 0


cdef inline uint32_t _rt_take(range_table *t) noexcept nogil:
    """A node from the pool; the caller has reserved it."""
    cdef uint32_t i
    if t.free_head:
        i = t.free_head
        t.free_head = t.nodes[i].left
    else:
        i = t.used
        t.used += 1
    return i


cdef inline void _rt_give(range_table *t, uint32_t i) noexcept nogil:
    t.nodes[i].left = t.free_head
    t.free_head = i


cdef void _rt_link_new(range_table *t, uint64_t start, uint64_t last, uint8_t kind,
                       uint64_t owner, uint32_t flags) noexcept nogil:
    """Insert a range known not to overlap; a node must be reserved."""
    cdef uint32_t i = _rt_take(t)
    cdef rt_node *n = &t.nodes[i]
    cdef uint64_t lo, hi
    n.start = start
    n.last = last
    n.owner = owner
    n.flags = flags
    n.kind = kind
    n.left = 0
    n.right = 0
    _rt_update(t.nodes, i)
    t.root = _rt_insert_node(t.nodes, t.root, i)
    t.count += 1
    _span_nbytes(start, last, &lo, &hi)
    _u128_add(&t.nbytes_lo, &t.nbytes_hi, lo, hi)


cdef void _rt_unlink_start(range_table *t, uint64_t start) noexcept nogil:
    cdef uint32_t gone = 0
    cdef uint64_t lo, hi
    t.root = _rt_unlink(t.nodes, t.root, start, &gone)
    if gone:
        _span_nbytes(t.nodes[gone].start, t.nodes[gone].last, &lo, &hi)
        _u128_sub(&t.nbytes_lo, &t.nbytes_hi, lo, hi)
        _rt_give(t, gone)
        t.count -= 1


cdef const rt_node *_rt_floor(const range_table *t, uint64_t key) noexcept nogil:
    """The range with the greatest start <= key."""
    cdef const rt_node *N = t.nodes
    cdef uint32_t i = t.root
    cdef uint32_t best = 0
    while i:
        if N[i].start <= key:
            best = i
            i = N[i].right
        else:
            i = N[i].left
    return &N[best] if best else NULL


cdef const rt_node *rt_next(const range_table *t, uint64_t key) noexcept nogil:
    """The range with the smallest start > key."""
    cdef const rt_node *N = t.nodes
    cdef uint32_t i = t.root
    cdef uint32_t best = 0
    while i:
        if N[i].start > key:
            best = i
            i = N[i].left
        else:
            i = N[i].right
    return &N[best] if best else NULL


cdef const rt_node *rt_prev(const range_table *t, uint64_t key) noexcept nogil:
    """The range with the greatest start < key."""
    cdef const rt_node *N = t.nodes
    cdef uint32_t i = t.root
    cdef uint32_t best = 0
    while i:
        if N[i].start < key:
            best = i
            i = N[i].right
        else:
            i = N[i].left
    return &N[best] if best else NULL


cdef const rt_node *rt_lookup(const range_table *t, uint64_t addr) noexcept nogil:
    cdef const rt_node *n = _rt_floor(t, addr)
    if n != NULL and addr <= n.last:
        return n
    return NULL


cdef const rt_node *rt_first_overlap(const range_table *t, uint64_t start,
                                     uint64_t last) noexcept nogil:
    """The lowest range meeting [start, last], or NULL."""
    cdef const rt_node *n = _rt_floor(t, start)
    if n != NULL and n.last >= start:
        return n
    n = rt_next(t, start)
    if n != NULL and n.start <= last:
        return n
    return NULL


cdef int rt_insert(range_table *t, uint64_t start, uint64_t last, uint8_t kind,
                   uint64_t owner, uint32_t flags) noexcept nogil:
    """Insert [start, last]; -EEXIST if it meets a range, -EINVAL if empty."""
    cdef const rt_node *f
    cdef int rc
    if last < start:
        return -EINVAL
    f = _rt_floor(t, last)
    if f != NULL and f.last >= start:
        return -EEXIST
    rc = rt_reserve(t, 1)
    if rc < 0:
        return rc
    _rt_link_new(t, start, last, kind, owner, flags)
    return 0


cdef int rt_remove_at(range_table *t, uint64_t addr, rt_node *out) noexcept nogil:
    """Remove the whole range holding ``addr``; copy it to ``out``."""
    cdef const rt_node *n = rt_lookup(t, addr)
    if n == NULL:
        return -ENOENT
    if out != NULL:
        out[0] = n[0]
    _rt_unlink_start(t, n.start)
    return 0


cdef int rt_erase(range_table *t, uint64_t start, uint64_t last,
                  uint64_t *erased_lo, uint64_t *erased_hi) noexcept nogil:
    """Remove every byte of [start, last] from the table.

    Ranges that straddle an edge of the window are trimmed (one that covers
    both edges is split in two, keeping its attributes).  Returns the number
    of ranges touched; the bytes removed go to erased_lo/hi (128 bits).
    """
    cdef const rt_node *n
    cdef rt_node c
    cdef uint64_t a, b, lo, hi
    cdef int touched = 0
    cdef int rc
    erased_lo[0] = 0
    erased_hi[0] = 0
    if last < start:
        return -EINVAL
    # A split needs one node more than the table holds now: take it first so
    # that nothing can fail once the table starts changing.
    rc = rt_reserve(t, 1)
    if rc < 0:
        return rc
    while True:
        n = rt_first_overlap(t, start, last)
        if n == NULL:
            break
        c = n[0]
        _rt_unlink_start(t, c.start)
        if c.start < start:
            _rt_link_new(t, c.start, start - 1, c.kind, c.owner, c.flags)
        if c.last > last:
            _rt_link_new(t, last + 1, c.last, c.kind, c.owner, c.flags)
        a = c.start if c.start > start else start
        b = c.last if c.last < last else last
        _span_nbytes(a, b, &lo, &hi)
        _u128_add(erased_lo, erased_hi, lo, hi)
        touched += 1
    return touched


# ------------------------------------------------------------- gap search

cdef inline bint _fit_down(uint64_t x, uint64_t y, uint64_t sizem1, uint64_t amask,
                           uint64_t lo, uint64_t hi, uint64_t *out) noexcept nogil:
    """Highest aligned a with [a, a + sizem1] inside [x, y] and [lo, hi]."""
    cdef uint64_t a
    if x < lo:
        x = lo
    if y > hi:
        y = hi
    if x > y or y - x < sizem1:
        return False
    a = (y - sizem1) & amask
    if a < x:
        return False
    out[0] = a
    return True


cdef inline bint _fit_up(uint64_t x, uint64_t y, uint64_t sizem1, uint64_t amask,
                         uint64_t lo, uint64_t hi, uint64_t *out) noexcept nogil:
    """Lowest aligned a with [a, a + sizem1] inside [x, y] and [lo, hi]."""
    cdef uint64_t a
    if x < lo:
        x = lo
    if y > hi:
        y = hi
    if x > y or y - x < sizem1:
        return False
    a = x + ~amask
    if a < x:           # rounding up wrapped past 2**64 - 1
        return False
    a &= amask
    if a > y - sizem1:
        return False
    out[0] = a
    return True


cdef bint _gap_down(const rt_node *N, uint32_t i, uint64_t sizem1, uint64_t amask,
                    uint64_t lo, uint64_t hi, uint64_t *out) noexcept nogil:
    cdef const rt_node *n
    cdef uint32_t l, r
    if i == 0:
        return False
    n = &N[i]
    if n.max_gap <= sizem1 or not (lo < n.max_last and hi > n.min_start):
        return False
    r = n.right
    l = n.left
    if r:
        if _gap_down(N, r, sizem1, amask, lo, hi, out):
            return True
        if N[r].min_start - n.last - 1 > sizem1:
            if _fit_down(n.last + 1, N[r].min_start - 1, sizem1, amask, lo, hi, out):
                return True
    if l:
        if n.start - N[l].max_last - 1 > sizem1:
            if _fit_down(N[l].max_last + 1, n.start - 1, sizem1, amask, lo, hi, out):
                return True
        return _gap_down(N, l, sizem1, amask, lo, hi, out)
    return False


cdef bint _gap_up(const rt_node *N, uint32_t i, uint64_t sizem1, uint64_t amask,
                  uint64_t lo, uint64_t hi, uint64_t *out) noexcept nogil:
    cdef const rt_node *n
    cdef uint32_t l, r
    if i == 0:
        return False
    n = &N[i]
    if n.max_gap <= sizem1 or not (lo < n.max_last and hi > n.min_start):
        return False
    r = n.right
    l = n.left
    if l:
        if _gap_up(N, l, sizem1, amask, lo, hi, out):
            return True
        if n.start - N[l].max_last - 1 > sizem1:
            if _fit_up(N[l].max_last + 1, n.start - 1, sizem1, amask, lo, hi, out):
                return True
    if r:
        if N[r].min_start - n.last - 1 > sizem1:
            if _fit_up(n.last + 1, N[r].min_start - 1, sizem1, amask, lo, hi, out):
                return True
        return _gap_up(N, r, sizem1, amask, lo, hi, out)
    return False


cdef int rt_find_gap(const range_table *t, uint64_t sizem1, uint64_t align,
                     uint64_t lo, uint64_t hi, bint top_down,
                     uint64_t *out) noexcept nogil:
    """Find ``sizem1 + 1`` free bytes, aligned to ``align``, inside [lo, hi].

    Top-down returns the highest such start, bottom-up the lowest.  0 and
    the start in ``out``; -EINVAL for a bad alignment; -ENOSPC if none.
    """
    cdef const rt_node *N = t.nodes
    cdef const rt_node *root
    cdef uint64_t amask
    cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF
    if not _is_pow2(align):
        return -EINVAL
    amask = ~(align - 1)
    if lo > hi or hi - lo < sizem1:
        return -ENOSPC
    if t.root == 0:
        if top_down:
            if _fit_down(0, U64_MAX, sizem1, amask, lo, hi, out):
                return 0
        elif _fit_up(0, U64_MAX, sizem1, amask, lo, hi, out):
            return 0
        return -ENOSPC
    root = &N[t.root]
    if top_down:
        if root.max_last < U64_MAX and _fit_down(root.max_last + 1, U64_MAX, sizem1, amask, lo, hi, out):
            return 0
        if _gap_down(N, t.root, sizem1, amask, lo, hi, out):
            return 0
        if root.min_start > 0 and _fit_down(0, root.min_start - 1, sizem1, amask, lo, hi, out):
            return 0
    else:
        if root.min_start > 0 and _fit_up(0, root.min_start - 1, sizem1, amask, lo, hi, out):
            return 0
        if _gap_up(N, t.root, sizem1, amask, lo, hi, out):
            return 0
        if root.max_last < U64_MAX and _fit_up(root.max_last + 1, U64_MAX, sizem1, amask, lo, hi, out):
            return 0
    return -ENOSPC


# ------------------------------------------------------------- bulk insert

cdef struct _rt_item:
    uint64_t start
    uint64_t last
    uint64_t owner
    uint32_t flags
    uint8_t kind


cdef int _rt_item_cmp(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const _rt_item *>a).start
    cdef uint64_t y = (<const _rt_item *>b).start
    return -1 if x < y else (1 if x > y else 0)


cdef int _rt_sort_items(_rt_item *items, uint64_t n) noexcept nogil:
    """Sort items by start: nothing to do when already sorted (the common
    bulk case), qsort for short inputs, otherwise an LSD radix sort of
    (start, index) pairs by 16-bit digits, skipping digits every key
    shares, then one permutation.  0, or -ENOMEM (nothing changed)."""
    cdef uint64_t i, d, pos, c
    cdef uint64_t *keys
    cdef uint64_t *tmp
    cdef uint32_t *idx
    cdef uint32_t *tidx
    cdef uint64_t *cnt
    cdef uint64_t all_or = 0, all_and = <uint64_t>-1
    cdef _rt_item *out
    cdef int shift
    for i in range(1, n):
        if items[i].start < items[i - 1].start:
            break
    else:
        return 0
    if n < 256 or n > UINT32_MAX:
        qsort(items, n, sizeof(_rt_item), _rt_item_cmp)
        return 0
    keys = <uint64_t *>malloc(2 * n * sizeof(uint64_t))
    idx = <uint32_t *>malloc(2 * n * sizeof(uint32_t))
    cnt = <uint64_t *>malloc(65536 * sizeof(uint64_t))
    out = <_rt_item *>malloc(n * sizeof(_rt_item))
    if keys == NULL or idx == NULL or cnt == NULL or out == NULL:
        free(keys)
        free(idx)
        free(cnt)
        free(out)
        return -ENOMEM
    tmp = keys + n
    tidx = idx + n
    for i in range(n):
        keys[i] = items[i].start
        idx[i] = <uint32_t>i
        all_or |= keys[i]
        all_and &= keys[i]
    for shift in range(0, 64, 16):
        if ((all_or ^ all_and) >> shift) & 0xFFFF == 0:
            continue  # every key has this digit: the pass would not move anything
        memset(cnt, 0, 65536 * sizeof(uint64_t))
        for i in range(n):
            cnt[(keys[i] >> shift) & 0xFFFF] += 1
        pos = 0
        for d in range(65536):
            c = cnt[d]
            cnt[d] = pos
            pos += c
        for i in range(n):
            d = (keys[i] >> shift) & 0xFFFF
            tmp[cnt[d]] = keys[i]
            tidx[cnt[d]] = idx[i]
            cnt[d] += 1
        keys, tmp = tmp, keys
        idx, tidx = tidx, idx
    for i in range(n):
        out[i] = items[idx[i]]
    memcpy(items, out, n * sizeof(_rt_item))
    # keys/idx may point at the upper halves after an odd number of passes.
    free(keys if keys < tmp else tmp)
    free(idx if idx < tidx else tidx)
    free(cnt)
    free(out)
    return 0


cdef uint32_t _rt_build(range_table *t, const _rt_item *items, int64_t lo, int64_t hi) noexcept nogil:
    """A balanced subtree over sorted items[lo..hi]; nodes are reserved."""
    cdef int64_t mid
    cdef uint32_t i
    cdef rt_node *n
    if lo > hi:
        return 0
    mid = lo + (hi - lo) // 2
    i = _rt_take(t)
    n = &t.nodes[i]
    n.start = items[mid].start
    n.last = items[mid].last
    n.owner = items[mid].owner
    n.flags = items[mid].flags
    n.kind = items[mid].kind
    n.left = _rt_build(t, items, lo, mid - 1)
    n = &t.nodes[i]
    n.right = _rt_build(t, items, mid + 1, hi)
    _rt_update(t.nodes, i)
    return i


cdef int64_t _rt_insert_items(range_table *t, _rt_item *items, uint64_t n) noexcept nogil:
    """Insert n items (sorted here) all or nothing: 0 or a negative errno."""
    cdef uint64_t i, j
    cdef const rt_node *f
    cdef uint64_t lo, hi
    cdef int rc
    if n == 0:
        return 0
    rc = _rt_sort_items(items, n)
    if rc < 0:
        return rc
    for i in range(1, n):
        if items[i].start <= items[i - 1].last:
            return -EEXIST
    if t.root != 0:
        for i in range(n):
            f = _rt_floor(t, items[i].last)
            if f != NULL and f.last >= items[i].start:
                return -EEXIST
    rc = rt_reserve(t, n)
    if rc < 0:
        return rc
    if t.root == 0:
        t.root = _rt_build(t, items, 0, <int64_t>n - 1)
        t.count = n
        for i in range(n):
            _span_nbytes(items[i].start, items[i].last, &lo, &hi)
            _u128_add(&t.nbytes_lo, &t.nbytes_hi, lo, hi)
    else:
        for i in range(n):
            _rt_link_new(t, items[i].start, items[i].last, items[i].kind,
                         items[i].owner, items[i].flags)
    return 0


# -------------------------------------------------------------- invariants

cdef int64_t _rt_check(const rt_node *N, uint32_t i, uint64_t *count) noexcept nogil:
    """Recompute and compare the augmentation; returns height or -1."""
    cdef int64_t hl, hr
    cdef uint64_t g = 0, d
    cdef const rt_node *n
    if i == 0:
        return 0
    n = &N[i]
    if n.last < n.start:
        return -1
    hl = _rt_check(N, n.left, count)
    hr = _rt_check(N, n.right, count)
    if hl < 0 or hr < 0 or hl - hr > 1 or hr - hl > 1:
        return -1
    if n.height != 1 + (hl if hl > hr else hr):
        return -1
    if n.left:
        if N[n.left].max_last >= n.start or N[n.left].min_start != n.min_start:
            return -1
        g = N[n.left].max_gap
        d = n.start - N[n.left].max_last - 1
        if d > g:
            g = d
    elif n.min_start != n.start:
        return -1
    if n.right:
        if N[n.right].min_start <= n.last or N[n.right].max_last != n.max_last:
            return -1
        if N[n.right].max_gap > g:
            g = N[n.right].max_gap
        d = N[n.right].min_start - n.last - 1
        if d > g:
            g = d
    elif n.max_last != n.last:
        return -1
    if g != n.max_gap:
        return -1
    count[0] += 1
    return n.height


# ----------------------------------------------------------- Python class

_tuple_new = tuple.__new__


cdef inline object _range_obj(const rt_node *n):
    # tuple.__new__ straight away: the NamedTuple's own __new__ is a Python
    # function and costs more than the tree walk.
    return _tuple_new(_Range, (n.start, <object>n.last - <object>n.start + 1, _KIND_OBJ[n.kind],
                                n.owner, n.flags))


cdef uint8_t _kind_arg(object kind) except? 255:
    if not isinstance(kind, int):
        raise TypeError(f"kind must be a RangeKind or an int, not {type(kind).__name__}")
    if kind < 0 or kind > 255:
        raise _errors.InvalidArgument(f"kind must be in 0..255 (got {kind})")
    return <uint8_t>kind


cdef uint32_t _flags_arg(object flags) except? 0xFFFFFFFF:
    if not isinstance(flags, int):
        raise TypeError(f"flags must be an int, not {type(flags).__name__}")
    if flags < 0 or flags > 0xFFFFFFFF:
        raise _errors.InvalidArgument(f"flags must fit in 32 bits (got {flags:#x})")
    return <uint32_t>flags


@cython.final
cdef class RangeTable:
    """A sorted set of non-overlapping address ranges with attributes.

    Ranges are stored as inclusive ``[start, last]`` pairs of u64, so a range
    may end at ``2**64 - 1``; the Python surface speaks ``(start, nbytes)``.
    Each range carries a ``kind`` (a :class:`~pydmabuf.RangeKind` or any
    int in 0..255), an ``owner`` id (u64) and ``flags`` (u32).

    Lookups, inserts, erases and gap searches are O(log n); the table is
    comfortable with millions of ranges.  A table is safe to share between
    threads: every call holds the table's own lock.

    Examples
    --------
    >>> t = RangeTable()
    >>> t.insert(0x1000, 0x2000, kind=RangeKind.RAM)
    >>> t.lookup(0x2fff).start == 0x1000
    True
    >>> hex(t.find_gap(0x1000, align=0x1000, lo=0, hi=0xffff, top_down=True))
    '0xf000'
    """

    def __cinit__(self):
        self.lock = _new_lock()
        if rt_init(&self.t) < 0:
            raise MemoryError("cannot allocate a range table")

    def __dealloc__(self):
        rt_destroy(&self.t)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)
            self.lock = NULL

    def __len__(self):
        return self.t.count

    def __bool__(self):
        return self.t.count != 0

    @property
    def total_nbytes(self):
        """Bytes covered by all ranges (may be 2**64)."""
        cdef uint64_t lo, hi
        _acquire(self.lock)
        lo = self.t.nbytes_lo
        hi = self.t.nbytes_hi
        _release(self.lock)
        return (<object>hi << 64) | lo

    def insert(self, start, nbytes, kind=_RangeKind.RAM, owner=0, flags=0):
        """Insert ``[start, start + nbytes)``.

        Raises
        ------
        AlreadyExists
            (EEXIST) the range meets a range already in the table.
        InvalidArgument
            (EINVAL) ``nbytes`` is not positive, or a bad kind or flags.
        Overflow
            (EOVERFLOW) the range runs past ``2**64 - 1``.

        Examples
        --------
        >>> from pydmabuf import RangeKind
        >>> r = RangeTable()
        >>> r.insert(0, 1 << 30, kind=RangeKind.RAM)
        >>> r.insert(0x3FFF_F000, 0x2000)
        Traceback (most recent call last):
            ...
        pydmabuf.errors.AlreadyExists: [EEXIST] ...
        """
        cdef uint64_t first, last
        cdef uint8_t k = _kind_arg(kind)
        cdef uint64_t o = _u64(owner, "owner")
        cdef uint32_t f = _flags_arg(flags)
        cdef int rc
        _window(start, nbytes, "insert", &first, &last)
        _acquire(self.lock)
        rc = rt_insert(&self.t, first, last, k, o, f)
        _release(self.lock)
        if rc < 0:
            _check(rc, lambda: self._insert_error(rc, first, last))

    cdef str _insert_error(self, int rc, uint64_t first, uint64_t last):
        if rc == -EEXIST:
            hit = self.overlapping(first, <object>last - first + 1)
            return f"[{first:#x}, {last:#x}] overlaps {hit[0]!r}" if hit else "overlap"
        return f"cannot insert [{first:#x}, {last:#x}]"

    def insert_many(self, starts, nbytes, kinds=None, owners=None, flags=None):
        """Insert many ranges from buffers, all or nothing.

        Parameters
        ----------
        starts, nbytes : buffers of u64, same length
            The ranges ``[starts[i], starts[i] + nbytes[i])``; any order.
        kinds, owners, flags : buffers of u64 or scalars, optional
            Per-range attributes (a scalar applies to every range).

        Raises
        ------
        AlreadyExists
            (EEXIST) two of the new ranges overlap, or one meets a range of
            the table.  Nothing is inserted.
        InvalidArgument, Overflow
            A zero length, or a range past ``2**64 - 1``.  Nothing is inserted.
        """
        cdef const uint64_t[::1] s = _as_u64_view(starts, "starts")
        cdef const uint64_t[::1] nb = _as_u64_view(nbytes, "nbytes")
        cdef uint64_t n = s.shape[0]
        cdef uint64_t i
        cdef _rt_item *items
        cdef int64_t rc
        cdef uint64_t last
        cdef const uint64_t[::1] kv, ov, fv
        cdef uint8_t k0 = 0
        cdef uint64_t o0 = 0
        cdef uint32_t f0 = 0
        cdef bint kb = False, ob = False, fb = False
        if <uint64_t>nb.shape[0] != n:
            raise ValueError(f"starts and nbytes differ in length ({n} != {nb.shape[0]})")
        if kinds is None:
            k0 = _RangeKind.RAM
        elif isinstance(kinds, int):
            k0 = _kind_arg(kinds)
        else:
            kv = _as_u64_view(kinds, "kinds")
            kb = True
            if <uint64_t>kv.shape[0] != n:
                raise ValueError("kinds differs in length from starts")
        if owners is not None:
            if isinstance(owners, int):
                o0 = _u64(owners, "owners")
            else:
                ov = _as_u64_view(owners, "owners")
                ob = True
                if <uint64_t>ov.shape[0] != n:
                    raise ValueError("owners differs in length from starts")
        if flags is not None:
            if isinstance(flags, int):
                f0 = _flags_arg(flags)
            else:
                fv = _as_u64_view(flags, "flags")
                fb = True
                if <uint64_t>fv.shape[0] != n:
                    raise ValueError("flags differs in length from starts")
        if n == 0:
            return
        items = <_rt_item *>malloc(n * sizeof(_rt_item))
        if items == NULL:
            raise MemoryError(f"cannot allocate {n} items")
        try:
            rc = 0
            with nogil:
                for i in range(n):
                    if nb[i] == 0:
                        rc = -EINVAL
                        break
                    if pdb_add_overflow(s[i], nb[i] - 1, &last):
                        rc = -EOVERFLOW
                        break
                    if kb and kv[i] > 255:
                        rc = -ERANGE
                        break
                    if fb and fv[i] > UINT32_MAX:
                        rc = -ERANGE
                        break
                    items[i].start = s[i]
                    items[i].last = last
                    items[i].kind = <uint8_t>kv[i] if kb else k0
                    items[i].owner = ov[i] if ob else o0
                    items[i].flags = <uint32_t>fv[i] if fb else f0
            if rc == -EINVAL:
                raise _errors.InvalidArgument(f"insert_many: nbytes[{i}] is 0")
            if rc == -EOVERFLOW:
                raise _errors.Overflow(
                    f"insert_many: range {i} [{s[i]:#x}, +{nb[i]:#x}) runs past 2**64 - 1")
            if rc == -ERANGE:
                raise _errors.InvalidArgument(f"insert_many: kind or flags of range {i} out of range")
            _acquire(self.lock)
            with nogil:
                rc = _rt_insert_items(&self.t, items, n)
            _release(self.lock)
            _check(rc, "insert_many: a new range overlaps another new range or one already in the table"
                   if rc == -EEXIST else "insert_many")
        finally:
            free(items)

    def erase(self, start, nbytes):
        """Remove every byte of ``[start, start + nbytes)`` from the table.

        Ranges straddling an edge of the window are trimmed, and one that
        covers the whole window is split in two; both keep their attributes.
        Returns the number of bytes removed (0 if the window was free).
        """
        cdef uint64_t first, last, lo, hi
        cdef int rc
        _window(start, nbytes, "erase", &first, &last)
        _acquire(self.lock)
        rc = rt_erase(&self.t, first, last, &lo, &hi)
        _release(self.lock)
        _check(rc, "erase")
        return (<object>hi << 64) | lo

    def remove(self, addr):
        """Remove the whole range holding ``addr`` and return it.

        Raises :class:`~pydmabuf.errors.NotFound` (ENOENT) if no range holds it.
        """
        cdef uint64_t a = _u64(addr, "addr")
        cdef rt_node out
        cdef int rc
        _acquire(self.lock)
        rc = rt_remove_at(&self.t, a, &out)
        _release(self.lock)
        _check(rc, lambda: f"no range holds {a:#x}")
        return _range_obj(&out)

    def remove_many(self, starts):
        """Remove the ranges that start exactly at each of ``starts`` (a
        sorted u64 buffer without repeats), all or nothing.

        Raises NotFound (ENOENT) if one of them is not a range's start."""
        _remove_many(self, starts)

    def clear(self):
        """Remove every range."""
        _acquire(self.lock)
        try:
            rt_destroy(&self.t)
            if rt_init(&self.t) < 0:
                raise MemoryError("cannot allocate a range table")
        finally:
            _release(self.lock)

    def lookup(self, addr):
        """The :class:`~pydmabuf.Range` holding ``addr``, or ``None``."""
        cdef uint64_t a = _u64(addr, "addr")
        cdef const rt_node *n
        cdef rt_node copy
        _acquire(self.lock)
        n = rt_lookup(&self.t, a)
        if n != NULL:
            copy = n[0]
        _release(self.lock)
        return _range_obj(&copy) if n != NULL else None

    def __contains__(self, addr):
        if not isinstance(addr, int) or addr < 0 or addr > _U64_MAX:
            return False
        cdef uint64_t a = addr
        _acquire(self.lock)
        try:
            return rt_lookup(&self.t, a) != NULL
        finally:
            _release(self.lock)

    def overlapping(self, start, nbytes):
        """The ranges meeting ``[start, start + nbytes)``, in address order."""
        cdef uint64_t first, last
        _window(start, nbytes, "overlapping", &first, &last)
        return self._collect(first, last)

    cdef list _collect(self, uint64_t first, uint64_t last):
        """Ranges meeting [first, last]: copied under the lock, built after."""
        cdef const rt_node *n
        cdef rt_node *buf = NULL
        cdef rt_node *grown
        cdef uint64_t cnt = 0, cap = 0, i
        _acquire(self.lock)
        n = rt_first_overlap(&self.t, first, last)
        while n != NULL and n.start <= last:
            if cnt == cap:
                cap = cap * 2 if cap else 16
                grown = <rt_node *>realloc(buf, cap * sizeof(rt_node))
                if grown == NULL:
                    _release(self.lock)
                    free(buf)
                    raise MemoryError()
                buf = grown
            buf[cnt] = n[0]
            cnt += 1
            n = rt_next(&self.t, n.start)
        _release(self.lock)
        try:
            return [_range_obj(&buf[i]) for i in range(cnt)]
        finally:
            free(buf)

    def next_after(self, addr):
        """The first range starting above ``addr``, or ``None``."""
        cdef uint64_t a = _u64(addr, "addr")
        cdef const rt_node *n
        cdef rt_node copy
        _acquire(self.lock)
        n = rt_next(&self.t, a)
        if n != NULL:
            copy = n[0]
        _release(self.lock)
        return _range_obj(&copy) if n != NULL else None

    def find_gap(self, nbytes, align=1, lo=0, hi=_U64_MAX, top_down=False):
        """Find ``nbytes`` free bytes aligned to ``align`` inside ``[lo, hi]``.

        Parameters
        ----------
        nbytes : int
            Size of the hole wanted, 1 .. 2**64.
        align : int
            Power of two the start must be a multiple of.
        lo, hi : int
            The window, both **inclusive** (so ``hi`` may be ``2**64 - 1``).
        top_down : bool
            Return the highest fitting start instead of the lowest.

        Returns
        -------
        int
            The start address of the hole.

        Raises
        ------
        NoSpace
            (ENOSPC) nothing fits.
        InvalidArgument
            (EINVAL) ``align`` is not a power of two or ``nbytes`` < 1.

        Examples
        --------
        >>> r = RangeTable()
        >>> r.insert(0, 1 << 30)
        >>> hex(r.find_gap(1 << 20, align=1 << 20))
        '0x40000000'
        >>> hex(r.find_gap(1 << 20, align=1 << 20, top_down=True))
        '0xfffffffffff00000'
        """
        cdef uint64_t l = _u64(lo, "lo")
        cdef uint64_t h = _u64(hi, "hi")
        cdef uint64_t a = _u64(align, "align")
        cdef uint64_t out = 0
        cdef uint64_t sizem1
        cdef int rc
        if not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an integer, not {type(nbytes).__name__}")
        if nbytes < 1:
            raise _errors.InvalidArgument(f"find_gap: nbytes must be positive (got {nbytes})")
        if nbytes > (<object>_U64_MAX) + 1:
            raise _errors.NoSpace(f"find_gap: {nbytes:#x} bytes cannot fit in 64 bits")
        if not _is_pow2(a):
            raise _errors.InvalidArgument(f"find_gap: align must be a power of two (got {align:#x})")
        sizem1 = <uint64_t>(nbytes - 1)
        _acquire(self.lock)
        rc = rt_find_gap(&self.t, sizem1, a, l, h, top_down, &out)
        _release(self.lock)
        _check(rc, lambda: f"no {nbytes:#x}-byte hole aligned to {a:#x} in [{l:#x}, {h:#x}]")
        return out

    def __iter__(self):
        """Iterate over the ranges in address order.

        The iterator holds no lock between steps: it resumes after the last
        range it returned, so ranges inserted or erased meanwhile are seen
        or not as their address falls.
        """
        cdef const rt_node *n
        cdef rt_node copy
        cdef uint64_t cursor = 0
        cdef bint first = True
        while True:
            _acquire(self.lock)
            if first:
                n = rt_first_overlap(&self.t, 0, _U64_MAX)
            else:
                n = rt_next(&self.t, cursor)
            if n != NULL:
                copy = n[0]
            _release(self.lock)
            if n == NULL:
                return
            cursor = copy.start
            first = False
            yield _range_obj(&copy)

    def as_array(self):
        """All ranges as a NumPy structured array (a copy), in address order.

        Fields: ``start``, ``last`` (inclusive), ``owner`` (u64), ``flags``
        (u32), ``kind`` (u8).
        """
        cdef _Buffer b
        cdef uint64_t i = 0
        cdef const rt_node *n
        cdef char *p
        while True:
            b = _new_buffer(len(self), 0, 32, b"T{Q:start:Q:last:Q:owner:I:flags:B:kind:3x}")
            _acquire(self.lock)
            if <uint64_t>b.shape[0] == self.t.count:
                break
            _release(self.lock)     # the table changed meanwhile: again
        try:
            p = b.data
            n = rt_first_overlap(&self.t, 0, _U64_MAX)
            while n != NULL:
                (<uint64_t *>(p + 32 * i))[0] = n.start
                (<uint64_t *>(p + 32 * i + 8))[0] = n.last
                (<uint64_t *>(p + 32 * i + 16))[0] = n.owner
                (<uint32_t *>(p + 32 * i + 24))[0] = n.flags
                (<uint8_t *>(p + 32 * i + 28))[0] = n.kind
                i += 1
                n = rt_next(&self.t, n.start)
        finally:
            _release(self.lock)
        return _np().asarray(b)

    def check(self):
        """Verify the tree's invariants (ordering, balance, augmentation).

        Raises AssertionError on a broken invariant; for tests.
        """
        cdef uint64_t count = 0
        cdef int64_t h
        _acquire(self.lock)
        try:
            h = _rt_check(self.t.nodes, self.t.root, &count)
        finally:
            _release(self.lock)
        if h < 0 or count != self.t.count:
            raise AssertionError("RangeTable invariants broken")
        return True

    def __repr__(self):
        return (f"<RangeTable {self.t.count} range{'s' if self.t.count != 1 else ''}, "
                f"{_fmt_size(self.total_nbytes)}>")


cdef int _rt_remove_starts(range_table *t, const uint64_t *starts, uint64_t n) noexcept nogil:
    """Remove the ranges that start exactly at each of starts[] (sorted,
    distinct): all or nothing, -ENOENT if one is not a range's start."""
    cdef uint64_t i
    cdef const rt_node *nd
    for i in range(n):
        nd = rt_lookup(t, starts[i])
        if nd == NULL or nd.start != starts[i]:
            return -ENOENT
    for i in range(n):
        _rt_unlink_start(t, starts[i])
    return 0


def _remove_many(RangeTable table not None, starts):
    """Remove the ranges starting exactly at ``starts`` (a sorted u64
    buffer without repeats), all or nothing; NotFound otherwise."""
    cdef const uint64_t[::1] s = _as_u64_view(starts, "starts")
    cdef uint64_t n = s.shape[0], i
    cdef int rc
    if n == 0:
        return
    for i in range(1, n):
        if s[i] <= s[i - 1]:
            raise ValueError("starts must be sorted and distinct")
    _acquire(table.lock)
    with nogil:
        rc = _rt_remove_starts(&table.t, &s[0], n)
    _release(table.lock)
    _check(rc, "remove_many: a start is not the start of a range")
