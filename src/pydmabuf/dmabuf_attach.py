"""Attachments: one importer's use of a dma-buf, and the mappings it takes
(the attach, map, pin and physical-range half of ``drivers/dma-buf/dma-buf.c``).

:class:`Attachment` (``struct dma_buf_attachment``) maps and unmaps with
the reservation lock held, pins for a dynamic importer, and hands out
physical ranges (:meth:`Attachment.phys_vec`).  Every table it hands out
is tracked here (``_Mapping``), weakly, so that the access gate can refuse
DMA through a mapping the exporter invalidated or of a buffer released
under it, and so that the IOTLB can name the mapping a stale entry
belonged to.

The attach itself (``dma_buf_attach()``, the negotiation) and the detach
are :class:`~pydmabuf.dmabuf.DmaBuf` methods, in :mod:`pydmabuf.dmabuf`.
The public names here are re-exported there.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf import access, checks, errors, iotlb, mapping
from pydmabuf._core import SgTable, ranges_touch, set_sg_with_hook, u64_pairs
from pydmabuf._lifecycle import Owner
from pydmabuf._types import DmaDirection, Usage
from pydmabuf._args import _dir
from pydmabuf.dmabuf_ops import AttachmentBase, ImporterOps, PhysVec
from pydmabuf.machine import Device, P2PMapType

if TYPE_CHECKING:
    from pydmabuf.dmabuf import DmaBuf

__all__ = ["Attachment", "attach_revocable", "attached_to", "PHYS_NAMESPACE"]

#: The gated interface importers declare to get physical ranges: the same
#: gate as the PAL mapping type's (:data:`pydmabuf.mapping.PAL_MODULE`),
#: since :meth:`Attachment.phys_vec` is a thin layer over PAL.
PHYS_NAMESPACE = mapping.PAL_MODULE

_BIDI = DmaDirection.BIDIRECTIONAL
_NO_ROWS = np.zeros((0, 2), dtype=np.uint64)
_KERNEL = Usage.KERNEL  # an enum member read through its class costs a class look-up

# ---------------------------------------------------------------- mappings


class _Mapping:
    """A table handed to an importer, as the checker tracks it."""

    __slots__ = ("attachment", "table", "direction", "stale", "created_at", "_dma", "pinned", "__weakref__")

    def __init__(self, attachment: Attachment, table: SgTable | None, direction: DmaDirection,
                 dma: bytes | np.ndarray, pinned: bool, site: int) -> None:
        self.attachment = attachment
        self.table = table
        self.direction = direction
        self.stale = False
        # The first ``site - 1`` frames up (this, Attachment._track, ...) are
        # the package's, as the caller of _track knows: the walk starts there.
        self.created_at = checks.created_at(depth=site)
        # The (DMA address, nbytes) rows: native u64 pairs copied from the
        # table at map time, or the (N, 2) array given to track_dma (read
        # through, as the importer's own record of what it mapped).
        self._dma = dma
        self.pinned = pinned

    @property
    def dma(self) -> np.ndarray:
        """The (DMA address, nbytes) rows the mapping covers: (N, 2) u64
        (read-only for a table's mapping)."""
        d = self._dma
        return np.frombuffer(d, dtype=np.uint64).reshape(-1, 2) if isinstance(d, bytes) else d

    def covers(self, addr: int, nbytes: int) -> bool:
        """Does ``[addr, +nbytes)`` touch a segment?  Compared on inclusive
        last bytes: an access or segment may end exactly at 2**64."""
        d = self._dma
        return ranges_touch(d if isinstance(d, bytes) else d.tobytes(), addr, nbytes)

    def __repr__(self) -> str:
        return f"<mapping of {self.attachment!r}{' STALE' if self.stale else ''}>"


# What the checker watches, weakly: a mapping lives as long as its
# attachment keeps it, so nothing here keeps a leaked buffer (and the
# ResourceWarning it owes) from being collected.  Each device's record
# holds plain weak references keyed by id(), put in by _track and taken
# out by _untrack (no callbacks: one could run from a garbage collection
# inside _maps_lock).  A mapping collected without an unmap (its
# attachment leaked) leaves a dead reference: skipped when read, and swept
# out when the dict has doubled since its last sweep.  A table finds its
# mapping through the same weak reference, kept on the table itself
# (``SgTable._dmabuf_ref``) while the mapping is live.


class _MapRefs(dict[int, "weakref.ReferenceType[_Mapping]"]):
    __slots__ = ("sweep_at",)

    def __init__(self) -> None:
        super().__init__()
        self.sweep_at = 64

    def sweep(self) -> None:
        """Drop the dead references; called (under _maps_lock) when the dict
        has doubled since the last sweep, so it costs O(1) amortised."""
        for k in [k for k, r in self.items() if r() is None]:
            del self[k]
        self.sweep_at = max(64, 2 * len(self))


_device_maps: "weakref.WeakKeyDictionary[Device, _MapRefs]" = weakref.WeakKeyDictionary()
_maps_lock = threading.Lock()


def _live_maps(device: Device) -> list[_Mapping]:
    """The device's tracked mappings that are still alive (dead references
    are skipped; _MapRefs.sweep drops them)."""
    with _maps_lock:
        maps = _device_maps.get(device)
        refs = list(maps.values()) if maps else []
    return [m for m in (r() for r in refs) if m is not None]


def _table_map(table: SgTable) -> _Mapping | None:
    """The live tracked mapping whose table is ``table``, or None."""
    r = table._dmabuf_ref  # a public slot: anything a user wrote there is no mapping
    m = r() if type(r) is weakref.ReferenceType else None
    return m if type(m) is _Mapping and m.table is table else None


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
        m = _table_map(table)
        return m if m is not None and m in m.attachment._maps else None

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


set_sg_with_hook(_table_with)


def _access_hook(device: Device, addr: int, nbytes: int, write: bool) -> None:
    """The access gate's check of device DMA (:mod:`pydmabuf.access`):
    through a mapping its importer was told to drop, or of a buffer that
    was released under it (report mode let the release go on: its pages
    may be someone else's now)?"""
    for m in _live_maps(device):
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


def _iotlb_describer(device: Device, addr: int, nbytes: int) -> tuple[Any, Any] | None:
    """For the IOTLB (:mod:`pydmabuf.iotlb`): the importer's mapping a DMA
    address belongs to, asked when an access fills the cache, so a later
    hit on the stale entry names the mapping and the importer that
    unmapped it."""
    for m in _live_maps(device):
        if m.covers(addr, nbytes):
            return m, m.attachment.importer_ops or m.attachment
    return None


iotlb.add_describer(_iotlb_describer)


class Attachment(AttachmentBase, Owner):
    """``struct dma_buf_attachment``: one importer's use of a buffer.

    ``map_type`` is the negotiated :class:`~pydmabuf.mapping.MappingMatch`;
    ``device`` is the importing DMA device of an SGT attachment (None for
    other types, which name no device)."""

    def __init__(self) -> None:
        raise TypeError("use DmaBuf.attach() or DmaBuf.dynamic_attach()")

    @classmethod
    def _new(cls, dmabuf: DmaBuf, device: Device | None, ops: ImporterOps | None, priv: Any,
             site: int = 4) -> Attachment:
        """A new attachment; the first ``site - 1`` frames up from here are
        the package's (``created_at`` looks from frame ``site`` on)."""
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
        self._dev_refs = None  # the checker's record of the device's mappings, once mapped
        self.created_at = checks.created_at(depth=site)
        return self

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
        return self._map(direction, 5)

    def _map(self, direction: DmaDirection | int, site: int) -> SgTable:
        """:meth:`map`, called by it and by :meth:`map_unlocked` (so that
        frames 1-4 up from the mapping record, ``site`` 5, are the
        package's: the record, _track, this and its caller)."""
        d = _dir(direction)
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
        dynamic = self.dynamic
        pin = not dynamic and exp.is_dynamic()
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
        if not dynamic:
            try:
                buf.resv.wait(_KERNEL, interruptible=True)
            except BaseException:
                sgt.unmap_dma_buf(self, table, d)
                if pin:
                    self.pin_count -= 1
                    exp.unpin(self)
                raise
        self._track(table, d, pin, None, site)
        return table

    def _track(self, table: SgTable | None, d: DmaDirection, pinned: bool, dma_ranges: Any = None,
               site: int = 4) -> _Mapping:
        """Record a mapping for the checker; ``site``: where the user's frame
        may start (frames 1 to ``site - 1`` up from the record, the record
        itself, this and its caller at least, are the package's)."""
        if dma_ranges is None:
            # The core's own rows: nothing to parse.
            dma: bytes | np.ndarray = table._dma_snapshot() if table is not None else b""
        else:
            dma = u64_pairs(dma_ranges, "dma ranges")
        m = _Mapping(self, table, d, dma, pinned, site)
        buf = self.dmabuf
        with buf._lock:
            self._maps.add(m)
            buf._mappings.add(m)
        ref = weakref.ref(m)
        if table is not None:
            table._dmabuf_ref = ref
        refs = self._dev_refs
        if refs is None:
            dev = self.device
            if dev is None:
                return m
            with _maps_lock:  # the device's record, found once per attachment (its device is fixed)
                refs = _device_maps.get(dev)
                if refs is None:
                    refs = _device_maps[dev] = _MapRefs()
            self._dev_refs = refs
        with _maps_lock:
            refs[id(m)] = ref
            if len(refs) > refs.sweep_at:
                refs.sweep()
        return m

    def _untrack(self, m: _Mapping) -> None:
        buf = self.dmabuf
        with buf._lock:
            self._maps.discard(m)
            buf._mappings.discard(m)
            if buf._idle_waiters:
                buf._idle.notify_all()
        t = m.table
        if t is not None:
            r = t._dmabuf_ref
            if type(r) is weakref.ReferenceType and r() is m:
                t._dmabuf_ref = None
        refs = self._dev_refs
        if refs is None:  # not in the device's record (no device, or never mapped)
            return
        with _maps_lock:
            refs.pop(id(m), None)

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
        d = _dir(direction)
        self._require_resv("unmap")
        m = _table_map(table) if isinstance(table, SgTable) else None
        if m is None or m.attachment is not self or m not in self._maps:
            checks.checker.lifetime("bad-unmap", "dma_buf_unmap_attachment of a table that is not a live "
                                    "mapping of this attachment (a double unmap?)", self, culprit=self.importer_ops)
            return
        if m.direction != d:
            checks.checker.lifetime("unmap-direction", f"mapped {m.direction.name}, unmapped {d.name}", self)
        exp = self.dmabuf.exporter
        sgt = mapping.get_sgt_ops(self)  # a tracked table means the attachment is SGT
        sgt.unmap_dma_buf(self, table, m.direction)
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
            return self._map(direction, 5)
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
        pl = mapping.resolve_phys(self, pal, "phys_vec", False)
        ranges = pl.ranges
        pal.unmap_phys(self, pl)
        return PhysVec(ranges, getattr(self.dmabuf.exporter, "provider", None))

    def _track_pal(self, pl: mapping.PhysList) -> _Mapping:
        """A live PAL list, as the checker tracks mappings: a revoke waits
        for it and a detach with it live is a LifetimeError."""
        return self._track(None, _BIDI, False, _NO_ROWS)

    def _type_name(self) -> str:
        return self.map_type.type.name if self.map_type is not None else "nothing"

    def track_dma(self, dma_ranges: Any, direction: DmaDirection | int = _BIDI) -> _Mapping:
        """Tell the checker about DMA addresses an importer mapped itself
        (from :meth:`phys_vec` with the list-free API): DMA through them
        after an invalidation is then caught.  Returns a handle for
        :meth:`untrack_dma`."""
        return self._track(None, _dir(direction), False, dma_ranges)

    def untrack_dma(self, handle: object) -> None:
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

    def close(self) -> None:
        """Detach (:meth:`DmaBuf.detach`) unless detached already: the
        lifecycle's name for it, which ``with`` calls on the way out."""
        if not self.detached:
            self.dmabuf.detach(self)

    def _owns(self) -> bool:
        # Only an attachment the exporter accepted is on the list, and one
        # of a released buffer was reported by the release already.
        return self._listed and not self.detached and not self.dmabuf.released

    def _leak_message(self) -> str:
        return f"{self!r} collected while still attached"


def attached_to(a: Attachment) -> str:
    """What an attachment is attached for, in a message: its DMA device, or
    its mapping type when it has none (a PAL or private attachment)."""
    if a.device is not None:
        return a.device.name
    mt = a.map_type
    return f"a {mt.type.name} attachment" if mt is not None else "an attachment without a device"


def attach_revocable(attachment: Attachment) -> bool:
    """``dma_buf_attach_revocable()`` (7.1): can the exporter revoke this
    importer, i.e. is it dynamic with an invalidation callback?"""
    if not isinstance(attachment, Attachment):
        raise TypeError(f"attach_revocable: {type(attachment).__name__} is not an Attachment")
    ops = attachment.importer_ops
    return ops is not None and ops.has_invalidate
