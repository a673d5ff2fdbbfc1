"""Hostile input against the drivers and the rest of the Python API: the
matrix of test_hostile.py (same :class:`~hostile_support.Case`, same
snapshots, same rules) over the VFIO exporter, private memory, iommufd,
KVM, RDMA, DRM and NVMe importers, the scenarios, the bench study and its
formatting, the ``pydmabuf`` command, the checker's modes and
``Machine.from_toml``.

Every case checks that the call raises the expected exception (a
:mod:`pydmabuf.errors` class with the kernel's errno, or TypeError /
ValueError where Python convention asks), none of the kinds that betray a
bug inside the package, and that the failed call changed nothing a caller
can observe (buffers, attachments and mappings, IOMMU domains, the VFIO
device's decode, power and dma-bufs, IOAS areas, VM slots, MR state, the
machine's pages, the fd table).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np
import pytest

import pydmabuf
from hostile_support import (BAD_U64, E, FILES, Case, Cases, S, bad_pair_buffers, errno, hostile_pair_buffers, mach,
                             run_case, snapshot)
from pydmabuf import DmaDirection, Fence, Usage, bench, checks, files, scenarios
from pydmabuf.dmabuf import ImporterOps, close
from pydmabuf.exporters import PrivateMemory, SystemHeap, VfioPciBar
from pydmabuf.exporters.vfio import IOMMUFD_MODULE, vfio_pci_dma_buf_iommufd_map, vfio_pci_hot_reset
from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, NvmeQueue, RdmaMr
from pydmabuf.importers.iommufd import (IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE,
                                        IOMMU_IOAS_MAP_WRITEABLE)
from pydmabuf.importers.kvm import KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY, KVM_MEM_VFIO_DMABUF
from pydmabuf.importers.rdma import UmemDmabuf
from pydmabuf.machine import MSI_WINDOW, Machine

G = 4096
U64 = 2**64 - 1
BIDI = DmaDirection.BIDIRECTIONAL
FIXED_RW = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
DMABUF = KVM_MEM_VFIO_DMABUF
GPA = 1 << 32

#: BAD_U64 for a u32 field: 2**64 and 2**200 do not fit either.
BAD_U32 = BAD_U64

#: Bad (N, 2) tables for the uAPI parser (``as_u64_pairs``): non-integers
#: are TypeError, entries past 2**64 - 1 EOVERFLOW, a strided u64 array is
#: copied (valid), anything that is not a table at all TypeError.
_UAPI_PAIRS = {"float64": TypeError, "object": None, "list-2**64": E.Overflow, "strided-rows": None,
               "broadcast-2**40": E.OutOfMemory, "bytes": TypeError, "memoryview-int64": ValueError,
               "int64": None}
# The parser copies any integer table (other widths, byte orders, layouts)
# and refuses records (structured buffers) as non-integers.
_UAPI_PAIRS.update({label: TypeError for label, _, _ in hostile_pair_buffers() if label.startswith(("struct-", "sg-"))})
_UAPI_PAIRS.update({"ctypes-struct": TypeError, "0-d": TypeError, "big-endian": None, "uint32": None, "fortran": None,
                    "read-only-int64": None, "memoryview-strided": None})

CASES = Cases()
add, sweep = CASES.add, CASES.sweep


def mach_state() -> S:
    m = mach()
    return S(watch=[m, FILES], m=m)


def heap(m: Machine, npages: int = 16) -> Any:
    return SystemHeap(m).allocate(npages * G, layout="fragmented", name="victim")


class Polite(ImporterOps):
    """Peer-to-peer, revocable, holds no mapping."""

    allow_peer2peer = True

    def invalidate_mappings(self, a: Any) -> None:
        pass


class IommufdNs(Polite):
    import_namespaces = frozenset({IOMMUFD_MODULE})


# ======================================================== VFIO PCI exporter


def vfio(device: str = "vfio0", *, exported: bool = True, closed: bool = False, kernel: str = "7.1",
         phys: bool = True, decode: bool = True, **kw: Any) -> Callable[[], S]:
    """An open VFIO device (16 pages of BAR0 unless told), its exported
    dma-buf, optionally closed or not decoding."""
    def make() -> S:
        m = mach()
        if "ranges" not in kw and "nbytes" not in kw:
            kw["nbytes"] = 16 * G
        v = VfioPciBar(m, device, kernel=kernel, has_dmabuf_phys=phys, **kw)
        s = S(watch=[m, v, FILES], m=m, v=v, b=None)
        s.later(lambda: v.close() if v.is_open else None)
        if exported:
            b = v.export()
            s.b = b
            s.watch = s.watch + (b,)
            s.later(lambda: None if b.released else b.put())
        if not decode:
            v.set_memory_decode(False)
        if closed:
            v.close()
        return s

    return make


_v = vfio()
add("VfioPciBar().machine=str", mach_state, lambda s: VfioPciBar("machine", "vfio0"), TypeError)
add("VfioPciBar().machine=None-device-object", mach_state, lambda s: VfioPciBar(None, s.m.device("vfio0")),
    TypeError)
add("VfioPciBar().device=int", mach_state, lambda s: VfioPciBar(s.m, 5), TypeError)
add("VfioPciBar().device=None", mach_state, lambda s: VfioPciBar(s.m, None), TypeError)
add("VfioPciBar().device=unknown", mach_state, lambda s: VfioPciBar(s.m, "nope"), E.NoDevice)
add("VfioPciBar().device=not-vfio", mach_state, lambda s: VfioPciBar(s.m, "gpu0"), E.NoDevice)
add("VfioPciBar().device=of-another-machine", mach_state, lambda s: VfioPciBar(s.m, mach().device("vfio0")),
    E.InvalidArgument)
add("VfioPciBar().kernel=5.0", mach_state, lambda s: VfioPciBar(s.m, "vfio0", kernel="5.0"), ValueError)
add("VfioPciBar().kernel=None", mach_state, lambda s: VfioPciBar(s.m, "vfio0", kernel=None), ValueError)
add("VfioPciBar().kernel=list", mach_state, lambda s: VfioPciBar(s.m, "vfio0", kernel=["7.1"]), ValueError)
add("VfioPciBar().ranges-and-offset", mach_state, lambda s: VfioPciBar(s.m, "vfio0", offset=G, ranges=[[0, G]]),
    ValueError)
add("VfioPciBar().second-open-other-kernel", vfio(), lambda s: VfioPciBar(s.m, "vfio0", kernel="6.19"),
    E.InvalidArgument)
add("VfioPciBar().second-open-other-driver", vfio(), lambda s: VfioPciBar(s.m, "vfio0", has_dmabuf_phys=False),
    E.InvalidArgument)
sweep("VfioPciBar().bar", mach_state, lambda s, v: VfioPciBar(s.m, "vfio0", bar=v), BAD_U32)
sweep("VfioPciBar().offset", mach_state, lambda s, v: VfioPciBar(s.m, "vfio0", offset=v), BAD_U64)
sweep("VfioPciBar().nbytes", mach_state, lambda s, v: VfioPciBar(s.m, "vfio0", nbytes=v), BAD_U64,
      {"None": None})
for _label, _buf, _exp in bad_pair_buffers():
    if _label == "None":
        continue  # no ranges: the offset and nbytes slice
    sweep(f"VfioPciBar().ranges[{_label}]", mach_state, lambda s, v: VfioPciBar(s.m, "vfio0", ranges=v),
          [("x", _buf, _exp)], {"x": _UAPI_PAIRS.get(_label, _exp)} if _label in _UAPI_PAIRS else None)

# -- the ioctl, in the kernel's order
_fdb = vfio(exported=False)


def _feat(s: S, region: Any = 0, flags: Any = 0, open_flags: Any = 0, ranges: Any = ((0, G),), **kw: Any) -> Any:
    return s.v.feature_dma_buf(region, flags, open_flags, ranges, **kw)


add("feature_dma_buf.no-get_dmabuf_phys", vfio(exported=False, phys=False), lambda s: _feat(s), E.NotSupported)
add("feature_dma_buf.no-get_dmabuf_phys-probe", vfio(exported=False, phys=False), lambda s: _feat(s, op="PROBE"),
    E.NotSupported)
for _label, _op, _exp in [("SET", "SET", E.InvalidArgument), ("GET|SET", "GET|SET", E.InvalidArgument),
                          ("none", 0, E.InvalidArgument), ("empty-str", "", E.InvalidArgument),
                          ("bogus", "FETCH", ValueError), ("str-1", "1", ValueError),
                          ("bit-19", 1 << 19, E.InvalidArgument), ("-1", -1, E.InvalidArgument),
                          ("2**32", 2**32, E.Overflow), ("float", 65536.0, TypeError), ("None", None, TypeError),
                          ("list", ["GET"], TypeError)]:
    add(f"feature_dma_buf.op={_label}", _fdb, lambda s, op=_op: _feat(s, op=op), _exp)
sweep("feature_dma_buf.region_index", _fdb, lambda s, v: _feat(s, region=v), BAD_U32)
sweep("feature_dma_buf.flags", _fdb, lambda s, v: _feat(s, flags=v), BAD_U32)
sweep("feature_dma_buf.open_flags", _fdb, lambda s, v: _feat(s, open_flags=v), BAD_U32)
sweep("feature_dma_buf.argsz", _fdb, lambda s, v: _feat(s, argsz=v), BAD_U64, {"None": None})
add("feature_dma_buf.argsz=15", _fdb, lambda s: _feat(s, argsz=15), E.InvalidArgument)
add("feature_dma_buf.argsz=0", _fdb, lambda s: _feat(s, argsz=0), E.InvalidArgument)
add("feature_dma_buf.flags=1", _fdb, lambda s: _feat(s, flags=1), E.InvalidArgument)
add("feature_dma_buf.no-ranges", _fdb, lambda s: _feat(s, ranges=[]), E.InvalidArgument)
add("feature_dma_buf.no-ranges-array", _fdb, lambda s: _feat(s, ranges=np.zeros((0, 2), np.uint64)),
    E.InvalidArgument)
add("feature_dma_buf.region=6-rom", _fdb, lambda s: _feat(s, region=6), E.NoDevice)
add("feature_dma_buf.region=1-absent", _fdb, lambda s: _feat(s, region=1), E.NoDevice)
add("feature_dma_buf.region=2**32-1", _fdb, lambda s: _feat(s, region=2**32 - 1), E.NoDevice)
add("feature_dma_buf.range-length-0", _fdb, lambda s: _feat(s, ranges=[[0, 0]]), E.InvalidArgument)
add("feature_dma_buf.range-offset-unaligned", _fdb, lambda s: _feat(s, ranges=[[0x800, G]]), E.InvalidArgument)
add("feature_dma_buf.range-length-unaligned", _fdb, lambda s: _feat(s, ranges=[[0, 0x1800]]), E.InvalidArgument)
add("feature_dma_buf.second-range-bad", _fdb, lambda s: _feat(s, ranges=[[0, G], [G, 1]]), E.InvalidArgument)
add("feature_dma_buf.total-past-2**64", _fdb, lambda s: _feat(s, ranges=[[0, 2**63], [0, 2**63]]),
    E.InvalidArgument)
add("feature_dma_buf.total-bit-63", _fdb, lambda s: _feat(s, ranges=[[0, 2**63]]), E.InvalidArgument)
add("feature_dma_buf.range-past-bar", _fdb, lambda s: _feat(s, ranges=[[(16 << 30) - G, 2 * G]]),
    E.InvalidArgument)
add("feature_dma_buf.range-past-small-bar", _fdb, lambda s: _feat(s, region=2, ranges=[[0, 2 << 20]]),
    E.InvalidArgument)
add("feature_dma_buf.offset-wraps", _fdb, lambda s: _feat(s, ranges=[[2**64 - G, G]]), E.Overflow)
add("feature_dma_buf.end-wraps", _fdb, lambda s: _feat(s, ranges=[[0, G], [G, 2**62], [2**63 - 2 * G, G]]),
    E.InvalidArgument)
add("feature_dma_buf.wrap-after-a-good-range", _fdb, lambda s: _feat(s, ranges=[[0, G], [2**64 - 2 * G, G]]),
    E.Overflow)
add("feature_dma_buf.closed", vfio(exported=False, closed=True), lambda s: _feat(s), E.BadHandle)
for _label, _buf, _exp in bad_pair_buffers():
    # nr_ranges is a u32: 2**40 rows are refused before any copy; int64
    # ones parse, and are not page aligned.
    _exp = {"broadcast-2**40": E.Overflow, "int64": E.InvalidArgument, "object": E.InvalidArgument}.get(
        _label, _UAPI_PAIRS.get(_label, _exp))
    if _exp is not None:
        sweep(f"feature_dma_buf.ranges[{_label}]", _fdb, lambda s, v: _feat(s, ranges=v), [("x", _buf, _exp)])
add("feature_dma_buf.ranges-2**32-rows", _fdb,
    lambda s: _feat(s, ranges=np.broadcast_to(np.array([0, G], np.uint64), (2**32, 2))), E.Overflow)

add("VfioPciBar.export.closed", vfio(exported=False, closed=True), lambda s: s.v.export(), E.BadHandle)
add("VfioPciBar.export.slice-unaligned", vfio(exported=False, offset=0x800, nbytes=G), lambda s: s.v.export(),
    E.InvalidArgument)
add("VfioPciBar.export.slice-past-bar", vfio(exported=False, offset=16 << 30, nbytes=G), lambda s: s.v.export(),
    E.InvalidArgument)
add("VfioPciBar.export.bar-absent", vfio(exported=False, bar=3), lambda s: s.v.export(), E.NoDevice)
add("VfioPciBar.export.bar-absent-empty-slice", vfio(exported=False, bar=3, nbytes=None), lambda s: s.v.export(),
    E.NoDevice)

# -- what revokes and un-revokes
_BAD_TIMEOUT = [("str", "1", TypeError), ("-1", -1, E.InvalidArgument), ("nan", float("nan"), E.InvalidArgument),
                ("bool", True, TypeError), ("list", [1], TypeError)]
for _name, _call in [("set_memory_decode-off", lambda s, t: s.v.set_memory_decode(False, timeout=t)),
                     ("set_memory_decode-on", lambda s, t: s.v.set_memory_decode(True, timeout=t)),
                     ("set_power_state-D3hot", lambda s, t: s.v.set_power_state("D3hot", timeout=t)),
                     ("set_power_state-D0", lambda s, t: s.v.set_power_state("D0", timeout=t)),
                     ("low_power_entry", lambda s, t: s.v.low_power_entry(timeout=t)),
                     ("low_power_exit", lambda s, t: s.v.low_power_exit(timeout=t)),
                     ("reset", lambda s, t: s.v.reset(timeout=t)),
                     ("close", lambda s, t: s.v.close(timeout=t)),
                     ("hot_reset", lambda s, t: vfio_pci_hot_reset([s.v], timeout=t))]:
    sweep(f"VfioPciBar.{_name}.timeout", _v, _call, _BAD_TIMEOUT)
    sweep(f"VfioPciBar.{_name}[decode-off].timeout", vfio(decode=False), _call, _BAD_TIMEOUT)
for _label, _st in [("D1", "D1"), ("d0", "d0"), ("None", None), ("int", 3), ("list", ["D0"]), ("D3cold", "D3cold")]:
    add(f"VfioPciBar.set_power_state.state={_label}", _v, lambda s, st=_st: s.v.set_power_state(st),
        E.InvalidArgument)
for _name, _call in [("set_memory_decode", lambda s: s.v.set_memory_decode(True)),
                     ("set_power_state", lambda s: s.v.set_power_state("D0")),
                     ("low_power_entry", lambda s: s.v.low_power_entry()),
                     ("low_power_exit", lambda s: s.v.low_power_exit()),
                     ("reset", lambda s: s.v.reset()),
                     ("close", lambda s: s.v.close())]:
    add(f"VfioPciBar.{_name}.after-close", vfio(closed=True), _call, E.BadHandle)


def _low_power_engaged() -> S:
    s = vfio()()
    s.v.low_power_entry()
    return s


def _no_zaps(s: S) -> Any:
    """The device's state but the zap count: a second LOW_POWER_ENTRY
    zaps (revokes nothing: all is revoked) before it fails, as the kernel."""
    snap = snapshot(s.watch)
    v = list(snap[1])
    v[8] = None
    return (snap[0], tuple(v)) + snap[2:]


add("VfioPciBar.low_power_entry.twice", _low_power_engaged, lambda s: s.v.low_power_entry(), E.InvalidArgument,
    snap=_no_zaps)

add("vfio_pci_hot_reset.None", _v, lambda s: vfio_pci_hot_reset(None), TypeError)
add("vfio_pci_hot_reset.int", _v, lambda s: vfio_pci_hot_reset(5), TypeError)
add("vfio_pci_hot_reset.names", _v, lambda s: vfio_pci_hot_reset(["vfio0"]), TypeError)
add("vfio_pci_hot_reset.bad-after-good", _v, lambda s: vfio_pci_hot_reset([s.v, None]), TypeError)


# -- the private interconnect
def _iommufd_attach(s: S, ops: ImporterOps) -> Any:
    a = s.b.dynamic_attach(s.m.device("gpu0"), ops)
    s.a = a
    s.watch = s.watch + (a,)
    s.later(lambda: s.b.detach(a))
    return a


def _attach_state(ops: Callable[[], ImporterOps], base: Callable[[], S] = _v) -> Callable[[], S]:
    def make() -> S:
        s = base()
        _iommufd_attach(s, ops())
        return s

    return make


def _heap_attach(ops: Callable[[], ImporterOps]) -> Callable[[], S]:
    def make() -> S:
        m = mach()
        b = heap(m)
        s = S(watch=[m, b, FILES], m=m, b=b)
        s.later(b.put)
        _iommufd_attach(s, ops())
        return s

    return make


def _locked(fn: Callable[[S], Any]) -> Callable[[S], Any]:
    def call(s: S) -> Any:
        with s.b.resv:
            return fn(s)

    return call


_imap = _locked(lambda s: vfio_pci_dma_buf_iommufd_map(s.a))
add("vfio_pci_dma_buf_iommufd_map.None", _v, lambda s: vfio_pci_dma_buf_iommufd_map(None), TypeError)
add("vfio_pci_dma_buf_iommufd_map.dmabuf", _v, lambda s: vfio_pci_dma_buf_iommufd_map(s.b), TypeError)
add("vfio_pci_dma_buf_iommufd_map.not-iommufd", _attach_state(Polite), _imap, E.NotPermitted)
add("vfio_pci_dma_buf_iommufd_map.not-vfio", _heap_attach(IommufdNs), _imap, E.NotSupported)
add("vfio_pci_dma_buf_iommufd_map.two-ranges", _attach_state(IommufdNs, vfio(ranges=[[0, G], [2 * G, G]])), _imap,
    E.NotSupported)
add("vfio_pci_dma_buf_iommufd_map.without-resv", _attach_state(IommufdNs),
    lambda s: vfio_pci_dma_buf_iommufd_map(s.a), E.LockingError)


def _revoked_attached() -> S:
    s = _attach_state(IommufdNs)()
    s.v.set_memory_decode(False)
    return s


add("vfio_pci_dma_buf_iommufd_map.revoked", _revoked_attached, _imap, E.Revoked)
add("VfioPciDmaBuf.attach.revoked", vfio(decode=False),
    lambda s: s.b.dynamic_attach(s.m.device("gpu0"), Polite()), E.Revoked)
add("VfioPciDmaBuf.attach.closed-device", vfio(closed=True),
    lambda s: s.b.dynamic_attach(s.m.device("gpu0"), Polite()), E.Revoked)
add("VfioPciDmaBuf.attach.static", _v, lambda s: s.b.attach(s.m.device("gpu0")), E.InvalidArgument)  # no match
# vfio_pci_dma_buf_mmap (Evans series, on 7.1): a revoked buffer is ENODEV;
# 6.19 has no mmap op (dma_buf_mmap_internal: EINVAL).
add("VfioPciDmaBuf.mmap.619", vfio("vfio1", kernel="6.19"), lambda s: s.b.mmap(), E.InvalidArgument)
add("VfioPciDmaBuf.mmap.revoked", vfio(decode=False), lambda s: s.b.mmap(), E.Revoked)
add("VfioPciDmaBuf.mmap.closed-device", vfio(closed=True), lambda s: s.b.mmap(), E.Revoked)
add("VfioPciDmaBuf.mmap.past-the-end", _v, lambda s: s.b.mmap(0, 17 * G), E.InvalidArgument)
# VFIO_DEVICE_FEATURE_DMA_BUF_MEMATTR: ENOENT for an unsupported memattr,
# EBADF for a closed device or an fd that is not open (ENODEV for another
# exporter's buffer: tests/test_vfio_exporter.py).
add("VfioPciBar.set_dma_buf_memattr.write-back", _v, lambda s: s.v.set_dma_buf_memattr(s.b, "write-back"),
    E.NotFound)
add("VfioPciBar.set_dma_buf_memattr.junk", _v, lambda s: s.v.set_dma_buf_memattr(s.b, 99), E.NotFound)
add("VfioPciBar.set_dma_buf_memattr.bad-fd", _v, lambda s: s.v.set_dma_buf_memattr(10**6, "uncached"), E.BadHandle)
add("VfioPciBar.set_dma_buf_memattr.closed-device", vfio(closed=True),
    lambda s: s.v.set_dma_buf_memattr(s.b, "uncached"), E.BadHandle)
add("VfioPciDmaBuf.vmap", _v, _locked(lambda s: s.b.vmap()), E.InvalidArgument)
add("VfioPciDmaBuf.vmap-without-resv", _v, lambda s: s.b.vmap(), E.LockingError)


# ================================================================ iommufd


def ioas(*, attached: bool = True, mapped: bool = True, closed: bool = False, decode: bool = True,
         device: str = "gpu0") -> Callable[[], S]:
    """An IOAS with gpu0 attached and 4 pages of a 16-page VFIO buffer
    mapped at 1 MiB."""
    def make() -> S:
        s = vfio()()
        io = IommufdIoas(s.m)
        s.io = io
        s.watch = s.watch + (io,)
        s.later(io.close)
        if attached:
            io.attach_device(s.m.device(device))
        if mapped:
            io.map_file(s.b, 0, 4 * G, iova=0x100000, flags=FIXED_RW)
        if not decode:
            s.v.set_memory_decode(False)
        if closed:
            io.close()
        return s

    return make


_io = ioas()
_io_empty = ioas(mapped=False)
add("IommufdIoas.attach_device.None", _io, lambda s: s.io.attach_device(None), TypeError)
add("IommufdIoas.attach_device.name", _io, lambda s: s.io.attach_device("ext0"), TypeError)
add("IommufdIoas.attach_device.direct", _io, lambda s: s.io.attach_device(s.m.device("direct0")), E.NoDevice)
add("IommufdIoas.attach_device.twice", _io, lambda s: s.io.attach_device(s.m.device("gpu0")), E.InvalidArgument)
add("IommufdIoas.attach_device.twice-new-hwpt", _io,
    lambda s: s.io.attach_device(s.m.device("gpu0"), new_hwpt=True), E.InvalidArgument)
add("IommufdIoas.attach_device.of-another-machine", _io, lambda s: s.io.attach_device(mach().device("ext0")),
    E.InvalidArgument)
add("IommufdIoas.attach_device.closed", ioas(closed=True), lambda s: s.io.attach_device(s.m.device("ext0")),
    E.BadHandle)


def _area_in(iova: int) -> Callable[[], S]:
    """No device attached, one area at ``iova``."""
    def make() -> S:
        s = ioas(attached=False, mapped=False)()
        s.io.map_file(s.b, 0, G, iova=iova, flags=FIXED_RW)
        return s

    return make


add("IommufdIoas.attach_device.area-in-msi-window", _area_in(MSI_WINDOW[0]),
    lambda s: s.io.attach_device(s.m.device("gpu0")), E.AddressInUse)
add("IommufdIoas.attach_device.area-past-aperture", _area_in(1 << 60),
    lambda s: s.io.attach_device(s.m.device("gpu0")), E.AddressInUse)
add("IommufdIoas.detach_device.not-attached", _io, lambda s: s.io.detach_device(s.m.device("ext0")), E.NotFound)
add("IommufdIoas.detach_device.None", _io, lambda s: s.io.detach_device(None), E.NotFound)
add("IommufdIoas.detach_device.name", _io, lambda s: s.io.detach_device("gpu0"), E.NotFound)
add("IommufdIoas.detach_device.list", _io, lambda s: s.io.detach_device([]), TypeError)

_mf = _io
sweep("IommufdIoas.map_file.flags", _mf, lambda s, v: s.io.map_file(s.b, 0, G, flags=v), BAD_U32)
sweep("IommufdIoas.map_file.iova", _mf, lambda s, v: s.io.map_file(s.b, 0, G, iova=v, flags=FIXED_RW), BAD_U64)
sweep("IommufdIoas.map_file.start", _mf, lambda s, v: s.io.map_file(s.b, v, G), BAD_U64)
sweep("IommufdIoas.map_file.length", _mf, lambda s, v: s.io.map_file(s.b, 0, v), BAD_U64)
for _label, _fd, _exp in [("None", None, TypeError), ("str", "3", TypeError), ("float", 3.0, TypeError),
                          ("-1", -1, E.BadHandle), ("closed", 99999, E.BadHandle), ("2**64", 2**64, E.BadHandle)]:
    add(f"IommufdIoas.map_file.fd={_label}", _mf, lambda s, fd=_fd: s.io.map_file(fd, 0, G), _exp)
add("IommufdIoas.map_file.fd=not-a-dmabuf", _mf,
    lambda s: (lambda fd: (s.later(lambda: files.close(fd)), s.io.map_file(fd, 0, G)))(files.install(object())),
    E.NotSupported, snap=lambda s: (snapshot_nofd(s)))
add("IommufdIoas.map_file.flags=unknown", _mf, lambda s: s.io.map_file(s.b, 0, G, flags=1 << 3), E.NotSupported)
add("IommufdIoas.map_file.length=U64", _mf, lambda s: s.io.map_file(s.b, 0, U64), E.Overflow)
add("IommufdIoas.map_file.iova=U64", _mf, lambda s: s.io.map_file(s.b, 0, G, iova=U64), E.Overflow)
add("IommufdIoas.map_file.not-readable-or-writeable", _mf,
    lambda s: s.io.map_file(s.b, 0, G, flags=IOMMU_IOAS_MAP_FIXED_IOVA), E.InvalidArgument)
add("IommufdIoas.map_file.length=0", _mf, lambda s: s.io.map_file(s.b, 0, 0), E.InvalidArgument)
add("IommufdIoas.map_file.start-wraps", _mf, lambda s: s.io.map_file(s.b, U64 - G + 2, G), E.Overflow)
add("IommufdIoas.map_file.past-buffer", _mf, lambda s: s.io.map_file(s.b, 15 * G, 2 * G), E.InvalidArgument)
add("IommufdIoas.map_file.start=2**63", _mf, lambda s: s.io.map_file(s.b, 2**63, G), E.InvalidArgument)
add("IommufdIoas.map_file.length-unaligned", _mf, lambda s: s.io.map_file(s.b, 0, 0x1800), E.InvalidArgument)
add("IommufdIoas.map_file.start-unaligned", _mf, lambda s: s.io.map_file(s.b, 0x800, G), E.InvalidArgument)
add("IommufdIoas.map_file.iova-unaligned", _mf, lambda s: s.io.map_file(s.b, 0, G, iova=0x800, flags=FIXED_RW),
    E.InvalidArgument)
add("IommufdIoas.map_file.iova-reserved", _mf,
    lambda s: s.io.map_file(s.b, 0, G, iova=MSI_WINDOW[0], flags=FIXED_RW), E.InvalidArgument)
add("IommufdIoas.map_file.iova-past-aperture", _mf,
    lambda s: s.io.map_file(s.b, 0, 2 * G, iova=2**64 - 4 * G, flags=FIXED_RW), E.InvalidArgument)
add("IommufdIoas.map_file.iova-wraps-no-device", ioas(attached=False),
    lambda s: s.io.map_file(s.b, 0, 2 * G, iova=2**64 - G, flags=FIXED_RW), E.Overflow)
add("IommufdIoas.map_file.iova-overlaps", _mf,
    lambda s: s.io.map_file(s.b, 0, 2 * G, iova=0x100000 - G, flags=FIXED_RW), E.AlreadyExists)
add("IommufdIoas.map_file.iova-same", _mf, lambda s: s.io.map_file(s.b, 0, G, iova=0x103000, flags=FIXED_RW),
    E.AlreadyExists)
add("IommufdIoas.map_file.revoked", ioas(decode=False), lambda s: s.io.map_file(s.b, 0, G), E.Revoked)
add("IommufdIoas.map_file.closed", ioas(closed=True), lambda s: s.io.map_file(s.b, 0, G), E.BadHandle)


def _ioas_other(buf: Callable[[S], Any]) -> Callable[[], S]:
    def make() -> S:
        s = _io()
        s.o = buf(s)
        s.watch = s.watch + (s.o,)
        s.later(lambda: None if s.o.released else s.o.put())
        return s

    return make


add("IommufdIoas.map_file.heap-buffer", _ioas_other(lambda s: heap(s.m)), lambda s: s.io.map_file(s.o, 0, G),
    E.InvalidArgument)  # SGT-only exporter: no PAL to match
add("IommufdIoas.map_file.released-buffer", _ioas_other(lambda s: (lambda b: (b.put(), b)[1])(heap(s.m))),
    lambda s: s.io.map_file(s.o, 0, G), E.LifetimeError)


def _two_range_buf(s: S) -> Any:
    v = VfioPciBar(s.m, "vfio0", ranges=[[0, G], [2 * G, G]])
    s.later(v.close)
    return v.export()


add("IommufdIoas.map_file.two-ranges-past-the-end", _ioas_other(_two_range_buf), lambda s: s.io.map_file(s.o, 0, 8 * G),
    E.InvalidArgument)

sweep("IommufdIoas.unmap.iova", _io, lambda s, v: s.io.unmap(v, G), BAD_U64)
sweep("IommufdIoas.unmap.length", _io, lambda s, v: s.io.unmap(0x100000, v), BAD_U64)
add("IommufdIoas.unmap.length=0", _io, lambda s: s.io.unmap(0x100000, 0), E.InvalidArgument)
add("IommufdIoas.unmap.iova=U64", _io, lambda s: s.io.unmap(U64, 1), E.Overflow)
add("IommufdIoas.unmap.length=U64-from-1", _io, lambda s: s.io.unmap(1, U64), E.Overflow)
add("IommufdIoas.unmap.wraps", _io, lambda s: s.io.unmap(U64 - G, 2 * G), E.Overflow)
add("IommufdIoas.unmap.cuts-head", _io, lambda s: s.io.unmap(0x100000, G), E.NotFound)
add("IommufdIoas.unmap.cuts-tail", _io, lambda s: s.io.unmap(0x103000, 2 * G), E.NotFound)
add("IommufdIoas.unmap.nothing-there", _io, lambda s: s.io.unmap(0x200000, G), E.NotFound)
add("IommufdIoas.unmap.split-cuts", _io, lambda s: s.io.unmap(0x101000, G, split=True), E.NotSupported)
add("IommufdIoas.unmap.closed", ioas(closed=True), lambda s: s.io.unmap(0x100000, 4 * G), E.BadHandle)
add("IommufdIoas.unmap.closed-all", ioas(closed=True), lambda s: s.io.unmap(0, U64), E.BadHandle)
add("IommufdIoas.unmap_all.closed", ioas(closed=True), lambda s: s.io.unmap_all(), E.BadHandle)
sweep("IommufdIoas.area_at.iova", _io, lambda s, v: s.io.area_at(v), BAD_U64)


def snapshot_nofd(s: S) -> Any:
    """The watched objects but the fd table (the case installs an fd)."""
    from hostile_support import snapshot

    return snapshot([o for o in s.watch if o is not FILES])


# =================================================================== KVM


def vm(*, private: bool = True, slot: bool = True, closed: bool = False, decode: bool = True) -> Callable[[], S]:
    """A confidential VM with one 8-page dma-buf slot at 4 GiB (slot 0)."""
    def make() -> S:
        s = vfio("vfio1", nbytes=8 * G)()
        k = KvmVm(s.m, private_mem=private)
        s.k = k
        s.watch = s.watch + (k,)
        s.later(k.close)
        if slot:
            k.set_user_memory_region2(0, DMABUF, GPA, 8 * G, guest_memfd=s.b)
        if not decode:
            s.v.set_memory_decode(False)
        if closed:
            k.close()
        return s

    return make


_vm = vm()
_vm_empty = vm(slot=False)


def _slot(s: S, slot: Any = 1, flags: Any = DMABUF, gpa: Any = 2 * GPA, size: Any = 8 * G, **kw: Any) -> Any:
    kw.setdefault("guest_memfd", s.b)
    return s.k.set_user_memory_region2(slot, flags, gpa, size, **kw)


add("KvmVm().machine=str", mach_state, lambda s: KvmVm("machine"), TypeError)
add("KvmVm().machine=None", mach_state, lambda s: KvmVm(None), TypeError)
sweep("KvmVm.set_user_memory_region2.slot", _vm, lambda s, v: _slot(s, slot=v), BAD_U32)
sweep("KvmVm.set_user_memory_region2.flags", _vm, lambda s, v: _slot(s, flags=v), BAD_U32)
sweep("KvmVm.set_user_memory_region2.guest_phys_addr", _vm, lambda s, v: _slot(s, gpa=v), BAD_U64)
sweep("KvmVm.set_user_memory_region2.memory_size", _vm, lambda s, v: _slot(s, size=v), BAD_U64)
sweep("KvmVm.set_user_memory_region2.userspace_addr", _vm, lambda s, v: _slot(s, userspace_addr=v), BAD_U64)
sweep("KvmVm.set_user_memory_region2.guest_memfd_offset", _vm, lambda s, v: _slot(s, guest_memfd_offset=v),
      BAD_U64)
for _label, _fd, _exp in [("None", None, TypeError), ("str", "3", TypeError), ("-1", -1, E.BadHandle),
                          ("closed", 99999, E.BadHandle), ("float", 3.0, TypeError)]:
    add(f"KvmVm.set_user_memory_region2.guest_memfd={_label}", _vm, lambda s, fd=_fd: _slot(s, guest_memfd=fd),
        _exp)
for _label, _kw, _exp in [
    ("slot-id-past-user", {"slot": 32764}, E.InvalidArgument),
    ("slot-id-0xffff", {"slot": 0xFFFF}, E.InvalidArgument),
    ("as-id-1", {"slot": 1 << 16}, E.InvalidArgument),
    ("as-id-0xffff", {"slot": 0xFFFF0001}, E.InvalidArgument),
    ("flags-memfd-and-dmabuf", {"flags": DMABUF | KVM_MEM_GUEST_MEMFD}, E.InvalidArgument),
    ("flags-readonly", {"flags": DMABUF | KVM_MEM_READONLY}, E.InvalidArgument),
    ("flags-dirty-log", {"flags": DMABUF | 1}, E.InvalidArgument),
    ("flags-unknown", {"flags": DMABUF | 1 << 4}, E.InvalidArgument),
    ("flags-all", {"flags": 2**32 - 1}, E.InvalidArgument),
    ("size-unaligned", {"size": 0x1800}, E.InvalidArgument),
    ("gpa-unaligned", {"gpa": 2 * GPA + 0x800}, E.InvalidArgument),
    ("uaddr-unaligned", {"userspace_addr": 0x800}, E.InvalidArgument),
    ("uaddr-past-task", {"userspace_addr": 1 << 47}, E.InvalidArgument),
    ("uaddr-2**64-page", {"userspace_addr": 2**64 - G}, E.InvalidArgument),
    ("gpa-wraps", {"gpa": 2**64 - G}, E.InvalidArgument),
    ("too-many-pages", {"size": (1 << 31) << 12}, E.InvalidArgument),
    ("size-2**64-page", {"size": 2**64 - G}, E.InvalidArgument),
    ("gpa-past-48-bits", {"gpa": 1 << 48}, E.InvalidArgument),
    ("gpa-ends-past-48-bits", {"gpa": (1 << 48) - G}, E.InvalidArgument),
    ("overlaps-slot-0", {"gpa": GPA + 4 * G}, E.AlreadyExists),
    ("overlaps-slot-0-exactly", {"gpa": GPA}, E.AlreadyExists),
    ("offset-not-0", {"guest_memfd_offset": G}, E.InvalidArgument),
    ("size-not-the-buffer", {"size": 4 * G}, E.InvalidArgument),
    ("size-bigger-than-buffer", {"size": 16 * G}, E.InvalidArgument),
    ("delete-absent", {"slot": 7, "size": 0}, E.InvalidArgument),
    ("slot-0-resize", {"slot": 0, "size": 4 * G}, E.InvalidArgument),
    ("slot-0-new-uaddr", {"slot": 0, "userspace_addr": G}, E.InvalidArgument),
    ("slot-0-lose-dmabuf", {"slot": 0, "flags": 0}, E.InvalidArgument),
    ("slot-0-become-readonly", {"slot": 0, "flags": KVM_MEM_READONLY}, E.InvalidArgument),
    ("plain-slot", {"flags": 0}, E.NotSupported),
    ("readonly-slot", {"flags": KVM_MEM_READONLY}, E.NotSupported),
]:
    add(f"KvmVm.set_user_memory_region2.{_label}", _vm, lambda s, kw=_kw: _slot(s, **kw), _exp)
add("KvmVm.set_user_memory_region2.not-confidential", vm(private=False, slot=False), lambda s: _slot(s),
    E.InvalidArgument)
add("KvmVm.set_user_memory_region2.guest_memfd-revoked", vm(slot=False, decode=False), lambda s: _slot(s),
    E.Revoked)
add("KvmVm.set_user_memory_region2.guest_memfd-not-a-dmabuf", _vm,
    lambda s: (lambda fd: (s.later(lambda: files.close(fd)), _slot(s, guest_memfd=fd)))(files.install(object())),
    E.InvalidArgument, snap=snapshot_nofd)
add("KvmVm.set_user_memory_region2.guest_memfd-released", _vm,
    lambda s: _slot(s, guest_memfd=(lambda b: (b.put(), b)[1])(heap(s.m, 8))), E.LifetimeError)
add("KvmVm.set_user_memory_region2.closed", vm(closed=True), lambda s: _slot(s), E.BadHandle)
add("KvmVm.set_user_memory_region2.closed-delete", vm(closed=True), lambda s: _slot(s, slot=0, size=0),
    E.BadHandle)

for _name, _call in [("guest_read", lambda s, g, n: s.k.guest_read(g, n)),
                     ("pre_fault_memory", lambda s, g, n: s.k.pre_fault_memory(g, n))]:
    sweep(f"KvmVm.{_name}.gpa", _vm, lambda s, v, c=_call: c(s, v, 16), BAD_U64)
    sweep(f"KvmVm.{_name}.nbytes", _vm, lambda s, v, c=_call: c(s, GPA, v), BAD_U64)
    for _label, _g, _n, _exp in [
        ("nbytes=0", GPA, 0, E.InvalidArgument),
        ("no-slot", 0, 16, E.IommuFault),
        ("no-slot-huge", 0, 2**47, E.IommuFault),
        ("no-slot-whole-space", 0, 2**48, E.IommuFault),
        ("gpa-past-48-bits", 1 << 48, 16, E.InvalidArgument),
        ("gpa-U64", U64, 2, E.InvalidArgument),
        ("ends-past-48-bits", (1 << 48) - 8, 16, E.InvalidArgument),
        ("nbytes=2**64-1", GPA, U64, E.InvalidArgument),
        ("nbytes=2**63", 0, 2**63, E.InvalidArgument),
    ]:
        add(f"KvmVm.{_name}.{_label}", _vm, lambda s, g=_g, n=_n, c=_call: c(s, g, n), _exp)
    add(f"KvmVm.{_name}.revoked", vm(decode=False), lambda s, c=_call: c(s, GPA, 16), E.IOFailure)
    add(f"KvmVm.{_name}.closed", vm(closed=True), lambda s, c=_call: c(s, GPA, 16), E.BadHandle)
sweep("KvmVm.guest_write.gpa", _vm, lambda s, v: s.k.guest_write(v, b"x"), BAD_U64)
for _label, _data, _exp in [("None", None, TypeError), ("str", "abc", TypeError), ("int", 5, TypeError),
                            ("empty", b"", E.InvalidArgument),
                            ("strided", np.zeros(8, np.uint8)[::2], TypeError)]:
    add(f"KvmVm.guest_write.data={_label}", _vm, lambda s, d=_data: s.k.guest_write(GPA, d), _exp)
add("KvmVm.guest_write.no-slot", _vm, lambda s: s.k.guest_write(0, b"x"), E.IommuFault)
add("KvmVm.guest_write.revoked", vm(decode=False), lambda s: s.k.guest_write(GPA, b"x"), E.IOFailure)
add("KvmVm.guest_write.closed", vm(closed=True), lambda s: s.k.guest_write(GPA, b"x"), E.BadHandle)
add("KvmVm.guest_write.past-48-bits", _vm, lambda s: s.k.guest_write((1 << 48) - 1, b"xy"), E.InvalidArgument)


def _vm_deleted() -> S:
    """A slot the guest had faulted in, then deleted: nothing of it may
    stay reachable."""
    s = _vm()
    s.k.guest_write(GPA, b"old")
    s.k.set_user_memory_region2(0, DMABUF, GPA, 0)
    return s


for _name, _call in [("guest_read", lambda s: s.k.guest_read(GPA, 3)),
                     ("guest_write", lambda s: s.k.guest_write(GPA, b"new")),
                     ("pre_fault_memory", lambda s: s.k.pre_fault_memory(GPA, G))]:
    add(f"KvmVm.{_name}.deleted-slot", _vm_deleted, _call, E.IommuFault)

# ============================================================= private memory

sweep("PrivateMemory.allocate.nbytes", mach_state, lambda s, v: PrivateMemory(s.m).allocate(v),
      [("str", "4096", E.InvalidArgument), ("float", 4096.0, E.InvalidArgument), ("None", None, E.InvalidArgument),
       ("bool", True, E.InvalidArgument), ("0", 0, E.InvalidArgument), ("-1", -1, E.InvalidArgument),
       ("np.int64", np.int64(G), E.InvalidArgument)])
add("PrivateMemory.allocate.nbytes=2**64", mach_state, lambda s: PrivateMemory(s.m).allocate(2**64), E.OutOfMemory)
add("PrivateMemory.allocate.nbytes=all-and-one", mach_state,
    lambda s: PrivateMemory(s.m).allocate((4 << 30) + G), E.OutOfMemory)
add("PrivateMemory.allocate.layout=bogus", mach_state, lambda s: PrivateMemory(s.m).allocate(G, layout="bogus"),
    E.InvalidArgument)
add("PrivateMemory.allocate.layout=None", mach_state, lambda s: PrivateMemory(s.m).allocate(G, layout=None),
    E.InvalidArgument)
add("PrivateMemory.allocate.seed=str", mach_state, lambda s: PrivateMemory(s.m).allocate(G, layout="scattered",
                                                                                       seed="1"), TypeError)
add("PrivateMemory.allocate.name=int", mach_state, lambda s: PrivateMemory(s.m).allocate(G, name=5), TypeError)
add("PrivateMemory.allocate.name-too-long", mach_state, lambda s: PrivateMemory(s.m).allocate(G, name="n" * 40),
    E.InvalidArgument)
add("PrivateMemory.allocate.no-private-memory", lambda: (lambda m: S(watch=[m, FILES], m=m))(Machine()),
    lambda s: PrivateMemory(s.m).allocate(G), E.OutOfMemory)
add("PrivateMemory().machine=str", mach_state, lambda s: PrivateMemory("m").allocate(G), TypeError)


def priv() -> S:
    m = mach()
    b = PrivateMemory(m).allocate(4 * G)
    s = S(watch=[m, b, FILES], m=m, b=b)
    return s.later(b.put)


add("PrivateBuffer.attach.untrusted", priv, lambda s: s.b.attach(s.m.device("gpu1")), E.NotPermitted)
add("PrivateBuffer.mmap", priv, lambda s: s.b.mmap(), E.NotPermitted)
add("PrivateBuffer.vmap", priv, _locked(lambda s: s.b.vmap()), E.NotPermitted)
add("DrmGpu.prime_import.private-untrusted", priv, lambda s: DrmGpu.prime_import(s.m.device("gpu1"), s.b),
    E.NotPermitted)


# ==================================================================== RDMA


def mr(*, exporter: str = "heap", pinned: bool = False, dereg: bool = False, revoked: bool = False,
       writable: bool = True) -> Callable[[], S]:
    """An MR of nic0 over 8 pages (from 0x10 bytes in) of a 16-page buffer."""
    def make() -> S:
        if exporter == "vfio":
            s = vfio()()
        else:
            m = mach()
            b = heap(m)
            s = S(watch=[m, b, FILES], m=m, b=b)
            s.later(b.put)
        reg = RdmaMr.register_pinned if pinned else RdmaMr.register
        r = reg(s.m.device("nic0"), s.b, 0x10, 8 * G, writable=writable)
        s.r = r
        s.watch = s.watch + (r,)
        s.later(lambda: None if r.deregistered else r.dereg())
        if revoked:
            r.revoke()
        if dereg:
            r.dereg()
        return s

    return make


_mr = mr()
_nic: Callable[[S], Any] = lambda s: s.m.device("nic0")  # noqa: E731
_buf_state = _ioas_other  # reuse: a second buffer on top of a state


def _heap_state() -> S:
    m = mach()
    b = heap(m)
    s = S(watch=[m, b, FILES], m=m, b=b)
    return s.later(b.put)


def _drained(s: S) -> Any:
    """The snapshot once the lazy IOMMU domains' flush queues have run (as
    their timer would).  For calls that fail, in the kernel's order, after
    the buffer was mapped: the undo unmaps, and a DMA-FQ domain queues the
    freed IOVA for the next flush, as the kernel's does; once flushed,
    nothing is held."""
    for g in s.m.groups.values():
        if isinstance(g.domain, pydmabuf.IommuDomain):
            g.domain.flush()
    return snapshot(s.watch)


_BAD_INT_ARG = [("str", "1", TypeError), ("float", 1.0, TypeError), ("None", None, TypeError),
                ("bool", True, TypeError), ("np.int64", np.int64(G), TypeError), ("-1", -1, E.InvalidArgument),
                ("2**64", 2**64, E.InvalidArgument), ("2**200", 2**200, E.InvalidArgument)]
for _reg_name in ("register", "register_pinned"):
    _reg = getattr(RdmaMr, _reg_name)
    sweep(f"RdmaMr.{_reg_name}.offset", _heap_state, lambda s, v, r=_reg: r(_nic(s), s.b, v, G), _BAD_INT_ARG)
    sweep(f"RdmaMr.{_reg_name}.nbytes", _heap_state, lambda s, v, r=_reg: r(_nic(s), s.b, 0, v), _BAD_INT_ARG)
    for _label, _kw, _exp in [
        ("nbytes=0", {"nbytes": 0}, E.InvalidArgument),
        ("past-buffer", {"offset": 15 * G, "nbytes": 2 * G}, E.InvalidArgument),
        ("offset-U64", {"offset": U64, "nbytes": 1}, E.InvalidArgument),
        ("sum-wraps", {"offset": 2**63, "nbytes": 2**63}, E.InvalidArgument),
        ("dmabuf=None", {"dmabuf": None}, TypeError),
        ("dmabuf=str", {"dmabuf": "3"}, TypeError),
        ("dmabuf=bool", {"dmabuf": True}, TypeError),
        ("dmabuf=-1", {"dmabuf": -1}, E.BadHandle),
        ("dmabuf=closed-fd", {"dmabuf": 99999}, E.BadHandle),
        ("dmabuf=2**64", {"dmabuf": 2**64}, E.BadHandle),
        ("kernel_version=5.0", {"kernel_version": "5.0"}, ValueError),
        ("kernel_version=None", {"kernel_version": None}, ValueError),
        ("kernel_version=list", {"kernel_version": ["7.1"]}, ValueError),
        ("iova-page-offset", {"iova": 0x20}, E.InvalidArgument),
        ("iova=-1", {"iova": -1}, E.InvalidArgument),
        ("iova=2**64", {"iova": 2**64}, E.InvalidArgument),
        ("iova=str", {"iova": "0"}, TypeError),
        ("iova=float", {"iova": 0.0}, TypeError),
        ("fence_timeout=-1", {"fence_timeout": -1}, E.InvalidArgument),
        ("fence_timeout=str", {"fence_timeout": "1"}, TypeError),
        ("device=None", {"device": None}, TypeError),
        ("device=str", {"device": "nic0"}, TypeError),
    ]:
        def _call(s: S, kw: dict[str, Any] = _kw, r: Any = _reg) -> Any:
            a = {"device": _nic(s), "dmabuf": s.b, "offset": 0, "nbytes": G, **kw}
            return r(a.pop("device"), a.pop("dmabuf"), a.pop("offset"), a.pop("nbytes"), **a)
        # mlx5 checks the IOVA's page offset once ib_umem_dmabuf_get_pinned
        # has mapped the umem.
        add(f"RdmaMr.{_reg_name}.{_label}", _heap_state, _call, _exp,
            snap=_drained if (_reg_name, _label) == ("register_pinned", "iova-page-offset") else None)
    add(f"RdmaMr.{_reg_name}.dmabuf=not-a-dmabuf", _heap_state,
        lambda s, r=_reg: (lambda fd: (s.later(lambda: files.close(fd)), r(_nic(s), fd, 0, G)))(
            files.install(object())), E.InvalidArgument, snap=snapshot_nofd)
    add(f"RdmaMr.{_reg_name}.released-buffer", _buf_state(lambda s: (lambda b: (b.put(), b)[1])(heap(s.m))),
        lambda s, r=_reg: r(_nic(s), s.o, 0, G), E.LifetimeError)
    add(f"RdmaMr.{_reg_name}.vfio-revoked", vfio(decode=False), lambda s, r=_reg: r(_nic(s), s.b, 0, G),
        E.Revoked)
add("RdmaMr.register_pinned.vfio-7.1", _v, lambda s: RdmaMr.register_pinned(_nic(s), s.b, 0, G), E.NotSupported)
# The kernel maps, then waits for the KERNEL fences (mapped first).
add("RdmaMr.register.fence-timed-out", lambda: _fenced(_heap_state()),
    lambda s: RdmaMr.register(_nic(s), s.b, 0, G, fence_timeout=0), E.TimedOut, snap=_drained)
add("RdmaMr.register_pinned.fence-timed-out", lambda: _fenced(_heap_state()),
    lambda s: RdmaMr.register_pinned(_nic(s), s.b, 0, G, fence_timeout=0), E.TimedOut, snap=_drained)
add("RdmaMr().direct", _heap_state, lambda s: RdmaMr(), TypeError)
add("UmemDmabuf().direct", _heap_state, lambda s: UmemDmabuf(), TypeError)
add("UmemDmabuf.get.ops=None-7.0", _heap_state,
    lambda s: UmemDmabuf.get(_nic(s), s.b, 0, G, None, kernel_version="7.0"), E.InvalidArgument)
add("UmemDmabuf.get.ops-without-invalidate-6.19", _heap_state,
    lambda s: UmemDmabuf.get(_nic(s), s.b, 0, G, ImporterOps(), kernel_version="6.19"), E.InvalidArgument)
add("UmemDmabuf.get.vfio-static", _v, lambda s: UmemDmabuf.get(_nic(s), s.b, 0, G, None), E.InvalidArgument)


def _fenced(s: S) -> S:
    """An unsignalled KERNEL fence on the buffer (signalled at cleanup)."""
    f = Fence(pydmabuf.fence_context_alloc(), 1)
    with s.b.resv:
        s.b.resv.reserve_fences(1)
        s.b.resv.add_fence(f, Usage.KERNEL)
    return s.later(lambda: f.is_signaled() or f.signal())


for _label, _mk in [("dynamic", _mr), ("pinned", mr(pinned=True))]:
    for _name, _call in [("read", lambda s, o, n: s.r.read(o, n)),
                         ("write", lambda s, o, n: s.r.write(o, b"x" * n if isinstance(n, int) and 0 < n < 2**20
                                                                else b""))]:
        sweep(f"RdmaMr[{_label}].{_name}.offset", _mk, lambda s, v, c=_call: c(s, v, 4),
              [("str", "1", TypeError), ("float", 1.0, TypeError), ("None", None, TypeError),
               ("-1", -1, E.IommuFault), ("2**64", 2**64, E.IommuFault)])
        for _l2, _o, _n in [("past-end", 8 * G - 2, 4), ("at-end", 8 * G, 1), ("empty", 0, 0)]:
            add(f"RdmaMr[{_label}].{_name}.{_l2}", _mk, lambda s, o=_o, n=_n, c=_call: c(s, o, n), E.IommuFault)
    sweep(f"RdmaMr[{_label}].read.nbytes", _mk, lambda s, v: s.r.read(0, v),
          [("str", "1", TypeError), ("float", 1.0, TypeError), ("None", None, TypeError),
           ("-1", -1, E.IommuFault), ("2**64", 2**64, E.IommuFault)])
    for _l2, _d, _exp in [("None", None, TypeError), ("str", "abc", TypeError), ("int", 5, TypeError),
                          ("strided", np.zeros(8, np.uint8)[::2], TypeError)]:
        add(f"RdmaMr[{_label}].write.data={_l2}", _mk, lambda s, d=_d: s.r.write(0, d), _exp)
    add(f"RdmaMr[{_label}].write.read-only", mr(pinned=_label == "pinned", writable=False),
        lambda s: s.r.write(0, b"x"), E.NotPermitted)
    for _name, _call in [("read", lambda s: s.r.read(0, 4)), ("write", lambda s: s.r.write(0, b"x")),
                         ("fault", lambda s: s.r.fault()), ("dereg", lambda s: s.r.dereg())]:
        add(f"RdmaMr[{_label}].{_name}.after-dereg", mr(pinned=_label == "pinned", dereg=True), _call,
            E.LifetimeError)
    add(f"RdmaMr[{_label}].umem.release.twice", mr(pinned=_label == "pinned", dereg=True),
        lambda s: s.r.umem.release(), E.LifetimeError)
add("RdmaMr[pinned].fault", mr(pinned=True), lambda s: s.r.fault(), E.IommuFault)
add("RdmaMr[pinned].read.revoked", mr(pinned=True, revoked=True), lambda s: s.r.read(0, 4), E.IommuFault)
add("RdmaMr[dynamic].read.revoked", mr(revoked=True), lambda s: s.r.read(0, 4), E.InvalidArgument)
add("RdmaMr[dynamic].fault.revoked", mr(revoked=True), lambda s: s.r.fault(), E.InvalidArgument)
add("RdmaMr[vfio].read.exporter-revoked", lambda: (lambda s: (s.v.set_memory_decode(False), s)[1])(mr(exporter="vfio")()),
    lambda s: s.r.read(0, 4), E.Revoked)
add("UmemDmabuf.map_pages.without-resv", _mr, lambda s: s.r.umem.map_pages(), E.LockingError)
add("UmemDmabuf.unmap_pages.without-resv", _mr, lambda s: s.r.umem.unmap_pages(), E.LockingError)
add("UmemDmabuf.map_pages.revoked", mr(revoked=True), _locked(lambda s: s.r.umem.map_pages()), E.InvalidArgument)
add("UmemDmabuf.map_pages.fence_timeout=str", mr(revoked=False),
    _locked(lambda s: s.r.umem.map_pages("1")), TypeError)


# ===================================================================== DRM


def gem(*, freed: bool = False, exporter: str = "heap") -> Callable[[], S]:
    def make() -> S:
        s = _heap_state()
        g = DrmGpu.prime_import(s.m.device("gpu0"), s.b)
        s.g = g
        s.watch = s.watch + (g,)
        s.later(lambda: None if g.freed else g.free())
        if freed:
            g.free()
        return s

    return make


_gem = gem()
for _label, _args, _exp in [("device=None", (None, "b"), TypeError), ("device=str", ("gpu0", "b"), TypeError),
                            ("dmabuf=None", ("d", None), TypeError), ("dmabuf=str", ("d", "3"), TypeError),
                            ("dmabuf=bool", ("d", True), TypeError), ("dmabuf=float", ("d", 3.0), TypeError),
                            ("dmabuf=-1", ("d", -1), E.BadHandle), ("dmabuf=closed-fd", ("d", 99999), E.BadHandle)]:
    add(f"DrmGpu.prime_import.{_label}", _heap_state,
        lambda s, a=_args: DrmGpu.prime_import(s.m.device("gpu0") if a[0] == "d" else a[0],
                                               s.b if a[1] == "b" else a[1]), _exp)
add("DrmGpu.prime_import.not-a-dmabuf", _heap_state,
    lambda s: (lambda fd: (s.later(lambda: files.close(fd)), DrmGpu.prime_import(s.m.device("gpu0"), fd)))(
        files.install(object())), E.InvalidArgument, snap=snapshot_nofd)
add("DrmGpu.prime_import.released", _buf_state(lambda s: (lambda b: (b.put(), b)[1])(heap(s.m))),
    lambda s: DrmGpu.prime_import(s.m.device("gpu0"), s.o), E.LifetimeError)
add("DrmGpu.prime_import.vfio-static", _v, lambda s: DrmGpu.prime_import(s.m.device("gpu0"), s.b),
    E.InvalidArgument)
add("DrmGpu().direct", _heap_state, lambda s: DrmGpu(), TypeError)
for _name, _call in [("read", lambda s, o, n: s.g.read(o, n)),
                     ("write", lambda s, o, n: s.g.write(o, b"x" * n if isinstance(n, int) and 0 < n < 2**20
                                                         else b""))]:
    sweep(f"DrmGpu.{_name}.offset", _gem, lambda s, v, c=_call: c(s, v, 4),
          [("str", "1", TypeError), ("float", 1.0, TypeError), ("None", None, TypeError),
           ("-1", -1, E.InvalidArgument), ("2**64", 2**64, E.InvalidArgument)])
    for _l2, _o, _n in [("past-end", 16 * G - 2, 4), ("at-end", 16 * G, 1), ("empty", 0, 0)]:
        add(f"DrmGpu.{_name}.{_l2}", _gem, lambda s, o=_o, n=_n, c=_call: c(s, o, n), E.InvalidArgument)
sweep("DrmGpu.read.nbytes", _gem, lambda s, v: s.g.read(0, v),
      [("str", "1", TypeError), ("float", 1.0, TypeError), ("None", None, TypeError),
       ("-1", -1, E.InvalidArgument), ("2**64", 2**64, E.InvalidArgument), ("2**63", 2**63, E.InvalidArgument)])
for _l2, _d, _exp in [("None", None, TypeError), ("str", "abc", TypeError), ("int", 5, TypeError),
                      ("strided", np.zeros(8, np.uint8)[::2], TypeError)]:
    add(f"DrmGpu.write.data={_l2}", _gem, lambda s, d=_d: s.g.write(0, d), _exp)
for _l2, _kw, _exp in [("offset=-1", {"offset": -1}, E.InvalidArgument), ("offset=str", {"offset": "0"}, TypeError),
                       ("nbytes=0", {"nbytes": 0}, E.InvalidArgument),
                       ("past-end", {"offset": 16 * G, "nbytes": G}, E.InvalidArgument),
                       ("nbytes=2**64", {"nbytes": 2**64}, E.InvalidArgument)]:
    add(f"DrmGpu.mmap.{_l2}", _gem, lambda s, kw=_kw: s.g.mmap(**kw), _exp)
for _name, _call in [("read", lambda s: s.g.read(0, 4)), ("write", lambda s: s.g.write(0, b"x")),
                     ("mmap", lambda s: s.g.mmap()), ("free", lambda s: s.g.free())]:
    add(f"DrmGpu.{_name}.after-free", gem(freed=True), _call, E.LifetimeError)


# ==================================================================== NVMe


def nvq(**kw: Any) -> Callable[[], S]:
    """A queue of nvme0 and one mapped 3-page request."""
    def make() -> S:
        m = mach()
        q = NvmeQueue(m.device("nvme0"), **kw)
        r = q.map([(0x200000, G), (0x300000, 2 * G)])
        s = S(watch=[m, q, r, FILES], m=m, q=q, r=r)
        return s.later(lambda: q.unmap(r) if r.live else None)

    return make


_nq = nvq()
for _label, _kw, _exp in [
    ("device=None", {"device": None}, TypeError), ("device=str", {"device": "nvme0"}, TypeError),
    ("max_segment_size=0", {"max_segment_size": 0}, E.InvalidArgument),
    ("max_segment_size=4095", {"max_segment_size": G - 1}, E.InvalidArgument),
    ("max_segment_size=2**32", {"max_segment_size": 2**32}, E.InvalidArgument),
    ("max_segment_size=-1", {"max_segment_size": -1}, E.InvalidArgument),
    ("max_segment_size=str", {"max_segment_size": "65536"}, TypeError),
    ("max_segment_size=float", {"max_segment_size": 65536.0}, TypeError),
    ("seg_boundary_mask=0x7ff", {"seg_boundary_mask": 0x7FF}, E.InvalidArgument),
    ("seg_boundary_mask=0x1fff0", {"seg_boundary_mask": 0x1FFF0}, E.InvalidArgument),
    ("seg_boundary_mask=-1", {"seg_boundary_mask": -1}, E.InvalidArgument),
    ("seg_boundary_mask=2**64", {"seg_boundary_mask": 2**64}, E.InvalidArgument),
    ("seg_boundary_mask=2**65-1", {"seg_boundary_mask": 2**65 - 1}, E.InvalidArgument),
    ("seg_boundary_mask=None", {"seg_boundary_mask": None}, TypeError),
    ("seg_boundary_mask=str", {"seg_boundary_mask": "0xfff"}, TypeError),
]:
    def _mkq(s: S, kw: dict[str, Any] = _kw) -> Any:
        a = {"device": s.m.device("nvme0"), **kw}
        return NvmeQueue(a.pop("device"), **a)
    add(f"NvmeQueue().{_label}", _nq, _mkq, _exp)

#: The queue's bvecs go to the core as its (N, 2) u64 buffers do.
for _label, _buf, _exp in bad_pair_buffers():
    for _name, _call in [("map", lambda s, b: s.q.map(b)), ("map_sg", lambda s, b: s.q.map_sg(b)),
                         ("merge", lambda s, b: s.q.merge(b))]:
        add(f"NvmeQueue.{_name}.bvecs={_label}", _nq, lambda s, b=_buf, c=_call: c(s, b), _exp)
for _label, _bv in [("empty", []), ("empty-array", np.zeros((0, 2), np.uint64)), ("zero-length", [(0x200000, 0)]),
                    ("second-zero", [(0x200000, G), (0x300000, 0)]), ("wraps", [(2**64 - G, G + 1)]),
                    ("over-uint-max", [(0, 2**32 - 1), (2**32 - 1, 1)]), ("mixed-ram-and-bar", None)]:
    for _name, _call in [("map", lambda s, b: s.q.map(b)), ("map_sg", lambda s, b: s.q.map_sg(b))]:
        if _bv is None:
            continue
        add(f"NvmeQueue.{_name}.{_label}", _nq, lambda s, b=_bv, c=_call: c(s, b), E.InvalidArgument)
add("NvmeQueue.map.mixed-ram-and-bar", _nq, lambda s: s.q.map([(0x200000, G), (0x3810000000, G)]),
    E.InvalidArgument)
add("NvmeQueue.map.unreachable-peer", _nq, lambda s: s.q.map([(0x4004000000, G)]), E.InvalidArgument)
add("NvmeQueue.map.past-iommu-output", _nq, lambda s: s.q.map([(0x200000, G), (1 << 60, G)]), E.DmaBufError)
add("NvmeQueue.map.write=None-past-output", _nq, lambda s: s.q.map([(1 << 60, G)], write=True), E.DmaBufError)
for _name, _call in [("map_pages", lambda s, p, **kw: s.q.map_pages(p, **kw)),
                     ("map_pages_sg", lambda s, p, **kw: s.q.map_pages_sg(p, **kw))]:
    for _label, _p, _kw, _exp in [
        ("empty", [], {}, E.InvalidArgument),
        ("offset=4096", [0x200], {"offset": G}, E.InvalidArgument),
        ("offset=-1", [0x200], {"offset": -1}, E.InvalidArgument),
        ("nbytes=0", [0x200], {"nbytes": 0}, E.InvalidArgument),
        ("nbytes-past-last-page", [0x200], {"nbytes": G + 1}, E.InvalidArgument),
        ("nbytes-short-of-last-page", [0x200, 0x201], {"nbytes": G}, E.InvalidArgument),
        ("pfn-beyond-52-bits", [2**52], {}, E.OutOfRange),
        ("pfns=None", None, {}, TypeError),
        ("pfns=str", "abc", {}, TypeError),
        ("pfns=float", np.ones(2), {}, ValueError),
        ("pfns=negative", [-1], {}, E.InvalidArgument),
        ("pfns=2**64", [2**64], {}, E.InvalidArgument),
    ]:
        add(f"NvmeQueue.{_name}.{_label}", _nq, lambda s, p=_p, kw=_kw, c=_call: c(s, p, **kw), _exp)


def _unmapped() -> S:
    s = _nq()
    s.q.unmap(s.r)
    return s


add("NvmeQueue.unmap.twice", _unmapped, lambda s: s.q.unmap(s.r), E.LifetimeError)
add("NvmeQueue.unmap.foreign-queue", _nq, lambda s: NvmeQueue(s.m.device("nvme0")).unmap(s.r), E.LifetimeError)
add("NvmeQueue.unmap.None", _nq, lambda s: s.q.unmap(None), TypeError)
add("NvmeQueue.unmap.table", _nq, lambda s: s.q.unmap(pydmabuf.SgTable()), TypeError)
add("NvmeQueue.unmap_sg.unmapped-table", _nq, lambda s: s.q.unmap_sg(pydmabuf.SgTable.from_pages([0x200])),
    E.LifetimeError)
add("NvmeQueue.unmap_sg.None", _nq, lambda s: s.q.unmap_sg(None), TypeError)
add("NvmeQueue.unmap_sg.mapping", _nq, lambda s: s.q.unmap_sg(s.r), TypeError)
add("NvmeMapping.read.after-unmap", _unmapped, lambda s: s.r.read(0, 4), E.LifetimeError)
add("NvmeMapping.write.after-unmap", _unmapped, lambda s: s.r.write(0, b"x"), E.LifetimeError)
add("NvmeMapping.read.past-end", _nq, lambda s: s.r.read(3 * G - 2, 4), E.InvalidArgument)
add("NvmeMapping.read.offset=str", _nq, lambda s: s.r.read("0", 4), TypeError)
add("NvmeMapping.write.data=None", _nq, lambda s: s.r.write(0, None), TypeError)


# =========================================================== scenarios

for _label, _name, _exp in [("unknown", "nope", E.NotFound), ("None", None, E.NotFound), ("int", 5, E.NotFound),
                            ("list", [], TypeError), ("empty", "", E.NotFound)]:
    add(f"scenarios.get.{_label}", mach_state, lambda s, n=_name: scenarios.get(n), _exp)
    add(f"scenarios.run.{_label}", mach_state, lambda s, n=_name: scenarios.run(n, out=None), _exp)
for _label, _out in [("int", 5), ("str", "stdout"), ("bytes-io", __import__("io").BytesIO())]:
    add(f"scenarios.run.out={_label}", mach_state, lambda s, o=_out: scenarios.run("stale-importer", out=o),
        TypeError)


# ============================================================== bench

_tiny: dict[str, Any] = {}


def tiny_result() -> dict[str, Any]:
    """One quick study of 4 contiguous pages (run once, copied per case)."""
    if not _tiny:
        _tiny.update(bench.run_study(["contiguous"], [4], quick=True, progress=False))
    return json.loads(json.dumps(_tiny))


def _study(**kw: Any) -> Any:
    a: dict[str, Any] = {"layouts": ["contiguous"], "sizes": [4], "quick": True, "progress": False,
                         "parts": ["sg_walk"], **kw}
    return bench.run_study(a.pop("layouts"), a.pop("sizes"), **a)


for _label, _kw, _exp in [
    ("layouts=bogus", {"layouts": ["bogus"]}, ValueError),
    ("layouts=None-item", {"layouts": [None]}, ValueError),
    ("layouts=None", {"layouts": None}, TypeError),
    ("layouts=str", {"layouts": "contiguous"}, ValueError),
    ("sizes=None", {"sizes": None}, TypeError),
    ("sizes=0", {"sizes": [0]}, ValueError),
    ("sizes=-1", {"sizes": [-1]}, ValueError),
    ("sizes=str", {"sizes": ["4"]}, TypeError),
    ("sizes=float", {"sizes": [4.0]}, TypeError),
    ("sizes=bool", {"sizes": [True]}, TypeError),
    ("sizes=2**40", {"sizes": [2**40]}, E.OutOfMemory),
    ("sizes=2**64", {"sizes": [2**64]}, ValueError),
    ("sizes=2**40-mapping", {"sizes": [2**40], "parts": ["mapping"]}, E.OutOfMemory),
    ("seed=-1", {"layouts": ["fragmented"], "seed": -1}, ValueError),
    ("seed=str", {"layouts": ["fragmented"], "seed": "1"}, TypeError),
    ("seed=float", {"layouts": ["fragmented"], "seed": 1.5}, TypeError),
    ("parts=bogus", {"parts": ["bogus"]}, ValueError),
    ("parts=str", {"parts": "sg_walk"}, ValueError),
    ("machine=str", {"machine": "m", "parts": ["mapping"]}, TypeError),
]:
    add(f"bench.run_study.{_label}", mach_state, lambda s, kw=_kw: _study(**kw), _exp)


def _bad_results() -> list[tuple[str, Callable[[], Any], type[BaseException]]]:
    def without(key: str) -> Callable[[], Any]:
        return lambda: {k: v for k, v in tiny_result().items() if k != key}

    def cells(fn: Callable[[list[Any]], Any]) -> Callable[[], Any]:
        def make() -> Any:
            r = tiny_result()
            r["cells"] = fn(r["cells"])
            return r
        return make

    return [
        ("None", lambda: None, TypeError),
        ("list", lambda: [], TypeError),
        ("str", lambda: "result", TypeError),
        ("empty", lambda: {}, ValueError),
        ("no-cells", without("cells"), ValueError),
        ("no-machine", without("machine"), ValueError),
        ("cells=int", cells(lambda c: 5), TypeError),
        ("cells=None", cells(lambda c: None), TypeError),
        ("cell={}", cells(lambda c: [{}]), ValueError),
        ("cell=str", cells(lambda c: ["x"]), TypeError),
        ("cell-no-counters", cells(lambda c: [{k: v for k, v in x.items() if k != "counters"} for x in c]), ValueError),
        ("cell-counters=None", cells(lambda c: [dict(x, counters=None) for x in c]), TypeError),
    ]


for _label, _mk, _exp in _bad_results():
    for _fn, _call in [("format_table", bench.format_table), ("format_markdown", bench.format_markdown),
                       ("to_csv", bench.to_csv)]:
        if _label == "no-machine" and _fn == "to_csv":
            continue  # the CSV holds only the cells
        add(f"bench.{_fn}.{_label}", mach_state, lambda s, mk=_mk, c=_call: c(mk()), _exp)
    if _label not in ("no-machine",):
        add(f"bench.compare.old={_label}", mach_state, lambda s, mk=_mk: bench.compare(mk(), tiny_result()), _exp)
        add(f"bench.compare.new={_label}", mach_state, lambda s, mk=_mk: bench.compare(tiny_result(), mk()), _exp)
add("bench.to_json.not-serialisable", mach_state, lambda s: bench.to_json({"cells": [object()]}), TypeError)


# ======================================================== Machine.from_toml


def toml_file(text: str | bytes | None, *, directory: bool = False) -> Callable[[], S]:
    def make() -> S:
        d = tempfile.mkdtemp(prefix="pydmabuf-hostile-")
        path = os.path.join(d, "machine.toml")
        if directory:
            os.mkdir(path)
        elif text is not None:
            with open(path, "wb") as f:
                f.write(text.encode() if isinstance(text, str) else text)
        s = S(watch=[FILES], path=path)
        return s.later(lambda: __import__("shutil").rmtree(d))

    return make


for _label, _mk, _call, _exp in [
    ("path-missing", toml_file(None), lambda s: Machine.from_toml(__import__("pathlib").Path(s.path)), E.NotFound),
    ("file-garbage", toml_file("[[memory]\nstart ="), lambda s: Machine.from_toml(s.path), ValueError),
    ("file-binary", toml_file(b"\xff\xfe\x00\x01"), lambda s: Machine.from_toml(s.path), ValueError),
    ("file-bad-spec", toml_file("cpu = 'amd'\n"), lambda s: Machine.from_toml(s.path), E.InvalidArgument),
    ("file-bad-memory", toml_file("[[memory]]\nstart = -1\nsize = 4096\n"), lambda s: Machine.from_toml(s.path),
     E.InvalidArgument),
    ("text-huge-int", toml_file(None), lambda s: Machine.from_toml("[[memory]]\nstart = 0\nsize = " + "9" * 30),
     E.Overflow),
    ("text-nul", toml_file(None), lambda s: Machine.from_toml("a = 1\x00"), ValueError),
    ("bytes", toml_file(None), lambda s: Machine.from_toml(b"cpu = 'amd'"), TypeError),
    ("text-unknown-key", toml_file(None), lambda s: Machine.from_toml("bogus = 1\n"), E.InvalidArgument),
    ("text-long-line", toml_file(None), lambda s: Machine.from_toml("x" * 10000), ValueError),
]:
    add(f"Machine.from_toml.{_label}", _mk, _call, _exp)
# A file that cannot be read: the class of its errno (no class for EISDIR).
add("Machine.from_toml.path-directory", toml_file(None, directory=True), lambda s: Machine.from_toml(s.path),
    E.DmaBufError, errno.EISDIR)

_IDS = [c.id for c in CASES]
assert len(set(_IDS)) == len(_IDS), sorted({i for i in _IDS if _IDS.count(i) > 1})


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_hostile_driver(case: Case) -> None:
    """The call fails with the expected exception and changes nothing."""
    run_case(case)
