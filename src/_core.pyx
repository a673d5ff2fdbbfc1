# cython: language_level=3
"""pydmabuf._core: the native core of pydmabuf.

Every per-page or per-range loop of pydmabuf lives here, in ``noexcept nogil``
kernels that take C pointers and lengths and return a count >= 0 or a
negative errno.  The ``def`` methods parse arguments, take buffer views, call
the kernel (releasing the GIL for bulk work) and turn a negative result into
a :mod:`pydmabuf.errors` exception through one bridge, :func:`_check`.

The public C declarations are in ``pydmabuf/_core.pxd``; another Cython
module can ``cimport pydmabuf._core`` and call the kernels directly.

The source is split by concern into ``.pxi`` files included below, in a
fixed order (later files use what earlier ones define).
"""

include "_core_common.pxi"
include "_core_floor.pxi"
include "_core_rangetable.pxi"
include "_core_sg.pxi"
include "_core_pagemap.pxi"
include "_core_iova.pxi"
include "_core_pgtable.pxi"
include "_core_iommu.pxi"
include "_core_dma.pxi"
include "_core_iovastate.pxi"
include "_core_blk.pxi"
include "_core_ww.pxi"
include "_core_fence.pxi"
include "_core_resv.pxi"
