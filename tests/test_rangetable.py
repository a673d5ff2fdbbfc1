"""Range tables against a sorted-list reference model."""

from __future__ import annotations

import bisect
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydmabuf import Range, RangeKind, RangeTable, errors

TOP = 2**64 - 1


class RefTable:
    """Obviously correct: a sorted list of (start, last, kind, owner, flags)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, int, int, int]] = []

    def insert(self, start: int, last: int, kind: int = 1, owner: int = 0, flags: int = 0) -> bool:
        if any(not (last < s or start > e) for s, e, *_ in self.items):
            return False
        bisect.insort(self.items, (start, last, kind, owner, flags))
        return True

    def erase(self, start: int, last: int) -> int:
        out, erased = [], 0
        for s, e, k, o, f in self.items:
            if e < start or s > last:
                out.append((s, e, k, o, f))
                continue
            erased += min(e, last) - max(s, start) + 1
            if s < start:
                out.append((s, start - 1, k, o, f))
            if e > last:
                out.append((last + 1, e, k, o, f))
        self.items = sorted(out)
        return erased

    def lookup(self, addr: int):
        for it in self.items:
            if it[0] <= addr <= it[1]:
                return it
        return None

    def overlapping(self, start: int, last: int):
        return [it for it in self.items if not (it[1] < start or it[0] > last)]

    def free_intervals(self):
        prev = -1
        for s, e, *_ in self.items:
            if s > prev + 1:
                yield prev + 1, s - 1
            prev = e
        if prev < TOP:
            yield prev + 1, TOP

    def find_gap(self, nbytes: int, align: int, lo: int, hi: int, top_down: bool):
        best = None
        for a, b in self.free_intervals():
            a, b = max(a, lo), min(b, hi)
            if a > b or b - a + 1 < nbytes:
                continue
            if top_down:
                c = (b - nbytes + 1) // align * align
                if c >= a and (best is None or c > best):
                    best = c
            else:
                c = -(-a // align) * align
                if c + nbytes - 1 <= b and (best is None or c < best):
                    best = c
        return best

    def total(self) -> int:
        return sum(e - s + 1 for s, e, *_ in self.items)


def as_tuples(t: RangeTable):
    return [(r.start, r.last, int(r.kind), r.owner, r.flags) for r in t]


# ------------------------------------------------------------------ basics


def test_insert_lookup_and_attributes():
    t = RangeTable()
    t.insert(0x1000, 0x2000, kind=RangeKind.MMIO, owner=7, flags=3)
    r = t.lookup(0x2FFF)
    assert r == Range(0x1000, 0x2000, RangeKind.MMIO, 7, 3)
    assert r.last == 0x2FFF and r.end == 0x3000
    assert isinstance(r.kind, RangeKind)
    assert t.lookup(0x3000) is None and t.lookup(0xFFF) is None
    assert 0x1000 in t and 0x3000 not in t and -1 not in t and "x" not in t
    assert len(t) == 1 and t.total_nbytes == 0x2000


def test_unknown_kinds_are_kept_as_ints():
    t = RangeTable()
    t.insert(0, 1, kind=200)
    assert t.lookup(0).kind == 200


@pytest.mark.parametrize("start,nbytes", [(0x1000, 1), (0x1FFF, 1), (0x0, 0x1001), (0x2FFF, 0x10), (0x800, 0x10000)])
def test_overlap_is_eexist_and_changes_nothing(start, nbytes):
    t = RangeTable()
    t.insert(0x1000, 0x2000)
    with pytest.raises(errors.AlreadyExists) as ei:
        t.insert(start, nbytes)
    assert ei.value.errno == 17 and "overlaps" in str(ei.value)
    assert as_tuples(t) == [(0x1000, 0x2FFF, 1, 0, 0)]


def test_touching_ranges_do_not_overlap():
    t = RangeTable()
    t.insert(0x1000, 0x1000)
    t.insert(0x2000, 0x1000)
    t.insert(0x0, 0x1000)
    assert [r.start for r in t] == [0, 0x1000, 0x2000]


def test_ranges_at_the_top_of_the_space():
    t = RangeTable()
    t.insert(TOP, 1)
    t.insert(TOP - 0xFFF, 0xFFF)
    assert t.lookup(TOP).nbytes == 1
    assert t.lookup(TOP - 1).start == TOP - 0xFFF
    with pytest.raises(errors.Overflow):
        t.insert(TOP, 2)
    with pytest.raises(errors.Overflow):
        t.insert(TOP - 0x1000, 0x1002)
    assert t.find_gap(0x1000, 0x1000, top_down=True) == TOP - 0x1FFF
    assert t.erase(TOP, 1) == 1


def test_the_whole_space_as_one_range():
    t = RangeTable()
    t.insert(0, 2**64)
    assert t.total_nbytes == 2**64
    assert t.lookup(TOP).nbytes == 2**64
    with pytest.raises(errors.NoSpace):
        t.find_gap(1)
    assert t.erase(0x1000, 0x1000) == 0x1000
    assert [(r.start, r.nbytes) for r in t] == [(0, 0x1000), (0x2000, 2**64 - 0x2000)]
    assert t.find_gap(0x1000) == 0x1000


@pytest.mark.parametrize(
    "args,exc",
    [
        ((0, 0), errors.InvalidArgument),
        ((0, -1), errors.InvalidArgument),
        ((-1, 1), errors.InvalidArgument),
        ((2**64, 1), errors.Overflow),
        ((1, 2**64), errors.Overflow),
        (("a", 1), TypeError),
        ((0, 1.0), TypeError),
    ],
)
def test_bad_windows(args, exc):
    t = RangeTable()
    with pytest.raises(exc):
        t.insert(*args)
    with pytest.raises(exc):
        t.erase(*args)
    assert len(t) == 0


@pytest.mark.parametrize("kw,exc", [({"kind": 256}, errors.InvalidArgument), ({"kind": -1}, errors.InvalidArgument),
                                    ({"flags": 2**32}, errors.InvalidArgument), ({"owner": 2**64}, errors.Overflow),
                                    ({"kind": "RAM"}, TypeError)])
def test_bad_attributes(kw, exc):
    t = RangeTable()
    with pytest.raises(exc):
        t.insert(0, 1, **kw)
    assert len(t) == 0


def test_erase_trims_and_splits():
    t = RangeTable()
    t.insert(0x1000, 0x4000, kind=RangeKind.RAM, owner=1)
    t.insert(0x8000, 0x1000, kind=RangeKind.MMIO)
    assert t.erase(0x2000, 0x1000) == 0x1000  # split
    assert [(r.start, r.nbytes, r.owner) for r in t] == [(0x1000, 0x1000, 1), (0x3000, 0x2000, 1), (0x8000, 0x1000, 0)]
    assert t.erase(0x4000, 0x5000) == 0x2000  # trims one, removes another
    assert [(r.start, r.nbytes) for r in t] == [(0x1000, 0x1000), (0x3000, 0x1000)]
    assert t.erase(0x100000, 0x1000) == 0
    t.check()


def test_remove_by_address():
    t = RangeTable()
    t.insert(0x1000, 0x1000, owner=5)
    assert t.remove(0x1800).owner == 5
    with pytest.raises(errors.NotFound):
        t.remove(0x1800)


def test_overlapping_and_next_after():
    t = RangeTable()
    for s in range(0, 0x10000, 0x2000):
        t.insert(s, 0x1000)
    got = [r.start for r in t.overlapping(0x1800, 0x3000)]
    assert got == [0x2000, 0x4000]
    assert t.next_after(0x2000).start == 0x4000
    assert t.next_after(0xE000) is None


def test_find_gap_alignment_and_direction():
    t = RangeTable()
    t.insert(0x0, 0x1000)
    t.insert(0x3000, 0x1000)
    assert t.find_gap(0x1000) == 0x1000
    assert t.find_gap(0x2000) == 0x1000
    assert t.find_gap(0x2000, align=0x2000) == 0x4000
    assert t.find_gap(0x1000, lo=0, hi=0x2FFF, top_down=True) == 0x2000
    with pytest.raises(errors.NoSpace):
        t.find_gap(0x3000, lo=0, hi=0x3FFF)
    with pytest.raises(errors.InvalidArgument):
        t.find_gap(0x1000, align=3)
    with pytest.raises(errors.InvalidArgument):
        t.find_gap(0)
    with pytest.raises(errors.NoSpace):
        t.find_gap(2**64 + 1)


def test_insert_many_is_all_or_nothing():
    t = RangeTable()
    t.insert(0x100000, 0x1000)
    starts = np.array([0x0, 0x2000, 0x100800], dtype=np.uint64)
    sizes = np.array([0x1000, 0x1000, 0x100], dtype=np.uint64)
    with pytest.raises(errors.AlreadyExists):
        t.insert_many(starts, sizes)
    assert len(t) == 1
    with pytest.raises(errors.AlreadyExists):
        t.insert_many(np.array([0, 0x800], dtype=np.uint64), np.array([0x1000, 0x1000], dtype=np.uint64))
    with pytest.raises(errors.InvalidArgument):
        t.insert_many(np.array([0], dtype=np.uint64), np.array([0], dtype=np.uint64))
    with pytest.raises(errors.Overflow):
        t.insert_many(np.array([TOP], dtype=np.uint64), np.array([2], dtype=np.uint64))
    with pytest.raises(ValueError):
        t.insert_many(np.array([0], dtype=np.uint64), np.array([1, 2], dtype=np.uint64))
    assert len(t) == 1
    t.insert_many(starts[:2], sizes[:2], kinds=np.array([2, 3], dtype=np.uint64), owners=9, flags=1)
    assert as_tuples(t) == [(0, 0xFFF, 2, 9, 1), (0x2000, 0x2FFF, 3, 9, 1), (0x100000, 0x100FFF, 1, 0, 0)]
    t.check()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(256, 3000), seed=st.integers(0, 2**32 - 1),
       spread=st.sampled_from([12, 20, 40, 63]), base=st.sampled_from([0, 1 << 40, (1 << 63) + (1 << 62)]))
def test_bulk_insert_sorts_large_inputs_exactly(n, seed, spread, base):
    """Inputs of 256 ranges and more are radix-sorted (digits every key
    shares are skipped): the table must hold exactly the sorted ranges, with
    their own attributes, whatever the key spread."""
    rng = np.random.default_rng(seed)
    slots = np.unique(rng.integers(0, 1 << min(spread, 48), n * 2, dtype=np.uint64))[:n]
    starts = np.uint64(base) + slots * np.uint64(2 * 4096)  # 4 KiB ranges with 4 KiB holes
    order = rng.permutation(len(starts))
    s = np.ascontiguousarray(starts[order])
    sizes = np.full(len(s), 4096, dtype=np.uint64)
    owners = np.ascontiguousarray(s >> np.uint64(12))  # each range names itself
    t = RangeTable()
    t.insert_many(s, sizes, owners=owners)
    got = t.as_array()
    assert got["start"].tolist() == np.sort(starts).tolist()
    assert (got["owner"] == got["start"] >> np.uint64(12)).all()
    t.check()
    # One range moved half a page into another: found after sorting, nothing lands.
    i, j = rng.choice(len(s), 2, replace=False)
    dup = s.copy()
    dup[i] = dup[j] + np.uint64(2048)
    t2 = RangeTable()
    with pytest.raises(errors.AlreadyExists):
        t2.insert_many(dup, sizes)
    assert len(t2) == 0


def test_a_million_ranges_bulk():
    n = 1_000_000
    starts = (np.arange(n, dtype=np.uint64) * 0x3000)[::-1].copy()
    t = RangeTable()
    t.insert_many(starts, np.full(n, 0x1000, dtype=np.uint64))
    assert len(t) == n and t.total_nbytes == n * 0x1000
    assert t.lookup(0x3000 * 777 + 5).start == 0x3000 * 777
    assert t.find_gap(0x2000, align=0x1000, lo=0x3000 * 5000, hi=TOP) == 0x3000 * 5000 + 0x1000
    assert t.find_gap(0x3000, top_down=True) == TOP - 0x2FFF
    arr = t.as_array()
    assert len(arr) == n and (np.diff(arr["start"].astype(np.int64)) == 0x3000).all()
    t.check()


def test_as_array_fields():
    t = RangeTable()
    t.insert(0x1000, 0x1000, kind=RangeKind.PRIVATE, owner=4, flags=2)
    a = t.as_array()
    assert a.dtype.names == ("start", "last", "owner", "flags", "kind")
    assert a[0].tolist() == (0x1000, 0x1FFF, 4, 2, 3)


def test_repr():
    t = RangeTable()
    assert repr(t) == "<RangeTable 0 ranges, 0 B>"
    t.insert(0x1000, 0x200000)
    assert repr(t) == "<RangeTable 1 range, 2 MiB>"
    assert repr(t.lookup(0x1000)) == "Range([0x1000, 0x200fff], 2 MiB, RAM)"


def test_concurrent_inserts_do_not_lose_updates():
    t = RangeTable()

    def worker(k):
        for i in range(2000):
            t.insert((i * 8 + k) * 0x1000, 0x1000)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(t) == 8000
    t.check()


# -------------------------------------------------------- against the model

small = st.integers(0, 2**12)
near_top = st.integers(TOP - 2**12, TOP)
addrs = st.one_of(small, near_top)


@given(st.lists(st.tuples(addrs, st.integers(1, 300)), max_size=40), addrs, st.integers(1, 600),
       st.sampled_from([1, 2, 4, 16, 64, 256, 4096]), addrs, addrs, st.booleans())
def test_find_gap_matches_brute_force(ranges, _a, nbytes, align, lo, hi, top_down):
    t, ref = RangeTable(), RefTable()
    for s, n in ranges:
        if s + n - 1 > TOP:
            continue
        if ref.insert(s, s + n - 1):
            t.insert(s, n)
        else:
            with pytest.raises(errors.AlreadyExists):
                t.insert(s, n)
    lo, hi = min(lo, hi), max(lo, hi)
    expect = ref.find_gap(nbytes, align, lo, hi, top_down)
    if expect is None:
        with pytest.raises(errors.NoSpace):
            t.find_gap(nbytes, align, lo, hi, top_down)
    else:
        assert t.find_gap(nbytes, align, lo, hi, top_down) == expect
    t.check()


class RangeMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.t = RangeTable()
        self.ref = RefTable()

    @rule(start=addrs, n=st.integers(1, 200), kind=st.integers(0, 255), owner=st.integers(0, 2**64 - 1))
    def insert(self, start, n, kind, owner):
        if start + n - 1 > TOP:
            with pytest.raises(errors.Overflow):
                self.t.insert(start, n, kind=kind, owner=owner)
            return
        if self.ref.insert(start, start + n - 1, kind, owner, 0):
            self.t.insert(start, n, kind=kind, owner=owner)
        else:
            with pytest.raises(errors.AlreadyExists):
                self.t.insert(start, n, kind=kind, owner=owner)

    @rule(start=addrs, n=st.integers(1, 400))
    def erase(self, start, n):
        if start + n - 1 > TOP:
            return
        assert self.t.erase(start, n) == self.ref.erase(start, start + n - 1)

    @precondition(lambda self: self.ref.items)
    @rule(data=st.data())
    def remove(self, data):
        s, e, *_ = data.draw(st.sampled_from(self.ref.items))
        addr = data.draw(st.integers(s, e))
        r = self.t.remove(addr)
        assert (r.start, r.last) == (s, e)
        self.ref.items.remove(next(it for it in self.ref.items if it[0] == s))

    @rule(addr=addrs)
    def lookup(self, addr):
        got = self.t.lookup(addr)
        exp = self.ref.lookup(addr)
        assert (None if got is None else (got.start, got.last, int(got.kind), got.owner, got.flags)) == exp

    @rule(start=addrs, n=st.integers(1, 5000))
    def overlapping(self, start, n):
        if start + n - 1 > TOP:
            return
        got = [(r.start, r.last, int(r.kind), r.owner, r.flags) for r in self.t.overlapping(start, n)]
        assert got == self.ref.overlapping(start, start + n - 1)

    @rule(starts=st.lists(addrs, min_size=1, max_size=8), n=st.integers(1, 50))
    def insert_many(self, starts, n):
        starts = [s for s in starts if s + n - 1 <= TOP]
        if not starts:
            return
        trial = RefTable()
        trial.items = list(self.ref.items)
        ok = all(trial.insert(s, s + n - 1) for s in starts)
        a = np.array(starts, dtype=np.uint64)
        b = np.full(len(starts), n, dtype=np.uint64)
        if ok:
            self.t.insert_many(a, b)
            self.ref = trial
        else:
            with pytest.raises(errors.AlreadyExists):
                self.t.insert_many(a, b)

    @rule(nbytes=st.integers(1, 3000), align=st.sampled_from([1, 8, 512, 4096]), lo=addrs, hi=addrs,
          top_down=st.booleans())
    def find_gap(self, nbytes, align, lo, hi, top_down):
        lo, hi = min(lo, hi), max(lo, hi)
        exp = self.ref.find_gap(nbytes, align, lo, hi, top_down)
        if exp is None:
            with pytest.raises(errors.NoSpace):
                self.t.find_gap(nbytes, align, lo, hi, top_down)
        else:
            assert self.t.find_gap(nbytes, align, lo, hi, top_down) == exp

    @invariant()
    def agrees(self):
        if not hasattr(self, "t"):
            return
        assert as_tuples(self.t) == self.ref.items
        assert len(self.t) == len(self.ref.items)
        assert self.t.total_nbytes == self.ref.total()
        self.t.check()


RangeMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestRangeMachine = RangeMachine.TestCase
