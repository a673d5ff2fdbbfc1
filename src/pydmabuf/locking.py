"""Helpers around the native reservation-locking core.

* :func:`locked`: lock a set of :class:`~pydmabuf.WwMutex` /
  :class:`~pydmabuf.Resv` objects with one acquire context and the full
  back-off loop, unlock and finish on exit.
* :func:`signalling_section`: a fence-signalling critical section as a
  context manager (:func:`~pydmabuf.begin_signalling` /
  :func:`~pydmabuf.end_signalling`).
* The messages of the signalling checker: where a section began and where
  the offending wait or lock happened, as ``file:line`` of Python code.
* Lock-class dependency tracking the way lockdep does it
  (``kernel/locking/lockdep.c``): :class:`Mutex`, a kernel mutex of a named
  lock class; one graph over every lock class of the model (all
  reservation objects are one class, ``reservation_ww_class_mutex``; each
  :class:`Mutex` class; the pseudo-locks ``dma_fence_map``, ``mmap_lock``,
  ``fs_reclaim`` ...).  Taking B while holding A adds the edge A -> B (with
  the Python call site that made it); the first acquisition that closes a
  cycle is a :class:`~pydmabuf.errors.LockingError` in strict mode (a
  ``lock-inversion`` report in report mode) naming both chains, whether or
  not another thread was there to deadlock.  The graph is primed as the
  kernel primes lockdep (:func:`prime`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

from pydmabuf import errors

__all__ = ["locked", "signalling_section", "Mutex", "might_lock", "lock_map", "prime", "set_lockdep",
           "lockdep_enabled", "lockdep_reset", "dependencies", "held_locks", "RESV_CLASS", "FENCE_MAP",
           "MMAP_LOCK", "FS_RECLAIM", "I_MMAP_RWSEM", "MMU_NOTIFIER_MAP"]

# The signalling checker's messages (where a section began, where the
# offending call is) live in the leaf module _sites, which the compiled core
# uses too without importing this module.
from pydmabuf._sites import _SKIP_FILES, _caller_site, _describe, _internal, _signal_site, _signalling_error  # noqa: F401

@contextlib.contextmanager
def signalling_section() -> Iterator[None]:
    """``with signalling_section():`` brackets code that must reach a fence
    signal without waiting on fences or taking reservation locks."""
    from pydmabuf._core import begin_signalling, end_signalling

    cookie = begin_signalling()
    try:
        yield
    finally:
        end_signalling(cookie)


@contextlib.contextmanager
def locked(objs: Iterable[Any], ww_class: Any = None, *, interruptible: bool = False) -> Iterator[Any]:
    """Lock every object of ``objs`` with one new acquire context.

    Uses :meth:`~pydmabuf.AcquireContext.lock_all` (back-off handled
    inside), yields the context, and on exit unlocks everything it holds
    and finishes it.

    Parameters
    ----------
    objs : iterable of WwMutex or Resv
    ww_class : WwClass, optional
        Default: the class of the first object (``reservation_ww_class``
        when there is none).
    interruptible : bool
        Wait interruptibly (:class:`~pydmabuf.errors.Interrupted`).
    """
    from pydmabuf._core import AcquireContext, reservation_ww_class

    items = list(objs)
    cls = ww_class if ww_class is not None else (items[0].ww_class if items else reservation_ww_class)
    with AcquireContext(cls) as ctx:
        ctx.lock_all(items, interruptible=interruptible)
        try:
            yield ctx
        finally:
            ctx.unlock_all()


# ===================================================================== lockdep
#
# Lock classes are strings (lockdep's class names).  Per thread: the stack of
# held locks.  Globally: the dependency graph, class -> {class: edge site}.
# Edges are added the way check_prevs_add() adds them: from every lock the
# thread holds to the one being taken, except to a trylock (a trylock never
# waits, so nothing held can be waited on through it).  Before a new edge
# A -> B goes in, a path B -> ... -> A is searched (check_noncircular()); one
# found is the inversion.  Same-class nesting: a ww class under an acquire
# context is legal (nest_lock); a plain Mutex class taken twice is
# recursive locking unless the second is a different subclass
# (mutex_lock_nested) or given a nest_lock the thread holds.

#: The lock class of every reservation object (``reservation_ww_class``'s
#: mutex class in lockdep).
RESV_CLASS = "reservation_ww_class_mutex"
#: dma_fence_begin_signalling()'s pseudo-lock (``dma_fence_lockdep_map``).
FENCE_MAP = "dma_fence_map"
#: The mm's ``mmap_lock`` (taken by page faults, GUP, copy_from_user).
MMAP_LOCK = "mmap_lock"
#: ``__fs_reclaim_map``: an allocation that may enter direct reclaim.
FS_RECLAIM = "fs_reclaim"
#: ``mapping->i_mmap_rwsem`` (unmap_mapping_range() in shrinkers).
I_MMAP_RWSEM = "i_mmap_rwsem"
#: ``__mmu_notifier_invalidate_range_start_map``.
MMU_NOTIFIER_MAP = "mmu_notifier_invalidate_range_start"


#: A held lock: (class, the lock object, nested legally (ww / nest_lock)).
_Held = tuple[str, Any, bool]


class _Lockdep:
    def __init__(self) -> None:
        from pydmabuf._core import ThreadHeld

        # The held list per thread, in the thread's own state (a core
        # type the lock paths read directly).
        self.tls = ThreadHeld()
        self.mu = threading.Lock()
        #: class -> {class taken while it was held: where the edge was made}
        self.deps: dict[str, dict[str, str]] = {}
        self.reported: set[tuple[str, str]] = set()
        self.enabled = False
        self.ww_keys: dict[Any, str] = {}

    def held(self) -> list[_Held]:
        try:
            h: list[_Held] = self.tls.held
        except AttributeError:
            h = self.tls.held = []
        return h

    def path(self, src: str, dst: str) -> list[str] | None:
        """A path src -> ... -> dst in the graph (breadth first), or None."""
        if src == dst:
            return [src]
        prev: dict[str, str] = {src: src}
        todo = [src]
        deps = self.deps
        while todo:
            nxt = []
            for a in todo:
                for b in deps.get(a, ()):
                    if b in prev:
                        continue
                    prev[b] = a
                    if b == dst:
                        out = [b]
                        while out[-1] != src:
                            out.append(prev[out[-1]])
                        return out[::-1]
                    nxt.append(b)
            todo = nxt
        return None

    def chain(self, path: list[str]) -> str:
        return "; ".join(f"{a} -> {b} at {self.deps[a][b]}" for a, b in zip(path, path[1:]))

    def acquire(self, key: str, obj: Any, *, trylock: bool = False, nest: bool = False,
                ww: bool = False, site: str | None = None) -> None:
        """Check and record taking ``key``; raises (strict) before anything
        is recorded when it would close a cycle."""
        held = self.held()
        if held and not trylock:
            new: list[str] = []
            with self.mu:
                deps = self.deps
                seen: set[str] = set()
                for h in held:
                    a = h[0]
                    if a in seen:
                        continue
                    seen.add(a)
                    if a == key:
                        # ww classes nest under their acquire context (the
                        # core refuses the rest); a nest_lock allows it too.
                        if not (ww or nest):
                            self._recursive(key, obj, h, site)
                        continue
                    if key in deps.get(a, ()):
                        continue
                    back = self.path(key, a)
                    if back is not None:
                        if (a, key) in self.reported:
                            continue
                        self.reported.add((a, key))
                        where = site or _edge_site()
                        stack = " > ".join(h[0] for h in held)
                        msg = (f"possible circular locking dependency: taking {key} while holding {a} "
                               f"(this thread holds {stack}) at {where} makes {a} -> {key}, but the graph "
                               f"already has "
                               f"{' -> '.join(back)} ({self.chain(back)}). Two threads taking these "
                               f"classes in these orders deadlock")
                        deps.setdefault(a, {})[key] = where  # report mode: the edge stands
                        from pydmabuf.checks import checker
                        # Release the graph lock around the report: strict mode raises.
                        self.mu.release()
                        try:
                            checker.locking("lock-inversion", msg)
                        finally:
                            self.mu.acquire()
                        continue
                    new.append(a)
                if new:
                    where = site or _edge_site()
                    for a in new:
                        deps.setdefault(a, {})[key] = where
        held.append((key, obj, nest or ww))

    def _recursive(self, key: str, obj: Any, h: _Held, site: str | None) -> None:
        where = site or _edge_site()
        self.mu.release()
        try:
            if h[1] is obj:
                # The same mutex: a real self-deadlock, refused in every mode.
                raise errors.LockingError(
                    f"recursive locking: {obj!r} ({key}) is already held by this thread; taking it "
                    f"again at {where} would deadlock")
            from pydmabuf.checks import checker
            checker.locking("recursive-locking",
                            f"possible recursive locking: taking {obj!r} of class {key} at {where} while "
                            f"holding {h[1]!r} of the same class; annotate the nesting with a subclass "
                            f"(mutex_lock_nested) or a nest_lock")
        finally:
            self.mu.acquire()

    def release(self, obj: Any) -> None:
        try:
            held: list[_Held] = self.tls.held
        except AttributeError:
            return
        if held and held[-1][1] is obj:
            held.pop()
            return
        for i in range(len(held) - 2, -1, -1):
            if held[i][1] is obj:
                del held[i]
                return

    # --- the core's hooks (acquire/release: _fast_hooks) ---------------------

    def signal(self, entering: bool) -> None:
        # dma_fence_begin_signalling(): a read trylock of dma_fence_map (no
        # edge into it from what is held); locks taken inside depend on it.
        if entering:
            self.held().append((FENCE_MAP, FENCE_MAP, True))
        else:
            self.release(FENCE_MAP)

    def might_wait(self) -> None:
        # __dma_fence_might_wait(): the map taken for write and dropped at
        # once; inside a section the read hold is dropped first (so the
        # section itself adds no self edge).
        held = self.held()
        if not held:
            return
        inside = [h for h in held if h[0] == FENCE_MAP]
        for h in inside:
            held.remove(h)
        try:
            if held:
                token = object()
                self.acquire(FENCE_MAP, token)
                self.release(token)
        finally:
            held.extend(inside)


_ld = _Lockdep()


def _edge_site() -> str:
    """Where an edge is made: the innermost frame outside this module and
    contextlib (a driver function or user code), plus the first user frame
    when they differ."""
    frame: FrameType | None = sys._getframe(1)
    here = __file__
    while frame is not None and (frame.f_code.co_filename == here or frame.f_code.co_filename in _SKIP_FILES):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    inner = (f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name} "
             f"[{threading.current_thread().name}]")
    user: FrameType | None = frame
    while user is not None and _internal(user):
        user = user.f_back
    if user is None or user is frame:
        return inner
    return f"{inner} (called from {os.path.basename(user.f_code.co_filename)}:{user.f_lineno})"


def _fast_hooks(ld: _Lockdep) -> tuple[Any, Any]:
    """The core's acquire/release hooks as closures over the graph's state
    (no attribute lookups on the path that holds nothing else).  The core
    does what their fast branches do itself when it is given ``ld.tls``
    and ``ld.ww_keys`` (:func:`set_lockdep`): it calls them only when a
    lock is taken with another held, for a class not keyed yet, or
    released out of order."""
    tls = ld.tls
    keys = ld.ww_keys
    slow_acquire = ld.acquire
    slow_release = ld.release

    def ww_acquire(m: Any, with_ctx: bool, trylock: bool) -> None:
        cls = m.ww_class
        key = keys.get(cls)
        if key is None:
            key = keys[cls] = cls.mutex_name
        try:
            held = tls.held
        except AttributeError:
            held = tls.held = []
        if held:
            slow_acquire(key, m, trylock=trylock, ww=True)
        else:  # nothing held: no edge to add
            held.append((key, m, True))

    def release(m: Any) -> None:
        try:
            held = tls.held
        except AttributeError:
            return
        if held and held[-1][1] is m:
            held.pop()
        else:
            slow_release(m)

    return ww_acquire, release


def set_lockdep(enabled: bool) -> None:
    """Turn lock-class tracking on (the default) or off.  Off, the core's
    lock paths skip the hooks (one compare each) and :class:`Mutex` takes
    no graph step; the graph is kept."""
    from pydmabuf import _core

    _ld.enabled = bool(enabled)
    if enabled:
        _core.set_lockdep_hooks(*_fast_hooks(_ld), _ld.signal, _ld.might_wait, tls=_ld.tls, keys=_ld.ww_keys)
    else:
        _core.set_lockdep_hooks(None, None, None, None)


def lockdep_enabled() -> bool:
    """Whether lock-class tracking is on."""
    return _ld.enabled


def lockdep_reset() -> None:
    """Forget every dependency and report (as a fresh boot), then prime the
    graph again.  The calling thread's held locks are kept."""
    with _ld.mu:
        _ld.deps.clear()
        _ld.reported.clear()
    _prime_boot()


def dependencies() -> dict[str, dict[str, str]]:
    """A copy of the graph: class -> {class taken while holding it: where}."""
    with _ld.mu:
        return {a: dict(b) for a, b in _ld.deps.items()}


def held_locks() -> list[str]:
    """The lock classes the calling thread holds, outermost first."""
    return [h[0] for h in _ld.held()]


def prime(order: Iterable[str], why: str) -> None:
    """Record that the classes of ``order`` nest in that order, as the
    kernel's boot-time lockdep priming does: every class depends on each
    one before it.  ``why`` (the kernel function that primes it) is the
    edges' site.  An order that contradicts the graph is reported as any
    inversion is.  The locks the caller holds take no part: the edges are
    among ``order`` only (the kernel primes at boot, holding nothing)."""
    classes = list(order)
    token = object()
    held = _ld.held()
    outer = held[:]
    del held[:]
    try:
        for k in classes:
            _ld.acquire(k, token, site=f"primed by {why}")
    finally:
        held[:] = outer


def might_lock(lock_class: str) -> None:
    """``might_lock()``: record that the caller may take ``lock_class``
    here (edges from what it holds, checked for cycles), without taking
    anything: for the model's pseudo-locks (``mmap_lock`` for a fault or
    GUP, ``fs_reclaim`` for a GFP_KERNEL allocation)."""
    if _ld.enabled:
        token = object()
        _ld.acquire(lock_class, token)
        _ld.release(token)


@contextlib.contextmanager
def lock_map(lock_class: str) -> Iterator[None]:
    """Hold the pseudo-lock ``lock_class`` for the block
    (``lock_map_acquire`` / ``lock_map_release``)."""
    token = object()
    on = _ld.enabled
    if on:
        _ld.acquire(lock_class, token)
    try:
        yield
    finally:
        if on:
            _ld.release(token)


def _prime_boot() -> None:
    # dma_resv_lockdep() (drivers/dma-buf/dma-resv.c), run at boot on
    # lockdep kernels: mmap_read_lock, then a reservation lock under an
    # acquire context, then fs_reclaim_acquire(GFP_KERNEL), then
    # i_mmap_lock_write (shrinkers unmapping trylocked buffers), then the
    # mmu notifier map and __dma_fence_might_wait() inside it.
    prime([MMAP_LOCK, RESV_CLASS, FS_RECLAIM, I_MMAP_RWSEM], "dma_resv_lockdep()")
    prime([MMAP_LOCK, RESV_CLASS, FS_RECLAIM, MMU_NOTIFIER_MAP, FENCE_MAP], "dma_resv_lockdep()")


class Mutex:
    """A kernel ``struct mutex`` of the lock class ``lock_class``.

    Not recursive.  ``with m:``, :meth:`lock` / :meth:`unlock`,
    :meth:`trylock`.  Every acquisition is a step of the lock-class graph
    (taking it while holding another class adds that dependency; closing a
    cycle is a :class:`~pydmabuf.errors.LockingError` in strict mode).
    Taking a second mutex of the same class while holding one is reported
    as recursive locking unless the second is a different ``subclass``
    (``mutex_lock_nested``) or taken under a ``nest_lock`` the thread
    holds (``mutex_lock_nest_lock``); taking the same mutex twice raises
    in every mode (it would deadlock).

    Parameters
    ----------
    lock_class : str
        The lockdep class name, e.g. ``"&vdev->memory_lock"``.
    """

    __slots__ = ("lock_class", "_mu", "_owner", "_key", "__weakref__")

    def __init__(self, lock_class: str) -> None:
        if not isinstance(lock_class, str) or not lock_class:
            raise TypeError("lock_class must be a non-empty str")
        self.lock_class = lock_class
        self._mu = threading.Lock()
        self._owner: int | None = None
        self._key = lock_class

    def _check(self, subclass: int, nest_lock: Any) -> str:
        if not isinstance(subclass, int) or not 0 <= subclass < 8:
            raise ValueError("subclass must be an int in [0, 8) (MAX_LOCKDEP_SUBCLASSES)")
        me = threading.get_ident()
        if self._owner == me:
            raise errors.LockingError(
                f"recursive locking: {self!r} is already held by this thread; taking it again at "
                f"{_edge_site()} would deadlock")
        if nest_lock is not None and not nest_lock.held_by_current_thread():
            raise errors.LockingError(f"nest_lock {nest_lock!r} of {self!r} is not held by this thread")
        return self._key if subclass == 0 else f"{self._key}/{subclass}"

    def lock(self, subclass: int = 0, *, nest_lock: Any = None) -> None:
        """``mutex_lock()`` (``mutex_lock_nested(subclass)`` /
        ``mutex_lock_nest_lock(nest_lock)``): blocks until held.

        Raises
        ------
        LockingError
            It closes a cycle in the lock-class graph (strict mode), or
            this thread holds it already.
        """
        key = self._check(subclass, nest_lock)
        if _ld.enabled:
            _ld.acquire(key, self, nest=nest_lock is not None)
        try:
            self._mu.acquire()
        except BaseException:
            _ld.release(self)
            raise
        self._owner = threading.get_ident()

    def trylock(self) -> bool:
        """``mutex_trylock()``: take it if free, never wait (False when
        held, by this thread too)."""
        if self._owner == threading.get_ident():
            return False
        key = self._check(0, None)
        if not self._mu.acquire(blocking=False):
            return False
        self._owner = threading.get_ident()
        if _ld.enabled:
            _ld.acquire(key, self, trylock=True)
        return True

    def unlock(self) -> None:
        """``mutex_unlock()``; only the owner may (LockingError)."""
        if self._owner != threading.get_ident():
            raise errors.LockingError(f"unlocking {self!r}, which this thread does not hold")
        self._owner = None
        _ld.release(self)
        self._mu.release()

    def held_by_current_thread(self) -> bool:
        """``lockdep_is_held()`` for the calling thread."""
        return self._owner == threading.get_ident()

    def assert_held(self) -> None:
        """``lockdep_assert_held()``: LockingError unless this thread holds it."""
        if not self.held_by_current_thread():
            raise errors.LockingError(f"{self!r} must be held here")

    def locked(self) -> bool:
        """Whether some thread holds it."""
        return self._owner is not None

    def __enter__(self) -> Mutex:
        self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    def __repr__(self) -> str:
        return f"<Mutex {self.lock_class}{' locked' if self._owner is not None else ''}>"


set_lockdep(True)
_prime_boot()
