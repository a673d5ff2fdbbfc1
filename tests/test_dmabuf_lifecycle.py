"""A Hypothesis state machine over the whole dma-buf lifecycle:
export / attach / map / pin / unpin / invalidate / move / revoke / unmap /
detach / put, CPU mmap / write / read / munmap and vmap / vunmap, with
obedient importers and buggy ones whose invalidation callback raises,
checking after every step that nothing leaks, that pin counts are what the
maps and explicit pins say (static attachments cannot pin or unpin by
hand), that every importer was told of every invalidation even past a
raising one, that every live, current mapping translates to the buffer's
current pages, and that every CPU mapping reads what was written through
the buffer's mappings (a mapping outliving its buffer's last put, or a
vmap across a move, would read another buffer's pages)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from pydmabuf import DmaDirection, Machine, errors
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.exporters import SystemHeap

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL
DEVICES = ["gpu0", "direct0", "gpu1", "nic0"]


class Obedient(ImporterOps):
    """Drops its mappings as soon as it is told (unmap under the lock the
    exporter holds)."""

    allow_peer2peer = True

    def __init__(self, machine):
        self.machine = machine
        self.maps = []  # (attachment, table)

    def invalidate_mappings(self, attachment):
        keep = []
        for a, t in self.maps:
            if a is attachment:
                a.unmap(t, BIDI)
            else:
                keep.append((a, t))
        self.maps = keep


class Raising(Obedient):
    """A buggy importer: its callback raises and drops nothing (its
    mappings go stale; it unmaps them later, in unmap_one or teardown)."""

    def invalidate_mappings(self, attachment):
        raise RuntimeError("importer bug")


class Lifecycle(RuleBasedStateMachine):
    buffers = Bundle("buffers")
    attachments = Bundle("attachments")

    def __init__(self):
        super().__init__()
        self.m = Machine.from_spec(_spec())
        self.heap = SystemHeap(self.m)
        self.live_bufs = []  # (buf, refs)
        self.statics = {}  # attachment -> [tables]
        self.importers = {}  # attachment -> Obedient or Raising
        self.pins = {}  # dynamic attachment -> explicit pins
        self.cpu = {}  # buf -> [CpuMapping] (mmaps, each holding a reference)
        self.vmaps = {}  # buf -> live vmap count
        self.written = {}  # buf -> {offset: byte} written through a CPU mapping
        self.put_by_user = set()  # bufs whose user reference went while mmapped

    # ---------------------------------------------------------- buffers
    @initialize(target=buffers)
    def first(self):
        return self.export(8, "fragmented", True, 1)

    @rule(target=buffers, npages=st.integers(1, 40), layout=st.sampled_from(["contiguous", "fragmented", "scattered"]),
          movable=st.booleans(), seed=st.integers(0, 1000))
    def export(self, npages, layout, movable, seed):
        b = self.heap.allocate(npages * G, layout=layout, movable=movable, seed=seed)
        self.live_bufs.append(b)
        return b

    @rule(b=buffers)
    def get_put(self, b):
        if b.released or b in self.put_by_user:
            return
        b.get()
        b.put()

    # ------------------------------------------------------ attachments
    @rule(target=attachments, b=buffers, dev=st.sampled_from(DEVICES),
          kind=st.sampled_from(["static", "obedient", "obedient", "raising"]))
    def attach(self, b, dev, kind):
        if b.released or b in self.put_by_user:
            return None
        d = self.m.device(dev)
        if kind != "static":
            imp = Obedient(self.m) if kind == "obedient" else Raising(self.m)
            a = b.dynamic_attach(d, imp)
            self.importers[a] = imp
            self.pins[a] = 0
        else:
            a = b.attach(d)
            self.statics[a] = []
        return a

    @rule(a=attachments)
    def map(self, a):
        if a is None or a.detached or a.dmabuf.released:
            return
        b = a.dmabuf
        if b.revoked:
            with pytest.raises(errors.Revoked):
                a.map_unlocked(BIDI)
            return
        t = a.map_unlocked(BIDI)
        if a.dynamic:
            self.importers[a].maps.append((a, t))
        else:
            self.statics[a].append(t)

    @rule(a=attachments)
    def unmap_one(self, a):
        if a is None or a.detached:
            return
        b = a.dmabuf
        b.resv.lock()
        try:
            if a.dynamic:
                imp = self.importers[a]
                mine = [(x, t) for x, t in imp.maps if x is a]
                if mine:
                    imp.maps.remove(mine[0])
                    a.unmap(mine[0][1], BIDI)
            elif self.statics[a]:
                a.unmap(self.statics[a].pop(), BIDI)
        finally:
            b.resv.unlock()

    @rule(a=attachments)
    def pin(self, a):
        if a is None or a.detached or a.dmabuf.released:
            return
        before = a.pin_count
        with a.dmabuf.resv:
            if not a.dynamic:
                with pytest.raises(errors.LifetimeError):
                    a.pin()  # a static attachment's pins are its maps'
                assert a.pin_count == before
                return
            a.pin()
        self.pins[a] += 1

    @rule(a=attachments)
    def unpin(self, a):
        if a is None or a.detached or a.dmabuf.released:
            return
        before = a.pin_count
        with a.dmabuf.resv:
            if not a.dynamic or not self.pins[a]:
                # Static: the pins belong to live mappings; dynamic: none.
                with pytest.raises(errors.LifetimeError):
                    a.unpin()
                assert a.pin_count == before
                return
            a.unpin()
        self.pins[a] -= 1

    @rule(a=attachments)
    def detach(self, a):
        if a is None or a.detached or a.dmabuf.released:
            return
        if a.live_mappings or a.pin_count:
            with pytest.raises(errors.LifetimeError):
                a.dmabuf.detach(a)
            return
        a.dmabuf.detach(a)

    # ---------------------------------------------------------- exporter
    def _raising(self, b):
        return any(isinstance(self.importers.get(a), Raising) for a in b.attachments)

    def _told(self, b, call, expected=None):
        """Run an exporter call that invalidates: with a raising importer
        attached it reports it (strict: LifetimeError) after telling every
        importer; then every dynamic importer was told exactly once more and
        every mapping that existed went stale or was dropped."""
        counts = {a: a.invalidations for a in b.attachments if a.dynamic}
        maps = list(b._mappings)
        if self._raising(b):
            with pytest.raises(errors.LifetimeError) as ei:
                call()
            assert ei.value.report.rule == "invalidate-callback-raised"
            assert isinstance(ei.value.__cause__, RuntimeError)
        elif expected is not None:
            with pytest.raises(expected):
                call()
        else:
            call()
        assert all(a.invalidations == n + 1 for a, n in counts.items())
        assert all(mp.stale or mp not in b._mappings for mp in maps)

    @rule(b=buffers)
    def invalidate(self, b):
        if b.released:
            return
        with b.resv:
            self._told(b, b.invalidate_mappings)

    @rule(b=buffers)
    def move(self, b):
        if b.released:
            return
        with b.resv:
            pinned = any(a.pin_count for a in b.attachments)
            if not b.exporter.has("migrate"):
                with pytest.raises(errors.NotSupported):
                    b.move()
            elif pinned or self.vmaps.get(b):  # a live vmap pins the pages
                with pytest.raises(errors.Busy):
                    b.move()
            else:
                old = b.exporter.pfns.copy()
                self._told(b, b.move)
                assert not np.array_equal(old, b.exporter.pfns)  # moved all the same

    @rule(b=buffers)
    def revoke(self, b):
        if b.released:
            return
        static_maps = sum(len(self.statics.get(a, [])) for a in b.attachments)
        raising = self._raising(b)
        self._told(b, lambda: b.revoke(timeout=0.01 if static_maps else 1),
                   errors.TimedOut if static_maps else None)
        assert b.revoked
        if not static_maps and not raising:
            assert b.live_mappings == 0

    @rule(b=buffers)
    def unrevoke(self, b):
        if b.released or not b.revoked:
            return
        self._told(b, b.unrevoke)
        assert not b.revoked

    @rule(b=buffers)
    def put(self, b):
        if b.released or b.attachments or b in self.put_by_user or self.vmaps.get(b):
            return
        b.put()
        if self.cpu.get(b):  # the CPU mappings hold the file: nothing goes yet
            assert not b.released
            self.put_by_user.add(b)
            return
        assert b.released
        self.live_bufs.remove(b)

    # --------------------------------------------------------- CPU side
    @rule(b=buffers)
    def mmap(self, b):
        if b.released:
            return
        if b in self.put_by_user:  # only the mappings hold it: no new user reference to mmap with
            return
        self.cpu.setdefault(b, []).append(b.mmap())

    @rule(b=buffers, page=st.integers(0, 39), byte=st.integers(1, 255))
    def cpu_write(self, b, page, byte):
        maps = self.cpu.get(b)
        if not maps:
            return
        off = (page % (b.size // G)) * G + page
        if b.revoked:
            with pytest.raises(errors.IOFailure):
                maps[-1].write(off, bytes([byte]))
            return
        maps[-1].write(off, bytes([byte]))
        self.written.setdefault(b, {})[off] = byte

    @rule(b=buffers)
    def munmap(self, b):
        maps = self.cpu.get(b)
        if not maps:
            return
        maps.pop(0).close()
        if not maps and b in self.put_by_user:  # the last reference was the mapping's
            assert b.released
            self.put_by_user.discard(b)
            self.live_bufs.remove(b)
        else:
            assert not b.released

    @rule(b=buffers)
    def vmap(self, b):
        if b.released or b in self.put_by_user:
            return
        with b.resv:
            v = b.vmap()
        self.vmaps[b] = self.vmaps.get(b, 0) + 1
        if not b.revoked:
            for off, byte in self.written.get(b, {}).items():
                with b.resv:
                    assert v.read(off, 1) == bytes([byte])

    @rule(b=buffers)
    def vunmap(self, b):
        if not self.vmaps.get(b):
            return
        with b.resv:
            b.vunmap(b._vmap_ptr)
        self.vmaps[b] -= 1

    # -------------------------------------------------------- invariants
    @invariant()
    def pin_counts_are_what_maps_and_pins_say(self):
        for b in self.live_bufs:
            for a in b.attachments:
                if a.dynamic:
                    want = self.pins[a]
                else:
                    want = len(self.statics[a]) if b.exporter.is_dynamic() else 0
                assert a.pin_count == want >= 0

    @invariant()
    def pages_belong_to_live_buffers(self):
        total = sum(len(b.exporter.pfns) for b in self.live_bufs)
        assert self.m.pages.allocated_pages == total

    @invariant()
    def cpu_mappings_read_what_was_written(self):
        for b, maps in self.cpu.items():
            if b.revoked:
                continue
            for c in maps:
                for off, byte in self.written.get(b, {}).items():
                    assert c.read(off, 1) == bytes([byte]), f"{c!r} lost byte {off:#x}"

    @invariant()
    def mappings_translate_to_current_pages(self):
        for b in self.live_bufs:
            want = (b.exporter.pfns << np.uint64(12))
            for mp in list(b._mappings):
                if mp.stale or mp.table is None:
                    continue
                dev = mp.attachment.device
                pages = []
                for addr, n in mp.table.dma_ranges().tolist():
                    pages.extend(range(addr & ~0xFFF, addr + n, G))
                pages = np.array(pages, dtype=np.uint64)
                if dev.domain is None:
                    got = pages
                else:
                    got = dev.domain.pgtable.iova_to_phys_many(pages)
                assert got.tolist() == want.tolist()

    def teardown(self):
        for b, n in self.vmaps.items():
            for _ in range(n):
                with b.resv:
                    b.vunmap(b._vmap_ptr)
        for b in list(self.live_bufs):
            for c in self.cpu.pop(b, []):
                c.close()
            if b.released:  # its last reference was a mapping's
                continue
            for a in b.attachments:
                b.resv.lock()
                try:
                    if a.dynamic:
                        imp = self.importers[a]
                        for x, t in [p for p in imp.maps if p[0] is a]:
                            a.unmap(t, BIDI)
                        imp.maps = [p for p in imp.maps if p[0] is not a]
                        for _ in range(self.pins[a]):
                            a.unpin()
                    else:
                        while self.statics[a]:
                            a.unmap(self.statics[a].pop(), BIDI)
                finally:
                    b.resv.unlock()
                b.detach(a)
            b.put()
        assert self.m.pages.allocated_pages == 0
        for name in DEVICES:
            d = self.m.device(name)
            if d.domain is not None:
                d.domain.flush()
                s = d.domain.stats
                assert s["mapped_nbytes"] == 0 and s["iova_live_ranges"] == 0
        assert self.m.swiotlb_pools["swiotlb"].slots_used == 0


def _spec():
    from pydmabuf.machine import DEFAULT_SPEC
    import copy

    spec = copy.deepcopy(DEFAULT_SPEC)
    for io in spec["iommus"]:
        io["fq_timeout"] = None  # deterministic flush queues
    return spec


Lifecycle.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
TestLifecycle = Lifecycle.TestCase
