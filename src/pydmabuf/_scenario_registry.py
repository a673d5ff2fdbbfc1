"""The scenario registry: the narration (:class:`Story`), what a run
returns (:class:`Result`) and the table the library registers into.

A leaf of the study: the scenario library (``_scenario_library*.py``)
registers each scenario here with :func:`scenario` when imported, and
:mod:`pydmabuf.scenarios` imports the library and reads :data:`SCENARIOS`;
nothing here imports either, so the registration makes no import cycle.
The public names are re-exported by :mod:`pydmabuf.scenarios`.
"""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO, TypeVar, overload

from pydmabuf import errors

_E = TypeVar("_E", bound=BaseException)

__all__ = ["Scenario", "Story", "Result", "scenario", "SCENARIOS"]


class Story:
    """The narration of one scenario: numbered steps, indented details, and
    the summary facts.  ``out=None`` narrates into :attr:`text` only."""

    def __init__(self, out: TextIO | None = None) -> None:
        if out is not None and not callable(getattr(out, "write", None)):
            raise TypeError(f"out must be a text stream or None, not {type(out).__name__}")
        self._out = out
        self._buf = io.StringIO()
        self.steps = 0
        self.summary: dict[str, Any] = {}

    def _emit(self, line: str) -> None:
        self._buf.write(line + "\n")
        if self._out is not None:
            self._out.write(line + "\n")
            self._out.flush()

    @property
    def text(self) -> str:
        return self._buf.getvalue()

    def title(self, text: str) -> None:
        self._emit(text)
        self._emit("=" * len(text))

    def step(self, text: str) -> None:
        """One thing that happens, numbered."""
        self.steps += 1
        self._emit(f"{self.steps:>3}. {text}")

    def detail(self, text: str) -> None:
        """What came of the last step."""
        self._emit(f"       {text}")

    # Typed so the caller gets the class it expects back (its errno ...).
    @overload
    def refused(self, fn: Callable[..., Any], *args: Any, expect: type[_E], **kw: Any) -> _E: ...
    @overload
    def refused(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> errors.DmaBufError: ...

    def refused(self, fn: Callable[..., Any], *args: Any, expect: type[BaseException] = errors.DmaBufError,
                **kw: Any) -> BaseException:
        """Call ``fn`` expecting it to fail with ``expect``; narrate the
        error and return it.  Anything else is a broken scenario."""
        try:
            fn(*args, **kw)
        except expect as e:
            self.detail(f"-> {type(e).__name__}: {e}")
            return e
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} should have failed with {expect.__name__}")

    def fact(self, key: str, value: Any) -> None:
        """A line of the summary."""
        self.summary[key] = value

    def finish(self) -> None:
        self._emit("")
        self._emit("Summary")
        width = max((len(k) for k in self.summary), default=0)
        for k, v in self.summary.items():
            self._emit(f"  {k + ' ':.<{width + 2}} {v}")


@dataclass
class Scenario:
    name: str
    title: str
    fn: Callable[[Story], None]
    doc: str = ""


@dataclass
class Result:
    """What :func:`run` returns: the narration and the summary facts."""

    name: str
    text: str
    summary: dict[str, Any] = field(default_factory=dict)
    steps: int = 0


#: Registered scenarios, in the order ``--list`` prints them.
SCENARIOS: dict[str, Scenario] = {}


_ScenarioFn = TypeVar("_ScenarioFn", bound=Callable[["Story"], None])


def scenario(name: str, title: str) -> Callable[[_ScenarioFn], _ScenarioFn]:
    """Register ``fn(story)`` as the scenario ``name``."""

    def deco(fn: _ScenarioFn) -> _ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        doc = inspect.cleandoc(fn.__doc__ or "")
        SCENARIOS[name] = Scenario(name, title, fn, doc)
        return fn

    return deco
