# Wound/wait mutexes: the kernel's ww_class, ww_mutex and ww_acquire_ctx
# (include/linux/ww_mutex.h, kernel/locking/ww_mutex.h, the ww parts of
# kernel/locking/mutex.c), with the debug checks of DEBUG_WW_MUTEXES and
# the lockdep rules that concern them always on, as LockingError.
#
# Threads block for real: a waiter parks on its task (pdb_task, the model's
# task_struct) with the GIL released; whoever must wake it (an unlock, a
# wound, a die) sets the task's wake token.  Wait lists, stamps, the
# wait-die and wound-wait decisions follow the kernel's functions of the
# same names (__ww_mutex_add_waiter, __ww_mutex_check_kill, ...) step by
# step; the owner word with its WAITERS flag follows struct mutex.
#
# Tasks (threads) are in _core_task.pxi; the per-thread state of the
# fence-signalling checker in _core_sigsection.pxi (used by the fence
# and resv code too).


# ------------------------------------------------------------- ww kernels

cdef pdb_task *_owner(size_t word) noexcept nogil:
    return <pdb_task *>(word & ~PDB_MUTEX_WAITERS)


cdef inline bint _ctx_less(pdb_ww_ctx *a, pdb_ww_ctx *b) noexcept nogil:
    """__ww_ctx_less(): a is younger than b (wrap-safe on the stamps)."""
    return <long>(a.stamp - b.stamp) > 0


cdef inline bint _mutex_trylock(pdb_ww_mutex *m, pdb_task *t) noexcept nogil:
    """__mutex_trylock(): take a free mutex, keeping its flags."""
    cdef size_t o = pdb_load_sz(&m.owner)
    while _owner(o) == NULL:
        if pdb_cas_sz(&m.owner, &o, <size_t>t | (o & PDB_MUTEX_WAITERS)):
            m.owner_ident = t.ident
            return True
    return False


cdef inline void _waiter_add(pdb_ww_mutex *m, pdb_ww_waiter *w,
                             pdb_ww_waiter *pos) noexcept nogil:
    """Queue ``w`` before ``pos`` (at the tail when pos is NULL); set WAITERS."""
    if pos == NULL:
        pdb_list_add_tail(&w.node, &m.waiters)
    else:
        pdb_list_add_before(&w.node, &pos.node)
    pdb_or_sz(&m.owner, PDB_MUTEX_WAITERS)


cdef inline void _waiter_remove(pdb_ww_mutex *m, pdb_ww_waiter *w) noexcept nogil:
    pdb_list_del(&w.node)
    if pdb_list_empty(&m.waiters):
        pdb_and_sz(&m.owner, ~PDB_MUTEX_WAITERS)


cdef inline bint _ww_die(pdb_ww_waiter *waiter, pdb_ww_ctx *ww_ctx) noexcept nogil:
    """__ww_mutex_die(): wait-die wakes a younger waiter holding locks so it
    can back off.  True for wait-die classes (decision made)."""
    if not ww_ctx.is_wait_die:
        return False
    if pdb_load_uint(&waiter.ctx.acquired) > 0 and _ctx_less(waiter.ctx, ww_ctx):
        pdb_wake_c(waiter.task)
    return True


cdef inline bint _ww_wound(pdb_ww_mutex *m, pdb_ww_ctx *ww_ctx, pdb_ww_ctx *hold_ctx,
                           pdb_task *cur) noexcept nogil:
    """__ww_mutex_wound(): wound-wait wounds a younger holder when the
    requester holds locks."""
    cdef pdb_task *owner = _owner(pdb_load_sz(&m.owner))
    if hold_ctx == NULL or owner == NULL:
        return False
    if pdb_load_uint(&ww_ctx.acquired) > 0 and _ctx_less(hold_ctx, ww_ctx):
        pdb_store_int(&hold_ctx.wounded, 1)
        if owner != cur:
            pdb_wake_c(owner)
        return True
    return False


cdef inline void _ww_check_waiters(pdb_ww_mutex *m, pdb_ww_ctx *ww_ctx,
                                   pdb_task *cur) noexcept nogil:
    """__ww_mutex_check_waiters(): we just took ``m`` with ``ww_ctx``; the
    first context waiter may have to die, or may wound us.  wait_lock held."""
    cdef pdb_ww_waiter *w = pdb_ww_waiter_of(pdb_list_first(&m.waiters))
    while w != NULL:
        if w.ctx != NULL:
            if _ww_die(w, ww_ctx) or _ww_wound(m, w.ctx, ww_ctx, cur):
                break
        w = pdb_ww_waiter_of(pdb_list_next(&m.waiters, &w.node))


cdef inline int _ww_kill(pdb_ww_mutex *m, pdb_ww_ctx *ctx) noexcept nogil:
    """__ww_mutex_kill(): -EDEADLK when the context holds locks."""
    if ctx.acquired > 0:
        ctx.contending = m
        return -EDEADLK
    return 0


cdef inline int _ww_check_kill(pdb_ww_mutex *m, pdb_ww_waiter *waiter,
                               pdb_ww_ctx *ctx) noexcept nogil:
    """__ww_mutex_check_kill(): must this waiter back off now?"""
    cdef pdb_ww_ctx *hold_ctx = pdb_load_ctx(&m.ctx)
    cdef pdb_ww_waiter *cur
    if ctx.acquired == 0:
        return 0
    if not ctx.is_wait_die:
        if pdb_load_int(&ctx.wounded):
            return _ww_kill(m, ctx)
        return 0
    if hold_ctx != NULL and _ctx_less(ctx, hold_ctx):
        return _ww_kill(m, ctx)
    cur = pdb_ww_waiter_of(pdb_list_prev(&m.waiters, &waiter.node))
    while cur != NULL:
        if cur.ctx != NULL:
            return _ww_kill(m, ctx)
        cur = pdb_ww_waiter_of(pdb_list_prev(&m.waiters, &cur.node))
    return 0


cdef inline int _ww_add_waiter(pdb_ww_waiter *waiter, pdb_ww_mutex *m,
                               pdb_ww_ctx *ww_ctx, pdb_task *cur) noexcept nogil:
    """__ww_mutex_add_waiter(): queue in stamp order (context-less waiters
    keep FIFO places); wait-die may die at once, wound-wait wounds a
    younger holder."""
    cdef pdb_ww_waiter *w
    cdef pdb_ww_waiter *pos = NULL
    cdef int ret
    if ww_ctx == NULL:
        _waiter_add(m, waiter, NULL)
        return 0
    w = pdb_ww_waiter_of(pdb_list_last(&m.waiters))
    while w != NULL:
        if w.ctx != NULL:
            if _ctx_less(ww_ctx, w.ctx):
                if ww_ctx.is_wait_die:
                    ret = _ww_kill(m, ww_ctx)
                    if ret:
                        return ret
                break
            pos = w
            _ww_die(w, ww_ctx)
        w = pdb_ww_waiter_of(pdb_list_prev(&m.waiters, &w.node))
    _waiter_add(m, waiter, pos)
    if not ww_ctx.is_wait_die:
        _ww_wound(m, ww_ctx, pdb_load_ctx(&m.ctx), cur)
    return 0


cdef inline void _held_add(pdb_ww_ctx *ctx, pdb_ww_mutex *m) noexcept nogil:
    """Newest first: AcquireContext.held() lists them in that order."""
    pdb_list_add(&m.held_node, &ctx.held)


cdef inline void _held_remove(pdb_ww_mutex *m) noexcept nogil:
    pdb_list_del(&m.held_node)


cdef inline void _ww_lock_acquired(pdb_ww_mutex *m, pdb_ww_ctx *ctx) noexcept nogil:
    """ww_mutex_lock_acquired(): associate the mutex with its context."""
    pdb_store_uint(&ctx.acquired, ctx.acquired + 1)
    ctx.contending = NULL
    _held_add(ctx, m)
    pdb_store_ctx(&m.ctx, ctx)


cdef int ww_mutex_init(pdb_ww_mutex *m, pdb_ww_class *cls) noexcept nogil:
    pthread_mutex_init(&m.wait_lock, NULL)
    m.owner = 0
    m.owner_ident = 0
    m.ctx = NULL
    m.cls = cls
    pdb_list_init(&m.waiters)
    pdb_list_init(&m.held_node)
    m.destroyed = 0
    m.is_resv = cls.is_reservation if cls != NULL else 0
    return 0


cdef inline void _lock_wait_lock(pdb_ww_mutex *m) noexcept nogil:
    pthread_mutex_lock(&m.wait_lock)


cdef bint ww_lock_fast(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t) noexcept nogil:
    """The uncontended path of __mutex_lock_common() and
    ww_mutex_set_context_fastpath()."""
    if ctx != NULL and ctx.acquired == 0:
        pdb_store_int(&ctx.wounded, 0)
    if not _mutex_trylock(m, t):
        return False
    _task_account(t, m.cls, ctx != NULL, 1)
    if ctx != NULL:
        _ww_lock_acquired(m, ctx)
        # Waiters may have queued while we took it: they may have to die,
        # or wound us (the store of m.ctx above pairs with their setting
        # of the WAITERS flag before reading m.ctx).
        if pdb_load_sz(&m.owner) & PDB_MUTEX_WAITERS:
            _lock_wait_lock(m)
            _ww_check_waiters(m, ctx, t)
            pthread_mutex_unlock(&m.wait_lock)
    return True


cdef int ww_lock_slow(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t,
                      bint interruptible) noexcept nogil:
    """The waiting part of __mutex_lock_common() for ww mutexes."""
    cdef pdb_ww_waiter waiter
    cdef int ret = 0
    cdef bint was_first
    if ctx != NULL and ctx.acquired == 0:
        pdb_store_int(&ctx.wounded, 0)
    _lock_wait_lock(m)
    if _mutex_trylock(m, t):
        if ctx != NULL:
            _ww_check_waiters(m, ctx, t)
    else:
        waiter.task = t
        waiter.ctx = ctx
        pdb_list_init(&waiter.node)
        ret = _ww_add_waiter(&waiter, m, ctx, t)
        if ret:
            pthread_mutex_unlock(&m.wait_lock)
            return ret
        while True:
            if _mutex_trylock(m, t):
                break
            if interruptible and pdb_load_int(&t.sigpending):
                ret = -EINTR
                break
            if ctx != NULL:
                ret = _ww_check_kill(m, &waiter, ctx)
                if ret:
                    break
            pthread_mutex_unlock(&m.wait_lock)
            pdb_park_c(t, -1)
            _lock_wait_lock(m)
        if ret:
            _waiter_remove(m, &waiter)
            pthread_mutex_unlock(&m.wait_lock)
            return ret
        was_first = pdb_list_first(&m.waiters) == &waiter.node
        if ctx != NULL and not ctx.is_wait_die and not was_first:
            _ww_check_waiters(m, ctx, t)    # we stole it: we may be wounded
        _waiter_remove(m, &waiter)
    _task_account(t, m.cls, ctx != NULL, 1)
    if ctx != NULL:
        _ww_lock_acquired(m, ctx)
    pthread_mutex_unlock(&m.wait_lock)
    return 0


cdef bint ww_trylock(pdb_ww_mutex *m, pdb_ww_ctx *ctx, pdb_task *t) noexcept nogil:
    """ww_mutex_trylock(): never blocks; 0 also when this ctx holds it."""
    return ww_lock_fast(m, ctx, t)


cdef inline void _mutex_release_locked(pdb_ww_mutex *m) noexcept nogil:
    """Release with wait_lock held: clear the owner, wake the first waiter."""
    cdef pdb_ww_waiter *first
    m.owner_ident = 0
    pdb_and_sz(&m.owner, PDB_MUTEX_WAITERS)
    first = pdb_ww_waiter_of(pdb_list_first(&m.waiters))
    if first != NULL:
        pdb_wake_c(first.task)


cdef void ww_unlock(pdb_ww_mutex *m, pdb_task *t) noexcept nogil:
    """ww_mutex_unlock(): detach the context, release, wake a waiter."""
    cdef pdb_ww_ctx *ctx = m.ctx
    cdef size_t expect = <size_t>t
    _task_account(t, m.cls, ctx != NULL, -1)
    if ctx != NULL:
        _lock_wait_lock(m)
        pdb_store_ctx(&m.ctx, NULL)
        if ctx.acquired > 0:
            pdb_store_uint(&ctx.acquired, ctx.acquired - 1)
        _held_remove(m)
        _mutex_release_locked(m)
        pthread_mutex_unlock(&m.wait_lock)
        return
    m.owner_ident = 0
    if pdb_cas_sz(&m.owner, &expect, 0):
        return
    m.owner_ident = t.ident
    _lock_wait_lock(m)
    _mutex_release_locked(m)
    pthread_mutex_unlock(&m.wait_lock)


# --------------------------------------------------------- Python classes

cdef enum:
    _LOCK = 0
    _LOCK_INTR = 1
    _SLOW = 2
    _SLOW_INTR = 3
    _TRY = 4


cdef class WwClass:
    """A class of wound/wait mutexes (``struct ww_class``).

    Mutexes of one class may be locked in any order by acquire contexts of
    that class; the class chooses how contention between two contexts is
    resolved:

    * **wait-die** (``wait_die=True``, the kernel's ``DEFINE_WD_CLASS``):
      a younger context that meets an older holder dies (its ``lock``
      raises :class:`~pydmabuf.errors.WouldDeadlock`); an older one waits.
    * **wound-wait** (``wait_die=False``, ``DEFINE_WW_CLASS``): an older
      context wounds a younger holder, which backs off at its next
      contended lock; a younger one waits.

    Either way a context that holds no locks simply waits, and the oldest
    context never backs off.  Reservation objects use the wait-die class
    :data:`~pydmabuf.reservation_ww_class`.

    Parameters
    ----------
    name : str
        For messages (the kernel names lockdep classes after it).
    wait_die : bool, default False
        The algorithm, as above.
    """

    def __init__(self, str name not None, *, bint wait_die=False):
        if self.name is not None:
            # It would reset the stamps of a class in use (and could turn
            # reservation_ww_class into an ordinary class for everyone).
            raise _errors.LockingError(f"{self!r} is already initialised")
        self.name = name
        self.c.is_wait_die = wait_die
        self.c.stamp = 0
        self.c.is_reservation = 0

    @property
    def is_wait_die(self):
        """True for wait-die, False for wound-wait."""
        return bool(self.c.is_wait_die)

    @property
    def stamp(self):
        """The last stamp handed to an acquire context (0: none yet)."""
        return self.c.stamp

    @property
    def acquire_name(self):
        """The lockdep name of its acquire contexts, ``<name>_acquire``."""
        return self.name + "_acquire"

    @property
    def mutex_name(self):
        """The lockdep name of its mutexes, ``<name>_mutex``."""
        return self.name + "_mutex"

    def _set_stamp(self, stamp):
        """Test hook: make the next context's stamp ``stamp + 1`` (mod 2**64),
        to exercise the wrap-safe age comparison."""
        self.c.stamp = <unsigned long>(stamp & 0xFFFFFFFFFFFFFFFF)

    def __repr__(self):
        return (f"WwClass({self.name!r}, "
                f"{'wait-die' if self.c.is_wait_die else 'wound-wait'}, stamp={self.c.stamp})")


reservation_ww_class = WwClass("reservation_ww_class", wait_die=True)
(<WwClass>reservation_ww_class).c.is_reservation = 1


cdef inline str _ident_str(unsigned long ident):
    return f"{ident:#x}"


cdef int _ww_check(WwMutex self, AcquireContext ctx, pdb_task *t, int mode) except -1:
    """The debug checks of DEBUG_WW_MUTEXES and lockdep, before any state
    changes (the kernel warns after the fact; the model refuses)."""
    cdef pdb_ww_mutex *m = &self.m
    cdef pdb_ww_ctx *c
    cdef bint blocking = mode != _TRY
    if m.cls == NULL:
        raise _errors.LockingError(f"{self!r} was never initialised (call WwMutex.__init__)")
    if m.destroyed:
        raise _errors.LockingError(f"{self!r} was destroyed; it may not be used again")
    if ctx is not None:
        c = &ctx.c
        if c.task == NULL:
            raise _errors.LockingError(f"{ctx!r} was never initialised")
        if c.task != t:
            raise _errors.LockingError(
                f"{ctx!r} belongs to thread {_ident_str(c.task.ident)}, not to this thread "
                f"({_ident_str(t.ident)}): an acquire context is used by the task that made it")
        if c.finished:
            raise _errors.LockingError(f"{ctx!r} is finished (fini() was called); make a new one")
        if (mode == _SLOW or mode == _SLOW_INTR) and c.contending == NULL:
            raise _errors.LockingError(
                f"lock_slow() of {self!r} without a preceding EDEADLK on {ctx!r}: "
                f"lock_slow is only for the contended lock after a back-off")
        if blocking and pdb_load_ctx(&m.ctx) == c:
            raise _errors.AlreadyLockedError(f"{self!r} is already held by {ctx!r}")
        if c.done_acquire:
            raise _errors.LockingError(
                f"locking {self!r} with {ctx!r} after done(): the acquire phase is over")
        if c.cls != m.cls:
            raise _errors.LockingError(
                f"mixing classes: {self!r} is of class {self.ww_class.name!r} but {ctx!r} "
                f"is of class {ctx.ww_class.name!r}")
        if c.contending != NULL:
            if c.contending != m:
                raise _errors.LockingError(
                    f"after EDEADLK on {ctx._contending!r}, {ctx!r} must lock that one "
                    f"(lock_slow) before any other; tried {self!r}")
            if c.acquired > 0:
                raise _errors.LockingError(
                    f"after EDEADLK, {ctx!r} must unlock everything it holds before taking "
                    f"{self!r} again; it still holds {c.acquired} lock(s): {ctx.held()!r}")
        if c.acquired == 0 and t.held_total and _task_held(t, m.cls, True) > 0:
            raise _errors.LockingError(
                f"this thread already holds {self.ww_class.name!r} locks through another acquire "
                f"context; two contexts of one class in one thread can deadlock undetected")
    elif blocking:
        if _owner(pdb_load_sz(&m.owner)) == t:
            raise _errors.LockingError(
                f"recursive locking: this thread already holds {self!r}; locking it again "
                f"without a context would deadlock")
        if t.held_total and _task_held(t, m.cls, False) + _task_held(t, m.cls, True) > 0:
            raise _errors.LockingError(
                f"locking {self!r} without an acquire context while this thread holds other "
                f"{self.ww_class.name!r} locks: nothing would detect the deadlock; use one "
                f"AcquireContext for all of them (trylock is allowed)")
    if blocking:
        if m.is_resv and t.sig_depth:
            _sig_violation(t, f"taking the reservation lock of {self!r}")
        if ctx is not None and _owner(pdb_load_sz(&m.owner)) == t:
            raise _errors.LockingError(
                f"this thread already holds {self!r} (without {ctx!r}); waiting for it would "
                f"deadlock")
    return 0


cdef inline void _ww_took(WwMutex self, AcquireContext ctx):
    """Python-side ownership after a successful lock: a held mutex keeps
    itself and its context alive."""
    Py_INCREF(self)
    if ctx is not None:
        Py_INCREF(ctx)
        self.ctx_ref = <void *>ctx


cdef int _ww_release(WwMutex self, pdb_task *t) except -1:
    """ww_unlock() plus the references _ww_took() made."""
    cdef void *ref = self.ctx_ref
    self.ctx_ref = NULL
    ww_unlock(&self.m, t)
    if _ld_release is not None:
        _ld_dropped(self)
    if ref != NULL:
        Py_DECREF(<object>ref)
    Py_DECREF(self)
    return 0


cdef int _ww_lock_plain(WwMutex self) except -1:
    return _ww_lock(self, None, _LOCK)


cdef bint _ww_held(WwMutex self) noexcept:
    cdef pdb_task *t = pdb_task_peek_c()
    return t != NULL and _owner(pdb_load_sz(&self.m.owner)) == t


cdef int _ww_lock(WwMutex self, AcquireContext ctx, int mode) except -1:
    """Lock ``self`` (modes _LOCK/_LOCK_INTR/_SLOW/_SLOW_INTR); raises."""
    cdef pdb_task *t = _cur_task()
    cdef pdb_ww_ctx *c = NULL
    cdef int rc
    cdef bint intr = mode == _LOCK_INTR or mode == _SLOW_INTR
    cdef unsigned int tmp
    _ww_check(self, ctx, t, mode)
    if ctx is not None:
        c = &ctx.c
    if not ww_lock_fast(&self.m, c, t):
        with nogil:
            rc = ww_lock_slow(&self.m, c, t, intr)
        if rc == -EDEADLK:
            ctx._contending = self
            raise _errors.WouldDeadlock(
                f"{self!r}: {ctx!r} must back off: unlock every lock it holds, then "
                f"lock_slow() this one and take the others again")
        if rc == -EINTR:
            _interrupted(t, EINTR, f"interrupted while waiting for {self!r}")
        if rc < 0:
            _check(rc, f"locking {self!r}")
    _ww_took(self, ctx)
    if _ld_acquire is not None:
        try:
            _ld_took(self, ctx is not None, False)
        except BaseException:
            _ww_release(self, t)  # refused: the failed call changes nothing
            raise
    # CONFIG_DEBUG_WW_MUTEX_SLOWPATH: pretend to die now and then.
    if c != NULL and c.inject and c.acquired > 1 and (mode == _LOCK or mode == _LOCK_INTR):
        if c.inject_countdown == 0:
            tmp = c.inject_interval
            c.inject_interval = 0xFFFFFFFF if tmp > 0xFFFFFFFF // 4 else tmp * 2 + tmp + tmp // 2
            c.inject_countdown = c.inject_interval
            _ww_release(self, t)
            c.contending = &self.m
            ctx._contending = self
            raise _errors.WouldDeadlock(
                f"{self!r}: injected back-off (inject_deadlocks) for {ctx!r}")
        c.inject_countdown -= 1
    return 0


cdef int _ww_unlock(WwMutex self) except -1:
    cdef pdb_task *t = pdb_task_peek_c()
    cdef pdb_task *o = _owner(pdb_load_sz(&self.m.owner))
    if o == NULL:
        raise _errors.LockingError(f"unlocking {self!r}, which is not locked")
    if o != t:
        raise _errors.LockingError(
            f"unlocking {self!r}, held by thread {_ident_str(self.m.owner_ident)}, from thread "
            f"{_ident_str(t.ident if t != NULL else PyThread_get_thread_ident())}: only the "
            f"owner may unlock")
    return _ww_release(self, t)


cdef class WwMutex:
    """A wound/wait mutex (``struct ww_mutex``) of a :class:`WwClass`.

    Lock it alone with ``lock()`` (a plain mutex: no deadlock detection) or
    together with others through an :class:`AcquireContext`, in any order:
    ``lock(ctx)`` returns when the mutex is held, or raises

    * :class:`~pydmabuf.errors.WouldDeadlock` (EDEADLK): back off — unlock
      everything the context holds, ``lock_slow(ctx)`` this mutex, retake
      the others (:meth:`AcquireContext.lock_all` does all of it);
    * :class:`~pydmabuf.errors.AlreadyLockedError` (EALREADY): the context
      already holds it.

    Waiting blocks the calling thread with the GIL released.  The kernel's
    debug checks are always on and raise
    :class:`~pydmabuf.errors.LockingError`: locking after ``done()``,
    mixing classes, unlocking a mutex the thread does not hold, destroying
    a held mutex, any lock after EDEADLK other than the contended one once
    everything else is unlocked, using a context from another thread, and
    the lockdep rules (no context-less blocking lock of a class while the
    thread holds another lock of it; two contexts of one class holding
    locks in one thread; no reservation lock inside a fence-signalling
    section).  Used as a context manager it locks without a context.

    A held mutex keeps itself (and the context holding it) alive, as
    kernel memory holding a locked mutex must not be freed.
    """

    def __cinit__(self):
        ww_mutex_init(&self.m, NULL)
        self.m.pyobj = <void *>self
        self.ctx_ref = NULL

    def __init__(self, WwClass ww_class not None):
        if self.ww_class is not None:
            raise _errors.LockingError(f"{self!r} is already initialised")
        self.ww_class = ww_class
        self.m.cls = &ww_class.c
        self.m.is_resv = ww_class.c.is_reservation

    def __dealloc__(self):
        pthread_mutex_destroy(&self.m.wait_lock)

    def lock(self, AcquireContext ctx=None):
        """Lock it (``ww_mutex_lock``), through ``ctx`` or alone.

        Raises
        ------
        WouldDeadlock
            EDEADLK: ``ctx`` must back off (only when it holds other locks).
        AlreadyLockedError
            EALREADY: ``ctx`` already holds this mutex.
        LockingError
            A broken locking rule (see the class docstring).
        """
        _ww_lock(self, ctx, _LOCK)

    def lock_interruptible(self, AcquireContext ctx=None):
        """As :meth:`lock`, but a signal (:func:`signal_thread`) arriving
        while it waits raises :class:`~pydmabuf.errors.Interrupted` (EINTR).
        An uncontended lock succeeds even with a signal pending."""
        _ww_lock(self, ctx, _LOCK_INTR)

    def lock_slow(self, AcquireContext ctx not None):
        """After EDEADLK and unlocking everything, wait for this, the
        contended mutex (``ww_mutex_lock_slow``).  It cannot die.

        Raises
        ------
        LockingError
            No EDEADLK preceded it, it is not the contended mutex, or the
            context still holds locks.
        """
        _ww_lock(self, ctx, _SLOW)

    def lock_slow_interruptible(self, AcquireContext ctx not None):
        """:meth:`lock_slow` that a signal interrupts (EINTR)."""
        _ww_lock(self, ctx, _SLOW_INTR)

    def trylock(self, AcquireContext ctx=None):
        """Take it if free (``ww_mutex_trylock``); never blocks, never dies.

        Returns False when it is held, including by ``ctx`` itself (no
        EALREADY from a trylock).
        """
        cdef pdb_task *t = _cur_task()
        _ww_check(self, ctx, t, _TRY)
        if ww_trylock(&self.m, &ctx.c if ctx is not None else NULL, t):
            _ww_took(self, ctx)
            if _ld_acquire is not None:
                try:
                    _ld_took(self, ctx is not None, True)
                except BaseException:
                    _ww_release(self, t)
                    raise
            return True
        return False

    cdef int _unlock(self) except -1:
        return _ww_unlock(self)

    def unlock(self):
        """Release it (``ww_mutex_unlock``); only the holding thread may."""
        self._unlock()

    def destroy(self):
        """Mark it unusable (``ww_mutex_destroy``); it must be unlocked."""
        if _owner(pdb_load_sz(&self.m.owner)) != NULL:
            raise _errors.LockingError(f"destroying {self!r}, which is locked")
        self.m.destroyed = 1

    def is_locked(self):
        """True while anyone holds it (``ww_mutex_is_locked``)."""
        return _owner(pdb_load_sz(&self.m.owner)) != NULL

    def locking_ctx(self):
        """The :class:`AcquireContext` holding it, or None (free, or held
        without a context)."""
        cdef pdb_ww_ctx *c
        cdef object obj = None
        if pthread_mutex_trylock(&self.m.wait_lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.m.wait_lock)
        c = pdb_load_ctx(&self.m.ctx)
        if c != NULL:
            obj = <object>c.pyobj
        pthread_mutex_unlock(&self.m.wait_lock)
        return obj

    def held_by_current_thread(self):
        """True when the calling thread holds it (``dma_resv_held``)."""
        return _ww_held(self)

    def assert_held(self):
        """Raise :class:`~pydmabuf.errors.LockingError` unless the calling
        thread holds it (``lockdep_assert_held``)."""
        cdef pdb_task *t = pdb_task_peek_c()
        if t == NULL or _owner(pdb_load_sz(&self.m.owner)) != t:
            raise _errors.LockingError(f"{self!r} must be held by this thread here")

    @property
    def owner_thread(self):
        """``threading.get_ident()`` of the holder, or None when free."""
        if _owner(pdb_load_sz(&self.m.owner)) == NULL:
            return None
        return self.m.owner_ident

    def __enter__(self):
        _ww_lock(self, None, _LOCK)
        return self

    def __exit__(self, *exc):
        self._unlock()
        return False

    def _state(self):
        cdef size_t o = pdb_load_sz(&self.m.owner)
        if _owner(o) == NULL:
            return "unlocked"
        s = f"locked by thread {_ident_str(self.m.owner_ident)}"
        if pdb_load_ctx(&self.m.ctx) != NULL:
            s += f" ctx stamp {pdb_load_ctx(&self.m.ctx).stamp}"
        if o & PDB_MUTEX_WAITERS:
            s += ", waiters"
        return s

    def __repr__(self):
        cls = self.ww_class.name if self.ww_class is not None else "?"
        return f"<WwMutex {cls} at {id(self):#x} {self._state()}>"


cdef int _ctx_mine(AcquireContext ctx) except -1:
    """The context must be initialised and belong to this thread."""
    cdef pdb_task *t = pdb_task_peek_c()
    if ctx.c.task == NULL:
        raise _errors.LockingError(f"{ctx!r} was never initialised")
    if ctx.c.task != t:
        raise _errors.LockingError(
            f"{ctx!r} belongs to thread {_ident_str(ctx.c.task.ident)}, not to this thread "
            f"({_ident_str(PyThread_get_thread_ident())})")
    return 0


cdef class AcquireContext:
    """One locking transaction over mutexes of a class (``ww_acquire_ctx``).

    Its stamp, taken from the class at creation, orders transactions:
    smaller is older, and older wins.  Keep the same context across
    back-offs so it ages.  A context belongs to the thread that made it
    (using it from another thread is a
    :class:`~pydmabuf.errors.LockingError`), must end with :meth:`fini`
    after all its mutexes are unlocked, and may mark the end of its
    acquire phase with :meth:`done`.  As a context manager it finishes
    itself; leaving with an exception unlocks what it still holds first.

    Parameters
    ----------
    ww_class : WwClass
    inject_deadlocks : bool, default False
        ``CONFIG_DEBUG_WW_MUTEX_SLOWPATH``: now and then a successful lock
        (with other locks held) is undone and reported as EDEADLK, so
        back-off paths get exercised.  The interval grows 1, 3, 10, 35 ...
        from an initial countdown of ``stamp & 15``.
    """

    def __cinit__(self):
        self.c.task = NULL
        self.c.finished = 1
        pdb_list_init(&self.c.held)
        self.c.contending = NULL
        self.c.pyobj = <void *>self

    def __init__(self, WwClass ww_class not None, *, bint inject_deadlocks=False):
        cdef pdb_task *t
        if self.ww_class is not None:
            raise _errors.LockingError(f"{self!r} is already initialised (ww_acquire_init twice)")
        t = _cur_task()
        pdb_task_get_c(t)
        self.ww_class = ww_class
        self.c.task = t
        self.c.cls = &ww_class.c
        self.c.stamp = pdb_inc_ulong(&ww_class.c.stamp)
        self.c.acquired = 0
        self.c.wounded = 0
        self.c.is_wait_die = ww_class.c.is_wait_die
        self.c.done_acquire = 0
        self.c.finished = 0
        self.c.inject = inject_deadlocks
        self.c.inject_interval = 1
        self.c.inject_countdown = <unsigned int>(self.c.stamp & 0xf)

    def __dealloc__(self):
        if self.c.task != NULL:
            pdb_task_put_c(self.c.task)
            self.c.task = NULL

    def __del__(self):
        if self.ww_class is not None and not self.c.finished:
            _warnings.warn(f"{self!r} collected without fini()", ResourceWarning, stacklevel=1)

    @property
    def stamp(self):
        """The age of the transaction (smaller is older)."""
        return self.c.stamp

    @property
    def acquired(self):
        """How many mutexes it holds now."""
        return self.c.acquired

    @property
    def wounded(self):
        """Wound-wait: an older context wounded it; it backs off at its next
        contended lock (reset when it holds nothing)."""
        return bool(pdb_load_int(&self.c.wounded))

    @property
    def is_wait_die(self):
        """True when its class is wait-die, False for wound-wait."""
        return bool(self.c.is_wait_die)

    @property
    def is_done(self):
        """True after :meth:`done` or :meth:`fini`."""
        return bool(self.c.done_acquire)

    @property
    def is_finished(self):
        """True after :meth:`fini`."""
        return bool(self.c.finished)

    @property
    def thread(self):
        """``threading.get_ident()`` of the thread it belongs to."""
        return self.c.task.ident if self.c.task != NULL else None

    @property
    def contending(self):
        """The mutex of the last EDEADLK, until it is locked again; else None."""
        return self._contending if self.c.contending != NULL else None

    def held(self):
        """The mutexes it holds, most recently locked first."""
        cdef pdb_ww_mutex *m = pdb_ww_mutex_of_held(pdb_list_first(&self.c.held))
        out = []
        while m != NULL:
            out.append(<object>m.pyobj)
            m = pdb_ww_mutex_of_held(pdb_list_next(&self.c.held, &m.held_node))
        return out

    def done(self):
        """End the acquire phase (``ww_acquire_done``): later locks through
        this context are a LockingError."""
        _ctx_mine(self)
        if self.c.finished:
            raise _errors.LockingError(f"{self!r} is finished")
        if self.c.done_acquire:
            raise _errors.LockingError(f"done() called twice on {self!r}")
        self.c.done_acquire = 1

    def fini(self):
        """Finish it (``ww_acquire_fini``); everything must be unlocked.

        Raises
        ------
        LockingError
            Mutexes are still held, or it was finished already.
        """
        _ctx_mine(self)
        if self.c.finished:
            raise _errors.LockingError(f"fini() called twice on {self!r}")
        if self.c.acquired:
            raise _errors.LockingError(
                f"fini() of {self!r} while it holds {self.c.acquired} lock(s): {self.held()!r}")
        self.c.finished = 1
        self.c.done_acquire = 1

    def unlock_all(self):
        """Unlock every mutex it holds (the first step of a back-off)."""
        cdef WwMutex m
        _ctx_mine(self)
        for m in self.held():
            m._unlock()

    def lock_all(self, objs, *, bint interruptible=False):
        """Lock every mutex in ``objs`` with the full back-off protocol.

        On EDEADLK it unlocks everything the context holds, waits for the
        contended mutex with ``lock_slow`` and starts over, keeping its
        stamp, so the caller never sees EDEADLK.  Duplicates in ``objs``
        and mutexes the context already held are fine (EALREADY is
        skipped); those it held before are retaken after a back-off too.

        Parameters
        ----------
        objs : iterable of WwMutex (or Resv)
        interruptible : bool
            Wait with ``lock_interruptible`` / ``lock_slow_interruptible``.

        Returns
        -------
        int
            How many times it backed off.

        Raises
        ------
        Interrupted
            A signal arrived while waiting; the context then holds nothing.
        LockingError
            A broken rule; the context then holds nothing.
        """
        cdef list wanted = self.held()
        cdef WwMutex m
        cdef WwMutex contended = None
        cdef int backoffs = 0
        _ctx_mine(self)
        for obj in objs:
            if not isinstance(obj, WwMutex):
                raise TypeError(f"lock_all() takes WwMutex or Resv objects, not {type(obj).__name__}")
            wanted.append(obj)
        while True:
            try:
                for m in wanted:
                    if pdb_load_ctx(&m.m.ctx) == &self.c:
                        continue
                    _ww_lock(m, self, _LOCK_INTR if interruptible else _LOCK)
                return backoffs
            except _errors.WouldDeadlock:
                backoffs += 1
                contended = self._contending
                self.unlock_all()
                try:
                    _ww_lock(contended, self, _SLOW_INTR if interruptible else _SLOW)
                except BaseException:
                    self.unlock_all()
                    raise
            except BaseException:
                self.unlock_all()
                raise

    def __enter__(self):
        _ctx_mine(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        _ctx_mine(self)
        if self.c.finished:
            return False
        if exc_type is not None:
            self.unlock_all()
            self.fini()
            return False
        if self.c.acquired:
            left = self.held()
            self.unlock_all()
            self.fini()
            raise _errors.LockingError(
                f"{self!r} left its with-block still holding {left!r}; they were unlocked, but "
                f"every lock must be unlocked before the context is finished")
        self.fini()
        return False

    def __repr__(self):
        name = self.ww_class.name if self.ww_class is not None else "?"
        state = "finished" if self.c.finished else (
            f"{self.c.acquired} held" + (", done" if self.c.done_acquire else ""))
        if pdb_load_int(&self.c.wounded):
            state += ", wounded"
        return f"<AcquireContext {name} stamp={self.c.stamp} {state}>"


