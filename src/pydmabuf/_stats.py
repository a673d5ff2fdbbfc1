"""Timing that reproduces: interleaved rounds, medians with confidence
intervals, and the comparison of two runs.

Why these statistics, and why written here rather than taken from SciPy or
pyperf (both optional, neither a dependency of the package):

* **Median with an order-statistic interval.**  Timings of the model are
  skewed (a page fault, a cache refill or a neighbour on the CPU only ever
  adds time), so the median is the location reported and its interval is
  the distribution-free one: for ``n`` samples the ranks ``j < k`` such
  that ``[x(j), x(k)]`` covers the true median with probability at least
  the confidence level, from the Binomial(n, 1/2) distribution of the
  number of samples below the median.  It is exact, deterministic (the
  same samples always give the same interval, unlike a bootstrap) and
  needs twenty lines; ``scipy.stats.binom`` would give the same ranks.
* **Paired ratios.**  Within a run every strategy of a cell group is timed
  once per round, round-robin, so a strategy's sample and the baseline's
  sample of the same round saw the same machine.  A ratio to the baseline
  is the median of the per-round ratios, with the same order-statistic
  interval: drifts slower than a round cancel.
* **Sets of fresh inputs.**  A group can be timed on several sets of the
  same plans, each on allocations of its own, one set a round in turn,
  the samples pooled.  Where one allocation landed (page colouring,
  huge pages or not) is fixed for all the rounds that reuse it, so no
  number of rounds averages it out; in one process, sets interleaved
  round by round differed by 10-15% in a ratio whose per-set intervals
  were 1-2% wide.  Pooled over ``m`` sets, one placement weighs ``1/m``.
* **Two runs compared.**  The two medians are independent; the interval
  of their ratio combines the two order-statistic intervals on a log scale
  (each half-width read as 1.96 standard errors, the errors added in
  quadrature).  That is the usual delta-method interval of a ratio of
  independent estimates; it costs nothing per cell, where a bootstrap of
  several hundred cells of thousands of samples would take seconds.  A
  difference is called significant when that interval excludes 1 *and*
  the ratio is at least ``min_effect`` away from 1, so that a tight but
  negligible shift is not reported.

pyperf is not used for the loop itself: it runs each benchmark in worker
processes, one benchmark at a time, which cannot interleave the
strategies of one cell within a round (the point of the design) and would
rebuild the model machine in every worker.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["Z95", "median_ci", "paired_ratio_ci", "ratio_of_medians_ci", "rel_half_width", "interleave",
           "Plan", "agreement", "clock_overhead", "coverage", "significant", "unit_costs"]

#: The two-sided 95% normal quantile.
Z95 = 1.959963984540054

#: A step and its undo: ``step()`` returns a handle, ``undo(handle)`` undoes it.
Plan = tuple[Callable[[], Any], Callable[[Any], Any]]


_RANKS: dict[tuple[int, float], tuple[int, int, float]] = {}


def _ranks(n: int, confidence: float) -> tuple[int, int, float]:
    """:func:`_ranks_of`, remembered (a study asks for the same few
    ``(n, confidence)`` thousands of times)."""
    r = _RANKS.get((n, confidence))
    if r is None:
        if len(_RANKS) >= 4096:
            _RANKS.clear()
        r = _RANKS[(n, confidence)] = _ranks_of(n, confidence)
    return r


def _ranks_of(n: int, confidence: float) -> tuple[int, int, float]:
    """0-based ranks ``(j, k)`` of the order-statistic interval of the
    median of ``n`` samples, and its exact coverage.

    ``x(j)`` (sorted samples, 0-based) lies above the median when at most
    ``j`` samples lie below it, with probability ``P(B <= j)`` for
    ``B ~ Binomial(n, 1/2)``; by symmetry the same for ``x(n - 1 - j)``
    below it.  The largest ``j`` with ``2 P(B <= j) <= 1 - confidence`` is
    taken.  Below six samples no interval reaches 95%: the whole range is
    returned (``j = 0``) with the coverage it has.
    """
    alpha = 1.0 - confidence
    # P(B = i), in log space so that large n does not underflow
    logp = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)
            for i in range(n // 2 + 1)]
    j = 0
    cdf = 0.0
    for i in range((n - 1) // 2 + 1):
        cdf += math.exp(logp[i])  # P(B <= i)
        if 2.0 * cdf > alpha:
            break
        j = i
    below = sum(math.exp(lp) for lp in logp[: j + 1])  # P(B <= j)
    return j, n - 1 - j, 1.0 - 2.0 * below


def median_ci(samples: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of ``samples`` and its order-statistic confidence interval.

    Parameters
    ----------
    samples : sequence of float
        At least one sample.
    confidence : float
        The level of the interval, in (0, 1).

    Returns
    -------
    tuple of float
        ``(median, low, high)``.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    if n == 0:
        raise ValueError("median_ci needs at least one sample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    j, k, _ = _ranks(n, confidence)
    return float(np.median(x)), float(x[j]), float(x[k])


def coverage(n: int, confidence: float = 0.95) -> float:
    """The exact coverage of :func:`median_ci` for ``n`` samples (below
    ``confidence`` only when ``n`` is too small for any interval to reach it)."""
    return _ranks(n, confidence)[2]


def paired_ratio_ci(num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray,
                    confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of the per-round ratios ``num[i] / den[i]`` and its
    order-statistic interval.  Rounds where ``den`` is not positive are
    left out; ``(nan, nan, nan)`` when none is left."""
    a = np.asarray(num, dtype=np.float64)
    b = np.asarray(den, dtype=np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = b > 0
    if not ok.any():
        return math.nan, math.nan, math.nan
    return median_ci(a[ok] / b[ok], confidence)


def rel_half_width(est: tuple[float, float, float]) -> float:
    """Half the width of an interval ``(value, low, high)`` over the value
    (inf for a value that is not positive)."""
    v, lo, hi = est
    if not v > 0 or math.isnan(lo) or math.isnan(hi):
        return math.inf
    return (hi - lo) / 2.0 / v


def ratio_of_medians_ci(new: tuple[float, float, float], old: tuple[float, float, float]
                        ) -> tuple[float, float, float]:
    """``new / old`` of two independent estimates ``(median, low, high)``
    (both at the 95% level), with its approximate 95% interval: the
    log-scale half-widths of the two intervals read as 1.96 standard
    errors each and added in quadrature.  ``(nan, nan, nan)`` when a value
    is not positive."""
    (m1, l1, h1), (m0, l0, h0) = new, old
    if not (m1 > 0 and m0 > 0 and l1 > 0 and l0 > 0):
        return math.nan, math.nan, math.nan
    se1 = (math.log(h1) - math.log(l1)) / (2.0 * Z95)
    se0 = (math.log(h0) - math.log(l0)) / (2.0 * Z95)
    r = m1 / m0
    half = Z95 * math.hypot(se1, se0)
    return r, r * math.exp(-half), r * math.exp(half)


def significant(ratio: tuple[float, float, float], min_effect: float = 0.02) -> bool:
    """True when the interval of ``ratio`` excludes 1 and the ratio is at
    least ``min_effect`` (relative) away from 1."""
    r, lo, hi = ratio
    if math.isnan(r):
        return False
    return (lo > 1.0 or hi < 1.0) and abs(r - 1.0) >= min_effect


def agreement(pairs: Sequence[tuple[float, float]], tol: float = 0.10) -> tuple[int, int]:
    """How many ``(old, new)`` pairs agree within ``+-tol`` (``|new/old - 1|
    <= tol``), and how many pairs could be compared (both positive)."""
    ok = n = 0
    for old, new in pairs:
        if old > 0 and new > 0 and math.isfinite(old) and math.isfinite(new):
            n += 1
            ok += abs(new / old - 1.0) <= tol
    return ok, n


def interleave(plans: Mapping[str, Plan] | Sequence[Mapping[str, Plan]], *, baseline: str | None = None,
               min_rounds: int = 5,
               max_rounds: int = 1000, budget_s: float = 1.0, target: float = 0.02, warmup: int = 1,
               cap_s: float | None = None,
               confidence: float = 0.95, clock: Callable[[], int] = time.thread_time_ns,
               overhead_ns: int | None = None) -> tuple[dict[str, tuple[list[int], list[int]]], dict[str, Any]]:
    """Time every plan once per round, round-robin, until the estimates are
    tight or the budget is spent.

    Each round runs every plan's step and undo once, starting the round at
    a different plan each time (round ``r`` starts at plan ``r mod k``) so
    that no plan always follows the same neighbour.

    ``plans`` may also be a sequence of ``m`` sets of the same plans, each
    on inputs and state of its own (fresh allocations: another model
    machine, other copies of the arrays): round ``r`` then runs set
    ``r mod m``, starting at plan ``(r div m) mod k`` (so every set meets
    every order), and each plan's samples pool the rounds of every set.  A
    cost that depends on where one allocation landed (page colouring,
    transparent huge pages, cache conflicts) then weighs ``1/m`` in the
    pooled median instead of moving it whole, and a ratio stays paired
    within a round (the plan and the baseline ran on the same set).  The
    warm-up then runs at least one round of every set, and the rounds stop
    (tight, budget, cap) only after a whole turn of the sets, so that every
    set gives as many rounds.

    After the warm-up rounds go on until, at a check, every plan's median
    (step + undo) and every plan's paired ratio to ``baseline`` have an
    interval of relative half-width at most ``target``; or ``budget_s``
    seconds of timed rounds have passed; or ``max_rounds`` rounds were run.
    At least ``min_rounds`` rounds run, unless a round is so long that
    ``cap_s`` seconds pass first (then at least 5).  The garbage collector is
    collected before and disabled during the rounds, so that a collection
    triggered by one plan is not charged to another (the young
    generations are collected first).

    Parameters
    ----------
    plans : mapping of str to (step, undo), or a sequence of such mappings
        ``step()`` returns a handle that ``undo(handle)`` releases.  Both
        are timed separately; the handle is dropped inside the undo's time.
        A sequence: sets of the same plans (same names) on fresh inputs,
        taken in turn, one set a round.
    baseline : str, optional
        The plan the others are compared with (a key of ``plans``).
    min_rounds, max_rounds : int
        Bounds on the timed rounds.
    budget_s : float
        Seconds of timed rounds after which no new round starts (once
        ``min_rounds`` ran).
    target : float
        The relative half-width every interval must reach to stop early.
    warmup : int
        Untimed rounds first (page faults, caches, allocator pools); at
        least one per set.
    cap_s : float, optional
        Seconds of timed rounds after which no new round starts even below
        ``min_rounds`` (once 5 ran): keeps groups of very long calls, on a
        loaded machine, within a run's time.
    confidence : float
        The level of the intervals of the stopping rule.
    clock : callable
        Returns nanoseconds.  The default is this thread's CPU time
        (``CLOCK_THREAD_CPUTIME_ID``): what the model's code costs, without
        the time the thread spent preempted by other processes, which on a
        shared machine adds whole scheduler slices (milliseconds) to a
        fraction of the samples and makes medians jump between modes.  Its
        own cost (a few hundred ns a read) is measured first and taken off
        every sample (:func:`clock_overhead`).
    overhead_ns : int, optional
        The clock's own cost to take off each sample; measured when None.

    Returns
    -------
    samples : dict
        Per plan, ``(step_ns, undo_ns)``: one entry per timed round.
    info : dict
        ``rounds``, ``seconds`` (wall time of the timed rounds), ``stopped``
        (``"tight"``, ``"budget"``, ``"cap"`` or ``"max_rounds"``),
        ``clock_overhead_ns`` and ``sets`` (how many sets of the plans).
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds (got {min_rounds}, {max_rounds})")
    sets: list[Mapping[str, Plan]] = [plans] if isinstance(plans, Mapping) else list(plans)
    if not sets:
        raise ValueError("interleave needs at least one set of plans")
    names = list(sets[0])
    for other in sets[1:]:
        if list(other) != names:
            raise ValueError(f"every set of plans must name the same plans in the same order ({names}, not "
                             f"{list(other)})")
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the plans")
    m = len(sets)
    k = len(names)
    steps: dict[str, list[int]] = {n: [] for n in names}
    undos: dict[str, list[int]] = {n: [] for n in names}
    overhead = clock_overhead(clock) if overhead_ns is None else overhead_ns
    was_enabled = gc.isenabled()
    gc.collect(1)  # the young generations: a full collection of the model costs ~20 ms a group
    gc.disable()
    try:
        for r in range(max(warmup, m) if warmup else 0):
            for i in range(k):
                step, undo = sets[r % m][names[(r // m + i) % k]]
                undo(step())
        start = time.perf_counter()
        rounds = 0
        next_check = min_rounds
        stopped = "max_rounds"
        while rounds < max_rounds:
            plan_set = sets[rounds % m]
            for i in range(k):
                name = names[(rounds // m + i) % k]
                step, undo = plan_set[name]
                t0 = clock()
                h = step()
                t1 = clock()
                undo(h)
                h = None
                t2 = clock()
                steps[name].append(max(t1 - t0 - overhead, 0))
                undos[name].append(max(t2 - t1 - overhead, 0))
            rounds += 1
            if rounds % m:
                continue  # a whole turn of the sets first: each set gives as many rounds
            if rounds < min_rounds:
                if cap_s is not None and rounds >= min(5, min_rounds) and time.perf_counter() - start >= cap_s:
                    stopped = "cap"
                    break
                continue
            if time.perf_counter() - start >= budget_s:
                stopped = "budget"
                break
            if rounds >= next_check:
                next_check = rounds + max(2, rounds // 4)
                if _tight(steps, undos, baseline, target, confidence):
                    stopped = "tight"
                    break
        seconds = time.perf_counter() - start
    finally:
        if was_enabled:
            gc.enable()
    return {n: (steps[n], undos[n]) for n in names}, {"rounds": rounds, "seconds": seconds, "stopped": stopped,
                                                     "clock_overhead_ns": overhead, "sets": m}


def clock_overhead(clock: Callable[[], int] = time.thread_time_ns, reads: int = 201) -> int:
    """The median difference of two back-to-back reads of ``clock`` (ns):
    what one timed interval carries on top of the code it times."""
    d = []
    for _ in range(reads):
        a = clock()
        b = clock()
        d.append(b - a)
    return int(np.median(d))


def _tight(steps: Mapping[str, list[int]], undos: Mapping[str, list[int]], baseline: str | None, target: float,
           confidence: float) -> bool:
    """Whether every median and every paired ratio to the baseline has an
    interval of relative half-width at most ``target``."""
    totals = {n: np.add(steps[n], undos[n], dtype=np.float64) for n in steps}
    if coverage(len(next(iter(totals.values()))), confidence) < confidence:
        return False
    for n, t in totals.items():
        if rel_half_width(median_ci(t, confidence)) > target:
            return False
        if baseline is not None and n != baseline:
            if rel_half_width(paired_ratio_ci(t, totals[baseline], confidence)) > target:
                return False
    return True


def unit_costs(loops: Mapping[str, tuple[Callable[[], Any], int]], *, min_rounds: int = 15, max_rounds: int = 1000,
               budget_s: float = 0.5, target: float = 0.01, warmup: int = 2,
               confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """The cost of one operation of each loop, in ns, with its interval.

    For calibrating a cost model: each loop (a C loop doing ``n``
    operations per call, say) is timed in the same interleaved rounds as
    the others (:func:`interleave`, on this thread's CPU time), and its
    median per call is divided by its ``n``.

    Parameters
    ----------
    loops : mapping of str to (callable, int)
        Per name, a call that does ``n`` operations, and ``n`` (> 0).
    min_rounds, max_rounds, budget_s, target, warmup, confidence
        As for :func:`interleave`.

    Returns
    -------
    dict
        Per name, ``(ns_per_op, low, high)``: the median and its interval.
    """
    for name, (_, n) in loops.items():
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"unit_costs: {name!r} must do a positive whole number of operations, not {n!r}")

    def drop(handle: Any) -> None:
        pass

    plans = {name: (fn, drop) for name, (fn, _) in loops.items()}
    samples, _ = interleave(plans, min_rounds=min_rounds, max_rounds=max_rounds, budget_s=budget_s, target=target,
                            warmup=warmup, confidence=confidence)
    out = {}
    for name, (steps, undos) in samples.items():
        n = loops[name][1]
        med, lo, hi = median_ci(np.add(steps, undos, dtype=np.float64), confidence)
        out[name] = (med / n, lo / n, hi / n)
    return out
