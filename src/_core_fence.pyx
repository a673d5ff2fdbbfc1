# cython: language_level=3
"""pydmabuf._core_fence: fences, fence arrays and chains, reservation objects.

Declared for the other core modules in ``pydmabuf/_core_fence.pxd``.
"""

include "_core_imports.pxi"

from pydmabuf._core_ww import reservation_ww_class

include "_core_fence.pxi"
include "_core_resv.pxi"
