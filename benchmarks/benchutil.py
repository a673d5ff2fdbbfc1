"""Shared by the benchmark suites: timing one step with set-up and
tear-down outside the measurement."""

from __future__ import annotations

import math
from typing import Any, Callable


def min_ns(benchmark: Any, per: int = 1, stat: str = "min") -> float:
    """The benchmark's ``stat`` time in ns, divided by ``per`` (pages,
    operations); NaN under ``--benchmark-disable``, where each benchmark
    runs once as a plain test and pytest-benchmark keeps no statistics."""
    if benchmark.stats is None:
        return math.nan
    return float(getattr(benchmark.stats.stats, stat)) * 1e9 / per


def pedantic(benchmark: Any, setup: Callable[[], tuple[Any, ...]], fn: Callable[..., Any],
             teardown: Callable[[Any], Any], rounds: int = 5) -> None:
    """Time ``fn(*setup())`` only; ``teardown(result)`` runs between rounds
    (and after the last), outside the timing."""
    state: dict[str, Any] = {}

    def _setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "last" in state:
            teardown(state.pop("last"))
        return setup(), {}

    def _fn(*args: Any) -> Any:
        state["last"] = fn(*args)
        return state["last"]

    benchmark.pedantic(_fn, setup=_setup, rounds=rounds, iterations=1, warmup_rounds=1)
    if "last" in state:
        teardown(state.pop("last"))
