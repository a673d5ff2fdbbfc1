"""IOVA allocation and IO page-table benchmarks.

Every timed loop runs in the core (no Python per operation).  Each group
carries its reference in the same session: the tree allocator for the
IOVA caches, and for the page tables the C floor (``floor_pte``: one
8-byte store per page, compiled with the core's flags), whose best time
is measured by a fixture and reported as ``ratio_to_floor``.

Run: ``PYTHONPATH=src python -m pytest benchmarks/bench_iommu.py --benchmark-only``
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from benchutil import min_ns

from pydmabuf import IoPageTable, IovaDomain
from pydmabuf import _floors

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
NPAGES = 1 << 20  # 4 GiB of 4 KiB pages
LIM32 = (1 << 20) - 1
LIM64 = (1 << 36) - 1  # a 48-bit DMA mask, in 4 KiB pfns
ROUNDS = 1 << 16


def _ns(benchmark, per):
    return min_ns(benchmark, per)


@pytest.fixture(scope="module")
def pages():
    """2**20 distinct physical pages in random order, as addresses."""
    rng = np.random.default_rng(2024)
    pfns = rng.permutation(np.arange(1 << 22, (1 << 22) + NPAGES, dtype=np.uint64))
    return pfns, pfns << np.uint64(12)


@pytest.fixture(scope="module")
def floor_ns(pages):
    """Best time of the C floor over the same pages, ns per page."""
    pfns, _ = pages
    out = _floors.floor_buffer(NPAGES, 8)
    best = float("inf")
    for _ in range(15):
        t = time.perf_counter()
        _floors.floor_pte(pfns, out)
        best = min(best, time.perf_counter() - t)
    return best * 1e9 / NPAGES


# ------------------------------------------------------------ IOVA


@pytest.mark.benchmark(group="iova-roundtrip")
@pytest.mark.parametrize("path", ["fast", "tree"])
def test_iova_roundtrip(benchmark, path):
    """One 4 KiB buffer mapped and unmapped over and over: the rcache
    (alloc_fast/free_fast) against the tree (alloc/free)."""
    d = IovaDomain()
    # a populated tree, as on a busy system
    d.alloc_many(1, 4096, LIM64, fast=False)
    benchmark(d._roundtrips, ROUNDS, 1, LIM64, fast=(path == "fast"))
    benchmark.extra_info["ns_per_roundtrip"] = round(_ns(benchmark, ROUNDS), 2)


@pytest.mark.benchmark(group="iova-alloc-2^16")
@pytest.mark.parametrize("path", ["fast", "tree"])
def test_iova_alloc_many(benchmark, path):
    """2**16 allocations of 1..4 pages into a fresh domain."""
    sizes = (np.arange(ROUNDS, dtype=np.uint64) % 4) + 1
    doms = []

    def setup():
        doms.append(IovaDomain())
        return (doms[-1],), {}

    def run(d):
        got = d.alloc_many(sizes, ROUNDS, LIM64, fast=(path == "fast"))
        assert len(got) == ROUNDS

    benchmark.pedantic(run, setup=setup, rounds=10, iterations=1)
    benchmark.extra_info["ns_per_alloc"] = round(_ns(benchmark, ROUNDS), 2)


@pytest.mark.benchmark(group="iova-free-2^16")
@pytest.mark.parametrize("path", ["fast", "tree"])
def test_iova_free_many(benchmark, path):
    """Free 2**16 ranges: into the magazines (and depot) or the tree."""

    def setup():
        d = IovaDomain()
        return (d, d.alloc_many(1, ROUNDS, LIM64)), {}

    benchmark.pedantic(lambda d, p: d.free_many(p, 1, fast=(path == "fast")), setup=setup, rounds=10, iterations=1)
    benchmark.extra_info["ns_per_free"] = round(_ns(benchmark, ROUNDS), 2)


# ------------------------------------------------------------ page tables


@pytest.mark.benchmark(group="pgtable-map-4k")
def test_floor_pte(benchmark, pages, floor_ns):
    """The reference: one PTE store per page."""
    pfns, _ = pages
    out = _floors.floor_buffer(NPAGES, 8)
    benchmark(_floors.floor_pte, pfns, out)
    benchmark.extra_info["ns_per_page"] = round(_ns(benchmark, NPAGES), 3)


@pytest.mark.benchmark(group="pgtable-map-4k")
@pytest.mark.parametrize("mode", ["bulk", "per_call"])
def test_map_4k_pages(benchmark, pages, floor_ns, mode):
    """2**20 scattered 4 KiB pages linked at consecutive IOVAs (4 GiB):
    one bulk call, or one map call per page as a page-by-page walk does.
    Tables come from the page table's pool (unmapping between rounds)."""
    _, phys = pages
    t = IoPageTable()
    base = 1 << 40

    def setup():
        t.unmap(base, NPAGES * K4)
        return (), {}

    benchmark.pedantic(
        lambda: t.map_many(base, phys, K4, per_call=(mode == "per_call")), setup=setup, rounds=10, iterations=1
    )
    assert t.stats["mapped_nbytes"] == NPAGES * K4
    ns = _ns(benchmark, NPAGES)
    benchmark.extra_info["ns_per_page"] = round(ns, 3)
    benchmark.extra_info["floor_ns_per_page"] = round(floor_ns, 3)
    benchmark.extra_info["ratio_to_floor"] = round(ns / floor_ns, 2)


@pytest.mark.benchmark(group="pgtable-map-4k")
def test_map_4k_pages_fresh_tables(benchmark, pages, floor_ns):
    """The same bulk link into a new page table: table pages come from
    the host allocator (first-touch page faults included)."""
    _, phys = pages
    tables = []

    def setup():
        tables.append(IoPageTable())
        return (tables[-1],), {}

    benchmark.pedantic(lambda t: t.map_many(1 << 40, phys, K4), setup=setup, rounds=6, iterations=1)
    ns = _ns(benchmark, NPAGES)
    benchmark.extra_info["ns_per_page"] = round(ns, 3)
    benchmark.extra_info["ratio_to_floor"] = round(ns / floor_ns, 2)


@pytest.mark.benchmark(group="pgtable-map-2m")
@pytest.mark.parametrize("align", ["2M", "4K"])
def test_map_contiguous_4g(benchmark, floor_ns, align):
    """One physically contiguous 4 GiB range: 2M-aligned on both sides
    (2M leaves) or misaligned by a page (4K leaves), 512x apart in PTE
    writes."""
    t = IoPageTable()
    base = (1 << 40) + M2  # 2M-aligned, not 1G-aligned
    phys = 3 * M2 + (0 if align == "2M" else K4)

    def setup():
        t.unmap(base, NPAGES * K4)
        return (), {}

    benchmark.pedantic(lambda: t.map(base, phys, NPAGES * K4), setup=setup, rounds=10, iterations=1)
    leaves = t.leaves()
    assert len(leaves) == (NPAGES // 512 if align == "2M" else NPAGES)
    benchmark.extra_info["leaf_writes"] = len(leaves)
    benchmark.extra_info["ns_per_4k_page"] = round(_ns(benchmark, NPAGES), 4)
    benchmark.extra_info["ratio_to_floor"] = round(_ns(benchmark, NPAGES) / floor_ns, 3)


@pytest.mark.benchmark(group="pgtable-unmap")
def test_unmap_4g(benchmark, pages):
    """Unmap 4 GiB linked page by page in one call: four 1G steps, each
    clearing one table descriptor and freeing the 513 tables under it."""
    _, phys = pages
    t = IoPageTable()
    base = 1 << 40

    def setup():
        t.map_many(base, phys, K4)
        return (), {}

    benchmark.pedantic(lambda: t.unmap(base, NPAGES * K4), setup=setup, rounds=8, iterations=1)
    assert t.stats["leaf_clears"] == 0
    benchmark.extra_info["ns_per_page"] = round(_ns(benchmark, NPAGES), 3)
    benchmark.extra_info["table_clears_per_round"] = t.stats["table_clears"] // 8
