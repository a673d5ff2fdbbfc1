"""The dma-buf drivers: iommufd mapping and revoking a 1 GiB VFIO dma-buf
area, and KVM faulting a dma-buf memslot in page by page.

Groups:

* ``iommufd-map-1g-aligned``: ``IommufdIoas.map_file`` of a 1 GiB slice
  of vfio0's BAR (1 GiB aligned), at an IOVA the IOAS picks (2 MiB
  aligned: 512 2M leaves) and at a fixed 1 GiB-aligned IOVA (one 1G
  leaf), beside the plain two-step link of the same physical range
  (``IovaState.try_alloc`` + ``link`` + ``sync``) into a DMA domain.
* ``iommufd-map-1g-4k``: the same with the slice starting one page into
  the BAR, so every leaf is 4 KiB (262144 PTEs), beside the same link.
* ``iommufd-revoke-1g-4k``: VFIO turning memory decode off with that area
  mapped (the whole 7.1 revoke: invalidate, iommufd unmapping the area
  from its page table under the lock, fence and unmap waits), beside
  ``IovaState.unlink`` of the same linked range (a strict unmap).
* ``kvm-first-touch``: ``KvmVm.pre_fault_memory`` over a 1 GiB dma-buf
  slot (one fault per 4 KiB page: get_pfn under the lock, one
  second-stage write per page), beside ``IoPageTable.map_many`` writing
  the same 262144 entries into an empty table.
* ``kvm-touch-per-access``: a guest reading one byte of every page of a
  64 MiB slot, one access each (16384 faults), beside the same accesses
  once the pages are present.

``extra_info["ns_per_page"]`` for each.

    pytest benchmarks/bench_drivers.py --benchmark-only
"""

import numpy as np
import pytest

from pydmabuf import DmaDirection, IoPageTable, IommuProt, IovaState, Machine
from pydmabuf.dma import DmaAttrs
from pydmabuf.exporters import VfioPciBar
from pydmabuf.importers import IommufdIoas, KvmVm
from pydmabuf.importers.iommufd import (IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE,
                                        IOMMU_IOAS_MAP_WRITEABLE)
from pydmabuf.importers.kvm import KVM_MEM_VFIO_DMABUF

from benchutil import min_ns, pedantic

G = 4096
GIB = 1 << 30
NPAGES = GIB // G
BIDI = DmaDirection.BIDIRECTIONAL
FIXED_RW = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE


def _record(benchmark, npages=NPAGES):
    benchmark.extra_info["ns_per_page"] = min_ns(benchmark, npages)


@pytest.fixture(scope="module")
def world():
    """vfio0's BAR exported twice (1 GiB at the BAR's start, 1 GiB one page
    in), an IOAS with ext0 attached (its own group on iommu0), and gpu0's
    default DMA domain for the references."""
    m = Machine.default()
    v = VfioPciBar(m, "vfio0")
    aligned = VfioPciBar(m, "vfio0", offset=0, nbytes=GIB)
    shifted = VfioPciBar(m, "vfio0", offset=G, nbytes=GIB)
    bufs = {"aligned": aligned.export(), "4k": shifted.export()}
    ioas = IommufdIoas(m)
    hwpt = ioas.attach_device(m.device("ext0"))
    yield m, v, bufs, ioas, hwpt
    ioas.close()
    for b in bufs.values():
        b.put()
    for h in (v, aligned, shifted):
        h.close()


def _iova_link(benchmark, m, phys):
    dev = m.device("gpu0")

    def link():
        st = IovaState.try_alloc(dev, phys, GIB)
        st.link(phys, 0, GIB, BIDI, DmaAttrs.MMIO)
        st.sync()
        return st

    pedantic(benchmark, lambda: (), link, lambda st: st.destroy(GIB, BIDI, DmaAttrs.MMIO))
    _record(benchmark)


@pytest.mark.parametrize("kind", ["aligned", "4k"])
def test_iommufd_map_file(benchmark, world, kind):
    m, v, bufs, ioas, hwpt = world
    benchmark.group = f"iommufd-map-1g-{kind}"
    b = bufs[kind]
    pedantic(benchmark, lambda: (), lambda: ioas.map_file(b, 0, GIB), lambda iova: ioas.unmap(iova, GIB))
    _record(benchmark)
    iova = ioas.map_file(b, 0, GIB)
    benchmark.extra_info["leaves"] = len(hwpt.domain.pgtable.leaves())
    ioas.unmap(iova, GIB)


def test_iommufd_map_file_fixed_1g_iova(benchmark, world):
    m, v, bufs, ioas, hwpt = world
    benchmark.group = "iommufd-map-1g-aligned"
    b = bufs["aligned"]
    pedantic(benchmark, lambda: (), lambda: ioas.map_file(b, 0, GIB, iova=GIB, flags=FIXED_RW),
              lambda iova: ioas.unmap(iova, GIB))
    _record(benchmark)


@pytest.mark.parametrize("kind", ["aligned", "4k"])
def test_ref_iova_link(benchmark, world, kind):
    m, v, bufs, ioas, hwpt = world
    benchmark.group = f"iommufd-map-1g-{kind}"
    _iova_link(benchmark, m, int(bufs[kind].exporter.ranges[0, 0]))


def test_iommufd_revoke(benchmark, world):
    m, v, bufs, ioas, hwpt = world
    benchmark.group = "iommufd-revoke-1g-4k"
    b = bufs["4k"]

    def setup():
        v.set_memory_decode(True)
        ioas.unmap_all()
        ioas.map_file(b, 0, GIB)
        return ()

    def revoke():
        v.set_memory_decode(False, timeout=60)

    pedantic(benchmark, setup, revoke, lambda _: None)
    assert ioas.areas[0].revoked and hwpt.domain.stats["mapped_nbytes"] == 0
    ioas.unmap_all()
    v.set_memory_decode(True)
    _record(benchmark)


def test_ref_iova_unlink(benchmark, world):
    m, v, bufs, ioas, hwpt = world
    benchmark.group = "iommufd-revoke-1g-4k"
    dev = m.device("gpu0")
    phys = int(bufs["4k"].exporter.ranges[0, 0])
    states = []

    def setup():
        st = IovaState.try_alloc(dev, phys, GIB)
        st.link(phys, 0, GIB, BIDI, DmaAttrs.MMIO)
        st.sync()
        states.append(st)
        return (st,)

    pedantic(benchmark, setup, lambda st: st.unlink(0, GIB, BIDI, DmaAttrs.MMIO), lambda _: states.pop().free())
    _record(benchmark)


@pytest.fixture(scope="module")
def kvm_world():
    m = Machine.default()
    v = VfioPciBar(m, "vfio0", nbytes=GIB)
    b = v.export()
    small_v = VfioPciBar(m, "vfio1")
    small = small_v.export()
    vm = KvmVm(m, private_mem=True)
    vm.set_user_memory_region2(0, KVM_MEM_VFIO_DMABUF, 1 << 32, GIB, guest_memfd=b)
    vm.set_user_memory_region2(1, KVM_MEM_VFIO_DMABUF, 1 << 34, small.size, guest_memfd=small)
    yield m, v, b, small_v, small, vm
    vm.close()
    b.put()
    small.put()
    v.close()
    small_v.close()


def test_kvm_first_touch(benchmark, kvm_world):
    m, v, b, small_v, small, vm = kvm_world
    benchmark.group = "kvm-first-touch"

    def setup():
        v.reset()  # revoke and un-revoke: the slot is zapped
        return ()

    pedantic(benchmark, setup, lambda: vm.pre_fault_memory(1 << 32, GIB), lambda n: None)
    _record(benchmark)
    benchmark.extra_info["faults_per_round"] = NPAGES


def test_ref_ept_map_many(benchmark, kvm_world):
    m, v, b, small_v, small, vm = kvm_world
    benchmark.group = "kvm-first-touch"
    phys = int(b.exporter.ranges[0, 0]) + np.arange(NPAGES, dtype=np.uint64) * np.uint64(G)
    prot = int(IommuProt.READ | IommuProt.WRITE | IommuProt.MMIO)
    pedantic(benchmark, lambda: (IoPageTable(ias=48),), lambda t: (t.map_many(1 << 32, phys, G, prot), t)[1],
              lambda t: None)
    _record(benchmark)


@pytest.mark.parametrize("present", [False, True])
def test_kvm_touch_per_access(benchmark, kvm_world, present):
    m, v, b, small_v, small, vm = kvm_world
    benchmark.group = "kvm-touch-per-access"
    n = small.size // G
    base = 1 << 34

    def setup():
        small_v.reset()
        if present:
            vm.pre_fault_memory(base, small.size)
        return ()

    def touch():
        for k in range(n):
            vm.guest_read(base + k * G, 1)

    pedantic(benchmark, setup, touch, lambda _: None, rounds=3)
    _record(benchmark, n)
