"""The CPU side of a dma-buf: :class:`CpuMapping`, the generic mmap over
the exporter's physical ranges (``dma_buf_mmap()`` and the fault path of
``drivers/dma-buf/dma-buf.c``'s mmap support, as the thread proposed it).

:meth:`pydmabuf.dmabuf.DmaBuf.mmap` makes one; an exporter's ``vmap`` may
make one that runs under its user's reservation lock.  Every access goes
through the access gate (:mod:`pydmabuf.access`).  Re-exported by
:mod:`pydmabuf.dmabuf`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf import _walk, access, checks, errors
from pydmabuf._lifecycle import Owner
from pydmabuf._types import Caching
from pydmabuf.dmabuf_ops import DmaBufBase

if TYPE_CHECKING:
    from pydmabuf.dmabuf import DmaBuf

log = logging.getLogger(__name__)

__all__ = ["CpuMapping"]


class CpuMapping(Owner):
    """A CPU mapping of a dma-buf (the generic mmap over physical ranges).

    Each page is "faulted in" on first access: resolved through the
    exporter's ranges under the reservation lock and kept until the
    exporter invalidates (the mapping is zapped: the next access refaults
    and sees the new memory).  After a revoke an access raises
    :class:`~pydmabuf.errors.IOFailure` with the message SIGBUS, as the
    process would get SIGBUS.

    Every access goes through the access gate (:mod:`pydmabuf.access`)
    with the lease taken when the pages were faulted in: pages of an older
    generation (the buffer moved), of a revoked or released buffer, or of
    confidential memory are refused there (SIGBUS), whatever path the
    mapping came from.  A mapping from :meth:`DmaBuf.mmap` holds a
    reference to the buffer until :meth:`close` (or the context manager,
    or its collection).
    """

    def __init__(self, dmabuf: DmaBuf, offset: int, nbytes: int, *, takes_lock: bool = True) -> None:
        if not isinstance(dmabuf, DmaBufBase):  # DmaBuf, the one subclass
            raise TypeError(f"CpuMapping: dmabuf must be a DmaBuf, not {type(dmabuf).__name__}")
        self.dmabuf: DmaBuf = dmabuf
        self.offset: int = offset
        self.nbytes: int = nbytes
        self.takes_lock: bool = takes_lock  # False for a vmap (its user holds the lock)
        self._ranges: np.ndarray | None = None
        self._ends: np.ndarray | None = None  # cumulative lengths of _ranges
        self._lease: access.Lease | None = None  # the generation _ranges belong to
        self._holds_ref: bool = False  # set by DmaBuf.mmap: the vma's file reference
        self._inflight: int = 0  # accesses copying now (under dmabuf._lock)
        self.closed: bool = False
        self.faults: int = 0
        self.zaps: int = 0
        #: The memory type of the mapping's PTEs: write-back for system
        #: memory; the exporter's ``mmap`` op sets it for device memory
        #: (VFIO: uncached, or write-combine on request).
        self.caching: Caching = Caching.WRITE_BACK
        self.created_at: str = checks.created_at()
        # The subject is the buffer, not the mapping: no reference cycle, so
        # a dropped mapping goes (and puts its reference) at once.
        self._gate: access.Accessor = access.Accessor(access.CPU, f"CPU mapping of {dmabuf.name!r}",
                                     getattr(dmabuf.exporter, "machine", None), dmabuf, _sigbus, _host_untrusted)

    def _zap(self) -> None:
        if self._ranges is not None:
            self.zaps += 1
        self._ranges = None
        self._ends = None
        self._lease = None

    def close(self) -> None:
        """``munmap``: the mapping goes, and with it its reference to the
        buffer (which is released if that was the last).  Accesses after
        it raise SIGBUS; closing twice is a no-op.

        Takes no reservation lock (``munmap`` takes none: it may run in a
        thread that holds other buffers' locks, or from the garbage
        collector): an access still copying holds the mapping busy, and
        the last such access drops the reference instead, so the pages are
        never freed under a copy."""
        buf = self.dmabuf
        with buf._lock:
            if self.closed:
                return
            self.closed = True
            self._zap()
            buf._cpu_maps.discard(self)
            ref = self._drop_ref_locked()
        if ref:
            buf.put()

    def _drop_ref_locked(self) -> bool:
        """With ``dmabuf._lock`` held: give up the file reference once the
        mapping is closed and no access is copying; True if the caller
        must put it."""
        if not (self.closed and self._holds_ref and self._inflight == 0):
            return False
        self._holds_ref = False
        self.dmabuf._mmap_refs -= 1
        return True

    munmap = close

    def _owns(self) -> bool:
        return not self.closed

    def __del__(self) -> None:
        # Not the lifecycle's warning: a collected mapping is an unmapped
        # one (the process's vma went), so its file reference goes, quietly
        # -- nothing leaked.
        if getattr(self, "_holds_ref", False):
            try:
                self.close()
            except errors.DmaBufError as e:
                log.warning("closing a collected CPU mapping of %s: %s", self.dmabuf.name, e)

    def _resolve(self) -> np.ndarray:
        """The ranges, faulting them in if zapped; the reservation lock is
        held (by :meth:`_access`, or by a vmap's user)."""
        if self._ranges is not None:
            return self._ranges
        buf = self.dmabuf
        if self.closed:
            raise errors.IOFailure(f"SIGBUS: the CPU mapping of {buf.name} was closed")
        if self._gate.machine is None:
            raise errors.IOFailure(f"SIGBUS: {buf.exporter.name} has no machine whose memory the mapping reaches")
        if buf.revoked or buf.released:
            raise errors.IOFailure(f"SIGBUS: {buf.name} was revoked; its CPU mapping is gone")
        lease = access.Lease(buf, f"the CPU mapping [{self.offset:#x}, +{self.nbytes:#x}]")
        pv = buf.exporter.get_phys_vec(None)
        self.faults += 1
        self._ranges = np.asarray(pv.ranges, dtype=np.uint64).reshape(-1, 2)
        self._ends = _walk.ends_of(self._ranges)  # kept with the ranges: each access searches it
        self._lease = lease
        return self._ranges

    def _access(self, off: int, data: memoryview | None, n: int) -> Any:
        """One CPU access, atomic against the exporter: under the
        reservation lock a move or revoke cannot zap the mapping and free
        the pages between the translation and the copy (on a CPU the zap
        and its TLB shootdown order the two the same way).  A thread that
        already holds the lock may use a mapping that is faulted in; a
        fault would take the lock again, a deadlock in the kernel, and is
        refused."""
        buf = self.dmabuf
        take = self.takes_lock and not buf.resv.held_by_current_thread()
        if self.takes_lock and not take and self._ranges is None:
            checks.checker.locking("cpu-fault-under-resv", "a CPU access faults on a dma-buf mapping while this "
                                   "thread holds its reservation lock (the fault handler would deadlock)", self)
        if take:
            buf.resv.lock()
        ref = False
        try:
            with buf._lock:
                if self.closed:
                    raise errors.IOFailure(f"SIGBUS: the CPU mapping of {buf.name} was closed")
                self._inflight += 1
            try:
                runs = self._runs(off, n)
                if n == 0:
                    return b"" if data is None else None
                lease = self._lease
                return access.access(self._gate, self.offset + off, n, lambda: runs, data=data,
                                     leases=() if lease is None else (lease,))
            finally:
                with buf._lock:
                    self._inflight -= 1
                    ref = self._drop_ref_locked()
        finally:
            if take:
                buf.resv.unlock()
            if ref:  # closed while this access copied: its reference goes now
                buf.put()

    def _runs(self, off: int, n: int) -> list[tuple[int, int]]:
        if not isinstance(off, int) or not isinstance(n, int):
            raise TypeError("CpuMapping: offset and length must be ints")
        if off < 0 or n < 0 or off + n > self.nbytes:
            raise errors.IOFailure(f"SIGBUS: access [{off:#x}, +{n:#x}) beyond the {self.nbytes:#x}-byte mapping")
        rows = self._resolve()
        if n == 0:
            return []
        pos = self.offset + off
        assert self._ends is not None  # set with the ranges
        total = int(self._ends[-1]) if len(self._ends) else 0
        if pos + n > total:  # the exporter's ranges stop short of the mapping: no page to fault in
            raise errors.IOFailure(f"SIGBUS: access [{off:#x}, +{n:#x}) beyond the {total:#x} bytes "
                                   f"{self.dmabuf.name} resolves to")
        return _walk.runs(rows, pos, n, "CPU access", self._ends)

    def read(self, off: int, nbytes: int) -> bytes:
        """Read ``nbytes`` at ``off`` of the mapping (IOFailure "SIGBUS"
        outside it, once revoked or closed, or on pages the gate refuses)."""
        return bytes(self._access(off, None, nbytes))

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``off`` of the mapping."""
        buf = memoryview(data).cast("B")
        self._access(off, buf, len(buf))

    def __repr__(self) -> str:
        return (f"<CpuMapping {self.dmabuf.name!r} [{self.offset:#x}, +{self.nbytes:#x}] {self.caching} "
                f"faults={self.faults} "
                f"zaps={self.zaps}{' closed' if self.closed else ''}>")


def _sigbus(addr: int, reason: str) -> errors.DmaBufError:
    """The CPU's refusal: the process would get SIGBUS (EIO here)."""
    return errors.IOFailure(f"SIGBUS: CPU access at buffer offset {addr:#x}: {reason}")


def _host_untrusted() -> bool:
    """The host CPU never reaches confidential memory."""
    return False

