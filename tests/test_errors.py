"""The exception hierarchy: kernel errnos, builtin bases, round trips."""

import errno
import pickle

import pytest

from pydmabuf import errors

CASES = [
    (errno.EINVAL, errors.InvalidArgument, ValueError),
    (errno.ERANGE, errors.OutOfRange, None),
    (errno.EOVERFLOW, errors.Overflow, OverflowError),
    (errno.ENOMEM, errors.OutOfMemory, None),
    (errno.ENOSPC, errors.NoSpace, None),
    (errno.EEXIST, errors.AlreadyExists, FileExistsError),
    (errno.EADDRINUSE, errors.AddressInUse, None),
    (errno.ENOENT, errors.NotFound, LookupError),
    (errno.EBUSY, errors.Busy, None),
    (errno.EDEADLK, errors.WouldDeadlock, None),
    (errno.EALREADY, errors.AlreadyLockedError, None),
    (errno.EINTR, errors.Interrupted, InterruptedError),
    (errno.ETIMEDOUT, errors.TimedOut, TimeoutError),
    (errno.EOPNOTSUPP, errors.NotSupported, None),
    (errno.ENODEV, errors.NoDevice, None),
    (errno.EPERM, errors.NotPermitted, PermissionError),
    (errno.EACCES, errors.AccessDenied, PermissionError),
    (errno.EFAULT, errors.IommuFault, None),
    (errno.EIO, errors.IOFailure, None),
    (errno.EREMOTEIO, errors.RemoteIO, None),
    (errno.EAGAIN, errors.TryAgain, BlockingIOError),
    (errno.EBADF, errors.BadHandle, None),
]


@pytest.mark.parametrize("code,cls,builtin", CASES)
def test_each_errno_has_its_class(code, cls, builtin):
    for c in (code, -code):
        e = errors.from_errno(c, "what happened")
        assert type(e) is cls
        assert e.errno == code
        assert isinstance(e, errors.DmaBufError) and isinstance(e, OSError)
        if builtin is not None:
            assert isinstance(e, builtin)
        assert str(e) == f"[{errno.errorcode[code]}] what happened"
    assert cls("short form").errno == code
    assert cls().errno == code


def test_unknown_codes_and_restartsys():
    e = errors.from_errno(errno.ENOTTY)
    assert type(e) is errors.DmaBufError and e.errno == errno.ENOTTY
    e = errors.from_errno(-512)
    assert type(e) is errors.Interrupted and e.errno == errno.EINTR


def test_rule_breaks_are_their_own_kind():
    assert not issubclass(errors.LockingError, errors.InvalidArgument)
    assert not issubclass(errors.LifetimeError, ValueError)
    assert issubclass(errors.Revoked, errors.NoDevice)
    assert errors.Revoked("gone").errno == errno.ENODEV


@pytest.mark.parametrize("cls", [c for _, c, _ in CASES] + [errors.LockingError, errors.LifetimeError])
def test_pickle_round_trip(cls):
    e = cls("msg")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and back.errno == e.errno and back.strerror == "msg"


def test_errno_name():
    assert errors.errno_name(22) == "EINVAL"
    assert errors.errno_name(512) == "ERESTARTSYS"
    assert errors.errno_name(99999) == "99999"
