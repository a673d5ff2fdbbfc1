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

An exporter subclasses :class:`Exporter` and overrides the ops it has;
:func:`export` checks them as ``dma_buf_export()`` does.  An importer calls
:meth:`DmaBuf.attach` (static) or :meth:`DmaBuf.dynamic_attach` with an
:class:`ImporterOps`; maps and unmaps with the reservation lock held
(:meth:`Attachment.map`), or with the ``_unlocked`` variants.

Broken rules go to :mod:`pydmabuf.checks` (strict mode raises).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from pydmabuf import _walk, access, checks, dma, errors, files, iotlb, mapping
from pydmabuf._core import Resv, SgTable, _set_sg_with_hook, _u64_pairs
from pydmabuf._types import PAGE_SIZE, Caching, DmaDirection, RangeKind, Usage, _fmt_size
from pydmabuf.machine import Device, P2pProvider, P2PMapType

log = logging.getLogger(__name__)

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

#: The gated interface importers declare to get physical ranges: the same
#: gate as the PAL mapping type's (:data:`pydmabuf.mapping.PAL_MODULE`),
#: since :meth:`Attachment.phys_vec` is a thin layer over PAL.
PHYS_NAMESPACE = mapping.PAL_MODULE
#: Names are at most 31 characters (32 bytes with the NUL).
DMA_BUF_NAME_LEN = 32

_BIDI = DmaDirection.BIDIRECTIONAL


class PhysVec(NamedTuple):
    """An exporter's memory as physical ranges: ``ranges`` is an (N, 2) u64
    array of (physical address, nbytes); ``provider`` the P2P provider of
    MMIO (a PCI BAR), None for RAM."""

    ranges: np.ndarray
    provider: P2pProvider | None


# ------------------------------------------------------------------ importer


class ImporterOps:
    """``struct dma_buf_attach_ops``: what makes an attachment dynamic.

    Subclass it and override :meth:`invalidate_mappings` (the 7.1 name) or
    :meth:`move_notify` (the older one); either is the callback, called
    with the reservation lock held when the exporter invalidates.  Since
    7.1 the callback is optional: an ImporterOps with neither is a dynamic
    importer the exporter cannot ask to stop (see :func:`attach_revocable`).

    Class attributes
    ----------------
    allow_peer2peer : bool
        The importer handles addresses with no struct page (PCI BARs).
    import_namespaces : frozenset of str
        Gated interfaces the importer declares; ``PHYS_NAMESPACE`` gives
        access to :meth:`Attachment.phys_vec`.
    """

    allow_peer2peer: bool = False
    import_namespaces: frozenset[str] = frozenset()

    def invalidate_mappings(self, attachment: Attachment) -> None:
        """The exporter is about to move or revoke the memory: drop or
        refresh the mappings of ``attachment`` before any further DMA."""
        raise NotImplementedError

    def move_notify(self, attachment: Attachment) -> None:
        """The pre-7.1 name of :meth:`invalidate_mappings`."""
        raise NotImplementedError

    @classmethod
    def _callback(cls) -> Callable[[ImporterOps, Attachment], None] | None:
        inv = cls.invalidate_mappings is not ImporterOps.invalidate_mappings
        mv = cls.move_notify is not ImporterOps.move_notify
        if inv:
            return cls.invalidate_mappings
        if mv:
            return cls.move_notify
        return None

    @property
    def has_invalidate(self) -> bool:
        return type(self)._callback() is not None

    def __repr__(self) -> str:
        # The class name is what reports blame; no addresses, so the same
        # run gives the same text.
        return f"<importer {type(self).__qualname__.rsplit('.<locals>.', 1)[-1]}>"


# ------------------------------------------------------------------ exporter


class Exporter:
    """``struct dma_buf_ops``: subclass and override the ops you have.

    Mandatory: :meth:`release`, and the mapping types the exporter
    supplies: :meth:`match_mapping` (calls
    :func:`pydmabuf.mapping.match_mapping` with its entries, in its order
    of preference), or the class attribute ``single_exporter_match`` (one
    :class:`~pydmabuf.mapping.MappingMatch`), or -- an exporter that
    predates mapping types -- :meth:`map_dma_buf` and :meth:`unmap_dma_buf`,
    wrapped as one SGT entry, as during upstream's transition.
    :meth:`pin` and :meth:`unpin` go together; having them makes the
    exporter dynamic (it can move its memory).  ``map``/``unmap``/``pin``/
    ``unpin``/``vmap``/``vunmap`` and :meth:`get_phys_vec` run with the
    reservation lock held (do not take it); ``attach``/``detach``/
    ``release``/``mmap``/CPU access and ``match_mapping`` run without it.
    """

    #: Name shown in reprs (``exp_name``).
    name: str = "exporter"
    #: ``dma_buf_ops.single_exporter_match``: the one entry of an exporter
    #: that supplies one mapping type (None: see :meth:`match_mapping`).
    single_exporter_match: Any = None

    # -- ops (override) --
    def match_mapping(self, args: Any) -> None:
        """``dma_buf_ops.match_mapping``: call
        :func:`pydmabuf.mapping.match_mapping` on ``args`` (a
        :class:`~pydmabuf.mapping.MatchArgs`) with this exporter's entries.
        Runs at attach, before :meth:`attach`, without the reservation lock,
        with ``args.attach`` not yet on the buffer's list; raising fails the
        attach with that error."""
        raise NotImplementedError

    def attach(self, attachment: Attachment) -> None:
        """May refuse the attachment by raising (EBUSY: storage unusable for
        that device, EOPNOTSUPP, ENODEV ...)."""

    def detach(self, attachment: Attachment) -> None:
        """Clean up what :meth:`attach` set up."""

    def pin(self, attachment: Attachment) -> None:  # pragma: no cover - presence is what counts
        raise NotImplementedError

    def unpin(self, attachment: Attachment) -> None:  # pragma: no cover
        raise NotImplementedError

    def map_dma_buf(self, attachment: Attachment, direction: DmaDirection) -> SgTable:
        """Return a new mapped table for ``attachment.device`` (the caller
        owns it).  Returning None means ENOMEM."""
        raise NotImplementedError

    def unmap_dma_buf(self, attachment: Attachment, table: SgTable, direction: DmaDirection) -> None:
        raise NotImplementedError

    def release(self, dmabuf: DmaBuf) -> None:
        raise NotImplementedError

    def get_phys_vec(self, attachment: Attachment | None) -> PhysVec:
        """The memory as physical ranges (the physical-range op).
        ``attachment`` is None when the generic CPU mmap resolves a fault
        (:class:`CpuMapping`): there is no importer then."""
        raise errors.NotSupported(f"{self.name} does not describe its memory as physical ranges")

    def mmap(self, dmabuf: DmaBuf, mapping: CpuMapping) -> None:
        """Accept (or refuse by raising) a CPU mapping of the buffer; the
        generic implementation resolves faults through :meth:`get_phys_vec`."""
        raise errors.InvalidArgument(f"{self.name} cannot be mmapped")

    def vmap(self, dmabuf: DmaBuf) -> Any:
        raise errors.InvalidArgument(f"{self.name} has no vmap")

    def vunmap(self, dmabuf: DmaBuf, mapping: Any) -> None:
        pass

    def begin_cpu_access(self, dmabuf: DmaBuf, direction: DmaDirection) -> None:
        pass

    def end_cpu_access(self, dmabuf: DmaBuf, direction: DmaDirection) -> None:
        pass

    def migrate(self, dmabuf: DmaBuf) -> Callable[[], None] | None:
        """Move the memory (new backing, contents copied) and return what
        frees the old backing once fences allow; the model's hook for
        :meth:`DmaBuf.move`."""
        raise errors.NotSupported(f"{self.name} cannot move its memory")

    # -- introspection --
    @classmethod
    def has(cls, op: str) -> bool:
        """Does this exporter provide ``op`` (override the base class)?"""
        return getattr(cls, op) is not getattr(Exporter, op)

    @classmethod
    def is_dynamic(cls) -> bool:
        """``dma_buf_is_dynamic()``: the exporter has ``pin``."""
        return cls.has("pin")


# ---------------------------------------------------------------- mappings


class _Mapping:
    """A table handed to an importer, as the checker tracks it."""

    __slots__ = ("attachment", "table", "direction", "stale", "created_at", "dma", "pinned", "__weakref__")

    def __init__(self, attachment: Attachment, table: SgTable | None, direction: DmaDirection,
                 dma: np.ndarray, pinned: bool) -> None:
        self.attachment = attachment
        self.table = table
        self.direction = direction
        self.stale = False
        self.created_at = checks.created_at()
        self.dma = dma
        self.pinned = pinned

    def covers(self, addr: int, nbytes: int) -> bool:
        """Does ``[addr, +nbytes)`` touch a segment?  Compared on inclusive
        last bytes: an access or segment may end exactly at 2**64."""
        d = self.dma
        if len(d) == 0:
            return False
        lo = d[:, 0]
        last = lo + (d[:, 1] - np.uint64(1))
        live = d[:, 1] != 0
        return bool((live & (lo <= np.uint64(addr + nbytes - 1)) & (last >= np.uint64(addr))).any())

    def __repr__(self) -> str:
        return f"<mapping of {self.attachment!r}{' STALE' if self.stale else ''}>"


# What the checker watches, weakly on both sides: a mapping lives as long as
# its attachment keeps it, so nothing here keeps a leaked buffer (and the
# ResourceWarning it owes) from being collected.
_device_maps: "weakref.WeakKeyDictionary[Device, weakref.WeakSet[_Mapping]]" = weakref.WeakKeyDictionary()
_table_maps: "weakref.WeakValueDictionary[int, _Mapping]" = weakref.WeakValueDictionary()  # by id(table)
_maps_lock = threading.Lock()


def _table_with(table: SgTable, entering: bool) -> None:
    """``SgTable.__enter__`` / ``__exit__``: ``with a.map(d) as table:``
    unmaps the mapping at the end of the block.

    The unmap needs the reservation lock, static or dynamic attachment
    alike: inside ``with buf.resv:`` it is held and the exit unmaps under
    it; otherwise the exit takes it, as :meth:`Attachment.unmap_unlocked`
    does.  Whether the mapping is still live is looked up under the lock,
    because a dynamic importer's ``invalidate_mappings`` (run by the
    exporter with the lock held) may have unmapped it already; then, or
    after an unmap by hand, the exit does nothing.
    """
    def live() -> _Mapping | None:
        with _maps_lock:
            m = _table_maps.get(id(table))
        return m if m is not None and m.table is table and m in m.attachment._maps else None

    m = live()
    if entering:
        if m is None:
            raise TypeError("only a live dma-buf mapping (Attachment.map) is a context manager")
        return
    if m is None:
        return
    resv = m.attachment.dmabuf.resv
    held = resv.held_by_current_thread()
    if not held:
        resv.lock()
    try:
        m = live()
        if m is not None:
            m.attachment.unmap(table, m.direction)
    finally:
        if not held:
            resv.unlock()


_set_sg_with_hook(_table_with)


def _access_hook(device: Device, addr: int, nbytes: int, write: bool) -> None:
    """The access gate's check of device DMA (:mod:`pydmabuf.access`):
    through a mapping its importer was told to drop, or of a buffer that
    was released under it (report mode let the release go on: its pages
    may be someone else's now)?"""
    with _maps_lock:
        maps = list(_device_maps.get(device, ()))
    for m in maps:
        if m.attachment.dmabuf._released and m.covers(addr, nbytes):
            a = m.attachment
            checks.checker.lifetime(
                "dma-after-release",
                f"{device.name} did DMA at {addr:#x} through a mapping of {a.dmabuf.name!r}, which was "
                "released with the mapping live: its pages went back to the allocator",
                m, a.dmabuf, culprit=a.importer_ops or a)
        elif m.stale and m.covers(addr, nbytes):
            a = m.attachment
            what = "revoked" if a.dmabuf.revoked else "invalidated"
            checks.checker.lifetime(
                "dma-after-invalidate",
                f"{device.name} did DMA at {addr:#x} through a mapping of {a.dmabuf.name!r} that the "
                f"exporter {what}; the importer must drop or refresh its mappings first",
                m, a.dmabuf, culprit=a.importer_ops or a)


access.add_check(access.DEVICE, _access_hook)


@contextlib.contextmanager
def _failures_noted(failed: list[tuple[Attachment, BaseException]]) -> Iterator[None]:
    """Around the rest of a sequence that told every importer: if it fails,
    its exception goes out with a note naming the importers whose callback
    raised (they are reported only when the sequence completes)."""
    try:
        yield
    except BaseException as e:
        for a, err in failed:
            e.add_note(f"the invalidation callback of {a.importer_ops!r} on {_attached_to(a)} raised "
                       f"{type(err).__name__}: {err}")
        raise


def _iotlb_describer(device: Device, addr: int, nbytes: int) -> tuple[Any, Any] | None:
    """For the IOTLB (:mod:`pydmabuf.iotlb`): the importer's mapping a DMA
    address belongs to, asked when an access fills the cache, so a later
    hit on the stale entry names the mapping and the importer that
    unmapped it."""
    with _maps_lock:
        maps = list(_device_maps.get(device, ()))
    for m in maps:
        if m.covers(addr, nbytes):
            return m, m.attachment.importer_ops or m.attachment
    return None


iotlb.add_describer(_iotlb_describer)


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError("name must be a str")
    if len(name.encode()) >= DMA_BUF_NAME_LEN:
        raise errors.InvalidArgument(f"name {name!r} is longer than {DMA_BUF_NAME_LEN - 1} bytes")
    return name


def _timeout_arg(timeout: Any, what: str) -> None:
    """Seconds (int or float, >= 0) or None, as the fence waits take them."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what}: timeout must be seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:
        raise errors.InvalidArgument(f"{what}: timeout must be >= 0 seconds or None (got {timeout!r})")


# ------------------------------------------------------------------ buffers


class DmaBuf:
    """``struct dma_buf``: a fixed-size, refcounted buffer shared by
    reference; one reservation object (``resv``) orders its state changes.

    Create one with :func:`export`.  References: :meth:`get` / :meth:`put`
    (the exporter's ``release`` runs once, when the last goes); pass it
    around as a file descriptor with :meth:`fd` / :func:`dma_buf_get`.
    """

    # Set by _new (no __init__ runs).  Annotations only, no class values:
    # __del__'s getattr() must still see a half-built object as one.
    exporter: Exporter
    size: int
    resv: Resv
    revoked: bool
    created_at: str
    _own_resv: bool
    _name: str
    _refs: int
    _released: bool
    _lock: threading.RLock
    _attachments: list[Attachment]
    _mappings: set[_Mapping]
    _idle: threading.Condition
    _vmap_count: int
    _vmap_ptr: Any  # whatever the exporter's vmap returned
    _cpu_maps: weakref.WeakSet[CpuMapping]
    _generation: int  # of the backing: bumped by every move (the access gate's leases compare it)
    _mmap_refs: int  # of _refs, those CPU mappings hold (DmaBuf.mmap)

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

    # ------------------------------------------------------ identity, refs

    @property
    def name(self) -> str:
        return self._name or f"dmabuf@{id(self):x}"

    def set_name(self, name: str) -> None:
        """``DMA_BUF_SET_NAME``: at most 31 bytes (EINVAL otherwise); allowed
        while attached (the kernel documents EBUSY but never returns it)."""
        self._name = _check_name(name)

    @property
    def refcount(self) -> int:
        return self._refs

    @property
    def released(self) -> bool:
        return self._released

    @property
    def generation(self) -> int:
        """Which backing the buffer has: 0 at export, one more after each
        :meth:`move`.  A CPU mapping resolved against an older generation
        is refused by the access gate (:mod:`pydmabuf.access`)."""
        return self._generation

    def _alive(self, what: str) -> None:
        if self._released:
            checks.checker.lifetime("use-after-release", f"{what} on a released dma-buf", self)

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

    def attach(self, device: Device) -> Attachment:
        """``dma_buf_attach()`` (``dma_buf_sgt_attach()`` after the mapping
        types series): a static importer of a scatterlist mapped for
        ``device`` (no invalidation, and a dynamic exporter pins the buffer
        on every map).  Never peer-to-peer: an exporter that only offers a
        P2P scatterlist (VFIO) refuses it with EINVAL.

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> m = Machine.default()
        >>> buf = SystemHeap(m).allocate(1 << 16)
        >>> a = buf.attach(m.device("gpu0"))
        >>> a.dynamic
        False
        >>> buf.detach(a)
        >>> buf.put()
        """
        return self._sgt_attach(device, None, None, "dma_buf_attach")

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
        return self._sgt_attach(device, importer_ops, importer_priv, "dma_buf_dynamic_attach")

    def _sgt_attach(self, device: Device, ops: ImporterOps | None, priv: Any, what: str) -> Attachment:
        self._alive("attach")
        if not isinstance(device, Device):
            raise errors.InvalidArgument(f"{what}: {device!r} is not a device")
        machine = getattr(self.exporter, "machine", None)
        if machine is not None and device.machine is not machine:
            raise errors.InvalidArgument(f"{what}: {device.name} is a device of machine "
                                         f"{device.machine.name!r}, not of the exporter's {machine.name!r}")
        accepts = ops is not None and bool(ops.allow_peer2peer)
        return self.mapping_attach([mapping.sgt_importer(device, accepts)], ops, priv)

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
        imp = list(importer_matches)
        if importer_ops is not None and not isinstance(importer_ops, ImporterOps):
            raise TypeError("importer_ops must be an ImporterOps")
        for e in imp:
            if not isinstance(e, mapping.MappingMatch):
                raise TypeError(f"mapping_attach: importer entries must be MappingMatch, not {type(e).__name__}")
            if e.exp_ops is not None:
                raise errors.InvalidArgument("mapping_attach: an importer entry carries exporter ops")
        if self.resv.held_by_current_thread():
            checks.checker.locking("attach-with-resv", "dma_buf_attach with the reservation lock held", self)
        a = Attachment._new(self, None, importer_ops, importer_priv)
        args = mapping.MatchArgs(self, a, imp)
        mapping.exporter_matches(args, self.exporter)
        if a.map_type is None:
            raise TypeError(f"{args.chosen[0].type.name if args.chosen else 'the type'}: finish_match recorded "
                            "nothing on the attachment")
        a.device = mapping.sgt_dma_device(a)
        self.exporter.attach(a)
        self.resv.lock()
        try:
            with self._lock:
                self._attachments.insert(0, a)
                a._listed = True
        finally:
            self.resv.unlock()
        return a

    def debugfs_attachments(self) -> list[str]:
        """The attachment lines of ``/sys/kernel/debug/dma_buf/bufinfo``:
        a tab, the mapping type's name and a colon, then the type's own
        text (SGT: the importing device), newest attachment first."""
        with self._lock:
            atts = list(self._attachments)
        return [f"\t{a.map_type.type.name}:{a.map_type.type.debugfs_dump(a)}" for a in atts
                if a.map_type is not None]

    def detach(self, attachment: Attachment) -> None:
        """``dma_buf_detach()``: take the attachment off the list (under the
        lock), then the exporter's ``detach``.  Detaching with mappings or
        pins still live is a LifetimeError (the kernel does not check).

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> m = Machine.default()
        >>> buf = SystemHeap(m).allocate(1 << 16)
        >>> a = buf.attach(m.device("gpu0"))
        >>> buf.detach(a)
        >>> a.detached, buf.attachments
        (True, [])
        >>> buf.put()
        """
        if not isinstance(attachment, Attachment) or attachment.dmabuf is not self:
            checks.checker.lifetime("detach-foreign", "dma_buf_detach of an attachment of another buffer",
                                    self, attachment)
            return
        if attachment.detached:
            checks.checker.lifetime("double-detach", "dma_buf_detach of a detached attachment", attachment)
            return
        if self.resv.held_by_current_thread():
            checks.checker.locking("detach-with-resv", "dma_buf_detach with the reservation lock held", attachment)
        if attachment.live_mappings or attachment.pin_count:
            checks.checker.lifetime("detach-with-mappings",
                                    f"detach with {attachment.live_mappings} live mapping(s) and "
                                    f"{attachment.pin_count} pin(s)", attachment,
                                    culprit=attachment.importer_ops or attachment)
        self.resv.lock()
        try:
            with self._lock:
                self._attachments.remove(attachment)
        finally:
            self.resv.unlock()
        attachment.detached = True
        self.exporter.detach(attachment)

    # --------------------------------------------------------- invalidation

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
                        e.add_note(f"the invalidation callback of {a2.importer_ops!r} on {_attached_to(a2)} "
                                   f"raised {type(e2).__name__}: {e2}")
                raise e
        who = ", ".join(f"{a.importer_ops!r} on {_attached_to(a)}" for a, _e in failed)
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
        from pydmabuf._core import Fence, FenceArray, fence_context_alloc

        busy = self.resv.get_fences(Usage.BOOKKEEP)
        self.resv.reserve_fences(1)
        release_old = self.exporter.migrate(self)
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
        _timeout_arg(timeout, "revoke")  # before anything is revoked
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
        _timeout_arg(timeout, "wait_unmapped")
        with self._idle:
            if not self._idle.wait_for(lambda: not self._mappings, timeout):
                who = sorted({m.attachment.device.name if m.attachment.device is not None
                              else repr(m.attachment.importer_ops) for m in self._mappings})
                raise errors.TimedOut(f"{self.name}: {len(self._mappings)} mapping(s) still live after "
                                      f"{timeout}s (held by {', '.join(who)})")

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

    def __exit__(self, *exc: object) -> None:
        if not self._released:  # a put by hand inside the block was the last
            self.put()

    def __del__(self) -> None:
        # References held by CPU mappings are theirs to put: a mapping
        # collected in the same garbage puts its own when it goes.
        never_put = getattr(self, "_refs", 0) - getattr(self, "_mmap_refs", 0)
        if never_put > 0 and not getattr(self, "_released", True):
            warnings.warn(f"{self!r} collected with {never_put} reference(s) never put", ResourceWarning,
                          stacklevel=2)


class Attachment:
    """``struct dma_buf_attachment``: one importer's use of a buffer.

    ``map_type`` is the negotiated :class:`~pydmabuf.mapping.MappingMatch`;
    ``device`` is the importing DMA device of an SGT attachment (None for
    other types, which name no device)."""

    # Set by _new (no __init__ runs); declared for type checkers only.
    dmabuf: DmaBuf
    device: Device | None
    map_type: mapping.MappingMatch | None
    importer_ops: ImporterOps | None
    importer_priv: Any  # the importer's, opaque
    peer2peer: bool
    priv: Any  # the exporter's, opaque
    pin_count: int
    invalidations: int
    detached: bool
    created_at: str
    _listed: bool
    _maps: set[_Mapping]

    def __init__(self) -> None:
        raise TypeError("use DmaBuf.attach() or DmaBuf.dynamic_attach()")

    @classmethod
    def _new(cls, dmabuf: DmaBuf, device: Device | None, ops: ImporterOps | None, priv: Any) -> Attachment:
        self = object.__new__(cls)
        self.dmabuf = dmabuf
        self.device = device
        self.map_type = None
        self.importer_ops = ops
        self.importer_priv = priv
        self.peer2peer = bool(ops.allow_peer2peer) if ops is not None else False
        self.priv = None  # the exporter's
        self.pin_count = 0
        self.invalidations = 0
        self.detached = False
        self._listed = False  # on the buffer's list (the exporter accepted it)
        self._maps = set()
        self.created_at = checks.created_at()
        return self

    @property
    def dynamic(self) -> bool:
        """``dma_buf_attachment_is_dynamic()``: has importer ops."""
        return self.importer_ops is not None

    @property
    def live_mappings(self) -> int:
        return len(self._maps)

    def _usable(self, what: str) -> bool:
        if self.detached:
            checks.checker.lifetime("use-after-detach", f"{what} on a detached attachment", self)
            return False
        if self.dmabuf.released:
            checks.checker.lifetime("use-after-release", f"{what} on an attachment of a released dma-buf", self)
            return False
        return True

    def _require_resv(self, what: str) -> None:
        if not self.dmabuf.resv.held_by_current_thread():
            checks.checker.locking(f"{what}-without-resv",
                                   f"dma_buf_{what} without the reservation lock held", self)

    # ------------------------------------------------------------- mapping

    def map(self, direction: DmaDirection | int = _BIDI) -> SgTable:
        """``dma_buf_map_attachment()``: the reservation lock must be held.

        A static importer of a dynamic exporter pins the buffer first (and
        unpins it at unmap); a static importer then waits (interruptibly)
        for the KERNEL fences.  Returns a new table the caller owns; the
        exporter refusing raises its error (ENODEV once revoked).

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> m = Machine.default()
        >>> buf = SystemHeap(m).allocate(1 << 16, layout="contiguous")
        >>> a = buf.attach(m.device("gpu0"))
        >>> with buf.resv:
        ...     table = a.map(DmaDirection.BIDIRECTIONAL)
        ...     a.live_mappings
        1
        >>> table.dma_ranges().shape
        (1, 2)
        >>> with buf.resv:
        ...     a.unmap(table, DmaDirection.BIDIRECTIONAL)
        >>> buf.detach(a); buf.put()
        """
        d = dma._dir(direction)
        if not self._usable("map"):
            raise errors.LifetimeError("map on a dead attachment")
        sgt = mapping.get_sgt_ops(self)
        if sgt is None:
            raise errors.InvalidArgument(f"dma_buf_map_attachment: the attachment negotiated "
                                         f"{self._type_name()!r}, not a scatterlist")
        self._require_resv("map")
        buf = self.dmabuf
        if buf.revoked:
            raise errors.Revoked(f"{buf.name} was revoked: no new mappings")
        exp = buf.exporter
        pin = exp.is_dynamic() and not self.dynamic
        if pin:
            exp.pin(self)
            self.pin_count += 1
        try:
            table = sgt.map_dma_buf(self, d)
            if table is None:
                raise errors.OutOfMemory(f"{exp.name}: map_dma_buf returned no table")
            if not isinstance(table, SgTable):
                raise TypeError(f"{exp.name}: map_dma_buf returned a {type(table).__name__}, not an SgTable")
        except BaseException:
            if pin:
                self.pin_count -= 1
                exp.unpin(self)
            raise
        if not self.dynamic:
            try:
                buf.resv.wait(Usage.KERNEL, interruptible=True)
            except BaseException:
                sgt.unmap_dma_buf(self, table, d)
                if pin:
                    self.pin_count -= 1
                    exp.unpin(self)
                raise
        self._track(table, d, pin)
        return table

    def _track(self, table: SgTable | None, d: DmaDirection, pinned: bool, dma_ranges: Any = None) -> _Mapping:
        if dma_ranges is None:
            # The core's own (N, 2) u64 array: nothing to parse.
            dma = table.dma_ranges() if table is not None else np.zeros((0, 2), dtype=np.uint64)
        else:
            dma = _u64_pairs(dma_ranges, "dma ranges")
        m = _Mapping(self, table, d, dma, pinned)
        buf = self.dmabuf
        with buf._lock:
            self._maps.add(m)
            buf._mappings.add(m)
        dev = self.device
        if dev is None:
            return m
        with _maps_lock:
            maps = _device_maps.get(dev)
            if maps is None:  # a WeakSet only for a device's first mapping
                maps = _device_maps[dev] = weakref.WeakSet()
            maps.add(m)
            if table is not None:
                _table_maps[id(table)] = m  # m holds the table: its id stays its own
        return m

    def _untrack(self, m: _Mapping) -> None:
        buf = self.dmabuf
        with buf._lock:
            self._maps.discard(m)
            buf._mappings.discard(m)
            buf._idle.notify_all()
        if self.device is None:
            return
        with _maps_lock:
            s = _device_maps.get(self.device)
            if s is not None:
                s.discard(m)

    def unmap(self, table: SgTable, direction: DmaDirection | int = _BIDI) -> None:
        """``dma_buf_unmap_attachment()`` (lock held): the exporter's unmap,
        then unpin if the map pinned.

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> m = Machine.default()
        >>> buf = SystemHeap(m).allocate(1 << 16)
        >>> a = buf.attach(m.device("gpu0"))
        >>> with buf.resv:
        ...     table = a.map(DmaDirection.TO_DEVICE)
        ...     a.unmap(table, DmaDirection.TO_DEVICE)
        >>> a.live_mappings
        0
        >>> buf.detach(a); buf.put()
        """
        d = dma._dir(direction)
        self._require_resv("unmap")
        with _maps_lock:
            m = _table_maps.get(id(table)) if isinstance(table, SgTable) else None
            if m is not None and m.table is not table:
                m = None
        if m is None or m.attachment is not self or m not in self._maps:
            checks.checker.lifetime("bad-unmap", "dma_buf_unmap_attachment of a table that is not a live "
                                    "mapping of this attachment (a double unmap?)", self, culprit=self.importer_ops)
            return
        if m.direction != d:
            checks.checker.lifetime("unmap-direction", f"mapped {m.direction.name}, unmapped {d.name}", self)
        exp = self.dmabuf.exporter
        sgt = mapping.get_sgt_ops(self)  # a tracked table means the attachment is SGT
        sgt.unmap_dma_buf(self, table, m.direction)
        with _maps_lock:
            _table_maps.pop(id(table), None)
        self._untrack(m)
        if m.pinned:
            self.pin_count -= 1
            exp.unpin(self)

    def map_unlocked(self, direction: DmaDirection | int = _BIDI) -> SgTable:
        """Take the reservation lock, :meth:`map`, drop it; must not be
        called with the lock held (LockingError).

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> m = Machine.default()
        >>> buf = SystemHeap(m).allocate(1 << 16)
        >>> a = buf.attach(m.device("gpu0"))
        >>> table = a.map_unlocked(DmaDirection.TO_DEVICE)
        >>> a.unmap_unlocked(table, DmaDirection.TO_DEVICE)
        >>> buf.detach(a); buf.put()
        """
        buf = self.dmabuf
        if buf.resv.held_by_current_thread():
            checks.checker.locking("unlocked-with-resv", "map_attachment_unlocked with the reservation lock held",
                                   self)
            return self.map(direction)
        buf.resv.lock()
        try:
            return self.map(direction)
        finally:
            buf.resv.unlock()

    def unmap_unlocked(self, table: SgTable, direction: DmaDirection | int = _BIDI) -> None:
        buf = self.dmabuf
        if buf.resv.held_by_current_thread():
            checks.checker.locking("unlocked-with-resv", "unmap_attachment_unlocked with the reservation lock held",
                                   self)
            self.unmap(table, direction)
            return
        buf.resv.lock()
        try:
            self.unmap(table, direction)
        finally:
            buf.resv.unlock()

    # ------------------------------------------------------------- pinning

    def pin(self) -> None:
        """``dma_buf_pin()`` (lock held): the exporter's pin, if it has one.
        For long pins only (scanout), and only for dynamic importers: a
        static attachment's pins belong to :meth:`map` / :meth:`unmap`.

        The kernel WARNs on a static attachment and goes on; the model
        refuses it (rule ``pin-static``: LifetimeError, EINVAL, in strict
        mode; in report mode recorded, then InvalidArgument, EINVAL), so an
        explicit pin can never be mistaken for the one a map took.  Nothing
        changes on a refusal; an exporter's ``pin`` that raises leaves the
        count as it was."""
        if not self._usable("pin"):
            return
        self._require_resv("pin")
        if not self.dynamic:
            checks.checker.lifetime("pin-static", "dma_buf_pin on a static attachment (only dynamic importers "
                                    "pin; a static importer's pins are taken by map and dropped by unmap)", self,
                                    culprit=self)
            raise errors.InvalidArgument(f"dma_buf_pin: {self!r} is static: its pins belong to map/unmap")
        exp = self.dmabuf.exporter
        if exp.has("pin"):
            exp.pin(self)
        self.pin_count += 1

    def unpin(self) -> None:
        """``dma_buf_unpin()`` (lock held): drop a pin :meth:`pin` took.

        Refused, with nothing changed: on a static attachment (rule
        ``unpin-static``: its pins are the ones its live mappings hold and
        only :meth:`unmap` drops them), and without a pin (rule
        ``unbalanced-unpin``).  Strict mode raises LifetimeError (EINVAL);
        report mode records the report and returns (``dma_buf_unpin``
        returns void), so a pin count never goes below zero and never
        loses the pin of a live mapping."""
        if not self._usable("unpin"):
            return
        self._require_resv("unpin")
        if not self.dynamic:
            checks.checker.lifetime("unpin-static", "dma_buf_unpin on a static attachment: its pins belong to "
                                    "its live mappings and only unmap drops them", self, culprit=self)
            return
        if self.pin_count <= 0:
            checks.checker.lifetime("unbalanced-unpin", "dma_buf_unpin without a pin", self)
            return
        self.pin_count -= 1
        exp = self.dmabuf.exporter
        if exp.has("unpin"):
            exp.unpin(self)

    # ------------------------------------------------------ physical ranges

    def phys_vec(self) -> PhysVec:
        """The buffer's memory as physical ranges: a thin layer over the PAL
        mapping type for importers that look the ranges up under the lock
        and rely on their invalidation callback instead of holding a list
        (KVM's fault path, the list-free importers of the study).

        The PAL rules hold: reservation lock held; only importers that
        declared ``PHYS_NAMESPACE`` (= :data:`pydmabuf.mapping.PAL_MODULE`,
        EPERM otherwise); the exporter's PAL ``map_phys`` (the negotiated
        one on a PAL attachment, else the PAL entry the exporter offers:
        EOPNOTSUPP when it has none), validated strictly; private
        (confidential) memory only for trusted devices (EPERM).  The list
        is copied and given back at once.  Raises ENODEV once revoked.
        """
        ops = self.importer_ops
        if ops is None or PHYS_NAMESPACE not in ops.import_namespaces:
            who = self.device.name if self.device is not None else "the importer"
            raise errors.NotPermitted(f"{who}: the importer did not declare {PHYS_NAMESPACE!r}")
        if not self._usable("phys_vec"):
            raise errors.LifetimeError("phys_vec on a dead attachment")
        self._require_resv("phys_vec")
        if self.dmabuf.revoked:
            raise errors.Revoked(f"{self.dmabuf.name} was revoked")
        mt = self.map_type
        pal = mt.exp_ops if mt is not None and mt.type is mapping.PAL else mapping.exporter_pal_ops(self.dmabuf)
        if pal is None:
            raise errors.NotSupported(f"{self.dmabuf.exporter.name} does not describe its memory as physical "
                                      "ranges (it offers no PAL mapping)")
        pl = mapping._resolve_phys(self, pal, "phys_vec", False)
        ranges = pl.ranges
        pal.unmap_phys(self, pl)
        return PhysVec(ranges, getattr(self.dmabuf.exporter, "provider", None))

    def _track_pal(self, pl: Any) -> _Mapping:
        """A live PAL list, as the checker tracks mappings: a revoke waits
        for it and a detach with it live is a LifetimeError."""
        return self._track(None, _BIDI, False, np.zeros((0, 2), dtype=np.uint64))

    def _type_name(self) -> str:
        return self.map_type.type.name if self.map_type is not None else "nothing"

    def track_dma(self, dma_ranges: Any, direction: DmaDirection | int = _BIDI) -> Any:
        """Tell the checker about DMA addresses an importer mapped itself
        (from :meth:`phys_vec` with the list-free API): DMA through them
        after an invalidation is then caught.  Returns a handle for
        :meth:`untrack_dma`."""
        return self._track(None, dma._dir(direction), False, dma_ranges)

    def untrack_dma(self, handle: Any) -> None:
        if handle in self._maps:
            self._untrack(handle)

    @property
    def p2p_route(self) -> P2PMapType | None:
        """How this device reaches the exporter's MMIO (None for RAM)."""
        try:
            # Duck-typed: only exporters of MMIO have a provider.
            prov = self.dmabuf.exporter.provider  # type: ignore[attr-defined]
        except AttributeError:
            return None
        if prov is None or self.device is None:
            return None
        return self.device.machine.p2p_map_type(prov, self.device)

    def __repr__(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        state = ["detached"] if self.detached else []
        if self._maps:
            state.append(f"{len(self._maps)} mapped")
        if self.pin_count:
            state.append(f"pinned x{self.pin_count}")
        mt = self.map_type
        if mt is not None and mt.type is not mapping.SGT:
            state.append(mt.type.name)
        who = self.device.name if self.device is not None else type(self.importer_ops).__name__
        return f"<Attachment {who} -> {self.dmabuf.name!r} {kind}{', ' + ', '.join(state) if state else ''}>"

    def __enter__(self) -> Attachment:
        """``with buf.attach(dev) as a:`` detaches at the end (unless
        detached by hand inside the block).  Mappings still live then are
        the checker's ``detach-with-mappings``, as with :meth:`DmaBuf.detach`.

        Examples
        --------
        >>> from pydmabuf import DmaDirection, Machine
        >>> from pydmabuf.exporters import SystemHeap
        >>> m = Machine.default()
        >>> with SystemHeap(m).allocate(1 << 16) as buf, buf.attach(m.device("gpu0")) as a:
        ...     with buf.resv, a.map(DmaDirection.TO_DEVICE) as table:
        ...         table.nents > 0
        True
        >>> a.detached
        True
        """
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.detached:
            self.dmabuf.detach(self)

    def __del__(self) -> None:
        if getattr(self, "_listed", False) and not self.detached and not self.dmabuf.released:
            warnings.warn(f"{self!r} collected while still attached", ResourceWarning, stacklevel=2)


def _touches(machine: Any, ranges: np.ndarray, kind: RangeKind) -> bool:
    """Whether any of the (address, nbytes) rows meets a range of ``kind``
    in the machine's address map.

    Vectorised: the map's ranges are sorted and disjoint, so the only one
    that can meet a row ``[lo, hi]`` is the last of ``kind`` starting at or
    below ``hi``; it meets the row when its (inclusive) last is >= ``lo``.
    A row of zero bytes or one running past 2**64 - 1 raises as
    ``RangeTable.overlapping`` would (EINVAL, EOVERFLOW) unless an earlier
    row already touched.
    """
    rows = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
    lo, n = rows[:, 0], rows[:, 1]
    # Rows that are no window: zero bytes, or lo + n - 1 past 2**64 - 1.
    bad = (n == 0) | (n - np.uint64(1) > ~lo)
    amap = machine.address_map.as_array()
    amap = amap[amap["kind"] == int(kind)]
    first_bad = int(np.argmax(bad)) if bad.any() else len(rows)
    if len(amap) and first_bad:
        ok = slice(0, first_bad)
        hi = lo[ok] + (n[ok] - np.uint64(1))
        i = np.searchsorted(amap["start"], hi, side="right") - 1
        hit = (i >= 0) & (amap["last"][np.maximum(i, 0)] >= lo[ok])
        if hit.any():
            return True
    if first_bad < len(rows):
        p, nb = int(lo[first_bad]), int(n[first_bad])
        if nb == 0:
            raise errors.InvalidArgument(f"overlapping: nbytes must be positive (got {nb})")
        raise errors.Overflow(f"overlapping: [{p:#x}, +{nb:#x}) runs past 2**64 - 1")
    return False


def _attached_to(a: Attachment) -> str:
    """What an attachment is attached for, in a message: its DMA device, or
    its mapping type when it has none (a PAL or private attachment)."""
    if a.device is not None:
        return a.device.name
    mt = a.map_type
    return f"a {mt.type.name} attachment" if mt is not None else "an attachment without a device"


# ------------------------------------------------------------- CPU mapping


class CpuMapping:
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
        if not isinstance(dmabuf, DmaBuf):
            raise TypeError(f"CpuMapping: dmabuf must be a DmaBuf, not {type(dmabuf).__name__}")
        self.dmabuf = dmabuf
        self.offset = offset
        self.nbytes = nbytes
        self.takes_lock = takes_lock  # False for a vmap (its user holds the lock)
        self._ranges: np.ndarray | None = None
        self._ends: np.ndarray | None = None  # cumulative lengths of _ranges
        self._lease: access.Lease | None = None  # the generation _ranges belong to
        self._holds_ref = False  # set by DmaBuf.mmap: the vma's file reference
        self._inflight = 0  # accesses copying now (under dmabuf._lock)
        self.closed = False
        self.faults = 0
        self.zaps = 0
        #: The memory type of the mapping's PTEs: write-back for system
        #: memory; the exporter's ``mmap`` op sets it for device memory
        #: (VFIO: uncached, or write-combine on request).
        self.caching = Caching.WRITE_BACK
        self.created_at = checks.created_at()
        # The subject is the buffer, not the mapping: no reference cycle, so
        # a dropped mapping goes (and puts its reference) at once.
        self._gate = access.Accessor(access.CPU, f"CPU mapping of {dmabuf.name!r}",
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

    def __enter__(self) -> CpuMapping:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A collected mapping is an unmapped one (the process's vma went):
        # its file reference goes, quietly -- nothing leaked.
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
        from pydmabuf._core import Resv

        if not isinstance(resv, Resv):
            raise TypeError(f"dma_buf_export: resv must be a Resv, not {type(resv).__name__}")
    if name is not None:
        _check_name(name)  # before the buffer exists: a failed export leaves nothing behind
    return DmaBuf._new(exporter, nbytes, resv, name)


def dma_buf_get(fd: int) -> DmaBuf:
    """``dma_buf_get()``: a new reference to the dma-buf behind ``fd``
    (EBADF for a closed fd, EINVAL for a file that is not a dma-buf)."""
    obj = files.lookup(fd)
    if not isinstance(obj, DmaBuf):
        raise errors.InvalidArgument(f"fd {fd} is not a dma-buf")
    return obj.get()


def _dma_buf_ref(obj: DmaBuf | int, what: str) -> DmaBuf:
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


def attach_revocable(attachment: Attachment) -> bool:
    """``dma_buf_attach_revocable()`` (7.1): can the exporter revoke this
    importer, i.e. is it dynamic with an invalidation callback?"""
    if not isinstance(attachment, Attachment):
        raise TypeError(f"attach_revocable: {type(attachment).__name__} is not an Attachment")
    ops = attachment.importer_ops
    return ops is not None and ops.has_invalidate
