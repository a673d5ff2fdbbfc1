"""The scenarios ``pydmabuf scenario`` runs (registered on import), part
two: the IOMMU, memory and importer rules (a lazy domain's stale IOTLB
window, confidential private memory, an importer ignoring invalidation,
the ranges-to-table helper, mapping-type negotiation, VRAM eviction).
Part one and the shared helpers are :mod:`pydmabuf._scenario_library`.

Written as a user of pydmabuf would write them: public API only, the
default machine, one function per scenario.  Each registers itself in
:mod:`pydmabuf._scenario_registry`; see :mod:`pydmabuf.scenarios`.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np

from pydmabuf import checks, errors, mapping
from pydmabuf._scenario_library import BIDI, LazyNic, ObedientGpu, _addr, _clean, _live, _machine, _Polite
from pydmabuf._scenario_registry import Story, scenario
from pydmabuf._types import RangeKind, _fmt_size
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import Attachment
from pydmabuf.exporters import PrivateMemory, SystemHeap
from pydmabuf.exporters.private import PrivateBuffer
from pydmabuf.exporters.system_heap import HeapBuffer
from pydmabuf.exporters.vram import VramDevice
from pydmabuf.exporters.xe_vfio import XeSriovPf, XeVfioPciBar, xe_iov_importer, xe_iov_map, xe_iov_unmap
from pydmabuf.importers import DrmGpu, IommufdIoas, RdmaMr
from pydmabuf.importers.drm import DrmDynamicGpu
from pydmabuf.iotlb import stale_window
from pydmabuf.machine import DEFAULT_SPEC, Machine


# ---------------------------------------------------------------- the IOTLB


@scenario("lazy-iotlb-window", "a lazy IOMMU domain's stale IOTLB window after an importer unmaps")
def lazy_iotlb_window(story: Story) -> None:
    """A GPU driver maps a heap buffer, its device reads it (the IOMMU
    caches the translation) and the driver unmaps.  On a lazy (DMA-FQ)
    domain the unmap clears the page-table entries but issues no
    invalidation: ``iommu_dma_free_iova`` puts the IOVA on the flush queue
    (``queue_iova``) and the IOTLB is invalidated only when the queue
    flushes (``fq_flush_timeout`` after 10 ms, or a full ring), and only
    then is the IOVA freed.  A device that keeps using the address in that
    window still reaches the old page, as hardware does; the checker names
    the stale entry and the importer.  After the flush the same access
    faults; on a strict domain it faults at once.  The flush-queue timer is
    off here so the window closes exactly where the scenario flushes."""
    for strict in (False, True):
        m = _machine(strict)
        before = _live(m)
        gpu0 = m.device("gpu0")
        dom = gpu0.domain
        assert dom is not None  # gpu0 is behind iommu0
        heap = SystemHeap(m)
        buf = heap.allocate(64 << 10, name="frame")
        with buf.mmap() as cpu:
            cpu.write(0, b"frame 1")
        ops = _Polite()
        a = buf.dynamic_attach(gpu0, ops)
        table = a.map_unlocked(BIDI)
        addr = int(table.dma_ranges()[0, 0])
        story.step(f"{dom.type} domain: gpu0's driver maps {buf.name!r} at {addr:#x} and gpu0 reads "
                   f"{gpu0.dma_read(addr, 7)!r} (the IOTLB caches the translation)")
        a.unmap_unlocked(table, BIDI)
        assert gpu0.iommu_group is not None  # gpu0 sits behind iommu0
        w = stale_window(dom, gpu0.iommu_group.iommu.iotlb)
        story.detail(f"the driver unmaps: {w.queued_unmaps} unmap(s) queued, {_fmt_size(w.queued_bytes)} with "
                     f"cleared PTEs and no invalidation, {w.cached_stale_pages} of its pages cached stale")
        if not strict:
            story.step("gpu0 reads the address again before the flush (a driver bug: the device outlived the unmap)")
            with checks.report_mode():
                checks.clear()
                data = gpu0.dma_read(addr, 7)
                reps = checks.reports("stale-iotlb")
                checks.clear()
            story.detail(f"it reaches the old page: {data!r}; the checker: {reps[0].message}")
            story.detail(f"culprit: {reps[0].culprit.split(' created at')[0]}")
            story.fact("lazy: before the flush", f"stale hit reaches the old page ({data!r})")
            story.fact("lazy: stale window", f"{w.queued_unmaps} queued unmap(s), {_fmt_size(w.queued_bytes)}")
            story.fact("culprit", reps[0].culprit.split(' created at')[0])
            q = dom.queued()
            story.detail(f"IOVA [{int(q[0, 0]):#x} +{_fmt_size(int(q[0, 1]))}] stays allocated on the flush "
                         "queue: no new mapping can take it while the stale entry points at the old page")
            story.step("the flush queue flushes (the timer's work): one IOTLB flush, then the IOVA is freed")
            released = dom.flush()
            story.detail(f"{released} IOVA range released")
        else:
            story.step("strict domain: the unmap invalidated the range before it returned")
        err = story.refused(gpu0.dma_read, addr, 7, expect=errors.IommuFault)
        story.fact(f"{dom.type}: after {'the flush' if not strict else 'the unmap'}", f"{type(err).__name__} (EFAULT)")
        buf.detach(a)
        buf.put()
        _clean(story, m, before)


# ---------------------------------------------------------------- private memory


@scenario("private-memory", "confidential-computing private memory offered to a trusted and an untrusted importer")
def private_memory(story: Story) -> None:
    """A confidential VM's private memory exported as a dma-buf (after the
    TDX Connect / TDISP proposals; nothing is merged upstream).  gpu0 is a
    TDISP device the TEE accepted (``cc_trusted``); nic0 and direct0 are
    not.  Only gpu0 may attach; the host may not map it; DMA that still
    reaches the pages from an untrusted device faults."""
    m = _machine()
    before = _live(m)
    gpu, nic, direct = m.device("gpu0"), m.device("nic0"), m.device("direct0")
    buf = PrivateMemory(m).allocate(64 << 10, name="cvm-private")
    exp = buf.exporter
    assert isinstance(exp, PrivateBuffer)
    lo = int(exp.pfns[0]) << 12
    what = m.what_is(lo)
    kind = RangeKind(what[0]).name if what is not None else "unmapped"
    story.step(f"private memory exports {buf.name!r}: {_fmt_size(buf.size)} at {lo:#x} "
               f"(a {kind} range of the address map)")

    story.step("gpu0 (TDISP, trusted) imports it as a DRM GPU would and runs a job")
    g = DrmGpu.prime_import(gpu, buf)
    g.write(0, b"secret")
    story.detail(f"gpu0 maps it at {_addr(g.table)} and reads back {g.read(0, 6)!r}")

    story.step("nic0 (not trusted) tries to import it as a DRM GPU")
    e1 = story.refused(DrmGpu.prime_import, nic, buf, expect=errors.NotPermitted)
    story.step("nic0 tries to register it as an RDMA memory region")
    e2 = story.refused(RdmaMr.register, nic, buf, 0, buf.size, expect=errors.NotPermitted)
    story.step("the host tries to mmap it")
    e3 = story.refused(buf.mmap, expect=errors.NotPermitted)

    story.step("nic0 shares gpu0's IOMMU domain (group sw0) and DMAs to gpu0's IOVA anyway")
    e4 = story.refused(nic.dma_read, int(g.table.dma_ranges()[0, 0]), 6, expect=errors.IommuFault)
    story.step("direct0 (no IOMMU) DMAs straight at the private physical address")
    e5 = story.refused(direct.dma_read, direct.phys_to_dma(lo), 6, expect=errors.IommuFault)

    story.step("gpu0 frees its import; the buffer's last reference goes")
    g.free()
    buf.put()
    story.fact("trusted importers served", 1)
    story.fact("untrusted imports refused", f"{sum(isinstance(e, errors.NotPermitted) for e in (e1, e2))} (EPERM)")
    story.fact("host mmap", f"refused ({errors.errno_name(e3.errno or 0)})")
    story.fact("untrusted DMA that reached the pages", f"{sum(isinstance(e, errors.IommuFault) for e in (e4, e5))} "
               "faulted (EFAULT)")
    _clean(story, m, before)


# ---------------------------------------------------------------- stale importer


@scenario("stale-importer", "an importer that ignores invalidation is caught by the checker")
def stale_importer(story: Story) -> None:
    """A movable system-heap buffer shared by a GPU that obeys invalidation
    and a NIC whose importer acknowledges it and keeps using its old
    mapping.  The exporter moves the buffer; the NIC's next DMA goes through
    the stale mapping and the checker names the culprit."""
    m = _machine()
    before = _live(m)
    gpu, nic = m.device("gpu0"), m.device("nic0")

    buf = SystemHeap(m).allocate(64 << 10, layout="fragmented", seed=3, movable=True, name="shared")
    heap = buf.exporter
    assert isinstance(heap, HeapBuffer)
    story.step(f"the system heap exports {buf.name!r}: {_fmt_size(buf.size)} of movable RAM pages, "
               f"{len(heap.pfns)} pages")
    g_ops, n_ops = ObedientGpu(), LazyNic()
    ga = buf.dynamic_attach(gpu, g_ops)
    na = buf.dynamic_attach(nic, n_ops)
    story.step("gpu0 (ObedientGpu) and nic0 (LazyNic) attach dynamically and map")
    g_ops.table = ga.map_unlocked(BIDI)
    nt = na.map_unlocked(BIDI)
    story.detail(f"gpu0 sees {_addr(g_ops.table)}; nic0 sees {_addr(nt)}")
    nic_addr = int(nt.dma_ranges()[0, 0])
    nic.dma_write(nic_addr, b"packet 1")
    story.detail("nic0 writes 'packet 1' through its mapping")

    story.step("the exporter moves the buffer (DmaBuf.move under the reservation lock): "
               "importers are invalidated newest first, then the pages migrate")
    old_first = int(heap.pfns[0])
    with buf.resv:
        buf.move()
    story.detail(f"first page moved from pfn {old_first:#x} to {int(heap.pfns[0]):#x}; "
                 f"gpu0 dropped its mapping ({g_ops.invalidations} invalidation), "
                 f"nic0 acknowledged and kept its ({n_ops.invalidations} invalidation)")

    story.step("nic0 DMAs through its old mapping (strict checker)")
    e = story.refused(nic.dma_read, nic_addr, 8, expect=errors.LifetimeError)
    story.step("the same access with the checker in report mode: it goes through, as on real hardware, "
               "and is recorded")
    with checks.report_mode():
        checks.clear()
        nic.dma_read(nic_addr, 8)
        reports = checks.reports("dma-after-invalidate")
        checks.clear()
    for r in reports:
        story.detail(f"report: {r.rule}, culprit {r.culprit}")

    story.step("gpu0 maps again before its next job and finds the data at the new pages")
    g_ops.table = ga.map_unlocked(BIDI)
    data = gpu.dma_read(int(g_ops.table.dma_ranges()[0, 0]), 8)
    story.detail(f"gpu0 reads {data!r} through {_addr(g_ops.table)}")

    story.step("teardown: both unmap and detach, the buffer's last reference goes")
    ga.unmap_unlocked(g_ops.table, BIDI)
    na.unmap_unlocked(nt, BIDI)
    buf.detach(ga)
    buf.detach(na)
    buf.put()

    story.fact("invalidations delivered", g_ops.invalidations + n_ops.invalidations)
    story.fact("stale DMA caught", 1 if isinstance(e, errors.LifetimeError) else 0)
    story.fact("culprit", "LazyNic" if reports and "LazyNic" in reports[0].culprit else "?")
    story.fact("data after the move", data.decode())
    _clean(story, m, before)


# ---------------------------------------------------------------- ranges -> table


@scenario("ranges-to-table", "a multi-range buffer through the kernel's ranges-to-table helper")
def ranges_to_table(story: Story) -> None:
    """Three slices of vfio0's BAR0 handed to gpu0 (behind its IOMMU, so
    the route goes through the host bridge and the helper links every range
    into one IOVA reservation).  Upstream links each range at IOVA offset
    0, so the second range collides with the first; pydmabuf links at the
    running offset by default and shows the kernel's behaviour with
    ``kernel_compat=True``."""
    m = _machine()
    before = _live(m)
    vfio, gpu = m.device("vfio0"), m.device("gpu0")
    prov = vfio.p2p_provider(0)
    assert prov is not None  # the default machine's vfio0 has a memory BAR0
    dom = gpu.domain
    assert dom is not None  # gpu0 is behind iommu0
    base = prov.bar.cpu_start
    rows = np.array([[base, 0x4000], [base + 0x100000, 0x2000], [base + 0x300000, 0x1000]], dtype=np.uint64)
    story.step(f"vfio0's BAR0 at {base:#x}: three slices "
               + ", ".join(f"[{int(p):#x} +{_fmt_size(int(n))}]" for p, n in rows))
    story.detail(f"route from {vfio.name} to {gpu.name}: {m.p2p_map_type(prov, gpu).name} "
                 f"({gpu.name} is behind {dom.iommu.name if hasattr(dom, 'iommu') else 'an IOMMU'})")

    story.step("dma_buf_phys_vec_to_sgt(gpu0, provider, ranges), the model's default")
    t = dma_buf_phys_vec_to_sgt(gpu, prov, rows)
    (iova, length), = t.dma_ranges().tolist()
    story.detail(f"one DMA-only entry [{iova:#x} +{_fmt_size(length)}], nents {t.nents}, orig_nents {t.orig_nents}")
    layout = []
    for i, (p, n) in enumerate(rows.tolist()):
        off = int(rows[:i, 1].sum())
        got = dom.iova_to_phys(iova + off)
        layout.append(got == p)
        story.detail(f"IOVA {iova + off:#x} -> phys {got:#x} (range {i}: {p:#x}) {'ok' if got == p else 'WRONG'}")
    dma_buf_free_sgt(t)

    story.step("the same call with kernel_compat=True: every range linked at IOVA offset 0, as upstream")
    e = story.refused(dma_buf_phys_vec_to_sgt, gpu, prov, rows, kernel_compat=True)
    story.detail("the first range's mapping was torn down and the reservation freed on the way out")

    story.fact("ranges", len(rows))
    story.fact("model layout", "each range at its running offset" if all(layout) else "WRONG")
    code = errors.errno_name(e.errno) if e.errno is not None else "?"
    story.fact("kernel_compat", f"second range collides: {type(e).__name__} ({code})")
    _clean(story, m, before)


# ---------------------------------------------------------------- mapping types


def _kind(a: Attachment) -> str:
    """The name of the mapping type an attachment negotiated."""
    mt = a.map_type
    return str(mt.type.name) if mt is not None else "nothing"


@scenario("mapping-types", "three importers negotiate three mapping types for one VFIO buffer")
def mapping_types(story: Story) -> None:
    """The mapping-types RFC (2026): at attach the importer lists the types
    it takes, the exporter lists what it supplies in its order of
    preference, and the first exporter entry with a compatible importer
    entry wins.  vfio1 is declared a virtual function of gpu1 (the default
    machine has no SR-IOV) and driven by xe-vfio-pci, whose dma-bufs offer
    the driver-private IOV interconnect, then a physical address list
    (PAL), then a peer-to-peer scatterlist (SGT).  gpu1's ordinary driver
    gets the scatterlist, iommufd the address list (two ranges, walked by
    the RFC's multi-range walker), gpu1's PF driver the private type and
    VRAM addresses; a static importer matches nothing."""
    m = _machine()
    before = _live(m)
    gpu1, vf = m.device("gpu1"), m.device("vfio1")
    vram = 0x2_0000_0000
    sriov = XeSriovPf(gpu1)
    sriov.provision_vf(vf, vram, 64 << 20)
    vfio = XeVfioPciBar(m, "vfio1", ranges=[(0, 1 << 20), (4 << 20, 1 << 20)])
    buf = vfio.export()
    story.step(f"xe-vfio-pci exports two slices of {vf.name}'s BAR0 as {buf.name!r}; {vf.name} is a VF of "
               f"{gpu1.name} with VRAM [{vram:#x} +64 MiB]")
    story.detail("the exporter offers [" + ", ".join(
        ("Xe IOV interconnect", "Physical Address List", "DMA Mapped Scatter Gather Table (P2P)")) + "]")

    story.step(f"{gpu1.name}'s driver attaches as a dynamic P2P importer: it takes [SGT]")
    ops = _Polite()
    a = buf.dynamic_attach(gpu1, ops)
    ops.table = a.map_unlocked(BIDI)
    story.detail(f"negotiated {_kind(a)!r}, P2P allowed {mapping.sgt_p2p_allowed(a)}; "
                 f"DMA addresses {_addr(ops.table)}")
    sgt_kind = _kind(a)

    story.step("iommufd maps it (IOMMU_IOAS_MAP_FILE): it takes [PAL]")
    ioas = IommufdIoas(m)
    h = ioas.attach_device(m.device("gpu0"))
    iova = ioas.map_file(buf, 0, 2 << 20)
    area = ioas.areas[0]
    pa = area.pages.attachment
    assert pa is not None and area.pages.exp_phys is not None
    story.detail(f"negotiated {_kind(pa)!r}: {area.pages.exp_phys.length} ranges, mapped at IOVA "
                 f"{iova:#x} with {h.map_calls} iommu_map calls in {area.pages.batches} batch")
    m.memory.write(int(buf.exporter.ranges[1, 0]), b"second")  # type: ignore[attr-defined]
    story.detail(f"gpu0 reads {m.device('gpu0').dma_read(iova + (1 << 20), 6)!r} one MiB in (the second range)")
    pal_kind = _kind(pa)

    story.step(f"{gpu1.name}'s PF driver imports its VF's BAR: it takes [Xe IOV interconnect (PF {gpu1.name}, "
               "BAR0), SGT]")
    pf_ops = _Polite()
    pfa = buf.mapping_attach([xe_iov_importer(gpu1, 0), mapping.sgt_importer(gpu1, True)], pf_ops)
    with buf.resv:
        rows = xe_iov_map(pfa)
        story.detail(f"negotiated {_kind(pfa)!r}: VRAM " +
                     ", ".join(f"[{int(p):#x} +{_fmt_size(int(n))}]" for p, n in rows) + " (device physical)")
        xe_iov_unmap(pfa, rows)
    iov_kind = _kind(pfa)

    story.step("gpu0's driver asks for the same type with the wrong PF, and a static importer tries")
    story.refused(buf.mapping_attach, [xe_iov_importer(m.device("gpu0"), 0)], _Polite(),
                  expect=errors.InvalidArgument)
    story.refused(buf.attach, gpu1, expect=errors.InvalidArgument)

    story.step("teardown")
    buf.detach(pfa)
    a.unmap_unlocked(ops.table, BIDI)
    ops.table = None
    buf.detach(a)
    ioas.close()
    buf.put()
    vfio.close()
    story.fact("GPU driver", sgt_kind + " (P2P)")
    story.fact("iommufd", f"{pal_kind} (2 ranges)")
    story.fact("PF driver", iov_kind)
    story.fact("static importer", "refused (EINVAL): nothing matches")
    _clean(story, m, before)


# ---------------------------------------------------------------- VRAM eviction


def _two_gpu_machine() -> Machine:
    """The default machine with a second GPU (gpu2) on a spare downstream
    port of gpu0's switch, so it reaches gpu0's VRAM BAR peer to peer."""
    spec = copy.deepcopy(DEFAULT_SPEC)
    spec["ports"].append({"name": "sw0_dp3", "bdf": "0000:02:03.0", "parent": "sw0_up", "kind": "switch_downstream"})
    spec["devices"].append({"name": "gpu2", "bdf": "0000:06:00.0", "parent": "sw0_dp3", "vendor": 0x1002,
                            "device_id": 0x744C, "dma_mask": 44, "max_segment_size": 0xFFFFFFFF,
                            "iommu": "iommu0", "group": "sw0", "can_p2p": True,
                            "description": "second GPU behind gpu0's switch (P2P to its VRAM BAR)"})
    spec["iommus"] = [dict(io, fq_timeout=False) for io in spec["iommus"]]  # as _machine(): no wall-clock flushes
    return Machine.from_spec(spec)


@scenario("vram-eviction", "VRAM evicted by a fenced copy: one importer waits for the move, one does not")
def vram_eviction(story: Story) -> None:
    """gpu0 exports a buffer from its BAR-visible VRAM (TTM style).  gpu2
    imports it twice, dynamically and peer to peer: importer A waits for
    the KERNEL fences after every re-map, importer B skips the wait.
    Memory pressure evicts the buffer to system memory with an
    asynchronous copy whose fence goes into the reservation object; B's
    DMA lands before the copy finished and the checker names it, A's waits
    and reads the data.  A GPU the PCI topology keeps from the BAR (gpu1)
    pins the buffer: it is migrated to system memory first, and while
    pinned it cannot be evicted (EBUSY)."""
    m = _two_gpu_machine()
    before = _live(m)
    gpu0, gpu1, gpu2 = m.device("gpu0"), m.device("gpu1"), m.device("gpu2")
    vram = VramDevice(gpu0, vram_bytes=256 << 10)
    story.step(f"gpu0's VRAM manager over BAR{vram.bar.index} ({_fmt_size(vram.bar.nbytes)} prefetchable; the model "
               f"uses {_fmt_size(vram.vram_free)} of it to make pressure easy): {vram.vram_free >> 10} KiB free")
    buf = vram.allocate(128 << 10, name="frame")
    story.detail(f"{buf.name!r}: {_fmt_size(buf.size)} in VRAM, {vram.vram_free >> 10} KiB left")

    story.step("gpu2 imports it twice, dynamically and peer to peer: A waits for KERNEL fences, B does not")
    a = DrmDynamicGpu.import_buffer(gpu2, buf, fence_timeout=5.0)
    b = DrmDynamicGpu.import_buffer(gpu2, buf, wait_kernel_fences=False)
    a.write(0, b"frame 0001")
    story.detail(f"A writes 'frame 0001' through the BAR (peer2peer={a.attachment.peer2peer}: "
                 f"{_addr(a.table)})")
    story.detail(f"B reads {b.read(0, 10)!r}")

    story.step("memory pressure: a 192 KiB allocation evicts 'frame' to system memory (ttm_bo_evict_alloc)")
    other = vram.allocate(192 << 10, name="pressure")
    (job,) = vram.pending_copies
    fence = buf.resv.get_fences()[-1]
    story.detail(f"the new placement is published at once ({buf.exporter!r}); the copy {job.src_placement} -> "
                 f"{job.dst_placement} is queued; its fence is in the reservation object as KERNEL "
                 f"(signalled: {fence.is_signaled()})")
    story.detail(f"both importers were told (A: {a.invalidations}, B: {b.invalidations} invalidation)")

    story.step("B re-maps and DMAs at once, without waiting for the move fence (checker in report mode)")
    with checks.report_mode():
        checks.clear()
        got_b = b.read(0, 10)
        reports = checks.reports("dma-before-move-fence")
        checks.clear()
    story.detail(f"B reads {got_b!r}: the copy has not run, the new pages hold something else")
    for r in reports:
        story.detail(f"report: {r.rule}, culprit {r.culprit}")

    story.step("A re-maps and waits for the KERNEL fences; the copy engine runs the copy, the fence signals")
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(a.read(0, 10)), name="A")
    reader.start()
    while a.fence_waits == 0 and reader.is_alive():  # A is about to block on the fence
        time.sleep(0.001)
    vram.run_copies()
    reader.join()
    got_a = out[0]
    story.detail(f"A waited {a.fence_waits} time(s) and reads {got_a!r} from system memory ({_addr(a.table)})")

    story.step("the buffer comes back into VRAM on request, evicting 'pressure' (which nobody imports)")
    vram.restore(buf)
    vram.run_copies()
    story.detail(f"{buf.exporter!r}; {other.exporter!r}")
    story.detail(f"A reads {a.read(0, 10)!r} through the BAR again ({a.remaps} maps so far)")

    story.step("gpu1 (no P2P route to gpu0's BAR) imports it statically: the pin migrates it to system memory first")
    with vram.engine():
        g1 = DrmGpu.prime_import(gpu1, buf)
    story.detail(f"{buf.exporter!r}; gpu1 reads {g1.read(0, 10)!r}")
    story.step("while gpu1 holds its pin, eviction and restore are refused")
    e = story.refused(vram.restore, buf, expect=errors.Busy)

    story.step("teardown: importers free their objects, the buffers' last references go")
    g1.free()
    a.free()
    b.free()
    buf.put()
    other.put()
    vram.run_copies()
    story.detail(f"{vram.vram_free >> 10} KiB of VRAM free")

    story.fact("moves", buf.exporter.moves)  # type: ignore[attr-defined]  # a VramBuffer
    story.fact("DMA before the move fence caught", len(reports))
    story.fact("culprit", "B (skips the fence wait)" if reports and "skips the fence wait" in reports[0].culprit
               else "?")
    story.fact("A read after waiting", got_a.decode())
    story.fact("pinned eviction", "refused (EBUSY)" if isinstance(e, errors.Busy) else "?")
    _clean(story, m, before)
