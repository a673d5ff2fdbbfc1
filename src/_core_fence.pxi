# Fences: struct dma_fence and its containers (drivers/dma-buf/dma-fence.c,
# dma-fence-array.c, dma-fence-chain.c, dma-fence-unwrap.c).
#
# A fence's state (flags, error, timestamp, waiter list) is C, guarded by
# the fence's own mutex; its callbacks are Python objects.  The kernel runs
# callbacks under the fence lock; here the state is updated under the lock,
# the lock is dropped and then the callbacks run in registration order,
# inside a fence-signalling section.  Waiters are released only after the
# callbacks have run, which is what a kernel waiter sees (it needs the
# fence lock to return).  A callback that raises does not stop the others
# nor leave the fence half-signalled: the first exception is re-raised
# when all have run.
#
# "ops": a Python subclass may override signaled(), enable_signaling(),
# set_deadline(), get_driver_name() and get_timeline_name(); the base
# class never calls Python for them.  Arrays and chains implement their
# ops in C-level methods.

import logging as _logging
from functools import cmp_to_key as _cmp_to_key
from libc.errno cimport ENOENT

_log = _logging.getLogger("pydmabuf")

cdef uint64_t _fence_context_counter = 1

cdef extern from "pdb_fence.h":
    int pdb_reserve_u64(uint64_t *p, uint64_t k, uint64_t *first) nogil
cdef int _ERESTARTSYS = 512
cdef int _PENDING_ERROR = 1         # dma-fence-array's "no error yet" marker

cdef enum:
    _HOOK_SIGNALED = 1
    _HOOK_ENABLE = 2
    _HOOK_DEADLINE = 4

cdef enum:
    _CB_IDLE = 0        # never queued, removed, or already run
    _CB_QUEUED = 1


def fence_context_alloc(n=1):
    """Reserve ``n`` fresh fence contexts; returns the first
    (``dma_fence_context_alloc``).

    Contexts come from one global counter starting at 1 (context 0 is the
    stubs').  Fences of one context are totally ordered by their seqno.

    Raises
    ------
    InvalidArgument
        ``n`` is 0 (the kernel warns and reserves nothing).
    """
    cdef uint64_t k = _u64(n, "n")
    cdef uint64_t first = 0
    if k == 0:
        raise _errors.InvalidArgument("fence_context_alloc(0) reserves nothing")
    # The kernel's counter is never expected to wrap; a model caller can
    # ask for 2**64 - 1 at once.  Refuse what would wrap (contexts would be
    # handed out twice) and leave the counter as it was.
    if pdb_reserve_u64(&_fence_context_counter, k, &first) < 0:
        raise _errors.Overflow(f"fence_context_alloc({k}): fewer than {k} contexts are left")
    return first


cdef int fence_init(pdb_fence *f, uint64_t context, uint64_t seqno) noexcept nogil:
    pthread_mutex_init(&f.mu, NULL)
    f.flags = 0
    f.error = 0
    f.context = context
    f.seqno = seqno
    f.timestamp = 0
    pdb_list_init(&f.waiters)
    return 0


cdef bint fence_is_later(const pdb_fence *a, const pdb_fence *b) noexcept nogil:
    """__dma_fence_is_later(): 64-bit compare for SEQNO64 fences, else the
    32-bit wrap-around compare of the low halves (a's ops decide)."""
    if a.flags & PDB_FENCE_SEQNO64:
        return a.seqno > b.seqno
    return <int32_t>(<uint32_t>a.seqno - <uint32_t>b.seqno) > 0


cdef void _fence_wake_all(pdb_fence *f) noexcept nogil:
    cdef pdb_fence_waiter *w = pdb_fence_waiter_of(pdb_list_first(&f.waiters))
    while w != NULL:
        pdb_wake(w.task)
        w = pdb_fence_waiter_of(pdb_list_next(&f.waiters, &w.node))


cdef inline void _fence_link(pdb_fence *f, pdb_fence_waiter *w, pdb_task *t) noexcept nogil:
    """Newest first, so _fence_wake_all() wakes the latest waiter first."""
    w.task = t
    pdb_list_add(&w.node, &f.waiters)


cdef inline void _fence_unlink(pdb_fence *f, pdb_fence_waiter *w) noexcept nogil:
    """Take ``w`` off ``f``'s waiters; the caller holds ``f.mu``."""
    pdb_list_del(&w.node)


cdef int fence_wait(pdb_fence *f, pdb_task *t, int64_t deadline_ns,
                    bint interruptible) noexcept nogil:
    """dma_fence_default_wait() for the model: wait for the signal and its
    callbacks.  A fence signalled before the deadline counts as signalled
    even if its callbacks finish after it."""
    cdef pdb_fence_waiter w
    cdef int ret
    pthread_mutex_lock(&f.mu)
    _fence_link(f, &w, t)
    while True:
        if f.flags & PDB_FENCE_CB_DONE:
            ret = 1
            break
        if interruptible and pdb_load_int(&t.sigpending):
            ret = -_ERESTARTSYS
            break
        if deadline_ns >= 0 and pdb_now_ns() >= deadline_ns:
            if f.flags & PDB_FENCE_SIGNALED:
                deadline_ns = -1
                continue
            ret = 0
            break
        pthread_mutex_unlock(&f.mu)
        pdb_park(t, deadline_ns)
        pthread_mutex_lock(&f.mu)
    _fence_unlink(f, &w)
    pthread_mutex_unlock(&f.mu)
    return ret


cdef int _fence_wait_any(pdb_fence **fs, Py_ssize_t n, pdb_task *t, int64_t deadline_ns,
                         bint interruptible, pdb_fence_waiter *ws) noexcept nogil:
    """dma_fence_wait_any_timeout(): index of the lowest signalled fence,
    -1 at the deadline, -ERESTARTSYS when interrupted."""
    cdef Py_ssize_t i
    cdef int ret = -1
    for i in range(n):
        pthread_mutex_lock(&fs[i].mu)
        _fence_link(fs[i], &ws[i], t)
        pthread_mutex_unlock(&fs[i].mu)
    while True:
        for i in range(n):
            if pdb_load_flags(&fs[i].flags) & PDB_FENCE_CB_DONE:
                ret = <int>i
                break
        if ret >= 0:
            break
        if interruptible and pdb_load_int(&t.sigpending):
            ret = -_ERESTARTSYS
            break
        if deadline_ns >= 0 and pdb_now_ns() >= deadline_ns:
            ret = -1
            break
        pdb_park(t, deadline_ns)
    for i in range(n):
        pthread_mutex_lock(&fs[i].mu)
        _fence_unlink(fs[i], &ws[i])
        pthread_mutex_unlock(&fs[i].mu)
    return ret


cdef int64_t _s64(object value, str name) except? -1:
    """A Python int in the range of a signed 64-bit ``ktime_t``."""
    if not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{name} must be an integer (ns), not {type(value).__name__}") from None
    if value < -0x8000000000000000 or value > 0x7FFFFFFFFFFFFFFF:
        raise _errors.Overflow(f"{name} {value} does not fit a signed 64-bit ktime_t")
    return value


cdef int64_t _ts_arg(object timestamp) except? -1:
    """A signal timestamp argument: ns (int), None for now."""
    if timestamp is None:
        return pdb_now_ns()
    return _s64(timestamp, "timestamp")


cdef inline void _lock_mu(pthread_mutex_t *mu):
    """Take a fence mutex while holding the GIL (dropping it if contended)."""
    if pthread_mutex_trylock(mu) != 0:
        with nogil:
            pthread_mutex_lock(mu)


cdef dict _hook_cache = {}


cdef int _hooks_of(type cls) except -1:
    """Which ops a Python subclass overrides (computed once per class)."""
    cdef int h
    try:
        return _hook_cache[cls]
    except KeyError:
        pass
    h = 0
    if cls.signaled is not Fence.signaled:
        h |= _HOOK_SIGNALED
    if cls.enable_signaling is not Fence.enable_signaling:
        h |= _HOOK_ENABLE
    if cls.set_deadline is not Fence.set_deadline:
        h |= _HOOK_DEADLINE
    _hook_cache[cls] = h
    return h


cdef class FenceCallback:
    """A callback registered on a fence (``struct dma_fence_cb``).

    Returned by :meth:`Fence.add_callback`; pass it to
    :meth:`Fence.remove_callback`.  ``pending`` is True while it is queued.
    """

    def __init__(self):
        raise TypeError("FenceCallback objects are made by Fence.add_callback()")

    cdef int _fire(self, Fence fence) except -1:
        self.fn(fence)
        return 0

    @property
    def pending(self):
        """True while queued (not run, not removed)."""
        return self.state == _CB_QUEUED

    @property
    def fn(self):
        return self.fn

    def __repr__(self):
        return f"<FenceCallback {self.fn!r} {'pending' if self.state == _CB_QUEUED else 'idle'}>"


cdef FenceCallback _new_callback(object fn):
    cdef FenceCallback cb = FenceCallback.__new__(FenceCallback)
    cb.fn = fn
    cb.state = _CB_IDLE
    return cb


cdef class Fence:
    """A DMA fence (``struct dma_fence``): a one-shot completion event.

    Fences of one ``context`` form a timeline ordered by ``seqno``.  A
    fence is signalled once (:meth:`signal`), possibly with an error set
    before (:meth:`set_error`); callbacks added before run at the signal,
    and waiters (:meth:`wait`, with the GIL released) wake after them.

    Subclasses model driver fences by overriding the ops: ``signaled()``
    (peek at hardware; returning True makes :meth:`is_signaled` signal the
    fence), ``enable_signaling()`` (arm the interrupt; returning False
    signals the fence at once), ``set_deadline()``,
    ``get_driver_name()`` and ``get_timeline_name()``.  As in the kernel,
    :meth:`wait` sleeps until the fence is signalled; it does not poll
    ``signaled()``.

    Parameters
    ----------
    context : int
        From :func:`fence_context_alloc` (u64).
    seqno : int
        Position on the context's timeline (u64).
    seqno64 : bool, default False
        Compare seqnos as 64-bit numbers (``dma_fence_init64``); otherwise
        :meth:`is_later` compares the low 32 bits with wrap-around, as the
        kernel does for most fences.
    """

    def __cinit__(self):
        fence_init(&self.f, 0, 0)
        self._callbacks = None
        self._hooks = 0 if type(self) is Fence else _hooks_of(type(self))

    def __init__(self, context, seqno, *, bint seqno64=False):
        self.f.context = _u64(context, "context")
        self.f.seqno = _u64(seqno, "seqno")
        if seqno64:
            self.f.flags |= PDB_FENCE_SEQNO64

    def __dealloc__(self):
        pthread_mutex_destroy(&self.f.mu)

    def __del__(self):
        # dma_fence_release(): a fence dropped unsignalled with callbacks
        # still queued is signalled with -EDEADLK so nothing hangs on it.
        if self._callbacks and not (pdb_load_flags(&self.f.flags) & PDB_FENCE_SIGNALED):
            self.f.error = -EDEADLK
            try:
                self._signal(pdb_now_ns(), False)
            except BaseException:
                _log.exception("callback of a fence released unsignalled raised")

    # ------------------------------------------------------------ ops

    def signaled(self):
        """Op: peek at the hardware; True means the fence is done.

        The base class has nothing to peek at and returns False.
        """
        return False

    def enable_signaling(self):
        """Op: arm whatever will signal the fence; False means it is
        already done (the fence is then signalled at once).  Called at most
        once, by :meth:`enable_sw_signaling`.  The base returns True."""
        return True

    def set_deadline(self, deadline_ns):
        """Op: a hint that the fence should be done by ``deadline_ns``
        (CLOCK_MONOTONIC).  The base ignores it."""
        return None

    def get_driver_name(self):
        """Op: the driver's name (for messages)."""
        return "pydmabuf"

    def get_timeline_name(self):
        """Op: the timeline's name (for messages)."""
        return "unbound"

    cdef bint _op_signaled(self) except -1:
        if self._hooks & _HOOK_SIGNALED:
            return bool(self.signaled())
        return False

    cdef bint _op_enable_signaling(self) except -1:
        if self._hooks & _HOOK_ENABLE:
            return bool(self.enable_signaling())
        return True

    cdef int _op_set_deadline(self, int64_t deadline) except -1:
        if self._hooks & _HOOK_DEADLINE:
            self.set_deadline(deadline)
        return 0

    # ------------------------------------------------------- properties

    @property
    def context(self):
        return self.f.context

    @property
    def seqno(self):
        return self.f.seqno

    @property
    def error(self):
        """0, or the negative errno set with :meth:`set_error`."""
        return self.f.error

    @property
    def seqno64(self):
        """True when seqnos compare as 64-bit numbers."""
        return bool(self.f.flags & PDB_FENCE_SEQNO64)

    @property
    def timestamp(self):
        """CLOCK_MONOTONIC ns of the signal, or None while unsignalled.

        (The kernel warns and returns "now" for an unsignalled fence.)
        """
        if not (pdb_load_flags(&self.f.flags) & PDB_FENCE_TIMESTAMP):
            return None
        return self.f.timestamp

    @property
    def status(self):
        """``dma_fence_get_status``: 0 pending, 1 signalled, or the error."""
        if not self._is_signaled():
            return 0
        return self.f.error if self.f.error else 1

    @property
    def sw_signaling_enabled(self):
        return bool(pdb_load_flags(&self.f.flags) & PDB_FENCE_ENABLE_SIGNAL)

    # ------------------------------------------------------- ordering

    def is_later(self, Fence other not None):
        """``dma_fence_is_later``: True when this fence comes after ``other``
        on their common timeline.

        Raises
        ------
        InvalidArgument
            The fences belong to different contexts (the kernel warns and
            says False; they are not ordered).
        """
        if self.f.context != other.f.context:
            raise _errors.InvalidArgument(
                f"{self!r} and {other!r} are on different contexts and are not ordered")
        return fence_is_later(&self.f, &other.f)

    def is_later_or_same(self, Fence other not None):
        """``dma_fence_is_later_or_same``: the same fence, or a later one."""
        return self is other or self.is_later(other)

    @staticmethod
    def later(Fence f1 not None, Fence f2 not None):
        """``dma_fence_later``: the later of two fences of one context, or
        None when that one is already signalled."""
        cdef Fence later = f1 if f1.is_later(f2) else f2
        return None if later._is_signaled() else later

    # ------------------------------------------------------- signalling

    def is_signaled(self):
        """True once signalled (``dma_fence_is_signaled``).

        For a fence whose ``signaled()`` op reports completion, this
        signals it as a side effect.
        """
        return self._is_signaled()

    cdef bint _is_signaled(self) except -1:
        if pdb_load_flags(&self.f.flags) & PDB_FENCE_SIGNALED:
            return True
        if self._op_signaled():
            self._signal(pdb_now_ns(), False)
            return True
        return False

    cdef int _signal(self, int64_t timestamp, bint strict) except -1:
        """dma_fence_signal_timestamp(): 0 when this call signalled it, 1
        when it was signalled already (an EINVAL when ``strict``)."""
        cdef list cbs
        cdef FenceCallback cb
        cdef pdb_task *t = _cur_task()     # before anything changes
        cdef bint nested
        cdef object first = None
        _lock_mu(&self.f.mu)
        if self.f.flags & PDB_FENCE_SIGNALED:
            pthread_mutex_unlock(&self.f.mu)
            if strict:
                raise _errors.InvalidArgument(f"{self!r} is already signalled")
            return 1
        self.f.timestamp = timestamp
        pdb_or_flags(&self.f.flags, PDB_FENCE_SIGNALED | PDB_FENCE_TIMESTAMP)
        cbs = self._callbacks
        self._callbacks = None
        if not cbs:
            pdb_or_flags(&self.f.flags, PDB_FENCE_CB_DONE)
            _fence_wake_all(&self.f)
            pthread_mutex_unlock(&self.f.mu)
            return 0
        for cb in cbs:
            cb.state = _CB_IDLE
        pthread_mutex_unlock(&self.f.mu)
        nested = _sig_enter_implicit(t, self)
        if not nested and _ld_signal is not None:
            _ld_signal(True)
        try:
            for cb in cbs:
                try:
                    cb._fire(self)
                except BaseException as e:
                    if first is None:
                        first = e
                    else:
                        _log.error("another callback of %r raised", self, exc_info=e)
        finally:
            _sig_exit(t, nested)
            if not nested and _ld_signal is not None:
                _ld_signal(False)
            _lock_mu(&self.f.mu)
            pdb_or_flags(&self.f.flags, PDB_FENCE_CB_DONE)
            _fence_wake_all(&self.f)
            pthread_mutex_unlock(&self.f.mu)
        if first is not None:
            raise first
        return 0

    def signal(self, timestamp=None):
        """Signal it (``dma_fence_signal``): run its callbacks, wake its
        waiters.

        Parameters
        ----------
        timestamp : int, optional
            CLOCK_MONOTONIC ns to record (``dma_fence_signal_timestamp``);
            default now.

        Raises
        ------
        InvalidArgument
            It was already signalled (EINVAL, as kernels before 7.0
            return); nothing changes.
        BaseException
            The first exception a callback raised, after every callback
            ran and the fence is fully signalled.
        """
        self._signal(_ts_arg(timestamp), True)

    def check_and_signal(self, timestamp=None):
        """Signal it unless already signalled (``dma_fence_check_and_signal``,
        Linux 7.0).  Returns True when it *was* already signalled."""
        return self._signal(_ts_arg(timestamp), False) == 1

    def set_error(self, error):
        """Record why the fence will complete unsuccessfully
        (``dma_fence_set_error``); must come before the signal.

        Parameters
        ----------
        error : int
            A negative errno in ``[-4095, -1]``, e.g. ``-errno.EIO``.

        Raises
        ------
        InvalidArgument
            The fence is already signalled, or ``error`` is not a negative
            errno (the kernel warns on both).
        """
        if not isinstance(error, int):
            raise TypeError(f"set_error(): the error must be a negative errno (int), not {type(error).__name__}")
        if not (-4095 <= error < 0):
            raise _errors.InvalidArgument(f"set_error({error}): the error must be in [-4095, -1]")
        _lock_mu(&self.f.mu)
        if self.f.flags & PDB_FENCE_SIGNALED:
            pthread_mutex_unlock(&self.f.mu)
            raise _errors.InvalidArgument(f"set_error() on {self!r}, which is already signalled")
        self.f.error = error
        pthread_mutex_unlock(&self.f.mu)

    def enable_sw_signaling(self):
        """Ask for a signal (``dma_fence_enable_sw_signaling``): the first
        call runs the ``enable_signaling()`` op, and signals the fence if
        that returns False."""
        cdef unsigned int old
        _lock_mu(&self.f.mu)
        old = self.f.flags
        pdb_or_flags(&self.f.flags, PDB_FENCE_ENABLE_SIGNAL)
        pthread_mutex_unlock(&self.f.mu)
        if old & (PDB_FENCE_ENABLE_SIGNAL | PDB_FENCE_SIGNALED):
            return
        if not self._op_enable_signaling():
            self._signal(pdb_now_ns(), False)

    cdef bint _add(self, FenceCallback cb) except -1:
        """dma_fence_add_callback(): True when queued, False when the fence
        is (or became, on enabling) signalled."""
        if pdb_load_flags(&self.f.flags) & PDB_FENCE_SIGNALED:
            return False
        if not (pdb_load_flags(&self.f.flags) & PDB_FENCE_ENABLE_SIGNAL):
            self.enable_sw_signaling()
        _lock_mu(&self.f.mu)
        if self.f.flags & PDB_FENCE_SIGNALED:
            pthread_mutex_unlock(&self.f.mu)
            return False
        if self._callbacks is None:
            self._callbacks = [cb]
        else:
            self._callbacks.append(cb)
        cb.state = _CB_QUEUED
        pthread_mutex_unlock(&self.f.mu)
        return True

    def add_callback(self, fn):
        """Call ``fn(fence)`` when the fence signals
        (``dma_fence_add_callback``).

        Callbacks run in the signalling thread, in the order they were
        added, inside a fence-signalling section: they must not wait on
        fences nor take reservation locks.  Enables signalling.

        Returns
        -------
        FenceCallback
            The handle for :meth:`remove_callback`.

        Raises
        ------
        NotFound
            ENOENT: the fence is already signalled; ``fn`` will not run.
        """
        if not callable(fn):
            raise TypeError(f"the callback must be callable, not {type(fn).__name__}")
        cdef FenceCallback cb = _new_callback(fn)
        if not self._add(cb):
            raise _errors.NotFound(f"{self!r} is already signalled; the callback will not run")
        return cb

    def remove_callback(self, FenceCallback cb not None):
        """Unqueue a callback (``dma_fence_remove_callback``).

        Returns True when it was still queued (it will not run now), False
        when it already ran or was never queued on this fence.
        """
        cdef Py_ssize_t i
        cdef bint found = False
        _lock_mu(&self.f.mu)
        if cb.state == _CB_QUEUED and self._callbacks is not None:
            for i in range(len(self._callbacks)):
                if self._callbacks[i] is cb:
                    del self._callbacks[i]
                    cb.state = _CB_IDLE
                    found = True
                    break
        pthread_mutex_unlock(&self.f.mu)
        return found

    @property
    def pending_callbacks(self):
        """How many callbacks are queued."""
        cbs = self._callbacks
        return len(cbs) if cbs is not None else 0

    def wait(self, timeout=None, *, bint interruptible=False):
        """Wait until the fence is signalled (``dma_fence_wait_timeout``).

        Enables signalling, then sleeps with the GIL released.

        Parameters
        ----------
        timeout : float or None
            Seconds; None waits forever, 0 only tests.
        interruptible : bool
            A signal (:func:`signal_thread`) ends the wait.

        Returns
        -------
        bool
            True when signalled (the kernel's positive remainder, or 1 for
            a zero timeout), False when the time ran out (0).

        Raises
        ------
        Interrupted
            ERESTARTSYS: interruptible and a signal is pending.
        InvalidArgument
            Negative timeout (EINVAL).
        LockingError
            Called inside a fence-signalling section.
        """
        cdef pdb_task *t = _cur_task()
        cdef int64_t deadline
        cdef unsigned int flags
        cdef int rc
        if t.sig_depth:
            _sig_violation(t, f"waiting on {self!r}")
        if _ld_wait is not None:
            _ld_wait()
        deadline = _deadline(timeout, "Fence.wait")
        self.enable_sw_signaling()
        flags = pdb_load_flags(&self.f.flags)
        if flags & PDB_FENCE_CB_DONE:
            return True
        if not (flags & PDB_FENCE_SIGNALED):
            if interruptible and pdb_load_int(&t.sigpending):
                _interrupted(t, _ERESTARTSYS, f"interrupted while waiting on {self!r}")
            if timeout is not None and timeout == 0:
                return False
        with nogil:
            rc = fence_wait(&self.f, t, deadline, interruptible)
        if rc == -_ERESTARTSYS:
            _interrupted(t, _ERESTARTSYS, f"interrupted while waiting on {self!r}")
        return rc == 1

    def set_deadline_hint(self, deadline_ns):
        """``dma_fence_set_deadline``: pass the hint to the ``set_deadline``
        op unless the fence is signalled."""
        cdef int64_t d = _s64(deadline_ns, "deadline_ns")
        if not self._is_signaled():
            self._op_set_deadline(d)

    def describe(self):
        """One line as ``dma_fence_describe`` prints it."""
        return (f"{self.get_driver_name()} {self.get_timeline_name()} seq {self.f.seqno} "
                f"{'' if self._is_signaled() else 'un'}signalled")

    def __repr__(self):
        cdef unsigned int fl = pdb_load_flags(&self.f.flags)
        state = "signalled" if fl & PDB_FENCE_SIGNALED else "pending"
        if self.f.error:
            state += f" error={self.f.error}"
        return (f"<{type(self).__name__} ctx={self.f.context} seqno={self.f.seqno} {state}>")


def fence_wait_any(fences, timeout=None, *, bint interruptible=False):
    """Wait until any of ``fences`` signals (``dma_fence_wait_any_timeout``).

    Returns
    -------
    int or None
        The lowest index of a signalled fence, None when the time ran out.

    Raises
    ------
    InvalidArgument
        No fences, or a negative timeout.
    Interrupted
        Interruptible and a signal is pending (ERESTARTSYS).
    LockingError
        Called inside a fence-signalling section.
    """
    cdef list fs = list(fences)
    cdef Py_ssize_t n = len(fs), i
    cdef pdb_task *t = _cur_task()
    cdef int64_t deadline
    cdef pdb_fence **ptrs
    cdef pdb_fence_waiter *ws
    cdef int rc
    cdef Fence f
    for x in fs:
        if not isinstance(x, Fence):
            raise TypeError(f"fence_wait_any() takes fences, not {type(x).__name__}")
    if n == 0:
        raise _errors.InvalidArgument("fence_wait_any() of no fences")
    if t.sig_depth:
        _sig_violation(t, f"waiting on any of {fs!r}")
    if _ld_wait is not None:
        _ld_wait()
    deadline = _deadline(timeout, "fence_wait_any")
    if timeout is not None and timeout == 0:
        for i in range(n):
            if (<Fence>fs[i])._is_signaled():
                return i
        return None
    for f in fs:
        f.enable_sw_signaling()
    ptrs = <pdb_fence **>malloc(n * sizeof(pdb_fence *))
    ws = <pdb_fence_waiter *>malloc(n * sizeof(pdb_fence_waiter))
    if ptrs == NULL or ws == NULL:
        free(ptrs)
        free(ws)
        raise MemoryError()
    for i in range(n):
        ptrs[i] = &(<Fence>fs[i]).f
    try:
        with nogil:
            rc = _fence_wait_any(ptrs, n, t, deadline, interruptible, ws)
    finally:
        free(ptrs)
        free(ws)
    if rc == -_ERESTARTSYS:
        _interrupted(t, _ERESTARTSYS, "interrupted while waiting on fences")
    return None if rc < 0 else rc


# ------------------------------------------------------------------ stubs

cdef class _StubFence(Fence):
    """The stub fences: context 0, seqno 0, born signalled."""

    def get_driver_name(self):
        return "stub"

    def get_timeline_name(self):
        return "stub"


cdef object _stub_fence = None


def get_stub_fence():
    """The shared, always-signalled stub fence (``dma_fence_get_stub``):
    context 0, seqno 0, timestamp of the first call."""
    global _stub_fence
    cdef _StubFence s
    if _stub_fence is None:
        s = _StubFence(0, 0)
        s.f.flags |= PDB_FENCE_ENABLE_SIGNAL
        s._signal(pdb_now_ns(), False)
        _stub_fence = s
    return _stub_fence


def private_stub_fence(timestamp=None):
    """A new signalled stub fence with the given timestamp (ns; default
    now), as ``dma_fence_allocate_private_stub`` makes."""
    cdef _StubFence s = _StubFence(0, 0)
    s.f.flags |= PDB_FENCE_ENABLE_SIGNAL
    s._signal(_ts_arg(timestamp), False)
    return s


# ------------------------------------------------------------ fence array

cdef class _ArrayCallback(FenceCallback):
    cdef FenceArray array

    cdef int _fire(self, Fence fence) except -1:
        self.array._member_done(fence.f.error)
        return 0


cdef class FenceArray(Fence):
    """A fence over several fences (``struct dma_fence_array``).

    It signals when all of them have (or, with ``signal_on_any``, when any
    has).  The first error among the members that completed becomes its
    error.  Members must not be arrays or chains (unwrap them first; the
    kernel warns).

    Parameters
    ----------
    fences : iterable of Fence
        At least one.
    signal_on_any : bool, default False
    context : int, optional
        Default: a fresh context from :func:`fence_context_alloc`.
    seqno : int, default 1
    """

    cdef tuple _fences
    cdef int _pending
    cdef bint _latched
    cdef readonly bint signal_on_any

    def __init__(self, fences, bint signal_on_any=False, *, context=None, seqno=1):
        cdef tuple fs
        if self._fences is not None:
            raise _errors.InvalidArgument(f"{self!r} is already initialised (dma_fence_array_init twice)")
        fs = tuple(fences)
        if not fs:
            raise _errors.InvalidArgument("a FenceArray needs at least one fence")
        for x in fs:
            if not isinstance(x, Fence):
                raise TypeError(f"FenceArray members must be fences, not {type(x).__name__}")
            if isinstance(x, (FenceArray, FenceChain)):
                raise _errors.InvalidArgument(
                    f"FenceArray member {x!r} is a container; unwrap it first")
        ctx = fence_context_alloc(1) if context is None else context
        Fence.__init__(self, ctx, seqno)
        self._fences = fs
        self.signal_on_any = signal_on_any
        self._pending = 1 if signal_on_any else len(fs)
        self._latched = False

    @property
    def fences(self):
        """The member fences (a tuple)."""
        return self._fences

    @property
    def num_fences(self):
        return len(self._fences)

    def get_driver_name(self):
        return "dma_fence_array"

    def get_timeline_name(self):
        return "unbound"

    def set_error(self, error):
        Fence.set_error(self, error)
        self._latched = True

    cdef void _latch(self, int error):
        """dma_fence_array_set_pending_error(): keep the first member error."""
        if error and not self._latched:
            self.f.error = error
            self._latched = True

    cdef int _member_done(self, int error) except -1:
        cdef bint zero
        _lock_mu(&self.f.mu)
        self._latch(error)
        self._pending -= 1
        zero = self._pending == 0
        if zero:
            self._latched = True
        pthread_mutex_unlock(&self.f.mu)
        if zero:
            self._signal(pdb_now_ns(), False)
        return 0

    cdef bint _op_enable_signaling(self) except -1:
        cdef Fence m
        cdef _ArrayCallback cb
        cdef bint zero
        for m in self._fences:
            cb = _ArrayCallback.__new__(_ArrayCallback)
            cb.array = self
            if not m._add(cb):
                _lock_mu(&self.f.mu)
                self._latch(m.f.error)
                self._pending -= 1
                zero = self._pending == 0
                if zero:
                    self._latched = True
                pthread_mutex_unlock(&self.f.mu)
                if zero:
                    return False
        return True

    cdef bint _op_signaled(self) except -1:
        cdef int pending
        cdef Fence m
        _lock_mu(&self.f.mu)
        pending = self._pending
        pthread_mutex_unlock(&self.f.mu)
        if pdb_load_flags(&self.f.flags) & PDB_FENCE_ENABLE_SIGNAL:
            if pending <= 0:
                self._latched = True
                return True
            return False
        for m in self._fences:
            if m._is_signaled():
                pending -= 1
                if pending == 0:
                    self._latched = True
                    return True
        return False

    cdef int _op_set_deadline(self, int64_t deadline) except -1:
        cdef Fence m
        for m in self._fences:
            if not m._is_signaled():
                m._op_set_deadline(deadline)
        return 0

    def match_context(self, context):
        """``dma_fence_match_context``: every member is of ``context``."""
        cdef uint64_t c = _u64(context, "context")
        cdef Fence m
        for m in self._fences:
            if m.f.context != c:
                return False
        return True

    def __len__(self):
        return len(self._fences)

    def __iter__(self):
        return iter(self._fences)


# ------------------------------------------------------------ fence chain

cdef class _ChainCallback(FenceCallback):
    cdef FenceChain chain

    cdef int _fire(self, Fence fence) except -1:
        # dma_fence_chain_cb + irq work: re-arm on the next pending point,
        # or signal the node when none is left.
        if not self.chain._op_enable_signaling():
            self.chain._signal(pdb_now_ns(), False)
        return 0


cdef inline Fence _contained(Fence f):
    return (<FenceChain>f)._fence if isinstance(f, FenceChain) else f


def fence_chain_contained(Fence fence not None):
    """``dma_fence_chain_contained``: a chain node's fence, else ``fence``."""
    return _contained(fence)


@cython.trashcan(True)
cdef class FenceChain(Fence):
    """A point on a timeline built of fences (``struct dma_fence_chain``).

    Each node holds one ``fence`` and links to the previous point
    (``prev``, a chain node or any fence).  A node signals once its own
    fence and every earlier point's have.  Nodes of one timeline share a
    context; seqnos compare as 64-bit numbers.

    Parameters
    ----------
    prev : Fence or None
        The previous point.  If it is a chain node with a smaller seqno,
        this node continues its context; otherwise a new context starts
        (and the seqno is raised to prev's if smaller).
    fence : Fence
        The fence of this point; not itself a chain (the kernel warns).
    seqno : int
    """

    cdef object _prev
    cdef Fence _fence
    cdef readonly uint64_t prev_seqno
    cdef bint _inited

    def __cinit__(self):
        # A node made with __new__ and never initialised holds the signalled
        # stub: every walk then treats it as a completed point, and no C
        # code ever meets a NULL fence.
        self._fence = get_stub_fence()
        self._inited = False

    def __init__(self, prev, Fence fence not None, seqno):
        cdef uint64_t s = _u64(seqno, "seqno")
        cdef FenceChain pc = None
        if self._inited:
            raise _errors.InvalidArgument(f"{self!r} is already initialised (dma_fence_chain_init twice)")
        if prev is not None and not isinstance(prev, Fence):
            raise TypeError(f"prev must be a fence or None, not {type(prev).__name__}")
        if isinstance(fence, FenceChain):
            raise _errors.InvalidArgument(
                f"a chain node may not contain another chain node ({fence!r}); use an array")
        if isinstance(prev, FenceChain):
            pc = prev
        if pc is not None and s > pc.f.seqno:
            ctx = pc.f.context
            self.prev_seqno = pc.f.seqno
        else:
            ctx = fence_context_alloc(1)
            self.prev_seqno = 0
            if pc is not None and pc.f.seqno > s:
                s = pc.f.seqno
        Fence.__init__(self, ctx, s, seqno64=True)
        self._prev = prev
        self._fence = fence
        self._inited = True

    def get_driver_name(self):
        return "dma_fence_chain"

    def get_timeline_name(self):
        return "unbound"

    @property
    def fence(self):
        """The fence of this point."""
        return self._fence

    @property
    def prev(self):
        """The previous point still worth waiting for (walks drop signalled
        ones), or None."""
        return self._get_prev()

    cdef object _get_prev(self):
        _lock_mu(&self.f.mu)
        p = self._prev
        pthread_mutex_unlock(&self.f.mu)
        return p

    cdef void _replace_prev(self, object old, object new):
        """cmpxchg(&chain->prev, old, new); the dropped reference is
        released after the mutex."""
        cdef object keep = None
        _lock_mu(&self.f.mu)
        if self._prev is old:
            keep = self._prev
            self._prev = new
        pthread_mutex_unlock(&self.f.mu)
        keep = None

    cdef bint _op_signaled(self) except -1:
        cdef object node = self
        while node is not None:
            if not _contained(<Fence>node)._is_signaled():
                return False
            node = _chain_walk(node)
        return True

    cdef bint _op_enable_signaling(self) except -1:
        cdef object node = self
        cdef _ChainCallback cb
        while node is not None:
            cb = _ChainCallback.__new__(_ChainCallback)
            cb.chain = self
            if _contained(<Fence>node)._add(cb):
                return True
            node = _chain_walk(node)
        return False

    cdef int _op_set_deadline(self, int64_t deadline) except -1:
        cdef object node = self
        while node is not None:
            _contained(<Fence>node)._op_set_deadline(deadline)
            node = _chain_walk(node)
        return 0

    def walk(self):
        """``dma_fence_chain_walk``: the next older point still pending
        (dropping signalled points from the links on the way), or None."""
        return _chain_walk(self)

    def __iter__(self):
        """``dma_fence_chain_for_each``: this node, then each older pending
        point."""
        node = self
        while node is not None:
            yield node
            node = _chain_walk(node)

    def find_seqno(self, seqno):
        """``dma_fence_chain_find_seqno``: the point that must signal for
        ``seqno`` to be reached.

        Returns this node for seqno 0; None when every point up to
        ``seqno`` has signalled already.

        Raises
        ------
        InvalidArgument
            ``seqno`` is beyond this node's seqno (EINVAL).
        """
        cdef uint64_t s = _u64(seqno, "seqno")
        cdef object node
        if s == 0:
            return self
        if self.f.seqno < s:
            raise _errors.InvalidArgument(
                f"find_seqno({s}) on {self!r}: the timeline only reaches {self.f.seqno}")
        node = self
        while node is not None:
            if ((<Fence>node).f.context != self.f.context or not isinstance(node, FenceChain)
                    or (<FenceChain>node).prev_seqno < s):
                return node
            node = _chain_walk(node)
        return None


cdef object _chain_walk(object fence):
    """dma_fence_chain_walk()."""
    cdef FenceChain chain
    cdef object prev, replacement
    if not isinstance(fence, FenceChain):
        return None
    chain = fence
    while True:
        prev = chain._get_prev()
        if prev is None:
            return None
        if isinstance(prev, FenceChain):
            if not _contained(<Fence>prev)._is_signaled():
                return prev
            replacement = (<FenceChain>prev)._get_prev()
        else:
            if not (<Fence>prev)._is_signaled():
                return prev
            replacement = None
        chain._replace_prev(prev, replacement)


def fence_chain_find_seqno(Fence fence not None, seqno):
    """Module form of :meth:`FenceChain.find_seqno` that, like the kernel,
    accepts any fence: seqno 0 returns ``fence``; a non-chain fence is
    EINVAL (:class:`~pydmabuf.errors.InvalidArgument`)."""
    if _u64(seqno, "seqno") == 0:
        return fence
    if not isinstance(fence, FenceChain):
        raise _errors.InvalidArgument(f"{fence!r} is not a chain node")
    return (<FenceChain>fence).find_seqno(seqno)


# ---------------------------------------------------------- unwrap, merge

def fence_unwrap(Fence fence not None):
    """The leaves of ``fence`` (``dma_fence_unwrap_for_each``), in order.

    A chain gives each pending point (this node first) and, within a
    point, an array's members; an array gives its members; a plain fence
    gives itself.
    """
    cdef list out = []
    cdef object node = fence
    cdef Fence c
    while node is not None:
        c = _contained(<Fence>node)
        if isinstance(c, FenceArray):
            out.extend((<FenceArray>c)._fences)
        else:
            out.append(c)
        node = _chain_walk(node)
    return out


cdef int _fence_cmp(Fence a, Fence b) except -2:
    """fence_cmp() of dma-fence-unwrap.c: context ascending, then newest
    first."""
    if a.f.context < b.f.context:
        return -1
    if a.f.context > b.f.context:
        return 1
    if fence_is_later(&b.f, &a.f):
        return 1
    if fence_is_later(&a.f, &b.f):
        return -1
    return 0


def _fence_cmp_py(a, b):
    return _fence_cmp(a, b)


def fence_merge(*fences):
    """One fence standing for all of ``fences`` (``dma_fence_unwrap_merge``).

    Every input is unwrapped; signalled leaves are dropped; of several
    leaves of one context only the newest stays.  The result is a new
    signalled stub (nothing left; its timestamp is the latest of the
    dropped leaves), the one remaining fence itself, or a new
    :class:`FenceArray` (fresh context, seqno 1) ordered by context.
    """
    cdef list pending = []
    cdef int64_t ts = 0
    cdef Fence f, leaf
    cdef list out
    for x in fences:
        if not isinstance(x, Fence):
            raise TypeError(f"fence_merge() takes fences, not {type(x).__name__}")
    for f in fences:
        for leaf in fence_unwrap(f):
            if leaf._is_signaled():
                if leaf.f.timestamp > ts:
                    ts = leaf.f.timestamp
            else:
                pending.append(leaf)
    if not pending:
        return private_stub_fence(ts)
    if len(pending) == 1:
        return pending[0]
    pending.sort(key=_cmp_to_key(_fence_cmp_py))
    out = [pending[0]]
    for leaf in pending[1:]:
        if leaf.f.context != (<Fence>out[len(out) - 1]).f.context:
            out.append(leaf)
    if len(out) == 1:
        return out[0]
    return FenceArray(out, False, context=fence_context_alloc(1), seqno=1)
