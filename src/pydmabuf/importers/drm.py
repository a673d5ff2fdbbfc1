"""A GPU importing a dma-buf the classic way: ``drm_gem_prime_import()``
of ``drivers/gpu/drm/drm_prime.c``.

A static importer: attach (no importer ops, so the exporter is never asked
to notify it and a dynamic exporter pins on the map), map once with
``dma_buf_map_attachment_unlocked(DMA_BIDIRECTIONAL)`` at import and keep
that table for the object's life, unmap, detach and drop the reference
when the GEM object is freed (``drm_prime_gem_destroy()``).  The CPU side
goes through the generic dma-buf mmap, the GPU's own DMA through the table.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from pydmabuf import _walk, errors
from pydmabuf._core import SgTable
from pydmabuf._types import DmaDirection
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf, _dma_buf_ref
from pydmabuf.machine import Device

__all__ = ["DrmGpu"]

_BIDI = DmaDirection.BIDIRECTIONAL


class DrmGpu:
    """A GEM object imported from a dma-buf on one GPU.

    Create with :meth:`prime_import`; the GPU reads and writes it with
    :meth:`read` / :meth:`write` (byte offsets in the buffer; one DMA
    access per DMA segment of the kept table), the CPU through
    :meth:`mmap`; :meth:`free` (or the context manager) lets it go.

    Attributes
    ----------
    device : Device
        The GPU.
    dmabuf : DmaBuf
        The imported buffer (``obj->import_attach->dmabuf``; a reference is
        held until :meth:`free`).
    attachment : Attachment
        ``obj->import_attach`` (static).
    table : SgTable
        The mapped table kept for the object's life (``obj->sgt``).
    """

    device: Device
    dmabuf: DmaBuf
    attachment: Attachment
    table: SgTable
    freed: bool
    _segments: np.ndarray

    def __init__(self) -> None:
        raise TypeError("use DrmGpu.prime_import(device, dmabuf)")

    @classmethod
    def prime_import(cls, device: Device, dmabuf: DmaBuf | int) -> DrmGpu:
        """``drm_gem_prime_import()``: attach ``device``, take a reference,
        map the attachment once (unlocked, bidirectional: a static
        importer's map waits for the KERNEL fences and, on a dynamic
        exporter, pins the buffer until :meth:`free`).

        ``dmabuf`` is a DmaBuf or a file descriptor (``drm_gem_prime_fd_to_
        handle()``: ``dma_buf_get`` then the import, whose reference is the
        object's).  Errors of the attach or the map propagate; nothing
        stays attached or referenced after a failure."""
        if not isinstance(device, Device):
            raise TypeError("device must be a Device")
        buf = _dma_buf_ref(dmabuf, "drm_gem_prime_import")  # the object's reference
        try:
            attach = buf.attach(device)
            try:
                table = attach.map_unlocked(_BIDI)
            except BaseException:
                buf.detach(attach)
                raise
        except BaseException:
            buf.put()
            raise
        self = object.__new__(cls)
        self.device = device
        self.dmabuf = buf
        self.attachment = attach
        self.table = table
        self.freed = False
        self._segments = table.dma_ranges()
        return self

    # ------------------------------------------------------------- access

    @property
    def size(self) -> int:
        return self.dmabuf.size

    def dma_ranges(self) -> np.ndarray:
        """The table's DMA segments, (N, 2) u64 (DMA address, nbytes)."""
        return self._segments.copy()

    def _live(self, what: str) -> None:
        if self.freed:
            raise errors.LifetimeError(f"{what} on a freed GEM object")

    def read(self, offset: int, nbytes: int) -> bytes:
        """What the GPU reads at ``[offset, +nbytes)`` of the buffer through
        its DMA mapping (EINVAL outside the buffer; IommuFault if the
        mapping does not translate)."""
        self._live("read")
        return _walk.read(self.device, self._segments, offset, nbytes, "GPU read")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """The GPU writes ``data`` at ``offset`` of the buffer."""
        self._live("write")
        _walk.write(self.device, self._segments, offset, data, "GPU write")

    def mmap(self, offset: int = 0, nbytes: int | None = None) -> CpuMapping:
        """A CPU mapping through the generic dma-buf path
        (``drm_gem_prime_mmap`` of an imported object forwards to
        ``dma_buf_mmap``): whatever the exporter allows (EINVAL without an
        mmap op, EPERM for confidential memory)."""
        self._live("mmap")
        return self.dmabuf.mmap(offset, nbytes)

    # ------------------------------------------------------------ teardown

    def free(self) -> None:
        """``drm_prime_gem_destroy()``: unmap the kept table (unlocked),
        detach, drop the reference.  Twice: LifetimeError."""
        self._live("free")
        self.freed = True
        self.attachment.unmap_unlocked(self.table, _BIDI)
        self.dmabuf.detach(self.attachment)
        self.dmabuf.put()

    def __del__(self) -> None:
        if getattr(self, "freed", True) is False:
            warnings.warn(f"{self!r} collected without free(): its mapping, attachment and reference leak",
                          ResourceWarning, stacklevel=2)

    def __enter__(self) -> DrmGpu:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.freed:
            self.free()

    def __repr__(self) -> str:
        return (f"<DrmGpu {self.device.name}: {self.dmabuf.name!r} {self.size:#x} bytes in "
                f"{len(self._segments)} DMA segment(s){' freed' if self.freed else ''}>")
