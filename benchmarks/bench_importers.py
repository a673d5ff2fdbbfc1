"""The importers' mapping paths on the default machine.

NVMe (groups ``nvme-<size>``, requests of 1, 32 and 256 pages and one of
1 GiB, pages laid out ``fragmented``): a whole request (map + unmap) on
nvme0 behind the IOMMU by

* ``iova``: the list-free walker's IOVA path (one link per merged vec, one
  sync, one IOVA range);
* ``sg``: the scatterlist path of the same pages (``SgTable.from_pages`` +
  ``dma_map_sgtable``), the reference;
* ``fallback``: the walker when every seam is 512 bytes off a granule (each
  page's bvec starts 0x200 in): one ``dma_map_phys`` per vec;
* ``sg-fallback-req``: the scatterlist path of that same request.

RDMA (group ``rdma-fault-1GiB``): the page fault that maps a 1 GiB MR again
after an invalidation, against the exporter's map + unmap of the same
buffer for the same NIC (the reference: what any re-map costs at least).

``extra_info``: ns per page (of the request or buffer) and the metadata
each path keeps.

    pytest benchmarks/bench_importers.py --benchmark-only
"""

import numpy as np
import pytest

from pydmabuf import Machine, SgTable, dma_map_sgtable, dma_unmap_sgtable, workloads
from pydmabuf.exporters import SystemHeap
from pydmabuf.importers import NvmeQueue, RdmaMr

G = 4096
SIZES = {"1p": 1, "32p": 32, "256p": 256, "1GiB": 1 << 18}


@pytest.fixture(scope="module", params=list(SIZES))
def request_pages(request, machine):
    n = SIZES[request.param]
    r = machine.address_map.lookup(1 << 32)
    pfns, _ = workloads.layout("fragmented", n, seed=7, limit_pfn=r.end >> 12)
    pfns = pfns + np.uint64(r.start >> 12)
    return request.param, np.ascontiguousarray(pfns)


def _record(benchmark, npages, metadata=None):
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test
        return
    benchmark.extra_info["ns_per_page"] = benchmark.stats.stats.min * 1e9 / npages
    if metadata is not None:
        benchmark.extra_info["metadata_bytes"] = metadata


def _rounds(npages):
    return 5 if npages >= 1 << 16 else 200


def _unaligned(pfns):
    """The request's bvecs, each starting 0x200 into its page: every seam
    is off a granule."""
    bv = NvmeQueue.bvecs_from_pages(pfns)
    bv[:, 0] += np.uint64(0x200)
    bv[:, 1] -= np.uint64(0x200)
    return bv


def _bench_request(benchmark, machine, request_pages, make_bvecs, sg, path=None):
    """Time map + unmap of one request on nvme0; the metadata of the mapping
    goes to extra_info."""
    name, pfns = request_pages
    if make_bvecs is _unaligned and len(pfns) == 1:
        pytest.skip("one bvec has no seam: a 1-page request always takes the IOVA path")
    benchmark.group = f"nvme-{name}"
    q = NvmeQueue(machine.device("nvme0"))
    if make_bvecs is None:
        mapf, unmapf = (lambda: q.map_pages_sg(pfns, write=True)), q.unmap_sg
    else:
        bvecs = make_bvecs(pfns)
        mapf = (lambda: q.map_sg(bvecs, write=True)) if sg else (lambda: q.map(bvecs, write=True))
        unmapf = q.unmap_sg if sg else q.unmap
    probe = mapf()
    assert path is None or probe.path == path
    meta = probe.metadata_nbytes
    unmapf(probe)
    benchmark.pedantic(lambda: unmapf(mapf()), rounds=_rounds(len(pfns)), iterations=1, warmup_rounds=1)
    _record(benchmark, len(pfns), meta)


def test_nvme_iova(benchmark, machine, request_pages):
    _bench_request(benchmark, machine, request_pages, NvmeQueue.bvecs_from_pages, False, "iova")


def test_nvme_sg(benchmark, machine, request_pages):
    _bench_request(benchmark, machine, request_pages, None, True)


def test_nvme_fallback(benchmark, machine, request_pages):
    _bench_request(benchmark, machine, request_pages, _unaligned, False, "direct")


def test_nvme_sg_fallback_request(benchmark, machine, request_pages):
    _bench_request(benchmark, machine, request_pages, _unaligned, True)


# --------------------------------------------------------------------- RDMA

NPAGES_MR = 1 << 18


@pytest.fixture(scope="module")
def mr_buffer(machine):
    b = SystemHeap(machine).allocate(NPAGES_MR * G, layout="fragmented", seed=3, movable=True)
    yield b
    b.put()


def test_rdma_fault_after_invalidate(benchmark, machine, mr_buffer):
    benchmark.group = "rdma-fault-1GiB"
    b = mr_buffer
    mr = RdmaMr.register(machine.device("nic0"), b, 0, NPAGES_MR * G)

    def invalidate():
        b.resv.lock()
        try:
            b.invalidate_mappings()
        finally:
            b.resv.unlock()
        return (), {}

    benchmark.pedantic(mr.fault, setup=invalidate, rounds=5, iterations=1, warmup_rounds=1)
    assert mr.translation_valid and mr.faults == mr.zaps + 1  # every round re-faulted
    mr.dereg()
    _record(benchmark, NPAGES_MR)


def test_rdma_ref_exporter_map_unmap(benchmark, machine, mr_buffer):
    benchmark.group = "rdma-fault-1GiB"
    b = mr_buffer
    a = b.attach(machine.device("nic0"))

    def once():
        a.unmap_unlocked(a.map_unlocked())

    benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
    b.detach(a)
    _record(benchmark, NPAGES_MR)


def test_rdma_ref_table_only(benchmark, machine, mr_buffer):
    """The floor under both: build and map the table, unmap it."""
    benchmark.group = "rdma-fault-1GiB"
    dev = machine.device("nic0")
    pfns = mr_buffer.exporter.pfns

    def once():
        t = SgTable.from_pages(pfns)
        dma_map_sgtable(dev, t, 0)
        dma_unmap_sgtable(dev, t, 0)

    benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, NPAGES_MR)
