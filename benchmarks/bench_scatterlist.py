"""The scatterlist walk against its references, on 2**20 PFNs.

Each layout is one group: the core's ``SgTable.from_pages`` beside the
plain C loop compiled beside the core (``pydmabuf._floors.floor_coalesce``, the loop of
``shared/perf/sglimit.c``) and the NumPy code a user would write
(``workloads.numpy_coalesce``), on the same PFN array in the same run.
``extra_info['ns_per_page']`` holds the per-page cost.

    pytest benchmarks/bench_scatterlist.py --benchmark-only
"""

import pytest
from benchutil import min_ns

from pydmabuf import SgTable, workloads
from pydmabuf import _floors

NPAGES = 1 << 20
LAYOUTS = {"scattered": 1, "fragmented": 8, "contiguous": None}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    run = LAYOUTS[request.param]
    pfns = workloads.contiguous(NPAGES) if run is None else workloads.random_runs(NPAGES, run, seed=1)
    return request.param, pfns


def _record(benchmark, npages):
    benchmark.extra_info["npages"] = npages
    benchmark.extra_info["ns_per_page"] = min_ns(benchmark, npages)


def test_core_from_pages(benchmark, layout):
    name, pfns = layout
    benchmark.group = f"sg-walk-{name}"
    t = benchmark(SgTable.from_pages, pfns)
    _record(benchmark, NPAGES)
    benchmark.extra_info["segments"] = t.nents


def test_c_floor(benchmark, layout):
    name, pfns = layout
    benchmark.group = f"sg-walk-{name}"
    out = _floors.floor_buffer(NPAGES, 32)
    k = benchmark(_floors.floor_coalesce, pfns, 0xFFFFF000, out)
    _record(benchmark, NPAGES)
    benchmark.extra_info["segments"] = k


def test_numpy_coalesce(benchmark, layout):
    name, pfns = layout
    benchmark.group = f"sg-walk-{name}"
    phys, lens = benchmark(workloads.numpy_coalesce, pfns)
    _record(benchmark, NPAGES)
    benchmark.extra_info["segments"] = len(lens)


@pytest.mark.parametrize("npages", [16, 4096])
def test_core_from_pages_small(benchmark, npages):
    """Call overhead: small tables, where the fixed cost shows."""
    benchmark.group = "sg-walk-small"
    pfns = workloads.random_runs(npages, 8, seed=1)
    benchmark(SgTable.from_pages, pfns)
    _record(benchmark, npages)
