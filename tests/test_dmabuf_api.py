"""The compiled dma-buf attachment (pydmabuf._dmabuf_api): its fields, the
entry points on objects that never went through an attach, junk written
into the fields Python can write, the record of where the user attached
and mapped, and the negotiation's compiled pieces against the rules
``dma_buf_match_mapping()`` follows."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, Callable

import numpy as np
import pytest

import pydmabuf
from pydmabuf import DmaDirection, ImporterOps, Machine, _dmabuf_api, checks, errors, mapping
from pydmabuf.dmabuf import Attachment
from pydmabuf.dma_buf_mapping import MappingMatch, MappingType, MatchArgs, match_mapping
from pydmabuf.exporters import SystemHeap

BIDI = DmaDirection.BIDIRECTIONAL


@pytest.fixture
def m() -> Machine:
    return Machine.default()


def _never_attached() -> list[tuple[str, Callable[[], Any], Callable[[Any], Any]]]:
    def att() -> Any:
        return Attachment.__new__(Attachment)

    def core() -> Any:
        return _dmabuf_api.AttachmentCore.__new__(_dmabuf_api.AttachmentCore)

    out: list[tuple[str, Callable[[], Any], Callable[[Any], Any]]] = []
    for kind, make in (("Attachment", att), ("AttachmentCore", core)):
        out += [
            (f"{kind}.map", make, lambda a: _dmabuf_api.map_attachment(a, BIDI)),
            (f"{kind}.map_unlocked", make, lambda a: _dmabuf_api.map_unlocked(a, BIDI)),
            (f"{kind}.unmap", make, lambda a: _dmabuf_api.unmap_attachment(a, None, BIDI)),
            (f"{kind}.unmap_unlocked", make, lambda a: _dmabuf_api.unmap_unlocked(a, None, BIDI)),
            (f"{kind}.track", make, lambda a: _dmabuf_api.track(a, None, BIDI, False, [[0, 4096]])),
            (f"{kind}._usable", make, lambda a: a._usable("map")),
            (f"{kind}._require_resv", make, lambda a: a._require_resv("map")),
        ]
    out += [
        ("Attachment.pin", att, lambda a: a.pin()),
        ("Attachment.phys_vec", att, lambda a: a.phys_vec()),
        ("Attachment.repr", att, repr),
        ("_Mapping.covers", lambda: _dmabuf_api._Mapping.__new__(_dmabuf_api._Mapping), lambda r: r.covers(0, 1)),
        ("_Mapping.dma", lambda: _dmabuf_api._Mapping.__new__(_dmabuf_api._Mapping), lambda r: r.dma),
    ]
    return out


_NEVER = _never_attached()


@pytest.mark.parametrize("make,call", [(mk, c) for _, mk, c in _NEVER], ids=[i for i, _, _ in _NEVER])
def test_objects_that_never_went_through_an_attach_raise_and_never_crash(make, call):
    """``X.__new__(X)`` skips the attach: every entry point raises a Python
    error (TypeError, or the model's own for what is not attached), never
    reads a field it does not have."""
    obj = make()
    try:
        call(obj)
    except (TypeError, errors.DmaBufError):
        pass


def test_a_never_attached_attachment_says_why():
    a = Attachment.__new__(Attachment)
    with pytest.raises(TypeError, match="never attached"):
        a.map_unlocked(BIDI)
    assert a.created_at == "?" and a.live_mappings == 0 and not a.dynamic
    assert _dmabuf_api._Mapping.__new__(_dmabuf_api._Mapping).created_at == "?"


def test_the_fields_refuse_values_of_the_wrong_type(m):
    """The typed fields (the device's record, the live mappings, the
    counts) refuse junk when written, so the compiled paths never read a
    value of the wrong type."""
    buf = SystemHeap(m).allocate(1 << 16)
    a = buf.attach(m.device("gpu0"))
    for name, junk in (("_dev_refs", 5), ("_dev_refs", {}), ("pin_count", "1"), ("invalidations", None),
                       ("created_at", 7)):
        with pytest.raises(TypeError):
            setattr(a, name, junk)
    for junk in ([1], None, set()):
        with pytest.raises(AttributeError):  # read-only: the set is the attachment's own
            a._maps = junk
    t = a.map_unlocked(BIDI)
    assert a.live_mappings == 1 and a.pin_count == 0
    a.unmap_unlocked(t, BIDI)
    buf.detach(a)
    buf.put()


def test_a_record_whose_table_was_overwritten_unmaps_as_bad_unmap(m):
    """The record's ``table`` is writable: an unmap of the original table
    then finds no live mapping (the checker's bad-unmap); putting it back
    lets the unmap through.  Never a crash."""
    buf = SystemHeap(m).allocate(1 << 16)
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    (rec,) = a._maps
    for junk in (None, 5, pydmabuf.SgTable.from_pages([1, 2])):
        rec.table = junk
        with checks.report_mode():
            a.unmap_unlocked(t, BIDI)
        assert [r.rule for r in checks.reports()] == ["bad-unmap"] and a.live_mappings == 1
        checks.clear()
    rec.table = t
    a.unmap_unlocked(t, BIDI)
    assert a.live_mappings == 0
    buf.detach(a)
    buf.put()


def test_created_at_is_read_once_and_can_be_set(m):
    """The site is found at the call and its text made when first read;
    after that it is a plain str, which Python may replace (with a str)."""
    import inspect

    buf = SystemHeap(m).allocate(1 << 16)
    a = buf.attach(m.device("gpu0")); line = inspect.currentframe().f_lineno  # noqa: E702
    assert a.created_at == f"test_dmabuf_api.py:{line}"
    assert a.created_at is a.created_at
    a.created_at = "elsewhere:1"
    assert a.created_at == "elsewhere:1"
    buf.detach(a)
    buf.put()


def test_a_mapping_made_in_another_thread_names_that_threads_line(m):
    buf = SystemHeap(m).allocate(1 << 16)
    a = buf.attach(m.device("gpu0"))
    got: list[Any] = []

    def worker() -> None:
        got.append(a.map_unlocked(BIDI))  # the line recorded

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    (rec,) = a._maps
    import inspect
    want = inspect.getsourcelines(worker)[1] + 1
    assert rec.created_at == f"test_dmabuf_api.py:{want}"
    a.unmap_unlocked(got[0], BIDI)
    buf.detach(a)
    buf.put()


def test_bind_refuses_a_class_that_does_not_hold_the_fields():
    with pytest.raises(TypeError):
        _dmabuf_api.bind(object, pydmabuf.Device, pydmabuf.dmabuf.Exporter)


def test_the_device_record_follows_the_device(m):
    """Each attachment finds its own device's record, also when the device
    differs from the last one looked up (remembered by a weak reference)."""
    heap = SystemHeap(m)
    for name in ("gpu0", "nic0", "gpu0"):
        buf = heap.allocate(1 << 12)
        a = buf.attach(m.device(name))
        t = a.map_unlocked(BIDI)
        assert a._dev_refs is _dmabuf_api.device_maps[m.device(name)]
        assert [x for x in _dmabuf_api.live_maps(m.device(name)) if x.attachment is a] == list(a._maps)
        a.unmap_unlocked(t, BIDI)
        buf.detach(a)
        buf.put()


def test_the_device_record_keeps_no_device_alive():
    """The records and the remembered last device hold devices weakly: a
    machine dropped after mapping through one of its devices is collected."""
    m = Machine.default()
    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.attach(m.device("gpu0"))
    a.unmap_unlocked(a.map_unlocked(BIDI), BIDI)
    buf.detach(a)
    buf.put()
    dev_ref = weakref.ref(m.device("gpu0"))
    del m, buf, a
    gc.collect()
    assert dev_ref() is None


# ------------------------------------------------------------ negotiation


class _Spy(MappingType):
    """A driver's own type: records the matcher's calls."""

    name = "spy"

    def __init__(self, verdicts: dict[str, Any]) -> None:
        self.verdicts = verdicts
        self.calls: list[tuple[str, str, str]] = []

    def match(self, dmabuf: Any, exp: MappingMatch, imp: MappingMatch) -> Any:
        self.calls.append(("match", exp.tag, imp.tag))
        v = self.verdicts.get(f"{exp.tag}/{imp.tag}")
        if isinstance(v, BaseException):
            raise v
        return v

    def finish_match(self, args: MatchArgs, exp: MappingMatch, imp: MappingMatch) -> None:
        self.calls.append(("finish", exp.tag, imp.tag))


def _entries(t: MappingType, tags: str) -> list[MappingMatch]:
    return [MappingMatch(t, object() if tags == "exp" else None, tag=x) for x in (tags.split(",") if tags else [])]


@pytest.mark.parametrize("verdicts,want", [
    ({}, [("match", "e1", "i1"), ("finish", "e1", "i1")]),
    ({"e1/i1": errors.NotSupported("no")}, [("match", "e1", "i1"), ("match", "e1", "i2"), ("finish", "e1", "i2")]),
    ({"e1/i1": errors.NotSupported("no"), "e1/i2": errors.NotSupported("no")},
     [("match", "e1", "i1"), ("match", "e1", "i2"), ("match", "e2", "i1"), ("finish", "e2", "i1")]),
    ({"e1/i1": -95}, [("match", "e1", "i1"), ("match", "e1", "i2"), ("finish", "e1", "i2")]),
    ({"e1/i1": 0}, [("match", "e1", "i1"), ("finish", "e1", "i1")]),
])
def test_the_matcher_walks_exporter_entries_outside_and_importer_entries_inside(verdicts, want):
    """dma_buf_match_mapping(): the exporter's order wins; NotSupported (or
    -EOPNOTSUPP returned) means "not this pair"; the chosen pair gets one
    finish_match and is recorded in ``args.chosen``."""
    t = _Spy(verdicts)
    exp = [MappingMatch(t, object(), tag="e1"), MappingMatch(t, object(), tag="e2")]
    imp = [MappingMatch(t, tag="i1"), MappingMatch(t, tag="i2")]
    args = MatchArgs(None, None, imp)
    match_mapping(args, exp)
    assert t.calls == want
    assert args.chosen is not None and (args.chosen[0].tag, args.chosen[1].tag) == want[-1][1:]


@pytest.mark.parametrize("verdict,err", [(errors.Busy("busy"), errors.Busy), (-16, errors.Busy), (3, TypeError),
                                         (True, TypeError), ("0", TypeError)])
def test_a_match_that_fails_otherwise_aborts_the_negotiation(verdict, err):
    t = _Spy({"e1/i1": verdict})
    args = MatchArgs(None, None, [MappingMatch(t, tag="i1")])
    with pytest.raises(err):
        match_mapping(args, [MappingMatch(t, object(), tag="e1"), MappingMatch(t, object(), tag="e2")])
    assert ("finish", "e1", "i1") not in t.calls and args.chosen is None


def test_no_compatible_pair_is_einval_naming_both_lists():
    t = _Spy({})
    args = MatchArgs(None, None, [MappingMatch(t, tag="i1")])
    with pytest.raises(errors.InvalidArgument, match=r"offers \[DMA Mapped Scatter Gather Table\].*takes \[spy\]"):
        match_mapping(args, [mapping.sgt_exporter(mapping._LegacySgtOps())])
    with pytest.raises(errors.InvalidArgument, match=r"offers \[\], the importer takes \[spy\]"):
        match_mapping(args, None)
    with pytest.raises(TypeError):
        match_mapping(args, [object()])
    with pytest.raises(TypeError):
        match_mapping("args", [])
    assert t.calls == []


def test_sgt_negotiation_records_the_importers_choice(m):
    """The SGT type's compiled finish_match: the attachment's entry names
    the device and both P2P choices; ``peer2peer`` follows them."""
    gpu = m.device("gpu0")
    buf = SystemHeap(m).allocate(1 << 16)

    class P2p(ImporterOps):
        allow_peer2peer = True

        def invalidate_mappings(self, attachment: Any) -> None:
            pass

    for ops, accepts in ((None, mapping.SgtP2p.NO_P2P), (P2p(), mapping.SgtP2p.IMPORTER_ACCEPTS_P2P)):
        a = buf.attach(gpu) if ops is None else buf.dynamic_attach(gpu, ops)
        mt = a.map_type
        assert mt.type is mapping.SGT and mt.importing_dma_device is gpu and mt.importer_accepts_p2p is accepts
        assert mt.exporter_requires_p2p is mapping.SgtP2p.NO_P2P and a.peer2peer is (ops is not None)
        assert mapping.sgt_dma_device(a) is gpu and a.device is gpu
        assert mapping.get_sgt_ops(a) is mt.exp_ops
        buf.detach(a)
    imp = mapping.sgt_importer(gpu, 1)
    assert imp.importer_accepts_p2p is mapping.SgtP2p.IMPORTER_ACCEPTS_P2P and imp.exp_ops is None
    assert mapping.sgt_dma_device(object()) is None and mapping.sgt_dma_device(None) is None
    buf.put()


def test_the_rows_of_a_record_are_the_tables_at_map_time(m):
    buf = SystemHeap(m).allocate(4 << 12, layout="fragmented", seed=3)
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    (rec,) = a._maps
    assert np.array_equal(rec.dma, t.dma_ranges()) and not rec.dma.flags.writeable
    lo, n = (int(x) for x in t.dma_ranges()[0])
    assert rec.covers(lo, 1) and rec.covers(lo + n - 1, 1) and not rec.covers(0, 1)
    a.unmap_unlocked(t, BIDI)
    buf.detach(a)
    buf.put()


def test_an_exporter_that_overrides_is_dynamic_or_has_is_asked(m):
    """``dma_buf_is_dynamic()`` and ``Exporter.has`` are asked in C for the
    base class's methods; an exporter (or its class) that overrides either
    is called instead, and its answer decides the static importer's pin."""
    calls: list[str] = []
    buf = SystemHeap(m).allocate(1 << 16)
    exp = buf.exporter
    exp.is_dynamic = lambda: calls.append("is_dynamic") or True  # an instance's own answer
    exp.pin = lambda a: calls.append("pin")
    exp.unpin = lambda a: calls.append("unpin")
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    assert a.pin_count == 1 and calls == ["is_dynamic", "pin"]
    a.unmap_unlocked(t, BIDI)
    assert a.pin_count == 0 and calls == ["is_dynamic", "pin", "unpin"]
    buf.detach(a)
    buf.put()

    from pydmabuf.exporters.system_heap import HeapBuffer

    class Asked(HeapBuffer):
        @classmethod
        def has(cls, op: str) -> bool:
            calls.append(f"has {op}")
            return op == "pin"

        def pin(self, attachment: Any) -> None:
            calls.append("pin")

        def unpin(self, attachment: Any) -> None:
            calls.append("unpin")

    calls.clear()
    buf = SystemHeap(m).allocate(1 << 16)
    buf.exporter.__class__ = Asked
    a = buf.attach(m.device("gpu0"))
    assert calls == ["has match_mapping"]
    t = a.map_unlocked(BIDI)
    a.unmap_unlocked(t, BIDI)
    assert calls == ["has match_mapping", "has pin", "pin", "unpin"] and a.pin_count == 0
    buf.detach(a)
    buf.put()


def test_detach_checks_the_real_type_not_a_faked_class(m):
    """An object that claims to be an Attachment through ``__class__`` is
    not one: detach reports it as foreign and reads none of its memory."""

    class Fake:
        __slots__ = tuple(f"s{i}" for i in range(20))

        @property  # type: ignore[misc]
        def __class__(self) -> type:
            return Attachment

    buf = SystemHeap(m).allocate(1 << 12)
    f = Fake()
    f.s1 = buf  # type: ignore[attr-defined]
    assert isinstance(f, Attachment)
    with checks.report_mode():
        checks.clear()
        buf.detach(f)  # type: ignore[arg-type]
        assert [r.rule for r in checks.reports()] == ["detach-foreign"]
    checks.clear()
    buf.put()


def test_a_failed_bind_rebinds_nothing(m):
    from pydmabuf.dmabuf_ops import DmaBufBase, Exporter

    with pytest.raises((TypeError, AttributeError)):
        _dmabuf_api.bind(Attachment, pydmabuf.Device, object(), DmaBufBase)
    not_compiled = type("B", (), {"released": property(lambda self: False)})
    with pytest.raises(TypeError, match="released"):
        _dmabuf_api.bind(Attachment, pydmabuf.Device, Exporter, not_compiled)
    with pytest.raises(TypeError):
        _dmabuf_api.bind_matcher(MappingMatch, MatchArgs, None)
    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.attach(m.device("gpu0"))  # still bound as before
    buf.detach(a)
    buf.put()


def test_track_dma_checks_the_direction_before_the_ranges(m):
    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.dynamic_attach(m.device("gpu0"), ImporterOps())
    with pytest.raises(errors.InvalidArgument, match="not a DMA direction"):
        a.track_dma("junk", 99)
    buf.detach(a)
    buf.put()


def test_a_buffer_class_that_overrides_released_is_asked(m):
    """The attachment's checks ask the buffer's ``released`` (a subclass
    may answer for itself, by a property or by its own __getattribute__),
    as dma_buf_map_attachment's callers see it."""
    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.attach(m.device("gpu0"))
    cls = type(buf)

    class FakeRel(cls):  # type: ignore[misc, valid-type]
        def __getattribute__(self, n: str) -> Any:
            return True if n == "released" else object.__getattribute__(self, n)

    for sub in (type("Gone", (cls,), {"released": property(lambda self: True)}), FakeRel):
        buf.__class__ = sub
        with checks.report_mode():
            checks.clear()
            with pytest.raises(errors.LifetimeError):
                a.map_unlocked(BIDI)
            assert [r.rule for r in checks.reports()] == ["use-after-release"]
        checks.clear()
        buf.__class__ = cls
    buf.detach(a)
    buf.put()


def test_an_unmap_compares_directions_by_value(m):
    """The record's direction is compared by value: a plain int equal to
    the member is the same direction (no unmap-direction report)."""
    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    (rec,) = a._maps
    rec.direction = 0
    with checks.report_mode():
        checks.clear()
        a.unmap_unlocked(t, 0)
        assert checks.reports() == [] and a.live_mappings == 0
    buf.detach(a)
    buf.put()


def test_the_compat_entry_checks_its_args_and_keeps_its_ops_name(m):
    buf = SystemHeap(m).allocate(1 << 12)
    with pytest.raises(TypeError, match="args must be MatchArgs"):
        mapping.exporter_matches(None, buf.exporter)
    a = buf.attach(m.device("gpu0"))
    assert "ops=_LegacySgtOps" in repr(a.map_type)
    buf.detach(a)
    buf.put()


def test_a_delegated_is_dynamic_answers_for_the_class_it_is_bound_to(m):
    """``e.is_dynamic = other.is_dynamic`` (delegation): the answer is the
    other exporter class's, as calling it would give."""
    from pydmabuf.exporters.system_heap import HeapBuffer

    class Pins(HeapBuffer):
        def pin(self, attachment: Any) -> None:
            raise AssertionError("a static exporter's answer: no pin")

        def unpin(self, attachment: Any) -> None:
            raise AssertionError("no unpin either")

    buf = SystemHeap(m).allocate(1 << 12)
    buf.exporter.__class__ = Pins
    buf.exporter.is_dynamic = HeapBuffer.is_dynamic  # bound to the static class
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    assert a.pin_count == 0
    a.unmap_unlocked(t, BIDI)
    buf.detach(a)
    buf.put()


def test_created_at_takes_any_str_and_can_be_deleted(m):
    class Site(str):
        pass

    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.attach(m.device("gpu0"))
    t = a.map_unlocked(BIDI)
    (rec,) = a._maps
    for obj in (a, rec):
        obj.created_at = Site("here:1")
        assert obj.created_at == "here:1"
        with pytest.raises(TypeError):
            obj.created_at = 3
        del obj.created_at
        with pytest.raises(AttributeError):
            obj.created_at
        obj.created_at = "back:2"
    a.unmap_unlocked(t, BIDI)
    buf.detach(a)
    buf.put()


def test_a_call_from_code_without_line_numbers_records_none(m):
    buf = SystemHeap(m).allocate(1 << 12)
    gpu = m.device("gpu0")

    def f() -> Any:
        return buf.attach(gpu)

    c = f.__code__
    n = len(c.co_code) // 2
    table = bytearray()
    while n > 0:  # "no location" entries (3.11 line table) over every code unit
        k = min(n, 8)
        table.append(0x80 | (15 << 3) | (k - 1))
        n -= k
    f.__code__ = c.replace(co_linetable=bytes(table))
    a = f()
    assert a.created_at == "test_dmabuf_api.py:None"
    buf.detach(a)
    buf.put()


def test_an_attachment_whose_buffer_was_cleared_is_no_leak_to_report(m, recwarn):
    buf = SystemHeap(m).allocate(1 << 12)
    a = buf.attach(m.device("gpu0"))
    a.dmabuf = None
    with pytest.raises(AttributeError):
        a._owns()
    del a
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, (ResourceWarning, pytest.PytestUnraisableExceptionWarning))]
    buf._attachments.clear()
    buf.put()


def test_the_p2p_entry_without_a_device_is_logged_by_the_mapping_module(caplog):
    from pydmabuf.mapping import SgtP2p

    exp = MappingMatch(mapping.SGT, mapping._LegacySgtOps(), exporter_requires_p2p=SgtP2p.EXPORTER_REQUIRES_P2P_DISTANCE)
    imp = mapping.sgt_importer(None, True)
    with caplog.at_level("WARNING", logger="pydmabuf.mapping"):
        with pytest.raises(errors.InvalidArgument):
            match_mapping(MatchArgs(None, None, [imp]), [exp])
    (rec,) = caplog.records
    assert rec.name == "pydmabuf.mapping" and rec.filename == "mapping.py" and "without a P2P device" in rec.message


class _P2pOps(ImporterOps):
    allow_peer2peer = True

    def invalidate_mappings(self, attachment: Any) -> None:
        pass


def _negotiated(a: Any) -> tuple[Any, ...]:
    mt = a.map_type
    return (type(mt), mt.type, mt.exp_ops, mt.data, dict(vars(mt)), a.peer2peer, a.device)


def test_the_sgt_wrappers_negotiate_as_the_general_attach_does(m):
    """dma_buf_sgt_attach() to an unaware exporter works the compat match
    out directly; it must record what dma_buf_mapping_attach() with the
    same importer entry records."""
    gpu = m.device("gpu0")
    buf = SystemHeap(m).allocate(1 << 16)
    for ops in (None, _P2pOps()):
        fast = buf.attach(gpu) if ops is None else buf.dynamic_attach(gpu, ops)
        general = buf.mapping_attach([mapping.sgt_importer(gpu, ops is not None)], ops)
        assert _negotiated(fast) == _negotiated(general)
        assert fast.map_type.exp_ops is mapping._COMPAT_SGT.exp_ops
        buf.detach(fast)
        buf.detach(general)
    buf.put()


@pytest.mark.parametrize("where", ["class match", "class finish_match", "instance match", "instance finish_match"])
def test_a_replaced_sgt_callback_is_called_by_the_sgt_wrappers(m, monkeypatch, where):
    """Whoever replaces the SGT type's match or finish_match sees every
    attach call it, the wrappers' included."""
    gpu = m.device("gpu0")
    buf = SystemHeap(m).allocate(1 << 16)
    cls = type(mapping.SGT)
    name = where.split()[1]
    calls: list[str] = []
    orig = getattr(cls, name)

    def spy(self: Any, *args: Any) -> Any:
        calls.append(name)
        return orig(self, *args)

    if where.startswith("class"):
        monkeypatch.setattr(cls, name, spy)
    else:
        monkeypatch.setattr(mapping.SGT, name, spy.__get__(mapping.SGT), raising=False)
    a = buf.attach(gpu)
    assert calls == [name]
    assert a.map_type.importing_dma_device is gpu and a.device is gpu
    buf.detach(a)
    monkeypatch.undo()
    b = buf.attach(gpu)
    assert calls == [name]  # the built-in ones again: worked out directly
    buf.detach(b)
    buf.put()


def test_a_p2p_requiring_compat_entry_goes_the_general_way(m, monkeypatch):
    """A compat entry that (by someone's hand) requires P2P is matched by
    the SGT type's match, which refuses a static importer."""
    gpu = m.device("gpu0")
    buf = SystemHeap(m).allocate(1 << 16)
    entry = mapping._COMPAT_SGT
    monkeypatch.setitem(vars(entry), "exporter_requires_p2p", mapping.SgtP2p.EXPORTER_REQUIRES_P2P_DISTANCE)
    monkeypatch.setitem(vars(entry), "exporting_p2p_device", gpu)
    with pytest.raises(errors.InvalidArgument, match="no compatible mapping type"):
        buf.attach(gpu)
    monkeypatch.undo()
    buf.detach(buf.attach(gpu))
    buf.put()


def test_a_mapping_match_reads_through_a_compiled_slot_and_copies_as_before():
    """MappingMatch reads attributes through its compiled base's getattr
    slot, whose __getattr__ a subclass can still chain to; everything an
    entry holds is a plain instance attribute, so vars(), copy and pickle
    (every protocol, slots of subclasses, a subclass's own __getstate__)
    behave as for a plain object."""
    import copy
    import pickle

    class Fallback(MappingMatch):
        def __getattr__(self, n: str) -> Any:
            return 1 if n == "extra" else super().__getattr__(n)

    f = Fallback(mapping.SGT, None)
    assert f.extra == 1
    with pytest.raises(AttributeError, match="Scatter Gather Table entry has no 'nope'"):
        f.nope
    entry = MappingMatch(mapping.SGT, None, importing_dma_device="dev", importer_accepts_p2p=1)
    assert isinstance(entry, _dmabuf_api.MatchCore)
    assert vars(entry) == {"type": mapping.SGT, "exp_ops": None, "_data": entry.data,
                           "importing_dma_device": "dev", "importer_accepts_p2p": 1}
    clones = [copy.copy(entry), copy.deepcopy(entry)]
    clones += [pickle.loads(pickle.dumps(entry, protocol=p)) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    for clone in clones:
        assert type(clone) is MappingMatch and clone.data == entry.data
        assert vars(clone).keys() == vars(entry).keys() and clone.importing_dma_device == "dev"
    assert copy.copy(entry).type is mapping.SGT
    d = vars(copy.copy(entry))
    assert d["importing_dma_device"] == "dev"  # the dict outlives its entry, untouched

    class Tagged(MappingMatch):
        __slots__ = ("tag",)

    t = Tagged(mapping.SGT, None, importing_dma_device="dev0")
    t.tag = "mine"
    assert copy.copy(t).tag == "mine" and copy.deepcopy(t).tag == "mine"

    class Mine(MappingMatch):
        extra = 5

        def __getstate__(self) -> dict[str, Any]:
            d = dict(self.__dict__)
            d.pop("colour", None)
            return d

    mine = Mine(mapping.PAL, "ops", colour="red")
    assert (mine.type, mine.exp_ops, mine.colour, mine.extra) == (mapping.PAL, "ops", "red", 5)
    assert copy.copy(mine).colour == "red"  # from the entry's data
    del mine.__dict__["colour"]
    assert mine.colour == "red"  # still in the entry's data
    with pytest.raises(AttributeError, match="Physical Address List entry has no 'size'"):
        mine.size
    with pytest.raises(TypeError, match="not a MatchCore class"):
        _dmabuf_api.match_of(int, mapping.SGT, None, {})


def test_a_match_class_whose_new_returns_anything_else_is_not_asked():
    """The built-in entries are made by the compiled base's own
    constructor, as object.__new__ made them: a __new__ a subclass (or
    MappingMatch, patched) defines is not called, and the class to bind
    must derive from the base."""
    class Odd(MappingMatch):
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return 12345678901234567890

    e = _dmabuf_api.match_of(Odd, mapping.SGT, None, {"a": 1})
    assert type(e) is Odd and e.a == 1 and e.type is mapping.SGT
    with pytest.raises(TypeError, match="MatchCore"):
        _dmabuf_api.bind_matcher(int, MatchArgs, lambda rv, what: None)
    assert str(_dmabuf_api._Site()) == "None:0"  # a site made from Python: no code to read


def test_what_an_exporter_class_has_follows_the_class_as_it_changes(m):
    """``Exporter.has`` by the built-in rule is remembered per class in C;
    a class given (or losing) an op afterwards, or whose base changes, is
    answered anew."""
    from pydmabuf.exporters.system_heap import HeapBuffer

    class Base(HeapBuffer):
        pass

    class Sub(Base):
        pass

    pins: list[str] = []
    buf = SystemHeap(m).allocate(1 << 16)
    buf.exporter.__class__ = Sub
    a = buf.attach(m.device("gpu0"))

    def round_trip() -> int:
        t = a.map_unlocked(BIDI)
        n = a.pin_count
        a.unmap_unlocked(t, BIDI)
        return n

    assert round_trip() == 0 and round_trip() == 0 and not buf.exporter.is_dynamic()
    Base.pin = lambda self, att: pins.append("pin")  # on the base: the subclass changes with it
    Base.unpin = lambda self, att: pins.append("unpin")
    assert round_trip() == 1 and pins == ["pin", "unpin"] and buf.exporter.is_dynamic()
    del Base.pin, Base.unpin
    assert round_trip() == 0 and pins == ["pin", "unpin"]
    def match_mapping(self: Any, args: Any) -> None:
        pins.append("match_mapping")
        mapping.match_mapping(args, [mapping.sgt_exporter(mapping._COMPAT_SGT.exp_ops)])

    Sub.match_mapping = match_mapping
    b = buf.attach(m.device("gpu0"))  # the exporter's own match_mapping now negotiates
    assert pins[-1] == "match_mapping" and b.map_type.exp_ops is mapping._COMPAT_SGT.exp_ops
    buf.detach(b)
    buf.detach(a)
    buf.put()


def test_the_exporters_attach_and_detach_are_called_unless_they_are_the_bases(m):
    """The base Exporter's attach / detach do nothing and are skipped; an
    exporter class's or instance's own are called, also when given after
    the class was first used."""
    calls: list[str] = []
    buf = SystemHeap(m).allocate(1 << 12)
    gpu = m.device("gpu0")
    buf.detach(buf.attach(gpu))
    exp = buf.exporter
    exp.attach = lambda a: calls.append("instance attach")
    a = buf.attach(gpu)
    del exp.attach
    type(exp).detach = lambda self, a: calls.append("class detach")
    try:
        buf.detach(a)
    finally:
        del type(exp).detach
    buf.detach(buf.attach(gpu))
    assert calls == ["instance attach", "class detach"]
    buf.put()


def test_released_and_alive_follow_the_buffer_class_as_it_changes(m):
    """``released`` is read in C while it is the base's property, asked of
    a class that replaces it later; ``_alive`` likewise."""
    buf = SystemHeap(m).allocate(1 << 12)
    gpu = m.device("gpu0")

    class Mine(type(buf)):  # type: ignore[misc]
        pass

    buf.__class__ = Mine
    a = buf.attach(gpu)
    a.unmap_unlocked(a.map_unlocked(BIDI), BIDI)
    Mine.released = property(lambda self: True)
    seen: list[str] = []
    Mine._alive = lambda self, what: seen.append(what)
    with checks.report_mode():
        checks.clear()
        with pytest.raises(errors.LifetimeError):
            a.map_unlocked(BIDI)
        buf.detach(buf.attach(gpu))
        assert [r.rule for r in checks.reports()] == ["use-after-release"] and seen == ["attach"]
    checks.clear()
    del Mine.released, Mine._alive
    a.unmap_unlocked(a.map_unlocked(BIDI), BIDI)
    buf.detach(a)
    buf.put()


def test_the_c_shortcuts_give_way_to_what_python_would_look_up(m):
    """A lock object that is not a threading lock is used as a with
    statement would (both methods looked up first, nothing done if one is
    missing); ``_alive`` takes any ``what``."""
    gpu = m.device("gpu0")
    buf = SystemHeap(m).allocate(1 << 12)

    class EnterOnly:
        n = 0

        def __enter__(self) -> None:
            self.n += 1

    lock = buf._lock
    buf._lock = EnterOnly()
    with pytest.raises(AttributeError, match="__exit__"):
        buf.attach(gpu)
    assert buf.attachments == [] and buf._lock.n == 0
    buf._lock = lock
    assert buf._alive(None) is None and buf._alive(5) is None
    buf.put()


def test_second_review_edges_of_entries_locks_and_binding(m):
    """An entry without a __dict__ answers a missing name with an
    AttributeError (no endless look-up); match_of from Python stores the
    data one attribute at a time (str names only); a lock object's
    special methods are found and bound as a with statement would; bind
    wants the lifecycle's Owner."""
    from collections import defaultdict

    with pytest.raises(AttributeError, match="mapping entry has no 'x'"):
        _dmabuf_api.MatchCore().x

    class NoDict(_dmabuf_api.MatchCore):
        __slots__ = ()

    with pytest.raises(AttributeError, match="mapping entry has no 'x'"):
        NoDict().x
    e = MappingMatch(mapping.SGT, None)
    e._data = defaultdict(lambda: "fallback")
    assert e.anything == "fallback"  # any mapping the entry's data is, as before
    with pytest.raises(TypeError):
        _dmabuf_api.match_of(MappingMatch, mapping.SGT, None, {1: 2})

    class StaticLock:
        entered: list[str] = []

        @staticmethod
        def __enter__() -> None:
            StaticLock.entered.append("enter")

        @classmethod
        def __exit__(cls, *exc: object) -> None:
            cls.entered.append("exit")

    buf = SystemHeap(m).allocate(1 << 12)
    lock = buf._lock
    buf._lock = StaticLock()
    a = buf.attach(m.device("gpu0"))
    assert StaticLock.entered == ["enter", "exit"]
    buf._lock = lock
    buf.detach(a)
    buf.put()
    from pydmabuf.dmabuf_ops import DmaBufBase, Exporter

    with pytest.raises(TypeError, match="Owner"):
        _dmabuf_api.bind(_dmabuf_api.AttachmentCore, pydmabuf.Device, Exporter, DmaBufBase)
