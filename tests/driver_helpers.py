"""Shared by the driver tests (VFIO, iommufd, KVM): VFIO dma-bufs and
attachments that clean up after themselves, and an importer that unmaps
when told.  (The errno of a call is :func:`kernel_rc.kernel_rc`.)"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from pydmabuf import DmaDirection
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.exporters import VfioPciBar

BIDI = DmaDirection.BIDIRECTIONAL


class Polite(ImporterOps):
    """A peer-to-peer importer that unmaps everything it holds inside the
    callback (under the reservation lock) and records what it saw."""

    allow_peer2peer = True

    def __init__(self) -> None:
        self.tables: list[Any] = []
        self.calls = 0
        self.decode_seen: list[bool] = []

    def invalidate_mappings(self, a: Any) -> None:
        assert a.dmabuf.resv.held_by_current_thread()
        self.calls += 1
        dev = getattr(a.dmabuf.exporter, "device", None)
        self.decode_seen.append(bool(dev.memory_decode) if dev is not None else True)
        for t in self.tables:
            a.unmap(t, BIDI)
        self.tables.clear()

    def map(self, a: Any) -> Any:
        t = a.map_unlocked(BIDI)
        self.tables.append(t)
        return t


@contextlib.contextmanager
def vfio_export(m: Any, device: Any, **kw: Any) -> Iterator[tuple[VfioPciBar, Any]]:
    """An open VFIO device handle and one exported dma-buf; on exit the
    buffer's reference is dropped (unless already released) and the device
    closed (unless already closed)."""
    v = VfioPciBar(m, device, **kw)
    b = v.export()
    try:
        yield v, b
    finally:
        if not b.released:
            b.put()
        if v.is_open:
            v.close()


@contextlib.contextmanager
def attached(b: Any, device: Any, ops: ImporterOps) -> Iterator[Any]:
    """A dynamic attachment, unmapped (for a :class:`Polite` importer) and
    detached on exit."""
    a = b.dynamic_attach(device, ops)
    try:
        yield a
    finally:
        for t in getattr(ops, "tables", []):
            a.unmap_unlocked(t, BIDI)
        if hasattr(ops, "tables"):
            ops.tables.clear()
        b.detach(a)
