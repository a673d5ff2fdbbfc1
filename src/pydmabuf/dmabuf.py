"""dma-buf: exporters, buffers, attachments, invalidation, revoke, and the
physical-range interface.

The object model of ``drivers/dma-buf/dma-buf.c`` as it is upstream now
(no cached mappings, pin-on-map for static importers of dynamic exporters,
the reservation lock around every map), the 7.1 changes (the
``invalidate_mappings`` name, the optional callback,
:func:`attach_revocable` and the documented revoke sequence), and what the
thread asked for: exporters that describe their memory as physical ranges
for importers that declared the capability, and a generic CPU mmap on top
of the ranges.

This module holds the buffer (:class:`DmaBuf`: export, references,
attach and detach, the CPU entry points) and the functions of the API; the
rest of ``dma-buf.c`` lives in :mod:`pydmabuf.dmabuf_invalidate`
(invalidation, move, revoke: a base of :class:`DmaBuf`),
:mod:`pydmabuf.dmabuf_attach` (attachments and their mappings) and
:mod:`pydmabuf.dmabuf_mmap` (the CPU mapping), the declarations of
``include/linux/dma-buf.h`` in :mod:`pydmabuf.dmabuf_ops`.  Every name in
``__all__`` is importable from here.  :func:`dma_buf_ref` and
:func:`~pydmabuf.dmabuf_ops.timeout_arg` are the helpers the importers and
exporters share (a contract of the layer, outside ``__all__``).

An exporter subclasses :class:`Exporter` and overrides the ops it has;
:func:`export` checks them as ``dma_buf_export()`` does.  An importer calls
:meth:`DmaBuf.attach` (static) or :meth:`DmaBuf.dynamic_attach` with an
:class:`ImporterOps`; maps and unmaps with the reservation lock held
(:meth:`Attachment.map`), or with the ``_unlocked`` variants.

Broken rules go to :mod:`pydmabuf.checks` (strict mode raises).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterable

from pydmabuf import _dmabuf_api, checks, errors, files, mapping
from pydmabuf._core import Resv
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SIZE, DmaDirection, Usage, _fmt_size
from pydmabuf.dmabuf_attach import PHYS_NAMESPACE, Attachment, attach_revocable
from pydmabuf.dmabuf_invalidate import DmaBufInvalidation
from pydmabuf.dmabuf_mmap import CpuMapping
from pydmabuf.dmabuf_ops import DMA_BUF_NAME_LEN, Exporter, ImporterOps, PhysVec, check_name
from pydmabuf.machine import Device

__all__ = [
    "Exporter",
    "ImporterOps",
    "DmaBuf",
    "Attachment",
    "PhysVec",
    "CpuMapping",
    "export",
    "dma_buf_get",
    "close",
    "attach_revocable",
    "PHYS_NAMESPACE",
    "DMA_BUF_NAME_LEN",
]


class DmaBuf(DmaBufInvalidation, Owner):
    """``struct dma_buf``: a fixed-size, refcounted buffer shared by
    reference; one reservation object (``resv``) orders its state changes.

    Create one with :func:`export`.  References: :meth:`get` / :meth:`put`
    (the exporter's ``release`` runs once, when the last goes); pass it
    around as a file descriptor with :meth:`fd` / :func:`dma_buf_get`.
    """

    def __init__(self) -> None:
        raise TypeError("use pydmabuf.export(exporter, nbytes)")

    @classmethod
    def _new(cls, exporter: Exporter, nbytes: int, resv: Resv | None, name: str | None) -> DmaBuf:
        self = object.__new__(cls)
        self.exporter = exporter
        self.size = nbytes
        self.resv = resv if resv is not None else Resv()
        self._own_resv = resv is None
        self._name = ""
        self._refs = 1
        self._released = False
        self._lock = threading.RLock()
        self._attachments = []
        self._mappings = set()
        self._idle = threading.Condition(self._lock)
        self._idle_waiters = 0  # threads in wait_unmapped (under _lock)
        self._vmap_count = 0
        self._vmap_ptr = None
        self._cpu_maps = weakref.WeakSet()
        self._generation = 0
        self._mmap_refs = 0
        self.revoked = False
        self.created_at = checks.created_at()
        if name is not None:
            self.set_name(name)
        return self

    # ------------------------------------------------------------ references

    def get(self) -> DmaBuf:
        """``get_dma_buf()``: a new reference (returns self)."""
        with self._lock:
            self._alive("get")
            self._refs += 1
        return self

    def put(self) -> None:
        """``dma_buf_put()``: drop a reference; the last runs ``release``.
        A put after the last is a LifetimeError.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> buf = SystemHeap(Machine.default()).allocate(1 << 16)
        >>> buf.get().refcount
        2
        >>> buf.put(); buf.put()
        >>> buf.released
        True
        """
        with self._lock:
            if self._released or self._refs <= 0:
                checks.checker.lifetime("put-after-release", "dma_buf_put on a released dma-buf", self)
                return
            if self._refs == 1:
                # Checked before the reference goes: in strict mode the
                # violation raises and the buffer stays as it was.
                self._check_users()
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._release()

    def _check_users(self) -> None:
        problems = self._users()
        if problems:
            checks.checker.lifetime("release-with-users", f"{self.name} released with " + ", ".join(problems),
                                    self, *self._attachments)

    def _users(self) -> list[str]:
        problems = []
        if self._attachments:
            problems.append(f"{len(self._attachments)} attachment(s)")
        live = [m for m in self._mappings]
        if live:
            problems.append(f"{len(live)} live mapping(s)")
        pins = sum(a.pin_count for a in self._attachments)
        if pins:
            problems.append(f"{pins} pin(s)")
        if self._vmap_count:
            problems.append("a live vmap")
        return problems

    def _release(self) -> None:
        self._released = True
        self.exporter.release(self)

    def fd(self) -> int:
        """``dma_buf_fd()``: install in the fd table; the fd takes over the
        caller's reference."""
        self._alive("dma_buf_fd")
        return files.install(self)

    # ------------------------------------------------------------ attaching

    @property
    def attachments(self) -> list[Attachment]:
        """Newest first, as the kernel keeps the list."""
        return list(self._attachments)

    # Compiled (pydmabuf._dmabuf_api, with the documentation), bound as
    # the method.
    attach = _dmabuf_api.dmabuf_attach

    def dynamic_attach(self, device: Device, importer_ops: ImporterOps | None, importer_priv: Any = None) -> Attachment:
        """``dma_buf_dynamic_attach()`` (``dma_buf_sgt_dynamic_attach()``):
        an importer of a scatterlist mapped for ``device`` that takes the
        reservation lock to map and drops its mappings when told.  It
        accepts peer-to-peer addresses when ``importer_ops.allow_peer2peer``.

        One SGT importer entry negotiated as :meth:`mapping_attach` does;
        ``importer_ops`` None is a static importer (the kernel's wrapper
        would dereference it).  Must not be called with the lock held.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> class Nic(ImporterOps):
        ...     def invalidate_mappings(self, attachment):
        ...         pass                    # a real importer unmaps here (lock held)
        >>> m = Machine.default()
        >>> buf = SystemHeap(m).allocate(1 << 16)
        >>> a = buf.dynamic_attach(m.device("nic0"), Nic())
        >>> a.dynamic
        True
        >>> buf.detach(a)
        >>> buf.put()
        """
        if importer_ops is not None and not isinstance(importer_ops, ImporterOps):
            raise TypeError("importer_ops must be an ImporterOps")
        a: Attachment = _dmabuf_api.sgt_attach(self, device, importer_ops, importer_priv, "dma_buf_dynamic_attach")
        return a

    def mapping_attach(self, importer_matches: Iterable[Any], importer_ops: ImporterOps | None = None,
                       importer_priv: Any = None) -> Attachment:
        """``dma_buf_mapping_attach()``: attach with the mapping types the
        importer takes, in its order.

        The exporter's entries are matched against ``importer_matches``
        first (:func:`pydmabuf.mapping.match_mapping`, exporter order
        wins), without the reservation lock and before anything else; then
        the exporter's ``attach`` runs (unlocked) and may refuse; then the
        attachment goes at the head of the list under the lock.

        Parameters
        ----------
        importer_matches : iterable of MappingMatch
            Importer entries (``mapping.sgt_importer``, ``mapping.pal_importer``
            or a driver's own type).
        importer_ops : ImporterOps, optional
            Makes the attachment dynamic (its invalidation callback).
        importer_priv : object, optional
            The importer's, opaque.

        Returns
        -------
        Attachment
            ``map_type`` is the negotiated entry, fixed for its life.

        Raises
        ------
        InvalidArgument
            (EINVAL) no compatible pair (empty lists included).
        Exception
            A type's ``match`` or the exporter's ``match_mapping`` or
            ``attach`` refusing (VFIO revoked: ENODEV).

        A failed attach leaves nothing behind and calls no ``detach``.
        """
        self._alive("attach")
        imp = tuple(importer_matches)
        if importer_ops is not None and not isinstance(importer_ops, ImporterOps):
            raise TypeError("importer_ops must be an ImporterOps")
        for e in imp:
            if not isinstance(e, mapping.MappingMatch):
                raise TypeError(f"mapping_attach: importer entries must be MappingMatch, not {type(e).__name__}")
            if e.exp_ops is not None:
                raise errors.InvalidArgument("mapping_attach: an importer entry carries exporter ops")
        a: Attachment = _dmabuf_api.attach(self, imp, importer_ops, importer_priv)
        return a

    def debugfs_attachments(self) -> list[str]:
        """The attachment lines of ``/sys/kernel/debug/dma_buf/bufinfo``:
        a tab, the mapping type's name and a colon, then the type's own
        text (SGT: the importing device), newest attachment first."""
        with self._lock:
            atts = list(self._attachments)
        return [f"\t{a.map_type.type.name}:{a.map_type.type.debugfs_dump(a)}" for a in atts
                if a.map_type is not None]

    detach = _dmabuf_api.dmabuf_detach  # compiled, as attach

    # ------------------------------------------------------------- CPU side

    def mmap(self, offset: int = 0, nbytes: int | None = None) -> CpuMapping:
        """``dma_buf_mmap()``: a CPU mapping of ``[offset, offset + nbytes)``
        (whole pages; EINVAL past the end, EOVERFLOW if it wraps).  Faults
        resolve through the exporter's physical ranges under the
        reservation lock; invalidation zaps the mapping (the next access
        refaults), revoke makes accesses fail as SIGBUS would.

        As ``dma_buf_mmap_internal()`` checks, the mapping's pages must lie
        in the buffer's *whole* pages (``vm_pgoff + npages > size >>
        PAGE_SHIFT`` is EINVAL): a trailing partial page is never mappable.
        The heaps page-align their sizes, so their buffers map whole.

        The mapping holds a reference to the buffer, as the vma holds the
        dma-buf file: the buffer is released only once the mapping is
        closed (:meth:`CpuMapping.close`, the context manager, or the
        mapping being collected) and every other reference is put."""
        self._alive("mmap")
        if not isinstance(offset, int) or (nbytes is not None and not isinstance(nbytes, int)):
            raise TypeError("mmap: offset and nbytes must be ints")
        if offset < 0 or offset % PAGE_SIZE:
            raise errors.InvalidArgument(f"mmap: offset {offset!r} must be a page multiple")
        if nbytes is None:
            nbytes = self.size - offset
        if nbytes <= 0:
            raise errors.InvalidArgument("mmap: nbytes must be positive")
        npages = -(-nbytes // PAGE_SIZE)
        if offset // PAGE_SIZE + npages > self.size // PAGE_SIZE:
            raise errors.InvalidArgument(f"mmap: {npages} pages at page {offset // PAGE_SIZE} are past the "
                                         f"{self.size // PAGE_SIZE} whole pages of {self.name}")
        m = CpuMapping(self, offset, npages * PAGE_SIZE)
        self.exporter.mmap(self, m)
        with self._lock:
            self.get()  # the vma's file reference (get_file in dma_buf_mmap_internal's caller)
            self._mmap_refs += 1
            m._holds_ref = True
            self._cpu_maps.add(m)
        return m

    def vmap(self) -> Any:
        """``dma_buf_vmap()`` (reservation lock held): the exporter's kernel
        mapping, cached and counted."""
        if not self.resv.held_by_current_thread():
            checks.checker.locking("vmap-without-resv", "dma_buf_vmap without the reservation lock", self)
        if not self.exporter.has("vmap"):
            raise errors.InvalidArgument(f"{self.exporter.name} has no vmap")
        with self._lock:
            if self._vmap_count:
                self._vmap_count += 1
                return self._vmap_ptr
        ptr = self.exporter.vmap(self)
        with self._lock:
            self._vmap_ptr = ptr
            self._vmap_count = 1
        return ptr

    def vunmap(self, mapping: Any) -> None:
        if not self.resv.held_by_current_thread():
            checks.checker.locking("vunmap-without-resv", "dma_buf_vunmap without the reservation lock", self)
        with self._lock:
            if not self._vmap_count or mapping is not self._vmap_ptr:
                checks.checker.lifetime("bad-vunmap", "dma_buf_vunmap of a mapping that is not the live vmap", self)
                return
            self._vmap_count -= 1
            last = self._vmap_count == 0
            if last:
                self._vmap_ptr = None
        if last:
            self.exporter.vunmap(self, mapping)

    def begin_cpu_access(self, direction: DmaDirection | int) -> None:
        """``dma_buf_begin_cpu_access()`` (lock NOT held): the exporter's op,
        then wait for the implicit fences (writers' for reads, all for
        writes)."""
        d = DmaDirection(direction)
        if self.resv.held_by_current_thread():
            checks.checker.locking("cpu-access-with-resv", "begin_cpu_access with the reservation lock held", self)
        self.exporter.begin_cpu_access(self, d)
        write = d in (DmaDirection.BIDIRECTIONAL, DmaDirection.TO_DEVICE)
        self.resv.wait(Usage.READ if write else Usage.WRITE, interruptible=True)

    def end_cpu_access(self, direction: DmaDirection | int) -> None:
        self.exporter.end_cpu_access(self, DmaDirection(direction))

    # -------------------------------------------------------------- reports

    @property
    def live_mappings(self) -> int:
        return len(self._mappings)

    def __repr__(self) -> str:
        state = []
        if self._released:
            state.append("released")
        if self.revoked:
            state.append("revoked")
        if self._attachments:
            state.append(f"{len(self._attachments)} attached")
        if self._mappings:
            state.append(f"{len(self._mappings)} mapped")
        return (f"<DmaBuf {self.name!r} {_fmt_size(self.size)} by {self.exporter.name}, refs={self._refs}"
                f"{', ' + ', '.join(state) if state else ''}>")

    def __enter__(self) -> DmaBuf:
        """``with heap.allocate(n) as buf:`` -- the block owns the reference
        it was given and puts it at the end.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> with SystemHeap(Machine.default()).allocate(1 << 16) as buf:
        ...     buf.refcount
        1
        >>> buf.released
        True
        """
        return self

    def close(self) -> None:
        """Put the caller's reference (:meth:`put`), unless the buffer is
        released already (a put by hand was the last): the lifecycle's
        name for it, which ``with`` calls on the way out."""
        if not self._released:
            self.put()

    def _never_put(self) -> int:
        # References held by CPU mappings are theirs to put: a mapping
        # collected in the same garbage puts its own when it goes.
        return self._refs - self._mmap_refs

    def _owns(self) -> bool:
        return self._never_put() > 0 and not self._released

    def _leak_message(self) -> str:
        return f"{self!r} collected with {self._never_put()} reference(s) never put"



# --------------------------------------------------------------- functions


def export(exporter: Exporter, nbytes: int, *, resv: Resv | None = None, name: str | None = None) -> DmaBuf:
    """``dma_buf_export()``: a new dma-buf of ``nbytes`` backed by ``exporter``.

    Raises InvalidArgument (EINVAL) if ``release`` is missing; if the
    exporter supplies no mapping type (neither ``match_mapping`` nor
    ``single_exporter_match``, nor the legacy ``map_dma_buf`` and
    ``unmap_dma_buf`` pair); or if exactly one of ``pin``/``unpin`` is
    there.  With both ``match_mapping`` and ``single_exporter_match`` (as
    the final series accepts) ``match_mapping`` is used.
    """
    if not isinstance(exporter, Exporter):
        raise TypeError("exporter must be an Exporter")
    cls = type(exporter)
    if not cls.has("release"):
        raise errors.InvalidArgument(f"dma_buf_export: {cls.__name__} has no release")
    single = getattr(exporter, "single_exporter_match", None)
    if single is not None and not isinstance(single, mapping.MappingMatch):
        raise TypeError(f"dma_buf_export: {cls.__name__}.single_exporter_match must be a MappingMatch")
    if not cls.has("match_mapping") and single is None:
        for op in ("map_dma_buf", "unmap_dma_buf"):
            if not cls.has(op):
                raise errors.InvalidArgument(f"dma_buf_export: {cls.__name__} supplies no mapping type (no "
                                             f"match_mapping, no single_exporter_match, no legacy {op})")
    if cls.has("pin") != cls.has("unpin"):
        raise errors.InvalidArgument(f"dma_buf_export: {cls.__name__} has pin without unpin or unpin without pin")
    if not isinstance(nbytes, int):
        raise TypeError(f"dma_buf_export: size must be an int, not {type(nbytes).__name__}")
    if nbytes <= 0:
        raise errors.InvalidArgument(f"dma_buf_export: size {nbytes!r} must be positive")
    if resv is not None:
        if not isinstance(resv, Resv):
            raise TypeError(f"dma_buf_export: resv must be a Resv, not {type(resv).__name__}")
    if name is not None:
        check_name(name)  # before the buffer exists: a failed export leaves nothing behind
    return DmaBuf._new(exporter, nbytes, resv, name)


def dma_buf_get(fd: int) -> DmaBuf:
    """``dma_buf_get()``: a new reference to the dma-buf behind ``fd``
    (EBADF for a closed fd, EINVAL for a file that is not a dma-buf)."""
    obj = files.lookup(fd)
    if not isinstance(obj, DmaBuf):
        raise errors.InvalidArgument(f"fd {fd} is not a dma-buf")
    return obj.get()


def dma_buf_ref(obj: DmaBuf | int, what: str) -> DmaBuf:
    """A new reference for an importer handed a dma-buf or its fd:
    ``get_dma_buf()`` on a DmaBuf, :func:`dma_buf_get` on an int fd (its
    EBADF / EINVAL propagate); TypeError for anything else.  ``what`` names
    the caller in that message."""
    if isinstance(obj, DmaBuf):
        return obj.get()
    if isinstance(obj, int) and not isinstance(obj, bool):
        return dma_buf_get(obj)
    raise TypeError(f"{what}: dmabuf must be a DmaBuf or a file descriptor, not {type(obj).__name__}")


def close(fd: int) -> None:
    """Close an fd from :meth:`DmaBuf.fd` (drops its reference)."""
    files.close(fd)

