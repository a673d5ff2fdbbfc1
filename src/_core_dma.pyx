# cython: language_level=3
"""pydmabuf._core_dma: scatterlists and the DMA mapping walks of the core.

Declared for the other core modules in ``pydmabuf/_core_dma.pxd``.
"""

include "_core_imports.pxi"

import logging as _logging

from pydmabuf._core_base import pagemap

# dma_iova_* messages are the IOMMU layer's (as in _core_iommu).
_log = _logging.getLogger("pydmabuf.iommu")

include "_core_sg.pxi"
include "_core_dma.pxi"
include "_core_iovastate.pxi"
include "_core_blk.pxi"
