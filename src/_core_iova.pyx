# cython: language_level=3
"""pydmabuf._core_iova: the range table and the IOVA allocator of the core.

Declared for the other core modules in ``pydmabuf/_core_iova.pxd``.
"""

include "_core_imports.pxi"
include "_core_rangetable.pxi"
include "_core_iova.pxi"
