"""Scatterlists: the kernel's sg_table rules, against a literal model."""

from __future__ import annotations

import copy
import errno
import threading

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pydmabuf
from pydmabuf import SgTable, errors

from sg_reference import UINT_MAX, RefError, RefTable, core_slots, ref_slots_for_compare

PAGE = 4096

# tools/testing/scatterlist/main.c, as data: (ret, npages, pfns, append_pfns,
# size, max_segment, expected nents).  The harness fabricates page pointers
# from pfn + 1, which does not change contiguity, and uses offset 0.
KERNEL_TABLE = [
    (-errno.EINVAL, 1, [0], None, PAGE, 0, 1),
    (0, 1, [0], None, PAGE, PAGE + 1, 1),
    (0, 1, [0], None, PAGE, UINT_MAX, 1),
    (0, 1, [0], None, 1, UINT_MAX, 1),
    (0, 2, [0, 1], None, 2 * PAGE, UINT_MAX, 1),
    (0, 2, [1, 0], None, 2 * PAGE, UINT_MAX, 2),
    (0, 3, [0, 1, 2], None, 3 * PAGE, UINT_MAX, 1),
    (0, 3, [0, 1, 2], None, 3 * PAGE, UINT_MAX, 1),
    (0, 3, [0, 1, 2], [3, 4, 5], 3 * PAGE, UINT_MAX, 1),
    (0, 3, [0, 1, 2], [4, 5, 6], 3 * PAGE, UINT_MAX, 2),
    (0, 3, [0, 2, 1], None, 3 * PAGE, UINT_MAX, 3),
    (0, 3, [0, 1, 3], None, 3 * PAGE, UINT_MAX, 2),
    (0, 3, [1, 2, 4], None, 3 * PAGE, UINT_MAX, 2),
    (0, 3, [1, 3, 4], None, 3 * PAGE, UINT_MAX, 2),
    (0, 4, [0, 1, 3, 4], None, 4 * PAGE, UINT_MAX, 2),
    (0, 5, [0, 1, 3, 4, 5], None, 5 * PAGE, UINT_MAX, 2),
    (0, 5, [0, 1, 3, 4, 6], None, 5 * PAGE, UINT_MAX, 3),
    (0, 5, [0, 1, 2, 3, 4], None, 5 * PAGE, UINT_MAX, 1),
    (0, 5, [0, 1, 2, 3, 4], None, 5 * PAGE, 2 * PAGE, 3),
    (0, 6, [0, 1, 2, 3, 4, 5], None, 6 * PAGE, 2 * PAGE, 3),
    (0, 6, [0, 2, 3, 4, 5, 6], None, 6 * PAGE, 2 * PAGE, 4),
    (0, 6, [0, 1, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], 6 * PAGE, 12 * PAGE, 2),
]


def u64(xs):
    return np.asarray(xs, dtype=np.uint64)


@pytest.mark.parametrize("ret,npages,pfns,pfn_app,size,max_seg,expect", KERNEL_TABLE)
def test_kernel_selftest_table(ret, npages, pfns, pfn_app, size, max_seg, expect):
    assert len(pfns) == npages
    # The harness's fabricated pages are pfn + 1.
    pages = u64([p + 1 for p in pfns])
    if pfn_app is None:
        if ret:
            with pytest.raises(errors.DmaBufError) as ei:
                SgTable.from_pages(pages, nbytes=size, max_segment=max_seg)
            assert ei.value.errno == -ret
            return
        t = SgTable.from_pages(pages, nbytes=size, max_segment=max_seg)
        assert t.nents == expect
        assert t.orig_nents == expect
        return
    t = SgTable()
    t.append_pages(pages, nbytes=size, max_segment=max_seg, left_pages=npages)
    t.append_pages(u64([p + 1 for p in pfn_app]), nbytes=size, max_segment=max_seg, left_pages=0)
    assert t.nents == expect
    assert t.orig_nents == expect


def test_append_rows_in_detail():
    # Row 9: all three appended pages merge into the single entry.
    t = SgTable()
    t.append_pages(u64([1, 2, 3]), left_pages=3)
    assert t.total_nents == 4  # chunks + left_pages slots on the first call
    t.append_pages(u64([4, 5, 6]))
    assert t.cpu_ranges().tolist() == [[PAGE, 6 * PAGE]]
    # Row 10: no merge; the slot allocated ahead of time is reused.
    t = SgTable()
    t.append_pages(u64([1, 2, 3]), left_pages=3)
    t.append_pages(u64([5, 6, 7]))
    assert t.nents == 2 and t.nchunks == 1 and t.nslots == 4
    assert t.cpu_ranges().tolist() == [[PAGE, 3 * PAGE], [5 * PAGE, 3 * PAGE]]
    # Row 22: [0,1] + [3..6], then 7..12 appended onto the 4-page entry.
    t = SgTable()
    t.append_pages(u64([1, 2, 4, 5, 6, 7]), max_segment=12 * PAGE, left_pages=6)
    t.append_pages(u64(range(8, 14)), max_segment=12 * PAGE)
    assert t.cpu_ranges().tolist() == [[PAGE, 2 * PAGE], [4 * PAGE, 10 * PAGE]]


@pytest.mark.parametrize("max_seg", [0, 1, 4095])
def test_max_segment_below_a_page_is_einval(max_seg):
    with pytest.raises(errors.InvalidArgument):
        SgTable.from_pages(u64([0, 1, 2]), max_segment=max_seg)


def test_max_segment_rounds_down_to_a_page():
    # 8191 behaves as 4096: three pages, three entries.
    t = SgTable.from_pages(u64([0, 1, 2]), max_segment=8191)
    assert t.nents == 3
    assert t.cpu_ranges()[:, 1].tolist() == [PAGE] * 3
    # 4097 behaves as 4096; UINT_MAX as 0xFFFFF000.
    assert SgTable.from_pages(u64([0, 1]), max_segment=4097).nents == 2
    assert SgTable.from_pages(u64([0, 1]), max_segment=UINT_MAX).nents == 1


def test_max_segment_beyond_unsigned_int_is_einval():
    with pytest.raises(errors.InvalidArgument):
        SgTable.from_pages(u64([0]), max_segment=2**32)


def test_run_split_exactly_at_max_segment():
    # 8 contiguous pages, max 4 pages: two entries of exactly 4 pages.
    t = SgTable.from_pages(u64(range(100, 108)), max_segment=4 * PAGE)
    assert t.cpu_ranges().tolist() == [[100 * PAGE, 4 * PAGE], [104 * PAGE, 4 * PAGE]]
    # 9 pages: a third entry of one page.
    t = SgTable.from_pages(u64(range(100, 109)), max_segment=4 * PAGE)
    assert t.cpu_ranges()[:, 1].tolist() == [4 * PAGE, 4 * PAGE, PAGE]


def test_offset_and_partial_last_page():
    t = SgTable.from_pages(u64([5, 6, 7]), offset=0x100, nbytes=3 * PAGE - 0x100)
    assert t.nents == 1
    e = t.entries[0]
    assert (int(e["offset"]), int(e["length"])) == (0x100, 0x2F00)
    assert t.cpu_ranges().tolist() == [[5 * PAGE + 0x100, 0x2F00]]
    # [5, 7], offset 0x100, 0x1000 bytes: (0x100, 0xF00) and (0, 0x100).
    t = SgTable.from_pages(u64([5, 7]), offset=0x100, nbytes=0x1000)
    rows = [(int(r["offset"]), int(r["length"])) for r in t.entries]
    assert rows == [(0x100, 0xF00), (0, 0x100)]
    assert t.total_nbytes == 0x1000


def test_one_page_one_byte():
    t = SgTable.from_pages(u64([42]), nbytes=1)
    assert t.cpu_ranges().tolist() == [[42 * PAGE, 1]]


@pytest.mark.parametrize(
    "pfns,offset,nbytes",
    [
        ([5, 7], 0, 1),  # the kernel wraps the remaining size: lengths [1, 4096]
        ([5, 7], 0, 2 * PAGE + 1),  # more than the pages hold
        ([5], PAGE, None),  # offset outside the first page
        ([5], -1, None),
        ([], 0, None),  # the kernel reads pages[0] of an empty array
        ([5, 6], 0, 0),
    ],
)
def test_strict_where_the_kernel_is_loose(pfns, offset, nbytes):
    with pytest.raises(errors.InvalidArgument):
        SgTable.from_pages(u64(pfns), offset=offset, nbytes=nbytes)


def test_pfn_beyond_physical_addresses():
    with pytest.raises(errors.OutOfRange):
        SgTable.from_pages(u64([1 << 40]))
    with pytest.raises(errors.DmaBufError):
        SgTable.from_pages(u64([2**64 - 1]))


def test_append_with_offset_on_a_nonempty_table_is_einval_and_changes_nothing():
    t = SgTable()
    t.append_pages(u64([1, 2]), left_pages=2)
    before = t.entries.copy()
    with pytest.raises(errors.InvalidArgument):
        t.append_pages(u64([3]), offset=0x10)
    assert (t.entries == before).all()
    assert t.nents == 1


def test_append_merge_respects_max_segment():
    # An entry of 3 pages, max 4 pages, three pages continuing it:
    # the entry grows to 4 pages, 2 pages go to one new entry.
    t = SgTable()
    t.append_pages(u64([10, 11, 12]), max_segment=4 * PAGE, left_pages=3)
    t.append_pages(u64([13, 14, 15]), max_segment=4 * PAGE)
    assert t.cpu_ranges().tolist() == [[10 * PAGE, 4 * PAGE], [14 * PAGE, 2 * PAGE]]
    assert t.nents == 2


def test_append_to_a_from_pages_table_reopens_it():
    t = SgTable.from_pages(u64([1, 2]))
    t.append_pages(u64([3, 9]))
    assert t.cpu_ranges().tolist() == [[PAGE, 3 * PAGE], [9 * PAGE, PAGE]]
    assert t.nents == t.orig_nents == 2
    assert t.sg_nents() == 2
    # The table is walkable: exactly one end mark, on the last entry.
    ends = (t.entries["page_link"] & 2).nonzero()[0].tolist()
    assert ends[-1] == t.nslots - 1 or len(ends) == 1


@pytest.mark.parametrize("n,chunks", [(1, 1), (128, 1), (129, 2), (255, 2), (256, 3), (1000, 8)])
def test_sg_alloc_table_chunks(n, chunks):
    t = SgTable.alloc(n)
    assert t.nchunks == chunks
    assert t.sg_nents() == n
    assert t.nents == t.orig_nents == n
    links = (t.entries["page_link"] & 1).nonzero()[0].tolist()
    assert links == [127 + 128 * k for k in range(chunks - 1)]
    ref = RefTable()
    ref.alloc(n)
    assert core_slots(t) == ref_slots_for_compare(ref)
    assert t.metadata_nbytes == ref.metadata_nbytes


def test_sg_alloc_table_zero_is_einval():
    with pytest.raises(errors.InvalidArgument):
        SgTable.alloc(0)


def test_nents_for_len():
    t = SgTable.from_pages(u64([1, 3, 5]), nbytes=2 * PAGE + 100)
    assert t.cpu_ranges()[:, 1].tolist() == [PAGE, PAGE, 100]
    assert t.nents_for_len(0) == 0
    assert t.nents_for_len(PAGE + 1) == 2
    assert t.nents_for_len(2 * PAGE + 100) == 3
    with pytest.raises(errors.InvalidArgument):
        t.nents_for_len(2 * PAGE + 101)


def test_chained_table_walks_like_the_kernel():
    # 1000 discontiguous pages: 8 chunks, links every 128 slots.
    pfns = np.arange(1000, dtype=np.uint64) * 2 + 7
    t = SgTable.from_pages(pfns)
    assert t.nents == 1000 and t.nchunks == 8
    assert t.sg_nents() == 1000
    assert (t.cpu_ranges()[:, 0] == pfns * PAGE).all()
    assert (t.pfns() == pfns).all()
    links = (t.entries["page_link"] & 1).nonzero()[0]
    assert links.tolist() == [127 + 128 * k for k in range(7)]
    # The last chunk holds exactly what was left: 1000 - 7 * 127 entries.
    assert t.nslots == 7 * 128 + (1000 - 7 * 127)
    assert t.metadata_nbytes == 7 * PAGE + 32 * 128  # 111 * 32 = 3552 -> 4096 bucket


def test_entries_are_a_zero_copy_view():
    t = SgTable.from_pages(u64([1, 2, 4]))
    e = t.entries
    assert e.dtype.names == ("page_link", "offset", "length", "dma_address", "dma_length", "dma_flags")
    assert e.dtype.itemsize == 32
    e2 = np.asarray(t)
    assert e.__array_interface__["data"][0] == e2.__array_interface__["data"][0]
    e["dma_address"][0] = 0xABC000
    assert np.asarray(t)["dma_address"][0] == 0xABC000
    mv = memoryview(t)
    assert mv.nbytes == 32 * t.nslots
    mv.release()


def test_resizing_an_exported_table_raises_buffererror_and_changes_nothing():
    t = SgTable.from_pages(u64([1]))
    view = t.entries
    before = view.copy()
    with pytest.raises(BufferError):
        t.append_pages(u64(np.arange(10, 5000, 2)))
    assert t.nents == 1 and t.nslots == len(view)
    assert (t.entries == before).all()
    del view
    t.append_pages(u64(np.arange(10, 5000, 2)))
    assert t.nents == 1 + len(range(10, 5000, 2))


def test_from_ranges_is_dma_only_and_splits_long_ranges():
    bus = 0x8000_0000_0000
    pairs = u64([[0x1000_0000 + bus, 8192], [0x2000_0000 + bus, 5 << 30]]).reshape(-1, 2)
    t = SgTable.from_ranges(pairs)
    assert t.orig_nents == 0 and t.nents == 3 and t.is_dma_only
    assert t.cpu_ranges().shape == (0, 2)
    d = t.dma_ranges().tolist()
    assert d[0] == [0x1000_0000 + bus, 8192]
    assert d[1] == [0x2000_0000 + bus, 0xFFFFF000]
    assert d[2] == [0x2000_0000 + bus + 0xFFFFF000, (5 << 30) - 0xFFFFF000]
    assert t.total_nbytes == 8192 + (5 << 30)
    assert (t.entries["page_link"][:3] >> np.uint64(2) == 0).all()
    assert (t.entries["length"] == 0).all()


@pytest.mark.parametrize(
    "pairs,exc",
    [
        ([[0x1000, 0]], errors.InvalidArgument),
        ([[2**64 - 4096, 8192]], errors.Overflow),
        (np.zeros((0, 2), dtype=np.uint64), errors.InvalidArgument),
    ],
)
def test_from_ranges_rejects(pairs, exc):
    with pytest.raises(exc):
        SgTable.from_ranges(pairs)


def test_from_ranges_accepts_a_range_ending_at_the_top():
    t = SgTable.from_ranges([[2**64 - 4096, 4096]])
    assert t.dma_ranges().tolist() == [[2**64 - 4096, 4096]]


def test_append_to_dma_only_table_is_einval():
    t = SgTable.from_ranges([[0x1000, 0x1000]])
    with pytest.raises(errors.InvalidArgument):
        t.append_pages(u64([1]))


@pytest.mark.parametrize("bad", ["abc", 3.5, [1.5], np.array([1, 2], dtype=np.int32), object()])
def test_wrong_inputs_are_clear_errors(bad):
    with pytest.raises((TypeError, ValueError)):
        SgTable.from_pages(bad)


def test_non_contiguous_input_is_rejected():
    a = np.arange(20, dtype=np.uint64)[::2]
    with pytest.raises(ValueError):
        SgTable.from_pages(a)


def test_inputs_of_every_buffer_kind():
    import array

    pfns = [3, 4, 9]
    for obj in (pfns, tuple(pfns), u64(pfns), memoryview(u64(pfns)), array.array("Q", pfns)):
        assert SgTable.from_pages(obj).cpu_ranges().tolist() == [[3 * PAGE, 2 * PAGE], [9 * PAGE, PAGE]]


def test_repr_reads():
    assert "empty" in repr(SgTable())
    r = repr(SgTable.from_pages(u64([1, 2, 5])))
    assert "2 entries" in r and "12 KiB" in r
    assert "DMA-only" in repr(SgTable.from_ranges([[0x1000, 0x2000]]))


def test_sg_dma_flags_constants():
    assert pydmabuf._core.SG_DMA_BUS_ADDRESS == 1
    assert pydmabuf._core.SG_DMA_SWIOTLB == 2
    assert pydmabuf.MAX_SG_ENT_SZ == pydmabuf.SCATTERLIST_MAX_SEGMENT == 0xFFFFF000


def test_shared_between_threads():
    # Readers and an appender on one table: every read sees a whole table.
    t = SgTable()
    t.append_pages(u64([0]), left_pages=1)
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            r = t.cpu_ranges()
            seen.append(int(r[:, 1].sum()) if len(r) else 0)

    th = threading.Thread(target=reader)
    th.start()
    for k in range(1, 300):
        t.append_pages(u64([2 * k]), left_pages=1)
    stop.set()
    th.join()
    assert t.nents == 300
    assert all(v % PAGE == 0 for v in seen)


# ------------------------------------------------------- against the model

pfn_lists = st.lists(
    st.one_of(st.integers(0, 40), st.integers(1000, 1010)), min_size=1, max_size=60
).map(lambda xs: sorted(xs) if len(xs) % 3 == 0 else xs)
contiguous_runs = st.lists(
    st.tuples(st.integers(0, 5000), st.integers(1, 300)), min_size=1, max_size=8
).map(lambda runs: [p for start, n in runs for p in range(start, start + n)])


@st.composite
def page_args(draw, pfns=st.one_of(pfn_lists, contiguous_runs)):
    p = draw(pfns)
    offset = draw(st.sampled_from([0, 0, 0, 1, 0x100, PAGE - 1]))
    full = len(p) * PAGE - offset
    nbytes = draw(st.one_of(st.none(), st.integers(max(1, full - PAGE + 1), full)))
    max_seg = draw(st.sampled_from([PAGE, 2 * PAGE, 3 * PAGE + 5, 8 * PAGE, 128 * PAGE, UINT_MAX]))
    return p, offset, nbytes, max_seg


def compare(t: SgTable, ref: RefTable) -> None:
    assert core_slots(t) == ref_slots_for_compare(ref)
    assert (t.nents, t.orig_nents, t.total_nents) == (ref.nents, ref.orig_nents, ref.total_nents)
    assert t.nchunks == len(ref.chunks)
    assert t.metadata_nbytes == ref.metadata_nbytes
    assert [tuple(r) for r in t.cpu_ranges().tolist()] == ref.cpu_ranges()


@given(page_args())
def test_from_pages_matches_the_model(args):
    p, offset, nbytes, max_seg = args
    ref = RefTable()
    ref.append_pages(p, offset, nbytes, max_seg, 0)
    t = SgTable.from_pages(u64(p), offset=offset, nbytes=nbytes, max_segment=max_seg)
    compare(t, ref)
    # Every byte is described once, in order.
    total = len(p) * PAGE - offset if nbytes is None else nbytes
    assert t.cpu_nbytes == total


@given(st.lists(st.tuples(page_args(), st.integers(0, 200)), min_size=1, max_size=6))
def test_append_sequences_match_the_model(calls):
    t = SgTable()
    ref = RefTable()
    for i, ((p, offset, nbytes, max_seg), left) in enumerate(calls):
        if i:
            offset, nbytes = 0, None
        note(f"append {p[:8]}... offset={offset} nbytes={nbytes} max_seg={max_seg} left={left}")
        ref_err = None
        try:
            ref.append_pages(p, offset, nbytes, max_seg, left)
        except RefError as e:
            ref_err = e.errno
        if ref_err is not None:
            before = t.entries.copy()
            with pytest.raises(errors.DmaBufError) as ei:
                t.append_pages(u64(p), offset=offset, nbytes=nbytes, max_segment=max_seg, left_pages=left)
            assert ei.value.errno == ref_err
            assert (t.entries == before).all()
            continue
        t.append_pages(u64(p), offset=offset, nbytes=nbytes, max_segment=max_seg, left_pages=left)
        compare(t, ref)


class AppendMachine(RuleBasedStateMachine):
    """Appends of every shape, interleaved with views and failures."""

    @initialize()
    def start(self):
        self.t = SgTable()
        self.ref = RefTable()
        self.view = None

    @rule(args=page_args(), left=st.integers(0, 300))
    def append(self, args, left):
        p, offset, nbytes, max_seg = args
        if self.ref.prv is not None:
            offset, nbytes = 0, None
        ref = copy.deepcopy(self.ref)
        before = self.t.entries.copy()
        try:
            ref.append_pages(p, offset, nbytes, max_seg, left)
        except RefError as e:
            with pytest.raises(errors.DmaBufError) as ei:
                self.t.append_pages(u64(p), offset=offset, nbytes=nbytes, max_segment=max_seg, left_pages=left)
            assert ei.value.errno == e.errno
            return
        try:
            self.t.append_pages(u64(p), offset=offset, nbytes=nbytes, max_segment=max_seg, left_pages=left)
        except BufferError:
            # Only while a view is held, and the table is unchanged.
            assert self.view is not None
            assert (self.t.entries == before).all()
            return
        self.ref = ref

    @rule(p=st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def append_with_offset_fails_once_populated(self, p):
        if self.ref.prv is None:
            return
        before = self.t.entries.copy()
        with pytest.raises(errors.InvalidArgument):
            self.t.append_pages(u64(p), offset=8)
        assert (self.t.entries == before).all()

    @rule()
    def take_view(self):
        self.view = self.t.entries

    @rule()
    def drop_view(self):
        self.view = None

    @invariant()
    def agrees(self):
        if hasattr(self, "t"):
            compare(self.t, self.ref)
            assert self.t.sg_nents() == (
                len(self.ref.data_positions(10**9)) if self.ref.chunks else 0
            )


AppendMachine.TestCase.settings = __import__("hypothesis").settings(max_examples=60, stateful_step_count=20)
TestAppendMachine = AppendMachine.TestCase


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 2**40)), min_size=1, max_size=20))
def test_from_ranges_matches_a_direct_split(rows):
    rows = [(a, n) for a, n in rows if a + n <= 2**64]
    if not rows:
        return
    t = SgTable.from_ranges(u64(rows).reshape(-1, 2))
    expect = []
    for a, n in rows:
        while n:
            step = min(n, 0xFFFFF000)
            expect.append([a, step])
            a += step
            n -= step
    assert t.dma_ranges().tolist() == expect
    assert t.nents == len(expect) and t.orig_nents == 0


# --------------------------------------------- big inputs across block edges


def _mixed_layout(seed: int) -> np.ndarray:
    """Stretches of different character, so the walk changes regime
    (contiguous, nearly all breaks, short runs) inside and across blocks."""
    from pydmabuf import workloads

    rng = np.random.default_rng(seed)
    parts, base = [], 1000
    for _ in range(8):
        kind = rng.integers(0, 3)
        n = int(rng.integers(1, 2600))
        if kind == 0:
            p = np.arange(n, dtype=np.uint64)
        else:
            p = workloads.random_runs(n, 1 if kind == 1 else 6, seed=int(rng.integers(1 << 30)), base_pfn=0)
            p -= p[0]
        parts.append(p + np.uint64(base))
        base += int(p[-1]) + 1 + int(rng.integers(0, 2))  # sometimes continue the previous stretch
    return np.concatenate(parts)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_seg", [4 * PAGE, 1000 * PAGE, UINT_MAX])
def test_big_mixed_layouts_match_the_model(seed, max_seg):
    pfns = _mixed_layout(seed)
    offset = [0, 0x200, 0xFFF][seed % 3]
    nbytes = len(pfns) * PAGE - offset - (seed * 97) % PAGE
    ref = RefTable()
    ref.append_pages(pfns.tolist(), offset, nbytes, max_seg, 0)
    t = SgTable.from_pages(pfns, offset=offset, nbytes=nbytes, max_segment=max_seg)
    compare(t, ref)


@pytest.mark.parametrize("layout", ["contiguous", "fragmented", "scattered", "thp"])
def test_a_million_pages_agree_with_numpy(layout):
    from pydmabuf import workloads

    pfns, _ = workloads.layout(layout, 1 << 20)
    t = SgTable.from_pages(pfns)
    phys, lens = workloads.numpy_coalesce(pfns, 0xFFFFF000 // PAGE)
    r = t.cpu_ranges()
    assert (r[:, 0] == phys).all() and (r[:, 1] == lens).all()
    assert t.sg_nents() == t.nents == len(lens)
    # The chunk layout of a fresh table: full pages of 127 entries and a
    # link, then one chunk of exactly what is left (up to 128 entries).
    full, left = 0, len(lens)
    while left > 128:
        full, left = full + 1, left - 127
    assert t.nchunks == full + 1
    assert t.nslots == full * 128 + left


@pytest.mark.parametrize("kind", ["u64", "readonly", "memoryview", "array", "list", "strided", "int64", "2d", "empty"])
def test_from_pages_takes_every_buffer_the_core_parser_takes(kind):
    # from_pages' fast path for plain u64 buffers must build the same table
    # as the general parser and refuse what it refuses, with its errors.
    import array

    pfns = np.array([7, 8, 9, 20, 21, 40], dtype=np.uint64)
    ro = pfns.copy()
    ro.setflags(write=False)
    arg = {"u64": pfns, "readonly": ro, "memoryview": memoryview(pfns), "array": array.array("Q", pfns.tolist()),
           "list": pfns.tolist(), "strided": np.repeat(pfns, 2)[::2], "int64": pfns.astype(np.int64),
           "2d": pfns.reshape(2, 3), "empty": np.zeros(0, dtype=np.uint64)}[kind]
    if kind in ("strided", "int64", "2d"):
        with pytest.raises((ValueError, TypeError), match="pfns"):
            SgTable.from_pages(arg)
        return
    if kind == "empty":
        with pytest.raises(errors.InvalidArgument, match="pfns is empty"):
            SgTable.from_pages(arg)
        return
    t = SgTable.from_pages(arg)
    ref = SgTable.from_pages(pfns, 0, None, int("FFFFF000", 16))  # the general path (not the default object)
    assert t.orig_nents == ref.orig_nents == 3
    assert t.cpu_ranges().tolist() == ref.cpu_ranges().tolist()


@pytest.mark.parametrize("pfns", [[5], [5, 6], [5, 6, 9, 10, 11], []])
@pytest.mark.parametrize("offset", [0, 1, PAGE - 1, PAGE, -1, 2**64, 1.0, True])
@pytest.mark.parametrize("nbytes", ["none", 0, 1, "full-page", "full-page+1", "full", "full+1", -1, 2**64, 2.0])
def test_from_pages_of_an_array_with_offset_and_nbytes_is_the_parsed_path(pfns, offset, nbytes):
    """An array with the default segment and an int offset and length is
    built without the argument parser (a fast path the exporters take);
    what it builds, and what it refuses, must be the parser's.  A list is
    always parsed: it is the reference."""
    if isinstance(offset, int) and 0 <= offset < PAGE:
        full = len(pfns) * PAGE - offset
        nbytes = {"none": None, "full-page": full - PAGE, "full-page+1": full - PAGE + 1, "full": full,
                  "full+1": full + 1}.get(nbytes, nbytes)  # type: ignore[arg-type]
    elif isinstance(nbytes, str):
        nbytes = None if nbytes == "none" else 2 * PAGE

    def build(p):
        try:
            t = SgTable.from_pages(p, offset=offset, nbytes=nbytes)
        except Exception as e:  # compared by type and errno below
            return type(e), getattr(e, "errno", None)
        return t.cpu_ranges().tolist(), (t.nents, t.orig_nents, t.cpu_nbytes)

    assert build(u64(pfns)) == build(list(pfns))
