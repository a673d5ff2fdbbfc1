"""The VFIO PCI BAR exporter: VFIO_DEVICE_FEATURE_DMA_BUF's checks, the
attach gates, revoke and un-revoke on decode, power, reset and close."""

from __future__ import annotations

import errno
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pydmabuf import Caching, DmaDirection, Fence, Machine, P2PMapType, Usage, errors, fence_context_alloc, mapping
from pydmabuf.dmabuf import PHYS_NAMESPACE, ImporterOps, close, dma_buf_get
from pydmabuf.exporters import SystemHeap, VfioPciBar
from pydmabuf.exporters.vfio import IOMMUFD_MODULE, VfioFeature, vfio_pci_dma_buf_iommufd_map, vfio_pci_hot_reset
from pydmabuf.files import open_fds

from driver_helpers import Polite, attached, vfio_export
from kernel_rc import kernel_rc

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL
U64 = 2**64 - 1


class Stubborn(ImporterOps):
    """Acknowledges and never unmaps."""

    allow_peer2peer = True

    def invalidate_mappings(self, a):
        pass


class NoInvalidate(ImporterOps):
    allow_peer2peer = True


class NoP2p(Polite):
    allow_peer2peer = False


class PhysReader(Polite):
    import_namespaces = frozenset({PHYS_NAMESPACE})


class IommufdLike(Polite):
    import_namespaces = frozenset({IOMMUFD_MODULE})


# --------------------------------------------------- the feature's checks


def test_feature_checks_the_flags_region_op_and_argsz(m):
    v = VfioPciBar(m, "vfio0")
    good = [(0, G)]
    assert kernel_rc(v.feature_dma_buf, 0, 1, 0, good) == -errno.EINVAL  # flags must be 0
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, []) == -errno.EINVAL  # no ranges
    assert kernel_rc(v.feature_dma_buf, 6, 0, 0, good) == -errno.ENODEV  # ROM, not a BAR
    assert kernel_rc(v.feature_dma_buf, 7, 1, 0, good) == -errno.EINVAL  # the flags check comes first
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, good, op="SET") == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, good, op="GET|SET") == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, good, op="SET|PROBE") == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, good, op="") == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, good, argsz=15) == -errno.EINVAL
    assert v.feature_dma_buf(0, 0, 0, good, argsz=16) > 2  # argsz is not checked against the ranges
    for probe in ("PROBE", "GET|PROBE", int(VfioFeature.PROBE)):
        assert v.feature_dma_buf(0, 1, 0, [], op=probe) == 0  # PROBE asks nothing else
    assert kernel_rc(v.feature_dma_buf, 1, 0, 0, good) == -errno.ENODEV  # vfio0 has no BAR1
    with pytest.raises(ValueError):
        v.feature_dma_buf(0, 0, 0, good, op="FETCH")
    for fd in list(open_fds()):
        close(fd)
    v.close()


def test_a_driver_without_get_dmabuf_phys_refuses_even_probe(m):
    v = VfioPciBar(m, "vfio0", has_dmabuf_phys=False)
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0, G)], op="PROBE") == -errno.EOPNOTSUPP
    assert kernel_rc(v.export) == -errno.EOPNOTSUPP
    v.close()


def test_feature_checks_every_range_in_the_kernels_order(m):
    v = VfioPciBar(m, "vfio0")
    bar = m.device("vfio0").bar(0)
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0, 0x1800)]) == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0x800, G)]) == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0, 0)]) == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(bar.nbytes - G, 2 * G)]) == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0xFFFF_FFFF_FFFF_F000, G)]) == -errno.EOVERFLOW
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0, 1 << 63)]) == -errno.EINVAL  # DMA_IOVA_USE_SWIOTLB
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0, U64 - G + 1), (0, G)]) == -errno.EINVAL  # total wraps
    # A total that carries past 2**64 only at the last row: EINVAL, named so
    # (not the bit-63 rule, not EOVERFLOW from the core's sum).
    with pytest.raises(errors.InvalidArgument, match=r"more than 2\*\*64 - 1"):
        v.feature_dma_buf(0, 0, 0, [(0, 1 << 62)] * 3 + [(0, (1 << 62) - G), (0, G)])
    # The bit-63 total is refused before any range meets the BAR.
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0xFFFF_FFFF_FFFF_F000, G), (0, 1 << 63)]) == -errno.EINVAL
    # The BAR's address plus the offset fits, plus the length wraps.
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(2**64 - bar.cpu_start - G, 2 * G)]) == -errno.EOVERFLOW
    # Step 6 (every range's alignment) runs before step 8 (every range
    # against the BAR): a later misaligned range beats an earlier overflow.
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0xFFFF_FFFF_FFFF_F000, G), (0, 0x1800)]) == -errno.EINVAL
    # Within step 8 the first bad range decides.
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(bar.nbytes, G), (0xFFFF_FFFF_FFFF_F000, G)]) == -errno.EINVAL
    assert kernel_rc(v.feature_dma_buf, 0, 0, 0, [(0, G), (0xFFFF_FFFF_FFFF_F000, G)]) == -errno.EOVERFLOW
    assert not v.dmabufs and not open_fds()  # failures export nothing
    # The last page of the BAR, and the same range twice (the size doubles).
    b = dma_buf_get(fd := v.feature_dma_buf(0, 0, 0, [(bar.nbytes - G, G), (bar.nbytes - G, G)]))
    close(fd)
    assert b.size == 2 * G
    assert b.exporter.ranges.tolist() == [[bar.last - G + 1, G]] * 2
    b.put()
    v.close()


def test_bad_python_arguments(m):
    v = VfioPciBar(m, "vfio0")
    with pytest.raises(TypeError):
        v.feature_dma_buf(0, 0, 0, [(0, "4096")])
    with pytest.raises(ValueError):
        v.feature_dma_buf(0, 0, 0, [(0, G, 1)])
    with pytest.raises(errors.InvalidArgument):
        v.feature_dma_buf(0, 0, 0, [(-G, G)])
    with pytest.raises(errors.Overflow):
        v.feature_dma_buf(2**32, 0, 0, [(0, G)])
    with pytest.raises(errors.NoDevice):
        VfioPciBar(m, "gpu0")  # not bound to vfio-pci
    with pytest.raises(ValueError):
        VfioPciBar(m, "vfio0", ranges=[(0, G)], nbytes=G)
    with pytest.raises(ValueError):
        VfioPciBar(m, "vfio0", kernel="5.10")
    with pytest.raises(errors.InvalidArgument):
        VfioPciBar(m, "vfio0", kernel="6.19")  # the device already runs the 7.1 driver
    with pytest.raises(errors.InvalidArgument):
        VfioPciBar(Machine.default(), m.device("vfio0"))
    v.close()


def reference_feature(has_phys, op, argsz, flags, region, bars, ranges):
    """vfio_pci_core_feature_dma_buf() and its helpers, literally."""
    GET, SET, PROBE = VfioFeature.GET, VfioFeature.SET, VfioFeature.PROBE
    if not has_phys:
        return -errno.EOPNOTSUPP
    if (op & (GET | SET)) & ~GET:
        return -errno.EINVAL
    if op & PROBE:
        return 0
    if not op & (GET | SET):
        return -errno.EINVAL
    if argsz < 16:
        return -errno.EINVAL
    if not ranges or flags:
        return -errno.EINVAL
    if region >= 6 or region not in bars:
        return -errno.ENODEV
    length = 0
    for off, ln in ranges:
        if ln == 0 or off % G or ln % G:
            return -errno.EINVAL
        length += ln
        if length > U64:
            return -errno.EINVAL
    if length & (1 << 63):
        return -errno.EINVAL
    start, size = bars[region]
    for off, ln in ranges:
        paddr = start + off
        if paddr > U64 or paddr + ln > U64:
            return -errno.EOVERFLOW
        if paddr + ln > start + size:
            return -errno.EINVAL
    return 1


_BARS = {0: 16 << 30, 2: 1 << 20}
_VFIO0_BAR0 = Machine.default().device("vfio0").bar(0).cpu_start
_BREAKS = ["flags", "region6", "region1", "region_u32", "bar2", "set", "probe", "no_op", "get_set", "argsz", "no_phys",
           "empty", "len0", "unaligned_off", "unaligned_len", "past_end", "at_end", "wrap_off", "wrap_end", "bit63",
           "total_wraps", "repeat"]
_ranges = st.lists(st.tuples(st.integers(0, 1000).map(lambda x: x * G), st.integers(1, 64).map(lambda x: x * G)),
                   min_size=1, max_size=3)


def _apply(breaks, ranges):
    """A valid request with some of its fields broken."""
    p = {"has_phys": True, "op": "GET", "argsz": None, "flags": 0, "region": 0, "ranges": list(ranges)}
    bar_len = _BARS[0]
    for j, b in enumerate(breaks):
        r = p["ranges"]
        i = j % len(r) if r else 0
        edits = {
            "flags": ("flags", 1), "region6": ("region", 6), "region1": ("region", 1),
            "region_u32": ("region", 2**32 - 1), "bar2": ("region", 2), "set": ("op", "SET"),
            "probe": ("op", "GET|PROBE"), "no_op": ("op", ""), "get_set": ("op", "GET|SET"),
            "argsz": ("argsz", 15), "no_phys": ("has_phys", False), "empty": ("ranges", []),
        }
        if b in edits:
            k, val = edits[b]
            p[k] = val
            if b == "bar2":
                bar_len = _BARS[2]
        elif r:
            o, n = r[i]
            r[i] = {"len0": (o, 0), "unaligned_off": (o + 0x800, n), "unaligned_len": (o, n + 0x800),
                    "past_end": ((bar_len - n + G) % 2**64, n), "at_end": ((bar_len - n) % 2**64, n), "wrap_off": (0xFFFF_FFFF_FFFF_F000, n),
                    "wrap_end": (2**64 - _VFIO0_BAR0 - G, 2 * G), "bit63": (o, 1 << 63),
                    "total_wraps": (o, U64 - G + 1), "repeat": r[0]}[b]
            if b == "total_wraps":
                r.append((0, 2 * G))
    return p


@settings(max_examples=200)
@given(breaks=st.lists(st.sampled_from(_BREAKS), max_size=3), ranges=_ranges)
def test_feature_matches_the_kernel_reference(breaks, ranges):
    """Valid requests with up to three fields broken: the first failing
    check, in the kernel's order, decides the errno."""
    p = _apply(breaks, ranges)
    m = Machine.default()
    v = VfioPciBar(m, "vfio0", has_dmabuf_phys=p["has_phys"])
    bars = {i: (m.device("vfio0").bar(i).cpu_start, n) for i, n in _BARS.items()}
    size = 16 + 16 * len(p["ranges"]) if p["argsz"] is None else p["argsz"]
    op_bits = _op_bits(p["op"]) if p["op"] else VfioFeature(0)
    want = reference_feature(p["has_phys"], op_bits, size, p["flags"], p["region"], bars, p["ranges"])
    got = kernel_rc(v.feature_dma_buf, p["region"], p["flags"], 0, p["ranges"], op=p["op"], argsz=p["argsz"])
    if want == 1:
        assert got > 2
        b = dma_buf_get(got)
        close(got)
        assert b.size == sum(ln for _, ln in p["ranges"])
        assert b.exporter.ranges.tolist() == [[bars[p["region"]][0] + o, ln] for o, ln in p["ranges"]]
        b.put()
    else:
        assert got == want
    assert not v.dmabufs
    v.close()


def _op_bits(op):
    bits = VfioFeature(0)
    for p in op.split("|"):
        bits |= VfioFeature[p]
    return bits


# ------------------------------------------------------- attaching, mapping


def test_born_revoked_without_memory_decode(m):
    m.device("vfio1").memory_decode = False
    with vfio_export(m, "vfio1") as (v, b):
        assert b.revoked
        with pytest.raises(errors.Revoked):
            b.dynamic_attach(m.device("gpu1"), Polite())
        assert not b.attachments
        v.set_memory_decode(True)
        with attached(b, m.device("gpu1"), Polite()):
            pass


def test_born_revoked_in_d3hot(m):
    v = VfioPciBar(m, "vfio1")
    v.set_power_state("D3hot")
    b = v.export()
    assert b.revoked and v.power_state == "D3hot" and not v.memory_enabled
    v.set_power_state("D0")
    assert not b.revoked
    b.put()
    v.close()


def test_attach_gates_and_their_order(m):
    with vfio_export(m, "vfio1") as (v, b):
        gpu = m.device("gpu1")
        # Mapping types: VFIO offers [PAL, SGT P2P]; no P2P means no match (EINVAL)
        assert kernel_rc(b.attach, gpu) == -errno.EINVAL  # static: never P2P
        assert kernel_rc(b.dynamic_attach, gpu, NoP2p()) == -errno.EINVAL
        assert kernel_rc(b.dynamic_attach, gpu, NoInvalidate()) == -errno.EOPNOTSUPP  # 7.1: not revocable
        v.set_memory_decode(False)
        assert kernel_rc(b.dynamic_attach, gpu, NoP2p()) == -errno.EINVAL  # the negotiation comes first
        assert kernel_rc(b.dynamic_attach, gpu, NoInvalidate()) == -errno.ENODEV  # revoked before revocable
        assert not b.attachments


def test_on_619_an_importer_without_invalidate_is_accepted(m):
    with vfio_export(m, "vfio1", kernel="6.19") as (v, b):
        with attached(b, m.device("gpu1"), NoInvalidate()):
            assert kernel_rc(b.attach, m.device("gpu1")) == -errno.EINVAL  # still no static importers (no match)


def test_maps_are_dma_only_tables_on_the_importers_route(m):
    # vfio1 and gpu1 sit under one switch behind the offset host bridge:
    # bus addresses, nothing mapped.
    v1 = VfioPciBar(m, "vfio1", offset=0x10000, nbytes=8 * G)
    b1 = v1.export()
    imp = Polite()
    a = b1.dynamic_attach(m.device("gpu1"), imp)
    assert a.p2p_route == P2PMapType.BUS_ADDR
    t = imp.map(a)
    bar = m.device("vfio1").bar(0)
    assert t.is_dma_only and t.orig_nents == 0
    assert t.dma_ranges().tolist() == [[bar.bus_start + 0x10000, 8 * G]]
    m.memory.write(bar.cpu_start + 0x10000 + 5, b"peer")
    assert m.device("gpu1").dma_read(bar.bus_start + 0x10000 + 5, 4) == b"peer"
    assert b1.exporter.maps == 1
    # vfio0 is behind another host bridge: through gpu0's IOMMU, and two
    # ranges are linked back to back (the kernel links both at offset 0).
    v0 = VfioPciBar(m, "vfio0", ranges=[(0, 2 * G), (1 << 30, G)])
    b0 = v0.export()
    imp0 = Polite()
    a0 = b0.dynamic_attach(m.device("gpu0"), imp0)
    assert a0.p2p_route == P2PMapType.THRU_HOST_BRIDGE
    t0 = imp0.map(a0)
    (iova, n), = t0.dma_ranges().tolist()
    base = m.device("vfio0").bar(0).cpu_start
    assert n == 3 * G
    assert [m.device("gpu0").domain.iova_to_phys(iova + k * G) for k in range(3)] == [base, base + G, base + (1 << 30)]
    # A non-PCI importer has no route: the SGT P2P entry does not match it,
    # and VFIO offers nothing else it takes (mapping types: EINVAL at attach).
    assert kernel_rc(b0.dynamic_attach, _platform(m), Polite()) == -errno.EINVAL
    for buf, att, im in ((b1, a, imp), (b0, a0, imp0)):
        for tt in im.tables:
            att.unmap_unlocked(tt, BIDI)
        buf.detach(att)
    assert b0.exporter.unmaps == 1
    b1.put()
    b0.put()
    v1.close()
    v0.close()


def _platform(m):
    from pydmabuf import Device

    return Device(m, "platform-dev")


def test_no_vmap_and_the_physical_ranges(m):
    with vfio_export(m, "vfio0", bar=2, offset=G, nbytes=4 * G) as (v, b):
        b.resv.lock()
        try:
            assert kernel_rc(b.vmap) == -errno.EINVAL
        finally:
            b.resv.unlock()
        with attached(b, m.device("gpu0"), PhysReader()) as a:
            b.resv.lock()
            try:
                pv = a.phys_vec()
            finally:
                b.resv.unlock()
        bar = m.device("vfio0").bar(2)
        assert pv.ranges.tolist() == [[bar.cpu_start + G, 4 * G]] and pv.provider.bar is bar


# ------------------------------------------------------------- mmap (MMIO)
#
# After Matt Evans's "vfio/pci: Support mmap() of a VFIO DMABUF" (v4, July
# 2026): vfio_pci_dma_buf_mmap, its fault handler, revoke_mmap_mappings
# and VFIO_DEVICE_FEATURE_DMA_BUF_MEMATTR.


def test_mmap_on_619_has_no_mmap_op(m):
    # dma_buf_mmap_internal(): no ->mmap in 6.19's vfio_pci_dmabuf_ops -> EINVAL.
    with vfio_export(m, "vfio1", kernel="6.19") as (v, b):
        assert kernel_rc(b.mmap) == -errno.EINVAL


def test_mmap_maps_the_bar_uncached_and_reaches_it(m):
    # vfio_pci_dma_buf_mmap: pgprot_noncached; the fault inserts the BAR pfns.
    with vfio_export(m, "vfio0", bar=2, offset=G, nbytes=4 * G) as (v, b):
        bar = m.device("vfio0").bar(2)
        with b.mmap() as cpu:
            assert cpu.caching is Caching.UNCACHED and str(cpu.caching) == "uncached"
            cpu.write(G, b"to the BAR")
            assert m.memory.read(bar.cpu_start + 2 * G, 10) == b"to the BAR"
            m.memory.write(bar.cpu_start + G, b"from the BAR")
            assert cpu.read(0, 12) == b"from the BAR"


def test_system_memory_mappings_are_write_back(m):
    b = SystemHeap(m).allocate(2 * G)
    with b.mmap() as cpu:
        assert cpu.caching is Caching.WRITE_BACK
    b.resv.lock()
    try:
        vm = b.vmap()
        assert vm.caching is Caching.WRITE_BACK
        b.vunmap(vm)
    finally:
        b.resv.unlock()
    b.put()


def test_a_prefetchable_bar_maps_write_combining_the_others_uncached(m):
    # PCI's own BAR mmap offers WC only for prefetchable resources
    # (resourceN_wc); vfio0's BAR0 is prefetchable, its BAR2 is not.
    assert m.device("vfio0").bar(0).prefetch and not m.device("vfio0").bar(2).prefetch
    with vfio_export(m, "vfio0", nbytes=4 * G) as (v, b):
        with b.mmap() as cpu:
            assert cpu.caching is Caching.WRITE_COMBINE
    with vfio_export(m, "vfio0", bar=2, offset=G, nbytes=4 * G) as (v, b):
        with b.mmap() as cpu:
            assert cpu.caching is Caching.UNCACHED


def test_memattr_applies_to_later_mmaps(m):
    # vfio_pci_core_feature_dma_buf_memattr: NC or WC on request; the vma's
    # prot is chosen in vfio_pci_dma_buf_mmap, so existing maps keep theirs.
    with vfio_export(m, "vfio0", nbytes=4 * G) as (v, b):
        v.set_dma_buf_memattr(b, Caching.UNCACHED)
        before = b.mmap()
        v.set_dma_buf_memattr(b, Caching.WRITE_COMBINE)
        after = b.mmap()
        assert (before.caching, after.caching) == (Caching.UNCACHED, Caching.WRITE_COMBINE)
        after.write(0, b"wc")
        assert before.read(0, 2) == b"wc"
        assert kernel_rc(v.set_dma_buf_memattr, b, "write-back") == -errno.ENOENT
        assert kernel_rc(v.set_dma_buf_memattr, b, 7) == -errno.ENOENT
        other = SystemHeap(m).allocate(G)
        assert kernel_rc(v.set_dma_buf_memattr, other, "uncached") == -errno.ENODEV  # not this device's
        other.put()
        v.set_dma_buf_memattr(b.fd(), "uncached")  # by fd, as the ioctl takes it
        assert b.mmap().caching is Caching.UNCACHED
        before.close()
        after.close()


def test_revoke_zaps_the_mmap_sigbus_and_unrevoke_faults_it_back(m):
    # revoke_mmap_mappings (unmap_mapping_range) at vfio_pci_dma_buf_move(revoked);
    # the fault handler gives VM_FAULT_SIGBUS while revoked, inserts again after.
    with vfio_export(m, "vfio0", nbytes=4 * G) as (v, b):
        cpu = b.mmap()
        cpu.write(0, b"live")
        faults = cpu.faults
        v.set_memory_decode(False, timeout=5)
        assert cpu.zaps == 1
        e = pytest.raises(errors.IOFailure, cpu.read, 0, 4).value
        assert "SIGBUS" in str(e)
        assert kernel_rc(b.mmap) == -errno.ENODEV  # vfio_pci_dma_buf_mmap refuses a revoked buffer
        v.set_memory_decode(True, timeout=5)
        assert cpu.read(0, 4) == b"live" and cpu.faults == faults + 1
        cpu.close()


def test_closing_the_device_revokes_the_mmap_for_good(m):
    with vfio_export(m, "vfio0", nbytes=4 * G) as (v, b):
        cpu = b.mmap()
        cpu.read(0, 4)
        v.close(timeout=5)
        pytest.raises(errors.IOFailure, cpu.read, 0, 4)
        cpu.close()


# ------------------------------------------------------ revoke, un-revoke


def test_decode_off_revokes_before_the_write_and_decode_on_unrevokes(m):
    imp = Polite()
    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), imp) as a:
        imp.map(a)
        v.set_memory_decode(False, timeout=5)
        assert imp.calls == 1 and imp.decode_seen == [True]  # told before the BAR stopped decoding
        assert b.revoked and b.live_mappings == 0 and not m.device("vfio1").memory_decode
        assert kernel_rc(a.map_unlocked, BIDI) == -errno.ENODEV
        v.set_memory_decode(True, timeout=5)
        assert imp.calls == 2 and not b.revoked  # told again, to re-map
        imp.map(a)
        v.set_memory_decode(True)  # a write that changes nothing notifies nobody
        assert imp.calls == 2


def test_the_config_write_waits_for_the_importer_to_unmap(m):
    tables = []
    unmapped_at = []

    class Later(ImporterOps):
        allow_peer2peer = True

        def invalidate_mappings(self, a):
            def go():
                time.sleep(0.05)
                for t in tables:
                    a.unmap_unlocked(t, BIDI)
                unmapped_at.append(time.monotonic())
            threading.Thread(target=go).start()

    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), Later()) as a:
        tables.append(a.map_unlocked(BIDI))
        v.set_memory_decode(False, timeout=5)
        returned = time.monotonic()
        assert unmapped_at and unmapped_at[0] <= returned and b.live_mappings == 0


def test_reset_times_out_on_an_importer_that_never_unmaps(m):
    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), Stubborn()) as a:
        t = a.map_unlocked(BIDI)
        with pytest.raises(errors.TimedOut) as ei:
            v.reset(timeout=0.05)
        assert "gpu1" in str(ei.value)
        assert v.resets == 0 and b.revoked  # where the kernel blocks: no reset yet
        a.unmap_unlocked(t, BIDI)
        v.reset(timeout=1)  # already revoked: nothing to wait for; reset, un-revoke
        assert v.resets == 1 and not b.revoked


def test_decode_off_times_out_and_leaves_the_bar_decoding(m):
    with vfio_export(m, "vfio1") as (v, b):
        f = Fence(fence_context_alloc(), 1)
        b.resv.lock()
        b.resv.reserve_fences(1)
        b.resv.add_fence(f, Usage.BOOKKEEP)
        b.resv.unlock()
        with pytest.raises(errors.TimedOut):
            v.set_memory_decode(False, timeout=0.05)
        assert m.device("vfio1").memory_decode and b.revoked
        f.signal()
        v.set_memory_decode(True, timeout=1)  # memory still enabled: un-revoke
        assert not b.revoked


def test_device_dma_to_the_bar_faults_while_it_does_not_decode(m):
    v = VfioPciBar(m, "vfio1")
    gpu = m.device("gpu1")
    bus = m.device("vfio1").bar(0).bus_start
    m.memory.write(m.device("vfio1").bar(0).cpu_start, b"ok")
    assert gpu.dma_read(bus, 2) == b"ok"
    for off, on in ((lambda: v.set_memory_decode(False), lambda: v.set_memory_decode(True)),
                    (lambda: v.set_power_state("D3hot"), lambda: v.set_power_state("D0")),
                    (v.low_power_entry, v.low_power_exit)):
        off()
        with pytest.raises(errors.IommuFault) as ei:
            gpu.dma_read(bus, 2)
        assert "does not decode" in str(ei.value)
        on()
        assert gpu.dma_read(bus, 2) == b"ok"
    v.close()


def test_power_states_low_power_and_reset(m):
    imp = Polite()
    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), imp) as a:
        imp.map(a)
        v.set_power_state("D3hot")
        assert b.revoked and imp.calls == 1
        v.set_memory_decode(False)
        v.set_power_state("D0")
        assert b.revoked  # D0 without decoding: still revoked
        v.set_memory_decode(True)
        assert not b.revoked
        with pytest.raises(errors.InvalidArgument):
            v.set_power_state("D3cold")
        assert v.power_state == "D0"
        # runtime low power
        v.low_power_entry()
        assert b.revoked and v.power_state == "D3hot"
        with pytest.raises(errors.InvalidArgument):
            v.low_power_entry()
        assert b.revoked
        v.low_power_exit()
        assert not b.revoked and v.power_state == "D0"
        v.low_power_exit()  # not engaged: nothing to do
        # a reset brings the device to D0: memory enabled again
        calls = imp.calls
        v.set_power_state("D3hot")
        v.reset()
        assert v.power_state == "D0" and not b.revoked and v.resets == 1 and imp.calls == calls + 2
        v.set_memory_decode(False)
        v.reset()
        assert b.revoked  # decoding stays off across the reset


def test_unrevoke_ordering_619_vs_71():
    """7.1 invalidates while the buffer is still revoked, so an importer
    re-mapping eagerly from the callback gets ENODEV; 6.19 cleared the flag
    first."""
    for kernel, want in (("7.1", -errno.ENODEV), ("6.19", 0)):
        m = Machine.default()
        got = []
        phase = []

        class Eager(ImporterOps):
            allow_peer2peer = True

            def invalidate_mappings(self, a):
                if phase == ["on"]:
                    got.append(kernel_rc(lambda: a.unmap(a.map(BIDI), BIDI)))

        with vfio_export(m, "vfio1", kernel=kernel) as (v, b), attached(b, m.device("gpu1"), Eager()):
            v.set_memory_decode(False)
            phase.append("on")
            v.set_memory_decode(True)
            assert got == [want] and not b.revoked


def test_619_revoke_does_not_wait_and_the_checker_catches_stale_dma(m):
    with vfio_export(m, "vfio1", kernel="6.19") as (v, b), attached(b, m.device("gpu1"), Stubborn()) as a:
        t = a.map_unlocked(BIDI)
        v.set_memory_decode(False)  # returns although the mapping is live
        assert b.revoked and b.live_mappings == 1
        v.set_memory_decode(True)
        with pytest.raises(errors.LifetimeError):
            m.device("gpu1").dma_read(int(t.dma_ranges()[0, 0]), 4)
        a.unmap_unlocked(t, BIDI)


# --------------------------------------------------------------- closing


def test_close_revokes_for_good(m):
    imp = Polite()
    other = VfioPciBar(m, "vfio1")  # a second open of the same device
    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), imp) as a:
        imp.map(a)
        other.close()  # not the last close: nothing happens to the buffers
        assert not b.revoked and v.dmabufs == [b]
        v.close(timeout=5)
        assert b.revoked and imp.calls == 1 and not b.exporter.linked
        assert kernel_rc(a.map_unlocked, BIDI) == -errno.ENODEV
        assert kernel_rc(b.dynamic_attach, m.device("gpu1"), NoP2p()) == -errno.EINVAL  # the negotiation first
        assert kernel_rc(b.dynamic_attach, m.device("gpu1"), Polite()) == -errno.ENODEV
        for call in (v.close, v.reset, v.export, lambda: v.set_memory_decode(True)):
            assert kernel_rc(call) == -errno.EBADF
        # Opening the device again does not bring the old buffers back.
        with VfioPciBar(m, "vfio1") as again:
            again.set_memory_decode(True)
            assert b.revoked and again.dmabufs == []


def test_close_times_out_and_leaves_the_device_open(m):
    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), Stubborn()) as a:
        t = a.map_unlocked(BIDI)
        with pytest.raises(errors.TimedOut):
            v.close(timeout=0.05)
        assert v.is_open and b.exporter.linked
        a.unmap_unlocked(t, BIDI)
        v.close()
        assert not v.is_open and not b.exporter.linked and b.revoked


def test_close_on_619(m):
    imp = Polite()
    with vfio_export(m, "vfio1", kernel="6.19") as (v, b), attached(b, m.device("gpu1"), imp):
        v.close()
        assert b.revoked and imp.calls == 1 and not b.exporter.linked


def test_release_unlinks_from_the_device(m):
    with vfio_export(m, "vfio1") as (v, b1):
        b2 = v.export()
        assert v.dmabufs == [b1, b2]
        b1.put()
        assert v.dmabufs == [b2] and not b1.exporter.linked
        v.set_memory_decode(False)  # b1 is gone and not visited
        assert b2.revoked and not b1.revoked
        b2.put()


def test_hot_reset_unrevokes_only_open_devices(m):
    imp = Polite()
    with vfio_export(m, "vfio1") as (v, b), attached(b, m.device("gpu1"), imp):
        vfio0 = m.device("vfio0")  # in the set, never opened
        vfio_pci_hot_reset([v, vfio0], timeout=5)
        assert imp.calls == 2 and not b.revoked and v.resets == 1
        with VfioPciBar(m, vfio0) as later:
            assert later.resets == 0  # nothing touched the device nobody had opened
        vfio_pci_hot_reset([later, v])  # a closed device: reset, nothing to un-revoke
        assert imp.calls == 4
        with pytest.raises(TypeError):
            vfio_pci_hot_reset(["vfio1"])


# --------------------------------------------- the iommufd private call


def test_iommufd_private_map_needs_one_range_an_iommufd_importer_and_the_lock(m):
    v2 = VfioPciBar(m, "vfio1", ranges=[(0, G), (4 * G, G)])
    two = v2.export()
    v1 = VfioPciBar(m, "vfio0", offset=8 * G, nbytes=2 * G)
    one = v1.export()
    heap = SystemHeap(m).allocate(4 * G)
    gpu = m.device("gpu1")
    atts = []
    for buf, ops, want in ((two, IommufdLike(), -errno.EOPNOTSUPP), (heap, IommufdLike(), -errno.EOPNOTSUPP),
                           (one, Polite(), -errno.EPERM)):
        # iommufd's way in is the PAL type; a heap buffer has none (SGT only)
        a = buf.dynamic_attach(gpu, ops) if buf is heap else buf.mapping_attach([mapping.pal_importer()], ops)
        atts.append((buf, a))
        buf.resv.lock()
        try:
            assert kernel_rc(vfio_pci_dma_buf_iommufd_map, a) == want
        finally:
            buf.resv.unlock()
    a = one.mapping_attach([mapping.pal_importer()], IommufdLike())
    atts.append((one, a))
    with pytest.raises(errors.LockingError):
        vfio_pci_dma_buf_iommufd_map(a)
    one.resv.lock()
    try:
        assert vfio_pci_dma_buf_iommufd_map(a) == (m.device("vfio0").bar(0).cpu_start + 8 * G, 2 * G)
    finally:
        one.resv.unlock()
    v1.set_memory_decode(False)
    one.resv.lock()
    try:
        assert kernel_rc(vfio_pci_dma_buf_iommufd_map, a) == -errno.ENODEV
    finally:
        one.resv.unlock()
    for buf, att in atts:
        buf.detach(att)
    for buf in (two, one, heap):
        buf.put()
    v1.close()
    v2.close()


def test_reprs(m):
    v = VfioPciBar(m, "vfio1", nbytes=G)
    b = v.export()
    assert "vfio1 BAR0" in repr(v) and "open" in repr(v) and "kernel 7.1" in repr(v)
    assert "4 KiB" in repr(b.exporter) and "linked" in repr(b.exporter)
    v.set_memory_decode(False)
    assert "decode off" in repr(v) and "revoked" in repr(b)
    b.put()
    v.close()
    assert "closed" in repr(v)


# ------------------------------------------------------ a lifecycle model


class VfioLifecycle(RuleBasedStateMachine):
    """Random config writes, power changes, resets, exports, maps and puts
    against a plain model: a linked buffer is revoked exactly when memory
    is not enabled; revoked buffers have no mappings; device DMA to the
    BAR works exactly while memory is enabled."""

    def __init__(self):
        super().__init__()
        self.m = Machine.default()
        self.v = VfioPciBar(self.m, "vfio1")
        self.gpu = self.m.device("gpu1")
        self.bar = self.m.device("vfio1").bar(0)
        self.decode, self.power, self.engaged = True, "D0", False
        self.bufs = []  # (buf, attachment, importer)

    def enabled(self):
        return self.decode and self.power == "D0" and not self.engaged

    @rule(enabled=st.booleans())
    def decode_write(self, enabled):
        self.v.set_memory_decode(enabled)
        self.decode = enabled

    @rule(state=st.sampled_from(["D0", "D3hot"]))
    def power_write(self, state):
        self.v.set_power_state(state)
        self.power = state

    @rule()
    def low_power(self):
        if self.engaged:
            with pytest.raises(errors.InvalidArgument):
                self.v.low_power_entry()
            self.v.low_power_exit()
            self.engaged, self.power = False, "D0"
        else:
            self.v.low_power_entry()
            self.engaged = True

    @rule()
    def reset(self):
        self.v.reset()
        self.power = "D0"

    @precondition(lambda self: len(self.bufs) < 4)
    @rule(pages=st.integers(1, 4), at=st.integers(0, 100))
    def export(self, pages, at):
        fd = self.v.feature_dma_buf(0, 0, 0, [(at * G, pages * G)])
        b = dma_buf_get(fd)
        close(fd)
        imp = Polite()
        try:
            a = b.dynamic_attach(self.gpu, imp)
        except errors.Revoked:
            assert not self.enabled()
            a = None
        else:
            assert self.enabled()
        self.bufs.append((b, a, imp))

    @rule(i=st.integers(0, 3))
    def map(self, i):
        if i >= len(self.bufs) or self.bufs[i][1] is None:
            return
        b, a, imp = self.bufs[i]
        if self.enabled():
            t = imp.map(a)
            assert self.gpu.dma_read(int(t.dma_ranges()[0, 0]), 1) is not None
        else:
            assert kernel_rc(a.map_unlocked, BIDI) == -errno.ENODEV

    @rule(i=st.integers(0, 3))
    def put(self, i):
        if i >= len(self.bufs):
            return
        b, a, imp = self.bufs.pop(i)
        if a is not None:
            for t in imp.tables:
                a.unmap_unlocked(t, BIDI)
            b.detach(a)
        b.put()

    @invariant()
    def revoked_iff_memory_disabled(self):
        for b, a, imp in self.bufs:
            assert b.revoked == (not self.enabled())
            if b.revoked:
                assert not imp.tables and b.live_mappings == 0

    @invariant()
    def bar_decodes_iff_enabled(self):
        try:
            self.gpu.dma_read(self.bar.bus_start, 1)
            ok = True
        except errors.IommuFault:
            ok = False
        assert ok == self.enabled()

    def teardown(self):
        while self.bufs:
            self.put(0)
        self.v.close()


TestVfioLifecycle = VfioLifecycle.TestCase
TestVfioLifecycle.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


class RaisingPolite(Polite):
    """A buggy importer: counts the call, then raises before unmapping."""

    def invalidate_mappings(self, a):
        self.calls += 1
        raise RuntimeError("importer bug")


@pytest.mark.parametrize("kernel", ["7.1", "6.19"])
def test_decode_off_revokes_every_buffer_when_an_importer_raises(m, kernel):
    v = VfioPciBar(m, "vfio0", kernel=kernel)
    bufs = [v.export() for _ in range(3)]
    polite = [Polite() for _ in bufs]
    bad = RaisingPolite()
    atts = [b.dynamic_attach(m.device("gpu0"), p) for b, p in zip(bufs, polite)]
    bad_att = bufs[1].dynamic_attach(m.device("nic0"), bad)  # the middle buffer, newest attachment
    for a, p in zip(atts, polite):
        p.map(a)
    bad_table = bad.map(bad_att)
    with pytest.raises(errors.LifetimeError) as ei:
        v.set_memory_decode(False, timeout=5)
    assert isinstance(ei.value.__cause__, RuntimeError) and "RaisingPolite" in str(ei.value)
    # Every buffer was revoked and every importer told, before and after
    # the one that raised; the raised report comes before the decode write.
    assert [b.revoked for b in bufs] == [True] * 3
    assert [p.calls for p in polite] == [1, 1, 1] and bad.calls == 1
    assert all(b.live_mappings == 0 for b in (bufs[0], bufs[2]))
    assert m.device("vfio0").memory_decode
    bad_att.unmap_unlocked(bad_table, BIDI)
    bad.tables.clear()
    if kernel == "7.1":
        v.set_memory_decode(False)  # nothing left to revoke: the write goes through
        assert not m.device("vfio0").memory_decode
    for b, a in zip(bufs, atts):
        b.detach(a)
    bufs[1].detach(bad_att)
    for b in bufs:
        b.put()
    v.close()
