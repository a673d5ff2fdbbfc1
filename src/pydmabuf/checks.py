"""The lifetime and locking checker.

The kernel spreads these rules over lockdep, ``CONFIG_DMA_API_DEBUG``,
``CONFIG_DMABUF_DEBUG`` and WARN_ONs; pydmabuf checks them in one place:

* mapping, unmapping, pinning or vmapping an attachment without holding
  the buffer's reservation lock, or using an ``_unlocked`` call while
  holding it; exporter invalidations (``move_notify``) without it;
* DMA through a mapping after the exporter invalidated or revoked it
  (attributed to the importer that ignored the notification);
* unmapping twice or with the wrong direction, detaching with mappings or
  pins still live, using an attachment after detach or a buffer after its
  last reference went;
* a buffer released with attachments, pins or mappings still live.

In **strict** mode (the default) a broken rule raises
:class:`~pydmabuf.errors.LockingError` or
:class:`~pydmabuf.errors.LifetimeError`; in **report** mode it is recorded
(:func:`reports`) and the call goes on as the kernel would.  Each report
names the objects involved and where they were created.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Iterator

from pydmabuf import errors

log = logging.getLogger(__name__)

__all__ = ["Report", "Checker", "checker", "strict", "report_mode", "reports", "clear", "created_at", "mode"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
#: Files inside the package written as user code (examples).
_USER_CODE = (os.sep + "_scenario_library.py", os.sep + "_scenario_library_memory.py")


#: co_filename -> basename for user code, None for pydmabuf's own files.
_FILE_KIND: dict[str, str | None] = {}


def _user_file(co_filename: str) -> str | None:
    try:
        return _FILE_KIND[co_filename]
    except KeyError:
        fn = os.path.abspath(co_filename)
        user = not fn.startswith(_PKG_DIR) or fn.endswith(_USER_CODE)
        kind = _FILE_KIND[co_filename] = os.path.basename(fn) if user else None
        return kind


def created_at(skip_package: bool = True) -> str:
    """``file:line`` of the first caller outside pydmabuf (where a user made
    the object), for reports.  The bundled scenarios count as user code.
    (Attachments and mappings find theirs in C, pydmabuf._dmabuf_api, with
    the same user-file rule.)"""
    f: FrameType | None = sys._getframe(1)
    kinds = _FILE_KIND
    while f is not None:
        co_filename = f.f_code.co_filename
        name = kinds[co_filename] if co_filename in kinds else _user_file(co_filename)
        if name is not None or not skip_package:
            return f"{name or os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"
        f = f.f_back
    return "?"


@dataclass
class Report:
    """One broken rule."""

    kind: str  # "locking" or "lifetime"
    rule: str  # a short name, e.g. "map-without-resv"
    message: str
    objects: tuple[str, ...] = ()
    where: str = ""
    culprit: str = ""  # the importer or exporter held responsible

    def __str__(self) -> str:
        objs = f" [{'; '.join(self.objects)}]" if self.objects else ""
        who = f" (culprit: {self.culprit})" if self.culprit else ""
        return f"{self.kind}:{self.rule} at {self.where}: {self.message}{who}{objs}"


#: This thread's (or asyncio task's) strict/report choice, set by
#: :func:`strict` and :func:`report_mode` blocks; None: the process default.
#: A ContextVar starts empty in every new thread, so a block in one thread
#: never changes what another thread's violations do.
_STRICT_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("pydmabuf_checker_strict",
                                                                              default=None)


class Checker:
    """Raises or records broken rules; one instance is shared (:data:`checker`).

    ``strict`` reads the calling thread's choice (a :func:`strict` or
    :func:`report_mode` block), else the process default; assigning it sets
    the process default.
    """

    def __init__(self, strict: bool = True) -> None:
        self._default_strict = bool(strict)
        self.reports: list[Report] = []
        self._lock = threading.Lock()

    @property
    def strict(self) -> bool:
        o = _STRICT_OVERRIDE.get()
        return self._default_strict if o is None else o

    @strict.setter
    def strict(self, value: bool) -> None:
        self._default_strict = bool(value)

    def violation(self, kind: str, rule: str, message: str, *objects: Any, culprit: Any = None) -> None:
        descr = tuple(_describe(o) for o in objects)
        r = Report(kind, rule, message, descr, created_at(), _describe(culprit) if culprit is not None else "")
        if self.strict:
            cls = errors.LockingError if kind == "locking" else errors.LifetimeError
            err: errors.DmaBufError = cls(str(r.message) + (f" (culprit: {r.culprit})" if r.culprit else "")
                                          + (f" [{'; '.join(descr)}]" if descr else ""))
            err.report = r  # type: ignore[attr-defined]  # the Report rides along for handlers
            raise err
        with self._lock:
            self.reports.append(r)
        log.warning("%s", r)

    def locking(self, rule: str, message: str, *objects: Any, culprit: Any = None) -> None:
        self.violation("locking", rule, message, *objects, culprit=culprit)

    def lifetime(self, rule: str, message: str, *objects: Any, culprit: Any = None) -> None:
        self.violation("lifetime", rule, message, *objects, culprit=culprit)


def _describe(o: Any) -> str:
    if o is None:
        return "None"
    where = getattr(o, "created_at", None)
    return f"{o!r}" + (f" created at {where}" if where else "")


#: The checker every pydmabuf object reports to.
checker = Checker()


def mode() -> str:
    """``"strict"`` or ``"report"``: what a violation in the calling thread does."""
    return "strict" if checker.strict else "report"


@contextlib.contextmanager
def _mode_block(value: bool) -> Iterator[Checker]:
    token = _STRICT_OVERRIDE.set(value)
    try:
        yield checker
    finally:
        _STRICT_OVERRIDE.reset(token)   # exactly what this thread had before


@contextlib.contextmanager
def strict() -> Iterator[Checker]:
    """Raise on broken rules inside the block (the default).

    The choice is the calling thread's (or asyncio task's) only; other
    threads keep theirs, and the block restores exactly what this thread
    had, however blocks of several threads overlap."""
    with _mode_block(True) as c:
        yield c


@contextlib.contextmanager
def report_mode() -> Iterator[Checker]:
    """Record broken rules inside the block instead of raising.

    Like :func:`strict`, it affects the calling thread (or asyncio task)
    only: a violation in another thread still raises.

    Examples
    --------
    >>> from pydmabuf import Machine
    >>> from pydmabuf.exporters import SystemHeap
    >>> buf = SystemHeap(Machine.default()).allocate(1 << 16)
    >>> buf.put()
    >>> with report_mode():
    ...     clear()
    ...     buf.put()                       # a put after the last: recorded, not raised
    ...     [r.rule for r in reports()]
    ['put-after-release']
    >>> clear()
    """
    with _mode_block(False) as c:
        yield c


def reports(rule: str | None = None) -> list[Report]:
    """What report mode recorded (optionally only one rule)."""
    with checker._lock:
        return [r for r in checker.reports if rule is None or r.rule == rule]


def clear() -> None:
    """Forget the recorded reports."""
    with checker._lock:
        checker.reports.clear()
