"""The benchmark suites stay runnable: ``pytest benchmarks`` finds every
``bench_*.py`` and each benchmark runs once as a plain test under
``--benchmark-disable`` (no timing, so nothing here depends on speed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydmabuf

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    # The benchmarks import the same pydmabuf as these tests (installed, or
    # PYTHONPATH=src during development, which a relative path would lose).
    pkg_root = str(Path(pydmabuf.__file__).resolve().parents[1])
    path = os.pathsep.join([pkg_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(ROOT / "benchmarks")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_every_benchmark_runs_once():
    suites = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert len(suites) >= 8
    listed = _pytest("--collect-only", "-q")
    assert listed.returncode == 0, listed.stdout[-4000:] + listed.stderr[-2000:]
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    for name in suites:  # `pytest benchmarks` collects every suite
        assert any(f"benchmarks/{name}::" in i for i in ids), f"{name} not collected"
    r = _pytest("-q", "--benchmark-disable")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped)", r.stdout.strip().splitlines()[-1])}
    assert counts.get("passed", 0) + counts.get("skipped", 0) == len(ids), r.stdout[-2000:]
    assert counts.get("skipped", 0) <= 2  # only the 1-bvec NVMe cases, which have no seam to measure
