# The lock checker's per-thread state, kept in the task: ww mutexes held per
# class (what lockdep would know), the hooks pydmabuf.locking installs for
# lock-class tracking, and fence-signalling sections
# (dma_fence_begin_signalling / end), inside which waiting on a fence or
# taking a reservation lock is a LockingError naming both places.
# ------------------------------------------- per-thread lock bookkeeping
#
# What lockdep would know: how many ww mutexes of each class this thread
# holds, with and without an acquire context.  A thread rarely holds more
# than one or two classes at once; past PDB_TASK_CLASSES the extra classes
# are counted in held_total only and escape the per-class checks.

cdef inline int _task_slot(pdb_task *t, pdb_ww_class *cls, bint create) noexcept nogil:
    cdef int i
    cdef int free_slot = -1
    for i in range(PDB_TASK_CLASSES):
        if t.held_cls[i] == <void *>cls:
            return i
        if free_slot < 0 and t.held_plain[i] == 0 and t.held_ctx[i] == 0:
            free_slot = i
    if create and free_slot >= 0:
        t.held_cls[free_slot] = <void *>cls
        return free_slot
    return -1


cdef inline void _task_account(pdb_task *t, pdb_ww_class *cls, bint with_ctx,
                               int delta) noexcept nogil:
    cdef int i = _task_slot(t, cls, delta > 0)
    t.held_total += delta
    if i < 0:
        return
    if with_ctx:
        t.held_ctx[i] += delta
    else:
        t.held_plain[i] += delta
    if t.held_ctx[i] == 0 and t.held_plain[i] == 0:
        t.held_cls[i] = NULL


cdef inline unsigned int _task_held(pdb_task *t, pdb_ww_class *cls, bint with_ctx) noexcept nogil:
    cdef int i = _task_slot(t, cls, False)
    if i < 0:
        return 0
    return t.held_ctx[i] if with_ctx else t.held_plain[i]



# ------------------------------------------------------------ lockdep hooks
#
# The lock-class dependency graph lives in pydmabuf.locking (Python).  When
# it is enabled it installs these hooks; when they are None (tracking off)
# the lock and unlock paths pay one pointer compare.

_ld_acquire = None   # (mutex, with_ctx, trylock) -> None; raises to refuse
_ld_release = None   # (mutex) -> None
_ld_signal = None   # (entering) -> None: the dma_fence_map pseudo-lock
_ld_wait = None     # () -> None: __dma_fence_might_wait()


# The common case handled here, without a Python call: the thread holds
# no other tracked lock when it takes one (no dependency to add), and
# releases the lock it took last.  _ld_tls is locking's threading.local
# (its ``held`` list: (class key, lock, nested legally) tuples, outermost
# first) and _ld_keys its WwClass -> class key map; anything else (a lock
# already held, a class not seen yet, an out-of-order release) goes to the
# hooks, which see the same list.
from cpython.list cimport PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_SIZE

cdef extern from "Python.h":
    PyObject *PyThreadState_GetDict()
    ctypedef struct PyTypeObject
    PyTypeObject *Py_TYPE(object o)
    bint PyType_HasFeature(PyTypeObject *t, unsigned long flag)
    unsigned long Py_TPFLAGS_HEAPTYPE
    PyObject *PyDict_GetItem(object d, object key)


cdef class ThreadHeld:
    """Per-thread storage of one ``held`` attribute (pydmabuf.locking's
    held-lock list), as ``threading.local`` would keep it, but in the
    thread's own state dict under this object as the key: the lock paths
    here read it with one dict look-up, without the threading.local
    machinery (which cost more than the rest of an uncontended lock's
    bookkeeping).  The entry goes with the thread's state when the thread
    ends."""

    cdef inline object _dict(self):
        d = PyThreadState_GetDict()
        if d == NULL:
            raise RuntimeError("ThreadHeld: no thread state")
        return <object>d

    @property
    def held(self):
        """This thread's value (AttributeError until it is set)."""
        v = PyDict_GetItem(self._dict(), self)
        if v == NULL:
            raise AttributeError("held")
        return <object>v

    @held.setter
    def held(self, value):
        self._dict()[self] = value

    @held.deleter
    def held(self):
        try:
            del self._dict()[self]
        except KeyError:
            raise AttributeError("held") from None


cdef inline object _ld_held_of(object tls):
    """``getattr(tls, "held", None)``; a ThreadHeld's is read from the
    thread's dict directly."""
    cdef PyObject *d
    cdef PyObject *v
    if type(tls) is ThreadHeld:
        d = PyThreadState_GetDict()
        if d != NULL:
            v = PyDict_GetItem(<object>d, tls)
            return <object>v if v != NULL else None
    return getattr(tls, "held", None)


cdef object _ld_tls = None
cdef dict _ld_keys = None


def set_lockdep_hooks(acquire, release, signal, wait, tls=None, keys=None):
    """Install (or, with Nones, remove) the lock-class tracking hooks of
    :mod:`pydmabuf.locking`; ``tls`` and ``keys`` (its held-lock
    ``threading.local`` and ww-class keys) let the mutexes record the
    uncontended cases themselves.  Internal."""
    global _ld_acquire, _ld_release, _ld_signal, _ld_wait, _ld_tls, _ld_keys
    if (tls is None) != (keys is None) or (keys is not None and type(keys) is not dict):
        raise TypeError("set_lockdep_hooks: tls and keys (a dict) go together")
    if tls is not None and (acquire is None or release is None):
        raise TypeError("set_lockdep_hooks: tls needs the acquire and release hooks")
    _ld_acquire = acquire
    _ld_release = release
    _ld_signal = signal
    _ld_wait = wait
    _ld_tls = tls
    _ld_keys = keys


cdef int _ld_took(object m, bint with_ctx, bint trylock) except -1:
    """The acquire hook's work for ``m`` (held now); raises to refuse.
    The hooks are read once: the look-ups below may run a collection whose
    finalizers switch tracking off, and the call then finishes as it began
    (as the hook closures, holding their state, did)."""
    cdef object acquire = _ld_acquire
    cdef object tls = _ld_tls
    cdef dict keys = _ld_keys
    cdef object held
    cdef object key
    if acquire is None:
        return 0
    if tls is not None and keys is not None:
        held = _ld_held_of(tls)
        if type(held) is list and PyList_GET_SIZE(held) == 0:
            # The attribute, as the hook reads it (a subclass may override it).
            # The C field, unless a Python subclass (a heap type) could
            # answer for itself.
            if isinstance(m, WwMutex) and not PyType_HasFeature(Py_TYPE(m), Py_TPFLAGS_HEAPTYPE):
                key = keys.get((<WwMutex>m).ww_class)
            else:
                key = keys.get(m.ww_class)
            if key is not None:
                held.append((key, m, True))
                return 0
    acquire(m, with_ctx, trylock)
    return 0


cdef int _ld_dropped(object m) except -1:
    """The release hook's work for ``m`` (released now)."""
    cdef object release = _ld_release
    cdef object tls = _ld_tls
    cdef object held, last
    cdef Py_ssize_t n
    if release is None:
        return 0
    if tls is not None:
        held = _ld_held_of(tls)
        if held is None:
            return 0  # this thread never took a tracked lock
        if type(held) is list:
            n = PyList_GET_SIZE(held)
            if n:
                last = held[n - 1]
                if type(last) is tuple and PyTuple_GET_SIZE(last) == 3 and (<tuple>last)[1] is m:
                    del held[n - 1]
                    return 0
    release(m)
    return 0

# ------------------------------------------------------ signalling sections
#
# dma_fence_begin_signalling() / end(): the critical section from the
# point a fence is published to its signal.  Fence.signal() opens one
# itself around its callbacks.  Inside a section, waiting on a fence or
# taking a reservation lock is a LockingError naming both places.

# The messages name Python call sites; the helpers are in the leaf module
# pydmabuf._sites (shared with pydmabuf.locking, which the core does not
# import: it sits above the core).
from pydmabuf import _sites


cdef bint _sig_enter_implicit(pdb_task *t, object fence):
    """Fence.signal()'s own section; True when it nests in an open one."""
    if t.sig_depth:
        return True
    t.sig_depth = 1
    t.sig_frame = <void *>PyEval_GetFrame()
    t.sig_fence = <void *>fence
    return False


cdef void _sig_exit(pdb_task *t, bint nested):
    cdef PyObject *site
    if nested:
        return
    t.sig_depth = 0
    t.sig_frame = NULL
    t.sig_fence = NULL
    site = <PyObject *>t.sig_site
    t.sig_site = NULL
    if site != NULL:
        Py_DECREF(<object>site)


cdef int _sig_violation(pdb_task *t, str what) except -1:
    """Raise the LockingError for ``what`` done inside a signalling section."""
    cdef object begin
    mod = _sites
    if t.sig_site != NULL:
        begin = <object>t.sig_site
    else:
        fence = <object>t.sig_fence if t.sig_fence != NULL else None
        begin = mod._signal_site(<size_t>t.sig_frame, fence)
    raise mod._signalling_error(what, begin)


def begin_signalling():
    """Open a fence-signalling critical section (dma_fence_begin_signalling).

    Code between a fence becoming visible to others and its signal must not
    wait on fences nor take reservation locks: such a wait could depend on
    the very fence being signalled.  Inside a section pydmabuf reports
    either as :class:`~pydmabuf.errors.LockingError`, naming where the
    section began and where the offending call was made.  Sections nest;
    only the outermost one counts, as in the kernel.

    Returns
    -------
    bool
        The cookie for :func:`end_signalling`: True when a section was
        already open (nothing was opened).
    """
    cdef pdb_task *t = _cur_task()
    if t.sig_depth:
        return True
    site = _sites._caller_site()
    Py_INCREF(site)
    t.sig_site = <void *>site
    t.sig_depth = 1
    if _ld_signal is not None:
        _ld_signal(True)
    return False


def end_signalling(cookie):
    """Close the section opened by the :func:`begin_signalling` that
    returned ``cookie`` (a True cookie closes nothing).

    Raises
    ------
    LockingError
        No section opened by :func:`begin_signalling` is open in this
        thread.
    """
    cdef pdb_task *t
    if cookie:
        return
    t = _cur_task()
    if not t.sig_depth or t.sig_site == NULL:
        raise _errors.LockingError(
            "end_signalling(False) without a matching begin_signalling() in this thread")
    _sig_exit(t, False)
    if _ld_signal is not None:
        _ld_signal(False)


def thread_lock_state():
    """Test/debug hook: this thread's bookkeeping as a dict (held: ww
    mutexes held; in_section; signal_pending)."""
    cdef pdb_task *t = pdb_task_peek_c()
    if t == NULL:
        return {"held": 0, "in_section": False, "signal_pending": False}
    return {"held": t.held_total, "in_section": bool(t.sig_depth),
            "signal_pending": bool(pdb_load_int(&t.sigpending))}


def in_signalling_section():
    """True while this thread is inside a fence-signalling section."""
    cdef pdb_task *t = pdb_task_peek_c()
    return t != NULL and t.sig_depth != 0


