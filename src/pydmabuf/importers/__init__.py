"""Importers: drivers that use dma-bufs, each a model of a real one's
dma-buf behaviour built on the public API.

* :class:`IommufdIoas`: an iommufd IO address space; VFIO dma-bufs are
  mapped into its hardware page tables through VFIO's private physical
  range call, and revoked for good when VFIO revokes.
* :class:`KvmVm`: a KVM guest whose memory slots are backed by VFIO
  dma-bufs, faulting their pages into its second-stage table; this is a
  posted proposal (an RFC), not upstream KVM.
* :class:`RdmaMr` / :class:`UmemDmabuf`: RDMA memory regions over dma-bufs
  (``ib_umem_dmabuf`` and mlx5's dynamic MR with ODP-style re-faults).
* :class:`DrmGpu`: a GPU's ``drm_gem_prime_import`` (static, one mapping
  kept for the object's life, CPU access through the generic mmap).
* :class:`NvmeQueue`: the block layer's list-free request mapping
  (``blk_rq_dma_map_iter_*``) beside the scatterlist path.
"""

from pydmabuf.importers.drm import DrmGpu
from pydmabuf.importers.iommufd import HwPagetable, IoasArea, IommufdIoas
from pydmabuf.importers.kvm import KvmMemslot, KvmVm
from pydmabuf.importers.nvme import NvmeQueue
from pydmabuf.importers.rdma import RdmaMr, UmemDmabuf

__all__ = ["DrmGpu", "HwPagetable", "IoasArea", "IommufdIoas", "KvmMemslot", "KvmVm", "NvmeQueue", "RdmaMr",
           "UmemDmabuf"]
