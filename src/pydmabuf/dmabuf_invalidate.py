"""How an exporter takes memory away from its importers: the
invalidation walk (``dma_buf_invalidate_mappings()``, ``move_notify``
before 7.1), the move of a dynamic exporter's backing, and the 7.1 revoke
sequence, as ``drivers/dma-buf/dma-buf.c`` and its documentation give them.

:class:`DmaBufInvalidation` holds these operations of
:class:`pydmabuf.dmabuf.DmaBuf`, which derives from it; it reads only the
fields ``struct dma_buf`` declares (:class:`~pydmabuf.dmabuf_ops.DmaBufBase`)
and the attachments below it, so nothing here imports the buffer module.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, cast

from pydmabuf import checks, errors
from pydmabuf._core import Fence, FenceArray, fence_context_alloc
from pydmabuf._types import Usage
from pydmabuf.dmabuf_attach import Attachment, attached_to
from pydmabuf.dmabuf_ops import DmaBufBase, timeout_arg

if TYPE_CHECKING:
    from pydmabuf.dmabuf import DmaBuf

__all__ = ["DmaBufInvalidation"]


@contextlib.contextmanager
def _failures_noted(failed: list[tuple[Attachment, BaseException]]) -> Iterator[None]:
    """Around the rest of a sequence that told every importer: if it fails,
    its exception goes out with a note naming the importers whose callback
    raised (they are reported only when the sequence completes)."""
    try:
        yield
    except BaseException as e:
        for a, err in failed:
            e.add_note(f"the invalidation callback of {a.importer_ops!r} on {attached_to(a)} raised "
                       f"{type(err).__name__}: {err}")
        raise




class DmaBufInvalidation(DmaBufBase):
    """The invalidation, move and revoke operations of a dma-buf (a base of
    :class:`~pydmabuf.dmabuf.DmaBuf`; documented there by inheritance)."""

    def invalidate_mappings(self) -> None:
        """``dma_buf_invalidate_mappings()`` (``dma_buf_move_notify()`` before
        7.1): called by the exporter with the reservation lock held; every
        dynamic importer with the callback is told, newest attachment first.
        Their current mappings are marked stale: DMA through them after this
        is a LifetimeError attributed to the importer.  A mapping of an
        importer with the callback goes stale when its callback returns (DMA
        already in flight while the importer stops is allowed: mappings stay
        usable until the importer drops them); mappings of attachments that
        cannot be told go stale at once.

        In the kernel the callback returns void: it cannot fail, and the
        walk always reaches every importer.  A callback that raises is a bug
        of that importer: the walk goes on to the others (the raising
        importer's mappings go stale all the same), and afterwards the
        checker reports rule ``invalidate-callback-raised`` naming it, with
        the importer's exception as the cause (strict mode raises
        :class:`~pydmabuf.errors.LifetimeError` here, once every importer
        was told; report mode records it and returns)."""
        failed = self._invalidate_all()
        self._report_failed_invalidations(failed, "dma_buf_invalidate_mappings")

    def _invalidate_all(self) -> list[tuple[Attachment, BaseException]]:
        """Tell every importer (the walk of ``dma_buf_invalidate_mappings``)
        and return the ones whose callback raised, with what they raised;
        the caller reports them with :meth:`_report_failed_invalidations`
        once its own sequence is complete."""
        if not self.resv.held_by_current_thread():
            checks.checker.locking("invalidate-without-resv",
                                   "dma_buf_invalidate_mappings without the reservation lock", self)
        with self._lock:
            targets = list(self._attachments)
            told = {a: list(a._maps) for a in targets
                    if a.importer_ops is not None and type(a.importer_ops)._callback() is not None}
            for m in self._mappings:
                if m.attachment not in told:
                    m.stale = True
            # In a method of its own: a raising callback's traceback keeps
            # this frame alive, and a CpuMapping left in one of its locals
            # would keep its buffer reference until the cycle collector ran.
            self._zap_cpu_maps()
        failed: list[tuple[Attachment, BaseException]] = []
        for a in targets:
            ops = a.importer_ops
            if ops is None:
                continue
            cb = type(ops)._callback()
            if cb is None:
                continue
            a.invalidations += 1
            try:
                cb(ops, a)
            except BaseException as e:  # noqa: BLE001 - the walk must reach every importer; reported after
                failed.append((a, e))
            finally:
                # Told is told: whatever the callback did, DMA through what
                # it held is now DMA through an invalidated mapping.
                for m in told[a]:
                    m.stale = True
        return failed

    def _zap_cpu_maps(self) -> None:
        for c in self._cpu_maps:
            c._zap()

    def _report_failed_invalidations(self, failed: list[tuple[Attachment, BaseException]], what: str) -> None:
        """Report the importers whose invalidation callback raised.

        A callback that raised something that is no ``Exception``
        (KeyboardInterrupt, SystemExit) is re-raised as it was: it is no
        importer bug to report.  Otherwise report mode records one report
        per importer; strict mode raises one LifetimeError naming them all,
        chained from the first importer's exception."""
        if not failed:
            return
        for _a, e in failed:
            if not isinstance(e, Exception):
                for a2, e2 in failed:
                    if e2 is not e:
                        e.add_note(f"the invalidation callback of {a2.importer_ops!r} on {attached_to(a2)} "
                                   f"raised {type(e2).__name__}: {e2}")
                raise e
        who = ", ".join(f"{a.importer_ops!r} on {attached_to(a)}" for a, _e in failed)
        for a, e in failed:
            msg = (f"{what} of {self.name}: the invalidation callback of {a.importer_ops!r} raised "
                   f"{type(e).__name__}: {e} (the kernel's callback cannot fail; every importer was told, "
                   f"the failing ones: {who})")
            try:
                checks.checker.lifetime("invalidate-callback-raised", msg, a, self, culprit=a.importer_ops)
            except errors.LifetimeError as err:
                raise err from e

    move_notify = invalidate_mappings

    def move(self) -> None:
        """Migrate the backing memory (the exporter's ``migrate``), with the
        reservation lock held as for ``move_notify``: refused (EBUSY) while
        an attachment is pinned; importers are invalidated first; the old
        backing is freed once the BOOKKEEP fences signal; the move itself is
        published as a signalled KERNEL fence.

        An importer whose invalidation callback raises does not stop the
        move: every importer is told, the memory moves, then the importer
        is reported (strict mode: LifetimeError, chained from what it
        raised).

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> buf = SystemHeap(Machine.default()).allocate(1 << 16, movable=True)
        >>> first = int(buf.exporter.pfns[0])
        >>> with buf.resv:
        ...     buf.move()
        >>> int(buf.exporter.pfns[0]) != first
        True
        >>> buf.put()
        """
        self._alive("move")
        if not self.resv.held_by_current_thread():
            checks.checker.locking("move-without-resv", "moving a dma-buf without its reservation lock", self)
        if not self.exporter.has("migrate"):
            raise errors.NotSupported(f"{self.exporter.name} cannot move its memory")
        pinned = [a for a in self._attachments if a.pin_count]
        if pinned:
            raise errors.Busy(f"{self.name} has {len(pinned)} pinned attachment(s) and cannot move")
        if self._vmap_count:
            # A kernel vmap is a fixed kernel address of these pages: the
            # exporters that vmap a movable buffer pin it for the vmap's
            # life (amdgpu_dma_buf_vmap, drm_gem_vram_vmap).
            raise errors.Busy(f"{self.name} is vmapped: a live vmap pins its pages, it cannot move")
        # Every importer is told even if one's callback raises; the move
        # then completes as the kernel's would, and the raising importer is
        # reported last (see invalidate_mappings).
        failed = self._invalidate_all()
        with _failures_noted(failed):
            self._migrate()
        self._report_failed_invalidations(failed, "move")

    def _migrate(self) -> None:
        """The part of :meth:`move` after the importers were told."""
        busy = self.resv.get_fences(Usage.BOOKKEEP)
        self.resv.reserve_fences(1)
        release_old = self.exporter.migrate(cast("DmaBuf", self))  # DmaBuf is the one subclass
        self._generation += 1
        f = Fence(fence_context_alloc(), 1)
        f.signal()
        self.resv.add_fence(f, Usage.KERNEL)
        if release_old is None:
            return
        if not busy:
            release_old()
            return
        gate = busy[0] if len(busy) == 1 else FenceArray(list(busy))
        try:
            gate.add_callback(lambda _f: release_old())
        except errors.NotFound:  # signalled meanwhile
            release_old()

    def revoke(self, timeout: float | None = None) -> None:
        """The permanent revoke, in the documented 7.1 sequence; call it
        without the reservation lock (it takes and drops it, as VFIO does).

        Under the lock: mark revoked (new maps fail with ENODEV), invalidate
        every importer, wait for the BOOKKEEP fences; then, unlocked, wait
        for every importer to unmap.  The kernel waits forever; the model
        raises :class:`~pydmabuf.errors.TimedOut` after ``timeout`` seconds
        (the buffer stays revoked).

        An importer whose invalidation callback raises cannot stop the
        revoke: every importer is told and the fences are waited for; then,
        after the lock is dropped and before the wait for unmaps (which the
        failing importer may never satisfy), the checker reports it (rule
        ``invalidate-callback-raised``; strict mode raises LifetimeError
        naming it, chained from what it raised; the buffer stays revoked).
        """
        if self.resv.held_by_current_thread():
            checks.checker.locking("revoke-with-resv", "revoke takes the reservation lock itself", self)
            return
        timeout_arg(timeout, "revoke")  # before anything is revoked
        self.resv.lock()
        try:
            self.revoked = True
            failed = self._invalidate_all()
            with _failures_noted(failed):
                if not self.resv.wait(Usage.BOOKKEEP, timeout=timeout):
                    raise errors.TimedOut(f"revoke of {self.name}: BOOKKEEP fences did not signal in {timeout}s")
        finally:
            self.resv.unlock()
        self._report_failed_invalidations(failed, "revoke")
        self.wait_unmapped(timeout)

    def unrevoke(self, timeout: float | None = None) -> None:
        """Allow new maps again (VFIO when memory decoding comes back):
        under the lock, invalidate once more (so dynamic importers re-map),
        wait for the BOOKKEEP fences, then clear the flag.

        The kernel waits for the fences without a bound; the model raises
        :class:`~pydmabuf.errors.TimedOut` after ``timeout`` seconds (None:
        forever) and leaves the buffer revoked.  An importer whose callback
        raises is reported once the buffer is un-revoked, as for
        :meth:`revoke`.
        """
        self.resv.lock()
        try:
            failed = self._invalidate_all()
            with _failures_noted(failed):
                if not self.resv.wait(Usage.BOOKKEEP, timeout=timeout):
                    raise errors.TimedOut(f"un-revoke of {self.name}: BOOKKEEP fences did not signal in {timeout}s")
            self.revoked = False
        finally:
            self.resv.unlock()
        self._report_failed_invalidations(failed, "un-revoke")

    def wait_unmapped(self, timeout: float | None = None) -> None:
        """Block until no importer holds a mapping of this buffer."""
        timeout_arg(timeout, "wait_unmapped")
        with self._idle:
            self._idle_waiters += 1  # an unmap notifies only while someone waits
            try:
                idle = self._idle.wait_for(lambda: not self._mappings, timeout)
            finally:
                self._idle_waiters -= 1
            if not idle:
                who = sorted({m.attachment.device.name if m.attachment.device is not None
                              else repr(m.attachment.importer_ops) for m in self._mappings})
                raise errors.TimedOut(f"{self.name}: {len(self._mappings)} mapping(s) still live after "
                                      f"{timeout}s (held by {', '.join(who)})")
