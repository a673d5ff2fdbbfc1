"""Thread stress over the dma-buf lifecycle.

Importer threads share a few movable buffers: they attach, map under the
reservation lock, DMA their own counter into their own slot of the buffer,
sometimes unmap, detach and re-attach, and lock two buffers at once through
the wound/wait back-off loop.  A mover migrates buffers under their lock
(the obedient importers drop their mappings in the callback), a static
importer pins buffers now and then (so some moves are refused), jobs leave
fences that a signaller thread completes (so old pages are freed late), and
a revoker revokes and restores one buffer.  That buffer also has a buggy
importer whose invalidation callback raises (and drops nothing: a thread of
its own unmaps later what was invalidated, then maps again).  Bounded in
time (``PYDMABUF_STRESS_SECONDS``, default 3).

Checked: every thread finishes (no deadlock), every slot holds the last
value its thread wrote, whatever moves happened (no lost update), no DMA
ever goes through a stale mapping (the checker is strict), every revoke,
un-revoke and move of the buffer with the raising importer reaches every
other importer and reports the raising one (LifetimeError naming it, its
exception as the cause, the buffer revoked / restored / moved all the same),
and after teardown nothing is left mapped, pinned or allocated.
"""

from __future__ import annotations

import os
import random
import threading
import time

from pydmabuf import DmaDirection, Fence, Machine, Usage, checks, errors, fence_context_alloc, locked
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.exporters import SystemHeap

BIDI = DmaDirection.BIDIRECTIONAL
SECONDS = float(os.environ.get("PYDMABUF_STRESS_SECONDS", "3"))
NBUF = 3
WORKERS = [("gpu0", 0), ("nic0", 1), ("direct0", 2), ("gpu1", 3)]

#: Operation counts of the last run, for the record.
last_counts: dict[str, int] = {}


class Obedient(ImporterOps):
    """Drops its mapping when told (the callback runs under the lock)."""

    allow_peer2peer = True

    def __init__(self) -> None:
        self.table = None
        self.attachment = None

    def invalidate_mappings(self, attachment):
        if self.table is not None:
            attachment.unmap(self.table, BIDI)
            self.table = None


class Raising(ImporterOps):
    """A buggy importer: its callback notes the call and raises, dropping
    nothing; its own thread unmaps what was invalidated afterwards."""

    allow_peer2peer = True

    def __init__(self) -> None:
        self.table = None
        self.attachment = None
        self.told = 0

    def invalidate_mappings(self, attachment):
        self.told += 1
        raise RuntimeError("importer bug")


def _reported(e: BaseException) -> bool:
    """The checker's report of the raising importer, nothing else."""
    return (isinstance(e, errors.LifetimeError) and getattr(e, "report", None) is not None
            and e.report.rule == "invalidate-callback-raised" and "Raising" in e.report.culprit
            and isinstance(e.__cause__, RuntimeError))


def _dma_addr(table, off):
    """The DMA address of byte ``off`` of a mapped table."""
    for addr, n in table.dma_ranges().tolist():
        if off < n:
            return addr + off
        off -= n
    raise AssertionError("offset beyond the mapping")


def _live(m):
    out = {"pages": m.pages.allocated_pages}
    for name in {w for w, _ in WORKERS}:
        d = m.device(name).domain
        if d is not None:
            d.flush()
            s = d.stats
            out[name] = (s["iova_live_ranges"], s["mapped_nbytes"])
    return out


def test_threads_share_buffers_through_moves_pins_fences_and_revoke():
    m = Machine.default()
    before = _live(m)
    heap = SystemHeap(m)
    bufs = [heap.allocate(16 * 4096, layout="fragmented", seed=i, movable=True, name=f"shared{i}")
            for i in range(NBUF)]
    deadline = time.monotonic() + SECONDS
    counts = {k: 0 for k in ("jobs", "dma_writes", "verifies", "unmaps", "reattach", "pair_locks",
                             "moves", "moves_refused", "pins", "fences", "revokes", "maps_refused",
                             "revokes_reported", "unrevokes_reported", "moves_reported", "raiser_maps",
                             "raiser_unmaps")}
    clock = threading.Lock()
    failures: list[BaseException] = []
    pending_fences: list[Fence] = []
    fctx = fence_context_alloc()
    seq = [0]
    final: dict[int, tuple[list[int], list[bool]]] = {}

    def count(k, n=1):
        with clock:
            counts[k] += n

    def job(buf, ops, dev, slot, value):
        """Under buf's lock: map if needed, DMA the value, maybe leave a fence."""
        if ops.table is None:
            try:
                ops.table = ops.attachment.map(BIDI)
            except errors.NoDevice:  # revoked
                count("maps_refused")
                return False
        dev.dma_write(_dma_addr(ops.table, slot * 8), value.to_bytes(8, "little"))
        count("dma_writes")
        if random.random() < 0.2:
            with clock:
                seq[0] += 1
                f = Fence(fctx, seq[0])
                pending_fences.append(f)
            buf.resv.reserve_fences(1)
            buf.resv.add_fence(f, Usage.BOOKKEEP)
            count("fences")
        return True

    def worker(devname, slot, seed):
        rng = random.Random(seed)
        dev = m.device(devname)
        ops = [Obedient() for _ in bufs]
        last = [0] * NBUF
        written = [False] * NBUF
        for i, b in enumerate(bufs):
            ops[i].attachment = b.dynamic_attach(dev, ops[i])
        try:
            while time.monotonic() < deadline:
                r = rng.random()
                i = rng.randrange(NBUF)
                b = bufs[i]
                if r < 0.55:
                    with b.resv:
                        if job(b, ops[i], dev, slot, last[i] + 1):
                            last[i] += 1
                            written[i] = True
                        if rng.random() < 0.3 and ops[i].table is not None:
                            ops[i].attachment.unmap(ops[i].table, BIDI)
                            ops[i].table = None
                            count("unmaps")
                    count("jobs")
                elif r < 0.7:
                    j = (i + 1) % NBUF
                    with locked([b.resv, bufs[j].resv]):
                        for k in (i, j):
                            if job(bufs[k], ops[k], dev, slot, last[k] + 1):
                                last[k] += 1
                                written[k] = True
                    count("pair_locks")
                elif r < 0.8:
                    with b.resv:
                        if ops[i].table is not None:
                            ops[i].attachment.unmap(ops[i].table, BIDI)
                            ops[i].table = None
                    b.detach(ops[i].attachment)
                    ops[i].attachment = b.dynamic_attach(dev, ops[i])
                    count("reattach")
                else:
                    try:
                        got = int.from_bytes(b.mmap().read(slot * 8, 8), "little")
                    except errors.IOFailure:  # revoked: the CPU mapping faults (SIGBUS)
                        assert b.revoked
                        count("maps_refused")
                        continue
                    if written[i]:
                        assert got == last[i], (devname, i, got, last[i])
                    count("verifies")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)
        finally:
            for i, b in enumerate(bufs):
                with b.resv:
                    if ops[i].table is not None:
                        ops[i].attachment.unmap(ops[i].table, BIDI)
                        ops[i].table = None
                b.detach(ops[i].attachment)
            final[slot] = (last, written)

    def mover(seed):
        rng = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                b = bufs[rng.randrange(NBUF)]
                with b.resv:
                    try:
                        b.move()
                        count("moves")
                    except errors.Busy:
                        count("moves_refused")
                    except errors.LifetimeError as e:
                        if not (b is bufs[0] and _reported(e)):
                            raise
                        count("moves")  # moved all the same, then reported
                        count("moves_reported")
                time.sleep(0.001)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    def pinner(seed):
        rng = random.Random(seed)
        dev = m.device("gpu0")
        try:
            while time.monotonic() < deadline:
                b = bufs[rng.randrange(NBUF)]
                a = b.attach(dev)  # static: every map pins the movable buffer
                try:
                    t = a.map_unlocked(BIDI)
                    time.sleep(0.002)
                    a.unmap_unlocked(t, BIDI)
                    count("pins")
                except errors.NoDevice:
                    count("maps_refused")
                b.detach(a)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    def signaller():
        try:
            while time.monotonic() < deadline + 0.5:
                with clock:
                    todo, pending_fences[:] = pending_fences[:], []
                for f in todo:
                    f.signal()
                time.sleep(0.001)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    def revoker():
        b = bufs[0]
        try:
            while time.monotonic() < deadline - 0.2:
                time.sleep(0.05)
                try:
                    b.revoke(timeout=10)
                except errors.LifetimeError as e:
                    if not _reported(e):
                        raise
                    count("revokes_reported")
                count("revokes")
                # Revoked, and every importer but the raising one was told
                # and dropped its mapping in its callback: whatever is
                # still mapped is invalidated (DMA through it is caught).
                assert b.revoked
                with b.resv:
                    assert all(mp.stale for mp in b._mappings)
                    assert not [a for a in b.attachments if isinstance(a.importer_ops, Obedient)
                                and a.live_mappings]
                b.wait_unmapped(10)  # the raising importer's thread unmaps late
                time.sleep(0.01)
                try:
                    b.unrevoke()  # takes the lock itself, as VFIO's decode-on path does
                except errors.LifetimeError as e:
                    if not _reported(e):
                        raise
                    count("unrevokes_reported")
                assert not b.revoked
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    def raiser():
        """The raising importer's own thread: unmaps what its callback was
        told about (late, as a buggy driver might), maps again."""
        b = bufs[0]
        ops = raising
        try:
            while time.monotonic() < deadline:
                with b.resv:
                    if ops.told and ops.table is not None:
                        ops.attachment.unmap(ops.table, BIDI)
                        ops.table = None
                        count("raiser_unmaps")
                    ops.told = 0
                    if ops.table is None and not b.revoked:
                        ops.table = ops.attachment.map(BIDI)
                        count("raiser_maps")
                time.sleep(0.002)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
        finally:
            with b.resv:
                if ops.table is not None:
                    ops.attachment.unmap(ops.table, BIDI)
                    ops.table = None
            b.detach(ops.attachment)

    raising = Raising()
    raising.attachment = bufs[0].dynamic_attach(m.device("nvme0"), raising)
    threads = [threading.Thread(target=worker, args=(d, s, 100 + s), name=f"worker-{d}") for d, s in WORKERS]
    threads += [threading.Thread(target=mover, args=(7,), name="mover"),
                threading.Thread(target=pinner, args=(8,), name="pinner"),
                threading.Thread(target=signaller, name="signaller"),
                threading.Thread(target=revoker, name="revoker"),
                threading.Thread(target=raiser, name="raiser")]
    assert checks.mode() == "strict"
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 30)
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, f"threads did not finish (deadlock?): {stuck}"
        if failures:
            raise failures[0]
        # No lost update: every slot holds the last value its thread wrote.
        for slot, (last, written) in final.items():
            for i, b in enumerate(bufs):
                if written[i]:
                    got = int.from_bytes(b.mmap().read(slot * 8, 8), "little")
                    assert got == last[i], (slot, b.name, got, last[i])
    finally:
        for f in pending_fences:
            f.signal()
        for b in bufs:
            if not b.released:
                b.put()
    for b in bufs:
        assert not b.attachments and b.live_mappings == 0
    assert _live(m) == before
    assert counts["jobs"] > 0 and counts["moves"] > 0 and counts["dma_writes"] > 0
    # The raising importer was attached throughout: every revoke and
    # un-revoke of its buffer reported it, after telling everyone.
    assert counts["revokes"] > 0 and counts["revokes_reported"] == counts["revokes"]
    assert counts["unrevokes_reported"] == counts["revokes"] and counts["raiser_maps"] > 0
    last_counts.clear()
    last_counts.update(counts)
    print("stress:", counts)
