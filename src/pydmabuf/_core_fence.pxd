# cython: language_level=3
#
# C declarations of pydmabuf._core_fence (src/_core_fence.pyx): fences
# (drivers/dma-buf/dma-fence*.c) and reservation objects (dma-resv.c).

from pydmabuf._core_base cimport *
from pydmabuf._core_ww cimport *

# Fences.  fence_wait(): 1 once signalled and its callbacks have run, 0 at
# the deadline, -ERESTARTSYS when interruptible and a signal is pending.
cdef int fence_init(pdb_fence *f, uint64_t context, uint64_t seqno) noexcept nogil
cdef int fence_wait(pdb_fence *f, pdb_task *t, int64_t deadline_ns,
                    bint interruptible) noexcept nogil
cdef bint fence_is_later(const pdb_fence *a, const pdb_fence *b) noexcept nogil


cdef class FenceCallback:
    cdef object fn
    cdef int state
    cdef int _fire(self, Fence fence) except -1

cdef class Fence:
    cdef pdb_fence f
    cdef list _callbacks
    cdef int _hooks
    cdef object __weakref__
    cdef int _signal(self, int64_t timestamp, bint strict) except -1
    cdef bint _add(self, FenceCallback cb) except -1
    cdef bint _op_signaled(self) except -1
    cdef bint _op_enable_signaling(self) except -1
    cdef int _op_set_deadline(self, int64_t deadline) except -1
    cdef bint _is_signaled(self) except -1

cdef struct resv_entry:
    void *fence                     # a Fence reference
    unsigned int usage

cdef class Resv(WwMutex):
    cdef resv_entry *table
    cdef unsigned int num
    cdef unsigned int max
    cdef uint64_t gen               # bumped whenever a new list is published
    cdef PyThread_type_lock lock
