# cython: language_level=3
#
# C declarations of pydmabuf._core_base (src/_core_base.pyx): what every
# other module of the core shares -- the constants, bit helpers, object
# locks, the one errno bridge (_check), argument parsing, the _Buffer the
# core hands bulk outputs out in, the held u64 buffer arguments (_U64Arg),
# and the buffer span / pagemap helpers.  The other core modules
# ``from pydmabuf._core_base cimport *``.

cimport cython
from cpython.buffer cimport (PyBUF_FORMAT, PyBUF_FULL_RO, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE,
                             PyBuffer_IsContiguous, PyBuffer_Release, PyObject_GetBuffer)
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)
from libc.errno cimport (EAGAIN, EBUSY, EEXIST, EINVAL, ENOENT, ENOMEM, ENOSPC,
                         EOVERFLOW, EPERM, ERANGE)
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

# ---------------------------------------------------------------- constants

cdef enum:
    PDB_PAGE_SHIFT = 12
    PDB_PAGE_SIZE = 4096
    # Low bits of sg_entry.page_link, as in the kernel.
    PDB_SG_CHAIN = 0x01
    PDB_SG_END = 0x02
    # sg_entry.dma_flags bits.
    PDB_SG_DMA_BUS_ADDRESS = 0x01
    PDB_SG_DMA_SWIOTLB = 0x02
    # One chunk of scatterlist entries is one page: 4096 / 32.
    PDB_SG_MAX_SINGLE_ALLOC = 128

cdef extern from *:
    """
    #define PDB_MAX_SG_ENT_SZ 0xFFFFF000ULL
    #define PDB_SCATTERLIST_MAX_SEGMENT 0xFFFFF000ULL
    #define PDB_PFN_LIMIT (1ULL << 40)
    #ifndef PYDMABUF_DEBUG
    #define PYDMABUF_DEBUG 0
    #endif
    """
    # The largest DMA-only scatterlist entry: UINT_MAX rounded down to a page.
    const uint64_t PDB_MAX_SG_ENT_SZ
    # The kernel's default max_segment (UINT_MAX behaves the same).
    const uint64_t PDB_SCATTERLIST_MAX_SEGMENT
    # PFNs must be below this: 52-bit physical addresses.
    const uint64_t PDB_PFN_LIMIT
    # 1 in the debug build (PYDMABUF_DEBUG=1 at build time).
    const int PYDMABUF_DEBUG


cdef extern from *:
    """
    #include <stdint.h>
    static inline int pdb_clz64(uint64_t x) { return x ? __builtin_clzll(x) : 64; }
    static inline int pdb_ctz64(uint64_t x) { return x ? __builtin_ctzll(x) : 64; }
    static inline int pdb_add_overflow(uint64_t a, uint64_t b, uint64_t *r) {
        return __builtin_add_overflow(a, b, r);
    }
    /* The core's one set of atomic helpers (GCC __atomic builtins). */
    static inline Py_ssize_t pdb_atomic_add(Py_ssize_t *p, Py_ssize_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
    }
    static inline Py_ssize_t pdb_atomic_load(Py_ssize_t *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline size_t pdb_load_sz(size_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline int pdb_cas_sz(size_t *p, size_t *expect, size_t desired) {
        return __atomic_compare_exchange_n(p, expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline void pdb_or_sz(size_t *p, size_t v) { __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline void pdb_and_sz(size_t *p, size_t v) { __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
    static inline int pdb_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void pdb_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int pdb_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline unsigned int pdb_load_uint(unsigned int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void pdb_store_uint(unsigned int *p, unsigned int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline unsigned int pdb_load_flags(unsigned int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void pdb_or_flags(unsigned int *p, unsigned int v) { __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
    static inline unsigned long pdb_inc_ulong(unsigned long *p) { return __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    static inline uint64_t pdb_fetch_add_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    """
    Py_ssize_t _atomic_add "pdb_atomic_add" (Py_ssize_t *p, Py_ssize_t v) nogil
    Py_ssize_t _atomic_load "pdb_atomic_load" (Py_ssize_t *p) nogil
    int pdb_clz64(uint64_t x) nogil
    int pdb_ctz64(uint64_t x) nogil
    bint pdb_add_overflow(uint64_t a, uint64_t b, uint64_t *r) nogil
    size_t pdb_load_sz(size_t *p) nogil
    bint pdb_cas_sz(size_t *p, size_t *expect, size_t desired) nogil
    void pdb_or_sz(size_t *p, size_t v) nogil
    void pdb_and_sz(size_t *p, size_t v) nogil
    int pdb_load_int(int *p) nogil
    void pdb_store_int(int *p, int v) nogil
    int pdb_xchg_int(int *p, int v) nogil
    unsigned int pdb_load_uint(unsigned int *p) nogil
    void pdb_store_uint(unsigned int *p, unsigned int v) nogil
    unsigned int pdb_load_flags(unsigned int *p) nogil
    void pdb_or_flags(unsigned int *p, unsigned int v) nogil
    unsigned long pdb_inc_ulong(unsigned long *p) nogil
    uint64_t pdb_fetch_add_u64(uint64_t *p, uint64_t v) nogil


# ------------------------------------------------------- intrusive lists
#
# The core's one doubly-linked list (the idea of the kernel's
# include/linux/list.h, written afresh): a ``pdb_list`` node is embedded in
# each element, and the list's head is a ``pdb_list`` of its own; the list
# is circular through its head, so an empty list is a head that points at
# itself and no insertion or removal has a special case.  A head must be
# pdb_list_init()ed before use.  Used by the task registry (pdb_task.h),
# the ww-mutex wait list and held-mutex list, and the fence waiters.  (The
# IOVA magazine depot is a singly linked stack, as in the kernel's iova.c.)
#
# first/last/next/prev return NULL at the end, for plain ``while n != NULL``
# walks; each element type has its own NULL-keeping container_of helper
# beside its struct (e.g. pdb_ww_waiter_of() in _core_ww.pxd).  The
# verbatim C lives here, not in a src/pdb_*.h header, because the shipped
# .pxd files declare structs embedding it and a Cython consumer that
# cimports pydmabuf._core compiles them with no include path of ours.
cdef extern from *:
    """
    #include <stddef.h>
    typedef struct pdb_list {
        struct pdb_list *next, *prev;
    } pdb_list;

    #define pdb_container_of(ptr, type, member) \
        ((type *)((char *)(ptr) - offsetof(type, member)))

    static inline void pdb_list_init(pdb_list *h) { h->next = h->prev = h; }
    static inline int pdb_list_empty(const pdb_list *h) { return h->next == h; }
    /* Link n between two adjacent nodes a and b. */
    static inline void pdb_list_link_(pdb_list *n, pdb_list *a, pdb_list *b) {
        n->prev = a;
        n->next = b;
        a->next = n;
        b->prev = n;
    }
    /* At the front of the list headed by h. */
    static inline void pdb_list_add(pdb_list *n, pdb_list *h) { pdb_list_link_(n, h, h->next); }
    /* At the back of the list headed by h. */
    static inline void pdb_list_add_tail(pdb_list *n, pdb_list *h) { pdb_list_link_(n, h->prev, h); }
    /* Just before pos, an element already on a list. */
    static inline void pdb_list_add_before(pdb_list *n, pdb_list *pos) { pdb_list_link_(n, pos->prev, pos); }
    /* Unlink n; it is left pointing at itself (an empty list), never at
       its old neighbours. */
    static inline void pdb_list_del(pdb_list *n) {
        n->prev->next = n->next;
        n->next->prev = n->prev;
        n->next = n->prev = n;
    }
    static inline pdb_list *pdb_list_first(const pdb_list *h) { return h->next == h ? NULL : h->next; }
    static inline pdb_list *pdb_list_last(const pdb_list *h) { return h->prev == h ? NULL : h->prev; }
    static inline pdb_list *pdb_list_next(const pdb_list *h, const pdb_list *n) {
        return n->next == h ? NULL : n->next;
    }
    static inline pdb_list *pdb_list_prev(const pdb_list *h, const pdb_list *n) {
        return n->prev == h ? NULL : n->prev;
    }
    """
    ctypedef struct pdb_list:
        pdb_list *next
        pdb_list *prev
    void pdb_list_init(pdb_list *h) nogil
    bint pdb_list_empty(const pdb_list *h) nogil
    void pdb_list_add(pdb_list *n, pdb_list *h) nogil
    void pdb_list_add_tail(pdb_list *n, pdb_list *h) nogil
    void pdb_list_add_before(pdb_list *n, pdb_list *pos) nogil
    void pdb_list_del(pdb_list *n) nogil
    pdb_list *pdb_list_first(const pdb_list *h) nogil
    pdb_list *pdb_list_last(const pdb_list *h) nogil
    pdb_list *pdb_list_next(const pdb_list *h, const pdb_list *n) nogil
    pdb_list *pdb_list_prev(const pdb_list *h, const pdb_list *n) nogil


cdef extern from *:
    """
    #define PDB_U64_MAX 0xFFFFFFFFFFFFFFFFULL
    """
    const uint64_t PDB_U64_MAX


cdef inline int _fls64(uint64_t x) noexcept nogil:
    """fls(): 1-based index of the highest set bit, 0 for 0."""
    return 64 - pdb_clz64(x)


cdef inline uint32_t _order_base_2(uint64_t x) noexcept nogil:
    """order_base_2(): ceil(log2(x)), 0 for x <= 1."""
    return <uint32_t>_fls64(x - 1) if x > 1 else 0


cdef inline uint64_t _roundup_pow2(uint64_t x) noexcept nogil:
    """roundup_pow_of_two() for 1 <= x <= 2**63."""
    return (<uint64_t>1) << _order_base_2(x)


cdef inline bint _is_pow2(uint64_t x) noexcept nogil:
    return x != 0 and (x & (x - 1)) == 0


# -------------------------------------------------------------------- locks
#
# Every mutable native object owns a PyThread lock.  Taking it with the GIL
# held first tries without blocking; if another thread holds it (possibly
# running a bulk kernel without the GIL) we drop the GIL while we wait, so
# the holder can finish and nobody deadlocks on the GIL.

cdef inline PyThread_type_lock _new_lock() except NULL:
    cdef PyThread_type_lock lock = PyThread_allocate_lock()
    if lock == NULL:
        raise MemoryError("cannot allocate a lock")
    return lock


cdef inline void _acquire(PyThread_type_lock lock) noexcept:
    if not PyThread_acquire_lock(lock, NOWAIT_LOCK):
        with nogil:
            PyThread_acquire_lock(lock, WAIT_LOCK)


cdef inline void _release(PyThread_type_lock lock) noexcept nogil:
    PyThread_release_lock(lock)


cdef inline object _np():
    import numpy
    return numpy


# -------------------------------------------------------------------- CPUs
#
# The CPU a thread stands for in the per-CPU IOVA caches and flush queues:
# its native thread id (threading.get_native_id(), read once per thread
# into a thread-local) modulo the CPUs of the IOMMU.

cdef extern from *:
    """
    static __thread unsigned long pdb_native_tid;
    static inline uint32_t pdb_thread_cpu(uint32_t ncpus)
    {
        if (pdb_native_tid == 0)
            pdb_native_tid = PyThread_get_thread_native_id();
        return (uint32_t)(pdb_native_tid % (ncpus ? ncpus : 1));
    }
    """
    uint32_t pdb_thread_cpu(uint32_t ncpus) noexcept


# ------------------------------------------------------------------ errors

# The one bridge from a kernel's return code to an exception.
cdef object _check(int64_t rc, what)

# --------------------------------------------------------- integer parsing

cdef uint64_t _u64(object value, str name) except? 0xFFFFFFFFFFFFFFFF
cdef int _window(object start, object nbytes, str what, uint64_t *first,
                 uint64_t *last) except -1

# ------------------------------------------------------------------ buffers

cdef class _Buffer:
    cdef char *data
    cdef bint owns
    cdef object base
    cdef int ndim
    cdef Py_ssize_t shape[2]
    cdef Py_ssize_t strides[2]
    cdef Py_ssize_t itemsize
    cdef bytes fmt
    cdef bint readonly

cdef _Buffer _new_buffer(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t itemsize,
                         bytes fmt, bint readonly=*)

cdef class _U64Arg:
    cdef Py_buffer src
    cdef bint held
    cdef const uint64_t *data
    cdef Py_ssize_t n
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]
    # A NumPy array converted from a list (owned here), else None.
    cdef object owned

cdef bint _is_u64_format(const char *fmt, Py_ssize_t itemsize) noexcept
cdef _U64Arg _hold_u64(object obj, str name, str what, bint pairs)
cdef object _as_u64_view(object obj, str name)
cdef object _pairs_view(object pairs, str name)
cdef object _small_ints_to_u64(object seq)
cdef object _ints_to_u64(object seq, str name)

# ------------------------------------------------------------- pagemap

cdef tuple _buffer_span(object buffer)
cdef str _os_strerror(int e)
