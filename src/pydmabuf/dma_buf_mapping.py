"""dma-buf's mapping helpers (``drivers/dma-buf/dma-buf-mapping.c``).

* :func:`dma_buf_phys_vec_to_sgt` / :func:`dma_buf_free_sgt`: the helper an
  exporter of MMIO calls to turn its physical ranges into a DMA-only table
  for an importer, by the P2P route between them (bus addresses, or one
  IOVA range linked with the two-step API, or one ``dma_map_phys`` per
  range without an IOMMU).
* The mapping-types matcher: :class:`MappingType`, :class:`MappingMatch`,
  :class:`MatchArgs` and :func:`match_mapping` (``dma_buf_match_mapping()``).
  The built-in SGT and PAL types, their entries and the PAL map/unmap are
  in :mod:`pydmabuf.mapping`, which re-exports these names.

The module sits above the DMA API it uses and below :mod:`pydmabuf.mapping`
and :mod:`pydmabuf.dmabuf`: it sees an attachment as ``include/linux/dma-buf.h``
declares it (:class:`pydmabuf.dmabuf_ops.AttachmentBase`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast

import numpy as np

from pydmabuf import _core, _dmabuf_api, checks, errors
from pydmabuf._args import _dir, _need_int
from pydmabuf._core import SgTable
from pydmabuf._types import U64_MAX, DmaAttrs, DmaDirection
from pydmabuf.device import Device
from pydmabuf.dma import _match, _need_table, _singles_lock, dma_map_phys, dma_unmap_phys
from pydmabuf.dma_iommu import IovaState
from pydmabuf.dmabuf_ops import AttachmentBase
from pydmabuf.pci import P2pProvider, P2PMapType

if TYPE_CHECKING:
    from pydmabuf.dmabuf import Attachment, DmaBuf

log = logging.getLogger(__name__)

__all__ = ["dma_buf_phys_vec_to_sgt", "dma_buf_free_sgt", "PhysVecMapping", "MAX_SG_ENT_SZ",
           "MappingType", "MappingMatch", "MatchArgs", "match_mapping"]


def _is_attachment(obj: object) -> bool:
    """``obj`` is a dma-buf attachment (the structure ``dma-buf.h`` declares;
    :class:`pydmabuf.dmabuf.Attachment` is its only implementation)."""
    return isinstance(obj, AttachmentBase)


MAX_SG_ENT_SZ = _core.MAX_SG_ENT_SZ


@dataclass(eq=False)
class PhysVecMapping:
    """What a table from :func:`dma_buf_phys_vec_to_sgt` remembers."""

    device: Device
    route: P2PMapType
    direction: DmaDirection
    nbytes: int
    state: IovaState | None = None
    singles: list[tuple[int, int]] = field(default_factory=list)
    leaked_iova: bool = False

    @property
    def device_name(self) -> str:
        return self.device.name


def dma_buf_phys_vec_to_sgt(device: Device | Attachment, provider: P2pProvider | None, ranges: Any,
                            nbytes: int | None = None, direction: DmaDirection | int = DmaDirection.BIDIRECTIONAL,
                            *, kernel_compat: bool = False) -> SgTable:
    """``dma_buf_phys_vec_to_sgt()``: a DMA-only table for MMIO ranges.

    ``device`` is a :class:`Device`, or an :class:`~pydmabuf.dmabuf.Attachment`
    (then its reservation lock must be held, as the kernel asserts).  The
    route is ``pci_p2pdma_map_type(provider, device)``: BUS_ADDR
    entries are ``phys + bus_offset`` (nothing mapped); THRU_HOST_BRIDGE
    reserves one IOVA range and links every range into it (one sync), or
    without an IOMMU maps each range with :func:`dma_map_phys` (MMIO);
    anything else is EINVAL.  Entries longer than MAX_SG_ENT_SZ are split.

    The kernel links every range at IOVA offset 0, so a second range
    collides; and it leaks the IOVA when the first link fails.  The model
    links each range at its running offset.  ``kernel_compat=True`` does
    what the kernel does, to show both.
    """
    d = _dir(direction)
    if not isinstance(device, Device) and not _is_attachment(device):
        raise TypeError(f"dma_buf_phys_vec_to_sgt: device must be a Device or an Attachment, "
                        f"not {type(device).__name__}")
    if not isinstance(device, Device):
        # An attachment: the dma-buf helper proper, under its reservation lock.
        attach = device
        if not attach.dmabuf.resv.held_by_current_thread():
            checks.checker.locking("phys-vec-to-sgt-without-resv",
                                   "dma_buf_phys_vec_to_sgt without the reservation lock", attach)
        dev = cast(Device, attach.device)
    else:
        dev = device
    if provider is None:
        raise errors.InvalidArgument("dma_buf_phys_vec_to_sgt: no P2P provider (not MMIO)")
    if not isinstance(provider, P2pProvider):
        raise TypeError(f"dma_buf_phys_vec_to_sgt: provider must be a P2pProvider, not {type(provider).__name__}")
    rows = _core.u64_pairs(ranges, "dma_buf_phys_vec_to_sgt ranges")  # no copy for a u64 table
    total = int(_core.ranges_total(rows, "dma_buf_phys_vec_to_sgt"))
    if nbytes is None:
        nbytes = total
    _need_int("dma_buf_phys_vec_to_sgt", nbytes=nbytes)
    if nbytes <= 0:
        raise errors.InvalidArgument(f"dma_buf_phys_vec_to_sgt: size {nbytes} must be positive")
    if not dev.is_pci:
        raise errors.InvalidArgument(f"dma_buf_phys_vec_to_sgt: {dev.name} is not a PCI device")
    route = dev.machine.p2p_map_type(provider, dev)
    m = PhysVecMapping(dev, route, d, nbytes)
    if route == P2PMapType.BUS_ADDR:
        bus = rows.copy()
        bus[:, 0] = (rows[:, 0] + np.uint64(provider.bus_offset & U64_MAX))
        table = SgTable.from_ranges(bus)
    elif route == P2PMapType.THRU_HOST_BRIDGE:
        st = IovaState.try_alloc(dev, 0, nbytes)
        if st.uses_iova:
            if kernel_compat:
                mapped = _compat_link(st, rows, d)
            else:
                try:
                    mapped = st.link_ranges(rows, d, DmaAttrs.MMIO)
                except errors.DmaBufError:
                    st.free()
                    raise
            st.sync(0, mapped)
            table = SgTable.from_ranges([[st.addr, mapped]])
            m.state = st
        else:
            addrs = []
            try:
                for p, n in rows.tolist():
                    dma = dma_map_phys(dev, p, n, d, DmaAttrs.MMIO)
                    m.singles.append((dma, n))
                    addrs.append([dma, n])
            except errors.DmaBufError:
                for dma, n in m.singles:
                    dma_unmap_phys(dev, dma, n, d, DmaAttrs.MMIO)
                raise
            table = SgTable.from_ranges(addrs)
    else:
        raise errors.InvalidArgument(f"dma_buf_phys_vec_to_sgt: {dev.name} cannot reach "
                                     f"{provider.owner.name}'s BAR ({route.name})")
    table.mapping = m
    return table


#: IOVA reservations leaked by ``kernel_compat`` runs: (device, iova, nbytes).
leaked: list[tuple[Device, int, int]] = []


def _compat_link(st: IovaState, rows: np.ndarray, d: DmaDirection) -> int:
    """The kernel helper's loop: every range linked at IOVA offset 0; on a
    failure, destroy what was mapped, except when the first link failed
    (then the reservation leaks, as upstream)."""
    mapped = 0
    for i, (p, n) in enumerate(rows.tolist()):
        try:
            st.link_ranges(np.array([[p, n]], dtype=np.uint64), d, DmaAttrs.MMIO, _all_at_offset=True)
        except errors.DmaBufError:
            if i == 0:
                st._live = False
                leaked.append((st.device, st.addr - st._offset, st._reserved))
                log.warning("dma_buf_phys_vec_to_sgt (kernel_compat): IOVA [%#x, +%#x] leaked",
                            st.addr, st._reserved)
            else:
                st.destroy(st.linked_nbytes, d, DmaAttrs.MMIO)
            raise
        mapped += n
    return mapped


def dma_buf_free_sgt(table: SgTable, direction: DmaDirection | int | None = None) -> None:
    """``dma_buf_free_sgt()``: undo :func:`dma_buf_phys_vec_to_sgt`."""
    m = _need_table(table, "dma_buf_free_sgt").mapping
    if not isinstance(m, PhysVecMapping):
        raise errors.LifetimeError("dma_buf_free_sgt: the table did not come from dma_buf_phys_vec_to_sgt "
                                   "or was freed already")
    if direction is not None and _dir(direction) != m.direction:
        raise errors.LifetimeError(f"dma_buf_free_sgt: mapped {m.direction.name}, freed {_dir(direction).name}")
    if m.singles:
        # All or nothing: every range must still be a live mapping before
        # the first is unmapped (a failed call changes nothing).
        taken: dict[int, int] = {}
        with _singles_lock:
            for dma, n in m.singles:
                _match(m.device, dma, n, m.direction, DmaAttrs.MMIO, taken)
    if m.state is not None:
        m.state.destroy(m.state.linked_nbytes, m.direction, DmaAttrs.MMIO)
    for dma, n in m.singles:
        dma_unmap_phys(m.device, dma, n, m.direction, DmaAttrs.MMIO)
    table.mapping = None


# ------------------------------------------- mapping types: the matcher
# (``dma_buf_match_mapping()`` and the two structures it works on; the
# built-in SGT and PAL types and their entries are in pydmabuf.mapping)



class MappingType:
    """``struct dma_buf_mapping_type``: one instance per type, compared by
    identity (two entries have the same type iff their ``type`` is the same
    object).

    Attributes
    ----------
    name : str
        Printed in the debugfs listing.
    match : callable or None
        ``match(dmabuf, exp, imp)``: return None (or 0) for compatible; raise
        :class:`~pydmabuf.errors.NotSupported` (EOPNOTSUPP) for "not this
        pair, keep looking"; raise anything else to abort the negotiation
        with that error.  None (the default): same type is compatible.
    """

    name: str = "mapping type"
    match: Callable[[Any, MappingMatch, MappingMatch], None] | None = None

    def finish_match(self, args: MatchArgs, exp: MappingMatch, imp: MappingMatch) -> None:
        """Record the chosen pair on ``args.attach`` (when there is one):
        called once, on the pair :func:`match_mapping` chose.  Required."""
        raise NotImplementedError(f"{type(self).__name__} has no finish_match")

    def debugfs_dump(self, attach: Attachment) -> str:
        """Text the debugfs line shows after the type's name."""
        return ""

    def __repr__(self) -> str:
        return f"<mapping type {self.name!r}>"


class MappingMatch(_dmabuf_api.MatchCore):
    """``struct dma_buf_mapping_match``: one entry of an importer's or an
    exporter's list.

    Parameters
    ----------
    type : MappingType
    exp_ops : object, optional
        The exporter's ops for this type (None in importer entries).
    **data
        The type's data (SGT: ``importing_dma_device``,
        ``importer_accepts_p2p``, ``exporter_requires_p2p``,
        ``exporting_p2p_device``); read back as attributes.

    Its attributes are plain instance attributes, read through the
    getattr slot of its compiled base (:class:`pydmabuf._dmabuf_api.MatchCore`),
    which also answers a read of a name the entry does not have.
    """

    type: MappingType
    exp_ops: Any
    _data: dict[str, Any]

    def __init__(self, type: MappingType, exp_ops: Any = None, **data: Any) -> None:
        if not isinstance(type, MappingType):
            raise TypeError(f"MappingMatch: type must be a MappingType, not {builtin_type(type).__name__}")
        # ``type`` and ``exp_ops`` cannot be in ``data``: Python binds them
        # to the parameters (or refuses a second value).
        self.type = type
        self.exp_ops = exp_ops
        self._data = data  # a new dict of this call's keywords
        # The data as instance attributes too, so that reading one is a
        # dict hit; names the class has keep meaning the class's.
        if _MATCH_CLASS_NAMES.isdisjoint(data):
            self.__dict__.update(data)
        else:
            for k, v in data.items():
                if k not in _MATCH_CLASS_NAMES:
                    self.__dict__[k] = v

    @classmethod
    def _of(cls, type: MappingType, exp_ops: Any, data: dict[str, Any]) -> MappingMatch:
        """What ``MappingMatch(type, exp_ops, **data)`` makes, for the
        built-in entries: ``type`` is a MappingType and ``data`` a dict of
        their own, with no name the class has (the callers' literals)."""
        return _dmabuf_api.match_of(cls, type, exp_ops, data)

    @property
    def data(self) -> dict[str, Any]:
        """The type's data (a copy)."""
        return dict(self._data)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={_short(v)}" for k, v in self._data.items())
        ops = f", ops={type(self.exp_ops).__name__}" if self.exp_ops is not None else ""
        return f"<MappingMatch {self.type.name!r}{ops}{extra}>"


builtin_type = type
#: Names a MappingMatch's type data may not shadow as instance attributes.
_MATCH_CLASS_NAMES = frozenset(dir(MappingMatch)) | {"_data"}


def _short(v: Any) -> str:
    name = getattr(v, "name", None)
    if isinstance(v, enum.Enum):
        return str(v.name)
    return str(name) if isinstance(name, str) else repr(v)


class MatchArgs:
    """``struct dma_buf_match_args``: what the attach hands the exporter.

    ``dmabuf`` and ``attach`` may be None (the kunit tests call the matcher
    with neither).  After a successful :func:`match_mapping`, ``chosen``
    is the (exporter entry, importer entry) pair (a model addition: the
    kernel keeps only what ``finish_match`` wrote)."""

    def __init__(self, dmabuf: DmaBuf | None = None, attach: Attachment | None = None,
                 imp_matches: Sequence[MappingMatch] = ()) -> None:
        imp = tuple(imp_matches) if imp_matches is not None else ()
        for e in imp:
            if not isinstance(e, MappingMatch):
                raise TypeError(f"MatchArgs: importer entries must be MappingMatch, not {type(e).__name__}")
        self.dmabuf = dmabuf
        self.attach = attach
        self.imp_matches = imp
        self.chosen: tuple[MappingMatch, MappingMatch] | None = None

    @classmethod
    def _of(cls, dmabuf: DmaBuf, attach: Attachment, imp: tuple[MappingMatch, ...]) -> MatchArgs:
        """``MatchArgs(dmabuf, attach, imp)`` for the attach, whose importer
        entries are a tuple of MappingMatch checked already."""
        return _dmabuf_api.match_args_of(cls, dmabuf, attach, imp)

    def __repr__(self) -> str:
        return f"<MatchArgs {len(self.imp_matches)} importer entr{'y' if len(self.imp_matches) == 1 else 'ies'}>"


def _match_result(rv: Any, what: str) -> None:
    """A callback's return in kernel terms: None or 0 is success, a
    negative errno raises its error (-EOPNOTSUPP: NotSupported); anything
    else is a bug (the kernel would pass a positive value up as an attach
    result that no caller recognises as an error)."""
    if rv is None or (isinstance(rv, int) and not isinstance(rv, bool) and rv == 0):
        return
    if isinstance(rv, int) and not isinstance(rv, bool) and rv < 0:
        raise errors.from_errno(-rv, f"{what} returned {rv}")
    raise TypeError(f"{what} returned {rv!r}; it must return None (or 0) or raise")


def match_mapping(args: MatchArgs, exp_matches: Iterable[MappingMatch] | None) -> None:
    """``dma_buf_match_mapping()``: pick the first compatible pair.

    Exporter entries are the outer loop, importer entries the inner one
    (restarted for every exporter entry), so the exporter's order wins.
    Entries of different types are skipped without calling ``match``; a
    type without ``match`` is compatible with itself.  The chosen pair's
    type gets ``finish_match(args, exp, imp)`` once.

    Raises
    ------
    InvalidArgument
        (EINVAL) no compatible pair (empty lists included); no callback
        ran ``finish_match``.
    Exception
        Whatever a type's ``match`` raised other than NotSupported, at
        once, with no ``finish_match``.
    TypeError
        A ``match`` returned something other than None, 0 or a negative
        errno (a negative errno acts as the error it names; the kernel
        would pass a positive value up as an attach result no caller
        recognises).
    """
    # Compiled (pydmabuf._dmabuf_api), with the attach that calls it.
    _dmabuf_api.match_mapping(args, exp_matches)


_dmabuf_api.bind_matcher(MappingMatch, MatchArgs, _match_result)
