# cython: language_level=3
#
# C declarations of pydmabuf._core_ww (src/_core_ww.pyx): threads (the
# model's tasks), fence-signalling sections and wound/wait mutexes.  The C
# structures of the fences live here too, beside the task they park.

from pydmabuf._core_base cimport *
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

cdef extern from "<errno.h>":
    enum:
        EDEADLK
        EALREADY

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
        pdb_list node;          /* on the registry of all tasks */
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
        pdb_list held;          /* held mutexes (held_node), newest first */
        unsigned int inject_interval;       /* deadlock injection */
        unsigned int inject_countdown;
        int inject;
        void *pyobj;            /* the AcquireContext (borrowed) */
    } pdb_ww_ctx;

    typedef struct pdb_ww_waiter {
        pdb_list node;          /* on pdb_ww_mutex.waiters */
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
        pdb_list waiters;       /* pdb_ww_waiter: stamp order for ctxs,
                                   FIFO for the others */
        pdb_list held_node;     /* on the holding ctx's held list */
        void *pyobj;            /* the WwMutex (borrowed) */
        int destroyed;
        int is_resv;
    } pdb_ww_mutex;

    typedef struct pdb_fence_waiter {
        pdb_list node;          /* on pdb_fence.waiters */
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
        pdb_list waiters;       /* pdb_fence_waiter, newest first */
    } pdb_fence;

    /* container_of for each list element type; NULL stays NULL. */
    static inline pdb_task *pdb_task_of(pdb_list *n) {
        return n ? pdb_container_of(n, pdb_task, node) : NULL;
    }
    static inline pdb_ww_waiter *pdb_ww_waiter_of(pdb_list *n) {
        return n ? pdb_container_of(n, pdb_ww_waiter, node) : NULL;
    }
    static inline pdb_ww_mutex *pdb_ww_mutex_of_held(pdb_list *n) {
        return n ? pdb_container_of(n, pdb_ww_mutex, held_node) : NULL;
    }
    static inline pdb_fence_waiter *pdb_fence_waiter_of(pdb_list *n) {
        return n ? pdb_container_of(n, pdb_fence_waiter, node) : NULL;
    }

    /* Atomics on the ctx pointer; the others are in _core_base.pxd. */
    static inline pdb_ww_ctx *pdb_load_ctx(pdb_ww_ctx **p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void pdb_store_ctx(pdb_ww_ctx **p, pdb_ww_ctx *v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
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
        pdb_list node
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
        pdb_list held
        unsigned int inject_interval
        unsigned int inject_countdown
        int inject
        void *pyobj

    ctypedef struct pdb_ww_waiter:
        pdb_list node
        pdb_task *task
        pdb_ww_ctx *ctx

    ctypedef struct pdb_ww_mutex:
        pthread_mutex_t wait_lock
        size_t owner
        unsigned long owner_ident
        pdb_ww_ctx *ctx
        pdb_ww_class *cls
        pdb_list waiters
        pdb_list held_node
        void *pyobj
        int destroyed
        int is_resv

    ctypedef struct pdb_fence_waiter:
        pdb_list node
        pdb_task *task

    ctypedef struct pdb_fence:
        pthread_mutex_t mu
        unsigned int flags
        int error
        uint64_t context
        uint64_t seqno
        int64_t timestamp
        pdb_list waiters

    pdb_ww_ctx *pdb_load_ctx(pdb_ww_ctx **p) nogil
    void pdb_store_ctx(pdb_ww_ctx **p, pdb_ww_ctx *v) nogil
    pdb_task *pdb_task_of(pdb_list *n) nogil
    pdb_ww_waiter *pdb_ww_waiter_of(pdb_list *n) nogil
    pdb_ww_mutex *pdb_ww_mutex_of_held(pdb_list *n) nogil
    pdb_fence_waiter *pdb_fence_waiter_of(pdb_list *n) nogil

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


# Shared with the fence and reservation code (pydmabuf._core_fence).
# The calling thread's task, or NULL when it has none yet.
cdef pdb_task *pdb_task_peek() noexcept nogil
cdef pdb_task *_cur_task() except NULL
cdef int64_t _deadline(object timeout, str what) except -2
cdef object _interrupted(pdb_task *t, int err, str what)
cdef pdb_task *_owner(size_t word) noexcept nogil
cdef int _ww_unlock(WwMutex self) except -1
# WwMutex.lock() without a context, and held_by_current_thread(), for
# compiled callers (pydmabuf._dmabuf_api) that hold an exact WwMutex/Resv.
cdef int _ww_lock_plain(WwMutex self) except -1
cdef bint _ww_held(WwMutex self) noexcept
# The lock checker's hooks (set by pydmabuf.locking through set_lockdep_hooks).
cdef object _ld_acquire
cdef object _ld_release
cdef object _ld_signal
cdef object _ld_wait
cdef bint _sig_enter_implicit(pdb_task *t, object fence)
cdef void _sig_exit(pdb_task *t, bint nested)
cdef int _sig_violation(pdb_task *t, str what) except -1
