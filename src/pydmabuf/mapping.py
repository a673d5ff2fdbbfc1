"""dma-buf mapping types: exporter and importer negotiate how a buffer is
handed over (``include/linux/dma-buf-mapping.h`` / ``dma-buf-mapping.c`` of
the 2026 mapping-types RFC, Jason Gunthorpe, rebased onto 7.1).

At attach the importer lists the mapping types it can take; the exporter
lists what it can supply, in its order of preference, and calls
:func:`match_mapping`, which picks one pair and records it on the
attachment (``Attachment.map_type``, fixed for the attachment's life).

* A :class:`MappingType` is one instance, compared by identity.
* :data:`SGT`: the scatterlist the existing API hands out; peer-to-peer
  only through an exporter entry that requires it
  (:func:`sgt_exporter_p2p`), for an importer that accepts it and whose
  device has a P2P route to the exporter's PCI device.
* :data:`PAL`: a Physical Address List of (phys, nbytes) ranges, all MMIO,
  for importers that map it themselves (iommufd).  Taking it
  (:func:`pal_map_phys`) is restricted to importers that declared
  :data:`PAL_MODULE` (upstream exports the symbol to the iommufd module
  only); the importer owns the list until :func:`pal_unmap_phys`.
* A driver declares a private type entirely on its own: an instance of a
  :class:`MappingType` subclass and entries of it
  (:mod:`pydmabuf.exporters.xe_vfio` has one).

Where the posted code is loose the model is strict by default; each place
says what the kernel does, and ``kernel_compat=True`` lets the kernel's
behaviour through where a caller wants to see it:

* a ``match`` that returns a value instead of raising is a bug (TypeError),
  where the kernel passes a positive value up as an attach "error";
* the PAL list is validated (page alignment, no empty entry, no wrap past
  2**64 - 1, no more than the buffer) where the kernel checks nothing;
  with ``kernel_compat`` the list passes and :attr:`PhysList.problems`
  says what strict mode refused;
* PAL map on an attachment that did not negotiate PAL is EINVAL (the
  kernel would misuse the SGT ops as PAL ops); PAL unmap takes the
  reservation lock rule of map (the kernel asserts nothing there).

Layering: this module sits above :mod:`pydmabuf.dma` and below the
buffers (:mod:`pydmabuf.dmabuf`, :mod:`pydmabuf.dmabuf_attach`), which it
never imports: it sees an attachment as ``include/linux/dma-buf.h``
declares it (:class:`pydmabuf.dmabuf_ops.AttachmentBase`), as the C code
that includes the header does.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from pydmabuf import _dmabuf_api, checks, errors
from pydmabuf._core import u64_pairs
from pydmabuf._types import PAGE_SIZE, RangeKind
from pydmabuf.dma_buf_mapping import MappingMatch, MappingType, MatchArgs, match_mapping
from pydmabuf.dmabuf_ops import AttachmentBase, Exporter
from pydmabuf.machine import Device, Machine

if TYPE_CHECKING:
    from pydmabuf.dmabuf import DmaBuf
    from pydmabuf.dmabuf_attach import Attachment

log = logging.getLogger(__name__)

__all__ = [
    "MappingType",
    "MappingMatch",
    "MatchArgs",
    "SgtP2p",
    "PhysList",
    "match_mapping",
    "SGT",
    "PAL",
    "PAL_MODULE",
    "sgt_importer",
    "sgt_exporter",
    "sgt_exporter_p2p",
    "pal_importer",
    "pal_exporter",
    "sgt_dma_device",
    "sgt_p2p_allowed",
    "get_sgt_ops",
    "pal_map_phys",
    "pal_unmap_phys",
    "kernel_compat_active",
]

#: The one module the kernel exports :func:`pal_map_phys` to (iommufd: a
#: symbol restricted to named modules); importers declare it in
#: ``ImporterOps.import_namespaces``.
PAL_MODULE = "iommufd"

_GMASK = np.uint64(PAGE_SIZE - 1)

# Set while pal_map_phys(kernel_compat=True) runs, so an exporter's
# map_phys (whose signature is the kernel's: the attachment only) can let
# through what the posted code lets through.
_compat: contextvars.ContextVar[bool] = contextvars.ContextVar("pydmabuf_mapping_compat", default=False)


def kernel_compat_active() -> bool:
    """True inside ``pal_map_phys(..., kernel_compat=True)``: exporters that
    are loose upstream (VFIO's PAL map ignoring ``revoked``) behave as the
    posted code does."""
    return _compat.get()


# -------------------------------------------------------------------- SGT


class SgtP2p(enum.IntEnum):
    """``enum dma_sgt_requires_p2p`` (one enum for both roles, as upstream)."""

    NO_P2P = 0
    EXPORTER_REQUIRES_P2P_DISTANCE = 1
    IMPORTER_ACCEPTS_P2P = 2


# The members as plain names: an enum member read through its class is a
# class attribute look-up that costs more than the rest of a match.
_NO_P2P = SgtP2p.NO_P2P
_REQUIRES_P2P = SgtP2p.EXPORTER_REQUIRES_P2P_DISTANCE
_ACCEPTS_P2P = SgtP2p.IMPORTER_ACCEPTS_P2P


class _SgtType(MappingType):
    """``dma_buf_mapping_sgt_type``."""

    name = "DMA Mapped Scatter Gather Table"

    # Compiled (pydmabuf._dmabuf_api) with the attach that negotiates:
    # match(dmabuf, exp, imp) refuses a P2P-requiring exporter entry unless
    # the importer accepts P2P and reaches the exporting device;
    # finish_match(args, exp, imp) records the negotiated entry and
    # ``peer2peer`` on the attachment.
    match = _dmabuf_api.sgt_match
    finish_match = _dmabuf_api.sgt_finish_match

    def debugfs_dump(self, attach: Attachment) -> str:
        dev = sgt_dma_device(attach)
        return f" {dev.name}" if dev is not None else ""


class _PalType(MappingType):
    """``dma_buf_mapping_pal_type``: no match (any PAL pair is compatible)."""

    name = "Physical Address List"
    match = None

    def finish_match(self, args: MatchArgs, exp: MappingMatch, imp: MappingMatch) -> None:
        if args.attach is not None:
            args.attach.map_type = MappingMatch(self, exp.exp_ops)


#: The scatterlist type.
SGT: MappingType = _SgtType()
#: The physical-address-list type.
PAL: MappingType = _PalType()


def _need_ops(ops: Any, names: tuple[str, ...], what: str) -> None:
    for n in names:
        if not callable(getattr(ops, n, None)):
            raise TypeError(f"{what}: ops {type(ops).__name__} has no callable {n}")


def sgt_importer(device: Device | None, accepts_p2p: bool = False) -> MappingMatch:
    """``DMA_BUF_IMAPPING_SGT(dev, accepts)``: the importer takes a
    scatterlist mapped for ``device``."""
    entry: MappingMatch = _dmabuf_api.sgt_importer(device, accepts_p2p)
    return entry


def sgt_exporter(ops: Any) -> MappingMatch:
    """``DMA_BUF_EMAPPING_SGT(ops)``: ``ops.map_dma_buf(attachment,
    direction)`` / ``ops.unmap_dma_buf(attachment, table, direction)``;
    no peer-to-peer."""
    _need_ops(ops, ("map_dma_buf", "unmap_dma_buf"), "sgt_exporter")
    return MappingMatch(SGT, ops, exporter_requires_p2p=_NO_P2P, exporting_p2p_device=None)


def sgt_exporter_p2p(ops: Any, pci_device: Device) -> MappingMatch:
    """``DMA_BUF_EMAPPING_SGT_P2P(ops, pci_dev)``: peer-to-peer DMA to
    ``pci_device``'s memory, only for importers that accept it and reach
    it (``pci_p2pdma_distance() >= 0``)."""
    _need_ops(ops, ("map_dma_buf", "unmap_dma_buf"), "sgt_exporter_p2p")
    return MappingMatch(SGT, ops, exporter_requires_p2p=SgtP2p.EXPORTER_REQUIRES_P2P_DISTANCE,
                        exporting_p2p_device=pci_device)


def pal_importer() -> MappingMatch:
    """``DMA_BUF_IMAPPING_PAL()``."""
    return MappingMatch(PAL)


def pal_exporter(ops: Any) -> MappingMatch:
    """``DMA_BUF_EMAPPING_PAL(ops)``: ``ops.map_phys(attachment)`` returns
    the whole buffer's ranges (a :class:`PhysList` or an (N, 2) u64
    array); ``ops.unmap_phys(attachment, phys_list)`` takes them back."""
    _need_ops(ops, ("map_phys", "unmap_phys"), "pal_exporter")
    return MappingMatch(PAL, ops)


# -------------------------------------------------------------- accessors


def _map_type(attachment: Any) -> MappingMatch | None:
    try:
        mt: MappingMatch | None = attachment.map_type
    except AttributeError:  # not an attachment (or a half-built one): no type
        return None
    return mt


#: ``dma_buf_sgt_dma_device(attachment)``: the device the exporter maps
#: for, or None when the attachment is not SGT (compiled: exporters call it
#: on every map and unmap).
sgt_dma_device = _dmabuf_api.sgt_dma_device


def sgt_p2p_allowed(attachment: Attachment) -> bool:
    """``dma_buf_sgt_p2p_allowed()``: the P2P-requiring exporter entry was
    the one negotiated (False for a non-SGT attachment)."""
    mt = _map_type(attachment)
    return mt is not None and mt.type is SGT and \
        getattr(mt, "exporter_requires_p2p", None) == _REQUIRES_P2P


def get_sgt_ops(attachment: Attachment) -> Any:
    """``dma_buf_get_sgt_ops()``: the negotiated SGT ops, or None."""
    try:
        mt = attachment.map_type
    except AttributeError:
        return None
    return mt.exp_ops if mt is not None and mt.type is SGT else None


# -------------------------------------------------------------------- PAL


class PhysList:
    """``struct dma_buf_phys_list``: the whole buffer as (phys, nbytes)
    ranges, all MMIO, no provider and no attributes.

    Attributes
    ----------
    ranges : numpy.ndarray
        (N, 2) u64, read-only.
    length : int
        Entries (the kernel's field name; not bytes).
    problems : list of str
        What strict validation would have refused (filled only by a
        ``kernel_compat`` map).
    live : bool
        Owned by the importer (True until :func:`pal_unmap_phys`).
    """

    __slots__ = ("ranges", "problems", "live", "_attachment", "_track", "__weakref__")

    def __init__(self, ranges: Any) -> None:
        rows = np.array(u64_pairs(ranges, "phys list"), dtype=np.uint64, copy=True).reshape(-1, 2)
        rows.flags.writeable = False
        self.ranges = rows
        self.problems: list[str] = []
        self.live = False
        self._attachment: Any = None
        self._track: Any = None

    @property
    def length(self) -> int:
        return int(self.ranges.shape[0])

    @property
    def nbytes(self) -> int:
        """Sum of the lengths (Python int: no wrap)."""
        return int(self.ranges[:, 1].sum(dtype=object)) if self.length else 0

    def __len__(self) -> int:
        return self.length

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The (N, 2) u64 rows (read-only), for ``numpy.asarray``."""
        return self.ranges if dtype is None else self.ranges.astype(dtype)

    def __getitem__(self, i: Any) -> Any:
        return self.ranges[i]

    def tolist(self) -> list[list[int]]:
        """The rows as [phys, nbytes] lists."""
        rows: list[list[int]] = self.ranges.tolist()
        return rows

    def __repr__(self) -> str:
        state = "live" if self.live else "given back"
        return f"<PhysList {self.length} range(s), {self.nbytes:#x} bytes, {state}>"


def _validate(rows: np.ndarray, size: int) -> list[str]:
    """Strict PAL rules, vectorised: each entry page aligned, non-empty and
    inside the 64-bit space; lengths whole pages except that the last may
    stop where an unaligned buffer ends; the total within the buffer.
    Returns the problems found (empty: valid)."""
    out: list[str] = []
    n = len(rows)
    if n == 0:
        return ["the list has no entries"]
    p, ln = rows[:, 0], rows[:, 1]
    zero = np.flatnonzero(ln == 0)
    if len(zero):
        out.append(f"entry {int(zero[0])} has length 0")
    wraps = np.flatnonzero((ln != 0) & (ln - np.uint64(1) > ~p))
    if len(wraps):
        out.append(f"entry {int(wraps[0])} ({int(p[wraps[0]]):#x}, +{int(ln[wraps[0]]):#x}) wraps past 2**64 - 1")
    total = int(ln.sum(dtype=object))
    len_bad = (ln & _GMASK) != 0
    if total == size and size % PAGE_SIZE:
        len_bad[-1] = False  # the buffer itself ends inside a page
    bad = np.flatnonzero(((p & _GMASK) != 0) | len_bad)
    if len(bad):
        i = int(bad[0])
        out.append(f"entry {i} ({int(p[i]):#x}, +{int(ln[i]):#x}) is not page aligned")
    if total > size:
        out.append(f"the entries add up to {total:#x} bytes, more than the {size:#x}-byte buffer")
    return out


def _pal_ops(attachment: Attachment, what: str) -> Any:
    mt = _map_type(attachment)
    if mt is None or mt.type is not PAL:
        raise errors.InvalidArgument(f"{what}: the attachment negotiated "
                                     f"{mt.type.name if mt is not None else 'nothing'!r}, not PAL")
    return mt.exp_ops


def _gate(attachment: Attachment, what: str) -> None:
    ops = attachment.importer_ops
    if ops is None or PAL_MODULE not in ops.import_namespaces:
        raise errors.NotPermitted(f"{what} is exported to the {PAL_MODULE!r} module only; the importer did not "
                                  "declare it")


def resolve_phys(attachment: Attachment, ops: Any, what: str, kernel_compat: bool) -> PhysList:
    """Call ``ops.map_phys`` and check what came back (the shared body of
    :func:`pal_map_phys` and ``Attachment.phys_vec``): the lock is held."""
    token = _compat.set(bool(kernel_compat))
    try:
        got = ops.map_phys(attachment)
    finally:
        _compat.reset(token)
    if got is None:
        raise errors.OutOfMemory(f"{what}: map_phys returned no list")
    pl = got if isinstance(got, PhysList) else PhysList(got)
    problems = _validate(pl.ranges, attachment.dmabuf.size)
    try:
        if problems and not kernel_compat:
            raise errors.InvalidArgument(f"{what}: the exporter's list is invalid: {'; '.join(problems)}")
        machine = getattr(attachment.dmabuf.exporter, "machine", None)
        dev = attachment.device
        trusted = dev is not None and dev.cc_trusted
        if machine is not None and not trusted and pl.length and _touches_private(machine, pl.ranges):
            raise errors.NotPermitted(f"{dev.name if dev is not None else 'the importer'} is not trusted for "
                                      "confidential memory")
    except BaseException:
        ops.unmap_phys(attachment, pl)  # a failed map hands nothing out
        raise
    pl.problems = problems
    return pl


def _touches(machine: Machine, ranges: np.ndarray, kind: RangeKind) -> bool:
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



def _touches_private(machine: Machine, rows: np.ndarray) -> bool:
    ok = rows[(rows[:, 1] != 0) & ~(rows[:, 1] - np.uint64(1) > ~rows[:, 0])]
    return bool(len(ok)) and _touches(machine, ok, RangeKind.PRIVATE)


def pal_map_phys(attachment: Attachment, *, kernel_compat: bool = False) -> PhysList:
    """``dma_buf_pal_map_phys()``: the whole buffer as physical ranges.

    The reservation lock must be held (LockingError in strict checking).
    Only importers that declared :data:`PAL_MODULE` may call it.  The
    caller owns the list until :func:`pal_unmap_phys`; it must give it back
    from its invalidation callback when the exporter revokes, and may not
    touch the addresses afterwards.

    Parameters
    ----------
    attachment : Attachment
        A PAL attachment (from :meth:`DmaBuf.mapping_attach`).
    kernel_compat : bool
        Let through what the posted code lets through: an invalid list
        (:attr:`PhysList.problems` lists what strict mode refuses) and
        exporters' own loose checks (VFIO maps a revoked buffer).

    Raises
    ------
    NotPermitted
        (EPERM) the importer did not declare :data:`PAL_MODULE`, or the
        list reaches confidential memory and the importer's device is not
        trusted for it.
    InvalidArgument
        (EINVAL) the attachment did not negotiate PAL; strict mode: the
        exporter's list breaks a rule (see the module notes).
    Exception
        What the exporter's ``map_phys`` raised (VFIO: ENODEV revoked).

    A failed call hands out nothing.
    """
    if not isinstance(attachment, AttachmentBase):  # Attachment, the one subclass
        raise TypeError(f"pal_map_phys: {type(attachment).__name__} is not an Attachment")
    _gate(attachment, "dma_buf_pal_map_phys")
    if not attachment._usable("pal_map_phys"):
        raise errors.LifetimeError("pal_map_phys on a dead attachment")
    ops = _pal_ops(attachment, "dma_buf_pal_map_phys")
    attachment._require_resv("pal_map_phys")
    pl = resolve_phys(attachment, ops, "dma_buf_pal_map_phys", kernel_compat)
    pl.live = True
    pl._attachment = weakref.ref(attachment)
    pl._track = attachment._track_pal(pl)
    return pl


def pal_unmap_phys(attachment: Attachment, phys_list: PhysList) -> None:
    """``dma_buf_pal_unmap_phys()``: give the list back to the exporter.

    Any importer may call it (upstream exports it to all).  Giving back a
    list that is not a live list of this attachment is a LifetimeError
    (strict checking); the reservation lock is required as for the map
    (upstream asserts nothing; iommufd holds it)."""
    if not isinstance(attachment, AttachmentBase):  # Attachment, the one subclass
        raise TypeError(f"pal_unmap_phys: {type(attachment).__name__} is not an Attachment")
    if not isinstance(phys_list, PhysList):
        raise TypeError(f"pal_unmap_phys: {type(phys_list).__name__} is not a PhysList")
    owner = phys_list._attachment() if phys_list._attachment is not None else None
    if not phys_list.live or owner is not attachment:
        checks.checker.lifetime("bad-pal-unmap", "dma_buf_pal_unmap_phys of a list that is not a live list of "
                                "this attachment (a double unmap?)", attachment, culprit=attachment.importer_ops)
        return
    attachment._require_resv("pal_unmap_phys")
    ops = _pal_ops(attachment, "dma_buf_pal_unmap_phys")
    ops.unmap_phys(attachment, phys_list)
    phys_list.live = False
    attachment._untrack(phys_list._track)
    phys_list._track = None


# ----------------------------------------------- the transition (compat)


#: ``dma_buf_sgt_exp_compat_match``'s ops: forward to the unaware exporter
#: of the attachment's buffer, its own ``map_dma_buf`` / ``unmap_dma_buf``
#: (compiled: the static importer's map and unmap of every legacy exporter
#: go through it).
_LegacySgtOps = _dmabuf_api._LegacySgtOps


class _LegacyPalOps:
    """PAL ops over the model's older physical-range op (``get_phys_vec``)
    of an exporter that predates mapping types, for ``phys_vec`` only.
    Refuses a revoked buffer (ENODEV), as the op it replaces."""

    __slots__ = ("exporter",)

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def map_phys(self, attachment: Attachment) -> PhysList:
        if attachment.dmabuf.revoked:
            raise errors.Revoked(f"{attachment.dmabuf.name} was revoked")
        return PhysList(self.exporter.get_phys_vec(attachment).ranges)

    def unmap_phys(self, attachment: Attachment, phys_list: PhysList) -> None:
        pass  # the list was a copy; nothing to free


def exporter_matches(args: MatchArgs, exporter: Any) -> None:
    """What ``dma_buf_mapping_attach()`` does with the exporter: its
    ``match_mapping`` if it has one, else its ``single_exporter_match``,
    else (transition, ``dma_buf_sgt_exp_compat_match``) one SGT NO_P2P
    entry forwarding to its legacy ``map_dma_buf``/``unmap_dma_buf``."""
    _dmabuf_api.exporter_matches(args, exporter)


#: The compat SGT NO_P2P entry: one for every exporter, since its ops find
#: the exporter through the attachment.
_COMPAT_SGT = sgt_exporter(_LegacySgtOps())
_COMPAT_ENTRIES = (_COMPAT_SGT,)


def _warn_p2p_without_device() -> None:
    """The SGT match's warning about a P2P-requiring exporter entry that
    names no PCI device (logged here, by this module's logger)."""
    log.warning("SGT match: a P2P-requiring exporter entry without a P2P device")


_dmabuf_api.bind_types(SGT, _COMPAT_ENTRIES, _NO_P2P, _REQUIRES_P2P, _ACCEPTS_P2P, _warn_p2p_without_device)


def exporter_pal_ops(dmabuf: DmaBuf) -> Any:
    """The PAL ops the exporter offers, or None, for the thin
    ``Attachment.phys_vec`` layer on attachments of another type: an aware
    exporter is asked with a one-entry PAL importer list and no attachment;
    an exporter that predates mapping types but has the model's older
    physical-range op (``get_phys_vec``) is served through it.  (That op is
    never offered in a negotiation: upstream wraps legacy exporters as SGT
    only, so iommufd cannot import a system-heap buffer.)"""
    exp = dmabuf.exporter
    cls = type(exp)
    if not cls.has("match_mapping") and getattr(exp, "single_exporter_match", None) is None:
        return _LegacyPalOps(exp) if cls.has("get_phys_vec") else None
    args = MatchArgs(dmabuf, None, [pal_importer()])
    try:
        exporter_matches(args, dmabuf.exporter)
    except errors.InvalidArgument:
        return None
    assert args.chosen is not None
    return args.chosen[0].exp_ops
