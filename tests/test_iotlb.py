"""The IOTLB and the window a lazy (flush-queue) domain leaves open.

Each test names the kernel code it follows: drivers/iommu/dma-iommu.c
(``__iommu_dma_unmap``, ``iommu_dma_free_iova``, ``queue_iova``,
``fq_ring_free_locked``, ``fq_flush_iotlb``, ``fq_flush_timeout``) and
drivers/iommu/iommu.c (``iommu_unmap`` / ``__iommu_unmap`` with an
``iommu_iotlb_gather`` synced before return).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pydmabuf import checks, errors
from pydmabuf.dma import DmaDirection, dma_map_phys, dma_unmap_phys
from pydmabuf.exporters import SystemHeap
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.iotlb import DEFAULT_ENTRIES, Iotlb, stale_window
from pydmabuf.machine import Machine

BIDI = DmaDirection.BIDIRECTIONAL
PAGE = 4096
OLD = 0x100000  # physical page the tests map


def _machine(strict: bool = False, entries: int | None = None, fq_timeout: object = False) -> Machine:
    io: dict[str, object] = {"name": "io0", "strict": strict, "fq_timeout": fq_timeout}
    if entries is not None:
        io["iotlb_entries"] = entries
    m = Machine.from_spec({
        "name": "iotlb", "memory": [{"start": 0, "size": "64M", "kind": "ram"}], "iommus": [io],
        "devices": [{"name": "dev0", "iommu": "io0", "group": "g0", "dma_mask": 64}]})
    m.memory.write(OLD, b"old page")
    return m


def _map_read_unmap(m: Machine, nbytes: int = PAGE) -> int:
    d = m.device("dev0")
    a = dma_map_phys(d, OLD, nbytes, BIDI)
    assert d.dma_read(a, 8) == b"old page"  # fills the IOTLB
    dma_unmap_phys(d, a, nbytes, BIDI)
    return a


def test_lazy_unmap_leaves_the_cached_translation_live_strict_checker_raises():
    # __iommu_dma_unmap on a DMA-FQ domain: the gather is queued, no
    # iommu_iotlb_sync; the cached entry still translates.
    m = _machine()
    a = _map_read_unmap(m)
    with pytest.raises(errors.LifetimeError) as ei:
        m.device("dev0").dma_read(a, 8)
    msg = str(ei.value)
    assert f"stale IOTLB entry iova {a:#x} -> old phys {OLD:#x}" in msg
    assert ei.value.report.rule == "stale-iotlb"
    assert m.iommus["io0"].iotlb.stats["stale_hits"] == 1


def test_report_mode_lets_the_stale_hit_reach_the_old_page_and_records_it():
    m = _machine()
    a = _map_read_unmap(m)
    checks.clear()
    with checks.report_mode():
        assert m.device("dev0").dma_read(a, 8) == b"old page"
        m.device("dev0").dma_write(a, b"scribble")  # hardware writes the old page too
        reps = checks.reports("stale-iotlb")
    checks.clear()
    assert len(reps) == 2
    assert m.memory.read(OLD, 8) == b"scribble"


def test_after_the_flush_the_same_access_faults():
    # fq_flush_timeout -> fq_flush_iotlb (flush_iotlb_all) -> the entry is gone.
    m = _machine()
    a = _map_read_unmap(m)
    d = m.device("dev0")
    assert d.domain.flush() == 1
    with pytest.raises(errors.IommuFault) as ei:
        d.dma_read(a, 8)
    assert ei.value.errno == 14  # EFAULT
    assert m.iommus["io0"].iotlb.stats["invalidated"] == 1


def test_strict_domain_faults_at_once():
    # IOMMU_DOMAIN_DMA: __iommu_dma_unmap syncs the gather (range
    # invalidation) before it frees the IOVA.
    m = _machine(strict=True)
    a = _map_read_unmap(m)
    with pytest.raises(errors.IommuFault):
        m.device("dev0").dma_read(a, 8)
    assert stale_window(m.device("dev0").domain, m.iommus["io0"].iotlb).queued_bytes == 0


def test_iommu_unmap_syncs_on_a_lazy_domain_too():
    # iommu_unmap() always runs iommu_iotlb_sync on its gather, whatever
    # the domain type: no stale window.
    m = _machine()
    d = m.device("dev0")
    dom = d.domain
    iova = dom.alloc_iova(PAGE)
    dom.map(iova, OLD, PAGE)
    assert d.dma_read(iova, 8) == b"old page"
    dom.unmap(iova, PAGE)
    with pytest.raises(errors.IommuFault):
        d.dma_read(iova, 8)
    dom.free_iova(iova, PAGE)


def test_the_iova_stays_held_until_the_flush():
    # iommu_dma_free_iova -> queue_iova: the IOVA is freed only by
    # fq_ring_free_locked after a flush, so no new mapping can reuse the
    # address while a stale entry may point at the old page.
    m = _machine()
    d = m.device("dev0")
    a = _map_read_unmap(m)
    assert [int(x) for x in d.domain.queued()[0, :2]] == [a, PAGE]
    b = dma_map_phys(d, OLD + PAGE, PAGE, BIDI)
    assert b != a
    dma_unmap_phys(d, b, PAGE, BIDI)
    d.domain.flush()
    assert len(d.domain.queued()) == 0
    c = dma_map_phys(d, OLD + PAGE, PAGE, BIDI)
    assert c in (a, b)  # the freed ranges are reusable now
    dma_unmap_phys(d, c, PAGE, BIDI)


def test_a_full_ring_flushes_and_invalidates():
    # queue_iova: when the ring is full, fq_flush_iotlb runs before the
    # new entry goes in; the entries it covers are freed.
    m = _machine()
    d = m.device("dev0")
    a = _map_read_unmap(m)
    full_before = d.domain.stats["fq_full_flushes"]
    for _ in range(300):  # more than a 256-slot ring holds
        x = dma_map_phys(d, OLD, PAGE, BIDI)
        dma_unmap_phys(d, x, PAGE, BIDI)
    assert d.domain.stats["fq_full_flushes"] > full_before
    with pytest.raises(errors.IommuFault):
        d.dma_read(a, 8)


def test_the_flush_queue_timer_closes_the_window():
    # fq_flush_timeout fires fq_timeout after the first queued entry; the
    # model runs it at the next domain operation or device access past
    # the deadline.
    m = _machine(fq_timeout=0.001)
    a = _map_read_unmap(m)
    time.sleep(0.02)
    with pytest.raises(errors.IommuFault):
        m.device("dev0").dma_read(a, 8)
    assert m.device("dev0").domain.stats["fq_timeouts"] == 1


def test_flush_iotlb_all_invalidates_and_releases_nothing():
    m = _machine()
    d = m.device("dev0")
    a = _map_read_unmap(m)
    d.domain.flush_iotlb_all()
    with pytest.raises(errors.IommuFault):
        d.dma_read(a, 8)
    assert len(d.domain.queued()) == 1  # the IOVA waits for the queue's own flush
    d.domain.flush()


def test_lru_keeps_the_last_pages_of_a_long_access():
    m = _machine(entries=4)
    d = m.device("dev0")
    m.memory.write(OLD + 5 * PAGE - 8, b"lastpage")
    a = dma_map_phys(d, OLD, 5 * PAGE, BIDI)
    d.dma_read(a, 5 * PAGE)
    tlb = m.iommus["io0"].iotlb
    assert [int(x) for x in tlb.cached(d.domain)] == [a + k * PAGE for k in range(1, 5)]
    dma_unmap_phys(d, a, 5 * PAGE, BIDI)
    with pytest.raises(errors.IommuFault):  # evicted: walks the cleared table
        d.dma_read(a, 8)
    with checks.report_mode():
        assert d.dma_read(a + 5 * PAGE - 8, 8) == b"lastpage"  # still cached: the old page
    checks.clear()
    w = stale_window(d.domain, tlb)
    assert (w.queued_unmaps, w.queued_bytes, w.cached_stale_pages) == (1, 5 * PAGE, 4)
    d.domain.flush()
    assert stale_window(d.domain, tlb) == type(w)(0, 0, 0, 0)


def test_an_access_straddling_a_stale_and_an_uncached_page_faults():
    m = _machine()
    d = m.device("dev0")
    a = dma_map_phys(d, OLD, 2 * PAGE, BIDI)
    d.dma_read(a, 8)  # caches the first page only
    dma_unmap_phys(d, a, 2 * PAGE, BIDI)
    with pytest.raises(errors.IommuFault) as ei:
        d.dma_read(a + PAGE - 4, 8)
    assert f"{a + PAGE:#x}" in str(ei.value)
    d.domain.flush()


def test_the_stale_hit_names_the_dmabuf_mapping_and_its_importer():
    m = Machine.from_spec({
        "name": "iotlb", "memory": [{"start": 0, "size": "64M", "kind": "ram"}],
        "iommus": [{"name": "io0", "strict": False, "fq_timeout": False}],
        "devices": [{"name": "dev0", "iommu": "io0", "group": "g0", "dma_mask": 64}]})

    class Driver(ImporterOps):
        def invalidate_mappings(self, attachment: object) -> None:
            pass

    buf = SystemHeap(m).allocate(2 * PAGE, name="shared")
    d = m.device("dev0")
    a = buf.dynamic_attach(d, Driver())
    t = a.map_unlocked(BIDI)
    addr = int(t.dma_ranges()[0, 0])
    d.dma_read(addr, 8)
    a.unmap_unlocked(t, BIDI)
    with pytest.raises(errors.LifetimeError) as ei:
        d.dma_read(addr, 8)
    r = ei.value.report
    assert "mapping of <Attachment dev0 -> 'shared'" in r.message
    assert r.culprit.startswith("<importer Driver>")
    d.domain.flush()
    buf.detach(a)
    buf.put()


def test_iotlb_size_is_configurable_and_checked():
    assert _machine().iommus["io0"].iotlb.entries == DEFAULT_ENTRIES
    assert _machine(entries=7).iommus["io0"].iotlb.entries == 7
    with pytest.raises(errors.InvalidArgument):
        _machine(entries=0)
    with pytest.raises(TypeError):
        Iotlb(True)


def test_python_misuse_is_a_type_error():
    tlb = _machine().iommus["io0"].iotlb
    for call in (lambda: stale_window(None), lambda: stale_window(_machine().device("dev0").domain, iotlb=3),
                 lambda: tlb.cached("dom"), lambda: tlb.stale_pages(1)):
        with pytest.raises(TypeError):
            call()


# A reference of what hardware does, independent of the model: a cache of
# page translations filled by reads, emptied by the invalidations the
# domain issues (strict: the unmapped range at once; lazy: everything at
# the flush), never by the page-table update itself.

_REF_STATS = {"stale": 0, "flushes": 0}
_OPS = st.lists(st.tuples(st.sampled_from(["map", "map", "read", "read", "read", "unmap", "flush"]),
                          st.integers(0, 3)), max_size=40)


@settings(max_examples=80, deadline=None)
@given(strict=st.booleans(), ops=_OPS)
@example(strict=False, ops=[("map", 0), ("read", 0), ("unmap", 0), ("read", 0), ("flush", 0), ("read", 0)])
def test_the_iotlb_matches_a_reference_of_the_hardware(strict, ops):
    m = _machine(strict=strict, entries=1024)  # no eviction here: LRU is pinned above
    d = m.device("dev0")
    for k in range(8):
        m.memory.write(OLD + k * PAGE, bytes([65 + k]) * 8)
    live: dict[int, int] = {}  # slot -> iova (mapped)
    pte: dict[int, int] = {}  # iova -> phys
    cache: dict[int, int] = {}  # iova -> phys (the reference IOTLB)
    queued: set[int] = set()
    dead: list[int] = []  # unmapped IOVAs, to read through later
    stats = _REF_STATS
    checks.clear()
    with checks.report_mode():
        for op, k in ops:
            if op == "map" and k not in live:
                a = dma_map_phys(d, OLD + k * PAGE, PAGE, BIDI)
                assert a not in queued  # queue_iova holds the IOVA until the flush
                live[k], pte[a] = a, OLD + k * PAGE
            elif op == "unmap" and k in live:
                a = live.pop(k)
                dma_unmap_phys(d, a, PAGE, BIDI)
                del pte[a]
                dead.append(a)
                if strict:
                    cache.pop(a, None)  # iommu_iotlb_sync at unmap
                else:
                    queued.add(a)
            elif op == "flush":
                d.domain.flush()
                if queued:  # fq_flush_timeout flushes only when something is queued
                    cache.clear()  # fq_flush_iotlb: flush_iotlb_all
                queued.clear()
                stats["flushes"] += 1
            elif op == "read":
                # k < 2: the most recently unmapped IOVAs; else a live one.
                targets = dead[::-1] if (k < 2 and dead) or not live else list(live.values())
                if not targets:
                    continue
                a = targets[k % len(targets)]
                n_reports = len(checks.reports("stale-iotlb"))
                if a in cache and pte.get(a) != cache[a]:
                    assert d.dma_read(a, 8) == m.memory.read(cache[a], 8)  # the old page
                    stats["stale"] += 1
                    assert len(checks.reports("stale-iotlb")) == n_reports + 1
                elif a in pte:
                    assert d.dma_read(a, 8) == m.memory.read(pte[a], 8)
                    cache[a] = pte[a]
                    assert len(checks.reports("stale-iotlb")) == n_reports
                else:
                    with pytest.raises(errors.IommuFault):
                        d.dma_read(a, 8)
    checks.clear()


# The one-page lookup (an index of the cached pages, plain ints) must be
# the array scan's exact twin: same bytes or errno, same stale-iotlb
# reports, same counts, same entries in the same LRU order, through misses,
# coherent hits, stale hits, flushes and evictions.

_TWIN_OPS = st.lists(st.tuples(st.sampled_from(["map", "read", "read", "read", "read2", "write", "unmap", "flush"]),
                               st.integers(0, 5), st.integers(0, PAGE - 8)), max_size=50)


def _run_twin(strict: bool, ops: list[tuple[str, int, int]]) -> list[object]:
    m = _machine(strict=strict, entries=3)  # 6 buffers over 3 entries: evictions
    d = m.device("dev0")
    it = m.iommus["io0"].iotlb
    for k in range(6):
        m.memory.write(OLD + k * 2 * PAGE, bytes([65 + k]) * 2 * PAGE)
    live: dict[int, int] = {}
    dead: list[int] = []
    seen: list[object] = []
    checks.clear()
    with checks.report_mode():
        for op, k, off in ops:
            if op == "map" and k not in live:
                live[k] = dma_map_phys(d, OLD + k * 2 * PAGE, 2 * PAGE, BIDI)
            elif op == "unmap" and k in live:
                a = live.pop(k)
                dma_unmap_phys(d, a, 2 * PAGE, BIDI)
                dead.append(a)
            elif op == "flush":
                d.domain.flush()
            elif op in ("read", "read2", "write"):
                targets = list(live.values()) + dead[::-1]
                if not targets:
                    continue
                a = targets[k % len(targets)] + off
                try:
                    if op == "read":
                        seen.append(d.dma_read(a, 8))
                    elif op == "read2":  # two pages: always the array scan
                        seen.append(d.dma_read(a, PAGE + 8))
                    else:
                        d.dma_write(a, bytes([k]) * 8)
                        seen.append(m.memory.read(OLD, 12 * PAGE))
                except errors.DmaBufError as e:
                    seen.append((type(e).__name__, e.errno))
            seen.append((dict(it.stats), it.cached(d.domain).tolist(), len(checks.reports("stale-iotlb"))))
    checks.clear()
    return seen


@settings(max_examples=60, deadline=None)
@given(strict=st.booleans(), ops=_TWIN_OPS)
@example(strict=False, ops=[("map", 0, 0), ("read", 0, 0), ("unmap", 0, 0), ("read", 0, 8), ("flush", 0, 0),
                            ("read", 0, 0)])
def test_the_one_page_lookup_matches_the_array_scan(strict, ops):
    fast = _run_twin(strict, ops)
    Iotlb._one_page_path = False
    try:
        scan = _run_twin(strict, ops)
    finally:
        Iotlb._one_page_path = True
    assert fast == scan
