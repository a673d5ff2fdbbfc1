"""Hostile input against every public entry point: a data-driven matrix.

Each case (see :mod:`hostile_support`) builds fresh state, makes one call
with a hostile argument (wrong types, negative and huge numbers, lengths
that overflow 64 bits, unaligned or empty input, the wrong dtype, shape or
memory layout, objects of another machine, use after free, the wrong
thread), and checks

* the call raises the expected exception: a :mod:`pydmabuf.errors` class
  with the kernel's errno, or TypeError / ValueError / BufferError where
  Python convention asks for them, never an IndexError, KeyError,
  AttributeError, bare OverflowError, MemoryError ... from inside the
  package, and never a crash;
* the failed call changed nothing: every watched object's observable
  state is the same before and after.

Hypothesis then throws random integers, byte strings and arrays at the
core tables (only allowed exception kinds, state unchanged on failure).
"""

from __future__ import annotations

import copy
import gc
import math
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydmabuf
import pydmabuf._floors
from hostile_support import (BAD_U64, E, FILES, SPEC, Case, Cases, S, bad_pair_buffers, bad_u64_buffers,
                             hostile_pair_buffers, hostile_u64_buffers,
                             check_exception, errno, in_thread, mach, run_case, snapshot)
from hostile_support import CLEAN as _CLEAN
from pydmabuf import (AcquireContext, DmaDirection, Fence, FenceArray, FenceChain, IommuDomain, IoPageTable,
                      IovaDomain, IovaState, Machine, RangeKind, RangeTable, Resv, SgTable, Usage, WwClass, WwMutex,
                      checks, files, mapping, workloads)
from pydmabuf.dmabuf import Exporter, ImporterOps, PhysVec, export
from pydmabuf.exporters import SystemHeap
from pydmabuf.importers import NvmeQueue

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL
TO_DEV = DmaDirection.TO_DEVICE
U64 = 2**64 - 1

#: Values for a parameter checked as ``isinstance(x, int)`` and a range
#: (kinds, flags, prot, cpu ...): NumPy integers are refused as a type.
BAD_INT: list[tuple[str, Any, type[BaseException]]] = [
    ("str", "1", TypeError),
    ("float", 1.0, TypeError),
    ("None", None, TypeError),
    ("object", object(), TypeError),
    ("-1", -1, E.InvalidArgument),
    ("2**64", 2**64, E.InvalidArgument),
    ("2**200", 2**200, E.InvalidArgument),
]

CASES = Cases()
add, sweep = CASES.add, CASES.sweep


# ================================================================== factories


def rt() -> S:
    t = RangeTable()
    t.insert(0x1000, 0x1000, kind=RangeKind.RAM, owner=1)
    t.insert(0x10000, 0x4000, kind=RangeKind.MMIO, owner=2, flags=3)
    t.insert(2**64 - 0x1000, 0x1000, kind=RangeKind.RESERVED, owner=3)
    return S(watch=[t], t=t)


def sg() -> S:
    t = SgTable.from_pages(np.array([1, 2, 3, 10, 11, 40], dtype=np.uint64), offset=0x100)
    return S(watch=[t], t=t)


def sg_empty() -> S:
    t = SgTable()
    return S(watch=[t], t=t)


def sg_dma_only() -> S:
    t = SgTable.from_ranges(np.array([[0x10000, 0x3000]], dtype=np.uint64))
    return S(watch=[t], t=t)


def iovad() -> S:
    d = IovaDomain(ncpus=2)
    d.reserve(0x100, 0x1FF)
    a = d.alloc(4, 0xFFFFF)
    b = d.alloc_fast(1, 0xFFFFF, cpu=1)
    c = d.alloc_fast(2, 0xFFFFF, cpu=0)
    d.free_fast(c, 2, cpu=0)  # cached now
    return S(watch=[d], d=d, a=a, b=b, c=c)


def pgt() -> S:
    p = IoPageTable()
    p.map(0x200000, 0x40000000, 0x200000)
    p.map(0x1000, 0x5000, 0x3000)
    return S(watch=[p], p=p)


def iommu(strict: bool = False) -> S:
    d = IommuDomain(strict=strict, fq_timeout=None, ncpus=2)
    d.iovad.reserve(0xFEE00, 0xFEEFF)
    a = d.map_dma(0x100000, 0x3000)
    b = d.map_dma(0x200000, 0x1000)
    d.unmap_dma(b, 0x1000)  # queued on a lazy domain
    d.map(0x7000_0000, 0x300000, 0x2000)
    return S(watch=[d], d=d, a=a, b=b)


def mach_state() -> S:
    m = mach()
    return S(watch=[m], m=m)


# ============================================= the core's seam: None tables
# A typed table or address map that is None must be refused before the core
# reads it (it once read None's memory as a table: a crash).

_U64_0 = np.zeros(1, dtype=np.uint64)
add("seam.sg_clear_dma.None", mach_state, lambda s: pydmabuf._core.sg_clear_dma(None), TypeError)
add("seam.sg_set_dma.None", mach_state, lambda s: pydmabuf._core.sg_set_dma(None, _U64_0, _U64_0), TypeError)
add("seam.unmap_sg_iommu.None", iommu, lambda s: pydmabuf._core.unmap_sg_iommu(None, s.d, 0), TypeError)
add("seam.map_sg_iommu.None", iommu,
    lambda s: pydmabuf._core.map_sg_iommu(None, s.d, 2**64 - 1, 2**32 - 1, 2**16, 0, 0, 3, None), TypeError)
add("seam.map_sg_direct.None", mach_state,
    lambda s: pydmabuf._core.map_sg_direct(None, 2**64 - 1, np.zeros(0, dtype=np.uint64), False, False, 0, None),
    TypeError)
add("seam.P2pContext.amap=None", mach_state, lambda s: pydmabuf._core.P2pContext(None, _U64_0, _U64_0), TypeError)
add("seam.remove_many.None", mach_state, lambda s: pydmabuf._core._remove_many(None, _U64_0), TypeError)


# ======================================================= RangeTable (core)

sweep("RangeTable.insert.start", rt, lambda s, v: s.t.insert(v, 0x1000), BAD_U64)
sweep("RangeTable.insert.nbytes", rt, lambda s, v: s.t.insert(0x100000, v), BAD_U64)
sweep("RangeTable.insert.owner", rt, lambda s, v: s.t.insert(0x100000, 0x1000, owner=v), BAD_U64)
sweep("RangeTable.insert.kind", rt, lambda s, v: s.t.insert(0x100000, 0x1000, kind=v), BAD_INT)
sweep("RangeTable.insert.flags", rt, lambda s, v: s.t.insert(0x100000, 0x1000, flags=v), BAD_INT)
add("RangeTable.insert.kind=256", rt, lambda s: s.t.insert(0x100000, 0x1000, kind=256), E.InvalidArgument)
add("RangeTable.insert.kind=np.uint8", rt, lambda s: s.t.insert(0x100000, 0x1000, kind=np.uint8(1)), TypeError)
add("RangeTable.insert.flags=2**32", rt, lambda s: s.t.insert(0x100000, 0x1000, flags=2**32), E.InvalidArgument)
add("RangeTable.insert.nbytes=0", rt, lambda s: s.t.insert(0x100000, 0), E.InvalidArgument)
add("RangeTable.insert.nbytes=False", rt, lambda s: s.t.insert(0x100000, False), E.InvalidArgument)
add("RangeTable.insert.wraps-2**64", rt, lambda s: s.t.insert(2**64 - 0x2000, 0x2001), E.Overflow)
add("RangeTable.insert.wraps-from-1", rt, lambda s: s.t.insert(1, 2**64), E.Overflow)
add("RangeTable.insert.overlap-head", rt, lambda s: s.t.insert(0x800, 0x1000), E.AlreadyExists)
add("RangeTable.insert.overlap-inside", rt, lambda s: s.t.insert(0x11000, 0x10), E.AlreadyExists)
add("RangeTable.insert.overlap-top", rt, lambda s: s.t.insert(2**64 - 1, 1), E.AlreadyExists)
add("RangeTable.insert.overlap-everything", rt, lambda s: s.t.insert(0, 2**64), E.AlreadyExists)

for _label, _buf, _exp in bad_u64_buffers():
    add(f"RangeTable.insert_many.starts={_label}", rt,
        lambda s, b=_buf: s.t.insert_many(b, np.array([0x10], dtype=np.uint64)), _exp)
    add(f"RangeTable.insert_many.nbytes={_label}", rt,
        lambda s, b=_buf: s.t.insert_many(np.array([0x100000], dtype=np.uint64), b), _exp)
    if _label not in ("int", "None"):  # a scalar owner, or none, is fine
        add(f"RangeTable.insert_many.owners={_label}", rt,
            lambda s, b=_buf: s.t.insert_many(np.array([0x100000], dtype=np.uint64),
                                              np.array([0x10], dtype=np.uint64), owners=b), _exp)


def _many(*rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    return np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1])


add("RangeTable.insert_many.length-mismatch", rt,
    lambda s: s.t.insert_many(np.array([0x100000, 0x200000], dtype=np.uint64), np.array([1], dtype=np.uint64)),
    ValueError)
add("RangeTable.insert_many.zero-length-last", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10), (0x200000, 0))), E.InvalidArgument)
add("RangeTable.insert_many.overflow", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10), (2**64 - 0x10, 0x11))), E.Overflow)
add("RangeTable.insert_many.overlap-each-other", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x1000), (0x100800, 0x1000))), E.AlreadyExists)
add("RangeTable.insert_many.overlap-table", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x1000), (0x10000, 0x1))), E.AlreadyExists)
add("RangeTable.insert_many.duplicate", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x1000), (0x100000, 0x1000))), E.AlreadyExists)
add("RangeTable.insert_many.kinds-256", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), kinds=np.array([256], dtype=np.uint64)),
    E.InvalidArgument)
add("RangeTable.insert_many.flags-2**32", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), flags=np.array([2**32], dtype=np.uint64)),
    E.InvalidArgument)
add("RangeTable.insert_many.kinds-scalar-300", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), kinds=300), E.InvalidArgument)
add("RangeTable.insert_many.owners-scalar--1", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), owners=-1), E.InvalidArgument)
add("RangeTable.insert_many.kinds-length", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), kinds=np.array([1, 2], dtype=np.uint64)), ValueError)
add("RangeTable.insert_many.flags-length", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), flags=np.zeros(0, dtype=np.uint64)), ValueError)
add("RangeTable.insert_many.kinds-str", rt,
    lambda s: s.t.insert_many(*_many((0x100000, 0x10)), kinds="ab"), TypeError)

sweep("RangeTable.erase.start", rt, lambda s, v: s.t.erase(v, 0x1000), BAD_U64)
sweep("RangeTable.erase.nbytes", rt, lambda s, v: s.t.erase(0x100, v), BAD_U64)
add("RangeTable.erase.nbytes=0", rt, lambda s: s.t.erase(0x1000, 0), E.InvalidArgument)
add("RangeTable.erase.wraps", rt, lambda s: s.t.erase(2**64 - 0x800, 0x801), E.Overflow)
sweep("RangeTable.remove.addr", rt, lambda s, v: s.t.remove(v), BAD_U64)
add("RangeTable.remove.not-found", rt, lambda s: s.t.remove(0x5000), E.NotFound)
add("RangeTable.remove.gap-below-top", rt, lambda s: s.t.remove(2**64 - 0x1001), E.NotFound)
for _label, _buf, _exp in bad_u64_buffers():
    add(f"RangeTable.remove_many.starts={_label}", rt, lambda s, b=_buf: s.t.remove_many(b), _exp)
add("RangeTable.remove_many.unsorted", rt,
    lambda s: s.t.remove_many(np.array([0x10000, 0x1000], dtype=np.uint64)), ValueError)
add("RangeTable.remove_many.repeated", rt,
    lambda s: s.t.remove_many(np.array([0x1000, 0x1000], dtype=np.uint64)), ValueError)
add("RangeTable.remove_many.one-not-a-start", rt,
    lambda s: s.t.remove_many(np.array([0x1000, 0x10001], dtype=np.uint64)), E.NotFound)
add("RangeTable.remove_many.last-missing", rt,
    lambda s: s.t.remove_many(np.array([0x1000, 0x10000, 2**64 - 1], dtype=np.uint64)), E.NotFound)
sweep("RangeTable.lookup.addr", rt, lambda s, v: s.t.lookup(v), BAD_U64)
sweep("RangeTable.next_after.addr", rt, lambda s, v: s.t.next_after(v), BAD_U64)
sweep("RangeTable.overlapping.start", rt, lambda s, v: s.t.overlapping(v, 1), BAD_U64)
sweep("RangeTable.overlapping.nbytes", rt, lambda s, v: s.t.overlapping(0x10, v), BAD_U64)
add("RangeTable.overlapping.nbytes=0", rt, lambda s: s.t.overlapping(0x10, 0), E.InvalidArgument)
add("RangeTable.overlapping.wraps", rt, lambda s: s.t.overlapping(2, 2**64 - 1), E.Overflow)
sweep("RangeTable.find_gap.nbytes", rt, lambda s, v: s.t.find_gap(v), BAD_INT,
      {"2**64": E.NoSpace, "2**200": E.NoSpace})
sweep("RangeTable.find_gap.align", rt, lambda s, v: s.t.find_gap(0x1000, align=v), BAD_U64)
sweep("RangeTable.find_gap.lo", rt, lambda s, v: s.t.find_gap(0x1000, lo=v), BAD_U64)
sweep("RangeTable.find_gap.hi", rt, lambda s, v: s.t.find_gap(0x1000, hi=v), BAD_U64)
add("RangeTable.find_gap.nbytes=0", rt, lambda s: s.t.find_gap(0), E.InvalidArgument)
add("RangeTable.find_gap.nbytes=2**64+1", rt, lambda s: s.t.find_gap(2**64 + 1), E.NoSpace)
add("RangeTable.find_gap.align=0", rt, lambda s: s.t.find_gap(0x1000, align=0), E.InvalidArgument)
add("RangeTable.find_gap.align=3", rt, lambda s: s.t.find_gap(0x1000, align=3), E.InvalidArgument)
add("RangeTable.find_gap.align=2**63-nospace", rt, lambda s: s.t.find_gap(0x1000, align=2**63, lo=1, hi=2**63 - 1),
    E.NoSpace)
add("RangeTable.find_gap.lo>hi", rt, lambda s: s.t.find_gap(0x10, lo=0x5000, hi=0x100), E.NoSpace)
add("RangeTable.find_gap.window-too-small", rt, lambda s: s.t.find_gap(0x2000, lo=0x2000, hi=0x3000), E.NoSpace)
add("RangeTable.find_gap.full-window", rt, lambda s: s.t.find_gap(1, lo=0x10000, hi=0x13FFF), E.NoSpace)


# ========================================================= SgTable (core)

for _label, _buf, _exp in bad_u64_buffers():
    add(f"SgTable.from_pages.pfns={_label}", sg_empty, lambda s, b=_buf: SgTable.from_pages(b), _exp)
    add(f"SgTable.append_pages.pfns={_label}", sg, lambda s, b=_buf: s.t.append_pages(b), _exp)
add("SgTable.from_pages.empty", sg_empty, lambda s: SgTable.from_pages(np.zeros(0, dtype=np.uint64)),
    E.InvalidArgument)
add("SgTable.from_pages.empty-list", sg_empty, lambda s: SgTable.from_pages([]), E.InvalidArgument)
add("SgTable.from_pages.pfn-beyond-52-bits", sg_empty, lambda s: SgTable.from_pages([1, 2**52]), E.OutOfRange)
add("SgTable.from_pages.pfn-2**64-1", sg_empty, lambda s: SgTable.from_pages([U64]), E.OutOfRange)
sweep("SgTable.from_pages.offset", sg_empty, lambda s, v: SgTable.from_pages([1], offset=v), BAD_INT)
add("SgTable.from_pages.offset=4096", sg_empty, lambda s: SgTable.from_pages([1], offset=4096), E.InvalidArgument)
add("SgTable.from_pages.offset=np.int64", sg_empty, lambda s: SgTable.from_pages([1], offset=np.int64(1)),
    TypeError)
sweep("SgTable.from_pages.nbytes", sg_empty, lambda s, v: SgTable.from_pages([1, 2], nbytes=v), BAD_INT, {"None": None})
add("SgTable.from_pages.nbytes=0", sg_empty, lambda s: SgTable.from_pages([1], nbytes=0), E.InvalidArgument)
add("SgTable.from_pages.nbytes=-1-offset-4095", sg_empty, lambda s: SgTable.from_pages([1], 4095, -1),
    E.InvalidArgument)  # one valid byte: the window below it must not admit negatives
add("SgTable.from_pages.nbytes-past-last-page", sg_empty, lambda s: SgTable.from_pages([1], nbytes=4097),
    E.InvalidArgument)
add("SgTable.from_pages.nbytes-short-of-last-page", sg_empty,
    lambda s: SgTable.from_pages([1, 2], offset=0x10, nbytes=4096 - 0x10), E.InvalidArgument)
sweep("SgTable.from_pages.max_segment", sg_empty, lambda s, v: SgTable.from_pages([1], max_segment=v), BAD_INT)
add("SgTable.from_pages.max_segment=4095", sg_empty, lambda s: SgTable.from_pages([1], max_segment=4095),
    E.InvalidArgument)
add("SgTable.from_pages.max_segment=0", sg_empty, lambda s: SgTable.from_pages([1], max_segment=0),
    E.InvalidArgument)
add("SgTable.from_pages.max_segment=2**32", sg_empty, lambda s: SgTable.from_pages([1], max_segment=2**32),
    E.InvalidArgument)
add("SgTable.append_pages.offset-on-nonempty", sg, lambda s: s.t.append_pages([100], offset=8),
    E.InvalidArgument)
sweep("SgTable.append_pages.left_pages", sg, lambda s, v: s.t.append_pages([100], left_pages=v), BAD_INT)
add("SgTable.append_pages.dma-only", sg_dma_only, lambda s: s.t.append_pages([100]), E.InvalidArgument)
add("SgTable.append_pages.pfn-beyond-52-bits", sg, lambda s: s.t.append_pages([41, 2**52]), E.OutOfRange)


def sg_exported() -> S:
    s = sg()
    view = s.t.entries  # a live export: the slots may not move
    s.view = view
    return s.later(lambda: s.__dict__.pop("view"))


add("SgTable.append_pages.while-exported", sg_exported,
    lambda s: s.t.append_pages(np.arange(1000, 1400, 2, dtype=np.uint64)), BufferError)


def sg_mapped() -> S:
    m = mach()
    t = SgTable.from_pages(np.array([0x100000, 0x100001], dtype=np.uint64))
    dev = m.device("gpu1")
    pydmabuf.dma_map_sgtable(dev, t, BIDI)
    s = S(watch=[t, dev], t=t, m=m, dev=dev)
    return s.later(lambda: pydmabuf.dma_unmap_sgtable(dev, t, BIDI))


add("SgTable.append_pages.mapped", sg_mapped, lambda s: s.t.append_pages([0x100002]), E.Busy)
sweep("SgTable.alloc.nents", sg_empty, lambda s, v: SgTable.alloc(v), BAD_INT)
add("SgTable.alloc.nents=0", sg_empty, lambda s: SgTable.alloc(0), E.InvalidArgument)
add("SgTable.alloc.nents=2**32", sg_empty, lambda s: SgTable.alloc(2**32), E.InvalidArgument)
for _label, _buf, _exp in bad_pair_buffers():
    add(f"SgTable.from_ranges.pairs={_label}", sg_empty, lambda s, b=_buf: SgTable.from_ranges(b), _exp)
add("SgTable.from_ranges.empty", sg_empty, lambda s: SgTable.from_ranges(np.zeros((0, 2), dtype=np.uint64)),
    E.InvalidArgument)
add("SgTable.from_ranges.empty-list", sg_empty, lambda s: SgTable.from_ranges([]), E.InvalidArgument)
add("SgTable.from_ranges.zero-length", sg_empty, lambda s: SgTable.from_ranges([[0x1000, 0x1000], [0x5000, 0]]),
    E.InvalidArgument)
add("SgTable.from_ranges.wraps", sg_empty, lambda s: SgTable.from_ranges([[U64, 2]]), E.Overflow)
add("SgTable.from_ranges.last-byte-ok-then-wraps", sg_empty,
    lambda s: SgTable.from_ranges([[2**64 - 0x1000, 0x1000], [2**64 - 0x10, 0x11]]), E.Overflow)
sweep("SgTable.nents_for_len.nbytes", sg, lambda s, v: s.t.nents_for_len(v), BAD_U64)
add("SgTable.nents_for_len.too-long", sg, lambda s: s.t.nents_for_len(6 * G), E.InvalidArgument)
add("SgTable.nents_for_len.empty-table", sg_empty, lambda s: s.t.nents_for_len(1), E.InvalidArgument)
add("SgTable.from_buffer.empty", sg_empty, lambda s: SgTable.from_buffer(b""), E.InvalidArgument)
add("SgTable.from_buffer.not-a-buffer", sg_empty, lambda s: SgTable.from_buffer(5), TypeError)
add("SgTable.from_buffer.strided", sg_empty, lambda s: SgTable.from_buffer(np.zeros(64, np.uint8)[::2]),
    BufferError)
add("SgTable.from_buffer.max_segment=0", sg_empty,
    lambda s: SgTable.from_buffer(bytearray(8192), max_segment=0), E.InvalidArgument)


# ================================================================= pagemap

add("pagemap.empty-bytes", sg_empty, lambda s: pydmabuf.pagemap(b""), E.InvalidArgument)
add("pagemap.empty-array", sg_empty, lambda s: pydmabuf.pagemap(np.zeros(0)), E.InvalidArgument)
add("pagemap.int", sg_empty, lambda s: pydmabuf.pagemap(5), TypeError)
add("pagemap.None", sg_empty, lambda s: pydmabuf.pagemap(None), TypeError)
add("pagemap.str", sg_empty, lambda s: pydmabuf.pagemap("abc"), TypeError)
add("pagemap.strided", sg_empty, lambda s: pydmabuf.pagemap(np.zeros(100)[::3]), BufferError)
add("pagemap.transposed", sg_empty, lambda s: pydmabuf.pagemap(np.zeros((3, 5))[:, :2]), BufferError)
add("pagemap.broadcast-2**40", sg_empty,
    lambda s: pydmabuf.pagemap(np.broadcast_to(np.uint8(1), (2**40,))), BufferError)
add("buffer_span.strided", sg_empty, lambda s: pydmabuf._core.buffer_span(np.zeros(10)[::2]), BufferError)
add("buffer_span.int", sg_empty, lambda s: pydmabuf._core.buffer_span(1), TypeError)


# ========================================================= IovaDomain (core)

BAD_CPU = BAD_INT + [("ncpus", 2, E.InvalidArgument)]
#: The IOMMU domains of these cases have two CPUs.
BAD_CPU2 = BAD_CPU + [("3", 3, E.InvalidArgument)]

sweep("IovaDomain().granule", iovad, lambda s, v: IovaDomain(granule=v), BAD_U64)
sweep("IovaDomain().start_pfn", iovad, lambda s, v: IovaDomain(start_pfn=v), BAD_U64)
sweep("IovaDomain().ncpus", iovad, lambda s, v: IovaDomain(ncpus=v), BAD_INT)
add("IovaDomain().granule=3", iovad, lambda s: IovaDomain(granule=3), E.InvalidArgument)
add("IovaDomain().granule=8192", iovad, lambda s: IovaDomain(granule=8192), E.InvalidArgument)
add("IovaDomain().granule=0", iovad, lambda s: IovaDomain(granule=0), E.InvalidArgument)
add("IovaDomain().start_pfn=0", iovad, lambda s: IovaDomain(start_pfn=0), E.InvalidArgument)
add("IovaDomain().ncpus=0", iovad, lambda s: IovaDomain(ncpus=0), E.InvalidArgument)
sweep("IovaDomain.alloc.npages", iovad, lambda s, v: s.d.alloc(v, 0xFFFFF), BAD_U64)
sweep("IovaDomain.alloc.limit_pfn", iovad, lambda s, v: s.d.alloc(1, v), BAD_U64)
add("IovaDomain.alloc.npages=0", iovad, lambda s: s.d.alloc(0, 0xFFFFF), E.InvalidArgument)
add("IovaDomain.alloc.limit=anchor", iovad, lambda s: s.d.alloc(1, U64), E.InvalidArgument)
add("IovaDomain.alloc.too-big", iovad, lambda s: s.d.alloc(0x100000, 0xFFFFF), E.OutOfMemory)
add("IovaDomain.alloc.huge-npages", iovad, lambda s: s.d.alloc(U64, U64 - 1), E.OutOfMemory)
add("IovaDomain.alloc.limit-below-start", iovad, lambda s: s.d.alloc(1, 0), E.OutOfMemory)
add("IovaDomain.alloc.limit-in-reserved", iovad, lambda s: s.d.alloc(0x100, 0x1FF), E.OutOfMemory)
sweep("IovaDomain.alloc_fast.npages", iovad, lambda s, v: s.d.alloc_fast(v, 0xFFFFF), BAD_U64)
sweep("IovaDomain.alloc_fast.limit_pfn", iovad, lambda s, v: s.d.alloc_fast(1, v), BAD_U64)
sweep("IovaDomain.alloc_fast.cpu", iovad, lambda s, v: s.d.alloc_fast(1, 0xFFFFF, cpu=v), BAD_CPU)
add("IovaDomain.alloc_fast.huge", iovad, lambda s: s.d.alloc_fast(U64, U64 - 1), E.InvalidArgument)
add("IovaDomain.alloc_fast.too-big-no-flush", iovad,
    lambda s: s.d.alloc_fast(0x100000, 0xFFFFF, flush_rcache=False), E.OutOfMemory)
sweep("IovaDomain.free.pfn", iovad, lambda s, v: s.d.free(v), BAD_U64)
add("IovaDomain.free.unknown", iovad, lambda s: s.d.free(0x5), E.NotFound)
add("IovaDomain.free.reserved", iovad, lambda s: s.d.free(0x150), E.NotFound)
add("IovaDomain.free.cached", iovad, lambda s: s.d.free(s.c), E.NotFound)
add("IovaDomain.free.anchor", iovad, lambda s: s.d.free(U64), E.NotFound)
sweep("IovaDomain.free_fast.pfn", iovad, lambda s, v: s.d.free_fast(v, 1), BAD_U64)
sweep("IovaDomain.free_fast.npages", iovad, lambda s, v: s.d.free_fast(s.b, v), BAD_U64)
sweep("IovaDomain.free_fast.cpu", iovad, lambda s, v: s.d.free_fast(s.b, 1, cpu=v), BAD_CPU)
add("IovaDomain.free_fast.unknown", iovad, lambda s: s.d.free_fast(0x5, 1), E.NotFound)
add("IovaDomain.free_fast.cached-twice", iovad, lambda s: s.d.free_fast(s.c, 2), E.NotFound)
add("IovaDomain.free_fast.npages=0", iovad, lambda s: s.d.free_fast(s.b, 0), E.InvalidArgument)
add("IovaDomain.free_fast.bigger-than-range", iovad, lambda s: s.d.free_fast(s.b, 2), E.InvalidArgument)
add("IovaDomain.free_fast.reserved", iovad, lambda s: s.d.free_fast(0x100, 1), E.NotFound)
sweep("IovaDomain.reserve.pfn_lo", iovad, lambda s, v: s.d.reserve(v, 0x10), BAD_U64)
sweep("IovaDomain.reserve.pfn_hi", iovad, lambda s, v: s.d.reserve(0x10, v), BAD_U64)
add("IovaDomain.reserve.lo>hi", iovad, lambda s: s.d.reserve(5, 2), E.InvalidArgument)
add("IovaDomain.reserve.beyond-pfns", iovad, lambda s: s.d.reserve(0, U64), E.InvalidArgument)
sweep("IovaDomain.find.pfn", iovad, lambda s, v: s.d.find(v), BAD_U64)
sweep("IovaDomain.alloc_many.count", iovad, lambda s, v: s.d.alloc_many(1, v, 0xFFFFF), BAD_U64)
sweep("IovaDomain.alloc_many.limit_pfn", iovad, lambda s, v: s.d.alloc_many(1, 2, v), BAD_U64)
sweep("IovaDomain.alloc_many.cpu", iovad, lambda s, v: s.d.alloc_many(1, 2, 0xFFFFF, cpu=v), BAD_CPU)
for _label, _buf, _exp in bad_u64_buffers():
    if _label != "int":  # an int is one size for all
        add(f"IovaDomain.alloc_many.npages={_label}", iovad, lambda s, b=_buf: s.d.alloc_many(b, 2, 0xFFFFF), _exp)
    add(f"IovaDomain.free_many.pfns={_label}", iovad, lambda s, b=_buf: s.d.free_many(b), _exp)
add("IovaDomain.alloc_many.count=2**61", iovad, lambda s: s.d.alloc_many(1, 2**61, U64 - 1), E.OutOfMemory)
add("IovaDomain.alloc_many.count=2**63", iovad, lambda s: s.d.alloc_many(1, 2**63, U64 - 1), E.OutOfMemory)
add("IovaDomain.alloc_many.count=2**64-1", iovad, lambda s: s.d.alloc_many(1, U64, U64 - 1), E.OutOfMemory)
add("IovaDomain.alloc_many.count=2**40", iovad, lambda s: s.d.alloc_many(1, 2**40, U64 - 1), E.OutOfMemory)
add("IovaDomain.alloc_many.npages=0", iovad, lambda s: s.d.alloc_many(0, 2, 0xFFFFF), E.InvalidArgument)
add("IovaDomain.alloc_many.sizes-with-0", iovad,
    lambda s: s.d.alloc_many(np.array([1, 0], dtype=np.uint64), 2, 0xFFFFF), E.InvalidArgument)
add("IovaDomain.alloc_many.sizes-vs-count", iovad,
    lambda s: s.d.alloc_many(np.array([1, 1], dtype=np.uint64), 3, 0xFFFFF), ValueError)
add("IovaDomain.alloc_many.limit=anchor", iovad, lambda s: s.d.alloc_many(1, 2, U64), E.InvalidArgument)
add("IovaDomain.free_many.one-unknown", iovad,
    lambda s: s.d.free_many(np.array([s.a, 0x5], dtype=np.uint64), fast=False), E.NotFound)
add("IovaDomain.free_many.twice", iovad,
    lambda s: s.d.free_many(np.array([s.b, s.b], dtype=np.uint64)), E.NotFound)
add("IovaDomain.free_many.sizes-length", iovad,
    lambda s: s.d.free_many(np.array([s.b], dtype=np.uint64), np.array([1, 1], dtype=np.uint64)), ValueError)
add("IovaDomain.free_many.npages=0", iovad, lambda s: s.d.free_many(np.array([s.b], dtype=np.uint64), 0),
    E.InvalidArgument)
add("IovaDomain.free_many.cached", iovad,
    lambda s: s.d.free_many(np.array([s.b, s.c], dtype=np.uint64), np.array([1, 2], dtype=np.uint64)),
    E.NotFound)
sweep("IovaDomain.free_cpu_cached.cpu", iovad, lambda s, v: s.d.free_cpu_cached(v), BAD_CPU)
sweep("IovaDomain.rcache_state.cpu", iovad, lambda s, v: s.d.rcache_state(v), BAD_CPU)
sweep("IovaDomain.reclaim_depot.runs", iovad, lambda s, v: s.d.reclaim_depot(v), BAD_U64, {"None": None})


# ======================================================= IoPageTable (core)

sweep("IoPageTable().ias", pgt, lambda s, v: IoPageTable(ias=v), BAD_INT)
sweep("IoPageTable().oas", pgt, lambda s, v: IoPageTable(oas=v), BAD_INT)
add("IoPageTable().ias=31", pgt, lambda s: IoPageTable(ias=31), E.InvalidArgument)
add("IoPageTable().ias=49", pgt, lambda s: IoPageTable(ias=49), E.InvalidArgument)
add("IoPageTable().oas=53", pgt, lambda s: IoPageTable(oas=53), E.InvalidArgument)
sweep("IoPageTable.map.iova", pgt, lambda s, v: s.p.map(v, 0, G), BAD_U64)
sweep("IoPageTable.map.phys", pgt, lambda s, v: s.p.map(0x10000000, v, G), BAD_U64)
sweep("IoPageTable.map.nbytes", pgt, lambda s, v: s.p.map(0x10000000, 0, v), BAD_U64)
sweep("IoPageTable.map.prot", pgt, lambda s, v: s.p.map(0x10000000, 0, G, v), BAD_INT)
add("IoPageTable.map.prot=0", pgt, lambda s: s.p.map(0x10000000, 0, G, 0), E.InvalidArgument)
add("IoPageTable.map.prot-unknown-bit", pgt, lambda s: s.p.map(0x10000000, 0, G, 1 << 30), E.InvalidArgument)
add("IoPageTable.map.prot=np.int64", pgt, lambda s: s.p.map(0x10000000, 0, G, np.int64(3)), TypeError)
add("IoPageTable.map.unaligned-iova", pgt, lambda s: s.p.map(0x10000010, 0, G), E.InvalidArgument)
add("IoPageTable.map.unaligned-phys", pgt, lambda s: s.p.map(0x10000000, 0x10, G), E.InvalidArgument)
add("IoPageTable.map.unaligned-size", pgt, lambda s: s.p.map(0x10000000, 0, G + 1), E.InvalidArgument)
add("IoPageTable.map.iova-past-ias", pgt, lambda s: s.p.map(2**48, 0, G), E.OutOfRange)
add("IoPageTable.map.iova-wraps", pgt, lambda s: s.p.map(2**64 - G, 0, 2 * G), E.OutOfRange)
add("IoPageTable.map.phys-past-oas", pgt, lambda s: s.p.map(0x10000000, 2**52, G), E.OutOfRange)
add("IoPageTable.map.phys-wraps", pgt, lambda s: s.p.map(0x10000000, 2**64 - G, 2 * G), E.OutOfRange)
add("IoPageTable.map.overlap-block", pgt, lambda s: s.p.map(0x3FF000, 0, 2 * G), E.AlreadyExists)
add("IoPageTable.map.overlap-page-last", pgt, lambda s: s.p.map(0, 0, 0x2000), E.AlreadyExists)
add("IoPageTable.map.block-over-table", pgt, lambda s: s.p.map(0, 0, 0x200000), E.AlreadyExists)


def pgt_failing_alloc() -> S:
    s = pgt()
    s.p._fail_alloc_after(1)
    return s.later(lambda: s.p._fail_alloc_after(None))


add("IoPageTable.map.out-of-tables-halfway", pgt_failing_alloc,
    lambda s: s.p.map(0x8000000000, 0, 0x400000 + G), E.OutOfMemory)
for _label, _buf, _exp in bad_u64_buffers():
    add(f"IoPageTable.map_many.phys={_label}", pgt, lambda s, b=_buf: s.p.map_many(0x10000000, b, G), _exp)
    if _label != "int":
        add(f"IoPageTable.map_many.nbytes={_label}", pgt,
            lambda s, b=_buf: s.p.map_many(0x10000000, np.array([0, G], dtype=np.uint64), b), _exp)
    add(f"IoPageTable.iova_to_phys_many.iovas={_label}", pgt, lambda s, b=_buf: s.p.iova_to_phys_many(b), _exp)
sweep("IoPageTable.map_many.iova", pgt, lambda s, v: s.p.map_many(v, np.array([0], dtype=np.uint64), G), BAD_U64)
sweep("IoPageTable.map_many.nbytes-scalar", pgt,
      lambda s, v: s.p.map_many(0x10000000, np.array([0], dtype=np.uint64), v), BAD_U64,
      {"np.int64(-1)": ValueError})
add("IoPageTable.map_many.lengths-mismatch", pgt,
    lambda s: s.p.map_many(0x10000000, np.array([0, G], dtype=np.uint64), np.array([G], dtype=np.uint64)),
    ValueError)
for _per_call in (False, True):
    _tag = "per-call" if _per_call else "bulk"
    add(f"IoPageTable.map_many.{_tag}.last-overlaps", pgt,
        lambda s, pc=_per_call: s.p.map_many(0x1FE000, np.array([0, G, 2 * G], dtype=np.uint64), G, per_call=pc),
        E.AlreadyExists)
    add(f"IoPageTable.map_many.{_tag}.last-unaligned", pgt,
        lambda s, pc=_per_call: s.p.map_many(0x10000000, np.array([0, G, 0x10], dtype=np.uint64), G, per_call=pc),
        E.InvalidArgument)
    add(f"IoPageTable.map_many.{_tag}.runs-past-ias", pgt,
        lambda s, pc=_per_call: s.p.map_many(2**48 - 2 * G, np.array([0, G, 2 * G], dtype=np.uint64), G,
                                             per_call=pc), E.OutOfRange)
    add(f"IoPageTable.map_many.{_tag}.span-wraps", pgt,
        lambda s, pc=_per_call: s.p.map_many(2**47, np.array([0, 0], dtype=np.uint64),
                                             np.array([2**63, 2**63], dtype=np.uint64), per_call=pc),
        E.OutOfRange)
sweep("IoPageTable.unmap.iova", pgt, lambda s, v: s.p.unmap(v, G), BAD_U64)
sweep("IoPageTable.unmap.nbytes", pgt, lambda s, v: s.p.unmap(0x1000, v), BAD_U64)
add("IoPageTable.unmap.unaligned", pgt, lambda s: s.p.unmap(0x1800, G), E.InvalidArgument)
add("IoPageTable.unmap.unaligned-size", pgt, lambda s: s.p.unmap(0x1000, 100), E.InvalidArgument)
sweep("IoPageTable.iova_to_phys.iova", pgt, lambda s, v: s.p.iova_to_phys(v), BAD_U64)
sweep("IoPageTable._fail_alloc_after.n", pgt, lambda s, v: s.p._fail_alloc_after(v), BAD_U64, {"None": None})


# ======================================================= IommuDomain (core)

sweep("IommuDomain().aperture_bits", iommu, lambda s, v: IommuDomain(aperture_bits=v), BAD_INT)
sweep("IommuDomain().ncpus", iommu, lambda s, v: IommuDomain(ncpus=v), BAD_INT)
sweep("IommuDomain().fq_size", iommu, lambda s, v: IommuDomain(fq_size=v), BAD_INT)
add("IommuDomain().granule=str", iommu, lambda s: IommuDomain(granule="4096"), TypeError)
add("IommuDomain().granule=float", iommu, lambda s: IommuDomain(granule=4096.0), TypeError)
add("IommuDomain().granule=8192", iommu, lambda s: IommuDomain(granule=8192), E.NotSupported)
add("IommuDomain().aperture_bits=31", iommu, lambda s: IommuDomain(aperture_bits=31), E.InvalidArgument)
add("IommuDomain().fq_size=3", iommu, lambda s: IommuDomain(fq_size=3), E.InvalidArgument)
add("IommuDomain().fq_size=1", iommu, lambda s: IommuDomain(fq_size=1), E.InvalidArgument)
add("IommuDomain().fq_size=2**21", iommu, lambda s: IommuDomain(fq_size=2**21), E.InvalidArgument)
for _label, _v, _exp in [("str", "1", TypeError), ("0", 0, E.InvalidArgument), ("-1", -1, E.InvalidArgument),
                         ("nan", math.nan, E.InvalidArgument), ("inf", math.inf, E.InvalidArgument),
                         ("3601", 3601, E.InvalidArgument), ("2**64", 2**64, E.InvalidArgument)]:
    add(f"IommuDomain().fq_timeout={_label}", iommu, lambda s, v=_v: IommuDomain(fq_timeout=v), _exp)
for _how in ("map", "map_nosync"):
    sweep(f"IommuDomain.{_how}.iova", iommu, lambda s, v, h=_how: getattr(s.d, h)(v, 0, G), BAD_U64)
    sweep(f"IommuDomain.{_how}.phys", iommu, lambda s, v, h=_how: getattr(s.d, h)(0x6000_0000, v, G), BAD_U64)
    sweep(f"IommuDomain.{_how}.nbytes", iommu, lambda s, v, h=_how: getattr(s.d, h)(0x6000_0000, 0, v), BAD_U64)
    sweep(f"IommuDomain.{_how}.prot", iommu, lambda s, v, h=_how: getattr(s.d, h)(0x6000_0000, 0, G, v), BAD_INT)
    add(f"IommuDomain.{_how}.overlap", iommu, lambda s, h=_how: getattr(s.d, h)(0x7000_1000, 0, 2 * G),
        E.AlreadyExists)
    add(f"IommuDomain.{_how}.unaligned", iommu, lambda s, h=_how: getattr(s.d, h)(0x6000_0800, 0, G),
        E.InvalidArgument)
    add(f"IommuDomain.{_how}.past-aperture", iommu, lambda s, h=_how: getattr(s.d, h)(2**48, 0, G),
        E.OutOfRange)
    add(f"IommuDomain.{_how}.prot=0", iommu, lambda s, h=_how: getattr(s.d, h)(0x6000_0000, 0, G, 0),
        E.InvalidArgument)
sweep("IommuDomain.sync_map.iova", iommu, lambda s, v: s.d.sync_map(v, G), BAD_U64)
sweep("IommuDomain.sync_map.nbytes", iommu, lambda s, v: s.d.sync_map(0, v), BAD_U64)
sweep("IommuDomain.unmap.iova", iommu, lambda s, v: s.d.unmap(v, G), BAD_U64)
sweep("IommuDomain.unmap.nbytes", iommu, lambda s, v: s.d.unmap(0x7000_0000, v), BAD_U64)
add("IommuDomain.unmap.unaligned", iommu, lambda s: s.d.unmap(0x7000_0800, G), E.InvalidArgument)
sweep("IommuDomain.iova_to_phys.iova", iommu, lambda s, v: s.d.iova_to_phys(v), BAD_U64)
sweep("IommuDomain.alloc_iova.nbytes", iommu, lambda s, v: s.d.alloc_iova(v), BAD_U64)
sweep("IommuDomain.alloc_iova.dma_limit", iommu, lambda s, v: s.d.alloc_iova(G, v), BAD_U64)
sweep("IommuDomain.alloc_iova.cpu", iommu, lambda s, v: s.d.alloc_iova(G, cpu=v), BAD_CPU2)
add("IommuDomain.alloc_iova.nbytes=0", iommu, lambda s: s.d.alloc_iova(0), E.InvalidArgument)
add("IommuDomain.alloc_iova.unaligned", iommu, lambda s: s.d.alloc_iova(G + 1), E.InvalidArgument)
add("IommuDomain.alloc_iova.huge", iommu, lambda s: s.d.alloc_iova(2**64 - G), E.OutOfMemory)
add("IommuDomain.alloc_iova.limit-too-low", iommu, lambda s: s.d.alloc_iova(2 * G, 0x1FFF), E.OutOfMemory)
add("IommuDomain.alloc_iova_pci.limit-too-low", iommu, lambda s: s.d.alloc_iova_pci(2 * G, 0x1FFF, True),
    E.OutOfMemory)
sweep("IommuDomain.free_iova.iova", iommu, lambda s, v: s.d.free_iova(v, G), BAD_U64)
sweep("IommuDomain.free_iova.nbytes", iommu, lambda s, v: s.d.free_iova(s.a & ~0xFFF, v), BAD_U64)
sweep("IommuDomain.free_iova.cpu", iommu, lambda s, v: s.d.free_iova(s.a & ~0xFFF, 3 * G, cpu=v), BAD_CPU2)
add("IommuDomain.free_iova.unknown", iommu, lambda s: s.d.free_iova(0x9000_0000, G), E.NotFound)
add("IommuDomain.free_iova.queued", iommu, lambda s: s.d.free_iova(s.b, G), E.NotFound)
add("IommuDomain.free_iova.huge", iommu, lambda s: s.d.free_iova(2**64 - G, 2**64 - G), E.NotFound)
sweep("IommuDomain.map_dma.phys", iommu, lambda s, v: s.d.map_dma(v, G), BAD_U64)
sweep("IommuDomain.map_dma.nbytes", iommu, lambda s, v: s.d.map_dma(0x400000, v), BAD_U64)
sweep("IommuDomain.map_dma.prot", iommu, lambda s, v: s.d.map_dma(0x400000, G, v), BAD_INT)
sweep("IommuDomain.map_dma.dma_limit", iommu, lambda s, v: s.d.map_dma(0x400000, G, dma_limit=v), BAD_U64)
sweep("IommuDomain.map_dma.cpu", iommu, lambda s, v: s.d.map_dma(0x400000, G, cpu=v), BAD_CPU)
add("IommuDomain.map_dma.nbytes=0", iommu, lambda s: s.d.map_dma(0x400000, 0), E.InvalidArgument)
add("IommuDomain.map_dma.prot=0", iommu, lambda s: s.d.map_dma(0x400000, G, 0), E.InvalidArgument)
add("IommuDomain.map_dma.phys-past-oas", iommu, lambda s: s.d.map_dma(2**52 - 1, 2), E.OutOfRange)
add("IommuDomain.map_dma.phys-wraps", iommu, lambda s: s.d.map_dma(U64, 2), E.OutOfRange)
add("IommuDomain.map_dma.size-wraps", iommu, lambda s: s.d.map_dma(0x10, U64), E.InvalidArgument)
add("IommuDomain.map_dma.limit-too-low", iommu, lambda s: s.d.map_dma(0x400000, 2 * G, dma_limit=0x1FFF),
    E.OutOfMemory)
sweep("IommuDomain.unmap_dma.dma_addr", iommu, lambda s, v: s.d.unmap_dma(v, G), BAD_U64)
sweep("IommuDomain.unmap_dma.nbytes", iommu, lambda s, v: s.d.unmap_dma(s.a, v), BAD_U64)
sweep("IommuDomain.unmap_dma.cpu", iommu, lambda s, v: s.d.unmap_dma(s.a, 3 * G, cpu=v), BAD_CPU2)
add("IommuDomain.unmap_dma.unknown", iommu, lambda s: s.d.unmap_dma(0x9000_0000, G), E.NotFound)
add("IommuDomain.unmap_dma.queued-twice", iommu, lambda s: s.d.unmap_dma(s.b, G), E.NotFound)
add("IommuDomain.unmap_dma.bigger-than-range", iommu, lambda s: s.d.unmap_dma(s.a, 8 * G), E.InvalidArgument)
add("IommuDomain.unmap_dma.nbytes=0", iommu, lambda s: s.d.unmap_dma(s.a, 0), E.InvalidArgument)
add("IommuDomain.unmap_dma.wraps", iommu, lambda s: s.d.unmap_dma(U64, U64), E.InvalidArgument)
add("IommuDomain.iovad.free.queued", iommu, lambda s: s.d.iovad.free(s.b >> 12), E.NotFound)
add("IommuDomain.iovad.free_fast.queued", iommu, lambda s: s.d.iovad.free_fast(s.b >> 12, 1), E.NotFound)
add("IommuDomain.pgtable.map.overlap", iommu, lambda s: s.d.pgtable.map(0x7000_0000, 0, G), E.AlreadyExists)


# ==================================================================== the test

# ====================================================== machine and devices


def dev(name: str = "gpu1") -> Callable[[], S]:
    def make() -> S:
        m = mach()
        d = m.device(name)
        return S(watch=[m, d], m=m, d=d)

    make.__name__ = f"dev_{name}"
    return make


BAD_ADDR: list[tuple[str, Any, type[BaseException]]] = [
    ("str", "1", TypeError),
    ("float", 4096.0, TypeError),
    ("None", None, TypeError),
    ("np.int64", np.int64(4096), TypeError),
    ("-1", -1, E.InvalidArgument),
    ("2**64", 2**64, E.InvalidArgument),
]

for _name in ("gpu1", "gpu0", "legacy0", "direct0"):
    sweep(f"Device.dma_read[{_name}].addr", dev(_name), lambda s, v: s.d.dma_read(v, 16), BAD_ADDR)
    sweep(f"Device.dma_read[{_name}].nbytes", dev(_name), lambda s, v: s.d.dma_read(0x1000, v), BAD_ADDR)
    sweep(f"Device.dma_write[{_name}].addr", dev(_name), lambda s, v: s.d.dma_write(v, b"x"), BAD_ADDR)
    add(f"Device.dma_read[{_name}].nbytes=0", dev(_name), lambda s: s.d.dma_read(0x1000, 0), E.InvalidArgument)
    add(f"Device.dma_read[{_name}].wraps", dev(_name), lambda s: s.d.dma_read(U64, 2), E.InvalidArgument)
    add(f"Device.dma_read[{_name}].nbytes=2**64-from-0", dev(_name), lambda s: s.d.dma_read(0, 2**64),
        E.InvalidArgument)
    add(f"Device.dma_read[{_name}].nbytes=2**63", dev(_name), lambda s: s.d.dma_read(0x1000, 2**63), E.IommuFault)
    add(f"Device.dma_read[{_name}].nbytes=2**64-4096", dev(_name), lambda s: s.d.dma_read(0x1000, 2**64 - G),
        E.IommuFault)
    add(f"Device.dma_write[{_name}].empty", dev(_name), lambda s: s.d.dma_write(0x1000, b""), E.InvalidArgument)
    add(f"Device.dma_write[{_name}].str", dev(_name), lambda s: s.d.dma_write(0x1000, "abc"), TypeError)
    add(f"Device.dma_write[{_name}].int", dev(_name), lambda s: s.d.dma_write(0x1000, 5), TypeError)
    add(f"Device.dma_write[{_name}].strided", dev(_name),
        lambda s: s.d.dma_write(0x1000, np.zeros(8, np.uint8)[::2]), TypeError)
    add(f"Device.dma_write[{_name}].wraps", dev(_name), lambda s: s.d.dma_write(U64, b"ab"), E.InvalidArgument)
add("Device.dma_read[gpu1].unmapped", dev("gpu1"), lambda s: s.d.dma_read(0x1000, 16), E.IommuFault)
for _name in ("gpu1", "gpu0", "legacy0", "direct0", "ext0", "vfio0"):
    add(f"Device.dma_read[{_name}].ends-at-2**64", dev(_name), lambda s: s.d.dma_read(2**64 - 8, 8), E.IommuFault)
    add(f"Device.dma_write[{_name}].ends-at-2**64", dev(_name), lambda s: s.d.dma_write(2**64 - 1, b"x"),
        E.IommuFault)
add("Device.dma_read[legacy0].beyond-mask", dev("legacy0"), lambda s: s.d.dma_read(2**32 - 8, 16), E.IommuFault)
add("Device.dma_read[direct0].reserved", dev("direct0"), lambda s: s.d.dma_read(0xFEE00000, 16), E.IommuFault)
add("Device.dma_read[direct0].private", dev("direct0"), lambda s: s.d.dma_read(61 << 30, 16), E.IommuFault)
add("Device.dma_read[direct0].hole", dev("direct0"), lambda s: s.d.dma_read(0xF0000000, 16), E.IommuFault)
add("Device.dma_read[direct0].runs-into-reserved", dev("direct0"),
    lambda s: s.d.dma_read(0xFEE00000 - 8, 16), E.IommuFault)
add("Device.dma_write[direct0].private", dev("direct0"), lambda s: s.d.dma_write(61 << 30, b"x"), E.IommuFault)
add("Machine.device.unknown", mach_state, lambda s: s.m.device("nope"), E.NoDevice)
add("Machine.device.None", mach_state, lambda s: s.m.device(None), E.NoDevice)
add("Device.bar.missing", dev("gpu1"), lambda s: s.d.bar(7), E.NoDevice)
add("Machine.attach_domain.direct-device", dev("direct0"),
    lambda s: s.m.attach_domain(s.d, IommuDomain()), E.NotSupported)
add("Machine.detach_domain.direct-device", dev("direct0"), lambda s: s.m.detach_domain(s.d), E.NotSupported)
add("Machine.add_memory.overlap", mach_state, lambda s: s.m.add_memory(0x1000, 0x1000), E.AlreadyExists)
add("Machine.add_memory.negative", mach_state, lambda s: s.m.add_memory(-4096, 0x1000), E.InvalidArgument)
add("Machine.add_memory.wraps", mach_state, lambda s: s.m.add_memory(2**64 - 0x1000, 0x2000), E.Overflow)
add("Machine.add_bar.not-pow2", dev("gpu1"), lambda s: s.m.add_bar(s.d, 3, 0x3000), E.InvalidArgument)
add("Machine.add_bar.too-big", dev("gpu1"), lambda s: s.m.add_bar(s.d, 3, 2**40), E.NoSpace)
add("Machine.add_bar.outside-windows", dev("gpu1"), lambda s: s.m.add_bar(s.d, 3, 0x1000, cpu_start=0x1000),
    E.InvalidArgument)
add("Machine.add_swiotlb.not-ram", mach_state, lambda s: s.m.add_swiotlb("x", 0xFEE00000, 0x40000),
    E.InvalidArgument)
add("Machine.pages.alloc.npages=0", mach_state, lambda s: s.m.pages.alloc(0), E.InvalidArgument)
add("Machine.pages.alloc.npages=str", mach_state, lambda s: s.m.pages.alloc("4"), TypeError)
add("Machine.pages.alloc.npages=2**64", mach_state, lambda s: s.m.pages.alloc(2**64), E.OutOfMemory)
add("Machine.pages.alloc.npages=2**40", mach_state, lambda s: s.m.pages.alloc(2**40, "fragmented"), E.OutOfMemory)
add("Machine.pages.alloc.layout=bogus", mach_state, lambda s: s.m.pages.alloc(4, "bogus"), E.InvalidArgument)
add("Machine.pages.alloc.layout=pagemap", mach_state, lambda s: s.m.pages.alloc(4, "pagemap"), E.InvalidArgument)
add("Machine.pages.free.empty", mach_state, lambda s: s.m.pages.free(np.zeros(0, dtype=np.uint64)),
    E.InvalidArgument)
add("Machine.pages.free.unknown", mach_state, lambda s: s.m.pages.free(np.array([5], dtype=np.uint64)), E.NotFound)


# ------------------------------------------------------------ from_spec


def _bad_spec(path: str, value: Any, *, delete: bool = False) -> Callable[[], dict[str, Any]]:
    """The built-in spec with one item changed: ``path`` like
    "devices.0.bdf" (list indices as numbers)."""
    def make() -> dict[str, Any]:
        spec = copy.deepcopy(SPEC)
        *parents, last = path.split(".")
        node: Any = spec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key: Any = int(last) if isinstance(node, list) else last
        if delete:
            del node[key]
        else:
            node[key] = value
        return spec

    return make


_SPEC_CASES: list[tuple[str, Any, type[BaseException]]] = [
    ("spec=None", lambda: None, E.InvalidArgument),
    ("spec=list", lambda: [], E.InvalidArgument),
    ("spec=str", lambda: "machine", E.InvalidArgument),
    ("unknown-key", _bad_spec("bogus", 1), E.InvalidArgument),
    ("cpu=str", _bad_spec("cpu", "amd"), E.InvalidArgument),
    ("cpu=None", _bad_spec("cpu", None), E.InvalidArgument),
    ("cpu.family=str", _bad_spec("cpu.family", "six"), E.InvalidArgument),
    ("memory=int", _bad_spec("memory", 5), TypeError),
    ("memory.0=int", _bad_spec("memory.0", 5), E.InvalidArgument),
    ("memory.0.start-missing", _bad_spec("memory.0.start", None, delete=True), E.InvalidArgument),
    ("memory.0.start=-1", _bad_spec("memory.0.start", -1), E.InvalidArgument),
    ("memory.0.start=2**64", _bad_spec("memory.0.start", 2**64), E.Overflow),
    ("memory.0.start=float", _bad_spec("memory.0.start", 1.5), E.InvalidArgument),
    ("memory.0.start=bool", _bad_spec("memory.0.start", True), TypeError),
    ("memory.0.start=garbage", _bad_spec("memory.0.start", "12Q"), E.InvalidArgument),
    ("memory.0.size=0", _bad_spec("memory.0.size", 0), E.InvalidArgument),
    ("memory.0.size=2**64", _bad_spec("memory.0.size", "16P" + "0" * 0), E.AlreadyExists),
    ("memory.0.size-wraps", _bad_spec("memory.0.start", 2**64 - 0x1000), E.Overflow),
    ("memory.0.kind=bogus", _bad_spec("memory.0.kind", "vram"), E.InvalidArgument),
    ("memory.1-overlaps", _bad_spec("memory.1.start", 0x9E000), E.AlreadyExists),
    ("swiotlb.0.not-in-ram", _bad_spec("swiotlb.0.start", 0xFEE00000), E.InvalidArgument),
    ("swiotlb.0.size-unaligned", _bad_spec("swiotlb.0.size", 0x1000), E.InvalidArgument),
    ("swiotlb.0.start-missing", _bad_spec("swiotlb.0.start", None, delete=True), E.InvalidArgument),
    ("iommus.0.name-missing", _bad_spec("iommus.0.name", None, delete=True), E.InvalidArgument),
    ("iommus.0.aperture_bits=64", _bad_spec("iommus.0.aperture_bits", 64), E.InvalidArgument),
    ("iommus.0.granule=8192", _bad_spec("iommus.0.granule", 8192), E.NotSupported),
    ("iommus.0.ncpus=0", _bad_spec("iommus.0.ncpus", 0), E.InvalidArgument),
    ("iommus.0.fq_timeout=-1", _bad_spec("iommus.0.fq_timeout", -1), E.InvalidArgument),
    ("iommus.0.fq_timeout=str", _bad_spec("iommus.0.fq_timeout", "10ms"), E.InvalidArgument),
    ("iommus.1.duplicate", _bad_spec("iommus.1.name", "iommu0"), E.AlreadyExists),
    ("host_bridges.0.windows.0.size=str", _bad_spec("host_bridges.0.windows.0.size", "big"), E.InvalidArgument),
    ("host_bridges.0.windows.0.cpu-missing", _bad_spec("host_bridges.0.windows.0.cpu", None, delete=True),
     E.InvalidArgument),
    ("host_bridges.0.windows=int", _bad_spec("host_bridges.0.windows", 3), TypeError),
    ("host_bridges.1.duplicate", _bad_spec("host_bridges.1.name", "hb0"), E.AlreadyExists),
    ("host_bridges.0.segment=str", _bad_spec("host_bridges.0.segment", "zero"), E.InvalidArgument),
    ("ports.0.parent-unknown", _bad_spec("ports.0.parent", "nowhere"), E.InvalidArgument),
    ("ports.0.kind-bogus", _bad_spec("ports.0.kind", "bridge"), E.InvalidArgument),
    ("ports.0.bdf=garbage", _bad_spec("ports.0.bdf", "zz"), E.InvalidArgument),
    ("ports.0.bdf=int", _bad_spec("ports.0.bdf", 5), E.InvalidArgument),
    ("devices.0.bdf=garbage", _bad_spec("devices.0.bdf", "0000:03:00"), E.InvalidArgument),
    ("devices.0.bdf=int", _bad_spec("devices.0.bdf", 3), E.InvalidArgument),
    ("devices.0.bdf-no-parent", _bad_spec("devices.0.parent", None, delete=True), E.InvalidArgument),
    ("devices.0.name-missing", _bad_spec("devices.0.name", None, delete=True), E.InvalidArgument),
    ("devices.1.duplicate", _bad_spec("devices.1.name", "gpu0"), E.AlreadyExists),
    ("devices.0.dma_mask=0", _bad_spec("devices.0.dma_mask", 0), E.InvalidArgument),
    ("devices.0.dma_mask=65", _bad_spec("devices.0.dma_mask", 65), E.InvalidArgument),
    ("devices.0.dma_mask=not-low-bits", _bad_spec("devices.0.dma_mask", 0xF0F0F0), E.InvalidArgument),
    ("devices.0.dma_mask=2**64", _bad_spec("devices.0.dma_mask", 2**64), E.InvalidArgument),
    ("devices.0.max_segment_size=0", _bad_spec("devices.0.max_segment_size", 0), E.InvalidArgument),
    ("devices.0.max_segment_size=2**32", _bad_spec("devices.0.max_segment_size", 2**32), E.InvalidArgument),
    ("devices.0.iommu-unknown", _bad_spec("devices.0.iommu", "smmu9"), E.InvalidArgument),
    ("devices.0.swiotlb-unknown", _bad_spec("devices.0.swiotlb", "pool9"), E.InvalidArgument),
    ("devices.0.group-on-two-iommus", _bad_spec("devices.1.iommu", "smmu1"), E.InvalidArgument),
    ("devices.0.dma_ranges=int", _bad_spec("devices.0.dma_ranges", [5]), E.InvalidArgument),
    ("devices.0.dma_ranges-short", _bad_spec("devices.0.dma_ranges", [[0, 0]]), E.InvalidArgument),
    ("devices.0.dma_ranges-and-offset", _bad_spec("devices.0.dma_ranges", [[0, 0, 4096]]), E.InvalidArgument),
    ("devices.0.bars.0.size=3", _bad_spec("devices.0.bars.0.size", 3), E.InvalidArgument),
    ("devices.0.bars.0.size=2**40", _bad_spec("devices.0.bars.0.size", 2**40), E.NoSpace),
    ("devices.0.bars.0.index=9", _bad_spec("devices.0.bars.0.index", 9), E.InvalidArgument),
    ("devices.0.bars.0.at-outside", _bad_spec("devices.0.bars.0.at", 0x1000), E.InvalidArgument),
    ("devices.0.bars.0=str", _bad_spec("devices.0.bars.0", "16M"), E.InvalidArgument),
    ("devices.0.bars.1.same-index", _bad_spec("devices.0.bars.1.index", 0), E.AlreadyExists),
]


def _spec_with_offset_and_ranges() -> dict[str, Any]:
    spec = _bad_spec("devices.0.dma_ranges", [[0, 0, 4096]])()
    spec["devices"][0]["dma_offset"] = 0x1000
    return spec


_SPEC_CASES = [c if c[0] != "devices.0.dma_ranges-and-offset" else (c[0], _spec_with_offset_and_ranges, c[2])
               for c in _SPEC_CASES]
for _label, _mk, _exp in _SPEC_CASES:
    add(f"Machine.from_spec.{_label}", mach_state, lambda s, mk=_mk: Machine.from_spec(mk()), _exp)
add("Machine.from_toml.garbage", mach_state, lambda s: Machine.from_toml("[[memory]\nstart ="), ValueError)
add("Machine.from_toml.None", mach_state, lambda s: Machine.from_toml(None), TypeError)
add("Machine.from_toml.int", mach_state, lambda s: Machine.from_toml(3), TypeError)


# ------------------------------------------------------------ from_host


def host_files(iomem: str | None, *, sysfs: bool = False) -> Callable[[], S]:
    """A temporary /proc/iomem with ``iomem`` as its text (None: no file)
    and, with ``sysfs``, an empty sysfs directory."""
    def make() -> S:
        import tempfile

        d = tempfile.mkdtemp(prefix="pydmabuf-hostile-")
        path = os.path.join(d, "iomem")
        if iomem is not None:
            with open(path, "w") as f:
                f.write(iomem)
        sys_dir = os.path.join(d, "sys")
        if sysfs:
            os.mkdir(sys_dir)
        s = S(watch=[FILES], dir=d, iomem=path, sysfs=sys_dir)

        def rm() -> None:
            import shutil

            shutil.rmtree(d)

        return s.later(rm)

    return make


_IOMEM = "00000000-0009ffff : System RAM\n00100000-3fffffff : System RAM\nc0000000-dfffffff : PCI Bus 0000:00\n"
add("Machine.from_host.iomem-missing", host_files(None), lambda s: Machine.from_host(iomem=s.iomem), E.NotFound)
add("Machine.from_host.iomem-directory", host_files(None), lambda s: Machine.from_host(iomem=s.dir),
    E.DmaBufError, errno.EISDIR)
add("Machine.from_host.iomem-empty", host_files(""), lambda s: Machine.from_host(iomem=s.iomem), E.InvalidArgument)
add("Machine.from_host.iomem-garbage", host_files("hello\nworld\n"), lambda s: Machine.from_host(iomem=s.iomem),
    E.InvalidArgument)
add("Machine.from_host.iomem-hidden", host_files("00000000-00000000 : System RAM\n00000000-00000000 : Reserved\n"),
    lambda s: Machine.from_host(iomem=s.iomem), E.NotPermitted)
add("Machine.from_host.iomem-end-before-start", host_files("00002000-00001000 : System RAM\n"),
    lambda s: Machine.from_host(iomem=s.iomem, sysfs=s.sysfs), E.InvalidArgument)
add("Machine.from_host.iomem-past-2**64", host_files("00001000-1ffffffffffffffff : System RAM\n"),
    lambda s: Machine.from_host(iomem=s.iomem, sysfs=s.sysfs), E.Overflow)
add("Machine.from_host.sysfs-missing", host_files(_IOMEM), lambda s: Machine.from_host(iomem=s.iomem, sysfs=s.sysfs),
    E.NotFound)
add("Machine.from_host.iomem=int", host_files(_IOMEM), lambda s: Machine.from_host(iomem=0), TypeError)
add("Machine.from_host.iomem=None", host_files(_IOMEM), lambda s: Machine.from_host(iomem=None), TypeError)
add("Machine.from_host.sysfs=int", host_files(_IOMEM, sysfs=True),
    lambda s: Machine.from_host(iomem=s.iomem, sysfs=0), TypeError)
add("Machine.from_host.iomem=bytes-garbage", host_files("\x00\xff" * 100),
    lambda s: Machine.from_host(iomem=s.iomem), E.InvalidArgument)


# ============================================================ the DMA API

PFNS = np.array([0x100000, 0x100001, 0x100010], dtype=np.uint64)


def table_for(name: str, *, mapped: bool = False, pfns: np.ndarray = PFNS, direction: Any = BIDI,
              offset: int = 0) -> Callable[[], S]:
    def make() -> S:
        m = mach()
        d = m.device(name)
        t = SgTable.from_pages(pfns, offset=offset)
        s = S(watch=[m, d, t], m=m, d=d, t=t)
        if mapped:
            pydmabuf.dma_map_sgtable(d, t, direction)
            s.later(lambda: pydmabuf.dma_unmap_sgtable(d, t, direction))
        return s

    return make


BAD_DIRECTIONS = [("7", 7, E.InvalidArgument), ("-1", -1, E.InvalidArgument), ("str", "bidi", E.InvalidArgument),
                  ("None", None, E.InvalidArgument), ("NONE", DmaDirection.NONE, E.InvalidArgument),
                  ("float", 0.0, E.InvalidArgument)]
BAD_ATTRS = [("-1", -1, E.InvalidArgument), ("2**11", 1 << 11, E.InvalidArgument), ("2**64", 2**64, E.InvalidArgument),
             ("str", "MMIO", E.InvalidArgument), ("None", None, E.InvalidArgument)]
NOT_A_DEVICE = [("str", "gpu1"), ("None", None), ("int", 5), ("machine", "machine")]

for _name in ("gpu1", "gpu0", "legacy0", "direct0", "ext0"):
    _mk = table_for(_name)
    sweep(f"dma_map_sgtable[{_name}].direction", _mk, lambda s, v: pydmabuf.dma_map_sgtable(s.d, s.t, v),
          BAD_DIRECTIONS)
    sweep(f"dma_map_sgtable[{_name}].attrs", _mk, lambda s, v: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI, v),
          BAD_ATTRS)
    for _label, _v in NOT_A_DEVICE:
        add(f"dma_map_sgtable[{_name}].device={_label}", _mk,
            lambda s, v=_v: pydmabuf.dma_map_sgtable(s.m if v == "machine" else v, s.t, BIDI), TypeError)
    add(f"dma_map_sgtable[{_name}].table=str", _mk, lambda s: pydmabuf.dma_map_sgtable(s.d, "t", BIDI), TypeError)
    add(f"dma_map_sgtable[{_name}].table=None", _mk, lambda s: pydmabuf.dma_map_sgtable(s.d, None, BIDI), TypeError)
    add(f"dma_map_sgtable[{_name}].table=array", _mk,
        lambda s: pydmabuf.dma_map_sgtable(s.d, np.asarray(s.t), BIDI), TypeError)
    add(f"dma_map_sgtable[{_name}].dma-only", _mk,
        lambda s: pydmabuf.dma_map_sgtable(s.d, SgTable.from_ranges([[0x1000, 0x1000]]), BIDI), E.InvalidArgument)
    add(f"dma_map_sgtable[{_name}].empty-table", _mk, lambda s: pydmabuf.dma_map_sgtable(s.d, SgTable(), BIDI),
        E.InvalidArgument)
    _mkm = table_for(_name, mapped=True)
    add(f"dma_map_sgtable[{_name}].twice", _mkm, lambda s: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI), E.Busy)
    add(f"dma_unmap_sgtable[{_name}].not-mapped", _mk, lambda s: pydmabuf.dma_unmap_sgtable(s.d, s.t, BIDI),
        E.LifetimeError)
    add(f"dma_unmap_sgtable[{_name}].wrong-direction", _mkm,
        lambda s: pydmabuf.dma_unmap_sgtable(s.d, s.t, TO_DEV), E.LifetimeError)
    add(f"dma_unmap_sgtable[{_name}].other-device", _mkm,
        lambda s: pydmabuf.dma_unmap_sgtable(s.m.device("nic0"), s.t, BIDI), E.LifetimeError)
    add(f"dma_unmap_sgtable[{_name}].same-name-other-machine", _mkm,
        lambda s: pydmabuf.dma_unmap_sgtable(mach().device(s.d.name), s.t, BIDI), E.LifetimeError)
    for _label, _v in NOT_A_DEVICE:
        add(f"dma_unmap_sgtable[{_name}].device={_label}", _mkm,
            lambda s, v=_v: pydmabuf.dma_unmap_sgtable(s.m if v == "machine" else v, s.t, BIDI), TypeError)
        add(f"dma_sync_sgtable_for_cpu[{_name}].device={_label}", _mkm,
            lambda s, v=_v: pydmabuf.dma_sync_sgtable_for_cpu(s.m if v == "machine" else v, s.t, BIDI), TypeError)
    add(f"dma_unmap_sgtable[{_name}].table=str", _mkm, lambda s: pydmabuf.dma_unmap_sgtable(s.d, "t", BIDI),
        TypeError)
    add(f"dma_unmap_sgtable[{_name}].table=None", _mkm, lambda s: pydmabuf.dma_unmap_sgtable(s.d, None, BIDI),
        TypeError)
    sweep(f"dma_unmap_sgtable[{_name}].direction", _mkm, lambda s, v: pydmabuf.dma_unmap_sgtable(s.d, s.t, v),
          BAD_DIRECTIONS)
    for _sync in ("dma_sync_sgtable_for_cpu", "dma_sync_sgtable_for_device"):
        add(f"{_sync}[{_name}].not-mapped", _mk, lambda s, f=_sync: getattr(pydmabuf, f)(s.d, s.t, BIDI),
            E.LifetimeError)
        add(f"{_sync}[{_name}].other-device", _mkm,
            lambda s, f=_sync: getattr(pydmabuf, f)(s.m.device("nic0"), s.t, BIDI), E.LifetimeError)
        add(f"{_sync}[{_name}].table=str", _mkm, lambda s, f=_sync: getattr(pydmabuf, f)(s.d, "t", BIDI),
            TypeError)
        sweep(f"{_sync}[{_name}].direction", _mkm, lambda s, v, f=_sync: getattr(pydmabuf, f)(s.d, s.t, v),
              BAD_DIRECTIONS)

# Walks that fail part way through: nothing mapped, no IOVA, no bounce slot kept.
add("dma_map_sgtable[legacy0].cannot-bounce", table_for("legacy0", pfns=np.arange(0x100000, 0x100041,
                                                                                  dtype=np.uint64)),
    lambda s: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI), E.IOFailure)
add("dma_map_sgtable[legacy0].cannot-bounce-after-bounces",
    table_for("legacy0", pfns=np.concatenate([np.arange(0x100000, 0x100003, dtype=np.uint64) * 2,
                                              np.arange(0x110000, 0x110041, dtype=np.uint64)])),
    lambda s: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI), E.IOFailure)


def peer_table(client: str, provider: str) -> Callable[[], S]:
    def make() -> S:
        m = mach()
        bar = m.device(provider).bar(0)
        pfns = np.arange(bar.cpu_start >> 12, (bar.cpu_start >> 12) + 4, dtype=np.uint64)
        d = m.device(client)
        t = SgTable.from_pages(pfns)
        return S(watch=[m, d, t], m=m, d=d, t=t, bar=bar)

    return make


add("dma_map_sgtable[gpu1].unreachable-peer", peer_table("gpu1", "gpu0"),
    lambda s: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI), E.RemoteIO)
add("dma_map_sgtable[legacy0].unreachable-peer", peer_table("legacy0", "gpu1"),
    lambda s: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI), E.RemoteIO)

# dma_map_phys / dma_unmap_phys
for _name in ("gpu1", "gpu0", "legacy0", "direct0", "ext0"):
    _mk = dev(_name)
    sweep(f"dma_map_phys[{_name}].phys", _mk, lambda s, v: pydmabuf.dma_map_phys(s.d, v, G, BIDI), BAD_ADDR)
    sweep(f"dma_map_phys[{_name}].nbytes", _mk, lambda s, v: pydmabuf.dma_map_phys(s.d, 0x100000000, v, BIDI),
          BAD_ADDR)
    sweep(f"dma_map_phys[{_name}].direction", _mk, lambda s, v: pydmabuf.dma_map_phys(s.d, 0x100000000, G, v),
          BAD_DIRECTIONS)
    sweep(f"dma_map_phys[{_name}].attrs", _mk, lambda s, v: pydmabuf.dma_map_phys(s.d, 0x100000000, G, BIDI, v),
          BAD_ATTRS)
    for _label, _v in NOT_A_DEVICE:
        add(f"dma_map_phys[{_name}].device={_label}", _mk,
            lambda s, v=_v: pydmabuf.dma_map_phys(s.m if v == "machine" else v, 0x100000000, G, BIDI), TypeError)
        add(f"dma_unmap_phys[{_name}].device={_label}", _mk,
            lambda s, v=_v: pydmabuf.dma_unmap_phys(s.m if v == "machine" else v, 0x100000000, G, BIDI), TypeError)
    add(f"dma_map_phys[{_name}].nbytes=0", _mk, lambda s: pydmabuf.dma_map_phys(s.d, 0x100000000, 0, BIDI),
        E.InvalidArgument)
    add(f"dma_map_phys[{_name}].wraps", _mk, lambda s: pydmabuf.dma_map_phys(s.d, U64, 2, BIDI),
        E.InvalidArgument)
    add(f"dma_map_phys[{_name}].nbytes=2**64-from-0", _mk, lambda s: pydmabuf.dma_map_phys(s.d, 0, 2**64, BIDI),
        E.InvalidArgument)  # ends at 2**64 - 1, but no size_t holds the size
    add(f"dma_unmap_phys[{_name}].never-mapped", _mk, lambda s: pydmabuf.dma_unmap_phys(s.d, 0x1000, G, BIDI),
        E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].addr=str", _mk, lambda s: pydmabuf.dma_unmap_phys(s.d, "0x1000", G, BIDI),
        TypeError)
    add(f"dma_unmap_phys[{_name}].addr=list", _mk, lambda s: pydmabuf.dma_unmap_phys(s.d, [1], G, BIDI), TypeError)


def phys_mapped(name: str, nbytes: int = 2 * G, attrs: int = 0) -> Callable[[], S]:
    def make() -> S:
        m = mach()
        d = m.device(name)
        dma = pydmabuf.dma_map_phys(d, 0x100000000, nbytes, BIDI, attrs)
        s = S(watch=[m, d], m=m, d=d, dma=dma)
        return s.later(lambda: pydmabuf.dma_unmap_phys(d, dma, nbytes, BIDI, attrs))

    return make


for _name in ("gpu1", "gpu0", "legacy0", "direct0", "ext0"):
    add(f"dma_unmap_phys[{_name}].wrong-size", phys_mapped(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, G, BIDI), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].wrong-direction", phys_mapped(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, 2 * G, TO_DEV), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].wrong-attrs-mmio", phys_mapped(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, 2 * G, BIDI, pydmabuf.DmaAttrs.MMIO), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].other-device", phys_mapped(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.m.device("nic0"), s.dma, 2 * G, BIDI), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].off-by-one-addr", phys_mapped(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma + 1, 2 * G, BIDI), E.LifetimeError)
add("dma_map_phys[gpu1].beyond-oas", dev("gpu1"), lambda s: pydmabuf.dma_map_phys(s.d, 2**52, G, BIDI),
    E.OutOfMemory)
add("dma_map_phys[gpu0].beyond-oas", dev("gpu0"), lambda s: pydmabuf.dma_map_phys(s.d, 2**60, G, BIDI),
    E.OutOfMemory)
add("dma_map_phys[legacy0].too-big-to-bounce", dev("legacy0"),
    lambda s: pydmabuf.dma_map_phys(s.d, 0x100000000, 1 << 20, BIDI), E.OutOfMemory)
add("dma_map_phys[legacy0].mmio-beyond-mask", dev("legacy0"),
    lambda s: pydmabuf.dma_map_phys(s.d, 0x100000000, G, BIDI, pydmabuf.DmaAttrs.MMIO), E.OutOfMemory)
add("dma_map_phys[ext0].unaligned-mmio", dev("ext0"),
    lambda s: pydmabuf.dma_map_phys(s.d, 0x100000010, 16, BIDI, pydmabuf.DmaAttrs.MMIO), E.OutOfMemory)
add("dma_map_phys[ext0].too-big-to-bounce-unaligned", dev("ext0"),
    lambda s: pydmabuf.dma_map_phys(s.d, 0x100000010, 1 << 20, BIDI), E.OutOfMemory)


def phys_mapped_twice(name: str, unmapped: int = 0) -> Callable[[], S]:
    """The same range mapped twice (a device without an IOMMU gets the same
    DMA address twice: two entries); ``unmapped`` of them unmapped."""
    def make() -> S:
        m = mach()
        d = m.device(name)
        dmas = [pydmabuf.dma_map_phys(d, 0x100000000, 2 * G, BIDI) for _ in range(2)]
        for dma in dmas[:unmapped]:
            pydmabuf.dma_unmap_phys(d, dma, 2 * G, BIDI)
        s = S(watch=[m, d], m=m, d=d, dma=dmas[-1], dmas=dmas)
        for dma in dmas[unmapped:]:
            s.later(lambda dma=dma: pydmabuf.dma_unmap_phys(d, dma, 2 * G, BIDI))
        return s

    return make


for _name in ("direct0", "legacy0", "gpu1", "ext0"):
    add(f"dma_unmap_phys[{_name}].twice-mapped.wrong-size", phys_mapped_twice(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, G, BIDI), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].twice-mapped.wrong-direction", phys_mapped_twice(_name),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, 2 * G, TO_DEV), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].twice-mapped.once-unmapped.wrong-attrs", phys_mapped_twice(_name, 1),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, 2 * G, BIDI, pydmabuf.DmaAttrs.MMIO), E.LifetimeError)
    add(f"dma_unmap_phys[{_name}].twice-mapped.third-unmap", phys_mapped_twice(_name, 2),
        lambda s: pydmabuf.dma_unmap_phys(s.d, s.dma, 2 * G, BIDI), E.LifetimeError)


def phys_batch_row_gone() -> S:
    """A bounced batch (one mapping per row) whose last row someone unmapped
    by hand: unmapping the batch cannot complete."""
    from pydmabuf.dma import dma_map_phys_many

    m = mach()
    d = m.device("legacy0")
    batch = dma_map_phys_many(d, np.array([[0x100000000, G], [0x100002000, G]], dtype=np.uint64), BIDI)
    assert batch.kind == "singles"
    pydmabuf.dma_unmap_phys(d, int(batch.dma_ranges[1, 0]), G, BIDI)
    s = S(watch=[m, d], m=m, d=d, batch=batch)

    def end() -> None:
        pydmabuf.dma_unmap_phys(d, int(batch.dma_ranges[0, 0]), G, BIDI)
        batch.live = False  # both rows went back by hand: the batch owns nothing
        assert m.swiotlb_pools["swiotlb"].slots_used == 0

    return s.later(end)


add("dma_unmap_phys_many[legacy0].a-row-gone", phys_batch_row_gone,
    lambda s: pydmabuf.dma.dma_unmap_phys_many(s.batch), E.LifetimeError,
    snap=lambda s: (snapshot(s.watch), s.batch.live))


# IovaState: the two-step API


def iova_state(name: str = "gpu1", nbytes: int = 8 * G, link: int = 0) -> Callable[[], S]:
    def make() -> S:
        m = mach()
        d = m.device(name)
        st = IovaState.try_alloc(d, 0, nbytes)
        if link:
            st.link(0x100000000, 0, link, BIDI)
        s = S(watch=[m, d, st], m=m, d=d, st=st)

        def end() -> None:
            if st.live:
                if st.linked_nbytes:
                    st.destroy(st.linked_nbytes, BIDI)
                else:
                    st.free()

        return s.later(end)

    return make


def iova_state_dead() -> S:
    s = iova_state()()
    s.st.free()
    return s


for _label, _v in NOT_A_DEVICE:
    add(f"IovaState.try_alloc.device={_label}", dev("gpu1"),
        lambda s, v=_v: IovaState.try_alloc(s.m if v == "machine" else v, 0, G), TypeError)
add("IovaState().direct", dev("gpu1"), lambda s: IovaState(), TypeError)
add("IovaState.try_alloc.phys=str", dev("gpu1"), lambda s: IovaState.try_alloc(s.d, "0", G), TypeError)
add("IovaState.try_alloc.nbytes=float", dev("gpu1"), lambda s: IovaState.try_alloc(s.d, 0, 4096.0), TypeError)
_st = iova_state()
_stl = iova_state(link=2 * G)
sweep("IovaState.link.phys", _st, lambda s, v: s.st.link(v, 0, G, BIDI), BAD_ADDR)
sweep("IovaState.link.offset", _st, lambda s, v: s.st.link(0x100000000, v, G, BIDI), BAD_ADDR)
sweep("IovaState.link.nbytes", _st, lambda s, v: s.st.link(0x100000000, 0, v, BIDI), BAD_ADDR)
sweep("IovaState.link.direction", _st, lambda s, v: s.st.link(0x100000000, 0, G, v), BAD_DIRECTIONS)
sweep("IovaState.link.attrs", _st, lambda s, v: s.st.link(0x100000000, 0, G, BIDI, v), BAD_ATTRS)
add("IovaState.link.nbytes=0", _st, lambda s: s.st.link(0x100000000, 0, 0, BIDI), E.InvalidArgument)
add("IovaState.link.nbytes=2**64-from-0", _st, lambda s: s.st.link(0, 0, 2**64, BIDI), E.InvalidArgument)
add("IovaState.link.past-reservation", _st, lambda s: s.st.link(0x100000000, 4 * G, 8 * G, BIDI),
    E.InvalidArgument)
add("IovaState.link.offset-past-end", _st, lambda s: s.st.link(0x100000000, 8 * G, G, BIDI), E.InvalidArgument)
add("IovaState.link.already-linked", _stl, lambda s: s.st.link(0x100005000, G, G, BIDI), E.AlreadyExists)
add("IovaState.link.unaligned-not-first", _st, lambda s: s.st.link(0x100000010, G, G, BIDI), E.IOFailure)
add("IovaState.link.phys-beyond-oas", _st, lambda s: s.st.link(2**52, 0, G, BIDI), E.OutOfRange)
add("IovaState.link.after-free", iova_state_dead, lambda s: s.st.link(0x100000000, 0, G, BIDI), E.LifetimeError)
add("IovaState.link.no-iova", iova_state("direct0"), lambda s: s.st.link(0x100000000, 0, G, BIDI), E.NotSupported)
for _label, _buf, _exp in bad_pair_buffers():
    add(f"IovaState.link_ranges.ranges={_label}", _st, lambda s, b=_buf: s.st.link_ranges(b, BIDI), _exp)
add("IovaState.link_ranges.int64-negative", _st,
    lambda s: s.st.link_ranges(np.array([[-4096, 4096]], dtype=np.int64), BIDI), ValueError)
add("IovaState.link_ranges.float-rows", _st,
    lambda s: s.st.link_ranges(np.array([[4096.5, 4096.0]]), BIDI), ValueError)
add("IovaState.link_ranges.2x3-rows", _st,
    lambda s: s.st.link_ranges(np.full((2, 3), 4096, dtype=np.uint64), BIDI), ValueError)
add("IovaState.link_ranges.second-overlaps", _stl,
    lambda s: s.st.link_ranges(np.array([[0x200000000, G], [0x300000000, G]], dtype=np.uint64), BIDI, offset=G),
    E.AlreadyExists)
add("IovaState.link_ranges.second-past-end", _st,
    lambda s: s.st.link_ranges(np.array([[0x200000000, 4 * G], [0x300000000, 8 * G]], dtype=np.uint64), BIDI),
    E.InvalidArgument)
add("IovaState.link_ranges.second-beyond-oas", _st,
    lambda s: s.st.link_ranges(np.array([[0x200000000, G], [2**52, G]], dtype=np.uint64), BIDI), E.OutOfRange)
add("IovaState.link_ranges.offset=str", _st,
    lambda s: s.st.link_ranges(np.array([[0x200000000, G]], dtype=np.uint64), BIDI, offset="0"), TypeError)
add("IovaState.link_ranges.offset=-1", _st,
    lambda s: s.st.link_ranges(np.array([[0x200000000, G]], dtype=np.uint64), BIDI, offset=-1), E.InvalidArgument)
add("IovaState.link_ranges[ext0].unaligned-mmio", iova_state("ext0"),
    lambda s: s.st.link_ranges(np.array([[0x200000010, 16]], dtype=np.uint64), BIDI, pydmabuf.DmaAttrs.MMIO),
    E.NotPermitted)
add("IovaState.link_ranges[ext0].unaligned-bounce-not-first", iova_state("ext0", link=2 * G),
    lambda s: s.st.link_ranges(np.array([[0x200000010, 16], [0x300000000, G]], dtype=np.uint64), BIDI, offset=G),
    E.IOFailure)
sweep("IovaState.sync.offset", _stl, lambda s, v: s.st.sync(v, G), BAD_ADDR)
sweep("IovaState.sync.nbytes", _stl, lambda s, v: s.st.sync(0, v), BAD_ADDR, {"None": None})
add("IovaState.sync.past-end", _stl, lambda s: s.st.sync(4 * G, 8 * G), E.InvalidArgument)
add("IovaState.sync.after-free", iova_state_dead, lambda s: s.st.sync(), E.LifetimeError)
sweep("IovaState.unlink.offset", _stl, lambda s, v: s.st.unlink(v, G, BIDI), BAD_ADDR)
sweep("IovaState.unlink.nbytes", _stl, lambda s, v: s.st.unlink(0, v, BIDI), BAD_ADDR)
sweep("IovaState.unlink.direction", _stl, lambda s, v: s.st.unlink(0, G, v), BAD_DIRECTIONS)
add("IovaState.unlink.not-linked", _stl, lambda s: s.st.unlink(4 * G, G, BIDI), E.LifetimeError)
add("IovaState.unlink.partly-linked", _stl, lambda s: s.st.unlink(G, 2 * G, BIDI), E.LifetimeError)
add("IovaState.unlink.after-free", iova_state_dead, lambda s: s.st.unlink(0, G, BIDI), E.LifetimeError)
for _label, _v, _exp in [("str", "8192", TypeError), ("float", 8192.0, TypeError), ("None", None, TypeError),
                         ("-1", -1, E.InvalidArgument), ("past-end", 9 * G, E.InvalidArgument),
                         ("2**64", 2**64, E.InvalidArgument), ("wrong", G, E.LifetimeError),
                         ("more-than-linked", 3 * G, E.LifetimeError)]:
    add(f"IovaState.destroy.mapped_nbytes={_label}", _stl, lambda s, v=_v: s.st.destroy(v, BIDI), _exp)
sweep("IovaState.destroy.direction", _stl, lambda s, v: s.st.destroy(2 * G, v), BAD_DIRECTIONS)
add("IovaState.destroy.zero-with-links", _stl, lambda s: s.st.destroy(0, BIDI), E.LifetimeError)
add("IovaState.destroy.after-free", iova_state_dead, lambda s: s.st.destroy(0, BIDI), E.LifetimeError)
add("IovaState.free.with-links", _stl, lambda s: s.st.free(), E.LifetimeError)
add("IovaState.free.twice", iova_state_dead, lambda s: s.st.free(), E.LifetimeError)
add("IovaState.free.no-iova", iova_state("direct0"), lambda s: s.st.free(), E.NotSupported)


def iova_bounced(end: str, direction: Any = BIDI) -> Callable[[], S]:
    """An untrusted device's state with one unaligned RAM range linked (its
    head and tail bounce through swiotlb), ended by ``end`` ("destroy",
    "unlink" then free, "with", or "with-split": the context manager's exit
    with two linked parts); the end must give every bounce slot back."""
    def make() -> S:
        m = mach()
        d = m.device("ext0")
        st = IovaState.try_alloc(d, 0x100000100, 2 * G)
        st.link(0x100000100, 0, 2 * G, direction)
        assert st.uses_swiotlb and m.swiotlb_pools["swiotlb"].slots_used
        s = S(watch=[m, d, st], m=m, d=d, st=st)

        def finish() -> None:
            if end == "destroy":
                st.destroy(2 * G, direction)
            elif end == "unlink":
                st.unlink(0, 2 * G, direction)
                st.free()
            elif end == "with-split":  # the aligned middle first: two linked parts left
                st.unlink(0xF00, G, direction)
                st.__exit__(None, None, None)
            else:
                st.__exit__(None, None, None)
            assert not st.live and all(p.slots_used == 0 and p.mappings == 0 for p in m.swiotlb_pools.values())

        return s.later(finish)

    return make


for _end in ("destroy", "unlink", "with", "with-split"):
    add(f"IovaState.unlink[ext0,{_end}].cuts-a-bounced-piece", iova_bounced(_end),
        lambda s: s.st.unlink(0, 0x80, BIDI), E.LifetimeError)
    add(f"IovaState.unlink[ext0,{_end}].cuts-the-bounced-tail", iova_bounced(_end, DmaDirection.FROM_DEVICE),
        lambda s: s.st.unlink(G, G - 0x80, DmaDirection.FROM_DEVICE), E.LifetimeError)
    add(f"IovaState.free[ext0,{_end}].with-bounced-links", iova_bounced(_end), lambda s: s.st.free(),
        E.LifetimeError)


# dma_buf_phys_vec_to_sgt / dma_buf_free_sgt


def p2p(client: str, provider: str = "gpu0", bar: int = 1) -> Callable[[], S]:
    def make() -> S:
        m = mach()
        c = m.device(client)
        prov = m.device(provider).p2p_provider(bar)
        b = m.device(provider).bar(bar)
        rows = np.array([[b.cpu_start, 2 * G], [b.cpu_start + 8 * G, G]], dtype=np.uint64)
        return S(watch=[m, c], m=m, c=c, prov=prov, rows=rows, bar=b)

    return make


for _route, _client in (("bus", "nic0"), ("host-bridge", "vfio0")):
    _mk = p2p(_client)
    for _label, _v in NOT_A_DEVICE:
        add(f"dma_buf_phys_vec_to_sgt[{_route}].device={_label}", _mk,
            lambda s, v=_v: pydmabuf.dma_buf_phys_vec_to_sgt(s.m if v == "machine" else v, s.prov, s.rows),
            TypeError)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].provider=None", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, None, s.rows), E.InvalidArgument)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].provider=str", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, "gpu0", s.rows), TypeError)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].provider=bar", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.bar, s.rows), TypeError)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].provider-other-machine", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, mach().device("gpu0").p2p_provider(1), s.rows),
        E.InvalidArgument)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].device-other-machine", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(mach().device(_client), s.prov, s.rows), E.InvalidArgument)
    for _label, _buf, _exp in bad_pair_buffers():
        add(f"dma_buf_phys_vec_to_sgt[{_route}].ranges={_label}", _mk,
            lambda s, b=_buf: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, b), _exp)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].ranges=int64-negative", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, np.array([[-4096, 4096]], dtype=np.int64)),
        ValueError)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].ranges=float", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, np.array([[s.bar.cpu_start + 0.5, 4096.0]])),
        ValueError)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].ranges=2x3", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, np.full((2, 3), 4096, dtype=np.uint64)), ValueError)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].ranges=empty", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, np.zeros((0, 2), dtype=np.uint64)),
        E.InvalidArgument)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].zero-length", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, [[s.bar.cpu_start, 0]]), E.InvalidArgument)
    add(f"dma_buf_phys_vec_to_sgt[{_route}].total-overflows", _mk,
        lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, [[s.bar.cpu_start, 2**63], [0, 2**63]]),
        E.Overflow)
    sweep(f"dma_buf_phys_vec_to_sgt[{_route}].direction", _mk,
          lambda s, v: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, s.rows, direction=v), BAD_DIRECTIONS)
    for _label, _v, _exp in [("str", "12288", TypeError), ("float", 12288.0, TypeError),
                             ("0", 0, E.InvalidArgument), ("-1", -1, E.InvalidArgument)]:
        add(f"dma_buf_phys_vec_to_sgt[{_route}].nbytes={_label}", _mk,
            lambda s, v=_v: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, s.rows, v), _exp)
add("dma_buf_phys_vec_to_sgt.unreachable", p2p("gpu1"),
    lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, s.rows), E.InvalidArgument)
add("dma_buf_phys_vec_to_sgt[host-bridge].second-beyond-oas", p2p("vfio0"),
    lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, [[s.bar.cpu_start, G], [2**52, G]]), E.OutOfRange)
add("dma_buf_phys_vec_to_sgt[host-bridge].nbytes-short", p2p("vfio0"),
    lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, s.rows, G), E.InvalidArgument)


def phys_sgt(client: str) -> Callable[[], S]:
    def make() -> S:
        s = p2p(client)()
        s.t = pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, s.rows)
        s.watch = s.watch + (s.t,)
        return s.later(lambda: pydmabuf.dma_buf_free_sgt(s.t))

    return make


for _route, _client in (("bus", "nic0"), ("host-bridge", "vfio0")):
    add(f"dma_buf_free_sgt[{_route}].wrong-direction", phys_sgt(_client),
        lambda s: pydmabuf.dma_buf_free_sgt(s.t, TO_DEV), E.LifetimeError)
    add(f"dma_buf_free_sgt[{_route}].bad-direction", phys_sgt(_client),
        lambda s: pydmabuf.dma_buf_free_sgt(s.t, 9), E.InvalidArgument)
    add(f"dma_map_sgtable[{_route}].phys-vec-table", phys_sgt(_client),
        lambda s: pydmabuf.dma_map_sgtable(s.c, s.t, BIDI), E.InvalidArgument)
add("dma_buf_free_sgt.table=str", sg, lambda s: pydmabuf.dma_buf_free_sgt("t"), TypeError)
add("dma_buf_free_sgt.table=None", sg, lambda s: pydmabuf.dma_buf_free_sgt(None), TypeError)
add("dma_buf_free_sgt.plain-table", sg, lambda s: pydmabuf.dma_buf_free_sgt(s.t), E.LifetimeError)
add("dma_buf_free_sgt.dma-mapped-table", table_for("gpu1", mapped=True),
    lambda s: pydmabuf.dma_buf_free_sgt(s.t), E.LifetimeError)


def phys_sgt_twice(client: str) -> Callable[[], S]:
    """Two tables over the same BAR ranges: on a device without an IOMMU
    both hold the same DMA addresses, each its own mapping."""
    def make() -> S:
        s = phys_sgt(client)()
        s.t2 = pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, s.rows)
        s.watch = s.watch + (s.t2,)
        return s.later(lambda: pydmabuf.dma_buf_free_sgt(s.t2))  # runs first; then t's own free

    return make


def phys_sgt_range_gone(client: str) -> Callable[[], S]:
    """A table one of whose ranges (the last) someone else unmapped by hand:
    its free cannot complete."""
    def make() -> S:
        s = phys_sgt(client)()
        (dma, n), p = s.t.mapping.singles[-1], int(s.rows[-1, 0])
        pydmabuf.dma_unmap_phys(s.c, dma, n, BIDI, pydmabuf.DmaAttrs.MMIO)
        # Undone before the table's own free: map the range again.
        return s.later(lambda: pydmabuf.dma_map_phys(s.c, p, n, BIDI, pydmabuf.DmaAttrs.MMIO))

    return make


for _route, _client in (("host-bridge-direct", "direct0"), ("host-bridge", "vfio0"), ("bus", "nic0")):
    add(f"dma_buf_free_sgt[{_route}].twin-table-wrong-direction", phys_sgt_twice(_client),
        lambda s: pydmabuf.dma_buf_free_sgt(s.t, TO_DEV), E.LifetimeError)
add("dma_buf_free_sgt[host-bridge-direct].wrong-direction", phys_sgt("direct0"),
    lambda s: pydmabuf.dma_buf_free_sgt(s.t, TO_DEV), E.LifetimeError)
add("dma_buf_free_sgt[host-bridge-direct].a-range-gone", phys_sgt_range_gone("direct0"),
    lambda s: pydmabuf.dma_buf_free_sgt(s.t), E.LifetimeError)


# =================================================================== dma-buf


class Plain(Exporter):
    """A static exporter of a few RAM pages; its failures are switches."""

    name = "plain"

    def __init__(self, machine: Machine, *, refuse_attach: bool = False, map_result: str = "table",
                 private: bool = False) -> None:
        self.machine = machine
        self.refuse_attach = refuse_attach
        self.map_result = map_result
        base = (61 << 30) >> 12 if private else 0x110000
        self.pfns = np.arange(base, base + 4, dtype=np.uint64)
        self.live = 0
        self.released = 0

    def attach(self, a: Any) -> None:
        if self.refuse_attach:
            raise E.Busy("plain: this device cannot use the storage")

    def map_dma_buf(self, a: Any, d: DmaDirection) -> Any:
        if self.map_result == "none":
            return None
        if self.map_result == "garbage":
            return "not a table"
        if self.map_result == "raise":
            raise E.OutOfMemory("plain: no memory for the table")
        t = SgTable.from_pages(self.pfns)
        pydmabuf.dma_map_sgtable(a.device, t, d)
        self.live += 1
        return t

    def unmap_dma_buf(self, a: Any, t: SgTable, d: DmaDirection) -> None:
        pydmabuf.dma_unmap_sgtable(a.device, t, d)
        self.live -= 1

    def release(self, buf: Any) -> None:
        self.released += 1


class PlainDyn(Plain):
    """The same, dynamic (pin/unpin)."""

    name = "plain-dynamic"
    pins = 0

    def pin(self, a: Any) -> None:
        self.pins += 1

    def unpin(self, a: Any) -> None:
        self.pins -= 1

    def get_phys_vec(self, a: Any) -> PhysVec:
        return PhysVec(np.array([[int(self.pfns[0]) << 12, len(self.pfns) * G]], dtype=np.uint64), None)


class NoRelease(Exporter):
    def map_dma_buf(self, a: Any, d: Any) -> Any: ...
    def unmap_dma_buf(self, a: Any, t: Any, d: Any) -> None: ...


class PinOnly(Plain):
    def pin(self, a: Any) -> None: ...


class Dyn(ImporterOps):
    def invalidate_mappings(self, a: Any) -> None:
        pass


class PhysImporter(Dyn):
    import_namespaces = frozenset({pydmabuf.PHYS_NAMESPACE})
    allow_peer2peer = True


def buf(exporter: str = "heap", attach: str | None = None, *, device: str = "gpu1", mapped: int = 0,
        pinned: bool = False, locked: bool = False, released: bool = False, revoked: bool = False,
        fence: bool = False, detached: bool = False, cpu_map: bool = False,
        second: bool = False) -> Callable[[], S]:
    """A dma-buf (system heap, movable heap, or Plain exporters) and
    optionally one attachment in the state asked for."""
    def make() -> S:
        m = mach()
        base, _, opt = exporter.partition("-")
        if base in ("heap", "movable"):
            b = SystemHeap(m).allocate(16 * G, layout="fragmented", movable=base == "movable", name="victim")
        else:
            cls = PlainDyn if base == "plaindyn" else Plain
            e = cls(m, private=opt == "private", refuse_attach=opt == "refuse",
                    map_result=opt if opt in ("none", "garbage", "raise") else "table")
            b = export(e, 4 * G, name="victim")
        s = S(watch=[b, FILES], m=m, b=b, a=None, tables=[], fence=None)
        a = None
        if attach is not None:
            ops = {"static": None, "dynamic": Dyn(), "phys": PhysImporter()}[attach]
            a = b.dynamic_attach(m.device(device), ops)
            s.a = a
            s.watch = s.watch + (a,)
            with b.resv:
                for _ in range(mapped):
                    s.tables.append(a.map(BIDI))
                if pinned:
                    a.pin()
        if second:
            s.a2 = b.attach(m.device("nic0"))
            s.watch = s.watch + (s.a2,)
        if cpu_map:
            s.cmap = b.mmap()
            s.watch = s.watch + (s.cmap,)
        if fence:
            f = Fence(pydmabuf.fence_context_alloc(), 1)
            with b.resv:
                b.resv.reserve_fences(1)
                b.resv.add_fence(f, Usage.KERNEL)
            s.fence = f
            s.later(lambda: f.is_signaled() or f.signal())

        def end() -> None:
            if not b.resv.held_by_current_thread():
                b.resv.lock()
            try:
                for t in s.tables:
                    a.unmap(t, BIDI)
                if pinned:
                    a.unpin()
            finally:
                b.resv.unlock()
            if revoked:
                b.unrevoke()
            if second:
                b.detach(s.a2)
            if a is not None and not a.detached:
                b.detach(a)
            if cpu_map:
                s.cmap.close()  # its reference to the buffer goes with it
            if not b.released:
                b.put()

        s.cleanups.insert(0, end)
        if revoked:
            if s.tables:
                raise AssertionError("revoke waits for unmaps")
            b.revoke()
        if detached:
            b.detach(a)
        if released:
            b.put()
        if locked:
            b.resv.lock()
        return s

    return make


for _label, _v, _exp in [("str", "exp", TypeError), ("None", None, TypeError), ("class", Plain, TypeError)]:
    add(f"export.exporter={_label}", mach_state, lambda s, v=_v: export(v, G), _exp)
for _label, _v, _exp in [("0", 0, E.InvalidArgument), ("-1", -1, E.InvalidArgument), ("str", "4096", TypeError),
                         ("float", 4096.0, TypeError), ("None", None, TypeError)]:
    add(f"export.nbytes={_label}", mach_state, lambda s, v=_v: export(Plain(s.m), v), _exp)
add("export.missing-release", mach_state, lambda s: export(NoRelease(), G), E.InvalidArgument)
add("export.pin-without-unpin", mach_state, lambda s: export(PinOnly(s.m), G), E.InvalidArgument)
add("export.resv=str", mach_state, lambda s: export(Plain(s.m), G, resv="resv"), TypeError)
add("export.resv=WwMutex", mach_state, lambda s: export(Plain(s.m), G, resv=WwMutex(pydmabuf.reservation_ww_class)),
    TypeError)
_BAD_NAMES = [("int", 5, TypeError), ("bytes", b"name", TypeError), ("32-chars", "x" * 32, E.InvalidArgument),
              ("16-two-byte-chars", "\u00e9" * 16, E.InvalidArgument), ("surrogate", "\ud800", ValueError)]
for _label, _v, _exp in _BAD_NAMES:
    add(f"export.name={_label}", mach_state, lambda s, v=_v: export(Plain(s.m), G, name=v), _exp)
    add(f"DmaBuf.set_name={_label}", buf(), lambda s, v=_v: s.b.set_name(v), _exp)
    add(f"SystemHeap.allocate.name={_label}", mach_state,
        lambda s, v=_v: SystemHeap(s.m).allocate(8 * G, name=v), _exp)
add("DmaBuf().direct", mach_state, lambda s: pydmabuf.DmaBuf(), TypeError)
add("Attachment().direct", mach_state, lambda s: pydmabuf.Attachment(), TypeError)
add("DmaBuf.get.released", buf(released=True), lambda s: s.b.get(), E.LifetimeError)
add("DmaBuf.put.released", buf(released=True), lambda s: s.b.put(), E.LifetimeError)
add("DmaBuf.fd.released", buf(released=True), lambda s: s.b.fd(), E.LifetimeError)
add("DmaBuf.attach.released", buf(released=True), lambda s: s.b.attach(s.m.device("gpu1")), E.LifetimeError)
add("DmaBuf.mmap.released", buf(released=True), lambda s: s.b.mmap(), E.LifetimeError)
add("DmaBuf.move.released", buf("movable", released=True), lambda s: s.b.move(), E.LifetimeError)
add("DmaBuf.put.with-attachment", buf(attach="static"), lambda s: s.b.put(), E.LifetimeError)
add("DmaBuf.put.with-mapping", buf(attach="static", mapped=1), lambda s: s.b.put(), E.LifetimeError)


def fds() -> S:
    s = buf()()
    s.fd = s.b.get().fd()
    s.other = files.install(object())
    s.closed = files.install(object())
    files.close(s.closed)
    s.later(lambda: pydmabuf.close(s.fd))
    return s.later(lambda: files.close(s.other))


for _label, _v, _exp in [("str", "3", TypeError), ("float", 3.0, TypeError), ("bool", True, TypeError),
                         ("None", None, TypeError), ("-1", -1, E.BadHandle), ("2**64", 2**64, E.BadHandle),
                         ("list", [3], TypeError)]:
    add(f"dma_buf_get.fd={_label}", fds, lambda s, v=_v: pydmabuf.dma_buf_get(v), _exp)
    add(f"close.fd={_label}", fds, lambda s, v=_v: pydmabuf.close(v), _exp)
add("dma_buf_get.closed", fds, lambda s: pydmabuf.dma_buf_get(s.closed), E.BadHandle)
add("dma_buf_get.not-a-dma-buf", fds, lambda s: pydmabuf.dma_buf_get(s.other), E.InvalidArgument)
add("close.closed", fds, lambda s: pydmabuf.close(s.closed), E.BadHandle)

for _label, _v in [("str", "gpu1"), ("None", None), ("int", 3)]:
    add(f"DmaBuf.attach.device={_label}", buf(), lambda s, v=_v: s.b.attach(v), E.InvalidArgument)
add("DmaBuf.attach.device=machine", buf(), lambda s: s.b.attach(s.m), E.InvalidArgument)
add("DmaBuf.attach.device-of-other-machine", buf(), lambda s: s.b.attach(mach().device("gpu1")), E.InvalidArgument)
add("DmaBuf.attach.resv-held", buf(locked=True), lambda s: s.b.attach(s.m.device("gpu1")), E.LockingError)
add("DmaBuf.attach.exporter-refuses", buf("plain-refuse"), lambda s: s.b.attach(s.m.device("gpu1")), E.Busy)
add("DmaBuf.dynamic_attach.ops=str", buf(), lambda s: s.b.dynamic_attach(s.m.device("gpu1"), "ops"), TypeError)
add("DmaBuf.dynamic_attach.ops=class", buf(), lambda s: s.b.dynamic_attach(s.m.device("gpu1"), Dyn), TypeError)
add("DmaBuf.detach.str", buf(attach="static"), lambda s: s.b.detach("a"), E.LifetimeError)
add("DmaBuf.detach.None", buf(attach="static"), lambda s: s.b.detach(None), E.LifetimeError)
def two_bufs() -> S:
    """A buffer with a static attachment, and a second buffer."""
    s = buf(attach="static")()
    s2 = buf()()
    s.b2 = s2.b
    s.watch = s.watch + (s2.b,)
    return s.later(s2.cleanup)


add("DmaBuf.detach.foreign", two_bufs, lambda s: s.b2.detach(s.a), E.LifetimeError)
add("DmaBuf.detach.twice", buf(attach="static", detached=True), lambda s: s.b.detach(s.a), E.LifetimeError)
add("DmaBuf.detach.mapped", buf(attach="static", mapped=1), lambda s: s.b.detach(s.a), E.LifetimeError)
add("DmaBuf.detach.pinned", buf("movable", attach="dynamic", pinned=True), lambda s: s.b.detach(s.a),
    E.LifetimeError)
add("DmaBuf.detach.resv-held", buf(attach="static", locked=True), lambda s: s.b.detach(s.a), E.LockingError)

for _kind in ("static", "dynamic"):
    _mk = buf(attach=_kind, locked=True)
    sweep(f"Attachment[{_kind}].map.direction", _mk, lambda s, v: s.a.map(v), BAD_DIRECTIONS)
    add(f"Attachment[{_kind}].map.no-resv", buf(attach=_kind), lambda s: s.a.map(BIDI), E.LockingError)
    add(f"Attachment[{_kind}].map.resv-held-by-other-thread", buf(attach=_kind, locked=True),
        lambda s: in_thread(lambda: s.a.map(BIDI)), E.LockingError)
    add(f"Attachment[{_kind}].map_unlocked.resv-held", _mk, lambda s: s.a.map_unlocked(BIDI), E.LockingError)
    add(f"Attachment[{_kind}].map.detached", buf(attach=_kind, detached=True, locked=True),
        lambda s: s.a.map(BIDI), E.LifetimeError)
    add(f"Attachment[{_kind}].map.revoked", buf(attach=_kind, revoked=True, locked=True),
        lambda s: s.a.map(BIDI), E.Revoked)
    _mkm = buf(attach=_kind, mapped=1, locked=True)
    add(f"Attachment[{_kind}].unmap.str", _mkm, lambda s: s.a.unmap("t"), E.LifetimeError)
    add(f"Attachment[{_kind}].unmap.None", _mkm, lambda s: s.a.unmap(None), E.LifetimeError)
    add(f"Attachment[{_kind}].unmap.plain-table", _mkm, lambda s: s.a.unmap(SgTable.from_pages([1])),
        E.LifetimeError)
    add(f"Attachment[{_kind}].unmap.wrong-direction", _mkm, lambda s: s.a.unmap(s.tables[0], TO_DEV),
        E.LifetimeError)
    sweep(f"Attachment[{_kind}].unmap.direction", _mkm, lambda s, v: s.a.unmap(s.tables[0], v), BAD_DIRECTIONS)
    add(f"Attachment[{_kind}].unmap.no-resv", buf(attach=_kind, mapped=1), lambda s: s.a.unmap(s.tables[0]),
        E.LockingError)
    add(f"Attachment[{_kind}].unmap_unlocked.resv-held", _mkm, lambda s: s.a.unmap_unlocked(s.tables[0]),
        E.LockingError)
    add(f"Attachment[{_kind}].unmap.from-other-thread", _mkm, lambda s: in_thread(lambda: s.a.unmap(s.tables[0])),
        E.LockingError)
    add(f"Attachment[{_kind}].unmap.other-attachment", buf(attach=_kind, mapped=1, locked=True, second=True),
        lambda s: s.a2.unmap(s.tables[0]), E.LifetimeError)
    add(f"Attachment[{_kind}].track_dma.bad", _mkm, lambda s: s.a.track_dma([[1, 2, 3]]), ValueError)
    for _label, _rows, _exp in bad_pair_buffers():
        if _label != "None":  # None: the table's own ranges
            add(f"Attachment[{_kind}].track_dma.ranges={_label}", _mkm, lambda s, r=_rows: s.a.track_dma(r), _exp)
add("Attachment[static].pin", buf(attach="static", locked=True), lambda s: s.a.pin(), E.LifetimeError)
add("Attachment[dynamic].pin.no-resv", buf("movable", attach="dynamic"), lambda s: s.a.pin(), E.LockingError)
add("Attachment[dynamic].pin.detached", buf("movable", attach="dynamic", detached=True, locked=True),
    lambda s: s.a.pin(), E.LifetimeError)
add("Attachment[dynamic].unpin.not-pinned", buf("movable", attach="dynamic", locked=True), lambda s: s.a.unpin(),
    E.LifetimeError)
add("Attachment[dynamic].unpin.no-resv", buf("movable", attach="dynamic", pinned=True), lambda s: s.a.unpin(),
    E.LockingError)
# A static attachment's pins are its live mappings' (dma_buf_pin/unpin are
# for dynamic importers): refused, and the map's pin is not consumed.
add("Attachment[static].unpin.map-pin", buf("movable", attach="static", mapped=1, locked=True),
    lambda s: s.a.unpin(), E.LifetimeError)
add("Attachment[static].unpin.dynamic-exporter-map-pin", buf("plaindyn", attach="static", mapped=1, locked=True),
    lambda s: s.a.unpin(), E.LifetimeError)
add("Attachment[static].unpin.not-mapped", buf("plaindyn", attach="static", locked=True), lambda s: s.a.unpin(),
    E.LifetimeError)
add("Attachment[static].pin.dynamic-exporter", buf("plaindyn", attach="static", mapped=1, locked=True),
    lambda s: s.a.pin(), E.LifetimeError)


def _in_report_mode(fn: Callable[[], Any]) -> Any:
    """``fn()`` with the checker recording instead of raising (the record
    is dropped afterwards)."""
    try:
        with checks.report_mode():
            return fn()
    finally:
        checks.clear()


add("Attachment[static].pin.report-mode", buf("plaindyn", attach="static", mapped=1, locked=True),
    lambda s: _in_report_mode(s.a.pin), E.InvalidArgument)
for _how in ("none", "garbage", "raise"):
    _err = {"none": E.OutOfMemory, "garbage": TypeError, "raise": E.OutOfMemory}[_how]
    add(f"Attachment[static].map.exporter-{_how}", buf(f"plain-{_how}", attach="static", locked=True),
        lambda s: s.a.map(BIDI), _err)
    add(f"Attachment[static].map.dynamic-exporter-{_how}", buf(f"plaindyn-{_how}", attach="static", locked=True),
        lambda s: s.a.map(BIDI), _err)
    add(f"Attachment[dynamic].map.exporter-{_how}", buf(f"plaindyn-{_how}", attach="dynamic", locked=True),
        lambda s: s.a.map(BIDI), _err)


def interrupted_map(kind: str) -> Callable[[], S]:
    """A static importer's map waits (interruptibly) for the KERNEL fence:
    a pending signal interrupts it after the exporter mapped."""
    def make() -> S:
        s = buf(kind, attach="static", fence=True, locked=True)()
        pydmabuf.signal_thread(__import__("threading").get_ident())
        return s.later(pydmabuf.flush_signals)

    return make


add("Attachment[static].map.interrupted-by-signal", interrupted_map("plaindyn"), lambda s: s.a.map(BIDI),
    E.Interrupted)
add("Attachment[static].map.interrupted-heap", interrupted_map("heap"), lambda s: s.a.map(BIDI), E.Interrupted)
add("Attachment[static].phys_vec", buf(attach="static", locked=True), lambda s: s.a.phys_vec(), E.NotPermitted)
add("Attachment[dynamic].phys_vec.no-namespace", buf(attach="dynamic", locked=True), lambda s: s.a.phys_vec(),
    E.NotPermitted)
add("Attachment[phys].phys_vec.no-resv", buf(attach="phys"), lambda s: s.a.phys_vec(), E.LockingError)
add("Attachment[phys].phys_vec.revoked", buf(attach="phys", revoked=True, locked=True), lambda s: s.a.phys_vec(),
    E.Revoked)
add("Attachment[phys].phys_vec.detached", buf(attach="phys", detached=True, locked=True), lambda s: s.a.phys_vec(),
    E.LifetimeError)
add("Attachment[phys].phys_vec.no-op", buf("plain", attach="phys", locked=True), lambda s: s.a.phys_vec(),
    E.NotSupported)
add("Attachment[phys].phys_vec.private-untrusted", buf("plaindyn-private", attach="phys", locked=True),
    lambda s: s.a.phys_vec(), E.NotPermitted)
# Mapping types: the negotiation and the PAL calls (pydmabuf.mapping)
add("DmaBuf.mapping_attach.empty", buf(), lambda s: s.b.mapping_attach([]), E.InvalidArgument)
add("DmaBuf.mapping_attach.pal-from-a-heap", buf(), lambda s: s.b.mapping_attach([mapping.pal_importer()], Dyn()),
    E.InvalidArgument)
add("DmaBuf.mapping_attach.str", buf(), lambda s: s.b.mapping_attach(["SGT"]), TypeError)
add("DmaBuf.mapping_attach.None", buf(), lambda s: s.b.mapping_attach(None), TypeError)
add("DmaBuf.mapping_attach.exporter-entry", buf(),
    lambda s: s.b.mapping_attach([mapping.sgt_exporter(Plain(s.m))]), E.InvalidArgument)
add("DmaBuf.mapping_attach.ops=str", buf(), lambda s: s.b.mapping_attach([mapping.sgt_importer(None)], "ops"),
    TypeError)
add("DmaBuf.mapping_attach.released", buf(released=True), lambda s: s.b.mapping_attach([mapping.sgt_importer(None)]),
    E.LifetimeError)
add("mapping.pal_map_phys.sgt-attachment", buf(attach="phys", locked=True), lambda s: mapping.pal_map_phys(s.a),
    E.InvalidArgument)
add("mapping.pal_map_phys.no-namespace", buf(attach="dynamic", locked=True), lambda s: mapping.pal_map_phys(s.a),
    E.NotPermitted)
add("mapping.pal_map_phys.None", buf(), lambda s: mapping.pal_map_phys(None), TypeError)
add("mapping.pal_unmap_phys.not-a-list", buf(attach="phys", locked=True),
    lambda s: mapping.pal_unmap_phys(s.a, [[0, G]]), TypeError)
add("mapping.pal_unmap_phys.foreign-list", buf(attach="phys", locked=True),
    lambda s: mapping.pal_unmap_phys(s.a, mapping.PhysList([[0, G]])), E.LifetimeError)
add("mapping.match_mapping.no-entries", buf(), lambda s: mapping.match_mapping(mapping.MatchArgs(), []),
    E.InvalidArgument)
add("mapping.match_mapping.args=None", buf(), lambda s: mapping.match_mapping(None, []), TypeError)
add("mapping.PhysList.bad-shape", buf(), lambda s: mapping.PhysList([[1, 2, 3]]), ValueError)
add("DmaBuf.invalidate_mappings.no-resv", buf(attach="dynamic", mapped=1), lambda s: s.b.invalidate_mappings(),
    E.LockingError)
add("DmaBuf.move.no-resv", buf("movable", attach="dynamic", mapped=1), lambda s: s.b.move(), E.LockingError)
add("DmaBuf.move.static-exporter", buf(attach="dynamic", mapped=1, locked=True), lambda s: s.b.move(),
    E.NotSupported)
add("DmaBuf.move.pinned", buf("movable", attach="dynamic", pinned=True, locked=True), lambda s: s.b.move(), E.Busy)
add("DmaBuf.move.static-importer-pinned", buf("movable", attach="static", mapped=1, locked=True),
    lambda s: s.b.move(), E.Busy)
add("DmaBuf.revoke.resv-held", buf(attach="dynamic", mapped=1, locked=True), lambda s: s.b.revoke(), E.LockingError)
for _label, _v, _exp in [("str", "1", TypeError), ("-1", -1, E.InvalidArgument), ("nan", math.nan, E.InvalidArgument),
                         ("list", [1], TypeError)]:
    add(f"DmaBuf.revoke.timeout={_label}", buf(attach="dynamic"), lambda s, v=_v: s.b.revoke(v), _exp)
    add(f"DmaBuf.wait_unmapped.timeout={_label}", buf(attach="dynamic", mapped=1),
        lambda s, v=_v: s.b.wait_unmapped(v), _exp)
add("DmaBuf.wait_unmapped.times-out", buf(attach="dynamic", mapped=1), lambda s: s.b.wait_unmapped(0), E.TimedOut)
for _label, _v, _exp in [("-4096", -G, E.InvalidArgument), ("1", 1, E.InvalidArgument), ("str", "0", TypeError),
                         ("None", None, TypeError), ("float", 0.0, TypeError), ("past-end", 16 * G, E.InvalidArgument),
                         ("2**64", 2**64, E.InvalidArgument)]:
    add(f"DmaBuf.mmap.offset={_label}", buf(), lambda s, v=_v: s.b.mmap(v), _exp)
for _label, _v, _exp in [("0", 0, E.InvalidArgument), ("-1", -1, E.InvalidArgument), ("str", "4096", TypeError),
                         ("float", 4096.0, TypeError), ("past-end", 17 * G, E.InvalidArgument),
                         ("2**64", 2**64, E.InvalidArgument)]:
    add(f"DmaBuf.mmap.nbytes={_label}", buf(), lambda s, v=_v: s.b.mmap(0, v), _exp)
add("DmaBuf.mmap.no-op", buf("plain"), lambda s: s.b.mmap(), E.InvalidArgument)
_cm = buf(cpu_map=True)
for _label, _off, _n, _exp in [("off=-1", -1, 1, E.IOFailure), ("n=-1", 0, -1, E.IOFailure),
                               ("past-end", 16 * G - 1, 2, E.IOFailure), ("n=2**64", 0, 2**64, E.IOFailure),
                               ("off=2**64", 2**64, 1, E.IOFailure), ("off=str", "0", 1, TypeError),
                               ("off=float", 1.5, 1, TypeError), ("n=float", 0, 2.0, TypeError),
                               ("off=None", None, 1, TypeError), ("n=None", 0, None, TypeError)]:
    add(f"CpuMapping.read.{_label}", _cm, lambda s, o=_off, n=_n: s.cmap.read(o, n), _exp)
for _label, _off, _data, _exp in [("off=-1", -1, b"x", E.IOFailure), ("past-end", 16 * G - 1, b"xy", E.IOFailure),
                                  ("data=str", 0, "x", TypeError), ("data=None", 0, None, TypeError),
                                  ("data=int", 0, 5, TypeError), ("off=float", 0.0, b"x", TypeError),
                                  ("data=strided", 0, np.zeros(8, np.uint8)[::2], TypeError),
                                  ("off=2**64", 2**64, b"x", E.IOFailure)]:
    add(f"CpuMapping.write.{_label}", _cm, lambda s, o=_off, d=_data: s.cmap.write(o, d), _exp)


def revoked_cpu_map() -> S:
    s = buf(cpu_map=True)()
    s.b.revoke()
    return s.later(s.b.unrevoke)


add("CpuMapping.read.revoked", revoked_cpu_map, lambda s: s.cmap.read(0, 16), E.IOFailure)
add("CpuMapping.write.revoked", revoked_cpu_map, lambda s: s.cmap.write(0, b"x"), E.IOFailure)


# The access gate (docs/access-gate.md): mappings that outlived what they map.


def closed_cpu_map() -> S:
    """An mmap the user closed (munmap); the buffer lives on."""
    s = buf(cpu_map=True)()
    s.cmap.write(0, b"x")  # faulted in before the close
    s.cmap.close()
    return s


def stale_vmap() -> S:
    """A vmap the user dropped (vunmap), then kept using after the buffer
    moved: it points at pages of an older generation."""
    s = buf("movable", locked=True)()
    v = s.b.vmap()
    v.write(0, b"old")
    s.b.vunmap(v)
    s.b.move()
    s.v = v
    s.watch = s.watch + (v,)
    return s


def vmapped() -> S:
    s = buf("movable", locked=True)()
    s.v = s.b.vmap()
    return s.later(lambda: s.b.vunmap(s.v))


add("CpuMapping.read.closed", closed_cpu_map, lambda s: s.cmap.read(0, 1), E.IOFailure)
add("CpuMapping.write.closed", closed_cpu_map, lambda s: s.cmap.write(0, b"y"), E.IOFailure)
add("CpuMapping.read.vmap-of-older-generation", stale_vmap, lambda s: s.v.read(0, 3), E.IOFailure)
add("CpuMapping.write.vmap-of-older-generation", stale_vmap, lambda s: s.v.write(0, b"new"), E.IOFailure)
add("DmaBuf.move.vmapped", vmapped, lambda s: s.b.move(), E.Busy)


def stale_map(name: str) -> Callable[[], S]:
    """A mapping whose importer was told to drop it and kept it."""
    def make() -> S:
        s = buf("heap", "dynamic", device=name, mapped=1)()
        with s.b.resv:
            s.b.invalidate_mappings()
        return s

    make.__name__ = f"stale_map_{name}"
    return make


for _name in ("gpu1", "gpu0", "legacy0", "direct0", "ext0"):
    add(f"Device.dma_read[{_name}].ends-at-2**64-stale-mapping", stale_map(_name),
        lambda s: s.a.device.dma_read(2**64 - 8, 8), E.IommuFault)
    add(f"Device.dma_write[{_name}].ends-at-2**64-stale-mapping", stale_map(_name),
        lambda s: s.a.device.dma_write(2**64 - 1, b"x"), E.IommuFault)

# Confidential memory never reaches an untrusted device through a bounce.
SECRET = 61 << 30


def dev_table(name: str, offset: int = 0, nbytes: int = 2 * G) -> Callable[[], S]:
    def make() -> S:
        s = dev(name)()
        s.t = SgTable.from_pages(np.array([SECRET >> 12, (SECRET >> 12) + 1], dtype=np.uint64), offset=offset,
                                 nbytes=nbytes)
        s.watch = s.watch + (s.t,)
        return s

    make.__name__ = f"dev_table_{name}"
    return make


for _d in (DmaDirection.BIDIRECTIONAL, DmaDirection.TO_DEVICE, DmaDirection.FROM_DEVICE):
    add(f"dma_map_phys[legacy0].confidential-bounce-{_d.name}", dev("legacy0"),
        lambda s, d=_d: pydmabuf.dma_map_phys(s.d, SECRET, G, d), E.IommuFault)
    add(f"dma_map_sgtable[legacy0].confidential-bounce-{_d.name}", dev_table("legacy0"),
        lambda s, d=_d: pydmabuf.dma_map_sgtable(s.d, s.t, d), E.IommuFault)
    add(f"dma_map_phys[ext0].confidential-subgranule-{_d.name}", dev("ext0"),
        lambda s, d=_d: pydmabuf.dma_map_phys(s.d, SECRET + 0x10, 0x100, d), E.IommuFault)
add("dma_map_phys_many[legacy0].confidential-second-row", dev("legacy0"),
    lambda s: pydmabuf.dma.dma_map_phys_many(s.d, np.array([[0x1_0000_0000, G], [SECRET, G]], dtype=np.uint64), BIDI),
    E.IommuFault)
add("dma_map_phys_many[ext0].confidential-subgranule-row", dev("ext0"),
    lambda s: pydmabuf.dma.dma_map_phys_many(s.d, np.array([[0x1_0000_0000, G], [SECRET + 8, 8]], dtype=np.uint64), BIDI),
    E.IommuFault)
add("dma_map_sgtable[ext0].confidential-subgranule", dev_table("ext0", 0x100, 0x1200),
    lambda s: pydmabuf.dma_map_sgtable(s.d, s.t, BIDI), E.IommuFault)
add("IovaState.link[ext0].confidential-subgranule", iova_state("ext0"),
    lambda s: s.st.link(SECRET + 0x10, 0, 0x100, BIDI), E.IommuFault)
add("IovaState.link_ranges[ext0].confidential-tail", iova_state("ext0"),
    lambda s: s.st.link_ranges(np.array([[0x1_0000_0000, G], [SECRET, 0x800]], dtype=np.uint64), BIDI),
    E.IommuFault)
add("CpuMapping().dmabuf=str", mach_state, lambda s: pydmabuf.CpuMapping("buf", 0, G).read(0, 1), TypeError)
add("DmaBuf.vmap.no-resv", buf(), lambda s: s.b.vmap(), E.LockingError)
add("DmaBuf.vmap.no-op", buf("plain", locked=True), lambda s: s.b.vmap(), E.InvalidArgument)
add("DmaBuf.vunmap.not-mapped", buf(locked=True), lambda s: s.b.vunmap("map"), E.LifetimeError)
add("DmaBuf.vunmap.no-resv", buf(), lambda s: s.b.vunmap(None), E.LockingError)
for _label, _v in [("9", 9), ("str", "x"), ("None", None), ("float", 0.5)]:
    add(f"DmaBuf.begin_cpu_access.direction={_label}", buf(), lambda s, v=_v: s.b.begin_cpu_access(v), ValueError)
    add(f"DmaBuf.end_cpu_access.direction={_label}", buf(), lambda s, v=_v: s.b.end_cpu_access(v), ValueError)
add("DmaBuf.begin_cpu_access.resv-held", buf(locked=True), lambda s: s.b.begin_cpu_access(BIDI), E.LockingError)
add("dma_buf_phys_vec_to_sgt.attachment-no-resv", buf(attach="phys"),
    lambda s: pydmabuf.dma_buf_phys_vec_to_sgt(s.a, None, [[G, G]]), E.LockingError)
add("attach_revocable.str", buf(), lambda s: pydmabuf.attach_revocable("a"), TypeError)


# -------------------------------------------------------------- system heap

for _label, _v, _exp in [("0", 0, E.InvalidArgument), ("-1", -1, E.InvalidArgument), ("str", "4096", TypeError),
                         ("float", 4096.0, TypeError), ("None", None, TypeError),
                         ("2**64", 2**64, E.OutOfMemory), ("2**63", 2**63, E.OutOfMemory),
                         ("more-than-ram", 60 << 30, E.OutOfMemory)]:
    add(f"SystemHeap.allocate.nbytes={_label}", mach_state, lambda s, v=_v: SystemHeap(s.m).allocate(v), _exp)
for _label, _v, _exp in [("bogus", "bogus", E.InvalidArgument), ("pagemap", "pagemap", E.InvalidArgument),
                         ("int", 5, E.InvalidArgument), ("None", None, E.InvalidArgument)]:
    add(f"SystemHeap.allocate.layout={_label}", mach_state,
        lambda s, v=_v: SystemHeap(s.m).allocate(8 * G, layout=v), _exp)
add("SystemHeap.allocate.seed=-1", mach_state, lambda s: SystemHeap(s.m).allocate(8 * G, seed=-1), ValueError)
add("SystemHeap.allocate.seed=str", mach_state, lambda s: SystemHeap(s.m).allocate(8 * G, seed="1"), TypeError)
add("SystemHeap.allocate.movable-name-too-long", mach_state,
    lambda s: SystemHeap(s.m).allocate(8 * G, movable=True, name="n" * 40), E.InvalidArgument)
add("SystemHeap().machine=str", mach_state, lambda s: SystemHeap("m").allocate(G), TypeError)
add("SystemHeap.from_buffer.empty", mach_state, lambda s: SystemHeap(s.m).from_buffer(b""), E.InvalidArgument)
add("SystemHeap.from_buffer.int", mach_state, lambda s: SystemHeap(s.m).from_buffer(5), TypeError)
add("SystemHeap.from_buffer.strided", mach_state,
    lambda s: SystemHeap(s.m).from_buffer(np.zeros(100, np.uint8)[::2]), BufferError)


# =========================================================== fences (core)


def fence_state(signalled: bool = False, callbacks: int = 0) -> Callable[[], S]:
    def make() -> S:
        f = Fence(pydmabuf.fence_context_alloc(), 5)
        g = Fence(pydmabuf.fence_context_alloc(), 1)
        cbs = [f.add_callback(lambda _f: None) for _ in range(callbacks)]
        if signalled:
            f.signal()
        s = S(watch=[f, g], f=f, g=g, cbs=cbs)
        return s.later(lambda: f.is_signaled() or f.signal())

    return make


def containers() -> S:
    f = Fence(pydmabuf.fence_context_alloc(), 1)
    g = Fence(pydmabuf.fence_context_alloc(), 1)
    arr = FenceArray([f, g])
    chain = FenceChain(None, f, 1)
    chain2 = FenceChain(chain, g, 2)
    s = S(watch=[f, g, arr, chain, chain2], f=f, g=g, arr=arr, chain=chain, chain2=chain2)

    def end() -> None:
        for x in (f, g):
            if not x.is_signaled():
                x.signal()

    return s.later(end)


_fs = fence_state()
_fss = fence_state(signalled=True)
sweep("Fence().context", _fs, lambda s, v: Fence(v, 1), BAD_U64)
sweep("Fence().seqno", _fs, lambda s, v: Fence(1, v), BAD_U64)
BAD_TS = [("str", "1", TypeError), ("float", 1.5, TypeError), ("object", object(), TypeError),
          ("2**63", 2**63, E.Overflow), ("2**64", 2**64, E.Overflow), ("-2**63-1", -2**63 - 1, E.Overflow)]
sweep("Fence.signal.timestamp", _fs, lambda s, v: s.f.signal(v), BAD_TS)
sweep("Fence.check_and_signal.timestamp", _fs, lambda s, v: s.f.check_and_signal(v), BAD_TS)
sweep("private_stub_fence.timestamp", _fs, lambda s, v: pydmabuf.private_stub_fence(v), BAD_TS)
add("Fence.signal.twice", _fss, lambda s: s.f.signal(), E.InvalidArgument)
for _label, _v, _exp in [("str", "-5", TypeError), ("float", -5.0, TypeError), ("None", None, TypeError),
                         ("0", 0, E.InvalidArgument), ("1", 1, E.InvalidArgument), ("-4096", -4096, E.InvalidArgument),
                         ("2**64", 2**64, E.InvalidArgument), ("-2**64", -2**64, E.InvalidArgument),
                         ("2**31", 2**31, E.InvalidArgument)]:
    add(f"Fence.set_error={_label}", _fs, lambda s, v=_v: s.f.set_error(v), _exp)
    add(f"FenceArray.set_error={_label}", containers, lambda s, v=_v: s.arr.set_error(v), _exp)
add("Fence.set_error.signalled", _fss, lambda s: s.f.set_error(-5), E.InvalidArgument)
add("Fence.add_callback.int", _fs, lambda s: s.f.add_callback(5), TypeError)
add("Fence.add_callback.None", _fs, lambda s: s.f.add_callback(None), TypeError)
add("Fence.add_callback.signalled", _fss, lambda s: s.f.add_callback(lambda f: None), E.NotFound)
add("Fence.remove_callback.None", fence_state(callbacks=1), lambda s: s.f.remove_callback(None), TypeError)
add("Fence.remove_callback.str", fence_state(callbacks=1), lambda s: s.f.remove_callback("cb"), TypeError)
add("Fence.remove_callback.function", fence_state(callbacks=1), lambda s: s.f.remove_callback(lambda f: None),
    TypeError)
for _label, _v, _exp in [("-1", -1, E.InvalidArgument), ("nan", math.nan, E.InvalidArgument),
                         ("-inf", -math.inf, E.InvalidArgument), ("str", "1", TypeError),
                         ("list", [1], TypeError)]:
    add(f"Fence.wait.timeout={_label}", _fs, lambda s, v=_v: s.f.wait(v), _exp)
    add(f"fence_wait_any.timeout={_label}", _fs, lambda s, v=_v: pydmabuf.fence_wait_any([s.f], v), _exp)


def _but_signalling(s: S) -> Any:
    """The watched state, except whether fences have signalling enabled:
    dma_fence_wait_timeout() enables it before the wait notices a pending
    signal, so an interrupted wait leaves it enabled in the kernel too."""
    def strip(x: Any) -> Any:
        if isinstance(x, pydmabuf.Fence):
            snap = list(snapshot(x))
            del snap[6]
            return tuple(snap)
        return snapshot(x)

    return [strip(x) for x in s.watch]


def pending_signal(make: Callable[[], S]) -> Callable[[], S]:
    def wrapped() -> S:
        s = make()
        pydmabuf.signal_thread(__import__("threading").get_ident())
        return s.later(pydmabuf.flush_signals)

    return wrapped


def in_section(make: Callable[[], S]) -> Callable[[], S]:
    def wrapped() -> S:
        s = make()
        cookie = pydmabuf.begin_signalling()
        return s.later(lambda: pydmabuf.end_signalling(cookie))

    return wrapped


add("Fence.wait.interrupted", pending_signal(_fs), lambda s: s.f.wait(1.0, interruptible=True), E.Interrupted,
    snap=_but_signalling)
add("Fence.wait.interrupted-huge-timeout", pending_signal(_fs), lambda s: s.f.wait(10**400, interruptible=True),
    E.Interrupted,
    snap=_but_signalling)
add("fence_wait_any.interrupted", pending_signal(_fs),
    lambda s: pydmabuf.fence_wait_any([s.f, s.g], 10**400, interruptible=True), E.Interrupted,
    snap=_but_signalling)
add("Fence.wait.in-signalling-section", in_section(_fs), lambda s: s.f.wait(0), E.LockingError)
add("fence_wait_any.in-signalling-section", in_section(_fs), lambda s: pydmabuf.fence_wait_any([s.f], 0),
    E.LockingError)
add("end_signalling.unopened", _fs, lambda s: pydmabuf.end_signalling(False), E.LockingError)
add("Fence.is_later.other-context", _fs, lambda s: s.f.is_later(s.g), E.InvalidArgument)
add("Fence.is_later.None", _fs, lambda s: s.f.is_later(None), TypeError)
add("Fence.is_later.str", _fs, lambda s: s.f.is_later("f"), TypeError)
add("Fence.is_later_or_same.other-context", _fs, lambda s: s.f.is_later_or_same(s.g), E.InvalidArgument)
add("Fence.later.other-context", _fs, lambda s: Fence.later(s.f, s.g), E.InvalidArgument)
add("Fence.later.None", _fs, lambda s: Fence.later(s.f, None), TypeError)
for _label, _v, _exp in [("str", "1", TypeError), ("float", 1.0, TypeError), ("2**63", 2**63, E.Overflow),
                         ("2**64", 2**64, E.Overflow), ("-2**63-1", -2**63 - 1, E.Overflow)]:
    add(f"Fence.set_deadline_hint={_label}", _fs, lambda s, v=_v: s.f.set_deadline_hint(v), _exp)
add("fence_wait_any.empty", _fs, lambda s: pydmabuf.fence_wait_any([]), E.InvalidArgument)
add("fence_wait_any.int", _fs, lambda s: pydmabuf.fence_wait_any(5), TypeError)
add("fence_wait_any.None-member", _fs, lambda s: pydmabuf.fence_wait_any([s.f, None]), TypeError)
add("fence_wait_any.str-member", _fs, lambda s: pydmabuf.fence_wait_any(["f"]), TypeError)
sweep("fence_context_alloc.n", _fs, lambda s, v: pydmabuf.fence_context_alloc(v), BAD_U64)
add("fence_context_alloc.n=0", _fs, lambda s: pydmabuf.fence_context_alloc(0), E.InvalidArgument)
add("fence_context_alloc.n=2**64-1", _fs, lambda s: pydmabuf.fence_context_alloc(U64), E.Overflow)
add("FenceArray().empty", containers, lambda s: FenceArray([]), E.InvalidArgument)
add("FenceArray().int", containers, lambda s: FenceArray(5), TypeError)
add("FenceArray().None-member", containers, lambda s: FenceArray([s.f, None]), TypeError)
add("FenceArray().array-member", containers, lambda s: FenceArray([s.f, s.arr]), E.InvalidArgument)
add("FenceArray().chain-member", containers, lambda s: FenceArray([s.chain]), E.InvalidArgument)
sweep("FenceArray().context", containers, lambda s, v: FenceArray([s.f], context=v), BAD_U64, {"None": None})
sweep("FenceArray().seqno", containers, lambda s, v: FenceArray([s.f], seqno=v), BAD_U64)
sweep("FenceArray.match_context", containers, lambda s, v: s.arr.match_context(v), BAD_U64)
add("FenceChain().prev=str", containers, lambda s: FenceChain("prev", s.f, 1), TypeError)
add("FenceChain().fence=None", containers, lambda s: FenceChain(None, None, 1), TypeError)
add("FenceChain().fence=chain", containers, lambda s: FenceChain(None, s.chain, 1), E.InvalidArgument)
sweep("FenceChain().seqno", containers, lambda s, v: FenceChain(s.chain2, s.f, v), BAD_U64)
add("FenceChain.find_seqno.beyond", containers, lambda s: s.chain2.find_seqno(3), E.InvalidArgument)
sweep("FenceChain.find_seqno", containers, lambda s, v: s.chain2.find_seqno(v), BAD_U64)
add("fence_chain_find_seqno.plain-fence", containers, lambda s: pydmabuf.fence_chain_find_seqno(s.f, 1),
    E.InvalidArgument)
add("fence_chain_find_seqno.None", containers, lambda s: pydmabuf.fence_chain_find_seqno(None, 1), TypeError)
sweep("fence_chain_find_seqno.seqno", containers, lambda s, v: pydmabuf.fence_chain_find_seqno(s.chain2, v),
      BAD_U64)
add("fence_chain_contained.None", containers, lambda s: pydmabuf.fence_chain_contained(None), TypeError)
add("fence_unwrap.None", containers, lambda s: pydmabuf.fence_unwrap(None), TypeError)
add("fence_unwrap.str", containers, lambda s: pydmabuf.fence_unwrap("f"), TypeError)
add("fence_merge.int", containers, lambda s: pydmabuf.fence_merge(s.f, 5), TypeError)
add("fence_merge.None", containers, lambda s: pydmabuf.fence_merge(None), TypeError)
add("FenceChain.reinit", containers, lambda s: s.chain2.__init__(s.chain2, s.g, 9), E.InvalidArgument)
add("FenceArray.reinit", containers, lambda s: s.arr.__init__([s.g]), E.InvalidArgument)


# ================================================== ww mutexes, resv (core)

WD = WwClass("hostile_wd", wait_die=True)
WW = WwClass("hostile_ww")


def ww_state(held: str | None = None, klass: WwClass = WD) -> Callable[[], S]:
    """Two mutexes of a class and a context; ``held``: None, "plain" (m1
    locked without a context), "ctx" (m1 locked through ctx), "done"
    (and ctx.done()), "fini" (ctx finished, nothing held)."""
    def make() -> S:
        m1, m2 = WwMutex(klass), WwMutex(klass)
        ctx = AcquireContext(klass)
        s = S(watch=[m1, m2, ctx], m1=m1, m2=m2, ctx=ctx)
        if held == "plain":
            m1.lock()
        elif held in ("ctx", "done"):
            m1.lock(ctx)
            if held == "done":
                ctx.done()
        elif held == "fini":
            ctx.fini()

        def end() -> None:
            if m1.held_by_current_thread():
                m1.unlock()
            if not ctx.is_finished:
                ctx.fini()

        return s.later(end)

    return make


_free = ww_state()
_plain = ww_state("plain")
_inctx = ww_state("ctx")
add("WwClass().name=int", _free, lambda s: WwClass(5), TypeError)
add("WwClass().name=None", _free, lambda s: WwClass(None), TypeError)
add("WwClass.reinit", _free, lambda s: WD.__init__("renamed", wait_die=False), E.LockingError,
    snap=lambda s: (snapshot(s.watch), WD.name, WD.is_wait_die, WD.stamp))
add("reservation_ww_class.reinit", _free, lambda s: pydmabuf.reservation_ww_class.__init__("x"), E.LockingError,
    snap=lambda s: (pydmabuf.reservation_ww_class.name, pydmabuf.reservation_ww_class.stamp))
add("WwMutex().None", _free, lambda s: WwMutex(None), TypeError)
add("WwMutex().str", _free, lambda s: WwMutex("class"), TypeError)
add("WwMutex.reinit", _free, lambda s: s.m1.__init__(WW), E.LockingError)
add("AcquireContext().None", _free, lambda s: AcquireContext(None), TypeError)
add("AcquireContext.reinit", _free, lambda s: s.ctx.__init__(WD), E.LockingError)
add("WwMutex.lock.ctx=str", _free, lambda s: s.m1.lock("ctx"), TypeError)
add("WwMutex.trylock.ctx=str", _free, lambda s: s.m1.trylock("ctx"), TypeError)
add("WwMutex.lock_slow.None", _free, lambda s: s.m1.lock_slow(None), TypeError)
add("WwMutex.lock_slow.no-edeadlk", _free, lambda s: s.m1.lock_slow(s.ctx), E.LockingError)
add("WwMutex.unlock.not-locked", _free, lambda s: s.m1.unlock(), E.LockingError)
add("WwMutex.unlock.other-thread", _plain, lambda s: in_thread(s.m1.unlock), E.LockingError)
add("WwMutex.unlock.ctx-other-thread", _inctx, lambda s: in_thread(s.m1.unlock), E.LockingError)
add("WwMutex.lock.recursive", _plain, lambda s: s.m1.lock(), E.LockingError)
add("WwMutex.lock.second-plain-of-class", _plain, lambda s: s.m2.lock(), E.LockingError)
add("WwMutex.lock.held-by-ctx", _inctx, lambda s: s.m1.lock(s.ctx), E.AlreadyLockedError)
add("WwMutex.lock_interruptible.held-by-ctx", _inctx, lambda s: s.m1.lock_interruptible(s.ctx),
    E.AlreadyLockedError)
add("WwMutex.lock.held-plain-then-ctx", _plain, lambda s: s.m1.lock(s.ctx), E.LockingError)
def ww_foreign_ctx(held: str | None = None, klass: WwClass = WD, other: WwClass = WD) -> Callable[[], S]:
    """ww_state plus a second acquire context (of ``other``) in this thread."""
    def make() -> S:
        s = ww_state(held, klass)()
        s.ctx2 = AcquireContext(other)
        s.watch = s.watch + (s.ctx2,)
        return s.later(s.ctx2.fini)

    return make


add("WwMutex.lock.ctx-other-class", ww_foreign_ctx(klass=WW), lambda s: s.m1.lock(s.ctx2), E.LockingError)
add("WwMutex.lock.ctx-finished", ww_state("fini"), lambda s: s.m1.lock(s.ctx), E.LockingError)
add("WwMutex.lock.ctx-done", ww_state("done"), lambda s: s.m2.lock(s.ctx), E.LockingError)
add("WwMutex.trylock.ctx-done", ww_state("done"), lambda s: s.m2.trylock(s.ctx), E.LockingError)
add("WwMutex.lock.ctx-of-other-thread", _free, lambda s: in_thread(lambda: s.m1.lock(s.ctx)), E.LockingError)
add("WwMutex.trylock.ctx-of-other-thread", _free, lambda s: in_thread(lambda: s.m1.trylock(s.ctx)),
    E.LockingError)
add("WwMutex.lock.two-contexts-one-thread", ww_foreign_ctx("ctx"), lambda s: s.m2.lock(s.ctx2), E.LockingError)
add("WwMutex.destroy.held", _plain, lambda s: s.m1.destroy(), E.LockingError)


def ww_destroyed() -> S:
    s = _free()
    s.m2.destroy()
    return s


add("WwMutex.lock.destroyed", ww_destroyed, lambda s: s.m2.lock(), E.LockingError)
add("WwMutex.trylock.destroyed", ww_destroyed, lambda s: s.m2.trylock(), E.LockingError)
add("WwMutex.assert_held.free", _free, lambda s: s.m1.assert_held(), E.LockingError)
add("WwMutex.assert_held.other-thread", _plain, lambda s: in_thread(s.m1.assert_held), E.LockingError)
add("AcquireContext.done.twice", ww_state("done"), lambda s: s.ctx.done(), E.LockingError)
add("AcquireContext.done.finished", ww_state("fini"), lambda s: s.ctx.done(), E.LockingError)
add("AcquireContext.fini.held", _inctx, lambda s: s.ctx.fini(), E.LockingError)
add("AcquireContext.fini.twice", ww_state("fini"), lambda s: s.ctx.fini(), E.LockingError)
for _meth in ("done", "fini", "unlock_all", "__enter__"):
    add(f"AcquireContext.{_meth}.other-thread", _inctx, lambda s, m=_meth: in_thread(getattr(s.ctx, m)),
        E.LockingError)
add("AcquireContext.lock_all.other-thread", _free, lambda s: in_thread(lambda: s.ctx.lock_all([s.m1])),
    E.LockingError)
add("AcquireContext.lock_all.int", _free, lambda s: s.ctx.lock_all(5), TypeError)
add("AcquireContext.lock_all.str-member", _free, lambda s: s.ctx.lock_all([s.m1, "m"]), TypeError)
add("AcquireContext.lock_all.None-member", _inctx, lambda s: s.ctx.lock_all([s.m2, None]), TypeError)
add("AcquireContext.lock_all.other-class", _free, lambda s: s.ctx.lock_all([s.m1, WwMutex(WW)]), E.LockingError)
add("AcquireContext.lock_all.second-context", ww_foreign_ctx("ctx"), lambda s: s.ctx2.lock_all([s.m2]),
    E.LockingError)
add("AcquireContext.lock_all.finished", ww_state("fini"), lambda s: s.ctx.lock_all([s.m1]), E.LockingError)
add("locked.int", _free, lambda s: pydmabuf.locked(5).__enter__(), TypeError)
add("locked.str-member", _free, lambda s: pydmabuf.locked([s.m1, "m"]).__enter__(), TypeError)
add("locked.ww_class=str", _free, lambda s: pydmabuf.locked([s.m1], ww_class="wd").__enter__(), TypeError)
add("signal_thread.str", _free, lambda s: pydmabuf.signal_thread("1"), TypeError)
add("signal_thread.None", _free, lambda s: pydmabuf.signal_thread(None), TypeError)
add("signal_thread.float", _free, lambda s: pydmabuf.signal_thread(1.0), TypeError)


def resv_state(fences: int = 1, locked: bool = True, reserved: int = 0) -> Callable[[], S]:
    def make() -> S:
        r = Resv()
        fs = [Fence(pydmabuf.fence_context_alloc(), 1) for _ in range(fences)]
        r.lock()
        if fences:
            r.reserve_fences(fences)
        for f in fs:
            r.add_fence(f, Usage.WRITE)
        r.unlock()              # reservations end at unlock
        if locked:
            r.lock()
        if reserved:
            r.reserve_fences(reserved)
        s = S(watch=[r] + fs, r=r, fs=fs)

        def end() -> None:
            if r.held_by_current_thread():
                r.unlock()
            for f in fs:
                if not f.is_signaled():
                    f.signal()

        return s.later(end)

    return make


_rl = resv_state()
_ru = resv_state(locked=False)
BAD_USAGE = [("str", "read", TypeError), ("float", 1.0, TypeError), ("None", None, TypeError),
             ("4", 4, E.InvalidArgument), ("-1", -1, E.InvalidArgument), ("2**64", 2**64, E.InvalidArgument),
             ("-2**64", -2**64, E.InvalidArgument)]
add("Resv().ww_class=str", _ru, lambda s: Resv(ww_class="x"), TypeError)
add("Resv.reinit", _ru, lambda s: s.r.__init__(), E.LockingError)
sweep("Resv.reserve_fences.n", _rl, lambda s, v: s.r.reserve_fences(v), BAD_U64)
add("Resv.reserve_fences.n=0", _rl, lambda s: s.r.reserve_fences(0), E.InvalidArgument)
add("Resv.reserve_fences.n=2**64-1", _rl, lambda s: s.r.reserve_fences(U64), E.OutOfMemory)
add("Resv.reserve_fences.n=2**32", _rl, lambda s: s.r.reserve_fences(2**32), E.OutOfMemory)
add("Resv.reserve_fences.n=2**64-1-with-room", resv_state(reserved=2), lambda s: s.r.reserve_fences(U64),
    E.OutOfMemory)
add("Resv.reserve_fences.n=2**64-num", resv_state(fences=3), lambda s: s.r.reserve_fences(2**64 - 3), E.OutOfMemory)
add("Resv.reserve_fences.n=2**64-num-with-room", resv_state(fences=3, reserved=1),
    lambda s: s.r.reserve_fences(2**64 - 3), E.OutOfMemory)
add("Resv.reserve_fences.unlocked", _ru, lambda s: s.r.reserve_fences(1), E.LockingError)
add("Resv.reserve_fences.other-thread", _rl, lambda s: in_thread(lambda: s.r.reserve_fences(1)), E.LockingError)
add("Resv.add_fence.no-slot", _rl, lambda s: s.r.add_fence(Fence(pydmabuf.fence_context_alloc(), 1), Usage.READ),
    E.LockingError)
add("Resv.add_fence.unlocked", _ru, lambda s: s.r.add_fence(s.fs[0], Usage.READ), E.LockingError)
add("Resv.add_fence.other-thread", resv_state(reserved=1),
    lambda s: in_thread(lambda: s.r.add_fence(Fence(pydmabuf.fence_context_alloc(), 1), Usage.READ)),
    E.LockingError)
add("Resv.add_fence.None", resv_state(reserved=1), lambda s: s.r.add_fence(None, Usage.READ), TypeError)
add("Resv.add_fence.str", resv_state(reserved=1), lambda s: s.r.add_fence("f", Usage.READ), TypeError)
add("Resv.add_fence.array", resv_state(reserved=1), lambda s: s.r.add_fence(FenceArray([s.fs[0]]), Usage.READ),
    E.InvalidArgument)
add("Resv.add_fence.chain", resv_state(reserved=1), lambda s: s.r.add_fence(FenceChain(None, s.fs[0], 1), Usage.READ),
    E.InvalidArgument)
sweep("Resv.add_fence.usage", resv_state(reserved=1),
      lambda s, v: s.r.add_fence(Fence(pydmabuf.fence_context_alloc(), 1), v), BAD_USAGE)
sweep("Resv.replace_fences.context", _rl, lambda s, v: s.r.replace_fences(v, s.fs[0], Usage.READ), BAD_U64)
sweep("Resv.replace_fences.usage", _rl, lambda s, v: s.r.replace_fences(s.fs[0].context, s.fs[0], v), BAD_USAGE)
add("Resv.replace_fences.None", _rl, lambda s: s.r.replace_fences(s.fs[0].context, None, Usage.READ), TypeError)
add("Resv.replace_fences.unlocked", _ru, lambda s: s.r.replace_fences(s.fs[0].context, s.fs[0], Usage.READ),
    E.LockingError)
add("Resv.copy_fences.None", _rl, lambda s: s.r.copy_fences(None), TypeError)
add("Resv.copy_fences.WwMutex", _rl, lambda s: s.r.copy_fences(WwMutex(pydmabuf.reservation_ww_class)), TypeError)
add("Resv.copy_fences.unlocked", _ru, lambda s: s.r.copy_fences(Resv()), E.LockingError)
for _m in ("get_fences", "get_singleton", "test_signaled", "iter_fences", "iter_fences_unlocked", "wait"):
    sweep(f"Resv.{_m}.usage", _ru, lambda s, v, m=_m: getattr(s.r, m)(v), BAD_USAGE)
sweep("Resv.set_deadline.usage", _ru, lambda s, v: s.r.set_deadline(v, 10), BAD_USAGE)
for _label, _v, _exp in [("str", "1", TypeError), ("2**64", 2**64, E.Overflow), ("float", 1.5, TypeError)]:
    add(f"Resv.set_deadline.deadline={_label}", _ru, lambda s, v=_v: s.r.set_deadline(Usage.READ, v), _exp)
    add(f"Resv.set_deadline.deadline={_label}-no-fences", resv_state(fences=0, locked=False),
        lambda s, v=_v: s.r.set_deadline(Usage.READ, v), _exp)
for _label, _v, _exp in [("-1", -1, E.InvalidArgument), ("nan", math.nan, E.InvalidArgument),
                         ("str", "1", TypeError)]:
    add(f"Resv.wait.timeout={_label}", _ru, lambda s, v=_v: s.r.wait(Usage.READ, v), _exp)
add("Resv.wait.interrupted", pending_signal(_ru), lambda s: s.r.wait(Usage.READ, 5.0, interruptible=True),
    E.Interrupted,
    snap=_but_signalling)
add("Resv.wait.in-signalling-section", in_section(_ru), lambda s: s.r.wait(Usage.READ, 0), E.LockingError)
add("Resv.lock.in-signalling-section", in_section(_ru), lambda s: s.r.lock(), E.LockingError)
add("Resv.iter_fences.unlocked", _ru, lambda s: next(s.r.iter_fences()), E.LockingError)
add("Resv.iter_fences.other-thread", _rl, lambda s: in_thread(lambda: next(s.r.iter_fences())), E.LockingError)
add("Resv.describe.unlocked", _ru, lambda s: s.r.describe(), E.LockingError)
add("Resv.unlock.other-thread", _rl, lambda s: in_thread(s.r.unlock), E.LockingError)
add("Resv.unlock.unlocked", _ru, lambda s: s.r.unlock(), E.LockingError)
add("ResvIter().direct", _ru, lambda s: pydmabuf.ResvIter(), TypeError)


# ============================================ topology, workloads, checks


def _plain_device(s: S) -> Any:
    from pydmabuf.machine import Device

    return Device(s.m, "platform0")


add("Device.p2pdma_init.not-pci", mach_state, lambda s: _plain_device(s).p2pdma_init(), E.NotSupported)
add("Device().dma_mask=0", mach_state, lambda s: pydmabuf.Device(s.m, "x", dma_mask=0), E.InvalidArgument)
add("Device().dma_mask=2**64", mach_state, lambda s: pydmabuf.Device(s.m, "x", dma_mask=2**64), E.InvalidArgument)
add("Device().max_segment_size=0", mach_state, lambda s: pydmabuf.Device(s.m, "x", max_segment_size=0),
    E.InvalidArgument)
add("Device().max_segment_size=2**32", mach_state, lambda s: pydmabuf.Device(s.m, "x", max_segment_size=2**32),
    E.InvalidArgument)
add("Machine.iova_stats.str", mach_state, lambda s: s.m.iova_stats("gpu0"), TypeError)
add("Machine.what_is.str", mach_state, lambda s: s.m.what_is("0x1000"), TypeError)
add("Machine.what_is.-1", mach_state, lambda s: s.m.what_is(-1), E.InvalidArgument)
add("Machine.p2p_map_type.client=str", mach_state, lambda s: s.m.p2p_map_type(s.m.device("gpu0"), "gpu1"),
    TypeError)
add("Machine.p2p_map_type.provider=str", mach_state, lambda s: s.m.p2p_map_type("gpu0", s.m.device("gpu1")),
    TypeError)
add("p2p_map_type.provider=None", mach_state, lambda s: pydmabuf.p2p_map_type(None, s.m.device("gpu1")), TypeError)
add("Machine.p2p_distance.client=int", mach_state, lambda s: s.m.p2p_distance(s.m.device("gpu0"), [5]), TypeError)
add("Machine.p2p_distance.clients=int", mach_state, lambda s: s.m.p2p_distance(s.m.device("gpu0"), 5), TypeError)
add("Machine.p2p_distance.provider=str", mach_state, lambda s: s.m.p2p_distance("gpu0", [s.m.device("nic0")]),
    TypeError)
_wl = mach_state
add("workloads.layout.unknown", _wl, lambda s: workloads.layout("bogus", 4), ValueError)
add("workloads.layout.npages=-1", _wl, lambda s: workloads.layout("thp", -1), ValueError)
add("workloads.layout.npages=str", _wl, lambda s: workloads.layout("contiguous", "4"), TypeError)
add("workloads.layout.npages=float", _wl, lambda s: workloads.layout("fragmented", 4.0), TypeError)
add("workloads.random_runs.mean_run=0", _wl, lambda s: workloads.random_runs(10, 0), ValueError)
add("workloads.random_runs.mean_run=-1", _wl, lambda s: workloads.random_runs(10, -1), ValueError)
add("workloads.random_runs.mean_run=nan", _wl, lambda s: workloads.random_runs(10, math.nan), ValueError)
add("workloads.numpy_coalesce.max_pages=0", _wl,
    lambda s: workloads.numpy_coalesce(np.arange(4, dtype=np.uint64), 0), ValueError)
add("workloads.real_pages.2**40", _wl, lambda s: workloads.real_pages(2**40), E.OutOfMemory)
add("workloads.real_pages.0", _wl, lambda s: workloads.real_pages(0), E.InvalidArgument)
add("floor_coalesce.max_segment=-1", _wl, lambda s: pydmabuf._floors.floor_coalesce([1, 2], -1), E.InvalidArgument)
add("floor_coalesce.max_segment=str", _wl, lambda s: pydmabuf._floors.floor_coalesce([1, 2], "x"), TypeError)
add("floor_coalesce.pfns=None", _wl, lambda s: pydmabuf._floors.floor_coalesce(None), TypeError)
add("floor_coalesce.out-too-small", _wl,
    lambda s: pydmabuf._floors.floor_coalesce([1, 3, 5], out=pydmabuf._floors.floor_buffer(1, 32)), ValueError)
add("floor_pte.out-too-small", _wl,
    lambda s: pydmabuf._floors.floor_pte([1, 3, 5], out=pydmabuf._floors.floor_buffer(1, 8)), ValueError)
add("floor_pte.out=array", _wl, lambda s: pydmabuf._floors.floor_pte([1], out=np.zeros(4)), TypeError)
for _label, _n, _size, _exp in [("n=0", 0, 8, ValueError), ("n=-1", -1, 8, ValueError),
                                ("n=2**64", 2**64, 8, E.OutOfMemory), ("n=2**61", 2**61, 8, E.OutOfMemory),
                                ("itemsize=3", 4, 3, ValueError), ("n=str", "4", 8, TypeError)]:
    add(f"floor_buffer.{_label}", _wl, lambda s, n=_n, z=_size: pydmabuf._floors.floor_buffer(n, z), _exp)


# ======================================== u64 buffer arguments: every user

class U64User:
    """One entry point taking a caller's buffer of u64 (``kind`` "u64") or
    of (address, nbytes) u64 rows ("pairs"): the state it needs, a valid
    input of ``n`` items for that state, the call, what of its result to
    compare, and the core functions it reaches (for the source check)."""

    def __init__(self, id: str, kind: str, make: Callable[[], S], good: Callable[[S, int], np.ndarray],
                 call: Callable[[S, Any, int], Any], core: tuple[str, ...],
                 finish: Callable[[S, Any], Any] | None = None) -> None:
        self.id, self.kind, self.make, self.good, self.call, self.core = id, kind, make, good, call, core
        self.finish = finish


def _pfns(s: S, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint64) * 2 + 0x100000          # no two adjacent: n entries


def _starts(s: S, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint64) * 0x2000 + 0x1000_0000


def _full(v: int) -> Callable[[S, int], np.ndarray]:
    return lambda s, n: np.full(n, v, dtype=np.uint64)


def _rows_at(base: int) -> Callable[[S, int], np.ndarray]:
    def good(s: S, n: int) -> np.ndarray:
        return np.stack([np.arange(n, dtype=np.uint64) * 2 * G + base, np.full(n, G, dtype=np.uint64)], axis=1)
    return good


def _rt_filled() -> S:
    s = S(t=RangeTable())
    s.watch = (s.t,)
    return s


def _rt_n(n: int) -> S:
    s = _rt_filled()
    s.t.insert_many(_starts(s, n), np.full(n, 0x1000, dtype=np.uint64))
    return s


def _iovad_allocated() -> S:
    s = iovad()
    s.pfns = s.d.alloc_many(1, 1 << 15, 0xFFFFFF)
    return s


def _pgt_mapped() -> S:
    s = pgt()
    s.p.map(0x4000_0000, 0x100000000, 1 << 24)
    return s


def _nvme() -> S:
    m = mach()
    q = NvmeQueue(m.device("nvme0"))
    return S(watch=[m, q], m=m, q=q)


def _st_big() -> S:
    return iova_state(nbytes=1 << 30)()


def _dma_windows(s: S, n: int) -> np.ndarray:
    """n // 3 identity (cpu_start, dma_start, size) windows of 2**40 bytes."""
    k = np.arange(n // 3, dtype=np.uint64) << np.uint64(40)
    return np.stack([k, k, np.full(n // 3, 1 << 40, dtype=np.uint64)], axis=1).reshape(-1)


def _pc_state() -> S:
    m = mach()
    return S(watch=[m], m=m)


def _pc_good(s: S, n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.uint64)


def _unmap_batch(s: S, r: Any) -> None:
    pydmabuf.dma.dma_unmap_phys_many(r)


def _free_sgt(s: S, r: Any) -> None:
    pydmabuf.dma_buf_free_sgt(r)


_BAR = 0x3800000000  # gpu0 BAR1 in the default machine
#: Every user.  A new entry point taking a u64 buffer belongs here: the
#: hostile catalogues and the thread stress then run through it, and
#: test_every_core_user_is_listed fails until it is.
U64_USERS: list[U64User] = [
    U64User("SgTable.from_pages", "u64", sg_empty, _pfns, lambda s, b, n: SgTable.from_pages(b), ("from_pages",)),
    U64User("SgTable.append_pages", "u64", sg, _pfns, lambda s, b, n: s.t.append_pages(b), ("append_pages",)),
    U64User("RangeTable.insert_many.starts", "u64", _rt_filled, _starts,
            lambda s, b, n: s.t.insert_many(b, np.full(n, 0x1000, dtype=np.uint64)), ("insert_many",)),
    U64User("RangeTable.insert_many.nbytes", "u64", _rt_filled, _full(0x1000),
            lambda s, b, n: s.t.insert_many(_starts(s, n), b), ("insert_many",)),
    U64User("RangeTable.insert_many.kinds", "u64", _rt_filled, _full(1),
            lambda s, b, n: s.t.insert_many(_starts(s, n), np.full(n, 0x1000, dtype=np.uint64), kinds=b),
            ("insert_many",)),
    U64User("RangeTable.insert_many.owners", "u64", _rt_filled, _full(7),
            lambda s, b, n: s.t.insert_many(_starts(s, n), np.full(n, 0x1000, dtype=np.uint64), owners=b),
            ("insert_many",)),
    U64User("RangeTable.insert_many.flags", "u64", _rt_filled, _full(3),
            lambda s, b, n: s.t.insert_many(_starts(s, n), np.full(n, 0x1000, dtype=np.uint64), flags=b),
            ("insert_many",)),
    U64User("RangeTable.remove_many", "u64", lambda: _rt_n(1 << 15), lambda s, n: _starts(s, n),
            lambda s, b, n: s.t.remove_many(b), ("_remove_many",)),
    U64User("IovaDomain.alloc_many.npages", "u64", iovad, _full(1), lambda s, b, n: s.d.alloc_many(b, n, 0xFFFFFF),
            ("alloc_many",)),
    U64User("IovaDomain.free_many.pfns", "u64", _iovad_allocated, lambda s, n: np.ascontiguousarray(s.pfns[:n]),
            lambda s, b, n: s.d.free_many(b), ("free_many",)),
    U64User("IovaDomain.free_many.npages", "u64", _iovad_allocated, _full(1),
            lambda s, b, n: s.d.free_many(np.ascontiguousarray(s.pfns[:n]), b), ("free_many",)),
    U64User("IoPageTable.map_many.phys", "u64", pgt, lambda s, n: np.arange(n, dtype=np.uint64) * 2 * G,
            lambda s, b, n: s.p.map_many(0x1_0000_0000, b, G), ("map_many",)),
    U64User("IoPageTable.map_many.nbytes", "u64", pgt, _full(G),
            lambda s, b, n: s.p.map_many(0x1_0000_0000, np.arange(n, dtype=np.uint64) * 2 * G, b), ("map_many",)),
    U64User("IoPageTable.iova_to_phys_many", "u64", _pgt_mapped,
            lambda s, n: np.arange(n, dtype=np.uint64) * G % (1 << 24) + 0x4000_0000,
            lambda s, b, n: s.p.iova_to_phys_many(b), ("iova_to_phys_many",)),
    U64User("floor_coalesce", "u64", mach_state, _pfns, lambda s, b, n: pydmabuf._floors.floor_coalesce(b),
            ("floor_coalesce",)),
    U64User("floor_pte", "u64", mach_state, _pfns, lambda s, b, n: pydmabuf._floors.floor_pte(b), ("floor_pte",)),
    U64User("P2pContext.states", "u64", _pc_state, _pc_good,
            lambda s, b, n: pydmabuf._core.P2pContext(s.m.address_map, b, np.zeros(n, dtype=np.uint64)),
            ("__cinit__",)),
    U64User("P2pContext.offsets", "u64", _pc_state, _pc_good,
            lambda s, b, n: pydmabuf._core.P2pContext(s.m.address_map, np.zeros(n, dtype=np.uint64), b),
            ("__cinit__",)),
    U64User("map_sg_direct.dma_ranges", "u64", sg, _dma_windows,
            lambda s, b, n: pydmabuf._core.map_sg_direct(s.t, U64, b, False, False, 0, None), ("map_sg_direct",),
            lambda s, r: pydmabuf._core.sg_clear_dma(s.t)),
    U64User("sg_set_dma.slots", "u64", sg, _full(1 << 40), lambda s, b, n: pydmabuf._core.sg_set_dma(
        s.t, b, np.zeros(n, dtype=np.uint64)), ("sg_set_dma",)),
    U64User("sg_set_dma.addrs", "u64", sg, _full(0), lambda s, b, n: pydmabuf._core.sg_set_dma(
        s.t, np.full(n, 1 << 40, dtype=np.uint64), b), ("sg_set_dma",)),
    U64User("NvmeQueue.bvecs_from_pages", "u64", _nvme, _pfns, lambda s, b, n: s.q.bvecs_from_pages(b),
            ("u64_array",)),
    U64User("NvmeQueue.map_pages", "u64", _nvme, lambda s, n: _pfns(s, min(n, 64)),
            lambda s, b, n: s.q.map_pages(b), ("u64_array", "blk_map_iter"), lambda s, r: s.q.unmap(r)),
    U64User("u64_array", "u64", mach_state, _pfns, lambda s, b, n: pydmabuf._core.u64_array(b), ("u64_array",)),
    U64User("SgTable.from_ranges", "pairs", sg_empty, _rows_at(0x100000000), lambda s, b, n: SgTable.from_ranges(b),
            ("from_ranges",)),
    U64User("IovaState.link_ranges", "pairs", _st_big, _rows_at(0x100000000),
            lambda s, b, n: s.st.link_ranges(b, BIDI), ("u64_pairs", "iova_link_ranges", "_link", "link")),
    U64User("dma_buf_phys_vec_to_sgt", "pairs", p2p("nic0"), lambda s, n: _rows_at(_BAR)(s, min(n, 1 << 14)),
            lambda s, b, n: pydmabuf.dma_buf_phys_vec_to_sgt(s.c, s.prov, b), ("u64_pairs", "ranges_total"),
            _free_sgt),
    U64User("dma_map_phys_many", "pairs", dev("gpu1"), lambda s, n: _rows_at(0x100000000)(s, min(n, 1 << 12)),
            lambda s, b, n: pydmabuf.dma.dma_map_phys_many(s.d, b, BIDI),
            ("u64_pairs", "map_single_many", "unmap_single_many"), _unmap_batch),
    U64User("NvmeQueue.merge", "pairs", _nvme, _rows_at(0x100000000), lambda s, b, n: s.q.merge(b),
            ("u64_pairs", "blk_map_iter")),
    U64User("NvmeQueue.map", "pairs", _nvme, lambda s, n: _rows_at(0x100000000)(s, min(n, 64)),
            lambda s, b, n: s.q.map(b), ("u64_pairs", "blk_map_iter"), lambda s, r: s.q.unmap(r)),
    U64User("u64_pairs", "pairs", mach_state, _rows_at(0x100000000), lambda s, b, n: pydmabuf._core.u64_pairs(b),
            ("u64_pairs",)),
    U64User("ranges_total", "pairs", mach_state, _rows_at(0x100000000),
            lambda s, b, n: pydmabuf._core.ranges_total(b, "rows"), ("ranges_total",)),
]

#: Users the older sweeps above already run every catalogue through.
_SWEPT = {"SgTable.from_pages", "SgTable.append_pages", "RangeTable.insert_many.starts",
          "RangeTable.insert_many.nbytes", "RangeTable.insert_many.owners", "RangeTable.remove_many",
          "IovaDomain.alloc_many.npages", "IovaDomain.free_many.pfns", "IoPageTable.map_many.phys",
          "IoPageTable.map_many.nbytes", "IoPageTable.iova_to_phys_many", "SgTable.from_ranges",
          "IovaState.link_ranges"}

for _u in U64_USERS:
    if _u.id in _SWEPT:
        continue
    _cat = bad_u64_buffers() if _u.kind == "u64" else bad_pair_buffers()
    for _label, _buf, _exp in _cat:
        if _label in ("int", "None"):  # the scalar or default some of these take
            continue
        add(f"u64-user[{_u.id}]={_label}", _u.make, lambda s, b=_buf, u=_u: u.call(s, b, 4), _exp)

#@@CASES-END@@

_IDS = [c.id for c in CASES]
assert len(set(_IDS)) == len(_IDS), sorted({i for i in _IDS if _IDS.count(i) > 1})


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_hostile(case: Case) -> None:
    """The call fails with the expected exception and changes nothing."""
    run_case(case)


# ====================================================== beyond the matrix


def test_long_list_of_pairs_is_read_whole() -> None:
    """A list of pairs is converted to a temporary array inside the core;
    the view the walk reads must keep it alive (it used to point into the
    freed temporary: a segfault or garbage for long lists)."""
    rows = [[0x1000 * (2 * i + 1), 0x1000] for i in range(100_000)]
    t = SgTable.from_ranges(rows)
    assert t.dma_ranges().tolist() == rows
    assert pydmabuf._core.ranges_total(rows, "rows") == 0x1000 * len(rows)
    assert pydmabuf._core.u64_pairs(rows).tolist() == rows


def test_read_only_buffers_are_accepted() -> None:
    """The core takes const views: read-only buffers are valid input."""
    def ro(a: np.ndarray) -> np.ndarray:
        a.setflags(write=False)
        return a

    t = SgTable.from_pages(ro(np.array([1, 2, 9], dtype=np.uint64)))
    assert t.nents == 2
    assert SgTable.from_ranges(ro(np.array([[G, G]], dtype=np.uint64))).dma_nbytes == G
    r = RangeTable()
    r.insert_many(ro(np.array([0, 2 * G], dtype=np.uint64)), ro(np.array([G, G], dtype=np.uint64)))
    assert len(r) == 2
    p = IoPageTable()
    assert p.map_many(0, ro(np.array([G, 3 * G], dtype=np.uint64)), G) == 2 * G
    assert p.iova_to_phys_many(ro(np.array([0, G], dtype=np.uint64))).tolist() == [G, 3 * G]
    m = mach()
    m.device("direct0").dma_write(0x100000000, ro(np.frombuffer(b"abcd", dtype=np.uint8).copy()))
    assert m.device("direct0").dma_read(0x100000000, 4) == b"abcd"


def _plain(obj: Any) -> Any:
    """A result or state as comparable data, by content: two tables built
    alike compare equal (their raw entries hold chunk addresses)."""
    if isinstance(obj, SgTable):
        return ("SgTable", obj.nents, obj.orig_nents, obj.total_nents, obj.nchunks, obj.cpu_ranges().tolist(),
                obj.dma_ranges().tolist(), obj.mapping is None)
    if isinstance(obj, (RangeTable, pydmabuf.IovaDomain, pydmabuf.IoPageTable, Machine, pydmabuf.Device,
                        IovaState, NvmeQueue)):
        return snapshot(obj)
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, (tuple, list)):
        return tuple(_plain(o) for o in obj)
    if obj is None or isinstance(obj, (int, bytes, str)):
        return obj
    return type(obj).__name__  # a handle (batch, mapping): its effect is in the state


def _exported_view(data: np.ndarray) -> tuple[bytearray, memoryview]:
    """``data`` copied into a bytearray, and a 'Q' view of it of the same shape."""
    ba = bytearray(data.tobytes())
    return ba, memoryview(ba).cast("Q", data.shape)


#: Rounds of the thread stress per user; the attacker starts at spread
#: points of the reference call's duration.
HELD_ROUNDS = 8


@pytest.mark.parametrize("user", U64_USERS, ids=[u.id for u in U64_USERS])
def test_buffer_is_held_for_the_whole_call(user: U64User) -> None:
    """Thread stress: while the call runs, another thread keeps trying to
    release the caller's view and shrink the bytearray under it (freeing
    its storage).  The core holds the buffer for the whole call, so every
    attempt during the call fails with BufferError; one that wins before
    the call takes its hold makes the call raise ValueError (a released
    view).  A call that returns must give exactly what a call on a private
    copy gives, with the same state afterwards.  (A view whose hold was
    dropped mid-call read freed memory here: a crash or garbage.)"""
    n = 1 << 15
    ref_state = user.make()
    data = np.ascontiguousarray(user.good(ref_state, n))
    m = data.shape[0]
    t0 = time.perf_counter()
    ref = user.call(ref_state, data.copy(), m)
    span = time.perf_counter() - t0   # only paces the attacker; never asserted
    expect = (_plain(ref), _plain(ref_state.watch))
    if user.finish:
        user.finish(ref_state, ref)
    ref_state.cleanup()
    outcomes = {"returned": 0, "released-first": 0}
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)   # the attacker gets the GIL often, mid-call
    try:
        for k in range(HELD_ROUNDS):
            s = user.make()
            ba, mv = _exported_view(data)
            go, stop = threading.Event(), threading.Event()
            won: list[bool] = []

            def attack(delay: float = span * k / HELD_ROUNDS) -> None:
                go.wait(30)
                time.sleep(delay)
                while not stop.is_set():
                    try:
                        mv.release()
                    except BufferError:
                        continue   # held: the call is running
                    ba.clear()     # the storage is freed (resized to nothing)
                    won.append(True)
                    return

            before = snapshot(s.watch)
            t = threading.Thread(target=attack)
            t.start()
            try:
                go.set()
                try:
                    r = user.call(s, mv, m)
                except ValueError as e:
                    assert won and "released" in str(e), f"{user.id}: {e}"
                    outcomes["released-first"] += 1
                    assert snapshot(s.watch) == before, f"{user.id}: a refused call changed state"
                else:
                    assert (_plain(r), _plain(s.watch)) == expect, f"{user.id}: the result differs from the copy's"
                    outcomes["returned"] += 1
                    if user.finish:
                        user.finish(s, r)
                    del r
            finally:
                stop.set()
                t.join(30)
                assert not t.is_alive()
            s.cleanup()
    finally:
        sys.setswitchinterval(old_interval)
    assert sum(outcomes.values()) == HELD_ROUNDS


def test_held_view_keeps_the_buffer_exported() -> None:
    """The parsed argument holds the caller's buffer while it lives (a
    bytearray under it cannot be resized, its view cannot be released) and
    lets go when it dies; for an (N, 2) table as for a flat one."""
    for shape, parse in [((8,), pydmabuf._core.u64_array), ((4, 2), pydmabuf._core.u64_pairs)]:
        ba, mv = _exported_view(np.arange(8, dtype=np.uint64).reshape(shape))
        held = parse(mv)
        assert held.tolist() == np.arange(8, dtype=np.uint64).reshape(shape).tolist()
        with pytest.raises(BufferError):
            mv.release()
        with pytest.raises(BufferError):
            ba.clear()
        del held
        gc.collect()
        mv.release()
        ba.clear()


def test_every_core_user_is_listed() -> None:
    """Every function of the core that parses a caller's u64 buffer is
    reached by an entry of U64_USERS, so the hostile catalogues and the
    thread stress cover it; and no typed memoryview in the core is taken of
    anything but a parsed argument (Cython's own format check never sees a
    caller's buffer)."""
    import pathlib
    import re
    src = pathlib.Path(__file__).resolve().parents[1] / "src"
    pxis = sorted(src.glob("_core*.pxi")) + sorted(src.glob("_core*.pyx")) + [src / "_floors.pyx"]
    if not pxis[0].exists():
        pytest.skip("the core's source is not next to the tests")
    helpers = {"_as_u64_view", "_pairs_view", "_pages_args", "_hold_u64"}
    users: set[str] = set()
    for f in pxis:
        fn = None
        for line in f.read_text().splitlines():
            d = re.match(r"\s*(?:cpdef|def|cdef)\s+(?:[\w\[\]:,\s*]+\s+)?(\w+)\s*\(", line)
            if d and not line.lstrip().startswith("cdef class"):
                fn = d.group(1)
            if re.search(r"\b(_as_u64_view|_pairs_view|_pages_args)\(", line) and fn not in helpers:
                users.add(fn)
            # A typed u64 memoryview assigned from anything else: a raw caller object.
            t = re.match(r"\s*(?:cdef\s+)?(?:const\s+)?uint64_t\[[^\]]*\]\s+\w+\s*=\s*(.+)", line)
            if t:
                assert re.match(r"(_as_u64_view|_pairs_view|_pages_args)\(", t.group(1)), (
                    f"{f.name}: a typed view of an unparsed object: {line.strip()}")
    listed = {c for u in U64_USERS for c in u.core}
    assert users, "no users found: the scan is broken"
    assert users <= listed, f"core users of u64 buffers missing from U64_USERS: {sorted(users - listed)}"


# ------------------------------------------- re-entrant fence ops (Resv)


class ReentrantFence(Fence):
    """A fence whose ``signaled()`` op runs ``action`` (legal: the op runs
    in the thread that holds the reservation lock, so it may call back into
    the object), on its first ``times`` calls, then reports ``done``."""

    def __init__(self, ctx: int, seqno: int, action: Callable[["ReentrantFence"], Any], times: int = 1,
                 done: bool = False) -> None:
        super().__init__(ctx, seqno)
        self.action, self.times, self.done = action, times, done
        self.calls = 0

    def signaled(self) -> bool:
        self.calls += 1
        if self.calls <= self.times:
            self.action(self)
        return self.done


class _Reentry:
    """The scene of one re-entrancy case: a locked Resv holding plain
    fences, the re-entrant fence, and a source Resv for copies."""

    def __init__(self) -> None:
        self.r = Resv()
        self.src = Resv()
        self.ctx = pydmabuf.fence_context_alloc(4)
        self.plain = [Fence(self.ctx + 1, k) for k in range(1, 4)]
        self.added: list[Fence] = []     # by the op, into r
        self.outer_fence: Fence | None = None
        self.src_fences = [Fence(self.ctx + 2, 1), Fence(self.ctx + 2, 2)]
        self.src.lock()
        self.src.reserve_fences(2)
        for f in self.src_fences:
            self.src.add_fence(f, Usage.READ)
        self.src.unlock()
        self.r.lock()

    def mine(self) -> Fence:
        """The fence the call under test adds."""
        self.outer_fence = Fence(self.ctx + 3, 1000)
        return self.outer_fence

    def new(self) -> Fence:
        f = Fence(self.ctx + 3, len(self.added) + 1)
        self.added.append(f)
        return f


#: What a fence's signaled() op does to the Resv it sits in.  ``removes``:
#: the action may legitimately take fences out of the list.
_REENTER: list[tuple[str, Callable[[_Reentry, ReentrantFence], Any], bool]] = [
    ("reserve", lambda z, f: z.r.reserve_fences(64), False),                   # reallocates the list
    ("add", lambda z, f: (z.r.reserve_fences(1), z.r.add_fence(z.new(), Usage.WRITE)), False),
    ("add-many", lambda z, f: [(z.r.reserve_fences(1), z.r.add_fence(z.new(), Usage.READ)) for _ in range(9)],
     False),
    ("add-self-later", lambda z, f: (z.r.reserve_fences(1), z.r.add_fence(f, Usage.KERNEL)), False),
    ("replace", lambda z, f: z.r.replace_fences(z.ctx + 1, z.new(), Usage.READ), True),
    ("copy", lambda z, f: z.r.copy_fences(z.src), True),
    ("copy-empty", lambda z, f: z.r.copy_fences(Resv()), True),                # no list at all
    ("get", lambda z, f: z.r.get_fences(), False),
    ("iter-locked", lambda z, f: list(z.r.iter_fences()), False),
    ("signal-others", lambda z, f: [p.signal() for p in z.plain if not p.is_signaled()], True),
    ("signal-self", lambda z, f: f.signal(), True),
    ("raise", lambda z, f: (_ for _ in ()).throw(RuntimeError("op failed")), False),
    ("reserve-then-raise", lambda z, f: (z.r.reserve_fences(64), (_ for _ in ()).throw(RuntimeError("op"))),
     False),
    ("unlock", lambda z, f: z.r.unlock(), False),
]

#: The calls whose walks run the op: (id, needs the lock, call).
_REENTERED: list[tuple[str, Callable[[_Reentry], Any]]] = [
    ("reserve_fences", lambda z: z.r.reserve_fences(32)),
    ("add_fence-new-context", lambda z: (z.r.reserve_fences(1), z.r.add_fence(z.mine(), Usage.READ))),
    ("add_fence-no-room", lambda z: z.r.add_fence(Fence(z.ctx + 1, 99), Usage.BOOKKEEP)),
    ("replace_fences", lambda z: z.r.replace_fences(z.ctx + 1, Fence(z.ctx + 1, 50), Usage.READ)),
    ("copy_fences-from-self", lambda z: z.r.copy_fences(z.r)),
    ("get_fences", lambda z: z.r.get_fences()),
    ("get_singleton", lambda z: z.r.get_singleton()),
    ("test_signaled", lambda z: z.r.test_signaled()),
    ("wait-0", lambda z: z.r.wait(timeout=0)),
    ("set_deadline", lambda z: z.r.set_deadline(Usage.BOOKKEEP, 10)),
    ("iter_fences_unlocked", lambda z: list(z.r.iter_fences_unlocked())),
    ("iter_fences", lambda z: list(z.r.iter_fences())),
    ("describe", lambda z: z.r.describe()),
]


def _reentry_scene(action: Callable[[_Reentry, ReentrantFence], Any], times: int, done: bool,
                   where: int) -> tuple[_Reentry, ReentrantFence]:
    z = _Reentry()
    f = ReentrantFence(z.ctx, 1, lambda fence: action(z, fence), times=0, done=done)
    fences = list(z.plain)
    fences.insert(where, f)
    z.r.reserve_fences(len(fences))
    for x in fences:
        z.r.add_fence(x, Usage.WRITE)   # asks f's op: quiet until set up
    f.times = times
    return z, f


@pytest.mark.parametrize("times,done", [(1, False), (3, True)], ids=["once", "thrice-then-done"])
@pytest.mark.parametrize("where", [0, 3], ids=["first", "last"])
@pytest.mark.parametrize("outer", _REENTERED, ids=[o[0] for o in _REENTERED])
@pytest.mark.parametrize("inner", _REENTER, ids=[i[0] for i in _REENTER])
def test_reentrant_fence_ops(inner: tuple[str, Any, bool], outer: tuple[str, Any], where: int, times: int,
                             done: bool) -> None:
    """Every walk of the Resv's list that calls a fence op survives the op
    re-entering the object: no slot of a replaced list is read, no fence is
    lost or freed early, the counts stay coherent.  The call either
    succeeds or fails with the op's own exception or a pydmabuf error."""
    name, action, removes = inner
    z, f = _reentry_scene(action, times, done, where)
    f.times = 0
    unsignalled_before = [x for x, _ in z.r.iter_fences() if not x.is_signaled()]
    f.times, f.calls = times, 0
    ok = False
    try:
        outer[1](z)
        ok = True
    except RuntimeError as e:
        assert "op" in str(e)
    except E.DmaBufError as e:
        assert isinstance(e, (E.LockingError,)), f"{outer[0]} with a {name} op: {e!r}"
    f.times = 0           # the checks below run the op too: quietly now
    held = z.r.held_by_current_thread()
    if not held:
        z.r.lock()
    try:
        slots = list(z.r.iter_fences())
        assert all(isinstance(x, Fence) for x, _ in slots)
        assert z.r.num_fences == len(slots)
        assert z.r.num_fences <= z.r.max_fences or z.r.max_fences == 0 == z.r.num_fences
        assert [x for x in z.r.get_fences()] == [x for x, _ in slots if not x.is_signaled()]
        if not removes and outer[0] != "copy_fences-from-self":   # a copy replaces the list wholesale
            # A fence is covered by itself or by a later one of its context
            # (add_fence replaces the older; waiting for the later waits for both).
            mine = [z.outer_fence] if ok and z.outer_fence is not None else []
            lost = [x for x in unsignalled_before + z.added + mine if not x.is_signaled()
                    and not any(y.context == x.context and (y is x or y.is_later(x)) for y, _ in slots)
                    and not (outer[0] == "replace_fences" and x.context == z.ctx + 1)]
            assert not lost, f"{outer[0]} with a {name} op lost unsignalled fences: {lost}"
    finally:
        z.r.unlock()
        for x in [f] + z.plain + z.added + z.src_fences + ([z.outer_fence] if z.outer_fence else []):
            if not x.is_signaled():
                x.signal()
        assert pydmabuf._core.thread_lock_state() == _CLEAN
    del z, f, slots
    gc.collect()


def _new(cls: type) -> Any:
    return cls.__new__(cls)


#: Objects made with ``__new__`` and never initialised, and what may be
#: called on them: every call returns or raises an allowed exception, and
#: nothing crashes (several used to dereference NULL or None in C).
_UNINIT_CALLS: list[tuple[str, Callable[[], Any], Callable[[Any], Any]]] = [
    ("FenceChain.is_signaled", lambda: _new(FenceChain), lambda o: o.is_signaled()),
    ("FenceChain.iter", lambda: _new(FenceChain), lambda o: list(o)),
    ("FenceChain.walk", lambda: _new(FenceChain), lambda o: o.walk()),
    ("FenceChain.wait", lambda: _new(FenceChain), lambda o: o.wait(0)),
    ("FenceChain.enable_sw_signaling", lambda: _new(FenceChain), lambda o: o.enable_sw_signaling()),
    ("FenceChain.add_callback", lambda: _new(FenceChain), lambda o: o.add_callback(lambda f: None)),
    ("FenceChain.find_seqno", lambda: _new(FenceChain), lambda o: o.find_seqno(0)),
    ("FenceChain.set_deadline_hint", lambda: _new(FenceChain), lambda o: o.set_deadline_hint(5)),
    ("FenceChain.as-prev", lambda: _new(FenceChain), lambda o: list(FenceChain(o, Fence(1, 1), 1))),
    ("FenceChain.unwrap", lambda: _new(FenceChain), lambda o: pydmabuf.fence_unwrap(o)),
    ("FenceChain.merge", lambda: _new(FenceChain), lambda o: pydmabuf.fence_merge(o)),
    ("FenceChain.describe", lambda: _new(FenceChain), lambda o: o.describe()),
    ("FenceArray.is_signaled", lambda: _new(FenceArray), lambda o: o.is_signaled()),
    ("FenceArray.enable_sw_signaling", lambda: _new(FenceArray), lambda o: o.enable_sw_signaling()),
    ("FenceArray.len", lambda: _new(FenceArray), lambda o: len(o)),
    ("FenceArray.unwrap", lambda: _new(FenceArray), lambda o: pydmabuf.fence_unwrap(o)),
    ("Fence.signal", lambda: _new(Fence), lambda o: o.signal()),
    ("ResvIter.next", lambda: _new(pydmabuf.ResvIter), lambda o: next(o)),
    ("ResvIter._invalidate", lambda: _new(pydmabuf.ResvIter), lambda o: o._invalidate()),
    ("WwMutex.lock", lambda: _new(WwMutex), lambda o: o.lock()),
    ("WwMutex.trylock", lambda: _new(WwMutex), lambda o: o.trylock()),
    ("WwMutex.unlock", lambda: _new(WwMutex), lambda o: o.unlock()),
    ("WwMutex.repr", lambda: _new(WwMutex), lambda o: repr(o)),
    ("AcquireContext.lock_all", lambda: _new(AcquireContext), lambda o: o.lock_all([])),
    ("AcquireContext.fini", lambda: _new(AcquireContext), lambda o: o.fini()),
    ("AcquireContext.held", lambda: _new(AcquireContext), lambda o: o.held()),
    ("WwMutex.lock-uninit-ctx", lambda: WwMutex(WD), lambda o: o.lock(_new(AcquireContext))),
    ("Resv.add_fence", lambda: _new(Resv), lambda o: o.add_fence(Fence(1, 1), Usage.READ)),
    ("Resv.get_fences", lambda: _new(Resv), lambda o: o.get_fences()),
    ("Resv.lock", lambda: _new(Resv), lambda o: o.lock()),
    ("Resv.wait", lambda: _new(Resv), lambda o: o.wait(timeout=0)),
    ("WwClass.repr", lambda: _new(WwClass), lambda o: repr(o)),
    ("WwMutex-of-uninit-class", lambda: _new(WwClass), lambda o: (lambda m: (m.lock(), m.unlock()))(WwMutex(o))),
    ("FenceCallback.remove", lambda: _new(pydmabuf.FenceCallback), lambda o: Fence(1, 1).remove_callback(o)),
    ("SgTable.entries", lambda: _new(SgTable), lambda o: o.entries),
    ("SgTable.append_pages", lambda: _new(SgTable), lambda o: o.append_pages([1, 2])),
    ("RangeTable.insert", lambda: _new(RangeTable), lambda o: o.insert(0, 1)),
    ("IovaDomain.alloc", lambda: _new(IovaDomain), lambda o: o.alloc(1, 0xFFFF)),
    ("IoPageTable.map", lambda: _new(IoPageTable), lambda o: o.map(0, 0, G)),
    ("IommuDomain.map_dma", lambda: _new(IommuDomain), lambda o: o.map_dma(0, G)),
    ("_Buffer.asarray", lambda: _new(pydmabuf._core._Buffer), lambda o: np.asarray(o)),
    ("_Buffer.len", lambda: _new(pydmabuf._core._Buffer), lambda o: len(o)),
]


@pytest.mark.parametrize("make,call", [(m, c) for _, m, c in _UNINIT_CALLS], ids=[i for i, _, _ in _UNINIT_CALLS])
def test_never_initialised(make: Callable[[], Any], call: Callable[[Any], Any]) -> None:
    obj = make()
    try:
        call(obj)
    except E.DmaBufError:
        pass
    except (TypeError, ValueError, BufferError) as e:
        assert not isinstance(e, (IndexError, KeyError)), e
    finally:
        if isinstance(obj, WwMutex) and obj.held_by_current_thread():
            obj.unlock()
    assert pydmabuf._core.thread_lock_state() == _CLEAN


# ================================================================= Hypothesis

#: Integers with the interesting edges drawn often.
_EDGES = [0, 1, 4095, 4096, 4097, 2**32 - 1, 2**32, 2**52, 2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 1, 2**64,
          2**64 + 1, -1, -4096, -2**63, 2**100]
ints = st.one_of(st.sampled_from(_EDGES), st.integers(-2**66, 2**66), st.integers(0, 2**20))
anything = st.one_of(ints, st.none(), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(),
                     st.binary(max_size=16))
u64_arrays = st.one_of(
    st.lists(ints, max_size=8),
    st.binary(max_size=64).map(lambda b: np.frombuffer(b[: len(b) // 8 * 8], dtype=np.uint64)),
    st.binary(max_size=64),
    st.lists(st.integers(0, 2**64 - 1), max_size=8).map(lambda x: np.array(x, dtype=np.uint64)),
    st.lists(st.integers(-2**63, 2**63 - 1), max_size=8).map(lambda x: np.array(x, dtype=np.int64)),
    st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=8).map(lambda x: np.array(x, dtype=np.uint64)[::2]),
    st.lists(ints, min_size=2, max_size=8).map(lambda x: [x[: len(x) // 2 * 2][i:i + 2]
                                                          for i in range(0, len(x) // 2 * 2, 2)]),
    anything,
)
#: The profile's number of examples (conftest.py: 200, or 5000 "thorough").
_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _hostile_call(watch: list[Any], fn: Callable[[], Any]) -> bool:
    """Run one fuzzed call: on failure only allowed exception kinds and no
    change to the watched objects.  True when it succeeded."""
    before = snapshot(watch)
    try:
        fn()
    except E.DmaBufError as e:
        assert isinstance(e.errno, int) and e.strerror, e
    except (TypeError, ValueError, BufferError) as e:
        assert not isinstance(e, (IndexError, KeyError)), e
    else:
        return True
    assert snapshot(watch) == before, "a failed call changed state"
    return False


_RT_OPS = ["insert", "erase", "remove", "lookup", "overlapping", "find_gap", "next_after", "insert_many",
           "remove_many"]


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from(_RT_OPS), anything, anything, u64_arrays, u64_arrays), max_size=12))
def test_fuzz_rangetable(ops: list[tuple[str, Any, Any, Any, Any]]) -> None:
    t = rt().t
    for op, a, b, buf1, buf2 in ops:
        call = {
            "insert": lambda: t.insert(a, b),
            "erase": lambda: t.erase(a, b),
            "remove": lambda: t.remove(a),
            "lookup": lambda: t.lookup(a),
            "overlapping": lambda: t.overlapping(a, b),
            "find_gap": lambda: t.find_gap(a, align=b if isinstance(b, int) and b > 0 else 1),
            "next_after": lambda: t.next_after(a),
            "insert_many": lambda: t.insert_many(buf1, buf2),
            "remove_many": lambda: t.remove_many(buf1),
        }[op]
        _hostile_call([t], call)
        t.check()


def _from_ranges_entries(pairs: Any) -> int:
    """How many entries ``SgTable.from_ranges(pairs)`` would fill if the
    rows were valid (0 when they cannot be read as integer pairs).  A fuzzed
    row of 2**61 bytes is valid and needs a 16 GiB table: the fuzz is about
    argument handling, so it leaves such calls to the explicit ENOMEM cases
    instead of filling gigabytes at random (under ASan, which does not
    refuse huge allocations as glibc does, that was an OOM kill)."""
    try:
        rows = np.asarray(pairs, dtype=object).reshape(-1, 2).tolist()
    except (ValueError, TypeError):
        return 0
    seg = 0xFFFFF000
    return sum(-(-n // seg) for _, n in rows if isinstance(n, int) and 0 < n < 2**64)


@_FUZZ
@given(u64_arrays, anything, anything, anything, u64_arrays)
def test_fuzz_sgtable(pfns: Any, offset: Any, nbytes: Any, max_segment: Any, pairs: Any) -> None:
    s = sg()
    _hostile_call([s.t], lambda: SgTable.from_pages(pfns, offset if isinstance(offset, int) else 0,
                                                    nbytes if isinstance(nbytes, int) else None))
    _hostile_call([s.t], lambda: s.t.append_pages(pfns, 0, None, max_segment))
    if _from_ranges_entries(pairs) <= 1 << 20:
        _hostile_call([s.t], lambda: SgTable.from_ranges(pairs))
    _hostile_call([s.t], lambda: s.t.nents_for_len(nbytes))


_IOVA_OPS = ["alloc", "alloc_fast", "free", "free_fast", "reserve", "find", "alloc_many", "free_many"]


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from(_IOVA_OPS), ints, ints, st.integers(-1, 3), u64_arrays), max_size=12))
def test_fuzz_iova(ops: list[tuple[str, int, int, int, Any]]) -> None:
    d = iovad().d
    for op, a, b, cpu, buf1 in ops:
        small = a % 40 if a > 0 else a
        call = {
            "alloc": lambda: d.alloc(small, b),
            "alloc_fast": lambda: d.alloc_fast(small, b, cpu=cpu),
            "free": lambda: d.free(a),
            "free_fast": lambda: d.free_fast(a, small, cpu=cpu),
            "reserve": lambda: d.reserve(a, b),
            "find": lambda: d.find(a),
            "alloc_many": lambda: d.alloc_many(small, b % 5 if b > 0 else b, 0xFFFFF, cpu=cpu),
            "free_many": lambda: d.free_many(buf1, cpu=cpu),
        }[op]
        if _hostile_call([d], call):
            d.check()
    d.check()


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from(["map", "unmap", "map_many", "iova_to_phys"]), ints, ints, ints,
                          st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 20]), ints), u64_arrays), max_size=10))
def test_fuzz_pgtable(ops: list[tuple[str, int, int, int, int, Any]]) -> None:
    p = pgt().p

    def pg(x: int) -> int:  # mostly page aligned, small enough to map
        return (x & 0xFFFF_FFFF_F000) if x >= 0 and x % 3 else x

    for op, a, b, c, prot, buf1 in ops:
        call = {
            "map": lambda: p.map(pg(a), pg(b), pg(c) & 0x3FFFFF if c >= 0 else c, prot),
            "unmap": lambda: p.unmap(pg(a), pg(c)),
            "map_many": lambda: p.map_many(pg(a), buf1, G, prot),
            "iova_to_phys": lambda: p.iova_to_phys(a),
        }[op]
        if _hostile_call([p], call):
            p.check()
    p.check()


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from(["reserve", "add", "replace", "get", "wait"]), anything, anything),
                max_size=10))
def test_fuzz_resv(ops: list[tuple[str, Any, Any]]) -> None:
    s = resv_state()()
    r, f = s.r, s.fs[0]
    try:
        for op, a, b in ops:
            call = {
                "reserve": lambda: r.reserve_fences(a),
                "add": lambda: r.add_fence(f, a),
                "replace": lambda: r.replace_fences(a, f, b),
                "get": lambda: r.get_fences(a),
                "wait": lambda: r.wait(a, 0),
            }[op]
            _hostile_call([r, f], call)
    finally:
        s.cleanup()


_DEVICES = ["gpu0", "gpu1", "ext0", "legacy0", "direct0", "vfio0"]


@_FUZZ
@given(st.sampled_from(_DEVICES), ints, ints, st.one_of(st.sampled_from([0, 1, 2, 3]), anything),
       st.one_of(st.sampled_from([0, int(pydmabuf.DmaAttrs.MMIO), int(pydmabuf.DmaAttrs.SKIP_CPU_SYNC)]), anything))
def test_fuzz_dma_map_phys(name: str, phys: int, nbytes: int, direction: Any, attrs: Any) -> None:
    """dma_map_phys with random arguments: a success is undone at once; a
    failure changes nothing the machine holds."""
    m = mach()
    d = m.device(name)
    out: list[int] = []
    if _hostile_call([m, d], lambda: out.append(pydmabuf.dma_map_phys(d, phys, nbytes, direction, attrs))):
        pydmabuf.dma_unmap_phys(d, out[0], nbytes, direction, attrs)


@_FUZZ
@given(st.sampled_from(["gpu0", "gpu1", "ext0"]), st.integers(1, 64), u64_arrays, ints,
       st.one_of(st.sampled_from([0, int(pydmabuf.DmaAttrs.MMIO)]), anything))
def test_fuzz_iova_state_link(name: str, npages: int, ranges: Any, offset: int, attrs: Any) -> None:
    m = mach()
    d = m.device(name)
    st_ = IovaState.try_alloc(d, 0, npages * G)
    try:
        _hostile_call([m, d, st_], lambda: st_.link_ranges(ranges, BIDI, attrs, offset=offset))
    finally:
        if st_.linked_nbytes:
            for start, end in list(st_._linked):
                st_.unlink(start, end - start, BIDI, attrs)
        st_.free()
