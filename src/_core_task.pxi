# Threads as the kernel's tasks: every thread that blocks or locks gets a
# pdb_task (the model's task_struct), reference counted and registered, with
# a private mutex + condition variable as its parking spot (a wake token so
# no wake-up is lost) and a modelled "signal pending" flag for
# interruptible waits (signal_thread / signal_pending / flush_signals).
# The ww mutexes (_core_ww.pxi) and fences (_core_fence.pxi) park on it.
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.errno cimport EINTR
from libc.limits cimport ULONG_MAX
from libc.stdint cimport int32_t
from cpython.pythread cimport PyThread_get_thread_ident

# EDEADLK, EALREADY: pydmabuf/_core_ww.pxd

cdef extern from "pdb_task.h":
    int64_t pdb_now_ns_c() nogil
    void pdb_task_get_c(pdb_task *t) nogil
    void pdb_task_put_c(pdb_task *t) nogil
    int pdb_task_init_key() nogil
    pdb_task *pdb_task_current_c() nogil
    pdb_task *pdb_task_peek_c() nogil
    void pdb_wake_c(pdb_task *t) nogil
    int pdb_park_c(pdb_task *t, int64_t deadline) nogil
    int pdb_signal_ident_c(unsigned long ident) nogil

cdef extern from "Python.h":
    PyObject *PyEval_GetFrame()

if pdb_task_init_key() != 0:
    raise ImportError("pydmabuf: cannot create the thread-exit key")

import sys as _sys


# ------------------------------------------------------------------ tasks

cdef pdb_task *pdb_current_task() noexcept nogil:
    return pdb_task_current_c()


cdef void pdb_wake(pdb_task *t) noexcept nogil:
    pdb_wake_c(t)


cdef int pdb_park(pdb_task *t, int64_t deadline_ns) noexcept nogil:
    return pdb_park_c(t, deadline_ns)


cdef int64_t pdb_now_ns() noexcept nogil:
    return pdb_now_ns_c()


cdef pdb_task *pdb_task_peek() noexcept nogil:
    return pdb_task_peek_c()


cdef pdb_task *_cur_task() except NULL:
    cdef pdb_task *t = pdb_task_current_c()
    if t == NULL:
        raise MemoryError("cannot allocate the per-thread lock state")
    return t


cdef int64_t _deadline(object timeout, str what) except -2:
    """Seconds (None: forever) -> absolute CLOCK_MONOTONIC ns, -1 = forever.

    Negative or NaN timeouts are the kernel's -EINVAL
    (dma_fence_wait_timeout warns and refuses them).
    """
    cdef double secs
    if timeout is None:
        return -1
    if isinstance(timeout, int) and timeout > 9_000_000_000:
        return -1       # a float could not hold it; it is "forever" anyway
    secs = timeout
    if not secs >= 0.0:
        raise _errors.InvalidArgument(f"{what}: timeout must be >= 0 seconds or None (got {timeout!r})")
    if secs > 9.0e9:
        return -1
    return pdb_now_ns_c() + <int64_t>(secs * 1e9)


def signal_thread(ident):
    """Make a signal pending for a thread, as ``kill()`` would for a task.

    The thread's interruptible waits (``lock_interruptible``,
    ``Fence.wait(interruptible=True)``, ``Resv.wait(interruptible=True)``)
    then fail with :class:`~pydmabuf.errors.Interrupted` (EINTR, or
    ERESTARTSYS for fence waits), waking it if it is asleep; uninterruptible
    waits ignore it.  The signal stays pending until an interruptible wait
    reports it (the model's "return to user space") or
    :func:`flush_signals` clears it.

    Parameters
    ----------
    ident : int
        ``threading.get_ident()`` of the target thread.

    Returns
    -------
    bool
        False when no live thread with that ident has used pydmabuf's
        locks or fences yet (nothing to signal).
    """
    if not isinstance(ident, int):
        raise TypeError(f"ident must be a thread ident (int), not {type(ident).__name__}")
    if ident < 0 or ident > <object>ULONG_MAX:
        return False    # no thread has that ident
    return bool(pdb_signal_ident_c(<unsigned long>ident))


def signal_pending():
    """True when a signal (see :func:`signal_thread`) is pending for this thread."""
    cdef pdb_task *t = pdb_task_peek_c()
    return t != NULL and pdb_load_int(&t.sigpending) != 0


def flush_signals():
    """Clear this thread's pending signal, if any."""
    cdef pdb_task *t = pdb_task_peek_c()
    if t != NULL:
        pdb_store_int(&t.sigpending, 0)


cdef object _interrupted(pdb_task *t, int err, str what):
    """Report an interrupted wait; the pending signal is consumed."""
    pdb_store_int(&t.sigpending, 0)
    raise _errors.from_errno(err, what)


