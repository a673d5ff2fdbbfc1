"""The machine model: the default machine, declarative specs, the host,
P2P routing and device accesses."""

from __future__ import annotations

import copy
import os
import textwrap

import numpy as np
import pytest

import pydmabuf
from pydmabuf import DmaDirection, IovaState, Machine, P2PMapType, RangeKind, errors
from pydmabuf.machine import DEFAULT_SPEC

from machines import machine

G = 4096


# ------------------------------------------------------------ the default


def test_default_machine_has_what_the_issue_names():
    m = Machine.default()
    for name in ("gpu0", "nic0", "nvme0", "vfio0", "legacy0"):
        assert name in m.devices
    gpu, nic, nvme = m.device("gpu0"), m.device("nic0"), m.device("nvme0")
    # Behind the switch and behind an IOMMU.
    for d in (gpu, nic, nvme):
        assert d.domain is not None
        assert d.upstream_bridge.upstream_bridge.kind == "switch_upstream"
    legacy = m.device("legacy0")
    assert legacy.domain is None and legacy.dma_limit == 2**32 - 1 and legacy.swiotlb is not None
    assert m.device("vfio0").vfio
    # RAM below 3 GiB and from 4 to 64 GiB (the top 4 GiB private).
    assert m.what_is(0x1000)[0] == RangeKind.RAM
    assert m.what_is(3 << 30) is None or m.what_is(3 << 30)[0] != RangeKind.RAM
    assert m.what_is(5 << 30)[0] == RangeKind.RAM
    assert m.what_is(62 << 30)[0] == RangeKind.PRIVATE
    assert m.what_is(64 << 30) is None
    # Several host bridges, one with a non-zero bus offset.
    assert len(m.host_bridges) >= 3
    assert any(w.bus_offset for hb in m.host_bridges.values() for w in hb.windows)
    assert "gpu0" in m.describe() and "swiotlb" in repr(m.swiotlb_pools)


def test_default_p2p_routes():
    m = Machine.default()
    gpu, nic, vfio0, vfio1, gpu1 = (m.device(n) for n in ("gpu0", "nic0", "vfio0", "vfio1", "gpu1"))
    assert pydmabuf.p2p_map_type(gpu, nic) == P2PMapType.BUS_ADDR
    assert pydmabuf.p2p_map_type(vfio0, nic) == P2PMapType.THRU_HOST_BRIDGE
    assert pydmabuf.p2p_map_type(vfio1, gpu1) == P2PMapType.BUS_ADDR
    assert pydmabuf.p2p_map_type(vfio1, nic) == P2PMapType.NOT_SUPPORTED
    prov = vfio1.p2p_provider(0)
    assert prov.bus_addr(prov.bar.cpu_start) != prov.bar.cpu_start


def test_default_iova_reserves_host_bridge_windows_and_msi():
    m = Machine.default()
    gpu = m.device("gpu0")
    s = gpu.domain.iovad
    assert s.find(0xFEE00000 >> 12) is not None  # the MSI window
    assert s.find(0xC0000000 >> 12) is not None  # hb0's 32-bit window (bus addresses)
    st = IovaState.try_alloc(gpu, 0, 1 << 20)
    assert not (0xC0000000 <= st.addr < 0xE0000000)
    st.free()
    assert m.iova_stats(gpu)["live_ranges"] == 0


# -------------------------------------------------------------- P2P rules


def p2p_spec(acs_dp0=False, root_device=0x2020, cpu=None, second_hb_device=0x2020):
    spec = {
        "memory": [{"start": 0, "size": "1G"}],
        "host_bridges": [
            {"name": "hb", "root_vendor": 0x8086, "root_device": root_device,
             "windows": [{"cpu": "1T", "size": "16G", "prefetch": True}]},
            {"name": "hb2", "segment": 1, "root_vendor": 0x8086, "root_device": second_hb_device,
             "windows": [{"cpu": "2T", "size": "16G", "prefetch": True}]},
        ],
        "ports": [
            {"name": "rp", "bdf": "0000:00:01.0", "parent": "hb"},
            {"name": "rpb", "bdf": "0000:00:02.0", "parent": "hb"},
            {"name": "up", "bdf": "0000:01:00.0", "parent": "rp", "kind": "switch_upstream"},
            {"name": "dp0", "bdf": "0000:02:00.0", "parent": "up", "kind": "switch_downstream",
             "acs_redirect": acs_dp0},
            {"name": "dp1", "bdf": "0000:02:01.0", "parent": "up", "kind": "switch_downstream"},
            {"name": "rp2", "bdf": "0001:00:01.0", "parent": "hb2"},
        ],
        "devices": [
            {"name": "a", "bdf": "0000:03:00.0", "parent": "dp0", "bars": [{"index": 0, "size": "1M"}]},
            {"name": "b", "bdf": "0000:04:00.0", "parent": "dp1", "bars": [{"index": 0, "size": "1M"}]},
            {"name": "c", "bdf": "0000:05:00.0", "parent": "rpb"},
            {"name": "far", "bdf": "0001:01:00.0", "parent": "rp2"},
            {"name": "plat"},
        ],
    }
    if cpu:
        spec["cpu"] = cpu
    return spec


def test_the_same_device_and_siblings_under_a_switch_are_bus_addr():
    m = Machine.from_spec(p2p_spec())
    a, b = m.device("a"), m.device("b")
    assert m.p2p_map_type(a, a) == P2PMapType.BUS_ADDR
    assert m.p2p_distance(a, [a]) == 0
    assert m.p2p_map_type(a, b) == P2PMapType.BUS_ADDR
    assert m.p2p_distance(a, [b]) == 4


def test_acs_redirect_goes_through_the_host_bridge_if_it_or_the_cpu_is_whitelisted():
    m = Machine.from_spec(p2p_spec(acs_dp0=True))
    assert m.p2p_map_type(m.device("a"), m.device("b")) == P2PMapType.THRU_HOST_BRIDGE
    m = Machine.from_spec(p2p_spec(acs_dp0=True, root_device=0x1234))
    assert m.p2p_map_type(m.device("a"), m.device("b")) == P2PMapType.NOT_SUPPORTED
    m = Machine.from_spec(p2p_spec(acs_dp0=True, root_device=0x1234, cpu={"vendor": "amd", "family": 0x19}))
    assert m.p2p_map_type(m.device("a"), m.device("b")) == P2PMapType.THRU_HOST_BRIDGE
    m = Machine.from_spec(p2p_spec(acs_dp0=True, root_device=0x1234, cpu={"vendor": "amd", "family": 0x15}))
    assert m.p2p_map_type(m.device("a"), m.device("b")) == P2PMapType.NOT_SUPPORTED


def test_no_common_ancestor_goes_through_the_host_bridge():
    m = Machine.from_spec(p2p_spec())
    a, c, far = m.device("a"), m.device("c"), m.device("far")
    assert m.p2p_map_type(a, c) == P2PMapType.THRU_HOST_BRIDGE  # two root ports, one whitelisted bridge
    assert m.p2p_map_type(a, far) == P2PMapType.THRU_HOST_BRIDGE  # two whitelisted bridges


def test_req_same_host_bridge_entries_allow_p2p_within_one_bridge_only():
    m = Machine.from_spec(p2p_spec(root_device=0x3C00))
    a, c, far = m.device("a"), m.device("c"), m.device("far")
    assert m.p2p_map_type(a, c) == P2PMapType.THRU_HOST_BRIDGE  # same bridge: allowed
    assert m.p2p_map_type(a, far) == P2PMapType.NOT_SUPPORTED  # across bridges: not


def test_non_pci_clients_are_not_supported_and_have_no_distance():
    m = Machine.from_spec(p2p_spec())
    assert m.p2p_map_type(m.device("a"), m.device("plat")) == P2PMapType.NOT_SUPPORTED
    assert m.p2p_distance(m.device("a"), [m.device("plat")]) == -1
    assert m.p2p_distance(m.device("a"), []) == -1


def test_the_map_type_cache_survives_an_acs_change_until_a_distance_call():
    m = Machine.from_spec(p2p_spec())
    a, b = m.device("a"), m.device("b")
    assert m.p2p_map_type(a, b) == P2PMapType.BUS_ADDR
    m.ports["dp0"].acs_redirect = True
    assert m.p2p_map_type(a, b) == P2PMapType.BUS_ADDR  # stale, as in the kernel
    assert m.p2p_distance(a, [b]) == 4  # distance_many recomputes ...
    assert m.p2p_map_type(a, b) == P2PMapType.THRU_HOST_BRIDGE  # ... and refreshes the cache


def test_p2p_providers_exist_for_memory_bars_only():
    m = Machine.from_spec(p2p_spec())
    a = m.device("a")
    assert a.p2p_provider(0) is not None
    assert a.p2p_provider(3) is None
    with pytest.raises(errors.NotSupported):
        m.device("plat").p2pdma_init()


# -------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "mutate,exc,text",
    [
        (lambda s: s["memory"].append({"start": 0, "size": "1M"}), errors.AlreadyExists, "memory[1]"),
        (lambda s: s["memory"].append({"start": "8G", "size": "1M", "kind": "flash"}), errors.InvalidArgument, "kind"),
        (lambda s: s["devices"].append({"name": "x", "bdf": "0000:09:00.0", "parent": "nope"}),
         errors.InvalidArgument, "parent"),
        (lambda s: s["devices"].append({"name": "x", "bogus": 1}), errors.InvalidArgument, "unknown key"),
        (lambda s: s["devices"].append({"name": "x", "dma_mask": 65}), errors.InvalidArgument, "dma_mask"),
        (lambda s: s["devices"].append({"name": "x", "iommu": "missing"}), errors.InvalidArgument, "IOMMU"),
        (lambda s: s["devices"].append({"name": "a"}), errors.AlreadyExists, "exists"),
        (lambda s: s["devices"].append({"name": "x", "bdf": "0000:09:00.0", "parent": "rp",
                                        "bars": [{"size": 3000}]}), errors.InvalidArgument, "power of two"),
        (lambda s: s["devices"].append({"name": "x", "bdf": "0000:09:00.0", "parent": "rp",
                                        "bars": [{"size": "64G"}]}), errors.NoSpace, "no room"),
    ],
)
def test_spec_errors_name_the_entry(mutate, exc, text):
    spec = p2p_spec()
    mutate(spec)
    with pytest.raises(exc) as ei:
        Machine.from_spec(spec)
    assert text in str(ei.value)


def test_host_bridge_windows_may_not_overlap():
    spec = copy.deepcopy(DEFAULT_SPEC)
    spec["host_bridges"][2]["windows"].append({"cpu": "230G", "size": "1G"})  # inside hb0's window
    with pytest.raises(errors.AlreadyExists, match="overlaps hb0"):
        Machine.from_spec(spec)
    spec = copy.deepcopy(DEFAULT_SPEC)
    spec["host_bridges"][0]["windows"].append({"cpu": 0xC0100000, "size": "1M"})  # inside its own
    with pytest.raises(errors.AlreadyExists, match="overlap"):
        Machine.from_spec(spec)


def test_bus_addresses_route_only_inside_their_own_hierarchy():
    """gpu1 (under hb2, bus offset) reaches vfio1's BAR by bus address; the
    BAR's CPU physical address, which lies in no window of hb2 as a bus
    address, goes to gpu1's IOMMU and faults."""
    m = Machine.default()
    gpu1 = m.device("gpu1")
    bar = m.device("vfio1").bar(0)
    m.memory.write(bar.cpu_start, b"peer")
    assert gpu1.dma_read(bar.bus_start, 4) == b"peer"
    with pytest.raises(errors.IommuFault, match="no IOMMU mapping"):
        gpu1.dma_read(bar.cpu_start, 4)


def test_default_spec_round_trips_through_toml(tmp_path):
    text = textwrap.dedent('''
        name = "tiny"
        [cpu]
        vendor = "amd"
        family = 25
        [[memory]]
        start = 0
        size = "2G"
        [[swiotlb]]
        name = "bounce"
        start = 0x1000000
        size = "1M"
        [[iommus]]
        name = "io"
        strict = true
        fq_timeout = false
        [[host_bridges]]
        name = "hb"
        windows = [{cpu = "1T", size = "1G"}]
        [[ports]]
        name = "rp"
        bdf = "0000:00:01.0"
        parent = "hb"
        [[devices]]
        name = "dev"
        bdf = "0000:01:00.0"
        parent = "rp"
        iommu = "io"
        max_segment_size = "64K"
        bars = [{index = 0, size = "4M"}]
    ''')
    m = Machine.from_toml(text)
    assert m.cpu_supports_p2pdma
    d = m.device("dev")
    assert d.domain is not None and d.dma_get_max_seg_size() == 64 << 10
    assert d.bar(0).nbytes == 4 << 20
    p = tmp_path / "m.toml"
    p.write_text(text)
    assert Machine.from_toml(str(p)).device("dev").bar(0).cpu_start == d.bar(0).cpu_start


def test_unknown_device_names_are_clear():
    with pytest.raises(errors.NoDevice) as ei:
        Machine.default().device("gpu9")
    assert "gpu0" in str(ei.value)


# ---------------------------------------------------------------- the host


def test_from_host_reads_this_machine():
    try:
        m = Machine.from_host()
    except errors.NotPermitted:
        pytest.skip("/proc/iomem hides addresses from this process")
    with open("/proc/iomem") as f:
        ram = [line for line in f if line.strip().endswith(": System RAM") and not line.startswith(" ")]
    assert len(m.ram_ranges()) == len(ram)
    if os.path.isdir("/sys/bus/pci/devices"):
        assert len(m.host_bridges) >= 1


def test_from_host_on_a_recorded_host(tmp_path):
    iomem = tmp_path / "iomem"
    iomem.write_text(textwrap.dedent("""\
        00000000-00000fff : Reserved
        00001000-0009fbff : System RAM
        00100000-bfffffff : System RAM
          01000000-02209987 : Kernel code
        c0000000-efffffff : PCI Bus 0000:00
        eec00000-febfffff : Reserved
          eec00000-eecfffff : PCI ECAM 0000 [bus 00-00]
        100000000-63fffffff : System RAM
        4000000000-7fffffffff : PCI Bus 0000:00
          4000000000-400007ffff : 0000:00:01.0
    """))
    sysfs = tmp_path / "devices"
    real = tmp_path / "real" / "pci0000:00"
    (real / "0000:00:01.0").mkdir(parents=True)
    (real / "0000:00:00.0").mkdir(parents=True)
    for dev, cls, vend, devid in (("0000:00:01.0", "0x010000", "0x1af4", "0x1042"),
                                  ("0000:00:00.0", "0x060000", "0x8086", "0x2020")):
        d = real / dev
        (d / "class").write_text(cls + "\n")
        (d / "vendor").write_text(vend + "\n")
        (d / "device").write_text(devid + "\n")
        (d / "dma_mask_bits").write_text("64\n")
    (real / "0000:00:01.0" / "resource").write_text(
        "0x0000004000000000 0x000000400007ffff 0x0000000000140204\n" + "0x0 0x0 0x0\n" * 5)
    sysfs.mkdir()
    for dev in ("0000:00:01.0", "0000:00:00.0"):
        os.symlink(real / dev, sysfs / dev)
    m = Machine.from_host(iomem=str(iomem), sysfs=str(sysfs))
    assert len(m.ram_ranges()) == 3
    d = m.device("0000:00:01.0")
    assert d.bar(0).cpu_start == 0x4000000000 and d.bar(0).nbytes == 0x80000
    hb = m.host_bridges["pci0000:00"]
    assert (hb.root_vendor, hb.root_device) == (0x8086, 0x2020)


def test_from_host_without_permission(tmp_path):
    p = tmp_path / "iomem"
    p.write_text("00000000-00000000 : Reserved\n00000000-00000000 : System RAM\n")
    with pytest.raises(errors.NotPermitted):
        Machine.from_host(iomem=str(p), sysfs=str(tmp_path / "none"))
    with pytest.raises(errors.DmaBufError):
        Machine.from_host(iomem=str(tmp_path / "missing"))


# ------------------------------------------------------------ device access


def test_access_through_the_iommu_and_stale_iova():
    m = machine({"name": "d", "iommu": "strict"})
    d = m.device("d")
    st = IovaState.try_alloc(d, 0, 2 * G)
    st.link(0x100000, 0, 2 * G, DmaDirection.TO_DEVICE)
    st.sync()
    m.memory.write(0x100FF0, b"across-a-page-edge")
    assert d.dma_read(st.addr + 0xFF0, 18) == b"across-a-page-edge"
    with pytest.raises(errors.IommuFault) as ei:
        d.dma_write(st.addr, b"x")  # TO_DEVICE: read only for the device
    assert "not permitted" in str(ei.value) and "d:" in str(ei.value)
    st.destroy(2 * G, DmaDirection.TO_DEVICE)
    with pytest.raises(errors.IommuFault) as ei:
        d.dma_read(st.addr, 1)
    assert f"{st.addr:#x}" in str(ei.value) and "no IOMMU mapping" in str(ei.value)


def test_private_memory_faults_for_untrusted_devices():
    m = machine({"name": "u"}, {"name": "t", "cc_trusted": True})
    priv = 61 << 30
    with pytest.raises(errors.IommuFault) as ei:
        m.device("u").dma_read(priv, 8)
    assert "confidential" in str(ei.value)
    assert m.device("t").dma_read(priv, 8) == bytes(8)


def test_holes_reserved_regions_and_masks_fault():
    m = machine({"name": "d32", "dma_mask": 32})
    d = m.device("d32")
    with pytest.raises(errors.IommuFault):
        d.dma_read((3 << 30) + 0x1000, 4)  # the hole below 4 GiB
    with pytest.raises(errors.IommuFault):
        d.dma_read(0x1_0000_0000, 4)  # beyond a 32-bit mask


def test_peer_bar_by_bus_address_and_decode_off():
    m = Machine.default()
    gpu1, vfio1 = m.device("gpu1"), m.device("vfio1")
    bar = vfio1.bar(0)
    m.memory.write(bar.cpu_start, b"vram")
    # gpu1 reaches vfio1's BAR at its bus address, not its CPU address.
    assert gpu1.dma_read(bar.bus_start, 4) == b"vram"
    vfio1.memory_decode = False
    with pytest.raises(errors.IommuFault) as ei:
        gpu1.dma_read(bar.bus_start, 4)
    assert "decode" in str(ei.value)
