"""Runnable scenarios: the driver pairs of the seed thread, step by step.

Each scenario builds the default machine (:meth:`Machine.default`), drives
real exporters and importers through the public API, narrates what
happens and ends with a short summary of facts.  Run one with
``pydmabuf scenario NAME``, list them with ``pydmabuf scenario --list``, or
from Python::

    >>> from pydmabuf import scenarios
    >>> result = scenarios.run("stale-importer", out=None)
    >>> result.summary["stale DMA caught"]
    1

The scenarios are examples as much as tests: read their source next to the
narration.  Every one leaves nothing live behind (no attachment, mapping,
pin, IOVA or page-table entry) and checks that itself before it returns.
"""

from __future__ import annotations

import inspect
import io
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO, TypeVar, overload

from pydmabuf import errors

_E = TypeVar("_E", bound=BaseException)

__all__ = ["Scenario", "Story", "Result", "scenario", "names", "get", "run", "markdown", "SCENARIOS"]


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


def _load() -> None:
    from pydmabuf import _scenario_library  # noqa: F401  (registers on import)


def names() -> list[str]:
    _load()
    return list(SCENARIOS)


def get(name: str) -> Scenario:
    _load()
    try:
        return SCENARIOS[name]
    except KeyError:
        raise errors.NotFound(f"no scenario {name!r} (known: {', '.join(SCENARIOS)})") from None


def run(name: str, out: TextIO | None = sys.stdout) -> Result:
    """Run one scenario, narrating to ``out`` (None: keep the text only)."""
    sc = get(name)
    story = Story(out)
    story.title(f"{sc.name}: {sc.title}")
    sc.fn(story)
    story.finish()
    return Result(sc.name, story.text, dict(story.summary), story.steps)


def markdown() -> str:
    """Every scenario as a Markdown document: what it shows, the command
    that runs it, and its narration (``docs/scenarios.md`` is this)."""
    out = ["# Scenarios", "",
           "The driver pairs of the seed thread, run on the default machine model and narrated step by step.",
           "Each is also a test (`tests/test_scenarios.py`); the source is `src/pydmabuf/_scenario_library.py`.",
           "Regenerate this file with `python -m pydmabuf.scenarios > docs/scenarios.md`.", ""]
    for name in names():
        sc = get(name)
        out += [f"## {sc.name}", "", sc.doc, "", f"    pydmabuf scenario {sc.name}", "", "```"]
        out += run(name, out=None).text.rstrip("\n").splitlines()
        out += ["```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    import logging

    from pydmabuf import scenarios as _registry  # the module the library registers in, not __main__

    logging.getLogger("pydmabuf.checks").setLevel(logging.ERROR)
    sys.stdout.write(_registry.markdown())
