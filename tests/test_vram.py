"""The TTM-style VRAM exporter and the dynamic DRM importer: asynchronous,
fenced moves and the rule that dynamic importers wait for the KERNEL
fences before they touch a buffer that moved.

Each test names the kernel function whose behaviour it shows."""

from __future__ import annotations

import errno

import pytest

from pydmabuf import Fence, Usage, checks, errors, fence_context_alloc
from pydmabuf._scenario_library_memory import _two_gpu_machine
from pydmabuf.exporters import VramDevice
from pydmabuf.exporters.vram import SYSTEM, VRAM
from pydmabuf.importers.drm import DrmDynamicGpu, DrmGpu

K = 1024


@pytest.fixture
def m():
    return _two_gpu_machine()


@pytest.fixture
def vram(m):
    return VramDevice(m.device("gpu0"), vram_bytes=256 * K)


def _pages_in_use(m):
    return m.pages.allocated_pages


def test_the_vram_bar_is_gpu0s_prefetchable_bar(m, vram):
    assert vram.bar.index == 1 and vram.bar.prefetch and vram.vram_free == 256 * K
    with pytest.raises(errors.InvalidArgument):
        VramDevice(m.device("legacy0"))  # no prefetchable memory BAR
    with pytest.raises(errors.InvalidArgument):
        VramDevice(m.device("gpu0"), vram_bytes=4097)


def test_a_move_publishes_at_once_and_fences_the_copy(m, vram):
    # amdgpu_bo_move(): move_notify first, then the blit whose fence
    # ttm_bo_move_accel_cleanup() adds to the resv as KERNEL; the new
    # placement is the BO's from that moment.
    buf = vram.allocate(64 * K, name="bo")
    gpu = DrmDynamicGpu.import_buffer(m.device("gpu2"), buf)
    gpu.write(0, b"payload")
    gen = buf.generation
    fence = vram.evict(buf)
    bo = buf.exporter
    assert bo.placement == SYSTEM and buf.generation == gen + 1
    assert gpu.invalidated and gpu.invalidations == 1
    assert fence is not None and not fence.is_signaled()
    assert buf.resv.get_fences(Usage.KERNEL) == [fence]
    assert not buf.resv.test_signaled(Usage.KERNEL)
    assert [j.fence for j in vram.pending_copies] == [fence]
    assert vram.run_copies() == 1 and fence.is_signaled()
    assert gpu.read(0, 7) == b"payload"  # re-mapped to system memory, after the copy
    assert gpu.remaps == 2 and gpu.fence_waits == 0  # nothing left to wait for
    gpu.free()
    buf.put()


def test_dma_before_the_move_fence_is_caught_and_names_the_importer(m, vram):
    # The dma-buf rule (dma_buf_move_notify() kerneldoc; amdgpu_sync_resv()
    # in the importer's submission): after a move a dynamic importer waits
    # for the KERNEL fences.  One that does not DMAs into pages the copy
    # has not filled.
    buf = vram.allocate(64 * K, name="bo")
    good = DrmDynamicGpu.import_buffer(m.device("gpu2"), buf, fence_timeout=0)
    bad = DrmDynamicGpu.import_buffer(m.device("gpu2"), buf, wait_kernel_fences=False)
    good.write(0, b"before")
    vram.evict(buf)
    with pytest.raises(errors.LifetimeError) as ei:
        bad.read(0, 6)
    assert "has not finished" in str(ei.value) and "skips the fence wait" in str(ei.value)
    assert ei.value.report.rule == "dma-before-move-fence"
    with checks.report_mode():
        checks.clear()
        stale = bad.read(0, 6)  # goes through, as on hardware: not the data
        assert len(checks.reports("dma-before-move-fence")) == 1
        checks.clear()
    assert stale != b"before"
    with pytest.raises(errors.TimedOut):  # the careful importer waits (here: no time at all) ...
        good.read(0, 6)
    vram.run_copies()
    assert good.read(0, 6) == b"before" and bad.read(0, 6) == b"before"  # ... and after the copy all is well
    good.free()
    bad.free()
    buf.put()


def test_a_waiting_importer_blocks_until_the_copy_engine_signals(m, vram):
    buf = vram.allocate(32 * K, name="bo")
    gpu = DrmDynamicGpu.import_buffer(m.device("gpu2"), buf, fence_timeout=10)
    gpu.write(100, b"x" * 10)
    vram.evict(buf)
    with vram.engine():
        assert gpu.read(100, 10) == b"x" * 10
    assert buf.resv.test_signaled(Usage.KERNEL)
    gpu.free()
    buf.put()


def test_p2p_importer_gets_the_bar_and_a_non_p2p_one_migrates_it_first(m, vram):
    # amdgpu_dma_buf_attach(): peer2peer only with a P2P route;
    # amdgpu_dma_buf_map(): VRAM through the BAR for a p2p attachment,
    # otherwise the BO is validated into GTT first.
    buf = vram.allocate(32 * K, name="bo")
    p2p = DrmDynamicGpu.import_buffer(m.device("gpu2"), buf)
    p2p.validate()
    assert p2p.attachment.peer2peer and buf.exporter.placement == VRAM
    first = int(p2p.table.dma_ranges()[0, 0])
    bar = vram.bar
    assert bar.bus_start <= first < bar.bus_start + bar.nbytes  # a bus address inside the BAR
    far = DrmDynamicGpu.import_buffer(m.device("gpu1"), buf, fence_timeout=0)  # other host bridge
    assert not far.attachment.peer2peer
    with pytest.raises(errors.TimedOut):
        far.validate()  # the map moved it to system memory; the copy is pending
    assert buf.exporter.placement == SYSTEM and buf.exporter.moves == 1 and p2p.invalidated
    vram.run_copies()
    far.validate()
    assert not (bar.bus_start <= int(far.table.dma_ranges()[0, 0]) < bar.bus_start + bar.nbytes)
    p2p.free()
    far.free()
    buf.put()


def test_a_static_importer_pins_and_eviction_fails_with_ebusy(m, vram):
    # amdgpu_dma_buf_pin(): a static importer without a P2P route pins the
    # BO in GTT (it moves there first); a pinned BO does not move
    # (ttm_bo_evict refuses pinned BOs: -EBUSY).
    buf = vram.allocate(32 * K, name="bo")
    with vram.engine():
        g1 = DrmGpu.prime_import(m.device("gpu1"), buf)  # its map waits for the move's KERNEL fence
    bo = buf.exporter
    assert bo.placement == SYSTEM and bo.pins == 1
    with pytest.raises(errors.Busy) as ei:
        vram.restore(buf)
    assert ei.value.errno == errno.EBUSY and bo.placement == SYSTEM and bo.moves == 1
    g1.free()
    assert bo.pins == 0
    vram.restore(buf)
    vram.run_copies()
    assert bo.placement == VRAM
    buf.put()


def test_a_static_importer_never_gets_the_bar_and_a_pinning_p2p_one_keeps_vram(m, vram):
    # dma_buf_attach() without importer ops leaves attach->peer2peer
    # false, so even a P2P-capable GPU importing statically gets the BO
    # pinned in GTT; a dynamic p2p attachment that pins (dma_buf_pin())
    # keeps it in VRAM, and then it cannot move.
    buf = vram.allocate(32 * K, name="bo")
    with vram.engine():
        g2 = DrmGpu.prime_import(m.device("gpu2"), buf)
    assert not g2.attachment.peer2peer and buf.exporter.placement == SYSTEM
    g2.free()
    vram.restore(buf)
    vram.run_copies()
    dyn = DrmDynamicGpu.import_buffer(m.device("gpu2"), buf)
    with buf.resv:
        dyn.attachment.pin()
    assert buf.exporter.placement == VRAM
    with pytest.raises(errors.Busy):
        vram.evict(buf)
    with buf.resv:
        dyn.attachment.unpin()
    dyn.free()
    buf.put()


def test_memory_pressure_evicts_the_least_recent_unpinned_buffer(m, vram):
    # ttm_bo_evict_alloc(): victims in LRU order, skipping pinned ones and
    # ones whose reservation lock cannot be trylocked.
    a = vram.allocate(96 * K, name="a")
    b = vram.allocate(96 * K, name="b")
    pin = DrmDynamicGpu.import_buffer(m.device("gpu2"), a)
    with a.resv:
        pin.attachment.pin()  # a is pinned in VRAM
    c = vram.allocate(96 * K, name="c")
    assert a.exporter.placement == VRAM and b.exporter.placement == SYSTEM and c.exporter.placement == VRAM
    assert vram.evictions == 1
    # Everything left in VRAM is pinned or locked: ENOMEM, nothing changes.
    pin_c = DrmDynamicGpu.import_buffer(m.device("gpu2"), c)
    with c.resv:
        pin_c.attachment.pin()
    before = (vram.vram_free, _pages_in_use(m), len(vram.pending_copies))
    with pytest.raises(errors.OutOfMemory):
        vram.allocate(160 * K, name="d")
    assert (vram.vram_free, _pages_in_use(m), len(vram.pending_copies)) == before
    for imp, x in ((pin, a), (pin_c, c)):
        with x.resv:
            imp.attachment.unpin()
        imp.free()
    vram.run_copies()
    for x in (a, b, c):
        x.put()
    assert vram.vram_free == 256 * K


def test_pipelined_eviction_hands_the_fence_to_the_next_user(m, vram):
    # ttm_bo_move_pipeline_evict() frees the VRAM at once;
    # ttm_bo_add_move_fence() makes the next BO placed there wait for it.
    a = vram.allocate(192 * K, name="a")
    b = vram.allocate(192 * K, name="b")  # evicts a: a's copy still reads the pages b got
    (job,) = vram.pending_copies
    assert job.buffer is a.exporter
    assert b.resv.get_fences(Usage.KERNEL) == [job.fence]
    vram.run_copies()
    assert b.resv.test_signaled(Usage.KERNEL)
    a.put()
    b.put()


def test_the_copy_waits_for_the_buffers_fences(m, vram):
    # The blit syncs to every fence of the reservation object: a GPU job
    # still using the buffer holds the move back.
    buf = vram.allocate(16 * K, name="bo")
    user = Fence(fence_context_alloc(), 1)
    with buf.resv:
        buf.resv.reserve_fences(1)
        buf.resv.add_fence(user, Usage.READ)
    vram.evict(buf)
    assert vram.run_copies() == 0 and not vram.pending_copies[0].ready()
    user.signal()
    assert vram.run_copies() == 1
    buf.put()


def test_release_with_a_copy_in_flight_frees_after_the_copy(m, vram):
    before = _pages_in_use(m)
    buf = vram.allocate(64 * K, name="bo")
    vram.evict(buf)
    assert _pages_in_use(m) == before + 16
    buf.put()  # the copy is still queued: the system pages stay until it ran
    assert _pages_in_use(m) == before + 16
    vram.run_copies()
    assert _pages_in_use(m) == before and vram.vram_free == 256 * K


def test_move_without_the_reservation_lock_is_reported(m, vram):
    buf = vram.allocate(16 * K, name="bo")
    with pytest.raises(errors.LockingError):
        vram._move(buf.exporter, SYSTEM)
    assert buf.exporter.placement == VRAM
    buf.put()
