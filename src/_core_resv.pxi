# Reservation objects: struct dma_resv (drivers/dma-buf/dma-resv.c).
#
# A Resv is a WwMutex of reservation_ww_class plus a list of (fence,
# usage) slots.  The ww mutex is the API's lock (writers must hold it);
# the list itself is also guarded by the object's own lock so unlocked
# readers (the kernel's RCU readers) always see a consistent slot.  A new
# list is "published" (gen bumped) whenever reserve_fences reallocates or
# copy_fences replaces it; unlocked walks restart when that happens, as
# the kernel's do when the list pointer changes.

from pydmabuf._types import Usage as _Usage

cdef tuple _USAGES = (_Usage.KERNEL, _Usage.WRITE, _Usage.READ, _Usage.BOOKKEEP)
cdef tuple _USAGE_NAMES = ("kernel", "write", "read", "bookkeep")


cdef unsigned int _usage(object usage) except 0xFFFFFFFF:
    if not isinstance(usage, int):
        raise TypeError(f"usage must be a pydmabuf.Usage, not {type(usage).__name__}")
    if usage < 0 or usage > 3:
        raise _errors.InvalidArgument(f"usage must be KERNEL, WRITE, READ or BOOKKEEP (0..3), not {usage}")
    return <unsigned int>usage


def usage_rw(bint write):
    """``dma_resv_usage_rw``: the usage a new access must wait for.

    A new write waits for every reader and writer (``Usage.READ``); a new
    read waits for the writers (``Usage.WRITE``).
    """
    return _Usage.READ if write else _Usage.WRITE


cdef uint64_t _kmalloc_size_roundup(uint64_t size) noexcept nogil:
    """kmalloc_size_roundup() with 4 KiB pages and SLUB: the small buckets
    8..192 (with 96 and 192), powers of two up to 8 KiB, then whole
    power-of-two page orders."""
    cdef uint64_t c
    if size <= 8:
        return 8
    if size <= 16:
        return 16
    if size <= 32:
        return 32
    if size <= 64:
        return 64
    if size <= 96:
        return 96
    if size <= 128:
        return 128
    if size <= 192:
        return 192
    c = 256
    while c < size:
        c <<= 1
    return c


cdef uint64_t _resv_list_max(uint64_t max_fences) noexcept nogil:
    """dma_resv_list_alloc(): the slot count the allocator's bucket for
    ``max_fences`` slots really holds (24-byte header, 8-byte slots)."""
    return (_kmalloc_size_roundup(24 + 8 * max_fences) - 24) // 8


cdef int _resv_held(Resv resv, str what) except -1:
    cdef pdb_task *t = pdb_task_peek()
    if t == NULL or _owner(pdb_load_sz(&resv.m.owner)) != t:
        raise _errors.LockingError(f"{what} needs {resv!r} locked by this thread")
    return 0


cdef int _resv_publish(Resv resv, resv_entry *table, unsigned int num,
                       unsigned int max) except -1:
    """Publish a new list (a new generation); the caller has released the
    old entries it does not carry over."""
    cdef resv_entry *old
    _acquire(resv.lock)
    old = resv.table
    resv.table = table
    resv.num = num
    resv.max = max
    resv.gen += 1
    _release(resv.lock)
    free(old)
    return 0


cdef list _resv_snapshot(Resv resv, unsigned int usage, bint first_only):
    """The unsignalled fences of usage <= ``usage``: the slots are copied
    under the list lock in one go, then filtered (is_signaled may run
    Python ops) and the whole walk starts over if a new list was published
    meanwhile, as the kernel's unlocked walk does."""
    cdef list out, cand
    cdef unsigned int i
    cdef uint64_t gen
    cdef Fence f
    while True:
        cand = []
        _acquire(resv.lock)
        gen = resv.gen
        for i in range(resv.num):
            if resv.table[i].usage <= usage:
                cand.append(<object>resv.table[i].fence)
        _release(resv.lock)
        out = []
        for f in cand:
            if not f._is_signaled():
                out.append(f)
                if first_only:
                    break
        _acquire(resv.lock)
        if resv.gen == gen:
            _release(resv.lock)
            return out
        _release(resv.lock)


cdef class Resv(WwMutex):
    """A reservation object (``struct dma_resv``): the lock and the fences
    of one shared buffer.

    Lock it like any :class:`WwMutex` of :data:`reservation_ww_class`
    (wait-die): ``lock(ctx=None)``, ``lock_interruptible``, ``lock_slow``,
    ``trylock``, ``unlock``; ``assert_held()`` / ``held_by_current_thread()``
    check the calling thread holds it.  With the lock held, reserve slots
    (:meth:`reserve_fences`) and then add fences (:meth:`add_fence`) with a
    :class:`~pydmabuf.Usage`; reservations are dropped at unlock, as in a
    kernel with ``CONFIG_DEBUG_MUTEXES``.  Queries (:meth:`get_fences`,
    :meth:`wait`, :meth:`test_signaled` ...) need no lock.

    A query for usage U sees every fence of usage <= U:
    ``KERNEL < WRITE < READ < BOOKKEEP``.

    Parameters
    ----------
    ww_class : WwClass, optional
        The kernel always uses :data:`reservation_ww_class`; another class
        (e.g. a wound-wait one) is a model extension for experiments.
    """

    def __cinit__(self):
        self.table = NULL
        self.num = 0
        self.max = 0
        self.gen = 0
        self.lock = _new_lock()

    def __init__(self, *, WwClass ww_class=None):
        WwMutex.__init__(self, ww_class if ww_class is not None else reservation_ww_class)
        self.m.is_resv = 1

    def __dealloc__(self):
        cdef unsigned int i
        if self.table != NULL:
            for i in range(self.num):
                Py_DECREF(<object>self.table[i].fence)
            free(self.table)
            self.table = NULL
        if self.lock != NULL:
            PyThread_free_lock(self.lock)
            self.lock = NULL

    cdef int _unlock(self) except -1:
        # dma_resv_unlock(): dma_resv_reset_max_fences() first, so slots
        # must be reserved again after every unlock.
        cdef pdb_task *t = pdb_task_peek()
        if self.max != self.num and t != NULL and _owner(pdb_load_sz(&self.m.owner)) == t:
            _acquire(self.lock)
            self.max = self.num
            _release(self.lock)
        return _ww_unlock(self)

    @property
    def num_fences(self):
        """Slots in use (signalled fences included until recycled)."""
        return self.num

    @property
    def max_fences(self):
        """Slots allocated; ``max_fences - num_fences`` are reserved."""
        return self.max

    def reserve_fences(self, n):
        """Make room for ``n`` more fences (``dma_resv_reserve_fences``).

        Needs the lock.  Nothing happens if the room is there; otherwise a
        new list of ``max(num + n, 2 * max)`` slots (first time
        ``max(4, next power of two of n)``), rounded up to the allocator's
        bucket, replaces the old one, keeping only unsignalled fences.
        Must be repeated after every unlock.

        Raises
        ------
        InvalidArgument
            ``n`` is 0 (the kernel warns: a miscounted caller).
        LockingError
            The lock is not held by this thread.
        OutOfMemory
        """
        cdef uint64_t k = _u64(n, "n")
        cdef uint64_t want
        cdef unsigned int i, j
        cdef resv_entry *table
        cdef list dropped = []
        cdef list snap
        cdef set signalled
        cdef Fence f
        _resv_held(self, "reserve_fences()")
        if k == 0:
            raise _errors.InvalidArgument("reserve_fences(0): reserve at least one slot")
        if k > 0xFFFFFFF:   # before num + k, which could wrap
            raise _errors.OutOfMemory(f"reserve_fences({k}): more slots than the model allocates")
        if self.max and self.num + k <= self.max:
            return
        # Ask every fence whether it has signalled first, as the kernel's
        # copy loop does (dma_fence_is_signaled() per slot, in order), but
        # of a snapshot holding references: is_signaled() may run Python
        # ops and signal callbacks, and those may re-enter this object (its
        # lock is this thread's) and add, replace or reallocate the list.
        # No slot is read across an op: the new list is built below from
        # the list as it is then, with no Python run until it is published.
        snap = [<object>self.table[i].fence for i in range(self.num)]
        signalled = set()
        for f in snap:
            if f._is_signaled():
                signalled.add(id(f))      # snap keeps f alive: its id is unique
        _resv_held(self, "reserve_fences() (a fence op dropped the lock)")
        if self.max and self.num + k <= self.max:
            return      # an op made the room meanwhile
        if self.max:
            want = max(self.num + k, 2 * <uint64_t>self.max)
        else:
            want = max(<uint64_t>4, _roundup_pow2(k))
        if want > 0xFFFFFFF:
            raise _errors.OutOfMemory(f"reserve_fences({k}): {want} slots is more than the model allocates")
        want = _resv_list_max(want)
        table = <resv_entry *>malloc(want * sizeof(resv_entry))
        if table == NULL:
            raise _errors.OutOfMemory(f"reserve_fences({k}): cannot allocate {want} slots")
        j = 0
        for i in range(self.num):
            if id(<object>self.table[i].fence) not in signalled:
                table[j] = self.table[i]
                j += 1
            else:
                # dropped keeps the reference until after the publish: no
                # fence is freed (no release op runs) mid-copy.
                dropped.append(<object>self.table[i].fence)
                Py_DECREF(<object>self.table[i].fence)
        _resv_publish(self, table, j, <unsigned int>want)

    def add_fence(self, Fence fence not None, usage):
        """Add ``fence`` with ``usage`` (``dma_resv_add_fence``).

        Needs the lock.  The first slot holding an older-or-same fence of
        the same context with an equal or less important usage (numerically
        >=), or holding any signalled fence, is overwritten; otherwise the
        fence takes a reserved slot.  So a fence may be promoted (re-added
        with a smaller usage) but never degraded: a less important usage
        adds a second slot.

        Raises
        ------
        LockingError
            The lock is not held, or a slot is needed and none is reserved
            (the kernel BUGs).
        InvalidArgument
            ``fence`` is an array or chain (add its members; the kernel
            warns), or ``usage`` is not a Usage.
        """
        cdef unsigned int u = _usage(usage)
        cdef unsigned int i = 0
        cdef Fence old
        _resv_held(self, "add_fence()")
        if isinstance(fence, (FenceArray, FenceChain)):
            raise _errors.InvalidArgument(
                f"add_fence({fence!r}): add the members of a container one by one")
        while i < self.num:
            old = <Fence>self.table[i].fence
            if ((old.f.context == fence.f.context and self.table[i].usage >= u
                    and (old is fence or fence_is_later(&fence.f, &old.f)))
                    or old._is_signaled()):
                _resv_held(self, "add_fence() (a fence op dropped the lock)")
                if i >= self.num or self.table[i].fence != <void *>old:
                    i = 0           # an op changed the list under us: rescan
                    continue
                Py_INCREF(fence)
                _acquire(self.lock)
                self.table[i].fence = <void *>fence
                self.table[i].usage = u
                _release(self.lock)
                Py_DECREF(old)
                return
            i += 1
        _resv_held(self, "add_fence() (a fence op dropped the lock)")
        if self.num >= self.max:
            raise _errors.LockingError(
                f"add_fence() on {self!r} without a reserved slot: call reserve_fences(n) after "
                f"taking the lock and before adding (reservations end at unlock)")
        Py_INCREF(fence)
        _acquire(self.lock)
        self.table[self.num].fence = <void *>fence
        self.table[self.num].usage = u
        self.num += 1
        _release(self.lock)

    def replace_fences(self, context, Fence replacement not None, usage):
        """Replace every fence of ``context`` by ``replacement`` with
        ``usage`` (``dma_resv_replace_fences``); needs the lock, no slot.

        Only valid when the replaced operations can no longer touch the
        buffer once ``replacement`` signals (a preemption fence replaced by
        a page-table update).
        """
        cdef uint64_t c = _u64(context, "context")
        cdef unsigned int u = _usage(usage)
        cdef unsigned int i
        cdef list dropped = []
        _resv_held(self, "replace_fences()")
        _acquire(self.lock)
        for i in range(self.num):
            if (<Fence>self.table[i].fence).f.context != c:
                continue
            dropped.append(<object>self.table[i].fence)
            Py_DECREF(<object>self.table[i].fence)
            Py_INCREF(replacement)
            self.table[i].fence = <void *>replacement
            self.table[i].usage = u
        _release(self.lock)

    def copy_fences(self, Resv src not None):
        """Make this object's fences a copy of ``src``'s unsignalled ones,
        with their usages (``dma_resv_copy_fences``); needs this lock.

        The old list is replaced wholesale; an idle ``src`` leaves this
        object with no list at all (no reserved slots).
        """
        cdef ResvIter it
        cdef list got = []
        cdef resv_entry *table = NULL
        cdef unsigned int i, cap = 0, n
        cdef list dropped = []
        _resv_held(self, "copy_fences()")
        it = ResvIter._make(src, 3, False)
        for f, u in it:
            if it.is_restarted:
                got = []
                cap = it.num
            got.append((f, u))
        n = len(got)
        if n:
            cap = <unsigned int>_resv_list_max(cap)
            table = <resv_entry *>malloc(cap * sizeof(resv_entry))
            if table == NULL:
                raise _errors.OutOfMemory("copy_fences(): cannot allocate the list")
            for i in range(n):
                f = got[i][0]
                Py_INCREF(f)
                table[i].fence = <void *>f
                table[i].usage = <unsigned int>got[i][1]
        for i in range(self.num):
            dropped.append(<object>self.table[i].fence)
            Py_DECREF(<object>self.table[i].fence)
        _resv_publish(self, table, n, cap)

    def iter_fences(self, usage=_Usage.BOOKKEEP):
        """Walk the slots with the lock held (``dma_resv_for_each_fence``).

        Yields ``(fence, usage)`` for every slot of usage <= ``usage``, in
        slot order, signalled fences included.  The iterator's
        ``is_restarted`` is True for the first item only.

        Raises
        ------
        LockingError
            (on iteration) the lock is not held by this thread.
        """
        return ResvIter._make(self, _usage(usage), True)

    def iter_fences_unlocked(self, usage=_Usage.BOOKKEEP):
        """Walk without the lock (``dma_resv_for_each_fence_unlocked``).

        Yields ``(fence, usage)`` for unsignalled fences of usage <=
        ``usage``.  If the list is replaced meanwhile (a reallocating
        :meth:`reserve_fences`, :meth:`copy_fences`) the walk starts over
        and ``is_restarted`` is True again: code that accumulates must
        reset then.
        """
        return ResvIter._make(self, _usage(usage), False)

    def get_fences(self, usage=_Usage.BOOKKEEP):
        """The unsignalled fences of usage <= ``usage``, in slot order
        (``dma_resv_get_fences``); no lock needed."""
        return _resv_snapshot(self, _usage(usage), False)

    def get_singleton(self, usage=_Usage.BOOKKEEP):
        """One fence for all of :meth:`get_fences` (``dma_resv_get_singleton``):
        None, the only fence, or a new :class:`FenceArray` (fresh context,
        seqno 1).  Do not add the array back to a Resv."""
        cdef list fs = self.get_fences(usage)
        if not fs:
            return None
        if len(fs) == 1:
            return fs[0]
        return FenceArray(fs, False, context=fence_context_alloc(1), seqno=1)

    def test_signaled(self, usage=_Usage.BOOKKEEP):
        """True when no unsignalled fence of usage <= ``usage`` is left
        (``dma_resv_test_signaled``); no lock needed."""
        return not _resv_snapshot(self, _usage(usage), True)

    def wait(self, usage=_Usage.BOOKKEEP, timeout=None, *, bint interruptible=False):
        """Wait for every fence of usage <= ``usage`` (``dma_resv_wait_timeout``).

        No lock needed (holding it is allowed).  ``timeout`` in seconds
        (None: forever) is one budget for all fences; 0 only tests.

        Returns
        -------
        bool
            True when all are signalled, False when time ran out.

        Raises
        ------
        Interrupted
            ERESTARTSYS: interruptible and a signal is pending.
        LockingError
            Called inside a fence-signalling section with a fence to wait on.
        """
        cdef int64_t deadline = _deadline(timeout, "Resv.wait")
        cdef int64_t left
        cdef unsigned int use = _usage(usage)
        cdef ResvIter it
        if self.num == 0:
            return True  # an empty list: what the walk below would find at once
        it = ResvIter._make(self, use, False)
        for f, u in it:
            if deadline < 0:
                remaining = None
            else:
                left = deadline - pdb_now_ns()
                remaining = left / 1e9 if left > 0 else 0.0
            if not f.wait(remaining, interruptible=interruptible):
                return False
        return True

    def set_deadline(self, usage, deadline_ns):
        """``dma_resv_set_deadline``: pass a deadline hint to every pending
        fence of usage <= ``usage``."""
        cdef unsigned int us = _usage(usage)
        _s64(deadline_ns, "deadline_ns")
        for f, u in ResvIter._make(self, us, False):
            f.set_deadline_hint(deadline_ns)

    def describe(self):
        """The fences up to READ, one per line, as ``dma_resv_describe``
        prints them; needs the lock."""
        lines = []
        for f, u in self.iter_fences(_Usage.READ):
            lines.append(f"\t{_USAGE_NAMES[u]} fence: {f.describe()}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"<Resv at {id(self):#x} {self._state()}, {self.num} fence(s), "
                f"{self.max - self.num if self.max > self.num else 0} reserved>")


cdef class ResvIter:
    """A cursor over a :class:`Resv` (``struct dma_resv_iter``).

    Yields ``(fence, usage)``.  ``is_restarted`` is True when the item just
    yielded is the first of a (re)started walk.
    """

    cdef Resv resv
    cdef unsigned int usage
    cdef bint locked
    cdef bint started
    cdef readonly bint is_restarted
    cdef unsigned int index
    cdef readonly unsigned int num
    cdef uint64_t gen
    cdef unsigned int _last_usage

    def __init__(self):
        raise TypeError("use Resv.iter_fences() or Resv.iter_fences_unlocked()")

    @staticmethod
    cdef ResvIter _make(Resv resv, unsigned int usage, bint locked):
        cdef ResvIter it = ResvIter.__new__(ResvIter)
        it.resv = resv
        it.usage = usage
        it.locked = locked
        it.started = False
        it.is_restarted = False
        it.index = 0
        it.num = 0
        it.gen = 0
        return it

    def __iter__(self):
        return self

    def _invalidate(self):
        """Test hook: forget the list snapshot, forcing the next step of an
        unlocked walk to start over (what st-dma-resv does to its cursor)."""
        _iter_made(self)
        self.gen = ~self.resv.gen

    cdef bint _changed(self):
        cdef bint changed
        _acquire(self.resv.lock)
        changed = self.resv.gen != self.gen
        _release(self.resv.lock)
        return changed

    cdef void _restart(self):
        _acquire(self.resv.lock)
        self.index = 0
        self.num = self.resv.num
        self.gen = self.resv.gen
        _release(self.resv.lock)
        self.is_restarted = True

    cdef object _walk(self):
        """dma_resv_iter_walk_unlocked(): the next unsignalled fence of a
        wanted usage (a reference), or None at the end or when the list
        was replaced."""
        cdef Fence f
        cdef unsigned int u
        while True:
            _acquire(self.resv.lock)
            if self.resv.gen != self.gen or self.index >= self.num:
                _release(self.resv.lock)
                return None
            f = <Fence>self.resv.table[self.index].fence
            u = self.resv.table[self.index].usage
            self.index += 1
            _release(self.resv.lock)
            if u <= self.usage and not f._is_signaled():
                self._last_usage = u
                return f

    def __next__(self):
        cdef object f
        cdef bint restart
        cdef unsigned int u
        _iter_made(self)
        if self.locked:
            _resv_held(self.resv, "iterating the fences with the lock held")
            while self.index < self.resv.num:
                u = self.resv.table[self.index].usage
                f = <object>self.resv.table[self.index].fence
                self.index += 1
                if u <= self.usage:
                    self.is_restarted = not self.started
                    self.started = True
                    return (f, _USAGES[u])
            self.is_restarted = False
            raise StopIteration
        if not self.started:
            self.started = True
            restart = True
        else:
            self.is_restarted = False
            restart = self._changed()
        while True:
            if restart:
                self._restart()
            f = self._walk()
            if not self._changed():
                break
            restart = True
        if f is None:
            raise StopIteration
        return (f, _USAGES[self._last_usage])


cdef int _iter_made(ResvIter it) except -1:
    if it.resv is None:     # made with ResvIter.__new__: no object to walk
        raise TypeError("this ResvIter was not made by Resv.iter_fences() / iter_fences_unlocked()")
    return 0
