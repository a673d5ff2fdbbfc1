# cython: language_level=3
#
# Public C declarations of pydmabuf._core.
#
# Another Cython module can ``cimport pydmabuf._core as core`` and use the
# structures and kernels below without going through Python.  Kernels are
# ``noexcept nogil``: they never touch Python objects and return a count
# >= 0 or a negative errno (``-errno.EINVAL`` ...).  Callers hold the owning
# object's lock (``obj.lock``) around a kernel when the object may be shared
# between threads.

# The core is built as several extension modules (see src/_core.pyx); each
# declares its part in its own .pxd, shipped beside this one:
#
#   _core_base.pxd    constants, bit helpers, locks, _Buffer
#   _core_iova.pxd    range_table / RangeTable, iova_domain / IovaDomain
#   _core_iommu.pxd   io_pgtable / IoPageTable, iommu_domain / IommuDomain
#   _core_dma.pxd     sg_table / SgTable, the DMA walks, block-layer helpers
#   _core_ww.pxd      tasks, ww mutexes (WwClass, WwMutex, AcquireContext)
#   _core_fence.pxd   fences (Fence, FenceCallback), reservations (Resv)
#
# ``cimport pydmabuf._core as core`` sees all of them as ``core.NAME``.

from pydmabuf._core_base cimport *
from pydmabuf._core_iova cimport *
from pydmabuf._core_iommu cimport *
from pydmabuf._core_dma cimport *
from pydmabuf._core_ww cimport *
from pydmabuf._core_fence cimport *
