"""The exceptions pydmabuf raises.

Every failure is an instance of :class:`DmaBufError`, itself an
:class:`OSError`, whose ``errno`` is the code the Linux kernel returns for
the same failure (``errno.EINVAL``, ``errno.ENOMEM`` ...).  Each code has a
class of its own so callers can catch exactly what they expect; where Python
has a builtin exception with the same meaning the class derives from it too
(``AlreadyExists`` is a ``FileExistsError``, ``TimedOut`` a ``TimeoutError``).

Broken API rules (a map without the reservation lock, unlocking a lock you
do not hold, DMA through a mapping after it was invalidated) are not errno
failures in the kernel but WARN splats; pydmabuf raises them as
:class:`LockingError` or :class:`LifetimeError`.

Build one from a code with :func:`from_errno`::

    >>> from pydmabuf import errors
    >>> e = errors.from_errno(errno.EEXIST, "range overlaps [0x1000, 0x1fff]")
    >>> type(e).__name__, e.errno
    ('AlreadyExists', 17)
"""

from __future__ import annotations

import errno as _errno
import os as _os
from typing import Any

__all__ = [
    "DmaBufError",
    "InvalidArgument",
    "OutOfRange",
    "Overflow",
    "OutOfMemory",
    "NoSpace",
    "AlreadyExists",
    "AddressInUse",
    "NotFound",
    "Busy",
    "WouldDeadlock",
    "AlreadyLockedError",
    "Interrupted",
    "TimedOut",
    "NotSupported",
    "NoDevice",
    "Revoked",
    "NotPermitted",
    "AccessDenied",
    "IommuFault",
    "IOFailure",
    "RemoteIO",
    "TryAgain",
    "BadHandle",
    "LockingError",
    "LifetimeError",
    "from_errno",
    "errno_name",
]


class DmaBufError(OSError):
    """Root of every pydmabuf failure.

    Construct as ``DmaBufError(errno, message)``; subclasses that stand for
    one code also accept just ``(message)``.  ``.errno`` is the kernel's
    (positive) error code, ``.strerror`` the message.
    """

    default_errno: int = _errno.EIO

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (self.default_errno, args[0])
        elif not args:
            args = (self.default_errno, _os.strerror(self.default_errno))
        super().__init__(*args)

    def __str__(self) -> str:
        name = errno_name(self.errno) if isinstance(self.errno, int) else "?"
        return f"[{name}] {self.strerror}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.strerror))


class InvalidArgument(DmaBufError, ValueError):
    """EINVAL: the arguments cannot work; retrying the same call is futile."""

    default_errno = _errno.EINVAL


class OutOfRange(DmaBufError):
    """ERANGE: an address is outside what the table or device can hold."""

    default_errno = _errno.ERANGE


class Overflow(DmaBufError, OverflowError):
    """EOVERFLOW: an address plus a length wraps past 2**64 - 1."""

    default_errno = _errno.EOVERFLOW


class OutOfMemory(DmaBufError):
    """ENOMEM: out of memory or out of IOVA space at the DMA API layer."""

    default_errno = _errno.ENOMEM


class NoSpace(DmaBufError):
    """ENOSPC: an allocator (range table gap search) found no room."""

    default_errno = _errno.ENOSPC


class AlreadyExists(DmaBufError, FileExistsError):
    """EEXIST: the range or mapping overlaps one that is already there."""

    default_errno = _errno.EEXIST


class AddressInUse(DmaBufError):
    """EADDRINUSE: an address range is already taken (iommufd: a reserved
    IOVA region meets an existing area)."""

    default_errno = _errno.EADDRINUSE


class NotFound(DmaBufError, LookupError):
    """ENOENT: nothing there (no such range, fence already signalled ...)."""

    default_errno = _errno.ENOENT


class Busy(DmaBufError):
    """EBUSY: the object is in use (pinned, mapped, attached)."""

    default_errno = _errno.EBUSY


class WouldDeadlock(DmaBufError):
    """EDEADLK: the acquire context must back off (drop all, ``lock_slow``)."""

    default_errno = _errno.EDEADLK


class AlreadyLockedError(DmaBufError):
    """EALREADY: the lock is already held by this acquire context."""

    default_errno = _errno.EALREADY


class Interrupted(DmaBufError, InterruptedError):
    """EINTR: an interruptible wait was interrupted."""

    default_errno = _errno.EINTR


class TimedOut(DmaBufError, TimeoutError):
    """ETIMEDOUT: a bounded wait ran out."""

    default_errno = _errno.ETIMEDOUT


class NotSupported(DmaBufError):
    """EOPNOTSUPP: the exporter, importer or device cannot do this."""

    default_errno = _errno.EOPNOTSUPP


class NoDevice(DmaBufError):
    """ENODEV: no such device or region, or the memory is gone."""

    default_errno = _errno.ENODEV


class Revoked(NoDevice):
    """ENODEV because the exporter revoked the buffer."""


class NotPermitted(DmaBufError, PermissionError):
    """EPERM: the caller may not do this (gated interface, private memory)."""

    default_errno = _errno.EPERM


class AccessDenied(DmaBufError, PermissionError):
    """EACCES: the mapping does not allow this access direction."""

    default_errno = _errno.EACCES


class IommuFault(DmaBufError):
    """EFAULT: a device access hit no valid translation (an IOMMU fault)."""

    default_errno = _errno.EFAULT


class IOFailure(DmaBufError):
    """EIO: a lower layer failed in a way the kernel reports as EIO."""

    default_errno = _errno.EIO


class RemoteIO(DmaBufError):
    """EREMOTEIO: the device cannot reach the peer-to-peer memory."""

    default_errno = _errno.EREMOTEIO


class TryAgain(DmaBufError, BlockingIOError):
    """EAGAIN: would block; try again."""

    default_errno = _errno.EAGAIN


class BadHandle(DmaBufError):
    """EBADF: not a valid (or no longer a valid) handle."""

    default_errno = _errno.EBADF


class LockingError(DmaBufError):
    """A broken locking rule: what the kernel's lockdep or ww-mutex debug
    checks would WARN about (unlocking a lock you do not hold, mapping a
    dynamic attachment without the reservation lock ...)."""

    default_errno = _errno.EINVAL


class LifetimeError(DmaBufError):
    """A broken lifetime rule: use after unmap/detach/revoke, leaked
    attachments, pins or IOVA, DMA through an invalidated mapping."""

    default_errno = _errno.EINVAL


_BY_ERRNO: dict[int, type[DmaBufError]] = {
    cls.default_errno: cls
    for cls in (
        InvalidArgument,
        OutOfRange,
        Overflow,
        OutOfMemory,
        NoSpace,
        AlreadyExists,
        AddressInUse,
        NotFound,
        Busy,
        WouldDeadlock,
        AlreadyLockedError,
        Interrupted,
        TimedOut,
        NotSupported,
        NoDevice,
        NotPermitted,
        AccessDenied,
        IommuFault,
        IOFailure,
        RemoteIO,
        TryAgain,
        BadHandle,
    )
}

# The kernel-internal "restart the system call" code surfaces as EINTR.
ERESTARTSYS = 512
_BY_ERRNO[ERESTARTSYS] = Interrupted


def errno_name(code: int) -> str:
    """``errno_name(22) == 'EINVAL'``; unknown codes print as numbers."""
    if code == ERESTARTSYS:
        return "ERESTARTSYS"
    return _errno.errorcode.get(code, str(code))


def from_errno(code: int, message: str | None = None) -> DmaBufError:
    """The exception for a kernel error code (positive or negative)."""
    code = abs(int(code))
    if code == ERESTARTSYS:
        code = _errno.EINTR
    cls = _BY_ERRNO.get(code, DmaBufError)
    if message is None:
        message = _os.strerror(code)
    return cls(code, message)
