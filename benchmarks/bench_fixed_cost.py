"""The model's own cost per call (issue 17): the small operations tools
embed by the million, and the bulk round trips whose unmap half used to
cost more than the map.

Groups:

``fixed-sg-1page``
    ``dma_map_sgtable`` + ``dma_unmap_sgtable`` of a one-page table through
    gpu0's IOMMU.
``fixed-iova-1page``
    the list-free round trip: ``IovaState.try_alloc``, ``link_ranges`` of
    one page, ``sync``, ``destroy``.
``fixed-dmabuf-64K``
    static dma-buf attach + map + unmap + detach of a 64 KiB system-heap
    buffer (the checker's bookkeeping on, as always).
``fixed-from-pages-16``
    ``SgTable.from_pages`` of 16 scattered PFNs.
``bulk-roundtrip-256K-pages``
    2**18 scattered pages: list-free link + sync + destroy, and
    ``dma_map_sgtable`` + unmap of the same pages, repeated on one table
    (a map reuses what the table's last layout pass found) and with a
    buffer view taken before each map (the layout pass runs, as on a
    table's first map); beside them the C floor
    of one 8-byte PTE write per page (``floor_pte``), the store a plain C
    loop would do.

References, in ``extra_info``, measured in the same test on the same
machine: ``rlock_pair_ns`` (a ``threading.RLock`` acquire + release pair,
the unit the issue counts Python-level bookkeeping in) for the small
operations and ``floor_ns_per_page`` with ``ratio_vs_floor`` for the bulk
ones; ``ratio_vs_rlock`` is ns per operation over that pair.  The figures of
the release this work started from (cda97ad) are measured, not hard-coded:
with ``PYDMABUF_REF_SRC`` naming the ``src`` directory of that release
built in place, a worker process of ``ab_release.py`` times the same
workloads on it at the start of the module, and each case records
``ref_release``, ``ref_ns`` and ``speedup_vs_ref`` (reference / this build).
``ab_release.py --old ... --new ...`` is the alternating A/B of the same
paths, the way the issue's checks measure.

    pytest benchmarks/bench_fixed_cost.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import os
import threading
import timeit
from typing import Any

import numpy as np
import pytest
from benchutil import min_ns

from pydmabuf import DmaDirection, IovaState, SgTable, dma_map_sgtable, dma_unmap_sgtable, workloads
from pydmabuf import _floors
from pydmabuf.exporters import SystemHeap

BIDI = DmaDirection.BIDIRECTIONAL
LOOP = 200
BULK_PAGES = 1 << 18


REF_RELEASE = "cda97ad"


@pytest.fixture(scope="module")
def release_ref() -> dict[str, Any]:
    """The reference release's ns per op (per page for bulk) of every path,
    timed now in a worker process on the build ``PYDMABUF_REF_SRC`` names;
    empty when it is not set."""
    src = os.environ.get("PYDMABUF_REF_SRC")
    if not src:
        return {}
    from ab_release import PATHS, run_worker

    return run_worker(src, set(PATHS), 5)


def _vs_ref(benchmark, ref, path, ns):
    if path in ref:
        benchmark.extra_info["ref_release"] = REF_RELEASE
        benchmark.extra_info["ref_ns"] = round(ref[path], 2)
        benchmark.extra_info["speedup_vs_ref"] = round(ref[path] / ns, 2)


@pytest.fixture(scope="module")
def rlock_pair_ns():
    lk = threading.RLock()
    acquire, release = lk.acquire, lk.release

    def run():
        for _ in range(10000):
            acquire()
            release()

    return min(timeit.repeat(run, number=1, repeat=7)) / 10000 * 1e9


def _small(benchmark, fn, rlock_ns, loops=LOOP, ref=None, path=""):
    def loop():
        for _ in range(loops):
            fn()

    benchmark(loop)
    ns = min_ns(benchmark, loops)
    benchmark.extra_info["ns_per_op"] = round(ns, 1)
    benchmark.extra_info["rlock_pair_ns"] = round(rlock_ns, 1)
    benchmark.extra_info["ratio_vs_rlock"] = round(ns / rlock_ns, 2)
    _vs_ref(benchmark, ref or {}, path, ns)


def test_sg_map_unmap_one_page(benchmark, machine, rlock_pair_ns, release_ref):
    benchmark.group = "fixed-sg-1page"
    dev = machine.device("gpu0")
    buf = SystemHeap(machine).allocate(4096, layout="fragmented", seed=1)
    table = SgTable.from_pages(buf.exporter.pfns)

    def rt():
        dma_map_sgtable(dev, table, BIDI)
        dma_unmap_sgtable(dev, table, BIDI)

    _small(benchmark, rt, rlock_pair_ns, ref=release_ref, path="sg1")
    assert table.mapping is None
    buf.put()


def test_iova_round_trip_one_page(benchmark, machine, rlock_pair_ns, release_ref):
    benchmark.group = "fixed-iova-1page"
    dev = machine.device("gpu0")
    buf = SystemHeap(machine).allocate(4096, layout="fragmented", seed=1)
    phys = int(buf.exporter.pfns[0]) << 12
    rows = np.array([[phys, 4096]], dtype=np.uint64)

    def rt():
        st = IovaState.try_alloc(dev, phys, 4096)
        st.link_ranges(rows, BIDI)
        st.sync()
        st.destroy(4096, BIDI)

    _small(benchmark, rt, rlock_pair_ns, ref=release_ref, path="iova1")
    buf.put()


def test_static_dmabuf_round_trip_64k(benchmark, machine, rlock_pair_ns, release_ref):
    benchmark.group = "fixed-dmabuf-64K"
    dev = machine.device("gpu0")
    buf = SystemHeap(machine).allocate(16 * 4096, layout="fragmented", seed=1)

    def rt():
        a = buf.attach(dev)
        t = a.map_unlocked(BIDI)
        a.unmap_unlocked(t, BIDI)
        buf.detach(a)

    _small(benchmark, rt, rlock_pair_ns, loops=50, ref=release_ref, path="dmabuf64k")
    assert not buf.attachments
    buf.put()


def test_from_pages_16(benchmark, machine, rlock_pair_ns, release_ref):
    benchmark.group = "fixed-from-pages-16"
    buf = SystemHeap(machine).allocate(16 * 4096, layout="fragmented", seed=1)
    pfns = np.ascontiguousarray(buf.exporter.pfns)
    _small(benchmark, lambda: SgTable.from_pages(pfns), rlock_pair_ns, loops=1000, ref=release_ref, path="from_pages16")
    buf.put()


@pytest.fixture(scope="module")
def scattered(machine):
    r = machine.address_map.lookup(1 << 32)
    pfns, _ = workloads.layout("scattered", BULK_PAGES, seed=1, limit_pfn=r.end >> 12)
    pages = np.empty((BULK_PAGES, 2), dtype=np.uint64)
    pages[:, 0] = pfns << np.uint64(12)
    pages[:, 1] = 4096
    out = _floors.floor_buffer(BULK_PAGES, 8)
    floor = min(timeit.repeat(lambda: _floors.floor_pte(pfns, out), number=1, repeat=7)) / BULK_PAGES * 1e9
    return pfns, pages, floor


def _bulk(benchmark, fn, floor, ref=None, path=""):
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    ns = min_ns(benchmark, BULK_PAGES)
    benchmark.extra_info["ns_per_page"] = round(ns, 2)
    benchmark.extra_info["floor_ns_per_page"] = round(floor, 3)
    benchmark.extra_info["ratio_vs_floor"] = round(ns / floor, 2)
    _vs_ref(benchmark, ref or {}, path, ns)


def test_bulk_link_destroy(benchmark, machine, scattered, release_ref):
    benchmark.group = "bulk-roundtrip-256K-pages"
    pfns, pages, floor = scattered
    dev = machine.device("gpu0")

    def rt():
        st = IovaState.try_alloc(dev, 0, BULK_PAGES * 4096)
        n = st.link_ranges(pages, BIDI)
        st.sync(0, n)
        st.destroy(n, BIDI)

    _bulk(benchmark, rt, floor, ref=release_ref, path="bulk_iova")


def test_bulk_sg_map_unmap(benchmark, machine, scattered, release_ref):
    benchmark.group = "bulk-roundtrip-256K-pages"
    pfns, pages, floor = scattered
    dev = machine.device("gpu0")
    table = SgTable.from_pages(pfns)

    def rt():
        dma_map_sgtable(dev, table, BIDI)
        dma_unmap_sgtable(dev, table, BIDI)

    _bulk(benchmark, rt, floor, ref=release_ref, path="bulk_sg")
    assert table.mapping is None


def test_bulk_sg_first_map_unmap(benchmark, machine, scattered, release_ref):
    """The same with a buffer view of the entries taken before each map: a
    map that cannot reuse the table's last layout pass (what a table's
    first map costs)."""
    benchmark.group = "bulk-roundtrip-256K-pages"
    pfns, pages, floor = scattered
    dev = machine.device("gpu0")
    table = SgTable.from_pages(pfns)

    def rt():
        memoryview(table).release()
        dma_map_sgtable(dev, table, BIDI)
        dma_unmap_sgtable(dev, table, BIDI)

    _bulk(benchmark, rt, floor, ref=release_ref, path="bulk_sg_first")
    assert table.mapping is None
