"""dma-buf's mapping helpers (``drivers/dma-buf/dma-buf-mapping.c``).

* :func:`dma_buf_phys_vec_to_sgt` / :func:`dma_buf_free_sgt`: the helper an
  exporter of MMIO calls to turn its physical ranges into a DMA-only table
  for an importer, by the P2P route between them (bus addresses, or one
  IOVA range linked with the two-step API, or one ``dma_map_phys`` per
  range without an IOMMU).

The module sits above the DMA API it uses and below :mod:`pydmabuf.dmabuf`,
whose attachments it takes: it names :class:`~pydmabuf.dmabuf.Attachment`
in annotations only (see :func:`_is_attachment`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pydmabuf import _core, checks, errors
from pydmabuf._args import _dir, _need_int
from pydmabuf._core import SgTable
from pydmabuf._types import U64_MAX, DmaAttrs, DmaDirection
from pydmabuf.device import Device
from pydmabuf.dma import _match, _need_table, _singles_lock, dma_map_phys, dma_unmap_phys
from pydmabuf.dma_iommu import IovaState
from pydmabuf.pci import P2pProvider, P2PMapType

if TYPE_CHECKING:
    from pydmabuf.dmabuf import Attachment

log = logging.getLogger(__name__)

__all__ = ["dma_buf_phys_vec_to_sgt", "dma_buf_free_sgt", "PhysVecMapping", "MAX_SG_ENT_SZ"]


def _is_attachment(obj: object) -> bool:
    """``obj`` is a :class:`pydmabuf.dmabuf.Attachment`.  Looked up, not
    imported: dma-buf sits above this module (it calls the helpers here),
    and an attachment cannot exist before :mod:`pydmabuf.dmabuf` is loaded."""
    mod = sys.modules.get("pydmabuf.dmabuf")
    return mod is not None and isinstance(obj, mod.Attachment)


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
    rows = _core._u64_pairs(ranges, "dma_buf_phys_vec_to_sgt ranges")  # no copy for a u64 table
    total = int(_core._ranges_total(rows, "dma_buf_phys_vec_to_sgt"))
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
