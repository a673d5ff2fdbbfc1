"""Attachments: one importer's use of a dma-buf, and the mappings it takes
(the attach, map, pin and physical-range half of ``drivers/dma-buf/dma-buf.c``).

:class:`Attachment` (``struct dma_buf_attachment``) maps and unmaps with
the reservation lock held, pins for a dynamic importer, and hands out
physical ranges (:meth:`Attachment.phys_vec`).  Its fields and the paths
of attach, map, unmap and detach are compiled (:mod:`pydmabuf._dmabuf_api`);
the methods here keep their documentation.  Every table it hands out is
tracked there (``_Mapping``), weakly, so that the access gate can refuse
DMA through a mapping the exporter invalidated or of a buffer released
under it, and so that the IOTLB can name the mapping a stale entry
belonged to.

The attach itself (``dma_buf_attach()``, the negotiation) and the detach
are :class:`~pydmabuf.dmabuf.DmaBuf` methods, in :mod:`pydmabuf.dmabuf`.
The public names here are re-exported there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf import _dmabuf_api, access, checks, errors, iotlb, mapping
from pydmabuf._core import SgTable, set_sg_with_hook
from pydmabuf._dmabuf_api import _Mapping, _MapRefs, live_maps as _live_maps, table_map as _table_map
from pydmabuf._lifecycle import Owner
from pydmabuf._types import DmaDirection
from pydmabuf.dmabuf_ops import AttachmentBase, DmaBufBase, Exporter, ImporterOps, PhysVec
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

# ---------------------------------------------------------------- mappings
# The checker's record of each table handed out (``_Mapping``), per
# attachment, per buffer and per device, is compiled with the paths that
# keep it (pydmabuf._dmabuf_api): ``_device_maps`` holds each device's
# weak references, ``_table_map`` finds a table's live record.

_device_maps = _dmabuf_api.device_maps


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

    # ------------------------------------------------------------- mapping

    # The entry points are compiled functions (pydmabuf._dmabuf_api, with
    # their documentation), bound here as the methods: no Python frame of
    # the package between the caller and the work.
    map = _dmabuf_api.map_attachment

    unmap = _dmabuf_api.unmap_attachment

    map_unlocked = _dmabuf_api.map_unlocked

    unmap_unlocked = _dmabuf_api.unmap_unlocked

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
        return _dmabuf_api.track(self, None, _BIDI, False, _NO_ROWS)

    def _untrack(self, m: _Mapping) -> None:
        """Take a record out (the importer gave the mapping back)."""
        _dmabuf_api.untrack(self, m)

    def _type_name(self) -> str:
        return self.map_type.type.name if self.map_type is not None else "nothing"

    def track_dma(self, dma_ranges: Any, direction: DmaDirection | int = _BIDI) -> _Mapping:
        """Tell the checker about DMA addresses an importer mapped itself
        (from :meth:`phys_vec` with the list-free API): DMA through them
        after an invalidation is then caught.  Returns a handle for
        :meth:`untrack_dma`."""
        return _dmabuf_api.track(self, None, direction, False, dma_ranges)

    def untrack_dma(self, handle: object) -> None:
        if handle in self._maps:
            assert isinstance(handle, _Mapping)
            _dmabuf_api.untrack(self, handle)

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
        if self.dmabuf is None:  # made with __new__, never attached
            return "<Attachment never attached>"
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

    def _leak_message(self) -> str:
        return f"{self!r} collected while still attached"


_dmabuf_api.bind(Attachment, Device, Exporter, DmaBufBase)


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
