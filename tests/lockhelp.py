"""Helpers shared by the reservation-locking tests: threads that report
their exceptions, and a fixture checking a test leaves the thread clean."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from pydmabuf._core import thread_lock_state

JOIN_TIMEOUT = 60.0


class Worker(threading.Thread):
    """Runs ``fn(*args)``; :meth:`result` joins and re-raises its exception."""

    def __init__(
        self, fn: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.value: Any = None
        self.exc: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args, **self.kwargs)
        except BaseException as e:  # reported by result()
            self.exc = e
        finally:
            state = thread_lock_state()
            if self.exc is None and (state["held"] or state["in_section"]):
                self.exc = AssertionError(f"{self.name} ended with {state}")

    def result(self, timeout: float = JOIN_TIMEOUT) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} did not finish in {timeout} s (deadlock?)")
        if self.exc is not None:
            raise self.exc
        return self.value


def spawn(fn: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
    w = Worker(fn, *args, name=name)
    w.start()
    return w


def bounded(timeout: float = 20.0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a test's body in a worker thread and fail (instead of hanging the
    run) if it has not finished within ``timeout`` seconds: a wrong locking
    decision shows up as a deadlock."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            w = Worker(fn, *args, name=fn.__name__, **kwargs)
            w.start()
            return w.result(timeout)

        return wrapper

    return deco


@pytest.fixture(autouse=True)
def clean_thread() -> Any:
    """Every test must leave the main thread holding no lock and outside
    any signalling section."""
    yield
    state = thread_lock_state()
    assert state["held"] == 0 and not state["in_section"], f"test left {state}"
