# cython: language_level=3
"""pydmabuf._core_iommu: IO page tables and the IOMMU domain of the core.

Declared for the other core modules in ``pydmabuf/_core_iommu.pxd``.
"""

include "_core_imports.pxi"
include "_core_pgtable.pxi"
include "_core_iommu.pxi"
