"""Importers: drivers that use dma-bufs, each a model of a real one's
dma-buf behaviour built on the public API.

* :class:`DrmGpu`: a GPU's ``drm_gem_prime_import`` (static, one mapping
  kept for the object's life, CPU access through the generic mmap).
* :class:`NvmeQueue`: the block layer's list-free request mapping
  (``blk_rq_dma_map_iter_*``) beside the scatterlist path.
* :class:`RdmaMr` / :class:`UmemDmabuf`: RDMA memory regions over dma-bufs
  (``ib_umem_dmabuf`` and mlx5's dynamic MR with ODP-style re-faults).
"""

from pydmabuf.importers.drm import DrmGpu
from pydmabuf.importers.nvme import NvmeQueue
from pydmabuf.importers.rdma import RdmaMr, UmemDmabuf

__all__ = ["DrmGpu", "NvmeQueue", "RdmaMr", "UmemDmabuf"]
