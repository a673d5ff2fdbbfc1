"""Machinery of the hostile-input matrix (test_hostile.py).

A :class:`Case` is data: an id, a factory building fresh state, the hostile
call, the exception it must raise (with the errno for a
:mod:`pydmabuf.errors` class), and which objects' observable state must be
the same before and after.  :func:`snapshot` knows what "observable" means
for every pydmabuf object.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import gc
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import pydmabuf
from pydmabuf import checks, errors, files
from pydmabuf.dma import IovaState
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf
from pydmabuf.exporters.vfio import VfioPciBar
from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, NvmeQueue, RdmaMr
from pydmabuf.importers.nvme import NvmeMapping
from pydmabuf.importers.rdma import UmemDmabuf
from pydmabuf.machine import DEFAULT_SPEC, Device, Machine

E = errors

#: What a failure may raise besides a pydmabuf.errors class: what Python
#: convention asks for (wrong type, wrong value/shape/dtype, a buffer that
#: cannot be exported).
ALLOWED_PLAIN = (TypeError, ValueError, BufferError)
#: Never from inside the package, even as a subclass of an allowed kind
#: (numpy's AxisError is a ValueError and an IndexError).
FORBIDDEN = (IndexError, KeyError, AttributeError, ZeroDivisionError, AssertionError, SystemError,
             MemoryError, RecursionError, NotImplementedError, UnboundLocalError)


class S:
    """The state a case's factory builds: attributes, the objects to
    watch, and what to undo afterwards (newest first)."""

    def __init__(self, watch: tuple[Any, ...] = (), **kw: Any) -> None:
        self.__dict__.update(kw)
        self.watch = tuple(watch)
        self.cleanups: list[Callable[[], Any]] = []

    def later(self, fn: Callable[[], Any]) -> S:
        self.cleanups.append(fn)
        return self

    def cleanup(self) -> None:
        try:
            for fn in reversed(self.cleanups):
                fn()
        finally:
            # Whatever happened, do not leave a watched lock held by this
            # thread for the next case to trip over.
            for o in self.watch:
                m = o.resv if isinstance(o, DmaBuf) else o
                if isinstance(m, pydmabuf.WwMutex) and m.held_by_current_thread():
                    m.unlock()


@dataclass(frozen=True)
class Case:
    """One hostile call.

    ``raises`` is the exception class; for a :mod:`pydmabuf.errors` class
    the errno must be ``errno`` (default: the class's own code)."""

    id: str
    make: Callable[[], S]
    call: Callable[[S], Any]
    raises: type[BaseException]
    errno: int | None = None
    #: What must not change; default :func:`snapshot` of the watched objects.
    snap: Callable[[S], Any] | None = None

    def expected_errno(self) -> int | None:
        if issubclass(self.raises, errors.DmaBufError):
            return self.errno if self.errno is not None else self.raises.default_errno
        return None



class Cases(list):  # type: ignore[type-arg]
    """A matrix of :class:`Case` as data: :meth:`add` one call, or
    :meth:`sweep` a table of bad values through one argument."""

    def add(self, id: str, make: Callable[[], S], call: Callable[[S], Any], raises: type[BaseException],
            errno: int | None = None, snap: Callable[[S], Any] | None = None) -> None:
        self.append(Case(id, make, call, raises, errno, snap))

    def sweep(self, prefix: str, make: Callable[[], S], call: Callable[[S, Any], Any],
              table: list[tuple[str, Any, type[BaseException]]],
              override: dict[str, type[BaseException] | None] | None = None) -> None:
        """One case per ``(label, value, exception)`` of ``table``;
        ``override`` changes a label's expectation, or with None drops it
        (the value is valid for that argument)."""
        for label, value, exp in table:
            if override and label in override:
                if override[label] is None:
                    continue
                exp = override[label]  # type: ignore[assignment]
            self.append(Case(f"{prefix}={label}", make, (lambda s, v=value: call(s, v)), exp))

def check_exception(case: Case, exc: BaseException) -> None:
    """The raised exception is the expected kind, carries the errno, and is
    none of the kinds that betray a bug inside the package."""
    assert isinstance(exc, case.raises), f"{case.id}: expected {case.raises.__name__}, got {type(exc).__name__}: {exc}"
    assert not isinstance(exc, FORBIDDEN) or isinstance(exc, errors.DmaBufError), (
        f"{case.id}: {type(exc).__name__} from inside the package: {exc}")
    if isinstance(exc, errors.DmaBufError):
        want = case.expected_errno()
        if want is not None:
            assert exc.errno == want, f"{case.id}: errno {exc.errno} ({errors.errno_name(exc.errno)}), want {want}"
        assert isinstance(exc.strerror, str) and exc.strerror, f"{case.id}: an error without a message"
    else:
        assert isinstance(exc, ALLOWED_PLAIN), f"{case.id}: {type(exc).__name__} is not an allowed failure: {exc}"
        assert str(exc), f"{case.id}: an error without a message"


# ---------------------------------------------------------------- machines


def _spec() -> dict[str, Any]:
    spec = copy.deepcopy(DEFAULT_SPEC)
    for io in spec["iommus"]:
        io["fq_timeout"] = None  # deterministic: no timer flushes
    return spec


SPEC = _spec()


def mach() -> Machine:
    """A fresh default machine whose lazy IOMMUs never flush on a timer
    (the machine :data:`SPEC` describes)."""
    return Machine.default(flush_timer=False)


# ---------------------------------------------------------------- the run

#: The calling thread's lock state between cases: nothing held.
CLEAN = {"held": 0, "in_section": False, "signal_pending": False}


def run_case(case: Case) -> None:
    """Build the case's state, make the call, check the exception and
    that the watched state is as before; clean up (quietly if it failed)."""
    assert checks.mode() == "strict"
    assert pydmabuf._core.thread_lock_state() == CLEAN, "an earlier case leaked a lock, section or signal"
    s = case.make()
    ok = False
    try:
        snap = case.snap or (lambda st: snapshot(st.watch))
        before = snap(s)
        with pytest.raises(Exception) as info:
            case.call(s)
        check_exception(case, info.value)
        assert snap(s) == before, f"{case.id}: the failed call changed state"
        ok = True
    finally:
        if ok:
            s.cleanup()
            assert pydmabuf._core.thread_lock_state() == CLEAN, f"{case.id}: a lock, section or signal leaked"
        else:  # do not let a half-cleaned case warn in later tests
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    s.cleanup()
                except Exception:
                    pass
                del s
                gc.collect()


# ---------------------------------------------------------------- snapshots


def _fence_snap(f: pydmabuf.Fence) -> tuple[Any, ...]:
    return (type(f).__name__, f.context, f.seqno, f.error, f.timestamp, f.pending_callbacks,
            f.sw_signaling_enabled, f.seqno64)


def _mutex_snap(m: pydmabuf.WwMutex) -> tuple[Any, ...]:
    ctx = m.locking_ctx()
    return (m.is_locked(), m.owner_thread, id(ctx) if ctx is not None else None)


def snapshot(obj: Any) -> Any:
    """Everything a caller can observe of ``obj`` (recursively for
    containers), as plain comparable values."""
    if isinstance(obj, (list, tuple)):
        return tuple(snapshot(o) for o in obj)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (int, str, bytes, float)):
        return obj
    if isinstance(obj, pydmabuf.RangeTable):
        return ("RangeTable", obj.as_array().tolist(), obj.total_nbytes, len(obj))
    if isinstance(obj, pydmabuf.SgTable):
        return ("SgTable", obj.nents, obj.orig_nents, obj.total_nents, obj.nchunks, obj.nslots,
                obj.metadata_nbytes, np.asarray(obj).tobytes(), id(obj.mapping))
    if isinstance(obj, pydmabuf.IovaDomain):
        return ("IovaDomain", _iova_live(obj), _iova_stats(obj.stats))
    if isinstance(obj, pydmabuf.IoPageTable):
        return ("IoPageTable", obj.stats, obj.leaves().tolist())
    if isinstance(obj, pydmabuf.IommuDomain):
        st = {k: v for k, v in obj.stats.items() if not k.startswith("iova_")}
        return ("IommuDomain", st, obj.queued().tolist(), snapshot(obj.pgtable), snapshot(obj.iovad))
    if isinstance(obj, pydmabuf.Resv):
        return ("Resv", _mutex_snap(obj), obj.num_fences, obj.max_fences, [id(f) for f in obj.get_fences()])
    if isinstance(obj, pydmabuf.WwMutex):
        return ("WwMutex", _mutex_snap(obj))
    if isinstance(obj, pydmabuf.AcquireContext):
        c = obj.contending
        return ("AcquireContext", obj.acquired, obj.is_done, obj.is_finished, obj.wounded,
                [id(m) for m in obj.held()], id(c) if c is not None else None)
    if isinstance(obj, pydmabuf.FenceChain):
        return _fence_snap(obj) + (id(obj.fence), id(obj.prev), obj.prev_seqno)
    if isinstance(obj, pydmabuf.FenceArray):
        return _fence_snap(obj) + (tuple(id(f) for f in obj.fences), obj.signal_on_any)
    if isinstance(obj, pydmabuf.Fence):
        return _fence_snap(obj)
    if isinstance(obj, DmaBuf):
        return ("DmaBuf", obj.refcount, obj.released, obj.revoked, obj.name, obj.size, obj.live_mappings,
                obj._vmap_count, [snapshot(a) for a in obj.attachments], snapshot(obj.resv),
                sorted(id(m) for m in obj._mappings), sorted((m.stale, id(m)) for m in obj._mappings),
                snapshot(getattr(obj.exporter, "machine", None)), _exporter_counters(obj.exporter))
    if isinstance(obj, Attachment):
        return ("Attachment", id(obj.dmabuf), obj.detached, obj.pin_count, obj.live_mappings, obj.invalidations,
                obj.dynamic)
    if isinstance(obj, CpuMapping):
        return ("CpuMapping", obj.offset, obj.nbytes, obj.faults, obj.zaps)
    if isinstance(obj, IovaState):
        return ("IovaState", obj.addr, obj.size, obj.live, obj.linked_nbytes, snapshot(obj._linked),
                list(getattr(obj, "_bounces", [])), obj.uses_swiotlb)
    if isinstance(obj, Device):
        maps = getattr(obj, "_single_maps", {})
        return ("Device", obj.name, obj.prefer_32bit_iova, obj.memory_decode, obj.power_state, sorted((k, v.size) for k, bucket in maps.items() for v in bucket),
                _domain_held(obj.domain), (obj.swiotlb.slots_used, obj.swiotlb.mappings) if obj.swiotlb else None)
    if isinstance(obj, Machine):
        return ("Machine", snapshot(obj.address_map), obj.pages.allocated_pages, obj.private_pages.allocated_pages,
                sorted((n, p.slots_used, p.mappings) for n, p in obj.swiotlb_pools.items()),
                sorted(obj.devices), [_domain_held(g.domain) for g in obj.groups.values()])
    if isinstance(obj, _DRIVERS):
        return _driver_snap(obj)
    if isinstance(obj, Files):
        return ("fds", sorted((fd, id(o)) for fd, o in files.open_fds().items()))
    raise TypeError(f"no snapshot for {type(obj).__name__}")


#: IOVA counters that say what is held.  The others count events (a failed
#: allocation is counted, as the kernel counts nothing but changes its
#: fast-fail size ``max32_alloc_size``), and a failing ``alloc_iova_fast``
#: empties the range caches into the tree before its retry, as the
#: kernel's does: the ranges held, not the caches, are the state.
_IOVA_HELD = ("live_ranges", "live_pages", "live_nbytes", "reserved_ranges", "reserved_pages",
              "queued_ranges", "queued_pages")


def _iova_stats(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k in _IOVA_HELD}


def _iova_live(d: pydmabuf.IovaDomain) -> list[list[int]]:
    """The ranges held: allocated (state 0), reserved (2), queued (3);
    cached ranges (1) are free to the allocator's callers."""
    return [r for r in d.ranges(with_state=True).tolist() if r[2] != 1]


def _domain_held(dom: Any) -> Any:
    """What a DMA domain holds: its mappings, live and reserved IOVA, and
    the flush queue.  At the DMA API and dma-buf level a rolled-back walk
    (mapped, then undone) has done page-table work the counters record, as
    the kernel's would; only what is held must be as before."""
    if dom is None:
        return None
    return (dom.pgtable.leaves().tolist(), _iova_live(dom.iovad), dom.queued().tolist())


def _exporter_counters(exp: Any) -> tuple[Any, ...]:
    # maps - unmaps: the tables the exporter has out (a rolled-back map
    # counts one of each).
    return (getattr(exp, "maps", 0) - getattr(exp, "unmaps", 0),) + tuple(
        getattr(exp, k, None) for k in ("live", "released", "pins", "moves"))


_DRIVERS = (VfioPciBar, IommufdIoas, KvmVm, RdmaMr, UmemDmabuf, DrmGpu, NvmeQueue, NvmeMapping)


def _driver_snap(obj: Any) -> Any:
    """What the driver models show: the device file's and the device's
    VFIO state, IOAS areas and page tables, VM slots and second stage, MR
    and umem state, GEM objects, block queues and their requests."""
    if isinstance(obj, VfioPciBar):
        c = obj._core
        return ("VfioPciBar", obj.is_open, obj.memory_decode, obj.power_state, obj.resets, c.open_count,
                c.user_power_state, c.pm_runtime_engaged, c.bar_zaps,
                [(id(b), b.revoked, b.refcount) for b in obj.dmabufs], snapshot(obj.device))
    if isinstance(obj, IommufdIoas):
        return ("IommufdIoas", obj.closed, [(a.iova, a.nbytes, a.prot, a.revoked, a.phys, id(a.dmabuf))
                                            for a in obj.areas],
                [(h.id, [d.name for d in h.devices], h.domain.pgtable.leaves().tolist()) for h in obj.hwpts],
                obj.reserved, [d.name for d in obj.devices], obj.stats)
    if isinstance(obj, KvmVm):
        return ("KvmVm", obj.closed, [(s.slot, s.base_gfn, s.npages, s.flags, s.faults, s.zaps,
                                       id(s.dmabuf), id(s.attachment)) for s in obj.memslots],
                obj.stats, obj.ept.leaves().tolist())
    if isinstance(obj, RdmaMr):
        return ("RdmaMr", obj.deregistered, obj.faults, obj.zaps, obj.mtt_writes, obj.translation_valid,
                obj.dma_ranges().tolist(), snapshot(obj.umem))
    if isinstance(obj, UmemDmabuf):
        return ("UmemDmabuf", obj.pinned, obj.revoked, obj.released, obj.mapped, obj.maps,
                obj.dma_ranges().tolist())
    if isinstance(obj, DrmGpu):
        return ("DrmGpu", obj.freed, obj.dma_ranges().tolist())
    if isinstance(obj, NvmeQueue):
        return ("NvmeQueue", obj.requests, obj.max_segment_size, obj.seg_boundary_mask)
    return ("NvmeMapping", obj.live, obj.segments.tolist())


class Files:
    """Stands for the process's fd table in a watch list."""


FILES = Files()


# ------------------------------------------------------------------ threads


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a new thread; return its result or re-raise its
    exception here (for calls from the wrong thread)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the call from another thread hung"
    if "e" in out:
        raise out["e"]
    return out.get("r")


# ------------------------------------------------------- bad-value catalogues

#: Values for a parameter parsed as an unsigned 64-bit integer.
BAD_U64: list[tuple[str, Any, type[BaseException]]] = [
    ("str", "1", TypeError),
    ("float", 1.0, TypeError),
    ("None", None, TypeError),
    ("object", object(), TypeError),
    ("-1", -1, E.InvalidArgument),
    ("np.int64(-1)", np.int64(-1), E.InvalidArgument),
    ("2**64", 2**64, E.Overflow),
    ("2**200", 2**200, E.Overflow),
]

#: Buffers that are not C-contiguous 1-D u64 (for a u64 buffer parameter).
def bad_u64_buffers() -> list[tuple[str, Any, type[BaseException]]]:
    a = np.arange(8, dtype=np.uint64)
    return [
        ("int32", np.arange(4, dtype=np.int32), ValueError),
        ("int64", np.arange(4, dtype=np.int64), ValueError),
        ("float64", np.arange(4, dtype=np.float64), ValueError),
        ("bool", np.ones(4, dtype=bool), ValueError),
        ("object", np.array([1, 2], dtype=object), ValueError),
        ("2-D", a.reshape(4, 2), ValueError),
        ("strided", a[::2], ValueError),
        ("reversed", a[::-1], ValueError),
        ("broadcast-2**40", np.broadcast_to(np.uint64(1), (2**40,)), ValueError),
        ("bytes", b"\0" * 16, ValueError),
        ("str", "abc", TypeError),
        ("None", None, TypeError),
        ("int", 5, TypeError),
        ("list-negative", [1, -1], E.InvalidArgument),
        ("list-2**64", [1, 2**64], E.InvalidArgument),
        ("list-float", [1.5], TypeError),
        ("list-str", ["a"], TypeError),
        ("list-bool", [True, False], TypeError),
        ("list-ragged", [[1, 2], [3]], ValueError),
        ("memoryview-int64", memoryview(np.ones(4, dtype=np.int64)), ValueError),
        ("array-q", __import__("array").array("q", [1, 2]), ValueError),
        ("0-d", np.uint64(5), ValueError),
    ] + hostile_u64_buffers()


def bad_pair_buffers() -> list[tuple[str, Any, type[BaseException]]]:
    """Not an (N, 2) u64 buffer of (address, nbytes) rows."""
    a = np.arange(12, dtype=np.uint64) * 4096 + 4096
    return [
        ("int64", np.ones((2, 2), dtype=np.int64), ValueError),
        ("float64", np.ones((2, 2), dtype=np.float64), ValueError),
        ("object", np.ones((2, 2), dtype=object), ValueError),
        ("3-columns", a.reshape(4, 3), ValueError),
        ("3-D", a.reshape(3, 2, 2), ValueError),
        ("transposed", a.reshape(6, 2).T, ValueError),
        ("strided-rows", a.reshape(6, 2)[::2], ValueError),
        ("odd-flat", a[:3], ValueError),
        ("broadcast-2**40", np.broadcast_to(np.uint64(4096), (2**40, 2)), ValueError),
        ("None", None, TypeError),
        ("str", "ab", TypeError),
        ("list-3-columns", [[4096, 4096, 4096]], ValueError),
        ("list-negative", [[4096, -1]], E.InvalidArgument),
        ("list-float", [[4096.0, 4096.0]], TypeError),
        ("list-flat-odd", [4096, 4096, 4096], ValueError),
        ("list-flat-even", [4096, 4096, 8192, 4096], ValueError),
        ("list-2x3", [[4096, 4096, 4096], [8192, 4096, 4096]], ValueError),
        ("list-2**64", [[4096, 2**64]], E.InvalidArgument),
        ("bytes", b"\0" * 32, ValueError),
        ("memoryview-int64", memoryview(np.ones(4, dtype=np.int64)), ValueError),
    ] + hostile_pair_buffers()


# The kinds of input that used to crash the interpreter or be read after
# their hold was dropped: structured dtypes of every shape (Cython's own
# format parser crashed on them), the table's own exports, formats of the
# right size but the wrong meaning, released and non-contiguous views.  A
# u64 buffer argument must refuse every one with a ValueError (TypeError
# for what has no buffer at all) before reading an element.

_SG_FOR_EXPORTS = pydmabuf.SgTable.from_pages(np.array([1, 2, 9], dtype=np.uint64))


def _structured() -> list[tuple[str, np.dtype]]:
    return [
        ("u8-u4", np.dtype([("a", "<u8"), ("b", "<u4")])),             # first u64, then another size
        ("u8-u1-packed", np.dtype([("a", "<u8"), ("b", "u1")])),       # 9-byte items
        ("u8-u8", np.dtype([("a", "<u8"), ("b", "<u8")])),             # 16 bytes: a pair, but structured
        ("u8-only", np.dtype([("a", "<u8")])),                         # the right size, but a record
        ("u1-u8", np.dtype([("a", "u1"), ("b", "<u8")])),
        ("u4-u4", np.dtype([("a", "<u4"), ("b", "<u4")])),             # 8 bytes of two fields
        ("nested", np.dtype([("a", [("x", "<u8"), ("y", "<u4")]), ("b", "<u8")])),
        ("subarray", np.dtype([("a", "<u8", (2,)), ("b", "<u4")])),
        ("aligned", np.dtype([("a", "u1"), ("b", "<u8"), ("c", "<u2")], align=True)),
    ]


def _released() -> memoryview:
    m = memoryview(np.arange(4, dtype=np.uint64))
    m.release()
    return m


def hostile_u64_buffers() -> list[tuple[str, Any, type[BaseException]]]:
    """New kinds of bad input for a 1-D u64 buffer parameter."""
    out: list[tuple[str, Any, type[BaseException]]] = []
    for tag, dt in _structured():
        out.append((f"struct-{tag}", np.zeros(4, dtype=dt), ValueError))
    out += [
        ("struct-0-d", np.zeros((), dtype=_structured()[0][1]), ValueError),
        ("sg-entries", _SG_FOR_EXPORTS.entries, ValueError),
        ("sg-table", _SG_FOR_EXPORTS, ValueError),
        ("big-endian", np.arange(4, dtype=">u8"), ValueError),
        ("uint32", np.arange(4, dtype=np.uint32), ValueError),
        ("complex64", np.zeros(4, dtype=np.complex64), ValueError),     # 8 bytes, not an integer
        ("datetime64", np.zeros(4, dtype="M8[ns]"), ValueError),
        ("read-only-int64", _readonly(np.arange(4, dtype=np.int64)), ValueError),
        ("read-only-strided", _readonly(np.arange(8, dtype=np.uint64))[::2], ValueError),
        ("memoryview-strided", memoryview(np.arange(8, dtype=np.uint64))[::2], ValueError),
        ("memoryview-2-D", memoryview(bytearray(32)).cast("Q", (2, 2)), ValueError),
        ("memoryview-released", _released(), ValueError),
        ("array-d", __import__("array").array("d", [1.0, 2.0]), ValueError),
        ("ctypes-struct", (_CPair * 2)(), ValueError),
        ("bytearray", bytearray(16), ValueError),
    ]
    return out


def hostile_pair_buffers() -> list[tuple[str, Any, type[BaseException]]]:
    """New kinds of bad input for an (N, 2) u64 pairs parameter."""
    out: list[tuple[str, Any, type[BaseException]]] = []
    for tag, dt in _structured():
        out.append((f"struct-{tag}", np.zeros((2, 2), dtype=dt), ValueError))
    out += [
        ("struct-rows", np.zeros(2, dtype=[("addr", "<u8"), ("len", "<u8")]), ValueError),
        ("struct-0-d", np.zeros((), dtype=_structured()[0][1]), ValueError),
        ("sg-entries", _SG_FOR_EXPORTS.entries, ValueError),
        ("sg-table", _SG_FOR_EXPORTS, ValueError),
        ("0-d", np.uint64(4096), ValueError),
        ("big-endian", np.full((2, 2), 4096, dtype=">u8"), ValueError),
        ("uint32", np.full((2, 2), 4096, dtype=np.uint32), ValueError),
        ("fortran", np.asfortranarray(np.full((3, 2), 4096, dtype=np.uint64)), ValueError),
        ("read-only-int64", _readonly(np.full((2, 2), 4096, dtype=np.int64)), ValueError),
        ("read-only-3-columns", _readonly(np.full((2, 3), 4096, dtype=np.uint64)), ValueError),
        ("memoryview-strided", memoryview(np.full((4, 2), 4096, dtype=np.uint64))[::2], ValueError),
        ("memoryview-released", _released(), ValueError),
        ("ctypes-struct", (_CPair * 2)(), ValueError),
    ]
    return out


class _CPair(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint32)]


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


__all__ = ["E", "S", "Case", "SPEC", "mach", "run_case", "CLEAN", "check_exception", "snapshot", "in_thread", "BAD_U64", "bad_u64_buffers",
           "bad_pair_buffers", "hostile_u64_buffers", "hostile_pair_buffers", "FILES", "errno"]
