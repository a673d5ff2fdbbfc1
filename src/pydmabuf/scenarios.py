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

import logging
import sys
from typing import TextIO

from pydmabuf import errors

# The library registers its scenarios into the registry when imported (in
# this order: the order ``--list`` prints); it imports the registry, never
# this module, so there is no cycle.
from pydmabuf import _scenario_library, _scenario_library_memory  # noqa: F401
from pydmabuf._scenario_registry import SCENARIOS, Result, Scenario, Story, scenario

__all__ = ["Scenario", "Story", "Result", "scenario", "names", "get", "run", "markdown", "SCENARIOS"]


def names() -> list[str]:
    return list(SCENARIOS)


def get(name: str) -> Scenario:
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
           "Each is also a test (`tests/test_scenarios.py`); the source is `src/pydmabuf/_scenario_library.py` "
           "and `src/pydmabuf/_scenario_library_memory.py`.",
           "Regenerate this file with `python -m pydmabuf.scenarios > docs/scenarios.md`.", ""]
    for name in names():
        sc = get(name)
        out += [f"## {sc.name}", "", sc.doc, "", f"    pydmabuf scenario {sc.name}", "", "```"]
        out += run(name, out=None).text.rstrip("\n").splitlines()
        out += ["```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    logging.getLogger("pydmabuf.checks").setLevel(logging.ERROR)
    sys.stdout.write(markdown())
