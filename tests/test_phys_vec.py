"""dma_buf_phys_vec_to_sgt: MMIO ranges to a DMA-only table, on every
P2P route (bus address, through the host bridge with and without an
IOMMU, not supported)."""

from __future__ import annotations

import numpy as np
import pytest

import pydmabuf
from pydmabuf import DmaDirection, Machine, P2PMapType, dma_buf_free_sgt, dma_buf_phys_vec_to_sgt, errors

BIDI = DmaDirection.BIDIRECTIONAL
MAX_ENT = 0xFFFFF000


def spec_two_switches(bus_offset=0x8000_0000_0000, acs=False):
    return {
        "memory": [{"start": 0, "size": "3G"}, {"start": "4G", "size": "60G"}],
        "iommus": [{"name": "io", "strict": True}],
        "host_bridges": [
            {"name": "hb", "root_vendor": 0x8086, "root_device": 0x2020,
             "windows": [{"cpu": "1T", "size": "64G", "prefetch": True, "bus_offset": bus_offset}]},
            {"name": "hb2", "segment": 1, "root_vendor": 0x8086, "root_device": 0x2020,
             "windows": [{"cpu": "2T", "size": "64G", "prefetch": True}]},
        ],
        "ports": [
            {"name": "rp", "bdf": "0000:00:01.0", "parent": "hb"},
            {"name": "up", "bdf": "0000:01:00.0", "parent": "rp", "kind": "switch_upstream"},
            {"name": "dp0", "bdf": "0000:02:00.0", "parent": "up", "kind": "switch_downstream", "acs_redirect": acs},
            {"name": "dp1", "bdf": "0000:02:01.0", "parent": "up", "kind": "switch_downstream"},
            {"name": "rp2", "bdf": "0001:00:01.0", "parent": "hb2"},
        ],
        "devices": [
            {"name": "exp", "bdf": "0000:03:00.0", "parent": "dp0", "vfio": True,
             "bars": [{"index": 0, "size": "8G"}]},
            {"name": "imp", "bdf": "0000:04:00.0", "parent": "dp1", "iommu": "io", "can_p2p": True},
            {"name": "far", "bdf": "0001:01:00.0", "parent": "rp2", "iommu": "io", "can_p2p": True},
            {"name": "fardirect", "bdf": "0001:02:00.0", "parent": "rp2", "can_p2p": True},
            {"name": "platform", "can_p2p": True},
        ],
    }


@pytest.fixture
def m():
    return Machine.from_spec(spec_two_switches())


def test_bus_addr_route_adds_the_bus_offset_splits_entries_and_maps_nothing(m):
    exp, imp = m.device("exp"), m.device("imp")
    prov = exp.p2p_provider(0)
    base = prov.bar.cpu_start
    assert pydmabuf.p2p_map_type(prov, imp) == P2PMapType.BUS_ADDR
    ranges = [[base, 8192], [base + 0x1000_0000, 5 << 30]]
    t = dma_buf_phys_vec_to_sgt(imp, prov, ranges, direction=BIDI)
    assert t.orig_nents == 0 and t.nents == 3
    off = 0x8000_0000_0000
    assert t.dma_ranges().tolist() == [
        [base + off, 8192],
        [base + 0x1000_0000 + off, MAX_ENT],
        [base + 0x1000_0000 + off + MAX_ENT, (5 << 30) - MAX_ENT],
    ]
    assert imp.domain.stats["pte_writes"] == 0  # nothing mapped
    dma_buf_free_sgt(t)
    assert t.mapping is None


def test_thru_host_bridge_with_an_iommu_maps_the_bar_as_mmio(m):
    exp, far = m.device("exp"), m.device("far")
    prov = exp.p2p_provider(0)
    assert pydmabuf.p2p_map_type(prov, far) == P2PMapType.THRU_HOST_BRIDGE
    t = dma_buf_phys_vec_to_sgt(far, prov, [[prov.bar.cpu_start, 8 << 20]])
    assert t.nents == 1
    st = far.domain.stats
    assert st["sync_map_calls"] == 1 and st["mapped_nbytes"] == 8 << 20
    # MMIO is mapped with IOMMU_MMIO and without IOMMU_CACHE.
    prots = set(far.domain.pgtable.leaves()[:, 3].tolist())
    assert prots == {int(pydmabuf.IommuProt.MMIO | pydmabuf.IommuProt.READ | pydmabuf.IommuProt.WRITE)}
    # The device reaches the BAR through the IOMMU at the table's address.
    m.memory.write(prov.bar.cpu_start + 0x10, b"bar!")
    assert far.dma_read(int(t.dma_ranges()[0, 0]) + 0x10, 4) == b"bar!"
    dma_buf_free_sgt(t)
    assert far.domain.stats["mapped_nbytes"] == 0 and far.domain.stats["iova_live_ranges"] == 0


def test_one_5g_range_is_two_entries_one_link_one_sync(m):
    exp, far = m.device("exp"), m.device("far")
    prov = exp.p2p_provider(0)
    t = dma_buf_phys_vec_to_sgt(far, prov, [[prov.bar.cpu_start, 5 << 30]])
    d = t.dma_ranges()
    assert d.tolist() == [[int(d[0, 0]), MAX_ENT], [int(d[0, 0]) + MAX_ENT, (5 << 30) - MAX_ENT]]
    assert far.domain.stats["sync_map_calls"] == 1
    dma_buf_free_sgt(t)


def test_thru_host_bridge_without_an_iommu_uses_the_physical_address(m):
    exp, fd = m.device("exp"), m.device("fardirect")
    prov = exp.p2p_provider(0)
    base = prov.bar.cpu_start
    t = dma_buf_phys_vec_to_sgt(fd, prov, [[base, 0x2000], [base + 0x10000, 0x1000]])
    # dma_map_phys with DMA_ATTR_MMIO: the physical address itself.
    assert t.dma_ranges().tolist() == [[base, 0x2000], [base + 0x10000, 0x1000]]
    dma_buf_free_sgt(t)
    assert not getattr(fd, "_single_maps", {})


def test_kernel_compat_shows_the_offset_zero_collision(m):
    exp, far = m.device("exp"), m.device("far")
    prov = exp.p2p_provider(0)
    base = prov.bar.cpu_start
    ranges = [[base, 0x2000], [base + 0x100000, 0x1000]]
    t = dma_buf_phys_vec_to_sgt(far, prov, ranges)  # the model: running offsets
    assert t.dma_ranges().tolist() == [[int(t.dma_ranges()[0, 0]), 0x3000]]
    dma_buf_free_sgt(t)
    with pytest.raises(errors.AlreadyExists):
        dma_buf_phys_vec_to_sgt(far, prov, ranges, kernel_compat=True)
    assert far.domain.stats["mapped_nbytes"] == 0 and far.domain.stats["iova_live_ranges"] == 0


def test_kernel_compat_leaks_iova_when_the_first_link_fails(m):
    exp, far = m.device("exp"), m.device("far")
    prov = exp.p2p_provider(0)
    bad = [[prov.bar.cpu_start + 0x10, 0x1000]]  # unaligned MMIO: the link fails
    before = len(pydmabuf.dma_buf_mapping.leaked)
    with pytest.raises(errors.DmaBufError):
        dma_buf_phys_vec_to_sgt(far, prov, bad + bad, kernel_compat=True)
    assert far.domain.stats["iova_live_ranges"] == 1  # leaked, as upstream
    assert len(pydmabuf.dma_buf_mapping.leaked) == before + 1
    with pytest.raises(errors.DmaBufError):
        dma_buf_phys_vec_to_sgt(far, prov, bad + bad)
    assert far.domain.stats["iova_live_ranges"] == 1  # the model leaks nothing more


def test_no_pci_importer_no_provider_or_an_empty_range_is_einval(m):
    exp, imp = m.device("exp"), m.device("imp")
    prov = exp.p2p_provider(0)
    with pytest.raises(errors.InvalidArgument):
        dma_buf_phys_vec_to_sgt(m.device("platform"), prov, [[prov.bar.cpu_start, 0x1000]])
    with pytest.raises(errors.InvalidArgument):
        dma_buf_phys_vec_to_sgt(imp, None, [[prov.bar.cpu_start, 0x1000]])
    with pytest.raises(errors.InvalidArgument):
        dma_buf_phys_vec_to_sgt(imp, prov, [[prov.bar.cpu_start, 0]])


def test_not_supported_route_is_einval():
    spec = spec_two_switches()
    spec["host_bridges"][1]["root_device"] = 0x9999  # not whitelisted
    m = Machine.from_spec(spec)
    prov = m.device("exp").p2p_provider(0)
    assert pydmabuf.p2p_map_type(prov, m.device("far")) == P2PMapType.NOT_SUPPORTED
    with pytest.raises(errors.InvalidArgument):
        dma_buf_phys_vec_to_sgt(m.device("far"), prov, [[prov.bar.cpu_start, 0x1000]])


def test_free_twice_is_a_lifetime_error(m):
    prov = m.device("exp").p2p_provider(0)
    t = dma_buf_phys_vec_to_sgt(m.device("imp"), prov, [[prov.bar.cpu_start, 0x1000]])
    dma_buf_free_sgt(t)
    with pytest.raises(errors.LifetimeError):
        dma_buf_free_sgt(t)


def test_two_tables_over_the_same_ranges_free_in_any_order(m):
    """Without an IOMMU both tables hold the same DMA addresses: each free
    consumes its own mappings, and a free that cannot complete changes
    nothing."""
    exp, fd = m.device("exp"), m.device("fardirect")
    prov = exp.p2p_provider(0)
    base = prov.bar.cpu_start
    ranges = [[base, 0x2000], [base + 0x10000, 0x1000]]
    t1 = dma_buf_phys_vec_to_sgt(fd, prov, ranges)
    t2 = dma_buf_phys_vec_to_sgt(fd, prov, ranges)
    assert t1.dma_ranges().tolist() == t2.dma_ranges().tolist()
    dma_buf_free_sgt(t1)
    assert t1.mapping is None and t2.mapping is not None
    # Someone unmaps t2's last range behind its back: its free fails whole.
    dma, n = t2.mapping.singles[-1]
    pydmabuf.dma_unmap_phys(fd, dma, n, BIDI, pydmabuf.DmaAttrs.MMIO)
    with pytest.raises(errors.LifetimeError):
        dma_buf_free_sgt(t2)
    assert t2.mapping is not None and sum(map(len, fd._single_maps.values())) == 1
    pydmabuf.dma_map_phys(fd, base + 0x10000, 0x1000, BIDI, pydmabuf.DmaAttrs.MMIO)
    dma_buf_free_sgt(t2)
    assert not fd._single_maps
