"""Range tables: bulk insert, point lookups, gap searches, bulk removal.

Each group holds the core's call and the reference a Python user would
write for the same result on the same data, in the same session:

* ``rangetable-insert-2^18``: ``insert_many`` of 2**18 ranges given in
  random order, against NumPy (argsort by start, check neighbours do not
  overlap) -- the reference builds only the sorted arrays, no tree;
* ``rangetable-lookup``: 10,000 ``lookup`` calls in a table of 2**18
  ranges, against ``bisect`` on a sorted list of starts (both one Python
  call per address);
* ``rangetable-find-gap``: the highest 2 MiB-aligned hole of 1 MiB below
  a limit in a fragmented table, against NumPy over the sorted arrays;
* ``rangetable-remove-2^16``: ``remove_many`` of a quarter of the ranges,
  against a NumPy mask.

``extra_info``: ns per range (or per lookup).

    pytest benchmarks/bench_rangetable.py --benchmark-only
"""

import bisect

import numpy as np
import pytest

from pydmabuf import RangeTable

N = 1 << 18
K = 10_000


@pytest.fixture(scope="module")
def ranges():
    """2**18 ranges of 4-64 KiB with holes between them, in random order."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 17, N, dtype=np.uint64) << np.uint64(12)
    gaps = rng.integers(1, 9, N, dtype=np.uint64) << np.uint64(12)
    starts = np.cumsum(sizes + gaps, dtype=np.uint64) - sizes
    order = rng.permutation(N)
    return np.ascontiguousarray(starts[order]), np.ascontiguousarray(sizes[order])


@pytest.fixture(scope="module")
def table(ranges):
    t = RangeTable()
    t.insert_many(*ranges)
    return t


def _per(benchmark, n):
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_item"] = benchmark.stats.stats.min * 1e9 / n


@pytest.mark.benchmark(group="rangetable-insert-2^18")
def test_insert_many(benchmark, ranges):
    starts, sizes = ranges

    def build():
        t = RangeTable()
        t.insert_many(starts, sizes)
        return t

    t = benchmark(build)
    assert len(t) == N
    _per(benchmark, N)


@pytest.mark.benchmark(group="rangetable-insert-2^18")
def test_insert_numpy_reference(benchmark, ranges):
    starts, sizes = ranges

    def build():
        o = np.argsort(starts, kind="stable")
        s, n = starts[o], sizes[o]
        if (s[1:] < s[:-1] + n[:-1]).any():
            raise ValueError("overlap")
        return s, n

    s, _ = benchmark(build)
    assert len(s) == N
    _per(benchmark, N)


@pytest.fixture(scope="module")
def probes(ranges):
    starts, sizes = ranges
    rng = np.random.default_rng(2)
    i = rng.integers(0, N, K)
    return [int(x) for x in starts[i] + sizes[i] // np.uint64(2)]


@pytest.mark.benchmark(group="rangetable-lookup")
def test_lookup(benchmark, table, probes):
    lookup = table.lookup

    def run():
        hits = 0
        for a in probes:
            if lookup(a) is not None:
                hits += 1
        return hits

    assert benchmark(run) == K
    _per(benchmark, K)


@pytest.mark.benchmark(group="rangetable-lookup")
def test_lookup_bisect_reference(benchmark, ranges, probes):
    starts, sizes = ranges
    o = np.argsort(starts)
    s = starts[o].tolist()
    e = (starts[o] + sizes[o]).tolist()

    def run():
        hits = 0
        for a in probes:
            i = bisect.bisect_right(s, a) - 1
            if i >= 0 and a < e[i]:
                hits += 1
        return hits

    assert benchmark(run) == K
    _per(benchmark, K)


LIMIT = 1 << 40


@pytest.mark.benchmark(group="rangetable-find-gap")
def test_find_gap(benchmark, table):
    got = benchmark(table.find_gap, 1 << 20, align=1 << 21, hi=LIMIT - 1, top_down=True)
    assert got % (1 << 21) == 0


@pytest.mark.benchmark(group="rangetable-find-gap")
def test_find_gap_numpy_reference(benchmark, ranges, table):
    starts, sizes = ranges
    o = np.argsort(starts)
    s, e = starts[o], starts[o] + sizes[o]
    size, align = np.uint64(1 << 20), np.uint64(1 << 21)

    def run():
        # Holes between ranges and above the last one, top down.
        lo = np.concatenate([np.zeros(1, np.uint64), e])
        hi = np.concatenate([s, np.array([LIMIT], np.uint64)])
        cand = (hi - size) // align * align
        ok = (hi >= size) & (cand >= lo) & (cand + size <= hi)
        idx = np.flatnonzero(ok)
        return int(cand[idx[-1]])

    got = benchmark(run)
    assert got == table.find_gap(1 << 20, align=1 << 21, hi=LIMIT - 1, top_down=True)


@pytest.mark.benchmark(group="rangetable-remove-2^16")
def test_remove_many(benchmark, ranges):
    starts, sizes = ranges
    victims = np.sort(starts[: N // 4])  # remove_many takes sorted starts

    def setup():
        t = RangeTable()
        t.insert_many(starts, sizes)
        return (t,), {}

    benchmark.pedantic(lambda t: t.remove_many(victims), setup=setup, rounds=5, iterations=1)
    _per(benchmark, N // 4)


@pytest.mark.benchmark(group="rangetable-remove-2^16")
def test_remove_numpy_reference(benchmark, ranges):
    starts, sizes = ranges
    victims = starts[: N // 4]

    def run():
        keep = ~np.isin(starts, victims)
        return starts[keep], sizes[keep]

    s, _ = benchmark(run)
    assert len(s) == N - N // 4
    _per(benchmark, N // 4)
