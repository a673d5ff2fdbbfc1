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

from libc.stdint cimport int8_t, int64_t, uint8_t, uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock

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

# ------------------------------------------------------------- range table
#
# A sorted set of non-overlapping inclusive ranges [start, last] of u64,
# kept in an AVL tree whose nodes live in one pool (index 0 is the nil
# node).  Every node also carries the span of its subtree and the largest
# free gap strictly inside it, so gap searches prune whole subtrees.

cdef struct rt_node:
    uint64_t start
    uint64_t last
    uint64_t owner
    uint64_t min_start      # smallest start in this subtree
    uint64_t max_last       # largest last in this subtree
    uint64_t max_gap        # largest count of free addresses between two
                            # consecutive ranges of this subtree (0: none)
    uint32_t flags
    uint32_t left
    uint32_t right
    uint8_t kind
    int8_t height

cdef struct range_table:
    rt_node *nodes          # pool; nodes[0] is the nil node
    uint32_t cap            # nodes allocated in the pool
    uint32_t used           # high-water mark of the pool
    uint32_t free_head      # free list threaded through .left
    uint32_t root
    uint64_t count          # live ranges
    uint64_t nbytes_lo      # total bytes covered, as a 128-bit number
    uint64_t nbytes_hi

cdef int rt_init(range_table *t) noexcept nogil
cdef void rt_destroy(range_table *t) noexcept nogil
cdef int rt_reserve(range_table *t, uint64_t extra) noexcept nogil
cdef int rt_insert(range_table *t, uint64_t start, uint64_t last, uint8_t kind,
                   uint64_t owner, uint32_t flags) noexcept nogil
cdef int rt_remove_at(range_table *t, uint64_t addr, rt_node *out) noexcept nogil
cdef int rt_erase(range_table *t, uint64_t start, uint64_t last,
                  uint64_t *erased_lo, uint64_t *erased_hi) noexcept nogil
cdef const rt_node *rt_lookup(const range_table *t, uint64_t addr) noexcept nogil
cdef const rt_node *rt_first_overlap(const range_table *t, uint64_t start,
                                     uint64_t last) noexcept nogil
cdef const rt_node *rt_next(const range_table *t, uint64_t start) noexcept nogil
cdef const rt_node *rt_prev(const range_table *t, uint64_t start) noexcept nogil
cdef int rt_find_gap(const range_table *t, uint64_t sizem1, uint64_t align,
                     uint64_t lo, uint64_t hi, bint top_down,
                     uint64_t *out) noexcept nogil

cdef class RangeTable:
    cdef range_table t
    cdef PyThread_type_lock lock

# ------------------------------------------------------------ scatterlists
#
# struct scatterlist as on 64-bit Linux with CONFIG_NEED_SG_DMA_LENGTH and
# CONFIG_NEED_SG_DMA_FLAGS: 32 bytes.  page_link holds the physical address
# of the page (page aligned) with SG_CHAIN / SG_END in its low bits; a chain
# slot holds the address of the next chunk's first slot instead.

cdef struct sg_entry:
    uint64_t page_link
    uint32_t offset
    uint32_t length
    uint64_t dma_address
    uint32_t dma_length
    uint32_t dma_flags

# struct sg_append_table.  Chunks are laid out one after another in one
# arena (``slots``); each chunk is what the kernel allocates in one
# sg_kmalloc() call and is linked to the next by its last slot.
cdef struct sg_table:
    sg_entry *slots
    uint64_t nslots         # slots in all chunks
    uint64_t cap            # arena capacity, in slots
    uint64_t nchunks
    uint64_t last_chunk     # first slot of the newest chunk
    uint64_t meta_bytes     # bytes the kernel's allocator would hand out
    int64_t prv             # last populated slot, -1 when none
    uint32_t nents          # DMA segments (after mapping) / entries
    uint32_t orig_nents     # CPU entries (0 for DMA-only tables)
    uint32_t total_nents    # data slots allocated (append tables)
    uint32_t no_move        # set while exported: growing must not move
                            # the arena (-EBUSY instead)

cdef void sg_table_free(sg_table *t) noexcept nogil
cdef int sg_alloc(sg_table *t, uint32_t nents) noexcept nogil
cdef int64_t sg_next(const sg_table *t, int64_t i) noexcept nogil
cdef int64_t sg_first(const sg_table *t) noexcept nogil
cdef int64_t sg_nents_for_len(const sg_table *t, uint64_t nbytes) noexcept nogil
cdef int sg_append_pages(sg_table *t, const uint64_t *pfns, uint64_t n,
                         uint32_t offset, uint64_t size, uint64_t max_segment,
                         uint32_t left_pages) noexcept nogil
cdef int sg_from_dma_ranges(sg_table *t, const uint64_t *pairs,
                            uint64_t n) noexcept nogil
cdef int64_t sg_cpu_ranges(const sg_table *t, uint64_t *out) noexcept nogil
cdef int64_t sg_dma_ranges(const sg_table *t, uint64_t *out) noexcept nogil

cdef class SgTable:
    cdef sg_table t
    cdef PyThread_type_lock lock
    cdef Py_ssize_t exports
    # Set by the DMA mapping layer while the table is mapped for a device.
    cdef public object mapping
    cdef object __weakref__

# ---------------------------------------------------- reservation locking
#
# Wound/wait mutexes (struct ww_mutex, ww_acquire_ctx, ww_class), fences
# (struct dma_fence) and the per-thread state they need.  The structures
# are plain C so Cython consumers can embed and call them; the Python
# classes below own one each.
#
# Threads.  Every thread that blocks or locks gets a ``pdb_task`` (the
# model's task_struct): a private mutex + condition variable pair used as
# a parking spot with a wake token (so a wake-up can never be lost), a
# modelled "signal pending" flag for interruptible waits, and the
# bookkeeping of the lock checker.  A task is reference counted; the
# thread holds one reference until it exits, every acquire context one
# more.
#
# Locking rule of the C layer: a ``wait_lock`` / fence ``mu`` is held only
# for short C sections that never take the GIL, never call Python and
# never block on anything but a task's ``mu`` (always taken last), so a
# thread holding the GIL may take them.

cdef extern from *:
    """
    #include <pthread.h>
    #include <stdint.h>
    #include <stddef.h>

    #define PDB_TASK_CLASSES 4

    typedef struct pdb_task {
        pthread_mutex_t mu;
        pthread_cond_t cv;
        int token;              /* a wake-up is pending */
        int sigpending;         /* modelled signal for interruptible waits */
        int alive;              /* the thread has not exited */
        long refs;
        unsigned long ident;    /* PyThread_get_thread_ident() */
        struct pdb_task *next, *prev;       /* registry of all tasks */
        /* Touched by the owning thread only (with the GIL). */
        int sig_depth;          /* inside a fence-signalling section */
        void *sig_frame;        /* frame that called Fence.signal() */
        void *sig_site;         /* owned str: where begin_signalling() ran */
        void *sig_fence;        /* the fence being signalled (borrowed) */
        unsigned int held_total;            /* ww mutexes held */
        void *held_cls[PDB_TASK_CLASSES];   /* per class: */
        unsigned int held_plain[PDB_TASK_CLASSES];  /* held without ctx */
        unsigned int held_ctx[PDB_TASK_CLASSES];    /* held through a ctx */
    } pdb_task;

    typedef struct pdb_ww_class {
        unsigned long stamp;    /* last stamp handed out (atomic) */
        int is_wait_die;
        int is_reservation;     /* reservation_ww_class: no locking while
                                   signalling fences */
    } pdb_ww_class;

    struct pdb_ww_mutex;

    typedef struct pdb_ww_ctx {
        pdb_task *task;         /* owner (a reference) */
        unsigned long stamp;
        unsigned int acquired;  /* written by the owner, read by others */
        int wounded;            /* atomic */
        int is_wait_die;
        int done_acquire;
        int finished;
        pdb_ww_class *cls;
        struct pdb_ww_mutex *contending;    /* set by -EDEADLK */
        struct pdb_ww_mutex *held;          /* list of held mutexes */
        unsigned int inject_interval;       /* deadlock injection */
        unsigned int inject_countdown;
        int inject;
        void *pyobj;            /* the AcquireContext (borrowed) */
    } pdb_ww_ctx;

    typedef struct pdb_ww_waiter {
        struct pdb_ww_waiter *next, *prev;
        pdb_task *task;
        pdb_ww_ctx *ctx;
    } pdb_ww_waiter;

    #define PDB_MUTEX_WAITERS ((size_t)1)

    typedef struct pdb_ww_mutex {
        pthread_mutex_t wait_lock;
        size_t owner;           /* pdb_task * | PDB_MUTEX_WAITERS (atomic) */
        unsigned long owner_ident;
        pdb_ww_ctx *ctx;        /* atomic; changed under wait_lock except
                                   when set by the lock fast path */
        pdb_ww_class *cls;
        pdb_ww_waiter *wait_first, *wait_last;  /* stamp order for ctxs */
        struct pdb_ww_mutex *held_next, *held_prev;
        void *pyobj;            /* the WwMutex (borrowed) */
        int destroyed;
        int is_resv;
    } pdb_ww_mutex;

    typedef struct pdb_fence_waiter {
        struct pdb_fence_waiter *next, *prev;
        pdb_task *task;
    } pdb_fence_waiter;

    #define PDB_FENCE_SIGNALED 1u
    #define PDB_FENCE_TIMESTAMP 2u
    #define PDB_FENCE_ENABLE_SIGNAL 4u
    #define PDB_FENCE_CB_DONE 8u     /* callbacks have run; waiters may go */
    #define PDB_FENCE_SEQNO64 16u

    typedef struct pdb_fence {
        pthread_mutex_t mu;
        unsigned int flags;     /* atomic */
        int error;
        uint64_t context;
        uint64_t seqno;
        int64_t timestamp;      /* CLOCK_MONOTONIC ns */
        pdb_fence_waiter *waiters;
    } pdb_fence;

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
    static inline pdb_ww_ctx *pdb_load_ctx(pdb_ww_ctx **p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void pdb_store_ctx(pdb_ww_ctx **p, pdb_ww_ctx *v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline unsigned long pdb_inc_ulong(unsigned long *p) { return __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    static inline uint64_t pdb_fetch_add_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    """
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass

    enum:
        PDB_TASK_CLASSES
    const size_t PDB_MUTEX_WAITERS
    const unsigned int PDB_FENCE_SIGNALED
    const unsigned int PDB_FENCE_TIMESTAMP
    const unsigned int PDB_FENCE_ENABLE_SIGNAL
    const unsigned int PDB_FENCE_CB_DONE
    const unsigned int PDB_FENCE_SEQNO64

    ctypedef struct pdb_task:
        pthread_mutex_t mu
        pthread_cond_t cv
        int token
        int sigpending
        int alive
        long refs
        unsigned long ident
        int sig_depth
        void *sig_frame
        void *sig_site
        void *sig_fence
        unsigned int held_total
        void *held_cls[PDB_TASK_CLASSES]
        unsigned int held_plain[PDB_TASK_CLASSES]
        unsigned int held_ctx[PDB_TASK_CLASSES]

    ctypedef struct pdb_ww_class:
        unsigned long stamp
        int is_wait_die
        int is_reservation

    ctypedef struct pdb_ww_mutex

    ctypedef struct pdb_ww_ctx:
        pdb_task *task
        unsigned long stamp
        unsigned int acquired
        int wounded
        int is_wait_die
        int done_acquire
        int finished
        pdb_ww_class *cls
        pdb_ww_mutex *contending
        pdb_ww_mutex *held
        unsigned int inject_interval
        unsigned int inject_countdown
        int inject
        void *pyobj

    ctypedef struct pdb_ww_waiter:
        pdb_ww_waiter *next
        pdb_ww_waiter *prev
        pdb_task *task
        pdb_ww_ctx *ctx

    ctypedef struct pdb_ww_mutex:
        pthread_mutex_t wait_lock
        size_t owner
        unsigned long owner_ident
        pdb_ww_ctx *ctx
        pdb_ww_class *cls
        pdb_ww_waiter *wait_first
        pdb_ww_waiter *wait_last
        pdb_ww_mutex *held_next
        pdb_ww_mutex *held_prev
        void *pyobj
        int destroyed
        int is_resv

    ctypedef struct pdb_fence_waiter:
        pdb_fence_waiter *next
        pdb_fence_waiter *prev
        pdb_task *task

    ctypedef struct pdb_fence:
        pthread_mutex_t mu
        unsigned int flags
        int error
        uint64_t context
        uint64_t seqno
        int64_t timestamp
        pdb_fence_waiter *waiters

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
    pdb_ww_ctx *pdb_load_ctx(pdb_ww_ctx **p) nogil
    void pdb_store_ctx(pdb_ww_ctx **p, pdb_ww_ctx *v) nogil
    unsigned long pdb_inc_ulong(unsigned long *p) nogil
    uint64_t pdb_fetch_add_u64(uint64_t *p, uint64_t v) nogil

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

# Tasks (threads).  pdb_current_task() returns NULL only when out of memory.
cdef pdb_task *pdb_current_task() noexcept nogil
cdef void pdb_wake(pdb_task *t) noexcept nogil
# Sleep until woken (0) or until CLOCK_MONOTONIC ``deadline_ns`` (-ETIMEDOUT);
# a negative deadline waits forever.  Spurious returns are possible.
cdef int pdb_park(pdb_task *t, int64_t deadline_ns) noexcept nogil
cdef int64_t pdb_now_ns() noexcept nogil

# Wound/wait mutexes.  ww_lock_fast() is the uncontended path (1: taken,
# 0: go slow); ww_lock_slow() blocks: 0, -EDEADLK, -EINTR.  ww_trylock():
# 1/0.  ww_unlock() must be called by the owner.  The debug checks
# (pydmabuf.errors.LockingError) are made by the Python layer only; these
# kernels trust their caller.  A caller that locks with a ctx must keep
# that ctx alive until the mutex is unlocked.
cdef int ww_mutex_init(pdb_ww_mutex *m, pdb_ww_class *cls) noexcept nogil
cdef bint ww_lock_fast(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t) noexcept nogil
cdef int ww_lock_slow(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t,
                      bint interruptible) noexcept nogil
cdef bint ww_trylock(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t) noexcept nogil
cdef void ww_unlock(pdb_ww_mutex *m, pdb_task *t) noexcept nogil

# Fences.  fence_wait(): 1 once signalled and its callbacks have run, 0 at
# the deadline, -ERESTARTSYS when interruptible and a signal is pending.
cdef int fence_init(pdb_fence *f, uint64_t context, uint64_t seqno) noexcept nogil
cdef int fence_wait(pdb_fence *f, pdb_task *t, int64_t deadline_ns,
                    bint interruptible) noexcept nogil
cdef bint fence_is_later(const pdb_fence *a, const pdb_fence *b) noexcept nogil

cdef class WwClass:
    cdef pdb_ww_class c
    cdef readonly str name

cdef class WwMutex:
    cdef pdb_ww_mutex m
    cdef readonly WwClass ww_class
    cdef void *ctx_ref              # the AcquireContext reference the lock holds
    cdef object __weakref__
    cdef int _unlock(self) except -1

cdef class AcquireContext:
    cdef pdb_ww_ctx c
    cdef readonly WwClass ww_class
    cdef object _contending

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
