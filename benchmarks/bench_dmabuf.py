"""The dma-buf layer: round trips and 1 GiB maps through each path.

``dmabuf-roundtrip-<size>``: attach + map + unmap + detach of a system-heap
buffer by a static and by a dynamic importer, beside the reference a
driver without dma-buf would run on the same pages: ``dma_map_sgtable`` +
``dma_unmap_sgtable`` of the same prebuilt table.  The ratio is what the
dma-buf layer (reservation lock, exporter callbacks, checker bookkeeping)
costs on top of the mapping itself.

``dmabuf-map-1G-<layout>``: the map step of a 1 GiB buffer (2**18 pages)
through each path the seed thread argues about: the exporter's
scatterlist mapped by ``dma_map_sgtable`` (``Attachment.map``); the
exporter's physical ranges turned into a DMA-only table by
``dma_buf_phys_vec_to_sgt``; the ranges mapped by the importer itself with
the list-free IOVA API (``Attachment.phys_vec`` + ``IovaState``); and the C
floor of one 8-byte PTE write per page.  The ranges come from a
BAR exporter written against the public API (as a VFIO exporter of
several slices would hand them out) with the same run lengths as the
scatterlist's pages, so every path maps the same shape.  Only the map step
is timed; the unmap runs between rounds.

    pytest benchmarks/bench_dmabuf.py --benchmark-only --benchmark-group-by=group
"""

import numpy as np
import pytest

from pydmabuf import (DmaAttrs, DmaDirection, Exporter, ImporterOps, IovaState, Machine, SgTable, _core,
                      dma_buf_free_sgt, dma_buf_phys_vec_to_sgt, dma_map_sgtable, dma_unmap_sgtable,
                      export, workloads)
from pydmabuf import _floors
from pydmabuf.dmabuf import PHYS_NAMESPACE, PhysVec
from pydmabuf.exporters import SystemHeap

from benchutil import min_ns, pedantic

BIDI = DmaDirection.BIDIRECTIONAL
GIB_PAGES = 1 << 18
ROUNDTRIP_PAGES = [16, 4096]  # 64 KiB, 16 MiB


class Importer(ImporterOps):
    """A well-behaved dynamic importer that maps ranges itself."""

    allow_peer2peer = True
    import_namespaces = frozenset({PHYS_NAMESPACE})

    def invalidate_mappings(self, attachment):
        pass


class BarSlices(Exporter):
    """A P2P exporter handing out slices of a PCI BAR as physical ranges
    (the shape of VFIO's multi-range export); DMA-only tables."""

    name = "bar-slices"

    def __init__(self, provider, rows):
        self.provider = provider
        self.rows = rows

    def map_dma_buf(self, attachment, direction):
        return dma_buf_phys_vec_to_sgt(attachment, self.provider, self.rows, None, direction)

    def unmap_dma_buf(self, attachment, table, direction):
        dma_buf_free_sgt(table, direction)

    def release(self, dmabuf):
        pass

    def get_phys_vec(self, attachment):
        return PhysVec(self.rows, self.provider)


def _per_page(benchmark, npages):
    benchmark.extra_info["ns_per_page"] = min_ns(benchmark, npages)


# ------------------------------------------------------------ round trips


@pytest.fixture(scope="module", params=ROUNDTRIP_PAGES, ids=lambda n: f"{n * 4}K")
def rt_buffer(request, machine):
    buf = SystemHeap(machine).allocate(request.param * 4096, layout="fragmented", seed=1)
    yield request.param, buf
    buf.put()


def test_roundtrip_plain(benchmark, machine, rt_buffer):
    npages, buf = rt_buffer
    benchmark.group = f"dmabuf-roundtrip-{npages * 4}K"
    dev = machine.device("gpu0")
    table = SgTable.from_pages(buf.exporter.pfns)

    def rt():
        dma_map_sgtable(dev, table, BIDI)
        dma_unmap_sgtable(dev, table, BIDI)

    benchmark(rt)
    _per_page(benchmark, npages)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_roundtrip_dmabuf(benchmark, machine, rt_buffer, dynamic):
    npages, buf = rt_buffer
    benchmark.group = f"dmabuf-roundtrip-{npages * 4}K"
    dev = machine.device("gpu0")
    ops = Importer() if dynamic else None

    def rt():
        a = buf.dynamic_attach(dev, ops) if dynamic else buf.attach(dev)
        t = a.map_unlocked(BIDI)
        a.unmap_unlocked(t, BIDI)
        buf.detach(a)

    benchmark(rt)
    _per_page(benchmark, npages)
    assert not buf.attachments


# ------------------------------------------------------------ 1 GiB maps


@pytest.fixture(scope="module", params=["contiguous", "fragmented", "thp"])
def gib(request, machine):
    """A 1 GiB heap buffer and a BAR exporter with ranges of the same run
    lengths."""
    heap = SystemHeap(machine).allocate(GIB_PAGES * 4096, layout=request.param, seed=1)
    phys, lens = workloads.numpy_coalesce(heap.exporter.pfns)
    prov = machine.device("vfio0").p2p_provider(0)
    span = (prov.bar.nbytes >> 12) - (int(lens.max()) >> 12)
    rows = np.empty((len(lens), 2), dtype=np.uint64)
    rows[:, 0] = np.uint64(prov.bar.cpu_start) + (((phys >> np.uint64(12)) % np.uint64(span)) << np.uint64(12))
    rows[:, 1] = lens
    bar = export(BarSlices(prov, rows), int(lens.sum()), name="bar-slices")
    yield request.param, heap, bar, rows
    heap.put()
    bar.put()


def test_map_1g_scatterlist(benchmark, machine, gib):
    layout, heap, bar, rows = gib
    benchmark.group = f"dmabuf-map-1G-{layout}"
    a = heap.attach(machine.device("gpu0"))
    pedantic(benchmark, lambda: (), lambda: a.map_unlocked(BIDI), lambda t: a.unmap_unlocked(t, BIDI))
    heap.detach(a)
    _per_page(benchmark, GIB_PAGES)
    benchmark.extra_info["ranges"] = len(rows)


def test_map_1g_ranges_to_table(benchmark, machine, gib):
    layout, heap, bar, rows = gib
    benchmark.group = f"dmabuf-map-1G-{layout}"
    a = bar.dynamic_attach(machine.device("gpu0"), Importer())
    pedantic(benchmark, lambda: (), lambda: a.map_unlocked(BIDI), lambda t: a.unmap_unlocked(t, BIDI))
    bar.detach(a)
    _per_page(benchmark, GIB_PAGES)


def test_map_1g_importer_links(benchmark, machine, gib):
    layout, heap, bar, rows = gib
    benchmark.group = f"dmabuf-map-1G-{layout}"
    dev = machine.device("gpu0")
    a = bar.dynamic_attach(dev, Importer())

    def link():
        with bar.resv:
            pv = a.phys_vec()
        st = IovaState.try_alloc(dev, 0, GIB_PAGES * 4096)
        n = st.link_ranges(pv.ranges, BIDI, DmaAttrs.MMIO)
        st.sync(0, n)
        return st, n

    pedantic(benchmark, lambda: (), link, lambda h: h[0].destroy(h[1], BIDI, DmaAttrs.MMIO))
    bar.detach(a)
    _per_page(benchmark, GIB_PAGES)


def test_map_1g_pte_floor(benchmark, gib):
    layout, heap, bar, rows = gib
    benchmark.group = f"dmabuf-map-1G-{layout}"
    out = _floors.floor_buffer(GIB_PAGES, 8)
    benchmark(_floors.floor_pte, heap.exporter.pfns, out)
    _per_page(benchmark, GIB_PAGES)
