"""Mapping types (``pydmabuf.mapping``): the kunit suite of the RFC's
``drivers/dma-buf/st-dma-mapping.c`` case by case, then the SGT and PAL
types, the attach flow, and the drivers' negotiations."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from pydmabuf import DmaDirection, errors, mapping
from pydmabuf._types import PAGE_SIZE
from pydmabuf.dmabuf import ImporterOps, export
from pydmabuf.exporters import SystemHeap, VfioPciBar
from pydmabuf.importers import IommufdIoas, KvmVm, RdmaMr
from pydmabuf.importers.kvm import KVM_MEM_VFIO_DMABUF
from pydmabuf.mapping import MappingMatch, MappingType, MatchArgs, match_mapping

from driver_helpers import Polite
from kernel_rc import kernel_rc

BIDI = DmaDirection.BIDIRECTIONAL
G = PAGE_SIZE


# ------------------------------------------------ the kunit mocks (P26)


class MockState:
    """What the mock callbacks saw; reset per case (the kunit init)."""

    def __init__(self) -> None:
        self.match_called = False
        self.match_exp: MappingMatch | None = None
        self.match_imp: MappingMatch | None = None
        self.match_raises: type[BaseException] | None = None
        self.finish_called = False
        self.finish_args: MatchArgs | None = None
        self.finish_exp: MappingMatch | None = None
        self.finish_imp: MappingMatch | None = None


class MockType(MappingType):
    def __init__(self, name: str, state: MockState) -> None:
        self.name = name
        self.state = state

    def match(self, dmabuf, exp, imp):  # type: ignore[override]
        st = self.state
        st.match_called, st.match_exp, st.match_imp = True, exp, imp
        if st.match_raises is not None:
            raise st.match_raises("mock")

    def finish_match(self, args, exp, imp):
        st = self.state
        st.finish_called, st.finish_args, st.finish_exp, st.finish_imp = True, args, exp, imp
        if args.attach is not None:
            args.attach.map_type = MappingMatch(self, exp.exp_ops)


class MockTypeNoMatch(MockType):
    match = None


@pytest.fixture
def mock():
    st = MockState()
    return st, MockType("A", st), MockType("B", st), MockTypeNoMatch("N", st)


class MockSgtOps:
    def map_dma_buf(self, attachment, direction):
        raise errors.NoDevice("the mock SGT map is never called")

    def unmap_dma_buf(self, attachment, table, direction):
        raise AssertionError("never called")


def _simple_sgt_exporter():
    from pydmabuf.dmabuf import Exporter

    class Simple(Exporter):
        name = "simple_sgt"
        single_exporter_match = mapping.sgt_exporter(MockSgtOps())

        def release(self, dmabuf):
            pass

    return Simple()


def _two_exp_exporter(type_a):
    from pydmabuf.dmabuf import Exporter

    class TwoExp(Exporter):
        name = "two_exp"

        def match_mapping(self, args):
            match_mapping(args, [MappingMatch(type_a), mapping.sgt_exporter(MockSgtOps())])

        def release(self, dmabuf):
            pass

    return TwoExp()


def _no_callbacks(st):
    return not st.match_called and not st.finish_called


# ------------------------------------------------------- the kunit cases


def test_match_fail(mock):
    st, A, B, _ = mock
    args = MatchArgs(imp_matches=[MappingMatch(A)])
    with pytest.raises(errors.InvalidArgument) as ei:  # a: no exporter entries
        match_mapping(args, None)
    assert ei.value.errno == errno.EINVAL and _no_callbacks(st)
    args = MatchArgs()  # b: args all zero, exporter [A]
    with pytest.raises(errors.InvalidArgument):
        match_mapping(args, [MappingMatch(A)])
    assert _no_callbacks(st)
    with pytest.raises(errors.InvalidArgument):  # c: as written upstream (empty importer list), exporter [B]
        match_mapping(args, [MappingMatch(B)])
    assert _no_callbacks(st)
    # ... and what step c is named for: different types never meet
    with pytest.raises(errors.InvalidArgument):
        match_mapping(MatchArgs(imp_matches=[MappingMatch(A)]), [MappingMatch(B)])
    assert _no_callbacks(st)


def test_match_no_match_callback(mock):
    st, _, _, N = mock
    M = [MappingMatch(N)]
    args = MatchArgs(imp_matches=M)
    match_mapping(args, M)
    assert not st.match_called and st.finish_called
    assert st.finish_args is args and st.finish_exp is M[0] and st.finish_imp is M[0]
    assert args.chosen == (M[0], M[0])


def test_match_callback_returns(mock):
    st, A, _, _ = mock
    imp, exp = [MappingMatch(A)], [MappingMatch(A)]
    st.match_raises = errors.NotSupported  # -EOPNOTSUPP: keep looking, then no match
    with pytest.raises(errors.InvalidArgument):
        match_mapping(MatchArgs(imp_matches=imp), exp)
    assert st.match_called and not st.finish_called
    st.match_raises = errors.OutOfMemory  # any other error aborts, propagated
    with pytest.raises(errors.OutOfMemory) as ei:
        match_mapping(MatchArgs(imp_matches=imp), exp)
    assert ei.value.errno == errno.ENOMEM and not st.finish_called


def test_match_exporter_priority(mock):
    st, A, B, _ = mock
    imp = [MappingMatch(A), MappingMatch(B)]
    exp = [MappingMatch(A), MappingMatch(B)]
    match_mapping(MatchArgs(imp_matches=imp), exp)
    assert st.finish_exp is exp[0] and st.finish_imp is imp[0]
    exp = [MappingMatch(B)]
    match_mapping(MatchArgs(imp_matches=imp), exp)  # the inner loop scans past A
    assert st.finish_exp is exp[0] and st.finish_imp is imp[1]


def test_match_importer_priority(mock):
    st, A, B, _ = mock
    exp = [MappingMatch(A), MappingMatch(B)]
    imp = [MappingMatch(B)]
    match_mapping(MatchArgs(imp_matches=imp), exp)
    assert st.finish_exp is exp[1] and st.finish_imp is imp[0]
    imp = [MappingMatch(B), MappingMatch(A)]
    match_mapping(MatchArgs(imp_matches=imp), exp)  # exporter order beats importer order
    assert st.finish_exp is exp[0] and st.finish_imp is imp[1]


@pytest.mark.parametrize("which", ["simple_sgt", "two_exp"])
def test_sgt_attach(m, mock, which):
    _, A, _, _ = mock
    exp = _simple_sgt_exporter() if which == "simple_sgt" else _two_exp_exporter(A)
    buf = export(exp, PAGE_SIZE)
    dev = m.device("gpu0")
    a = buf.attach(dev)
    assert a.map_type.type is mapping.SGT
    assert mapping.sgt_dma_device(a) is dev and not mapping.sgt_p2p_allowed(a)
    buf.detach(a)
    buf.put()


def test_mock_attach(m, mock):
    _, A, _, _ = mock

    class Ops(ImporterOps):
        def invalidate_mappings(self, attachment):
            pass

    buf = export(_two_exp_exporter(A), PAGE_SIZE)
    a = buf.mapping_attach([MappingMatch(A)], Ops(), None)
    assert a.map_type.type is A and a.device is None
    buf.detach(a)
    buf.put()


# --------------------------------------------------- matcher and entries


def test_a_match_that_returns_a_value_is_a_bug(mock):
    st, A, _, _ = mock

    class Positive(MockType):
        def match(self, dmabuf, exp, imp):  # type: ignore[override]
            return 1  # amdgpu's XGMI branch returned the enum's value

    P = Positive("P", st)
    with pytest.raises(TypeError):
        match_mapping(MatchArgs(imp_matches=[MappingMatch(P)]), [MappingMatch(P)])
    assert not st.finish_called


def test_entries_are_checked():
    with pytest.raises(TypeError):
        MappingMatch("SGT")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MatchArgs(imp_matches=["x"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        match_mapping(MatchArgs(), ["x"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        mapping.sgt_exporter(object())
    with pytest.raises(TypeError):
        mapping.pal_exporter(MockSgtOps())
    e = mapping.sgt_importer(None, True)
    assert e.importer_accepts_p2p == mapping.SgtP2p.IMPORTER_ACCEPTS_P2P and e.exp_ops is None
    assert "Scatter" in repr(e)


# --------------------------------------------------------------- the SGT type


def test_sgt_p2p_entry_needs_an_accepting_importer_with_a_route(m):
    ops = MockSgtOps()
    vfio1 = m.device("vfio1")
    exp = [mapping.sgt_exporter_p2p(ops, vfio1)]
    ok = MatchArgs(imp_matches=[mapping.sgt_importer(m.device("gpu1"), True)])  # same switch: BUS_ADDR
    match_mapping(ok, exp)
    for imp in (mapping.sgt_importer(m.device("gpu1"), False),  # does not accept P2P
                mapping.sgt_importer(m.device("gpu0"), True),  # no route (hb2 not whitelisted)
                mapping.sgt_importer(None, True)):  # no device
        with pytest.raises(errors.InvalidArgument):
            match_mapping(MatchArgs(imp_matches=[imp]), exp)
    # No exporting device: warned, not compatible; the plain entry behind it matches.
    broken = MappingMatch(mapping.SGT, ops, exporter_requires_p2p=mapping.SgtP2p.EXPORTER_REQUIRES_P2P_DISTANCE,
                          exporting_p2p_device=None)
    args = MatchArgs(imp_matches=[mapping.sgt_importer(m.device("gpu1"), True)])
    match_mapping(args, [broken, mapping.sgt_exporter(ops)])
    assert args.chosen is not None and args.chosen[0].exporter_requires_p2p == mapping.SgtP2p.NO_P2P
    # A value the switch does not know is compatible, as upstream.
    odd = MappingMatch(mapping.SGT, ops, exporter_requires_p2p=mapping.SgtP2p.IMPORTER_ACCEPTS_P2P)
    match_mapping(MatchArgs(imp_matches=[mapping.sgt_importer(None)]), [odd])


def test_sgt_map_on_another_type_is_einval_and_accessors_say_none(m, mock):
    _, A, _, _ = mock
    buf = export(_two_exp_exporter(A), PAGE_SIZE)
    a = buf.mapping_attach([MappingMatch(A)])
    assert mapping.sgt_dma_device(a) is None and not mapping.sgt_p2p_allowed(a) and mapping.get_sgt_ops(a) is None
    with buf.resv:
        assert kernel_rc(a.map, BIDI) == -errno.EINVAL
    buf.detach(a)
    buf.put()


def test_debugfs_lines_name_the_type(m, mock):
    _, A, _, _ = mock
    buf = export(_two_exp_exporter(A), PAGE_SIZE)
    a1 = buf.attach(m.device("gpu0"))
    a2 = buf.mapping_attach([MappingMatch(A)])
    assert buf.debugfs_attachments() == ["\tA:", "\tDMA Mapped Scatter Gather Table: gpu0"]
    buf.detach(a1)
    buf.detach(a2)
    buf.put()


# ------------------------------------------------------------- attaching


def test_negotiation_runs_before_the_exporter_attach_and_a_failure_leaves_nothing(m, mock):
    st, A, _, _ = mock
    seen = []

    class Refuses(type(_two_exp_exporter(A))):  # type: ignore[misc]
        def attach(self, attachment):
            seen.append(attachment.map_type.type)
            raise errors.Busy("no")

    buf = export(Refuses(), PAGE_SIZE)
    assert kernel_rc(buf.mapping_attach, [MappingMatch(A)]) == -errno.EBUSY
    assert seen == [A] and buf.attachments == []
    st.match_raises = errors.OutOfMemory
    assert kernel_rc(buf.mapping_attach, [MappingMatch(A)]) == -errno.ENOMEM
    assert seen == [A] and buf.attachments == []  # attach op not reached
    assert kernel_rc(buf.mapping_attach, []) == -errno.EINVAL
    with pytest.raises(errors.InvalidArgument):  # importer entries carry no ops
        buf.mapping_attach([mapping.sgt_exporter(MockSgtOps())])
    buf.put()


def test_export_needs_a_mapping_type(mock):
    from pydmabuf.dmabuf import Exporter

    class Nothing(Exporter):
        def release(self, dmabuf):
            pass

    class Both(Nothing):
        single_exporter_match = mapping.sgt_exporter(MockSgtOps())

        def match_mapping(self, args):
            match_mapping(args, [mapping.pal_exporter(PalOps([[0, G]]))])

    with pytest.raises(errors.InvalidArgument):
        export(Nothing(), G)
    b = export(Both(), G)  # both hooks: accepted, match_mapping wins
    a = b.mapping_attach([mapping.pal_importer(), mapping.sgt_importer(None)])
    assert a.map_type.type is mapping.PAL
    b.detach(a)
    b.put()


def test_the_static_and_dynamic_wrappers_are_one_sgt_entry(m):
    heap = SystemHeap(m).allocate(4 * G)
    s = heap.attach(m.device("gpu0"))
    d = heap.dynamic_attach(m.device("gpu0"), Polite())
    for a in (s, d):
        assert a.map_type.type is mapping.SGT and a.device is m.device("gpu0")
        assert not mapping.sgt_p2p_allowed(a)  # a legacy exporter is wrapped NO_P2P
    assert s.map_type.importer_accepts_p2p == mapping.SgtP2p.NO_P2P and not s.peer2peer
    assert d.map_type.importer_accepts_p2p == mapping.SgtP2p.IMPORTER_ACCEPTS_P2P and d.peer2peer
    t = d.map_unlocked(BIDI)  # through the compat entry's ops
    d.unmap_unlocked(t, BIDI)
    assert kernel_rc(heap.mapping_attach, [mapping.pal_importer()]) == -errno.EINVAL  # no PAL offered
    heap.detach(s)
    heap.detach(d)
    heap.put()


# ------------------------------------------------------------ the PAL type


class PalOps:
    """A PAL exporter's ops handing out fixed rows."""

    def __init__(self, rows, revoked_ok=False):
        self.rows = rows
        self.given_back = 0

    def map_phys(self, attachment):
        return mapping.PhysList(self.rows)

    def unmap_phys(self, attachment, phys_list):
        self.given_back += 1


class PalImporter(ImporterOps):
    import_namespaces = frozenset({mapping.PAL_MODULE})

    def __init__(self):
        self.lists = []

    def invalidate_mappings(self, attachment):
        for pl in self.lists:
            mapping.pal_unmap_phys(attachment, pl)
        self.lists.clear()


def _pal_buf(rows, size):
    from pydmabuf.dmabuf import Exporter

    ops = PalOps(rows)

    class PalOnly(Exporter):
        single_exporter_match = mapping.pal_exporter(ops)

        def release(self, dmabuf):
            pass

    return export(PalOnly(), size), ops


@pytest.mark.parametrize("rows, why", [
    ([], "no entries"),
    ([[0x10000, 0]], "length 0"),
    ([[0x10800, G]], "not page aligned"),
    ([[0x10000, G + 1]], "not page aligned"),
    ([[2**64 - G, 2 * G]], "wraps"),
    ([[0x10000, 4 * G], [0x20000, 4 * G]], "more than"),
])
def test_pal_list_is_validated_strictly_and_compat_lets_it_through(rows, why):
    buf, ops = _pal_buf(rows, 4 * G)
    imp = PalImporter()
    a = buf.mapping_attach([mapping.pal_importer()], imp)
    with buf.resv:
        with pytest.raises(errors.InvalidArgument, match=why):
            mapping.pal_map_phys(a)
        assert ops.given_back == 1 and a.live_mappings == 0  # a failed map hands nothing out
        pl = mapping.pal_map_phys(a, kernel_compat=True)
        assert pl.live and any(why in p for p in pl.problems)
        mapping.pal_unmap_phys(a, pl)
    buf.detach(a)
    buf.put()


def test_pal_map_gate_lock_type_and_ownership(m):
    buf, ops = _pal_buf([[0x10000, 2 * G], [0x40000, 2 * G]], 4 * G)
    imp = PalImporter()
    a = buf.mapping_attach([mapping.pal_importer()], imp)
    assert a.map_type.type is mapping.PAL and a.map_type.exp_ops is ops
    plain = buf.mapping_attach([mapping.pal_importer()], Polite())
    with buf.resv:
        assert kernel_rc(mapping.pal_map_phys, plain) == -errno.EPERM  # did not declare PAL_MODULE
        pl = mapping.pal_map_phys(a)
    assert pl.length == 2 and pl.nbytes == 4 * G and not pl.ranges.flags.writeable
    with pytest.raises(errors.LockingError):
        mapping.pal_map_phys(a)
    with pytest.raises(errors.LifetimeError):  # detach while the importer still owns a list
        buf.detach(a)
    imp.lists.append(pl)
    buf.revoke(timeout=5)  # the importer gives the list back inside the callback
    assert not pl.live and ops.given_back == 1 and buf.live_mappings == 0
    with buf.resv, pytest.raises(errors.LifetimeError):  # a second give-back
        mapping.pal_unmap_phys(a, pl)
    buf.detach(a)
    buf.detach(plain)
    buf.put()


def test_a_revoke_waits_for_pal_lists_not_given_back(m):
    buf, _ = _pal_buf([[0x10000, G]], G)

    class Keeps(PalImporter):
        def invalidate_mappings(self, attachment):
            pass  # ignores the revoke: keeps the list

    a = buf.mapping_attach([mapping.pal_importer()], Keeps())
    with buf.resv:
        pl = mapping.pal_map_phys(a)
    with pytest.raises(errors.TimedOut):
        buf.revoke(timeout=0.05)
    with buf.resv:
        mapping.pal_unmap_phys(a, pl)
    buf.wait_unmapped(timeout=1)
    buf.detach(a)
    buf.put()


# ---------------------------------------------------- drivers' negotiations


def test_vfio_offers_pal_then_sgt_p2p(m):
    v = VfioPciBar(m, "vfio1", nbytes=1 << 20)
    b = v.export()
    imp = PalImporter()
    pal = b.mapping_attach([mapping.pal_importer(), mapping.sgt_importer(m.device("gpu1"), True)], imp)
    assert pal.map_type.type is mapping.PAL  # the exporter's first entry wins
    sgt = b.dynamic_attach(m.device("gpu1"), Polite())  # P2P importer with a route: SGT with P2P
    assert sgt.map_type.type is mapping.SGT and mapping.sgt_p2p_allowed(sgt)
    assert kernel_rc(b.attach, m.device("gpu1")) == -errno.EINVAL  # static importer: no match
    with b.resv:
        pl = mapping.pal_map_phys(pal)
        assert pl.ranges.tolist() == b.exporter.ranges.tolist()
        mapping.pal_unmap_phys(pal, pl)
    v.set_memory_decode(False, timeout=5)
    with b.resv:  # strict: VFIO's PAL map refuses a revoked buffer (v1 does not look)
        assert kernel_rc(mapping.pal_map_phys, pal) == -errno.ENODEV
        pl = mapping.pal_map_phys(pal, kernel_compat=True)
        mapping.pal_unmap_phys(pal, pl)
    b.detach(pal)
    b.detach(sgt)
    b.put()
    v.close()


def test_rdma_p2p_importer_of_vfio_gets_sgt_with_p2p(m):
    v = VfioPciBar(m, "vfio0", nbytes=2 << 20)
    b = v.export()
    mr = RdmaMr.register(m.device("nic0"), b, 0, 2 << 20)
    a = mr.umem.attachment
    assert a.map_type.type is mapping.SGT and mapping.sgt_p2p_allowed(a)
    assert mapping.sgt_dma_device(a) is m.device("nic0")
    mr.dereg()
    b.put()
    v.close()


def test_kvm_and_iommufd_get_pal_from_vfio_and_kvm_sgt_from_a_heap(m):
    v = VfioPciBar(m, "vfio0", nbytes=1 << 20)
    b = v.export()
    vm = KvmVm(m, private_mem=True)
    vm.set_user_memory_region2(0, KVM_MEM_VFIO_DMABUF, 1 << 32, 1 << 20, guest_memfd=b)
    assert vm.memslots[0].attachment.map_type.type is mapping.PAL
    with IommufdIoas(m) as ioas:
        ioas.map_file(b, 0, 1 << 20)
        assert ioas.areas[0].pages.attachment.map_type.type is mapping.PAL
    heap = SystemHeap(m).allocate(1 << 20)
    vm.set_user_memory_region2(1, KVM_MEM_VFIO_DMABUF, 2 << 32, 1 << 20, guest_memfd=heap)
    assert vm.memslots[1].attachment.map_type.type is mapping.SGT  # heap offers SGT only
    vm.close()
    heap.put()
    b.put()
    v.close()


def test_phys_vec_is_a_thin_layer_over_pal(m):
    v = VfioPciBar(m, "vfio1", ranges=[(0, 2 * G), (8 * G, G)])
    b = v.export()
    a = b.mapping_attach([mapping.pal_importer()], PalImporter())
    with b.resv:
        pv = a.phys_vec()
        assert pv.ranges.tolist() == b.exporter.ranges.tolist() and pv.provider is b.exporter.provider
    assert a.live_mappings == 0 and b.exporter.pal_maps == b.exporter.pal_unmaps == 1  # given back at once
    b.detach(a)
    b.put()
    v.close()
    rows = np.array([[0x10000, G]], dtype=np.uint64)
    assert mapping.PhysList(rows).ranges.tolist() == rows.tolist()


# ------------------------------------------------- a driver-private type


def _xe(m, **kw):
    from pydmabuf.exporters.xe_vfio import XeSriovPf, XeVfioPciBar

    sriov = XeSriovPf(m.device("gpu1"))
    sriov.provision_vf(m.device("vfio1"), 0x2_0000_0000, 4 << 20)
    v = XeVfioPciBar(m, "vfio1", **kw)
    return sriov, v, v.export()


def test_private_type_matches_only_the_pf_of_the_vf_naming_the_same_bar(m):
    from pydmabuf.exporters.xe_vfio import XE_IOV, xe_iov_importer, xe_iov_map, xe_iov_unmap

    _, v, b = _xe(m, offset=1 << 20, nbytes=1 << 20)
    gpu1, gpu0 = m.device("gpu1"), m.device("gpu0")
    pf = b.mapping_attach([xe_iov_importer(gpu1, 0), mapping.sgt_importer(gpu1, True)], Polite())
    assert pf.map_type.type is XE_IOV and pf.map_type.vf is m.device("vfio1")
    with b.resv:
        rows = xe_iov_map(pf)
        assert rows.tolist() == [[0x2_0000_0000 + (1 << 20), 1 << 20]]  # VRAM, not BAR addresses
        xe_iov_unmap(pf, rows)
    assert b.debugfs_attachments()[0] == "\tXe IOV interconnect: gpu1 <- vfio1 BAR0"
    # Another BAR: not this pair; the importer's SGT entry is what matches then.
    other_bar = b.mapping_attach([xe_iov_importer(gpu1, 2), mapping.sgt_importer(gpu1, True)], Polite())
    assert other_bar.map_type.type is mapping.SGT
    with b.resv:
        assert kernel_rc(xe_iov_map, other_bar) == -errno.EINVAL
    # Not the PF (and no P2P route for its scatterlist): nothing matches.
    assert kernel_rc(b.mapping_attach, [xe_iov_importer(gpu0, 0), mapping.sgt_importer(gpu0, True)],
                     Polite()) == -errno.EINVAL
    v.set_memory_decode(False, timeout=5)
    with b.resv:
        assert kernel_rc(xe_iov_map, pf) == -errno.ENODEV
    for a in (pf, other_bar):
        b.detach(a)
    b.put()
    v.close()


def test_private_type_keeps_a_vf_inside_its_own_vram(m):
    from pydmabuf.exporters.xe_vfio import XeVfioPciBar, xe_iov_importer, xe_iov_map

    _, v, b = _xe(m, offset=2 << 20, nbytes=4 << 20)  # past the VF's 4 MiB of VRAM
    a = b.mapping_attach([xe_iov_importer(m.device("gpu1"), 0)], Polite())
    with b.resv:
        assert kernel_rc(xe_iov_map, a) == -errno.EPERM
    b.detach(a)
    b.put()
    v.close()
    # A plain VFIO device offers no IOV entry.
    plain = VfioPciBar(m, "vfio0", nbytes=1 << 20)
    pb = plain.export()
    assert kernel_rc(pb.mapping_attach, [xe_iov_importer(m.device("gpu1"), 0)]) == -errno.EINVAL
    pb.put()
    plain.close()
    assert isinstance(XeVfioPciBar, type)


# ------------------------------------------ the matcher against its rules


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300)
@given(st.lists(st.sampled_from("ABN"), max_size=4), st.lists(st.sampled_from("ABN"), max_size=4),
       st.dictionaries(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                       st.sampled_from(["ok", "skip", "abort"])))
def test_matcher_picks_the_first_compatible_pair_in_exporter_order(exp_names, imp_names, outcome):
    """Slow reference: walk (exporter index, importer index) in
    lexicographic order; same type and a match that says ok (or no match
    callback) wins; an abort stops everything."""
    calls = []

    class T(MappingType):
        def __init__(self, name):
            self.name = name

        def match(self, dmabuf, exp, imp):  # type: ignore[override]
            key = (exp.idx, imp.idx)
            calls.append(key)
            o = outcome.get(key, "ok")
            if o == "skip":
                raise errors.NotSupported("skip")
            if o == "abort":
                raise errors.Busy("abort")

        def finish_match(self, args, exp, imp):
            calls.append(("finish", exp.idx, imp.idx))

    class TN(T):
        match = None

    types = {"A": T("A"), "B": T("B"), "N": TN("N")}
    exp = [MappingMatch(types[n], idx=i) for i, n in enumerate(exp_names)]
    imp = [MappingMatch(types[n], idx=i) for i, n in enumerate(imp_names)]
    want = "einval"
    for i, e in enumerate(exp_names):
        for j, n in enumerate(imp_names):
            if n != e:
                continue
            o = "ok" if e == "N" else outcome.get((i, j), "ok")
            if o == "skip":
                continue
            want = ("chosen", i, j) if o == "ok" else "abort"
            break
        if want != "einval":
            break
    args = MatchArgs(imp_matches=imp)
    if want == "einval":
        with pytest.raises(errors.InvalidArgument):
            match_mapping(args, exp)
        assert not any(c[0] == "finish" for c in calls)
    elif want == "abort":
        with pytest.raises(errors.Busy):
            match_mapping(args, exp)
        assert not any(c[0] == "finish" for c in calls)
    else:
        match_mapping(args, exp)
        assert calls[-1] == ("finish", want[1], want[2])
        assert args.chosen == (exp[want[1]], imp[want[2]])
    # match only ever sees same-type pairs
    assert all(exp_names[c[0]] == imp_names[c[1]] for c in calls if c[0] != "finish")


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 6)), min_size=1, max_size=8), st.data())
def test_walker_matches_a_page_by_page_reference(entries, data):
    from pydmabuf.importers.iommufd import dmabuf_runs

    rows = np.array([[pfn << 12, n << 12] for pfn, n in entries], dtype=np.uint64)
    total = sum(n for _, n in entries)
    first = data.draw(st.integers(0, total - 1))
    npages = data.draw(st.integers(1, total - first))
    # Reference: every page's pfn, in order, then the contiguous runs.
    pages = [pfn + k for pfn, n in entries for k in range(n)][first:first + npages]
    want = []
    for p in pages:
        if want and want[-1][0] + want[-1][1] == p:
            want[-1][1] += 1
        else:
            want.append([p, 1])
    assert dmabuf_runs(rows, first * G, npages).tolist() == want


def test_pal_calls_refuse_what_is_not_theirs(m):
    with pytest.raises(TypeError):
        mapping.pal_map_phys(None)  # type: ignore[arg-type]
    buf, _ = _pal_buf([[0x10000, G]], G)
    a = buf.mapping_attach([mapping.pal_importer()], PalImporter())
    with pytest.raises(TypeError):
        mapping.pal_unmap_phys(a, [[0x10000, G]])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        buf.mapping_attach(["PAL"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        buf.mapping_attach([mapping.pal_importer()], object())  # type: ignore[arg-type]
    with buf.resv, pytest.raises(errors.LifetimeError):  # a list it never handed out
        mapping.pal_unmap_phys(a, mapping.PhysList([[0x10000, G]]))
    buf.detach(a)
    with buf.resv, pytest.raises(errors.LifetimeError):
        mapping.pal_map_phys(a)
    assert len(buf.attachments) == 0
    buf.put()


def test_kernel_style_returns_from_match(mock):
    """None or 0 is compatible, a negative errno is that error (-EOPNOTSUPP
    keeps looking), a positive value is a bug."""
    st, _, _, _ = mock
    results = {"Z": 0, "E": -errno.EOPNOTSUPP, "M": -errno.ENOMEM, "P": 1}

    class K(MockType):
        def match(self, dmabuf, exp, imp):  # type: ignore[override]
            return results[self.name]

    Z, E_, M, P = (K(n, st) for n in "ZEMP")
    match_mapping(MatchArgs(imp_matches=[MappingMatch(Z)]), [MappingMatch(Z)])
    assert st.finish_called
    with pytest.raises(errors.InvalidArgument):
        match_mapping(MatchArgs(imp_matches=[MappingMatch(E_)]), [MappingMatch(E_)])
    with pytest.raises(errors.OutOfMemory):
        match_mapping(MatchArgs(imp_matches=[MappingMatch(M)]), [MappingMatch(M)])
    with pytest.raises(TypeError):
        match_mapping(MatchArgs(imp_matches=[MappingMatch(P)]), [MappingMatch(P)])
    pl = mapping.PhysList([[0x1000, G]])
    assert np.asarray(pl).tolist() == pl.tolist() == [[0x1000, G]] and pl[0].tolist() == [0x1000, G]


def test_a_pal_capable_heap_serves_both_kinds_of_importer(m):
    """The study's PAL path: one round trip as an iommufd-style importer
    does it (attach [PAL], map under the lock, link the ranges with the
    list-free API, then undo), next to the SGT importer of the same
    buffer."""
    from pydmabuf import IovaState
    from pydmabuf.exporters.system_heap import PalHeapBuffer

    pfns = m.pages.alloc(16, "fragmented", 4)
    buf = export(PalHeapBuffer(m, pfns, 16 * G, owned=True, layout="fragmented", seed=4), 16 * G)
    dev = m.device("gpu0")
    sgt = buf.dynamic_attach(dev, Polite())
    assert sgt.map_type.type is mapping.SGT
    a = buf.mapping_attach([mapping.pal_importer()], PalImporter())
    with buf.resv:
        pl = mapping.pal_map_phys(a)
    st_ = IovaState.try_alloc(dev, 0, 16 * G)
    n = st_.link_ranges(pl.ranges, BIDI)
    st_.sync(0, n)
    assert n == 16 * G and dev.domain.iova_to_phys(st_.addr) == int(pfns[0]) << 12
    st_.destroy(n, BIDI)
    with buf.resv:
        mapping.pal_unmap_phys(a, pl)
    buf.detach(a)
    buf.detach(sgt)
    buf.put()


def test_a_mapping_match_copies_and_reports_missing_data_without_recursing():
    import copy

    entry = mapping.sgt_exporter(MockSgtOps())
    clone = copy.copy(entry)
    assert clone.type is entry.type
    with pytest.raises(AttributeError, match="no 'nothing_here'"):
        entry.nothing_here
    bare = MappingMatch.__new__(MappingMatch)  # as copy and pickle build one
    with pytest.raises(AttributeError, match="mapping entry has no 'x'"):
        bare.x
