"""dma-direct (``kernel/dma/direct.c``): DMA without an IOMMU.

A DMA address is the physical address through the device's
``dma_range_map`` (:func:`dma_range_map`); a segment beyond the device's
DMA limit, or every segment of a device forced to bounce, goes through its
swiotlb pool.  The scatterlist walk itself is the core's
(``_core.map_sg_direct``); this module adds the bounces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pydmabuf import _core, errors
from pydmabuf._core import SgTable
from pydmabuf._types import U64_MAX, DmaAttrs, DmaDirection
from pydmabuf.swiotlb import _swiotlb_map

if TYPE_CHECKING:
    from pydmabuf.device import Device

__all__ = ["map_sg", "dma_range_map"]

_SG_LINK_MASK = ~np.uint64(3)


def _entry_phys(table: SgTable, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = table.entries[slots]
    return (e["page_link"] & _SG_LINK_MASK) + e["offset"].astype(np.uint64), e["length"].astype(np.uint64)


def dma_range_map(device: Device) -> np.ndarray:
    """The device's ``dma_range_map`` as flat u64 (cpu_start, dma_start,
    size) triples; a window of 2**64 bytes (a plain offset) is clamped to
    2**64 - 1, which no u64 comparison can tell apart."""
    return np.array([[r.cpu_start, r.dma_start, min(r.size, U64_MAX)] for r in device.dma_ranges],
                    dtype=np.uint64).reshape(-1)


def map_sg(device: Device, table: SgTable, d: DmaDirection, a: DmaAttrs,
           ctx: _core.P2pContext, claim: object = None) -> list[tuple[int, int, int, int]]:
    """``dma_direct_map_sg()``: one DMA segment per CPU entry, through the
    device's ``dma_range_map``; what the device cannot reach is bounced
    through its swiotlb pool.  Returns the bounces, (slot, bounce address,
    original physical address, size) each; on failure nothing stays
    mapped.  ``claim``: the record the caller claimed the table with (its
    ``mapping``), or None for an unclaimed table."""
    pool = device.swiotlb
    slots = _core.map_sg_direct(table, device.dma_limit, dma_range_map(device), device.force_swiotlb, pool is not None,
                                 int(a), ctx, claim)
    bounces: list[tuple[int, int, int, int]] = []
    if len(slots):
        if pool is None:
            # Only force_swiotlb without a pool gets here: with no io_tlb_mem
            # swiotlb_tbl_map_single() fails, so dma_direct_map_sg() is -EIO.
            _core.sg_clear_dma(table)
            raise errors.IOFailure(f"dma_map_sgtable: {device.name} must bounce and has no swiotlb pool")
        phys, lens = _entry_phys(table, slots)
        dmas = []
        try:
            for slot, p, n in zip(slots.tolist(), phys.tolist(), lens.tolist()):
                dma = _swiotlb_map(device, pool, p, n, d, a)
                bounces.append((slot, pool.tlb_of(dma, device), p, n))
                dmas.append(dma)
        except errors.DmaBufError as e:
            for _, tlb, _, _ in bounces:
                pool.free(tlb)
            _core.sg_clear_dma(table)
            if isinstance(e, errors.IommuFault):  # the access gate refused the bounce: its fault as it is
                raise
            raise errors.IOFailure(f"dma_map_sgtable: {device.name} cannot reach a segment and bouncing "
                                   f"failed: {e.strerror}") from None
        _core.sg_set_dma(table, np.asarray(slots, dtype=np.uint64), np.asarray(dmas, dtype=np.uint64))
    return bounces
