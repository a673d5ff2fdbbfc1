"""The IOVA allocator (drivers/iommu/iova.c).

``RefIova`` below is a slow model that follows the kernel's code literally,
node by node: the downward walk from the cached node with ``rb_prev``, the
retry from ``iova_find_limit()``, ``max32_alloc_size``, the cached-node
updates, ``reserve_iova()``'s scan, and the magazines and depots of the
rcache.  The core finds the same placement with a gap search; Hypothesis
compares the two on random sequences of calls.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pydmabuf
from pydmabuf import IovaDomain, errors

from kernel_rc import kernel_rc

U64 = (1 << 64) - 1
MAG = 127
BINS = 6
D32 = 1 << 20  # dma_32bit_pfn for a 4 KiB granule
LIM32 = D32 - 1  # DMA_BIT_MASK(32) >> 12


def fls(x: int) -> int:
    return x.bit_length()


def order_base_2(x: int) -> int:
    return (x - 1).bit_length() if x > 1 else 0


# --------------------------------------------------------------- reference


class Node:
    __slots__ = ("lo", "hi", "kind", "cached")

    def __init__(self, lo: int, hi: int, kind: str) -> None:
        self.lo, self.hi, self.kind, self.cached = lo, hi, kind, False


class RefIova:
    """iova.c, literally, on a sorted list of nodes."""

    def __init__(self, granule=4096, start_pfn=1, ncpus=1, find_limit_above=False):
        self.shift = granule.bit_length() - 1
        self.start_pfn = start_pfn
        self.ncpus = ncpus
        self.d32 = 1 << (32 - self.shift)
        self.max32 = self.d32
        self.anchor = Node(U64, U64, "anchor")
        self.nodes = [self.anchor]
        self.cached = self.cached32 = self.anchor
        self.loaded = [[[] for _ in range(ncpus)] for _ in range(BINS)]
        self.prev = [[[] for _ in range(ncpus)] for _ in range(BINS)]
        self.depot: list[list[list[int]]] = [[] for _ in range(BINS)]
        # iova_find_limit() returns the node straddling the limit or the
        # lowest one above it depending on the tree's shape; both must give
        # the same placement.
        self.find_limit_above = find_limit_above

    # tree helpers
    def _index(self, node):
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise AssertionError("node not in tree")

    def _rb_prev(self, node):
        i = self._index(node)
        return self.nodes[i - 1] if i > 0 else None

    def _rb_next(self, node):
        i = self._index(node)
        return self.nodes[i + 1] if i + 1 < len(self.nodes) else None

    def _insert(self, node):
        i = 0
        while i < len(self.nodes) and self.nodes[i].lo < node.lo:
            i += 1
        self.nodes.insert(i, node)

    def _find(self, pfn):
        for n in self.nodes:
            if n.lo <= pfn <= n.hi:
                return n
        return None

    def _find_limit(self, limit):
        if limit > self.d32:
            return self.anchor
        for n in self.nodes:
            if self.find_limit_above:
                if n.lo >= limit:
                    return n
            elif n.hi >= limit:
                return n
        raise AssertionError("the anchor is always above")

    def _delete_update(self, free):
        c32 = self.cached32
        nxt = self._rb_next(free)
        if free is c32 or (free.hi < self.d32 and free.lo >= c32.lo):
            self.cached32 = nxt
        if free.lo < self.d32:
            self.max32 = self.d32
        if free.lo >= self.cached.lo:
            self.cached = nxt

    def _remove(self, node):
        self._delete_update(node)
        self.nodes.remove(node)

    def _alloc_and_insert(self, size, limit, aligned):
        align_mask = U64
        if aligned:
            align_mask = (U64 << fls(size - 1)) & U64
        high, low = limit, self.start_pfn
        if limit <= self.d32 and size >= self.max32:
            return None
        curr = self.cached32 if limit <= self.d32 else self.cached
        retry_pfn = curr.hi
        retried = False
        while True:
            while True:
                high = min(high, curr.lo)
                new = ((high - size) & U64) & align_mask
                curr = self._rb_prev(curr)
                if not (curr is not None and new <= curr.hi and new >= low):
                    break
            if high < size or new < low:
                if low == self.start_pfn and retry_pfn < limit and not retried:
                    retried = True
                    high, low = limit, retry_pfn + 1
                    curr = self._find_limit(limit)
                    continue
                self.max32 = size
                return None
            break
        node = Node(new, new + size - 1, "alloc")
        self._insert(node)
        if node.hi < self.d32:
            self.cached32 = node
        else:
            self.cached = node
        return node

    # the API, with the core's checks
    def alloc(self, size, limit_pfn, aligned=True):
        if size == 0 or limit_pfn == U64:
            return -errno.EINVAL
        node = self._alloc_and_insert(size, limit_pfn + 1, aligned)
        return node.lo if node else -errno.ENOMEM

    def free(self, pfn):
        n = self._find(pfn)
        if n is None or n.kind != "alloc" or n.cached:
            return -errno.ENOENT
        self._remove(n)
        return 0

    def reserve(self, lo, hi):
        if lo > hi or (lo | hi) > (U64 >> self.shift) or hi == U64:
            return -errno.EINVAL
        overlap = False
        for node in list(self.nodes):
            if lo <= node.hi and hi >= node.lo:
                if lo < node.lo:
                    node.lo = lo
                if hi > node.hi:
                    lo = node.hi + 1
                if lo >= node.lo and hi <= node.hi:
                    return 0
                overlap = True
            elif overlap:
                break
        self._insert(Node(lo, hi, "reserved"))
        return 0

    @staticmethod
    def _mag_pop(mag, limit):
        i = len(mag) - 1
        while mag[i] > limit:
            if i == 0:
                return 0
            i -= 1
        pfn = mag[i]
        mag[i] = mag[-1]
        mag.pop()
        return pfn

    def _free_mag(self, mag):
        for pfn in mag:
            n = self._find(pfn)
            if n is not None and n.kind == "alloc":
                self._remove(n)
        mag.clear()

    def _rcache_get(self, size, limit, cpu):
        b = order_base_2(size)
        if b >= BINS or limit < size:
            return 0
        if not self.loaded[b][cpu]:
            if self.prev[b][cpu]:
                self.loaded[b][cpu], self.prev[b][cpu] = self.prev[b][cpu], self.loaded[b][cpu]
            elif self.depot[b]:
                self.loaded[b][cpu] = self.depot[b].pop()
            else:
                return 0
        return self._mag_pop(self.loaded[b][cpu], limit - size)

    def alloc_fast(self, size, limit_pfn, flush=True, cpu=0):
        if size == 0 or limit_pfn == U64:
            return -errno.EINVAL
        if size < 32:
            size = 1 << order_base_2(size)
        if order_base_2(size) < BINS:
            pfn = self._rcache_get(size, limit_pfn + 1, cpu)
            if pfn:
                self._find(pfn).cached = False
                return pfn
        r = self.alloc(size, limit_pfn, True)
        if r == -errno.ENOMEM and flush:
            self.flush_rcache()
            r = self.alloc(size, limit_pfn, True)
        return r

    def free_fast(self, pfn, size, cpu=0):
        n = self._find(pfn)
        if size == 0:
            return -errno.EINVAL
        if n is None or n.kind != "alloc" or n.cached:
            return -errno.ENOENT
        b = order_base_2(size)
        if b < BINS and n.hi - pfn < (1 << b) - 1:
            return -errno.EINVAL
        if b >= BINS:
            return self.free(pfn)
        if len(self.loaded[b][cpu]) == MAG:
            if len(self.prev[b][cpu]) < MAG:
                self.loaded[b][cpu], self.prev[b][cpu] = self.prev[b][cpu], self.loaded[b][cpu]
            else:
                self.depot[b].append(self.loaded[b][cpu])
                self.loaded[b][cpu] = []
        self.loaded[b][cpu].append(pfn)
        n.cached = True
        return 0

    def free_cpu_cached(self, cpu):
        for b in range(BINS):
            self._free_mag(self.loaded[b][cpu])
            self._free_mag(self.prev[b][cpu])

    def flush_rcache(self):
        for cpu in range(self.ncpus):
            self.free_cpu_cached(cpu)
        for b in range(BINS):
            while self.depot[b]:
                self._free_mag(self.depot[b].pop())

    def reclaim_depot(self, runs=None):
        freed = 0
        for b in range(BINS):
            k = 0
            while len(self.depot[b]) > self.ncpus and (runs is None or k < runs):
                self._free_mag(self.depot[b].pop())
                k += 1
                freed += 1
        return freed

    # observations
    def ranges(self):
        return [
            (n.lo, n.hi, 2 if n.kind == "reserved" else int(n.cached))
            for n in self.nodes
            if n.kind != "anchor"
        ]

    def rcache_state(self, cpu):
        return [(list(self.loaded[b][cpu]), list(self.prev[b][cpu]), len(self.depot[b])) for b in range(BINS)]


def same_state(core: IovaDomain, ref: RefIova) -> None:
    assert [tuple(r) for r in core.ranges(with_state=True).tolist()] == ref.ranges()
    assert core.cached_nodes == (ref.cached.lo, ref.cached32.lo)
    assert core.stats["max32_alloc_size"] == ref.max32
    for cpu in range(ref.ncpus):
        assert core.rcache_state(cpu) == ref.rcache_state(cpu)
    core.check()


# --------------------------------------------------------- worked examples


def test_first_allocations_grow_down_from_the_limit():
    # 1 -> 0xFFFFF, 1 -> 0xFFFFE, 3 (rounded to 4,
    # aligned to 4) -> 0xFFFF8, leaving 0xFFFFC..0xFFFFD free.
    d = IovaDomain()
    assert d.alloc_fast(1, LIM32) == 0xFFFFF
    assert d.alloc_fast(1, LIM32) == 0xFFFFE
    assert d.alloc_fast(3, LIM32) == 0xFFFF8
    assert d.ranges().tolist() == [[0xFFFF8, 0xFFFFB], [0xFFFFE, 0xFFFFE], [0xFFFFF, 0xFFFFF]]
    assert d.find(0xFFFFC) is None and d.find(0xFFFFD) is None
    assert d.stats["live_pages"] == 6


def test_size_33_is_not_rounded_but_aligned_to_64():
    d = IovaDomain()
    pfn = d.alloc_fast(33, LIM32)
    assert pfn % 64 == 0
    assert d.find(pfn) == (pfn, pfn + 32)
    assert pfn == (D32 - 33) & ~63


def test_tree_alloc_without_size_alignment_packs():
    d = IovaDomain()
    assert d.alloc(3, LIM32, size_aligned=False) == D32 - 3
    assert d.alloc(3, LIM32, size_aligned=False) == D32 - 6
    assert d.alloc(3, LIM32) == (D32 - 6 - 3) & ~3


def test_free_then_alloc_comes_from_the_rcache():
    d = IovaDomain()
    pfn = d.alloc_fast(1, LIM32)
    before = d.stats
    d.free_fast(pfn, 1)
    assert d.find(pfn) == (pfn, pfn)  # still in the tree, cached
    assert d.ranges(with_state=True).tolist() == [[pfn, pfn, 1]]
    assert d.alloc_fast(1, LIM32) == pfn
    after = d.stats
    assert after["tree_allocs"] == before["tree_allocs"] and after["tree_frees"] == 0
    assert after["rcache_hits"] == 1
    assert d.ranges(with_state=True).tolist() == [[pfn, pfn, 0]]


def test_magazines_fill_swap_and_spill_to_the_depot():
    # 127 frees fill `loaded`; the 128th swaps it with the empty
    # `prev`; the 255th finds both full and pushes one to the depot.
    d = IovaDomain()
    pfns = [d.alloc_fast(1, LIM32) for _ in range(300)]
    for k, pfn in enumerate(pfns[:255], 1):
        d.free_fast(pfn, 1)
        loaded, prev, depot = d.rcache_state()[0]
        if k <= 127:
            assert (len(loaded), len(prev), depot) == (k, 0, 0)
        elif k <= 254:
            assert (len(loaded), len(prev), depot) == (k - 127, 127, 0)
        else:
            assert (len(loaded), len(prev), depot) == (1, 127, 1)
    assert d.stats["depot_pushes"] == 1 and d.stats["cached_ranges"] == 255
    d.check()


def test_rcache_pops_the_newest_pfn_below_the_limit():
    d = IovaDomain()
    hi = d.alloc_fast(1, LIM32)
    lo = d.alloc_fast(1, 0x7FFF)
    d.free_fast(lo, 1)
    d.free_fast(hi, 1)
    # The top of the magazine (hi) is above 0x7FFF: the pop scans down.
    assert d.alloc_fast(1, 0x7FFF) == lo
    assert d.rcache_state()[0][0] == [hi]
    misses = d.stats["rcache_misses"]
    assert d.alloc_fast(1, 0x7FFF) != hi  # a miss falls back to the tree
    assert d.stats["rcache_misses"] == misses + 1


def test_depot_magazine_replaces_an_empty_loaded_one():
    d = IovaDomain()
    pfns = [d.alloc_fast(2, LIM32) for _ in range(255)]
    for p in pfns:
        d.free_fast(p, 2)
    assert d.rcache_state()[1][2] == 1
    for _ in range(128):  # empty loaded (1) and prev (127)
        d.alloc_fast(2, LIM32)
    assert d.rcache_state()[1] == ([], [], 1)
    d.alloc_fast(2, LIM32)
    loaded, prev, depot = d.rcache_state()[1]
    assert (len(loaded), len(prev), depot) == (126, 0, 0)


def test_reclaim_depot_keeps_one_magazine_per_cpu():
    d = IovaDomain(ncpus=1)
    pfns = [d.alloc_fast(1, LIM32) for _ in range(127 * 5)]
    for p in pfns:
        d.free_fast(p, 1)
    assert d.stats["depot_magazines"] == 3
    assert d.reclaim_depot(runs=1) == 1
    assert d.stats["depot_magazines"] == 2
    assert d.reclaim_depot() == 1
    assert d.stats["depot_magazines"] == 1
    assert d.reclaim_depot() == 0
    assert d.stats["cached_ranges"] == 127 * 3
    assert d.stats["live_ranges"] == 0
    d.check()


def test_flush_rcache_retry_finds_cached_space():
    # A 64-pfn space: fill it with size-1 ranges, cache them all, then ask
    # for 8 pfns.
    d = IovaDomain(start_pfn=D32 - 64)
    pfns = [d.alloc_fast(1, LIM32) for _ in range(64)]
    with pytest.raises(errors.OutOfMemory):
        d.alloc_fast(1, LIM32)
    for p in pfns:
        d.free_fast(p, 1)
    with pytest.raises(errors.OutOfMemory):
        d.alloc_fast(8, LIM32, flush_rcache=False)
    assert d.stats["cached_ranges"] == 64
    assert d.alloc_fast(8, LIM32) == D32 - 8
    # the first failure above flushed too (an empty cache)
    assert d.stats["cached_ranges"] == 0 and d.stats["rcache_flushes"] == 2


def test_32bit_exhaustion_fails_fast_until_a_low_free():
    # On a domain whose 32-bit space is 64 pfns.
    d = IovaDomain(start_pfn=D32 - 64)
    got = [d.alloc(16, LIM32) for _ in range(4)]
    assert sorted(got) == [D32 - 64, D32 - 48, D32 - 32, D32 - 16]
    with pytest.raises(errors.OutOfMemory):
        d.alloc(16, LIM32)
    assert d.stats["max32_alloc_size"] == 16
    fails = d.stats["tree_fast_fails"]
    with pytest.raises(errors.OutOfMemory):
        d.alloc(20, LIM32)  # >= 16: refused without a walk
    assert d.stats["tree_fast_fails"] == fails + 1
    with pytest.raises(errors.OutOfMemory):
        d.alloc(8, LIM32)  # smaller: walks, fails, lowers the mark
    assert d.stats["max32_alloc_size"] == 8
    # 64-bit limits are not fast-failed
    assert d.alloc(16, D32 + 100) >= D32
    d.free(got[0])
    assert d.stats["max32_alloc_size"] == D32
    assert d.alloc(16, LIM32) == got[0]


def test_failed_64bit_allocation_also_sets_max32():
    # The kernel records the failing size whatever the limit was.
    d = IovaDomain(start_pfn=D32 + 100)
    with pytest.raises(errors.OutOfMemory):
        d.alloc(8, D32 + 103)
    assert d.stats["max32_alloc_size"] == 8


def test_retry_above_the_cached_node():
    # The cached node sits below free space: the first pass finds nothing
    # under it, the retry searches above it.
    d = IovaDomain(start_pfn=D32 - 64)
    first = d.alloc(1, D32 - 33)
    assert first == D32 - 33 and d.cached_nodes[1] == first
    assert d.alloc(32, LIM32) == D32 - 32
    ref = RefIova(start_pfn=D32 - 64)
    assert ref.alloc(1, D32 - 33) == first and ref.alloc(32, LIM32) == D32 - 32


def test_pfn_zero_is_never_handed_out():
    with pytest.raises(errors.InvalidArgument):
        IovaDomain(start_pfn=0)
    d = IovaDomain(start_pfn=1)
    assert sorted(d.alloc(1, 7) for _ in range(7)) == list(range(1, 8))
    with pytest.raises(errors.OutOfMemory):
        d.alloc(1, 7)
    d2 = IovaDomain()
    with pytest.raises(errors.OutOfMemory):
        d2.alloc(8, 7)  # 8 aligned pfns below 8 would start at 0


def test_reserve_stretches_nodes_it_overlaps():
    d = IovaDomain()
    top = d.alloc(1, LIM32)
    d.reserve(0xFFFF0, 0xFFFFF)
    # The allocated node grew down over the reservation, as in the kernel.
    assert d.ranges(with_state=True).tolist() == [[0xFFFF0, 0xFFFFF, 0]]
    assert d.cached_nodes[1] == 0xFFFF0
    d.reserve(0xFFFF4, 0xFFFF8)  # inside: nothing new
    assert len(d) == 1
    d.free(top)
    assert len(d) == 0


def test_reserve_fills_gaps_and_adds_the_rest_above():
    d = IovaDomain()
    d.reserve(10, 12)
    d.reserve(20, 22)
    d.reserve(5, 30)
    assert d.ranges(with_state=True).tolist() == [[5, 12, 2], [13, 22, 2], [23, 30, 2]]
    assert d.stats["reserved_pages"] == 26
    d.check()


def test_reserved_ranges_steer_allocations():
    d = IovaDomain()
    d.reserve(0xFEE00, 0xFEEFF)  # an MSI window
    d.reserve(0xFFF00, 0xFFFFF)
    assert d.alloc(256, LIM32) == 0xFFE00  # highest 256-aligned fit below the window
    assert d.alloc(0x1000, LIM32) == 0xFD000  # 0xFE000 would cover the MSI window
    ref = RefIova()
    ref.reserve(0xFEE00, 0xFEEFF)
    ref.reserve(0xFFF00, 0xFFFFF)
    assert (ref.alloc(256, LIM32), ref.alloc(0x1000, LIM32)) == (0xFFE00, 0xFD000)


def test_errors():
    d = IovaDomain()
    with pytest.raises(errors.InvalidArgument):
        d.alloc(0, LIM32)
    with pytest.raises(errors.InvalidArgument):
        d.alloc(1, U64)
    with pytest.raises(errors.InvalidArgument):
        d.reserve(5, 4)
    with pytest.raises(errors.InvalidArgument):
        d.reserve(0, 1 << 60)  # beyond 2**64 >> 12
    with pytest.raises(errors.NotFound):
        d.free(123)
    d.reserve(100, 200)
    with pytest.raises(errors.NotFound):
        d.free(150)  # reserved
    p = d.alloc(3, LIM32)
    with pytest.raises(errors.InvalidArgument):
        d.free_fast(p, 3)  # a 3-pfn range cannot sit in the 4-pfn bin
    d.free_fast(p, 2)  # bin of 2 fits inside
    with pytest.raises(errors.NotFound):
        d.free(p)  # already in a magazine
    with pytest.raises(errors.NotFound):
        d.free_fast(p, 2)
    with pytest.raises(errors.InvalidArgument):
        d.alloc_fast(1, LIM32, cpu=1)
    with pytest.raises(TypeError):
        d.alloc("1", LIM32)
    with pytest.raises(errors.InvalidArgument):
        IovaDomain(granule=3000)
    with pytest.raises(errors.InvalidArgument):
        IovaDomain(ncpus=0)
    assert d.find(U64) is None  # the anchor is hidden
    assert isinstance(pydmabuf.errors.OutOfMemory("x"), OSError)


def test_large_sizes_bypass_the_rcache():
    d = IovaDomain()
    p = d.alloc_fast(64, LIM32)
    d.free_fast(p, 64)
    assert d.find(p) is None and d.stats["rcache_inserts"] == 0


def test_granule_shifts_the_32bit_boundary():
    d = IovaDomain(granule=512)
    assert d.stats["dma_32bit_pfn"] == 1 << 23
    assert d.alloc(1, (1 << 23) - 1) == (1 << 23) - 1


def test_ranges_find_len_repr():
    d = IovaDomain(ncpus=2)
    assert d.ranges().shape == (0, 2) and d.ranges().dtype == np.uint64
    p = d.alloc(4, LIM32)
    assert d.find(p + 3) == (p, p + 3) and d.find(p + 4) is None
    assert len(d) == 1
    r = repr(d)
    assert "1 live range" in r and "16 KiB" in r and "2 cpus" in r


def test_placement_of_many_ranges_matches_the_reference():
    d, ref = IovaDomain(), RefIova()
    for size in [1, 2, 3, 5, 8, 13, 21, 34, 1, 1, 2] * 8:
        assert d.alloc(size, LIM32) == ref.alloc(size, LIM32)
    for pfn in [r[0] for r in ref.ranges()][::3]:
        assert d.free(pfn) is None and ref.free(pfn) == 0
    for size in [4, 1, 7, 2, 16]:
        assert d.alloc(size, LIM32) == ref.alloc(size, LIM32)
    same_state(d, ref)


# ------------------------------------------------------------- Hypothesis


def limits(start_pfn):
    """Limits that make the allocator work: near the 32-bit boundary, just
    above it, low, and the whole 52-bit space."""
    bands = [
        st.integers(max(start_pfn, D32), D32 + 160),
        st.integers(start_pfn, start_pfn + 200),
        st.just((1 << 52) - 1),
    ]
    if start_pfn < D32:
        bands.append(st.integers(max(start_pfn, D32 - 160), D32 - 1))
    return st.one_of(bands)


SIZES = st.one_of(st.integers(1, 8), st.integers(9, 70))


class IovaMachine(RuleBasedStateMachine):
    @initialize(
        start=st.sampled_from([1, 3, D32 - 150, D32 + 20]),
        ncpus=st.integers(1, 2),
        above=st.booleans(),
    )
    def setup(self, start, ncpus, above):
        self.core = IovaDomain(start_pfn=start, ncpus=ncpus)
        self.ref = RefIova(start_pfn=start, ncpus=ncpus, find_limit_above=above)
        self.start = start

    @rule(data=st.data(), size=SIZES, aligned=st.booleans())
    def alloc(self, data, size, aligned):
        lim = data.draw(limits(self.start))
        assert kernel_rc(self.core.alloc, size, lim, aligned) == self.ref.alloc(size, lim, aligned)

    @rule(data=st.data(), size=SIZES, flush=st.booleans())
    def alloc_fast(self, data, size, flush):
        lim = data.draw(limits(self.start))
        cpu = data.draw(st.integers(0, self.ref.ncpus - 1))
        assert kernel_rc(self.core.alloc_fast, size, lim, flush, cpu) == self.ref.alloc_fast(size, lim, flush, cpu)

    @precondition(lambda self: len(self.ref.nodes) > 1)
    @rule(data=st.data())
    def free(self, data):
        node = data.draw(st.sampled_from(self.ref.nodes[:-1]))
        pfn = data.draw(st.integers(node.lo, node.hi))
        assert kernel_rc(self.core.free, pfn) == self.ref.free(pfn)

    @precondition(lambda self: len(self.ref.nodes) > 1)
    @rule(data=st.data())
    def free_fast(self, data):
        node = data.draw(st.sampled_from(self.ref.nodes[:-1]))
        size = data.draw(st.integers(1, max(1, node.hi - node.lo + 1)))
        cpu = data.draw(st.integers(0, self.ref.ncpus - 1))
        assert kernel_rc(self.core.free_fast, node.lo, size, cpu) == self.ref.free_fast(node.lo, size, cpu)

    @rule(data=st.data(), length=st.integers(0, 40))
    def reserve(self, data, length):
        lo = max(0, data.draw(limits(self.start)) - length)
        assert kernel_rc(self.core.reserve, lo, lo + length) == self.ref.reserve(lo, lo + length)

    @rule()
    def flush_rcache(self):
        self.core.flush_rcache()
        self.ref.flush_rcache()

    @rule(runs=st.one_of(st.none(), st.integers(1, 2)))
    def reclaim(self, runs):
        assert self.core.reclaim_depot(runs) == self.ref.reclaim_depot(runs)

    @rule(data=st.data())
    def free_cpu_cached(self, data):
        cpu = data.draw(st.integers(0, self.ref.ncpus - 1))
        self.core.free_cpu_cached(cpu)
        self.ref.free_cpu_cached(cpu)

    @invariant()
    def agree(self):
        same_state(self.core, self.ref)

    @invariant()
    def no_overlap(self):
        r = self.core.ranges()
        assert (r[:, 0] <= r[:, 1]).all()
        assert (r[1:, 0] > r[:-1, 1]).all()


TestIovaMachine = IovaMachine.TestCase
TestIovaMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "free"]), st.integers(1, 40), st.booleans()),
        max_size=60,
    )
)
def test_tight_space_placement_matches_the_reference(ops):
    """A 96-pfn space under the 32-bit boundary: allocations collide,
    fragment, fail and set max32_alloc_size."""
    d, ref = IovaDomain(start_pfn=D32 - 96), RefIova(start_pfn=D32 - 96)
    for op, size, aligned in ops:
        if op == "alloc":
            assert kernel_rc(d.alloc, size, LIM32, aligned) == ref.alloc(size, LIM32, aligned)
        elif len(ref.nodes) > 1:
            node = ref.nodes[size % (len(ref.nodes) - 1)]
            assert kernel_rc(d.free, node.lo) == ref.free(node.lo)
    same_state(d, ref)


def test_many_ranges_scale():
    """2**16 allocations: the tree stays consistent and frees reuse space."""
    d = IovaDomain()
    pfns = [d.alloc_fast(1 + (i % 4), (1 << 40) - 1) for i in range(1 << 16)]
    assert len(set(pfns)) == len(pfns)
    assert d.stats["live_ranges"] == 1 << 16
    for p, i in zip(pfns, range(1 << 16)):
        if i % 2:
            d.free_fast(p, 1 + (i % 4))
    d.check()
    assert d.stats["live_ranges"] == 1 << 15


def test_alloc_many_matches_single_calls_and_stops_when_full():
    a, b = IovaDomain(start_pfn=D32 - 64), IovaDomain(start_pfn=D32 - 64)
    sizes = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.uint64)
    got = a.alloc_many(sizes, len(sizes), LIM32)
    want = []
    for s in sizes.tolist():
        try:
            want.append(b.alloc_fast(s, LIM32))
        except errors.OutOfMemory:
            break
    assert got.tolist() == want and len(want) < len(sizes)  # stopped at the first failure
    same = a.ranges(with_state=True) == b.ranges(with_state=True)
    assert same.all()
    tree = IovaDomain().alloc_many(3, 4, LIM32, fast=False, size_aligned=False)
    assert tree.tolist() == [D32 - 3, D32 - 6, D32 - 9, D32 - 12]  # 4 ranges of 3


def test_free_many_is_all_or_nothing():
    d = IovaDomain()
    pfns = d.alloc_many(2, 8, LIM32)
    before = d.ranges(with_state=True)
    for bad, exc in (
        ([pfns[0], pfns[0]], errors.NotFound),  # twice
        ([pfns[0], 12345], errors.NotFound),  # unknown
        ([pfns[0], pfns[1] + 1], errors.InvalidArgument),  # one pfn left < the 2-pfn bin
    ):
        with pytest.raises(exc):
            d.free_many(np.array(bad, dtype=np.uint64), 2)
        assert (d.ranges(with_state=True) == before).all()
    with pytest.raises(errors.NotFound):
        d.free_many(np.array([pfns[0], pfns[0] + 1], dtype=np.uint64), fast=False)  # same range
    with pytest.raises(errors.InvalidArgument):
        d.free_many(pfns, 4)  # the 4-pfn bin does not fit 2-pfn ranges
    d.free_many(pfns[:4], 2)
    assert d.stats["cached_ranges"] == 4
    d.free_many(pfns[4:], fast=False)
    assert d.stats["live_ranges"] == 0 and d.stats["cached_ranges"] == 4
    with pytest.raises(ValueError):
        d.free_many(pfns, [1, 2])


def test_roundtrips_recycle_one_range():
    d = IovaDomain()
    assert d._roundtrips(1000, 1, LIM32) == 1000
    s = d.stats
    assert s["tree_allocs"] == 1 and s["rcache_hits"] == 999 and s["cached_ranges"] == 1
    d2 = IovaDomain()
    d2._roundtrips(1000, 1, LIM32, fast=False)
    assert d2.stats["tree_allocs"] == 1000 and len(d2) == 0


def test_alloc_many_count_beyond_the_space_returns_what_fits():
    # 2**40 ranges cannot fit below pfn 0xFFF: the walk stops at the first
    # failure, so the call returns the ranges that fit without sizing its
    # result for the count asked.
    d = IovaDomain(start_pfn=0x800)
    got = d.alloc_many(1, 2**40, 0xFFF)
    assert len(got) == 0x800 and sorted(got.tolist()) == list(range(0x800, 0x1000))
    assert len(d.alloc_many(4, 2**63, 0xFFF, fast=False)) == 0  # nothing left
    d.check()
