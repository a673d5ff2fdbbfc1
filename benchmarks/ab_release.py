"""Issue 17's paths timed against an older build, alternately.

Runs the same small workload against two builds of pydmabuf (two ``src``
directories, each with its compiled core built in place), each in its own
subprocess, alternating, GC off, best of several rounds per process and
best over the processes; prints ns per operation (per page for the bulk
rows) and the ratio old / new per path.  This is how the issue's external
checks measure, e.g. against the release cda97ad::

    git archive cda97ad | tar -x -C /tmp/ref && (cd /tmp/ref && python setup.py build_ext --inplace)
    python benchmarks/ab_release.py --old /tmp/ref/src --new src --procs 7

``--worker`` runs the workload once in this process (the pydmabuf on
``sys.path``) and prints one JSON line; ``bench_fixed_cost.py`` uses it to
put the reference build's figures in ``extra_info``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

PATHS = ("sg1", "iova1", "dmabuf64k", "dmabuf64k_floor", "from_pages16", "bulk_iova", "bulk_sg", "bulk_sg_first",
         "floor", "rlock")


def _best(fn: Callable[[int], None], n: int, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(n)
        out.append((time.perf_counter_ns() - t0) / n)
    return min(out)


def worker(only: set[str], rounds: int) -> dict[str, Any]:
    """Time the paths in ``only`` in this process: ns per op (per page for bulk)."""
    import numpy as np

    import pydmabuf
    from pydmabuf import (DmaDirection, IovaState, Machine, SgTable, _core, checks, dma_map_sgtable, dma_unmap_sgtable,
                          workloads)
    from pydmabuf.exporters import SystemHeap

    try:
        from pydmabuf import _floors as floors  # the floors left the core (issue 13)
    except ImportError:
        floors = _core  # an older build: the floors were compiled into the core
    bidi = DmaDirection.BIDIRECTIONAL
    m = Machine.default()
    dev = m.device("gpu0")
    heap = SystemHeap(m)
    res: dict[str, Any] = {"file": pydmabuf.__file__}

    def run(name: str, fn: Callable[[int], None], n: int, warm: int, per: int = 1, r: int = rounds) -> None:
        if name not in only:
            return
        gc.collect()
        gc.disable()
        try:
            fn(warm)
            res[name] = _best(fn, n, r) / per
        finally:
            gc.enable()

    buf1 = heap.allocate(4096, layout="fragmented", seed=1)
    t1 = SgTable.from_pages(buf1.exporter.pfns)

    def sg1(n: int) -> None:
        for _ in range(n):
            dma_map_sgtable(dev, t1, bidi)
            dma_unmap_sgtable(dev, t1, bidi)

    run("sg1", sg1, 2000, 200)
    phys1 = int(buf1.exporter.pfns[0]) << 12
    rows1 = np.array([[phys1, 4096]], dtype=np.uint64)

    def iova1(n: int) -> None:
        for _ in range(n):
            st = IovaState.try_alloc(dev, phys1, 4096)
            st.link_ranges(rows1, bidi)
            st.sync()
            st.destroy(4096, bidi)

    run("iova1", iova1, 2000, 200)
    buf16 = heap.allocate(16 * 4096, layout="fragmented", seed=1)

    def dmabuf64k(n: int) -> None:
        for _ in range(n):
            a = buf16.attach(dev)
            t = a.map_unlocked(bidi)
            a.unmap_unlocked(t, bidi)
            buf16.detach(a)

    run("dmabuf64k", dmabuf64k, 1000, 100)

    def dmabuf64k_floor(n: int) -> None:
        # What the round trip keeps whatever its glue costs: the exporter's
        # four callbacks (map and unmap build the table and do the 16-page
        # IOMMU work), the four reservation lock pairs (lockdep on) and the
        # two created_at.  Not a target: the bound under dmabuf64k.
        exp = buf16.exporter
        resv = buf16.resv
        for _ in range(n):
            checks.created_at()
            exp.attach(att)
            resv.lock()
            resv.unlock()
            resv.lock()
            t = exp.map_dma_buf(att, bidi)
            checks.created_at()
            resv.unlock()
            resv.lock()
            exp.unmap_dma_buf(att, t, bidi)
            resv.unlock()
            resv.lock()
            resv.unlock()
            exp.detach(att)

    if "dmabuf64k_floor" in only:
        att = buf16.attach(dev)
        try:
            run("dmabuf64k_floor", dmabuf64k_floor, 1000, 100)
        finally:
            buf16.detach(att)
    pfn16 = np.ascontiguousarray(buf16.exporter.pfns)

    def from_pages16(n: int) -> None:
        for _ in range(n):
            SgTable.from_pages(pfn16)

    run("from_pages16", from_pages16, 20000, 1000)
    nb = 1 << 18
    if only & {"bulk_iova", "bulk_sg", "bulk_sg_first", "floor"}:
        r = m.address_map.lookup(1 << 32)
        pfns, _ = workloads.layout("scattered", nb, seed=1, limit_pfn=r.end >> 12)
        pages = np.empty((nb, 2), dtype=np.uint64)
        pages[:, 0] = pfns << np.uint64(12)
        pages[:, 1] = 4096

        def bulk_iova(n: int) -> None:
            for _ in range(n):
                st = IovaState.try_alloc(dev, 0, nb * 4096)
                k = st.link_ranges(pages, bidi)
                st.sync(0, k)
                st.destroy(k, bidi)

        run("bulk_iova", bulk_iova, 1, 1, nb, rounds * 2)
        tb = SgTable.from_pages(pfns)

        def bulk_sg(n: int) -> None:
            for _ in range(n):
                dma_map_sgtable(dev, tb, bidi)
                dma_unmap_sgtable(dev, tb, bidi)

        run("bulk_sg", bulk_sg, 1, 1, nb, rounds * 2)

        def bulk_sg_first(n: int) -> None:
            # A buffer view of the entries first: the map cannot reuse
            # what the table's last map found (its layout pass runs).
            for _ in range(n):
                memoryview(tb).release()
                dma_map_sgtable(dev, tb, bidi)
                dma_unmap_sgtable(dev, tb, bidi)

        run("bulk_sg_first", bulk_sg_first, 1, 1, nb, rounds * 2)
        out = floors.floor_buffer(nb, 8)

        def floor(n: int) -> None:
            for _ in range(n):
                floors.floor_pte(pfns, out)

        run("floor", floor, 1, 1, nb, rounds * 2)
    lk = threading.RLock()

    def rlock(n: int) -> None:
        for _ in range(n):
            lk.acquire()
            lk.release()

    run("rlock", rlock, 100000, 1000)
    return res


def run_worker(src: str, only: set[str], rounds: int) -> dict[str, Any]:
    """One worker process with ``src`` first on its path."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--paths", ",".join(sorted(only)),
                          "--rounds", str(rounds)], env=env, capture_output=True, text=True, check=True).stdout
    d: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if not os.path.abspath(d["file"]).startswith(os.path.abspath(src)):
        raise RuntimeError(f"the worker imported {d['file']}, not the build in {src}")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="src directory of the reference build")
    ap.add_argument("--new", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    ap.add_argument("--procs", type=int, default=5, help="worker processes per side, alternating")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per process")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    only = set(a.paths.split(","))
    if a.worker:
        print(json.dumps(worker(only, a.rounds)))
        return
    if not a.old:
        ap.error("--old is required")
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for _ in range(a.procs):
        runs["old"].append(run_worker(a.old, only, a.rounds))
        runs["new"].append(run_worker(a.new, only, a.rounds))
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"load average {load}; best of {a.procs} processes x {a.rounds} rounds per side, alternating")
    print(f"{'path':16s} {'old ns':>11s} {'new ns':>11s} {'old/new':>8s}  spread old/new (max/min)")
    for p in PATHS:
        if p not in only:
            continue
        o = [d[p] for d in runs["old"]]
        n = [d[p] for d in runs["new"]]
        print(f"{p:16s} {min(o):11.2f} {min(n):11.2f} {min(o) / min(n):7.2f}x  {max(o) / min(o):.2f}/{max(n) / min(n):.2f}")


if __name__ == "__main__":
    main()
