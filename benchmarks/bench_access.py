"""One small access through the access gate (docs/access-gate.md), per path,
against the harness's raw read of the same bytes in the same run.

The gate runs the registered state checks, the path's translation (for a
device behind an IOMMU: the IOTLB lookup and, on a miss, the page-table
walk), the lease and the address-map checks, then copies.  These cases
time that fixed cost for an 8-byte access (groups ``access-small-*``) and
the per-page part for 64 KiB through the IOMMU (``access-64K-iommu``).
``extra_info``: ns per access and the ratio to ``PhysMemory.read`` of the
same bytes (no rule checked: what the gate adds), min of several timeit
repeats on both sides.

    PYTHONPATH=src python -m pytest benchmarks/bench_access.py --benchmark-only
"""

from __future__ import annotations

import timeit

import pytest
from benchutil import min_ns

from pydmabuf import DmaDirection, Machine
from pydmabuf.dma import dma_map_phys
from pydmabuf.exporters import SystemHeap

LOOP = 200
PHYS = 0x1_0000_0000
BIDI = DmaDirection.BIDIRECTIONAL


def ns_per_op(fn, loops=LOOP, repeat=7):
    return min(timeit.repeat(fn, number=1, repeat=repeat)) / loops * 1e9


def looped(fn):
    def run():
        for _ in range(LOOP):
            fn()

    return run


@pytest.fixture(scope="module")
def setup():
    m = Machine.default()
    m.memory.write(PHYS, bytes(range(256)) * 256)
    gpu = m.device("gpu0")  # behind the default machine's lazy (DMA-FQ) IOMMU domain
    iova = dma_map_phys(gpu, PHYS, 1 << 16, BIDI)
    return m, gpu, iova


def _case(benchmark, setup, what, nbytes):
    m, gpu, iova = setup
    direct = m.device("direct0")
    want = m.memory.read(PHYS, nbytes)
    if what == "iommu-read":
        fn = lambda: gpu.dma_read(iova, nbytes)  # noqa: E731
    elif what == "iommu-write":
        data = want
        fn = lambda: gpu.dma_write(iova, data)  # noqa: E731
    elif what == "direct-read":
        fn = lambda: direct.dma_read(PHYS, nbytes)  # noqa: E731
    else:
        raise AssertionError(what)
    if what.endswith("read"):
        assert fn() == want  # the bytes the mapping reaches
    else:
        fn()
        assert m.memory.read(PHYS, nbytes) == want
    if what.startswith("iommu"):
        st = gpu.iommu_group.iommu.iotlb.stats
        hits = st["hits"]
        fn()
        assert st["hits"] == hits + (nbytes + 4095) // 4096  # a warm IOTLB: every page hits
    run = looped(fn)
    benchmark(run)
    benchmark.extra_info["ns_per_op"] = round(min_ns(benchmark, LOOP, "mean"), 1)
    ref = looped(lambda: m.memory.read(PHYS, nbytes))
    mine, base = ns_per_op(run), ns_per_op(ref)
    benchmark.extra_info["ref_ns_per_op"] = round(base, 1)
    benchmark.extra_info["ratio_vs_raw_read"] = round(mine / base, 2)


@pytest.mark.benchmark(group="access-small-iommu-read")
def test_small_read_through_the_iommu(benchmark, setup):
    _case(benchmark, setup, "iommu-read", 8)


@pytest.mark.benchmark(group="access-small-iommu-write")
def test_small_write_through_the_iommu(benchmark, setup):
    _case(benchmark, setup, "iommu-write", 8)


@pytest.mark.benchmark(group="access-small-direct-read")
def test_small_read_through_dma_direct(benchmark, setup):
    _case(benchmark, setup, "direct-read", 8)


@pytest.mark.benchmark(group="access-64K-iommu")
def test_64k_read_through_the_iommu(benchmark, setup):
    _case(benchmark, setup, "iommu-read", 1 << 16)


@pytest.mark.benchmark(group="access-small-cpu-mmap")
def test_small_cpu_read_through_an_mmap(benchmark, setup):
    m = setup[0]
    buf = SystemHeap(m).allocate(1 << 16)
    with buf.mmap() as c:
        c.write(0, b"12345678")
        assert c.read(0, 8) == b"12345678"
        run = looped(lambda: c.read(0, 8))
        benchmark(run)
        benchmark.extra_info["ns_per_op"] = round(min_ns(benchmark, LOOP, "mean"), 1)
    buf.put()
