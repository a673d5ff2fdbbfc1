"""The mapping walks on 2**20 pages (4 GiB) of the default machine.

Groups (one per layout) hold: the scatterlist + IOMMU map
(``dma_map_sgtable`` of a prebuilt table), the list-free link of every
page into a reserved IOVA range (``IovaState.link_ranges``), the link of
the runs, the ranges -> DMA-only table helper, dma-direct, and the C floor
of one 8-byte PTE write per page (``floor_pte``), all on the same pages in
the same session.  Each benchmark times the map step only; the unmap runs
between rounds outside the timing.  ``extra_info``: ns per page and
PTE writes per page.

    pytest benchmarks/bench_dma.py --benchmark-only
"""

import numpy as np
import pytest

from pydmabuf import (IovaState, Machine, SgTable, dma_buf_free_sgt, dma_buf_phys_vec_to_sgt,
                      dma_map_sgtable, dma_unmap_sgtable, workloads)
from pydmabuf import _floors

from benchutil import min_ns, pedantic

NPAGES = 1 << 20
LAYOUTS = ["contiguous", "fragmented", "scattered", "thp"]


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, machine):
    r = machine.address_map.lookup(1 << 32)
    pfns, _ = workloads.layout(request.param, NPAGES, seed=1, limit_pfn=r.end >> 12)
    phys, lens = workloads.numpy_coalesce(pfns)
    pages = np.empty((NPAGES, 2), dtype=np.uint64)
    pages[:, 0] = pfns << np.uint64(12)
    pages[:, 1] = 4096
    runs = np.ascontiguousarray(np.stack([phys, lens], axis=1))
    return request.param, pfns, pages, runs


def _record(benchmark, dev=None, before=None):
    benchmark.extra_info["ns_per_page"] = min_ns(benchmark, NPAGES)
    if dev is not None and before is not None:
        dev.domain.flush()
        benchmark.extra_info["domain_pte_writes_total"] = dev.domain.stats["pte_writes"] - before


def test_sg_iommu_map(benchmark, machine, layout):
    name, pfns, pages, runs = layout
    benchmark.group = f"map-{name}"
    dev = machine.device("gpu0")
    before = dev.domain.stats["pte_writes"]
    pedantic(benchmark, lambda: (SgTable.from_pages(pfns),),
              lambda t: (dma_map_sgtable(dev, t, 0), t)[1], lambda t: dma_unmap_sgtable(dev, t, 0))
    _record(benchmark, dev, before)


def test_sg_direct_map(benchmark, machine, layout):
    name, pfns, pages, runs = layout
    benchmark.group = f"map-{name}"
    dev = machine.device("direct0")
    pedantic(benchmark, lambda: (SgTable.from_pages(pfns),),
              lambda t: (dma_map_sgtable(dev, t, 0), t)[1], lambda t: dma_unmap_sgtable(dev, t, 0))
    _record(benchmark)


@pytest.mark.parametrize("what", ["pages", "runs"])
def test_link(benchmark, machine, layout, what):
    name, pfns, pages, runs = layout
    benchmark.group = f"map-{name}"
    rows = pages if what == "pages" else runs
    dev = machine.device("gpu0")
    before = dev.domain.stats["pte_writes"]

    def link(st):
        n = st.link_ranges(rows, 0)
        st.sync(0, n)
        return st, n

    pedantic(benchmark, lambda: (IovaState.try_alloc(dev, 0, NPAGES * 4096),), link,
              lambda h: h[0].destroy(h[1], 0))
    _record(benchmark, dev, before)
    benchmark.extra_info["ranges"] = len(rows)


def test_ranges_to_table(benchmark, machine, layout):
    name, pfns, pages, runs = layout
    benchmark.group = f"map-{name}"
    dev = machine.device("gpu0")
    prov = machine.device("vfio0").p2p_provider(0)
    bar_pages = prov.bar.nbytes >> 12
    rows = runs.copy()
    rows[:, 0] = np.uint64(prov.bar.cpu_start) + (((runs[:, 0] >> np.uint64(12)) % np.uint64(bar_pages - 2048))
                                                  << np.uint64(12))
    pedantic(benchmark, lambda: (), lambda: dma_buf_phys_vec_to_sgt(dev, prov, rows), dma_buf_free_sgt)
    _record(benchmark)


def test_pte_floor(benchmark, layout):
    name, pfns, pages, runs = layout
    benchmark.group = f"map-{name}"
    out = _floors.floor_buffer(NPAGES, 8)
    benchmark(_floors.floor_pte, pfns, out)
    _record(benchmark)
