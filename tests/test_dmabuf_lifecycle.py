"""A Hypothesis state machine over the whole dma-buf lifecycle:
export / attach / map / invalidate / move / revoke / unmap / detach / put,
CPU mmap / write / read / munmap and vmap / vunmap, with obedient
importers, checking after every step that nothing leaks, that every live,
current mapping translates to the buffer's current pages, and that every
CPU mapping reads what was written through the buffer's mappings (a
mapping outliving its buffer's last put, or a vmap across a move, would
read another buffer's pages)."""

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


class Lifecycle(RuleBasedStateMachine):
    buffers = Bundle("buffers")
    attachments = Bundle("attachments")

    def __init__(self):
        super().__init__()
        self.m = Machine.from_spec(_spec())
        self.heap = SystemHeap(self.m)
        self.live_bufs = []  # (buf, refs)
        self.statics = {}  # attachment -> [tables]
        self.importers = {}  # attachment -> Obedient
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
    @rule(target=attachments, b=buffers, dev=st.sampled_from(DEVICES), dynamic=st.booleans())
    def attach(self, b, dev, dynamic):
        if b.released or b in self.put_by_user:
            return None
        d = self.m.device(dev)
        if dynamic:
            imp = Obedient(self.m)
            a = b.dynamic_attach(d, imp)
            self.importers[a] = imp
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
    def detach(self, a):
        if a is None or a.detached or a.dmabuf.released:
            return
        if a.live_mappings:
            with pytest.raises(errors.LifetimeError):
                a.dmabuf.detach(a)
            return
        a.dmabuf.detach(a)

    # ---------------------------------------------------------- exporter
    @rule(b=buffers)
    def invalidate(self, b):
        if b.released:
            return
        b.resv.lock()
        try:
            b.invalidate_mappings()
        finally:
            b.resv.unlock()

    @rule(b=buffers)
    def move(self, b):
        if b.released:
            return
        b.resv.lock()
        try:
            pinned = any(a.pin_count for a in b.attachments)
            if not b.exporter.has("migrate"):
                with pytest.raises(errors.NotSupported):
                    b.move()
            elif pinned or self.vmaps.get(b):  # a live vmap pins the pages
                with pytest.raises(errors.Busy):
                    b.move()
            else:
                b.move()
        finally:
            b.resv.unlock()

    @rule(b=buffers)
    def revoke(self, b):
        if b.released:
            return
        static_maps = sum(len(self.statics.get(a, [])) for a in b.attachments)
        if static_maps:
            with pytest.raises(errors.TimedOut):
                b.revoke(timeout=0.01)
        else:
            b.revoke(timeout=1)
            assert b.live_mappings == 0

    @rule(b=buffers)
    def unrevoke(self, b):
        if b.released or not b.revoked:
            return
        b.unrevoke()

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
