"""The declarations of ``include/linux/dma-buf.h``: the ops tables an
exporter and a dynamic importer fill in (:class:`Exporter`,
:class:`ImporterOps`), the physical-range description (:class:`PhysVec`),
and ``struct dma_buf`` / ``struct dma_buf_attachment`` as the header
declares them (:class:`DmaBufBase`, :class:`AttachmentBase`: the fields and
the header's small inline helpers).

The operations live above: :mod:`pydmabuf.dmabuf` (``dma-buf.c``: export,
references, invalidation, revoke), :mod:`pydmabuf.dmabuf_attach`
(attachments and their mappings) and :mod:`pydmabuf.dmabuf_mmap` (the CPU
mapping).  The modules between them and this one (the mapping types, the
CPU mapping) check an argument against the two bases, as C code that
includes the header sees the structs, so nothing imports upward.

Everything public here is re-exported by :mod:`pydmabuf.dmabuf`.
:func:`timeout_arg` is the fence-wait timeout parser the exporters and
importers share (a contract of the layer, not in ``__all__``).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from pydmabuf import errors
from pydmabuf._core import Resv, SgTable
from pydmabuf import _dmabuf_api
from pydmabuf._dmabuf_api import AttachmentCore
from pydmabuf._types import DmaDirection
from pydmabuf.machine import Device, P2pProvider

if TYPE_CHECKING:
    from pydmabuf import mapping
    from pydmabuf.dmabuf import DmaBuf
    from pydmabuf._dmabuf_api import _Mapping, _MapRefs
    from pydmabuf.dmabuf_attach import Attachment
    from pydmabuf.dmabuf_mmap import CpuMapping

__all__ = ["Exporter", "ImporterOps", "PhysVec", "DmaBufBase", "AttachmentBase", "DMA_BUF_NAME_LEN"]

#: Names are at most 31 characters (32 bytes with the NUL).
DMA_BUF_NAME_LEN = 32


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
    single_exporter_match: mapping.MappingMatch | None = None

    # -- ops (override) --
    def match_mapping(self, args: mapping.MatchArgs) -> None:
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


# ------------------------------------------------------------ the structs


class DmaBufBase:
    """``struct dma_buf`` as the header declares it: the fields, set by
    :meth:`pydmabuf.dmabuf.DmaBuf._new`, and the accessors that read them.
    :class:`~pydmabuf.dmabuf.DmaBuf` is the one subclass; the CPU mapping
    checks its argument against this base."""

    # Set by _new (no __init__ runs).  Annotations only, no class values:
    # a half-built object must still raise AttributeError on what it lacks
    # (the lifecycle base then stays quiet about it).
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
    _idle_waiters: int
    _vmap_count: int
    _vmap_ptr: Any  # whatever the exporter's vmap returned
    _cpu_maps: weakref.WeakSet[CpuMapping]
    _generation: int  # of the backing: bumped by every move (the access gate's leases compare it)
    _mmap_refs: int  # of _refs, those CPU mappings hold (DmaBuf.mmap)

    # ------------------------------------------------------ identity, refs

    @property
    def name(self) -> str:
        return self._name or f"dmabuf@{id(self):x}"

    def set_name(self, name: str) -> None:
        """``DMA_BUF_SET_NAME``: at most 31 bytes (EINVAL otherwise); allowed
        while attached (the kernel documents EBUSY but never returns it)."""
        self._name = check_name(name)

    @property
    def refcount(self) -> int:
        return self._refs

    # Compiled (pydmabuf._dmabuf_api, where the attach and map paths read
    # them without a Python call).
    if TYPE_CHECKING:
        @property
        def released(self) -> bool:
            """Released: the last reference was put."""
    else:
        released = property(_dmabuf_api.buf_released, doc="Released: the last reference was put.")

    @property
    def generation(self) -> int:
        """Which backing the buffer has: 0 at export, one more after each
        :meth:`move`.  A CPU mapping resolved against an older generation
        is refused by the access gate (:mod:`pydmabuf.access`)."""
        return self._generation

    _alive = _dmabuf_api.buf_alive  # the checker's use-after-release unless alive


class AttachmentBase(AttachmentCore):
    """``struct dma_buf_attachment`` as the header declares it: the fields,
    set by the attach (compiled, :class:`pydmabuf._dmabuf_api.AttachmentCore`
    holds them), and the checks every attachment operation starts with
    (``_usable``, ``_require_resv``).
    :class:`~pydmabuf.dmabuf_attach.Attachment` is the one subclass; the
    mapping-type helpers (:mod:`pydmabuf.mapping`) check their argument
    against this base."""

    # The compiled base's fields, declared for type checkers.
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
    _maps: set[_Mapping]  # read-only
    _dev_refs: _MapRefs | None  # the checker's record of the device's mappings (pydmabuf._dmabuf_api)


def check_name(name: Any) -> str:
    """A dma-buf name (``DMA_BUF_SET_NAME``): a str of at most 31 bytes."""
    if not isinstance(name, str):
        raise TypeError("name must be a str")
    if len(name.encode()) >= DMA_BUF_NAME_LEN:
        raise errors.InvalidArgument(f"name {name!r} is longer than {DMA_BUF_NAME_LEN - 1} bytes")
    return name


def timeout_arg(timeout: Any, what: str) -> None:
    """Seconds (int or float, >= 0) or None, as the fence waits take them."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what}: timeout must be seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:
        raise errors.InvalidArgument(f"{what}: timeout must be >= 0 seconds or None (got {timeout!r})")

