"""IOMMU DMA domains: strict vs lazy (flush-queue) invalidation and the
dma-iommu IOVA policy (drivers/iommu/dma-iommu.c)."""

from __future__ import annotations

import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydmabuf import IommuDomain, IommuProt, IovaDomain, IoPageTable, errors

K4, M2 = 1 << 12, 1 << 21
TOP = (1 << 48) - 1


def test_strict_unmap_invalidates_once_and_frees_at_once():
    d = IommuDomain(strict=True)
    assert d.type == "DMA" and d.strict
    a = d.map_dma(0x1234_5000, 8 * K4)
    s = d.stats
    assert s["sync_map_calls"] == 1 and s["iova_live_ranges"] == 1
    assert d.unmap_dma(a, 8 * K4) == 8 * K4
    s = d.stats
    assert s["iotlb_range_invalidations"] == 1 and s["iotlb_invalidations"] == 1
    assert s["fq_pending"] == 0 and s["iova_live_ranges"] == 0
    assert d.map_dma(0x9999_0000, 8 * K4) == a  # reused at once (rcache)


def test_lazy_unmap_queues_until_a_flush():
    d = IommuDomain(strict=False, fq_timeout=None)
    assert d.type == "DMA-FQ"
    a = d.map_dma(0x1234_5000, 8 * K4)
    assert d.unmap_dma(a, 8 * K4) == 8 * K4
    s = d.stats
    assert s["iotlb_invalidations"] == 0 and s["fq_pending"] == 1
    assert s["mapped_nbytes"] == 0  # the PTEs are gone ...
    assert d.iovad.find(a >> 12) is not None  # ... the IOVA is not
    assert d.iovad.ranges(with_state=True)[:, 2].tolist() == [3]  # queued
    with pytest.raises(errors.NotFound):
        d.unmap_dma(a, 8 * K4)  # already unmapped: not a second queue entry
    with pytest.raises(errors.NotFound):
        d.free_iova(a, 8 * K4)
    b = d.map_dma(0x2000_0000, 8 * K4)
    assert b != a  # not reusable before the flush
    assert d.flush() == 1
    s = d.stats
    assert s["iotlb_full_flushes"] == 1 and s["fq_pending"] == 0 and s["fq_released"] == 1
    assert d.map_dma(0x3000_0000, 8 * K4) == a  # now it is
    assert d.flush() == 0 and d.stats["iotlb_full_flushes"] == 1  # nothing queued: no flush


def test_full_ring_forces_a_flush():
    d = IommuDomain(strict=False, fq_timeout=None)
    iovas = [d.map_dma(k * K4, K4) for k in range(1, 300)]
    for a in iovas[:255]:
        d.unmap_dma(a, K4)
    s = d.stats
    assert s["fq_pending"] == 255 and s["iotlb_full_flushes"] == 0  # 256 slots, one kept empty
    d.unmap_dma(iovas[255], K4)
    s = d.stats
    assert s["fq_full_flushes"] == 1 and s["iotlb_full_flushes"] == 1
    assert s["fq_pending"] == 1 and s["fq_released"] == 255


def test_entries_are_released_by_the_next_queue_operation_after_a_flush():
    d = IommuDomain(strict=False, fq_timeout=None, fq_size=8)
    a, b = d.map_dma(0x1000, K4), d.map_dma(0x2000, K4)
    d.unmap_dma(a, K4)
    d.flush_iotlb_all()  # a bare flush does not stamp the queue
    d.unmap_dma(b, K4)
    assert d.stats["fq_pending"] == 2
    d.flush()
    assert d.stats["fq_pending"] == 0


def test_timeout_releases_after_the_deadline():
    d = IommuDomain(strict=False, fq_timeout=0.001)
    a = d.map_dma(0x1000, K4)
    d.unmap_dma(a, K4)
    time.sleep(0.02)
    assert d.poll() == 1
    assert d.stats["fq_timeouts"] == 1 and d.stats["fq_pending"] == 0


def test_no_release_before_the_deadline():
    d = IommuDomain(strict=False, fq_timeout=3600)
    a = d.map_dma(0x1000, K4)
    d.unmap_dma(a, K4)
    assert d.poll() == 0
    assert d.map_dma(0x1000, K4) != a and d.stats["fq_pending"] == 1


def test_per_cpu_queues_flush_together():
    d = IommuDomain(strict=False, fq_timeout=None, ncpus=2)
    a = d.map_dma(0x1000, K4, cpu=0)
    b = d.map_dma(0x2000, K4, cpu=1)
    d.unmap_dma(a, K4, cpu=0)
    d.unmap_dma(b, K4, cpu=1)
    assert d.flush() == 2
    with pytest.raises(errors.InvalidArgument):
        d.unmap_dma(a, K4, cpu=2)


def test_iommu_unmap_syncs_even_on_a_lazy_domain():
    d = IommuDomain(strict=False, fq_timeout=None)
    d.map(0x10000, 0x20000, 4 * K4)
    assert d.unmap(0x10000, 4 * K4) == 4 * K4
    assert d.stats["iotlb_range_invalidations"] == 1 and d.stats["fq_pending"] == 0


def test_link_many_then_sync_once():
    # The two-step API's pattern: map_nosync per range, one sync_map.
    d = IommuDomain()
    iova = d.alloc_iova(64 * K4)
    for k in range(64):
        d.map_nosync(iova + k * K4, (1000 + 7 * k) * K4, K4)
    d.sync_map(iova, 64 * K4)
    s = d.stats
    assert s["sync_map_calls"] == 1 and s["leaf_pte_writes"] == 64
    assert d.iova_to_phys(iova + 5 * K4 + 3) == (1035 * K4) + 3


def test_table_pages_ride_the_flush_queue_when_deferred():
    d = IommuDomain(strict=False, fq_timeout=None, defer_table_free=True)
    a = d.map_dma(K4, M2)  # 2M of IOVA, 4K pages (phys misaligned)
    assert a % M2 == 0
    d.unmap_dma(a, M2)
    s = d.stats
    assert s["table_pages_pending"] == 1 and s["iotlb_walk_invalidations"] == 0
    d.flush()
    assert d.stats["table_pages_pending"] == 0
    d.pgtable.check()


def test_arm_style_table_free_flushes_the_walk_at_once_even_when_lazy():
    d = IommuDomain(strict=False, fq_timeout=None)
    a = d.map_dma(K4, M2)
    d.unmap_dma(a, M2)
    s = d.stats
    assert s["iotlb_walk_invalidations"] == 1 and s["iotlb_range_invalidations"] == 0
    assert s["table_pages_pending"] == 0


def test_map_dma_keeps_the_offset_and_rounds_to_granules():
    d = IommuDomain()
    dma = d.map_dma(0x1234, 0x3000)
    assert dma & 0xFFF == 0x234
    assert d.stats["mapped_nbytes"] == 0x4000  # ALIGN(0x3000 + 0x234, 4K)
    assert d.iova_to_phys(dma) == 0x1234
    assert d.unmap_dma(dma, 0x3000) == 0x4000


def test_map_dma_respects_the_limit_and_aperture():
    d = IommuDomain(aperture_bits=39)
    assert d.map_dma(0, K4) < 1 << 39
    assert d.map_dma(0, K4, dma_limit=(1 << 32) - 1) < 1 << 32
    with pytest.raises(errors.OutOfMemory):
        d.map_dma(0, 2 * K4, dma_limit=K4)


def test_pci_devices_start_below_4g_until_it_fails():
    d = IommuDomain()
    iova, pref = d.alloc_iova_pci(K4, TOP, True)
    assert iova < 1 << 32 and pref
    assert iova == (1 << 32) - K4
    # 1 GiB cannot sit in [3G, 4G) beside that page: it lands at [2G, 3G)
    big, pref = d.alloc_iova_pci(1 << 30, TOP, True)
    assert big == 1 << 31 and pref
    # 2 GiB below 4G would need [0, 2G), and IOVA 0 is never handed out
    big2, pref = d.alloc_iova_pci(1 << 31, TOP, True)
    assert big2 == (1 << 48) - (1 << 31) and not pref  # top of the aperture
    small, pref = d.alloc_iova_pci(K4, TOP, pref)
    assert small == big2 - K4 and not pref  # 64-bit from now on
    assert d.alloc_iova(K4) == small - K4


def test_errors_change_nothing():
    d = IommuDomain()
    d.map(0, 0, K4)
    before, ranges = d.stats, d.iovad.ranges()
    with pytest.raises(errors.NotFound):
        d.unmap_dma(0x5000_0000, K4)
    with pytest.raises(errors.NotFound):
        d.free_iova(0x5000_0000, K4)
    with pytest.raises(errors.InvalidArgument):
        d.map_dma(0, K4, prot=IommuProt.CACHE)
    with pytest.raises(errors.OutOfRange):
        d.map_dma(1 << 52, K4)
    with pytest.raises(errors.InvalidArgument):
        d.alloc_iova(100)
    with pytest.raises(errors.AlreadyExists):
        d.map(0, 0, K4)
    with pytest.raises(errors.InvalidArgument):
        d.unmap(0x800, K4)
    assert d.stats == before and (d.iovad.ranges() == ranges).all()


def test_constructor_checks():
    with pytest.raises(errors.NotSupported):
        IommuDomain(granule=65536)
    with pytest.raises(errors.InvalidArgument):
        IommuDomain(aperture_bits=50)
    with pytest.raises(errors.InvalidArgument):
        IommuDomain(fq_size=100)
    with pytest.raises(errors.InvalidArgument):
        IommuDomain(fq_timeout=-1)
    d = IommuDomain(strict=False, ncpus=4)
    assert isinstance(d.iovad, IovaDomain) and isinstance(d.pgtable, IoPageTable)
    assert d.iovad.ncpus == 4 and d.pgtable.ias == 48
    assert "DMA-FQ" in repr(d)


def test_views_outlive_the_domain_reference():
    d = IommuDomain()
    iovad, pgt = d.iovad, d.pgtable
    a = d.map_dma(0x7000, K4)
    del d
    assert iovad.find(a >> 12) is not None
    assert pgt.iova_to_phys(a) == 0x7000


# --------------------------------------------------- lifecycle machine


class DomainMachine(RuleBasedStateMachine):
    """Map and unmap through the DMA API; a mapping's IOVA is never handed
    out again while it is mapped or queued, and everything balances."""

    @initialize(strict=st.booleans(), ncpus=st.integers(1, 2), fq_size=st.sampled_from([4, 8, 256]))
    def setup(self, strict, ncpus, fq_size):
        self.d = IommuDomain(strict=strict, ncpus=ncpus, fq_size=fq_size, fq_timeout=None)
        self.live: dict[int, tuple[int, int]] = {}  # iova -> (phys, nbytes)
        self.fq_size = fq_size

    @rule(pages=st.integers(1, 40), off=st.integers(0, 4095), cpu=st.integers(0, 1))
    def map(self, pages, off, cpu):
        cpu %= self.d.iovad.ncpus
        phys = 0x1_0000_0000 + len(self.live) * 0x100_0000 + off
        nbytes = pages * K4 - off
        queued = self.d.queued()
        dma = self.d.map_dma(phys, nbytes, cpu=cpu)
        base, end = dma & ~0xFFF, (dma & ~0xFFF) + pages * K4
        for other, (p, n) in self.live.items():
            assert end <= other or other + span(p, n) <= base
        # an IOVA still on a flush queue is never handed out again
        for iova, n, _ in queued.tolist():
            assert end <= iova or iova + n <= base
        self.live[base] = (phys, nbytes)
        assert self.d.iova_to_phys(dma) == phys

    @precondition(lambda self: self.live)
    @rule(data=st.data(), cpu=st.integers(0, 1))
    def unmap(self, data, cpu):
        base = data.draw(st.sampled_from(sorted(self.live)))
        phys, nbytes = self.live.pop(base)
        pending = self.d.stats["fq_pending"]
        assert self.d.unmap_dma(base + (phys & 0xFFF), nbytes, cpu=cpu % self.d.iovad.ncpus) == span(phys, nbytes)
        if not self.d.strict:
            assert [base, span(phys, nbytes)] in self.d.queued()[:, :2].tolist()
            assert self.d.stats["fq_pending"] <= pending + 1

    @rule()
    def flush(self):
        pending = self.d.stats["fq_pending"]
        assert self.d.flush() == pending
        assert self.d.queued().shape == (0, 3)

    @invariant()
    def balanced(self):
        s = self.d.stats
        assert s["mapped_nbytes"] == sum(span(p, n) for p, n in self.live.values())
        assert s["fq_queued"] == s["fq_pending"] + s["fq_released"]
        assert len(self.d.queued()) == s["fq_pending"] <= self.d.iovad.ncpus * (self.fq_size - 1)
        assert s["iova_live_ranges"] == len(self.live)
        assert s["iova_queued_ranges"] == s["fq_pending"]
        if self.d.strict:
            assert s["fq_pending"] == 0 and s["iotlb_full_flushes"] == 0
        self.d.iovad.check()
        self.d.pgtable.check()


def span(phys, nbytes):
    return ((phys & 0xFFF) + nbytes + 0xFFF) & ~0xFFF


TestDomainMachine = DomainMachine.TestCase
TestDomainMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
