"""The list-free two-step IOVA API (``dma_iova_try_alloc``, ``dma_iova_link``,
``dma_iova_sync``, ``dma_iova_unlink``, ``dma_iova_destroy``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydmabuf import DmaAttrs, DmaDirection, IovaState, dma_map_phys, dma_unmap_phys, errors

from machines import direct_device, iommu_device, machine

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL


def test_without_an_iommu_try_alloc_reserves_no_iova():
    m, d = direct_device()
    st_ = IovaState.try_alloc(d, 0, 0x10000)
    assert not st_.uses_iova and st_.addr == 0 and st_.size == 0
    with pytest.raises(errors.NotSupported):
        st_.link(0x1000, 0, 0x1000, BIDI)
    # The fallback is dma_map_phys.
    dma = dma_map_phys(d, 0x1000, 0x1000, BIDI)
    dma_unmap_phys(d, dma, 0x1000, BIDI)


def test_the_offset_of_phys_is_kept_in_the_iova():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0x1234, 0x3000)
    assert s.uses_iova and s.addr & 0xFFF == 0x234 and s.size == 0x3000
    base = s.addr & ~0xFFF
    assert d.domain.iovad.find(base >> 12) == (base >> 12, (base >> 12) + 3)  # ALIGN(0x3234) = 4 pages
    s.free()


@pytest.mark.parametrize("size", [0, 1 << 63, (1 << 63) + 0x1000, -1])
def test_sizes_that_cannot_be_reserved_use_no_iova(size):
    m, d = iommu_device()
    assert not IovaState.try_alloc(d, 0, size).uses_iova


def test_out_of_iova_just_uses_no_iova():
    m, d = iommu_device(dma_mask=32)
    d.domain.iovad.reserve(1, (1 << 20) - 1)
    assert not IovaState.try_alloc(d, 0, 0x1000).uses_iova


def test_only_the_first_link_may_be_unaligned():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0x1234, 0x3000)
    s.link(0x10234, 0, 0x2DCC, BIDI)  # ends at a granule boundary
    s.link(0x20000, 0x2DCC, 0x234, BIDI)  # IOVA addr + 0x2DCC is aligned
    with pytest.raises(errors.IOFailure):
        s.link(0x30010, 0x2DCC, 0x10, BIDI)
    s.sync()
    pt = d.domain.pgtable
    base = s.addr - 0x234
    assert pt.iova_to_phys(base) == 0x10000
    assert pt.iova_to_phys(base + 0x3000) == 0x20000
    s.destroy(0x3000, BIDI)


def test_misaligned_phys_and_iova_offsets_are_einval():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0, 0x4000)
    with pytest.raises(errors.InvalidArgument):
        s.link(0x10000, 0x800, 0x1000, BIDI)  # aligned phys, unaligned IOVA
    assert s.linked_nbytes == 0 and d.domain.stats["mapped_nbytes"] == 0
    s.free()


def test_link_over_a_mapped_iova_is_eexist_and_changes_nothing():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0, 0x4000)
    s.link(0x10000, 0, 0x2000, BIDI)
    before = d.domain.stats
    with pytest.raises(errors.AlreadyExists):
        s.link(0x50000, 0x1000, 0x2000, BIDI)
    after = d.domain.stats
    assert after["pte_writes"] == before["pte_writes"] and after["mapped_nbytes"] == 0x2000
    assert d.domain.pgtable.iova_to_phys(s.addr + 0x1000) == 0x11000
    s.destroy(0x2000, BIDI)


def test_link_many_then_one_sync_and_unlink_a_middle_range():
    m, d = iommu_device("lazy")
    s = IovaState.try_alloc(d, 0, 16 * G)
    rows = np.array([[0x100000 + 2 * k * G, G] for k in range(16)], dtype=np.uint64)
    assert s.link_ranges(rows, BIDI) == 16 * G
    st1 = d.domain.stats
    assert st1["leaf_sets"] == 16 and st1["sync_map_calls"] == 0
    s.sync()
    assert d.domain.stats["sync_map_calls"] == 1
    assert d.domain.stats["iotlb_invalidations"] == 0
    s.unlink(5 * G, 2 * G, BIDI)
    st2 = d.domain.stats
    # Unlink is strict even on a lazy domain: one range invalidation now.
    assert st2["iotlb_range_invalidations"] == 1 and st2["fq_pending"] == 0
    assert d.domain.pgtable.iova_to_phys(s.addr + 5 * G) is None
    assert d.domain.iovad.find(s.addr >> 12) is not None  # the IOVA stays reserved
    with pytest.raises(errors.LifetimeError):
        s.unlink(5 * G, G, BIDI)  # not linked any more
    with pytest.raises(errors.LifetimeError):
        s.destroy(16 * G, BIDI)  # [0, 16 pages) is no longer all linked
    s.unlink(0, 5 * G, BIDI)
    s.unlink(7 * G, 9 * G, BIDI)
    s.free()
    assert d.domain.stats["mapped_nbytes"] == 0


def test_destroy_invalidates_at_once_when_strict_and_defers_when_lazy():
    m, d = iommu_device("strict")
    s = IovaState.try_alloc(d, 0, 4 * G)
    s.link_ranges(np.array([[0x100000, 4 * G]], dtype=np.uint64), BIDI)
    s.destroy(4 * G, BIDI)
    assert d.domain.stats["iotlb_range_invalidations"] == 1
    assert d.domain.stats["iova_live_ranges"] == 0  # reusable at once
    m, d = iommu_device("lazy")
    s = IovaState.try_alloc(d, 0, 4 * G)
    s.link_ranges(np.array([[0x100000, 4 * G]], dtype=np.uint64), BIDI)
    s.destroy(4 * G, BIDI)
    assert d.domain.stats["iotlb_invalidations"] == 0 and d.domain.stats["fq_pending"] == 1
    with pytest.raises(errors.LifetimeError):
        s.link(0x100000, 0, G, BIDI)  # use after destroy
    # destroy(0) is free().
    s = IovaState.try_alloc(d, 0, 4 * G)
    s.destroy(0, BIDI)
    assert not s.live


def test_unaligned_mmio_on_a_bouncing_device_is_eperm():
    m = machine({"name": "ext", "iommu": "strict", "untrusted": True})
    d = m.device("ext")
    s = IovaState.try_alloc(d, 0x100, 0x1000)
    with pytest.raises(errors.NotPermitted):
        s.link(0x40000100, 0, 0x800, BIDI, DmaAttrs.MMIO)
    # RAM bounces its unaligned head instead.
    s.link(0x100100, 0, 0x800, BIDI)
    assert s.uses_swiotlb
    pool = m.swiotlb_pools["swiotlb"]
    assert pool.mappings == 1
    s.destroy(0x800, BIDI)
    assert pool.mappings == 0


def test_links_beyond_the_reservation_are_refused():
    m, d = iommu_device()
    s = IovaState.try_alloc(d, 0, 0x2000)
    with pytest.raises(errors.InvalidArgument):
        s.link(0x10000, 0x1000, 0x2000, BIDI)
    s.free()


def test_context_manager_and_resource_warning():
    m, d = iommu_device()
    with IovaState.try_alloc(d, 0, 0x2000) as s:
        s.link(0x10000, 0, 0x2000, BIDI)
    assert not s.live and d.domain.stats["mapped_nbytes"] == 0
    s = IovaState.try_alloc(d, 0, 0x2000)
    with pytest.warns(ResourceWarning):
        s.__del__()
    s.free()


def test_2m_aligned_links_use_2m_leaves():
    m, d = iommu_device()
    n = 8 << 20
    s = IovaState.try_alloc(d, 0, n)
    assert (s.addr % (2 << 20)) == 0
    s.link_ranges(np.array([[0x40000000, n]], dtype=np.uint64), BIDI)
    big = d.domain.stats["leaf_sets"]
    s.destroy(n, BIDI)
    m, d2 = iommu_device()
    s = IovaState.try_alloc(d2, 0, n)
    s.link_ranges(np.array([[0x40001000 + 0, n]], dtype=np.uint64), BIDI)  # off by a page
    small = d2.domain.stats["leaf_sets"]
    s.destroy(n, BIDI)
    assert big == 4 and small == 2048 and small == 512 * big


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0x100, 0x10000), st.integers(1, 8)), min_size=1, max_size=30),
       st.booleans())
def test_link_ranges_matches_one_link_at_a_time(ranges, lazy):
    rows = np.array([[pfn * G, n * G] for pfn, n in ranges], dtype=np.uint64)
    total = int(rows[:, 1].sum())
    m, d = iommu_device("lazy" if lazy else "strict")
    a = IovaState.try_alloc(d, 0, total)
    a.link_ranges(rows, BIDI)
    m2, d2 = iommu_device("lazy" if lazy else "strict")
    b = IovaState.try_alloc(d2, 0, total)
    off = 0
    for p, n in rows.tolist():
        b.link(p, off, n, BIDI)
        off += n
    assert a.addr == b.addr
    assert d.domain.pgtable.leaves().tolist() == d2.domain.pgtable.leaves().tolist()
    for k in ("leaf_sets", "table_sets", "table_pages", "mapped_nbytes"):
        assert d.domain.stats[k] == d2.domain.stats[k]
    a.destroy(total, BIDI)
    b.destroy(total, BIDI)
    assert d.domain.stats["mapped_nbytes"] == 0


def test_page_list_links_check_every_page_and_change_nothing_on_failure():
    m, d = iommu_device()
    n = 3000
    pages = np.empty((n, 2), dtype=np.uint64)
    pages[:, 0] = (np.arange(n, dtype=np.uint64) * 2 + 0x100000) << np.uint64(12)
    pages[:, 1] = G
    s = IovaState.try_alloc(d, 0, n * G)
    # An unaligned page past offset 0 is dma_iova_link()'s -EIO.
    for k, bad_phys, exc in [(1234, 0x123, errors.IOFailure), (2999, 1 << 60, errors.OutOfRange)]:
        rows = pages.copy()
        rows[k, 0] = bad_phys
        before = d.domain.stats
        with pytest.raises(exc) as ei:
            s.link_ranges(rows, BIDI)
        assert f"range {k} " in str(ei.value)
        after = d.domain.stats
        assert after["mapped_nbytes"] == 0 and after["leaf_sets"] == before["leaf_sets"]
        assert len(d.domain.pgtable.leaves()) == 0
    # One range that is not a single page takes the general path.
    rows = pages.copy()
    rows[-1, 1] = 2 * G
    with pytest.raises(errors.InvalidArgument):
        s.link_ranges(rows, BIDI)  # one page more than reserved
    rows = rows[:-1]
    assert s.link_ranges(rows, BIDI) == (n - 1) * G
    assert d.domain.pgtable.iova_to_phys(s.addr + 1234 * G) == int(pages[1234, 0])
    s.destroy((n - 1) * G, BIDI)


# ------------------------------------------- bounce buffers of the IOVA API

FROM_DEV = DmaDirection.FROM_DEVICE
TO_DEV = DmaDirection.TO_DEVICE


def _bounced_parts(phys, n):
    """The byte ranges (relative to the piece) that bounce when an
    untrusted device links ``[phys, +n)``: the sub-granule head and tail
    (iommu_dma_iova_link_swiotlb)."""
    parts = []
    head = phys & (G - 1)
    if head:
        h = min(n, G - head)
        parts.append((0, h))
        phys, start, n = phys + h, h, n - h
    else:
        start = 0
    tail = (phys + n) & (G - 1) if n else 0
    if tail:
        parts.append((start + n - tail, tail))
    return parts


def test_unlink_copies_device_writes_back_and_returns_every_slot():
    m = machine({"name": "ext", "iommu": "strict", "untrusted": True})
    d = m.device("ext")
    pool = m.swiotlb_pools["swiotlb"]
    phys, n = 0x100000100, 2 * G  # a bounced head (0xF00) and tail (0x100)
    for direction, attrs, copied in ((FROM_DEV, 0, True), (BIDI, 0, True), (TO_DEV, 0, False),
                                     (FROM_DEV, DmaAttrs.SKIP_CPU_SYNC, False)):
        m.memory.write(phys, b"\x11" * n)
        s = IovaState.try_alloc(d, phys, n)
        s.link(phys, 0, n, direction)
        assert pool.mappings == 2 and pool.slots_used > 0
        if direction != TO_DEV:
            d.dma_write(s.addr, b"\x77" * n)
        s.unlink(0, n, direction, attrs)
        assert pool.mappings == 0 and pool.slots_used == 0  # every slot back
        got = m.memory.read(phys, n)
        # The aligned middle was the device's own write (no bounce).
        assert got[0xF00:0x1F00] == (b"\x11" if direction == TO_DEV else b"\x77") * G
        head_tail = got[:0xF00] + got[0x1F00:]
        assert head_tail == (b"\x77" if copied else b"\x11") * 0x1000, (direction, attrs)
        s.free()
    assert d.domain.stats["mapped_nbytes"] == 0


def test_the_context_manager_gives_bounces_back_by_their_link_direction():
    m = machine({"name": "ext", "iommu": "strict", "untrusted": True})
    d = m.device("ext")
    pool = m.swiotlb_pools["swiotlb"]
    phys = 0x100000100
    m.memory.write(phys, b"\x11" * 2 * G)
    with IovaState.try_alloc(d, phys, 2 * G) as s:
        s.link(phys, 0, 2 * G, FROM_DEV)
        s.unlink(0xF00, G, FROM_DEV)  # the aligned middle: two bounced parts stay linked
        d.dma_write(s.addr, b"\x77" * 0xF00)
        d.dma_write(s.addr + 0x1F00, b"\x77" * 0x100)
    assert not s.live and pool.slots_used == 0 and pool.mappings == 0
    assert m.memory.read(phys, 0xF00) == b"\x77" * 0xF00
    assert m.memory.read(phys + 0x1F00, 0x100) == b"\x77" * 0x100


class BouncedIova(RuleBasedStateMachine):
    """Links of RAM ranges into one IOVA reservation of an untrusted device
    (their unaligned heads and tails bounce), device writes through them,
    unlinks piece by piece with any direction and SKIP_CPU_SYNC, and an end
    by destroy or the context manager.  Checked against a byte model: the
    pool holds exactly the live pieces' bounce slots, a device read sees
    the CPU bytes bounced in, and after an unlink the CPU memory holds the
    device's bytes where they went straight through or were copied back,
    and the old bytes where a bounce was not copied back."""

    def __init__(self):
        super().__init__()
        self.m = machine({"name": "ext", "iommu": "strict", "untrusted": True})
        self.d = self.m.device("ext")
        self.pool = self.m.swiotlb_pools["swiotlb"]
        self.st = None
        self.pieces = {}  # offset -> [phys, n, link direction, cpu bytes, device bytes or None]
        self.end = 0
        self.next_phys = 0x100000000

    @initialize(head=st.integers(0, G - 1))
    def reserve(self, head):
        self.head = head
        self.st = IovaState.try_alloc(self.d, head, 8 * G)
        assert self.st.uses_iova
        self.pieces.clear()
        self.end = 0

    @precondition(lambda self: not self.st.live)
    @rule(head=st.integers(0, G - 1))
    def reserve_again(self, head):
        self.reserve(head)

    def _fill(self, phys, n, seed):
        data = bytes((seed + i * 7) & 0xFF for i in range(n))
        self.m.memory.write(phys, data)
        return data

    @precondition(lambda self: self.st.live and (self.end == 0 or (self.head + self.end) % G == 0))
    @rule(pages=st.integers(0, 2), tail=st.integers(0, G - 1), direction=st.sampled_from([BIDI, FROM_DEV, TO_DEV]),
          seed=st.integers(0, 255))
    def link(self, pages, tail, direction, seed):
        n = pages * G + tail
        if n == 0 or self.end + n > 8 * G:
            return
        phys = self.next_phys + (self.head if self.end == 0 else 0)
        self.next_phys += 0x10000
        cpu = self._fill(phys, n, seed)
        self.st.link(phys, self.end, n, direction)
        self.pieces[self.end] = [phys, n, direction, cpu, None]
        self.end += n

    def _live(self):
        return sorted(self.pieces)

    @precondition(lambda self: self.st.live and self.pieces)
    @rule(data=st.data(), seed=st.integers(0, 255))
    def device_writes(self, data, seed):
        off = data.draw(st.sampled_from(self._live()))
        p = self.pieces[off]
        if p[2] == TO_DEV:
            return  # read-only for the device
        p[4] = bytes((seed * 3 + i) & 0xFF for i in range(p[1]))
        self.d.dma_write(self.st.addr + off, p[4])

    @precondition(lambda self: self.st.live and self.pieces)
    @rule(data=st.data(), direction=st.sampled_from([BIDI, FROM_DEV, TO_DEV]), skip=st.booleans())
    def unlink(self, data, direction, skip):
        off = data.draw(st.sampled_from(self._live()))
        phys, n, _d, cpu, dev = self.pieces.pop(off)
        self.st.unlink(off, n, direction, DmaAttrs.SKIP_CPU_SYNC if skip else 0)
        copied = direction in (BIDI, FROM_DEV) and not skip
        self._check_bytes(phys, n, cpu, dev, copied)

    def _check_bytes(self, phys, n, cpu, dev, copied):
        want = bytearray(cpu if dev is None else dev)
        if dev is not None and not copied:
            for o, ln in _bounced_parts(phys, n):
                want[o:o + ln] = cpu[o:o + ln]
        assert self.m.memory.read(phys, n) == bytes(want)

    @precondition(lambda self: self.st.live)
    @rule(how=st.sampled_from(["destroy", "with"]))
    def finish(self, how):
        left = dict(self.pieces)
        if how == "with":
            self.st.__exit__(None, None, None)
        elif not left:
            self.st.free()
        else:
            # destroy takes exactly [0, linked): only when nothing was unlinked.
            linked = [(s, e - s) for s, e in self.st._linked]
            if linked != [(0, self.end)]:
                for off, (phys, n, d_, cpu, dev) in sorted(left.items()):
                    self.st.unlink(off, n, d_)
                self.st.free()
            else:
                self.st.destroy(self.end, BIDI)
        for off, (phys, n, d_, cpu, dev) in left.items():
            copied = True if how == "destroy" else d_ in (BIDI, FROM_DEV)
            self._check_bytes(phys, n, cpu, dev, copied)
        self.pieces.clear()

    @invariant()
    def pool_holds_exactly_the_live_bounces(self):
        want = sum(len(_bounced_parts(p[0], p[1])) for p in self.pieces.values())
        assert self.pool.mappings == want
        if not want:
            assert self.pool.slots_used == 0

    @invariant()
    def the_device_reads_what_was_bounced_in(self):
        if self.st is None or not self.st.live:
            return
        for off, (phys, n, d_, cpu, dev) in self.pieces.items():
            if d_ != FROM_DEV and dev is None:
                assert self.d.dma_read(self.st.addr + off, n) == cpu

    def teardown(self):
        if self.st is not None and self.st.live:
            self.st.__exit__(None, None, None)
        assert self.pool.slots_used == 0 and self.pool.mappings == 0
        assert self.d.domain.stats["mapped_nbytes"] == 0


BouncedIova.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)
TestBouncedIova = BouncedIova.TestCase


# ------------------------------------------- the record of linked windows


def _mark_reference(linked, lo, hi):
    """The list-based record IovaState kept in Python before it moved into
    the core: merge [lo, hi) with every window it touches, keep sorted."""
    keep = []
    for s, e in linked:
        if e < lo or s > hi:
            keep.append((s, e))
        else:
            lo, hi = min(lo, s), max(hi, e)
    keep.append((lo, hi))
    keep.sort()
    return keep


def _cut_reference(linked, lo, hi):
    keep = []
    for s, e in linked:
        if s < lo:
            keep.append((s, min(e, lo)))
        if e > hi:
            keep.append((max(s, hi), e))
    return keep


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 64), st.integers(0, 16)), max_size=40))
def test_window_record_merges_and_cuts_as_the_list_did(ops):
    _, dev = iommu_device()
    s = IovaState.try_alloc(dev, 0, 80 * G)
    ref: list[tuple[int, int]] = []
    for mark, start, n in ops:
        lo, hi = start * G, (start + n) * G
        if mark:
            s._mark(lo, hi - lo)
            ref = _mark_reference(ref, lo, hi)
        else:
            s._cut(lo, hi)
            ref = _cut_reference(ref, lo, hi)
        assert s._linked == ref
        assert s.linked_nbytes == sum(e - b for b, e in ref)
        assert s._covered(lo, hi) == sum(max(0, min(e, hi) - max(b, lo)) for b, e in ref)
    s._cut(0, 80 * G)
    s.free()


def test_destroy_names_what_is_linked_when_it_does_not_match():
    _, dev = iommu_device()
    s = IovaState.try_alloc(dev, 0, 8 * G)
    s.link(0x100000, 0, G, BIDI)
    s.link(0x200000, 2 * G, G, BIDI)
    with pytest.raises(errors.LifetimeError, match=r"linked \[\(0, 4096\), \(8192, 4096\)\]"):
        s.destroy(3 * G, BIDI)
    with pytest.raises(errors.InvalidArgument, match="is not in 0..0x8000"):
        s.destroy(9 * G, BIDI)
    with pytest.raises(TypeError, match="mapped_nbytes must be an int"):
        s.destroy(1.0, BIDI)
    with pytest.raises(errors.LifetimeError, match="still linked"):
        s.destroy(0, BIDI)
    assert s._linked == [(0, G), (2 * G, 3 * G)] and s.live
    s.unlink(2 * G, G, BIDI)
    s.destroy(G, BIDI)
    assert not s.live and s._linked == []
    with pytest.raises(errors.LifetimeError, match="destroyed or freed"):
        s.sync()


def test_link_offset_checks_come_after_the_ranges_are_parsed():
    _, dev = iommu_device()
    s = IovaState.try_alloc(dev, 0, 4 * G)
    assert s.link_ranges(np.zeros((0, 2), dtype=np.uint64), BIDI, offset="x") == 0
    with pytest.raises(TypeError, match="dma_iova_link: offset must be an int, not str"):
        s.link_ranges([[0x100000, G]], BIDI, offset="x")
    with pytest.raises(errors.InvalidArgument, match="offset 16384 is outside"):
        s.link_ranges([[0x100000, G]], BIDI, offset=4 * G)
    with pytest.raises(TypeError):
        s.link_ranges(None, BIDI)
    assert s._linked == []
    s.free()


@pytest.mark.parametrize("kind", ["u64", "readonly", "memoryview", "flat", "list", "fortran", "int64", "u32"])
def test_link_ranges_takes_every_buffer_the_core_parser_takes(kind):
    # The link's fast path for (N, 2) native u64 buffers must accept and
    # refuse exactly what the general parser does, with its errors.
    rows = np.array([[0x100000, G], [0x300000, 2 * G]], dtype=np.uint64)
    arg = {"u64": rows, "readonly": rows.copy(), "memoryview": memoryview(rows), "flat": rows.reshape(-1),
           "list": rows.tolist(), "fortran": np.asfortranarray(rows), "int64": rows.astype(np.int64),
           "u32": rows.astype(np.uint32)}[kind]
    if kind == "readonly":
        arg.setflags(write=False)
    _, dev = iommu_device()
    s = IovaState.try_alloc(dev, 0, 4 * G)
    if kind in ("fortran", "int64", "u32"):
        with pytest.raises((ValueError, TypeError), match="dma_iova_link ranges"):
            s.link_ranges(arg, BIDI)
        assert s._linked == [] and dev.domain.stats["mapped_nbytes"] == 0
        s.free()
        return
    assert s.link_ranges(arg, BIDI) == 3 * G
    assert s._linked == [(0, 3 * G)]
    assert dev.domain.iova_to_phys(s.addr + G) == 0x300000
    s.destroy(3 * G, BIDI)


def test_close_unlinks_and_frees_like_leaving_a_with_block():
    """IovaState is an Owner: close() gives back what is linked and the
    reservation, once; a second close and a closed state's context do
    nothing."""
    from pydmabuf._lifecycle import Owner

    m, d = iommu_device("strict")
    st = IovaState.try_alloc(d, 0, 4 * G)
    assert isinstance(st, Owner) and st.live
    st.link_ranges([[0x1_0000_0000, 2 * G]], BIDI)
    st.sync(0, 2 * G)
    st.close()
    assert not st.live
    assert d.domain.stats["iova_live_ranges"] == 0 and d.domain.stats["mapped_nbytes"] == 0
    st.close()  # idempotent
    with st:
        pass
    with pytest.raises(errors.LifetimeError):
        st.link(0x1_0000_0000, 0, G, BIDI)
    with IovaState.try_alloc(d, 0, G) as st2:
        st2.link(0x1_0000_0000, 0, G, BIDI)
    assert not st2.live and d.domain.stats["mapped_nbytes"] == 0


# ------------------------------------------- the compiled per-call paths
#
# link_ranges and destroy take their common case (a device that does not
# bounce, arguments seen before) in pydmabuf._dma_api; the general Python
# path must leave exactly the same state.


def _round_trip(iommu, through_cache):
    from pydmabuf import _args

    m, dev = iommu_device(iommu)
    rows = np.array([[0x100000000, 2 * G], [0x100007000, G]], dtype=np.uint64)
    out = []
    for _ in range(3):
        if not through_cache:
            _args._LINK_ARGS.clear()
            _args._DIR_ATTRS.clear()
        st = IovaState.try_alloc(dev, 0x100000000, 3 * G)
        n = st.link_ranges(rows, BIDI)
        st.sync(0, n)
        out.append((st.addr, n, st.linked_nbytes, st._linked, dev.domain.stats))
        if not through_cache:
            _args._DIR_ATTRS.clear()
        st.destroy(n, BIDI)
        out.append((st.live, st.linked_nbytes, dev.domain.stats))
    return out


@pytest.mark.parametrize("iommu", ["strict", "lazy"])
def test_the_compiled_iova_paths_leave_what_the_general_path_leaves(iommu):
    _round_trip(iommu, True)  # fills the argument caches
    assert _round_trip(iommu, True) == _round_trip(iommu, False)


def test_the_compiled_iova_paths_take_the_common_case_and_decline_the_rest():
    from pydmabuf import _dma_api

    m, dev = iommu_device()
    rows = np.array([[0x100000000, G]], dtype=np.uint64)
    st = IovaState.try_alloc(dev, 0x100000000, 2 * G)
    st.destroy(st.link_ranges(rows, BIDI), BIDI)  # fills the argument caches
    st = IovaState.try_alloc(dev, 0x100000000, 2 * G)
    assert _dma_api.iova_link(st, rows, BIDI, 0, 0, False) == G and st.linked_nbytes == G
    # Declined, nothing done: the general path checks and raises.
    for args in [(rows, 1.0, 0, 0, False), (rows, BIDI, 0.0, 0, False), (rows, BIDI, 1 << 40, 0, False)]:
        assert _dma_api.iova_link(st, *args) == -1
    assert st.linked_nbytes == G
    for args in [(0, BIDI, 0), (G * 1.0, BIDI, 0), (G, 1.0, 0), (G, BIDI, 1 << 40)]:
        assert _dma_api.iova_destroy(st, *args) is False
    assert st.live and st.linked_nbytes == G
    with pytest.raises(errors.LifetimeError):  # the core's check, raised by the compiled call
        _dma_api.iova_destroy(st, 2 * G, BIDI, 0)
    assert st.live and st.linked_nbytes == G
    assert _dma_api.iova_destroy(st, G, BIDI, 0) is True and not st.live
    assert dev.domain.stats["mapped_nbytes"] == 0
    assert _dma_api.iova_link(st, rows, BIDI, 0, 0, False) == -1  # destroyed
    assert _dma_api.iova_destroy(st, G, BIDI, 0) is False
    _, nodev = direct_device()
    none = IovaState.try_alloc(nodev, 0, G)  # no IOVA: dma_map_phys is the way
    assert _dma_api.iova_link(none, rows, BIDI, 0, 0, False) == -1
    _, untrusted = iommu_device(untrusted=True)
    ut = IovaState.try_alloc(untrusted, 0x100000000, G)
    assert _dma_api.iova_link(ut, rows, BIDI, 0, 0, False) == -1 and ut.linked_nbytes == 0
    ut.free()
    with pytest.raises(TypeError):
        _dma_api.iova_link(None, rows, BIDI, 0, 0, False)


class _LyingInt(int):
    """An int whose comparisons always say no (a range check on the object
    would let any value through)."""

    def __lt__(self, other):
        return False

    def __le__(self, other):
        return False

    def __gt__(self, other):
        return False

    def __ge__(self, other):
        return False


@pytest.mark.parametrize("untrusted", [False, True])
def test_an_int_subclass_cannot_talk_its_way_past_the_reservation_checks(untrusted):
    m, dev = iommu_device(untrusted=untrusted)
    st = IovaState.try_alloc(dev, 0x100000000, 4 * G)
    rows = np.array([[0x100000000, G]], dtype=np.uint64)
    for off in (2**40, 2**64 - G, 4 * G):
        with pytest.raises(errors.InvalidArgument):
            st.link_ranges(rows, BIDI, offset=_LyingInt(off))
    assert st.linked_nbytes == 0 and dev.domain.stats["mapped_nbytes"] == 0
    st.link_ranges(rows, BIDI)
    for off, n in ((0, 8 * G), (2**40, G)):
        with pytest.raises(errors.InvalidArgument):
            st.sync(_LyingInt(off), _LyingInt(n))
        with pytest.raises(errors.InvalidArgument):
            st.unlink(_LyingInt(off), _LyingInt(n), BIDI)
    with pytest.raises(errors.InvalidArgument):
        st.destroy(_LyingInt(8 * G), BIDI)
    assert st.linked_nbytes == G
    st.destroy(_LyingInt(G), BIDI)
    assert not st.live and dev.domain.stats["mapped_nbytes"] == 0


@pytest.mark.parametrize("junk", [(), ("x",), "x", (1, 2, 3)])
def test_the_compiled_destroy_reads_no_argument_cache_entry_of_the_wrong_shape(junk):
    from pydmabuf import _args, _dma_api

    m, dev = iommu_device()
    st = IovaState.try_alloc(dev, 0x100000000, G)
    n = st.link_ranges(np.array([[0x100000000, G]], dtype=np.uint64), BIDI)
    try:
        _args._DIR_ATTRS[(BIDI, 0)] = junk
        assert _dma_api.iova_destroy(st, n, BIDI, 0) is False and st.live
    finally:
        _args._DIR_ATTRS.clear()
    st.destroy(n, BIDI)
    assert not st.live and dev.domain.stats["mapped_nbytes"] == 0
