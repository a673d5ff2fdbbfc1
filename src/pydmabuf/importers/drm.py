"""A GPU importing a dma-buf the classic way: ``drm_gem_prime_import()``
of ``drivers/gpu/drm/drm_prime.c``.

A static importer: attach (no importer ops, so the exporter is never asked
to notify it and a dynamic exporter pins on the map), map once with
``dma_buf_map_attachment_unlocked(DMA_BIDIRECTIONAL)`` at import and keep
that table for the object's life, unmap, detach and drop the reference
when the GEM object is freed (``drm_prime_gem_destroy()``).  The CPU side
goes through the generic dma-buf mmap, the GPU's own DMA through the table.

:class:`DrmDynamicGpu` is the dynamic importer of amdgpu and xe
(``amdgpu_dma_buf_attach_ops`` / ``xe_dma_buf_attach_ops``): attached with
``dma_buf_dynamic_attach()`` and peer-to-peer when the device allows it,
never pinning; the exporter's ``move_notify`` marks its mapping invalid
(``amdgpu_dma_buf_move_notify()`` invalidates the VM mappings), and before
its next DMA it re-maps under the reservation lock and waits for the
buffer's KERNEL fences (the command submission syncs to them:
``amdgpu_sync_resv()``), so the DMA comes after the exporter's move copy.
``wait_kernel_fences=False`` builds the buggy importer that skips the
wait; the access gate catches its DMA into a buffer whose move is still in
flight.
"""

from __future__ import annotations


import numpy as np

from pydmabuf import _walk, errors
from pydmabuf._core import SgTable
from pydmabuf._lifecycle import Owner
from pydmabuf._types import DmaDirection, Usage
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf, ImporterOps, dma_buf_ref
from pydmabuf.machine import Device

__all__ = ["DrmGpu", "DrmDynamicGpu"]

_BIDI = DmaDirection.BIDIRECTIONAL


class DrmGpu(Owner):
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
        buf = dma_buf_ref(dmabuf, "drm_gem_prime_import")  # the object's reference
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

    def close(self) -> None:
        """:meth:`free` unless freed already (what ``with`` calls)."""
        if not self.freed:
            self.free()

    def _owns(self) -> bool:
        return not self.freed

    def _leak_message(self) -> str:
        return f"{self!r} collected without free(): its mapping, attachment and reference leak"

    def __repr__(self) -> str:
        return (f"<DrmGpu {self.device.name}: {self.dmabuf.name!r} {self.size:#x} bytes in "
                f"{len(self._segments)} DMA segment(s){' freed' if self.freed else ''}>")


class _DynamicOps(ImporterOps):
    """``amdgpu_dma_buf_attach_ops``: peer-to-peer as the device allows,
    and a move notification that invalidates the GPU's mapping."""

    def __init__(self, gpu: DrmDynamicGpu, peer2peer: bool) -> None:
        self.gpu = gpu
        self.allow_peer2peer = peer2peer

    def invalidate_mappings(self, attachment: Attachment) -> None:
        # Under the reservation lock: the mapping is dropped at the next
        # validation, not here (the GPU may be mid-job, as amdgpu's VM
        # invalidation lets in-flight work finish).
        self.gpu.invalidated = True
        self.gpu.invalidations += 1

    def __repr__(self) -> str:
        return f"<DrmDynamicGpu importer {self.gpu.device.name}{'' if self.gpu.wait_kernel_fences else ' (skips the fence wait)'}>"


class DrmDynamicGpu(Owner):
    """A GEM object a GPU imported dynamically (module docstring).

    Create with :meth:`import_buffer`; the GPU reads and writes it with
    :meth:`read` / :meth:`write`, each of which first validates the
    mapping (re-maps after an invalidation, waits for KERNEL fences);
    :meth:`free` lets it go.

    Attributes
    ----------
    device : Device
    dmabuf : DmaBuf
    attachment : Attachment
        Dynamic; ``attachment.peer2peer`` says whether it reaches VRAM
        through the BAR.
    table : SgTable or None
        The current mapping (None until the first DMA or after an
        invalidation was handled).
    wait_kernel_fences : bool
    fence_timeout : float or None
        How long a validation waits for the KERNEL fences (TimedOut,
        ETIME, and no DMA, when they do not signal in time).
    invalidations, remaps, fence_waits : int
        Move notifications received, re-maps done, validations that found
        unsignalled KERNEL fences and waited.
    """

    device: Device
    dmabuf: DmaBuf
    attachment: Attachment
    table: SgTable | None
    freed: bool
    wait_kernel_fences: bool
    fence_timeout: float | None
    invalidated: bool
    invalidations: int
    remaps: int
    fence_waits: int
    _segments: np.ndarray
    _ops: _DynamicOps

    def __init__(self) -> None:
        raise TypeError("use DrmDynamicGpu.import_buffer(device, dmabuf)")

    @classmethod
    def import_buffer(cls, device: Device, dmabuf: DmaBuf | int, *, peer2peer: bool = True,
                      wait_kernel_fences: bool = True, fence_timeout: float | None = None) -> DrmDynamicGpu:
        """``amdgpu_gem_prime_import()`` of a foreign buffer:
        ``dma_buf_dynamic_attach()`` with the importer ops (peer-to-peer if
        ``peer2peer`` and the device can), a reference; no mapping yet."""
        if not isinstance(device, Device):
            raise TypeError("device must be a Device")
        buf = dma_buf_ref(dmabuf, "amdgpu_gem_prime_import")
        self = object.__new__(cls)
        self.device = device
        self.dmabuf = buf
        self.table = None
        self.freed = False
        self.wait_kernel_fences = bool(wait_kernel_fences)
        self.fence_timeout = fence_timeout
        self.invalidated = False
        self.invalidations = 0
        self.remaps = 0
        self.fence_waits = 0
        self._segments = np.zeros((0, 2), dtype=np.uint64)
        self._ops = _DynamicOps(self, bool(peer2peer) and bool(getattr(device, "can_p2p", False)))
        try:
            self.attachment = buf.dynamic_attach(device, self._ops, self)
        except BaseException:
            self.freed = True
            buf.put()
            raise
        return self

    @property
    def size(self) -> int:
        return self.dmabuf.size

    def _live(self, what: str) -> None:
        if self.freed:
            raise errors.LifetimeError(f"{what} on a freed GEM object")

    def validate(self) -> None:
        """Make the mapping current before a DMA (``amdgpu_cs`` validation
        of an imported BO): under the reservation lock drop an invalidated
        table and map again; then, unless this importer skips it, wait for
        the KERNEL fences (the exporter's move copy).  TimedOut (ETIME)
        when they do not signal within ``fence_timeout``."""
        self._live("validate")
        resv = self.dmabuf.resv
        with resv:
            if self.table is not None and self.invalidated:
                self.attachment.unmap(self.table, _BIDI)
                self.table = None
            if self.table is None:
                self.invalidated = False
                self.table = self.attachment.map(_BIDI)
                self._segments = self.table.dma_ranges()
                self.remaps += 1
        if self.wait_kernel_fences and not resv.test_signaled(Usage.KERNEL):
            self.fence_waits += 1
            if not resv.wait(Usage.KERNEL, self.fence_timeout):
                raise errors.TimedOut(f"{self.device.name}: the KERNEL fences of {self.dmabuf.name!r} did not "
                                      f"signal within {self.fence_timeout}s; no DMA issued")

    def read(self, offset: int, nbytes: int) -> bytes:
        """Validate, then what the GPU reads at ``[offset, +nbytes)``."""
        self.validate()
        return _walk.read(self.device, self._segments, offset, nbytes, "GPU read")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Validate, then the GPU writes ``data`` at ``offset``."""
        self.validate()
        _walk.write(self.device, self._segments, offset, data, "GPU write")

    def free(self) -> None:
        """Unmap (under the lock), detach, drop the reference.  Twice:
        LifetimeError."""
        self._live("free")
        self.freed = True
        if self.table is not None:
            with self.dmabuf.resv:
                self.attachment.unmap(self.table, _BIDI)
            self.table = None
        self.dmabuf.detach(self.attachment)
        self.dmabuf.put()

    def close(self) -> None:
        """:meth:`free` unless freed already (what ``with`` calls)."""
        if not self.freed:
            self.free()

    def _owns(self) -> bool:
        return not self.freed

    def _leak_message(self) -> str:
        return f"{self!r} collected without free(): its attachment and reference leak"

    def __repr__(self) -> str:
        p2p = "p2p" if getattr(self, "attachment", None) is not None and self.attachment.peer2peer else "no p2p"
        return f"<DrmDynamicGpu {self.device.name}: {self.dmabuf.name!r} ({p2p}){' freed' if self.freed else ''}>"
