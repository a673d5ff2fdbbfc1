"""pydmabuf: an executable, fast model of the Linux buffer-sharing stack.

dma-buf exporters, importers and attachments; the reservation locks and
fences that order them; and under them scatterlists, dma-direct, IOMMU
domains with IOVA allocation and IO page tables, and the list-free two-step
IOVA API.  See the README for a tour.
"""

from __future__ import annotations

from pydmabuf import errors
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE, Caching, DmaDirection, IommuProt, Range, RangeKind, Usage
from pydmabuf._core import (
    MAX_SG_ENT_SZ,
    SCATTERLIST_MAX_SEGMENT,
    AcquireContext,
    Fence,
    FenceArray,
    FenceCallback,
    FenceChain,
    IommuDomain,
    IoPageTable,
    IovaDomain,
    RangeTable,
    Resv,
    ResvIter,
    SgTable,
    WwClass,
    WwMutex,
    begin_signalling,
    end_signalling,
    fence_chain_contained,
    fence_chain_find_seqno,
    fence_context_alloc,
    fence_merge,
    fence_unwrap,
    fence_wait_any,
    flush_signals,
    get_stub_fence,
    in_signalling_section,
    pagemap,
    private_stub_fence,
    reservation_ww_class,
    signal_pending,
    signal_thread,
    usage_rw,
)
from pydmabuf.locking import locked, signalling_section

from pydmabuf.device import Device
from pydmabuf.machine import Machine, p2p_map_type
from pydmabuf.pci import P2PMapType, P2pProvider
from pydmabuf._types import DmaAttrs
from pydmabuf.dma_iommu import IovaState
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dma import (
    dma_map_phys,
    dma_map_sgtable,
    dma_sync_sgtable_for_cpu,
    dma_sync_sgtable_for_device,
    dma_unmap_phys,
    dma_unmap_sgtable,
)
# The dma-buf names, exactly dmabuf.__all__ (a test keeps the two equal).
from pydmabuf.dmabuf import (
    Attachment,
    CpuMapping,
    DMA_BUF_NAME_LEN,
    DmaBuf,
    Exporter,
    ImporterOps,
    PHYS_NAMESPACE,
    PhysVec,
    attach_revocable,
    close,
    dma_buf_get,
    export,
)
from pydmabuf import checks

from pydmabuf._about import VERSION as __version__

__all__ = [
    "__version__",
    "errors",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "MAX_SG_ENT_SZ",
    "SCATTERLIST_MAX_SEGMENT",
    "Caching",
    "DmaDirection",
    "IommuDomain",
    "IommuProt",
    "IoPageTable",
    "IovaDomain",
    "Range",
    "RangeKind",
    "RangeTable",
    "SgTable",
    "pagemap",
    "Machine",
    "Device",
    "P2PMapType",
    "P2pProvider",
    "p2p_map_type",
    "DmaAttrs",
    "IovaState",
    "dma_map_sgtable",
    "dma_unmap_sgtable",
    "dma_sync_sgtable_for_cpu",
    "dma_sync_sgtable_for_device",
    "dma_map_phys",
    "dma_unmap_phys",
    "dma_buf_phys_vec_to_sgt",
    "dma_buf_free_sgt",
    # reservation locking and fences
    "WwClass",
    "WwMutex",
    "AcquireContext",
    "reservation_ww_class",
    "locked",
    "Fence",
    "FenceCallback",
    "FenceArray",
    "FenceChain",
    "fence_context_alloc",
    "fence_wait_any",
    "fence_unwrap",
    "fence_merge",
    "fence_chain_find_seqno",
    "fence_chain_contained",
    "get_stub_fence",
    "private_stub_fence",
    "Resv",
    "ResvIter",
    "Usage",
    "usage_rw",
    "begin_signalling",
    "end_signalling",
    "in_signalling_section",
    "signalling_section",
    "signal_thread",
    "signal_pending",
    "flush_signals",
    "checks",
    # dma-buf
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
