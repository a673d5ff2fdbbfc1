"""The scenarios ``pydmabuf scenario`` runs (registered on import).

Written as a user of pydmabuf would write them: public API only, the
default machine, one function per scenario.  See :mod:`pydmabuf.scenarios`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydmabuf import checks, errors
from pydmabuf._types import DmaDirection, RangeKind, _fmt_size
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.exporters import PrivateMemory, SystemHeap
from pydmabuf.exporters.private import PrivateBuffer
from pydmabuf.exporters.vfio import VfioPciBar
from pydmabuf.exporters.vram import VramDevice
from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, RdmaMr
from pydmabuf.importers.drm import DrmDynamicGpu
from pydmabuf.importers.kvm import KVM_MEM_VFIO_DMABUF
from pydmabuf.iotlb import stale_window
from pydmabuf.exporters.system_heap import HeapBuffer
from pydmabuf.machine import Machine
from pydmabuf.scenarios import Story, scenario

BIDI = DmaDirection.BIDIRECTIONAL


def _live(m: Machine) -> dict[str, int]:
    """What is still mapped on the machine: IOVA ranges, bytes in IO page
    tables, swiotlb slots, pages the heap handed out."""
    out = {"iova ranges": 0, "mapped bytes": 0, "bounce slots": 0, "heap pages": m.pages.allocated_pages,
           "private pages": m.private_pages.allocated_pages}
    seen = set()
    for dev in m:
        d = dev.domain
        if d is not None and id(d) not in seen:
            seen.add(id(d))
            d.flush()
            s = d.stats
            out["iova ranges"] += s["iova_live_ranges"]
            out["mapped bytes"] += s["mapped_nbytes"]
    for pool in getattr(m, "swiotlb_pools", {}).values():
        out["bounce slots"] += pool.slots_used
    return out


def _clean(story: Story, m: Machine, before: dict[str, int]) -> None:
    after = _live(m)
    leaked = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    if leaked:
        raise AssertionError(f"the scenario left resources behind: {leaked}")
    story.fact("left behind", "nothing (IOVA, page tables, bounce slots, RAM and private pages as before)")


def _addr(t: Any) -> str:
    r = t.dma_ranges()
    return ", ".join(f"[{int(a):#x} +{_fmt_size(int(n))}]" for a, n in r[:3]) + (" ..." if len(r) > 3 else "")


# ---------------------------------------------------------------- VFIO -> iommufd and KVM


class _Polite(ImporterOps):
    """A peer-to-peer importer (a GPU driver's dynamic attachment) that
    drops its mapping when told and maps again before its next job."""

    allow_peer2peer = True

    def __init__(self) -> None:
        self.table: Any = None
        self.invalidations = 0

    def invalidate_mappings(self, attachment: Any) -> None:
        self.invalidations += 1
        if self.table is not None:
            attachment.unmap(self.table, BIDI)
            self.table = None


# The scenarios' importers live at module level: mypy also records classes
# defined inside a function as module names, which the runtime module then
# lacks (stubtest reports each), and the checker names them by class.


class NoP2p(ImporterOps):
    """An importer without allow_peer2peer."""

    allow_peer2peer = False

    def invalidate_mappings(self, attachment: Any) -> None:
        pass


class ObedientGpu(_Polite):
    """Drops its mapping when told (under the lock the exporter holds);
    maps again before the next job."""


class LazyNic(ImporterOps):
    """Says nothing, does nothing: keeps DMAing to the old addresses."""

    def __init__(self) -> None:
        self.invalidations = 0

    def invalidate_mappings(self, attachment: Any) -> None:
        self.invalidations += 1


def _iommu(dev: Any) -> str:
    g = dev.iommu_group
    return str(g.iommu.name) if g is not None else "no IOMMU"


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _bar(vfio: VfioPciBar) -> tuple[int, int]:
    r = vfio.dmabufs[0].exporter.ranges  # type: ignore[attr-defined]  # the VFIO exporter keeps its ranges
    return int(r[0, 0]), int(r[0, 1])


@scenario("vfio-iommufd-kvm", "a VFIO BAR exported to iommufd and to a KVM guest, then revoked and restored")
def vfio_iommufd_kvm(story: Story) -> None:
    """User space exports 1 MiB of vfio0's BAR0 as a dma-buf, maps it into
    an iommufd IO address space used by gpu0 and gpu1 (two IOMMUs, two
    hardware page tables) and into a KVM guest's memory slot (the posted
    RFC, not upstream KVM).  The device stops decoding its memory: VFIO
    revokes, iommufd unmaps every page table for good, KVM zaps its
    second-stage entries.  Decoding comes back: KVM faults the pages in
    again, iommufd's area stays dead until user space maps it anew."""
    m = _machine()
    before = _live(m)
    gpu0, gpu1 = m.device("gpu0"), m.device("gpu1")
    vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
    buf = vfio.export()
    paddr, n = _bar(vfio)
    m.memory.write(paddr, b"BAR data")
    story.step(f"VFIO_DEVICE_FEATURE_DMA_BUF on vfio0: BAR0 [{paddr:#x} +{_fmt_size(n)}] as {buf.name!r} "
               "(MMIO, no struct pages, DMA-only)")

    ioas = IommufdIoas(m)
    h0, h1 = ioas.attach_device(gpu0), ioas.attach_device(gpu1)
    iova = ioas.map_file(buf, 0, n)
    story.step(f"IOMMU_IOAS_MAP_FILE: iommufd maps it at IOVA {iova:#x} in {len(ioas.hwpts)} hardware page tables "
               f"({gpu0.name} on {_iommu(gpu0)}, {gpu1.name} on {_iommu(gpu1)})")
    att = ioas.areas[0].pages.attachment
    story.detail(f"gpu0 reads {gpu0.dma_read(iova, 8)!r}, gpu1 reads {gpu1.dma_read(iova, 8)!r}; "
                 f"pinned: {att.pin_count if att is not None else 0}, locked_vm pages: {ioas.locked_vm_pages}")

    vm = KvmVm(m, private_mem=True)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, KVM_MEM_VFIO_DMABUF, gpa, n, guest_memfd=buf)
    story.step(f"KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_VFIO_DMABUF: guest physical {gpa:#x} +{_fmt_size(n)}")
    story.detail(f"the guest reads {vm.guest_read(gpa, 8)!r} (first touch: {vm.stats['mapped_pages']} page "
                 "faulted into the second-stage table through the exporter's ranges)")

    story.step("the device stops decoding memory (PCI_COMMAND_MEMORY cleared): VFIO revokes the dma-buf")
    vfio.set_memory_decode(False, timeout=5)
    area = ioas.areas[0]
    story.detail(f"iommufd: area revoked={area.revoked}, every page table unmapped "
                 f"(gpu0 {h0.unmap_calls}, gpu1 {h1.unmap_calls} unmap calls)")
    story.detail(f"KVM: second stage zapped ({vm.zaps} zap), mapped pages now {vm.stats['mapped_pages']}")
    f0 = story.refused(gpu0.dma_read, iova, 8, expect=errors.IommuFault)
    f1 = story.refused(vm.guest_read, gpa, 8, expect=errors.IOFailure)

    story.step("decoding comes back: VFIO un-revokes")
    vfio.set_memory_decode(True, timeout=5)
    data = vm.guest_read(gpa, 8)
    story.detail(f"KVM faults the page in again: the guest reads {data!r}")
    f2 = story.refused(gpu1.dma_read, iova, 8, expect=errors.IommuFault)
    story.detail("iommufd's revoke is one-way: the area stays dead until user space maps the buffer again")
    iova2 = ioas.map_file(buf, 0, n)
    story.detail(f"a new IOMMU_IOAS_MAP_FILE at {iova2:#x}: gpu1 reads {gpu1.dma_read(iova2, 8)!r}")

    story.step("teardown: the VM and the IOAS close, the buffer's reference goes, the VFIO device closes")
    vm.close()
    ioas.close()
    buf.put()
    vfio.close()
    story.fact("iommufd page tables", len([h0, h1]))
    story.fact("DMA after the revoke", f"{sum(isinstance(e, errors.IommuFault) for e in (f0, f2))} faulted (EFAULT)")
    story.fact("guest access while revoked", f"EIO ({type(f1).__name__})")
    story.fact("after decode comes back", f"KVM re-faults ({data.decode()}); iommufd stays revoked")
    _clean(story, m, before)


# ---------------------------------------------------------------- VFIO -> RDMA


@scenario("vfio-rdma-p2p", "a VFIO BAR registered as an RDMA memory region, peer to peer through the host bridges")
def vfio_rdma_p2p(story: Story) -> None:
    """vfio0 sits behind host bridge hb1, the RDMA NIC nic0 behind a switch
    on hb0: peer traffic between them crosses the host bridges, so the route
    is THRU_HOST_BRIDGE and the NIC's IOMMU maps the BAR (MMIO, no CACHE).
    The MR is an on-demand-paging MR on a dynamic attachment: a device
    reset invalidates it, the NIC's next access faults it back in."""
    m = _machine()
    before = _live(m)
    nic = m.device("nic0")
    vfio = VfioPciBar(m, "vfio0", offset=2 << 20, nbytes=2 << 20)
    buf = vfio.export()
    paddr, n = _bar(vfio)
    story.step(f"vfio0 exports BAR0 [{paddr:#x} +{_fmt_size(n)}]; nic0 is behind {nic.host_bridge.name}, "
               f"vfio0 behind {m.device('vfio0').host_bridge.name}")

    mr = RdmaMr.register(nic, buf, 0, n)
    story.step("ibv_reg_dmabuf_mr: nic0 registers the buffer as an MR (dynamic attachment, mapped at registration)")
    story.detail(f"route {mr.route.name if mr.route is not None else None}; DMA addresses {_addr(mr)}")
    mr.write(0x1000, b"rdma write")
    got = m.memory.read(paddr + 0x1000, 10)
    story.detail(f"an RDMA WRITE lands in the BAR: {got!r}")

    story.step("an importer without allow_peer2peer tries to attach the same buffer")
    story.refused(buf.dynamic_attach, nic, NoP2p(), expect=errors.InvalidArgument)
    story.detail("(VFIO offers [PAL, SGT P2P]; a scatterlist importer that takes no P2P matches neither)")

    story.step("vfio0 is reset (VFIO_DEVICE_RESET): revoke, reset, un-revoke")
    vfio.reset(timeout=5)
    zaps = mr.zaps
    story.detail(f"the MR's translation was zapped ({zaps} zap) and its mapping dropped")
    mr.write(0x1000, b"after rst!")
    story.detail(f"the next RDMA WRITE faults the MR back in ({mr.faults} faults in all) and lands: "
                 f"{m.memory.read(paddr + 0x1000, 10)!r}")

    story.step("teardown: deregister the MR, put the buffer, close the device")
    mr.dereg()
    buf.put()
    vfio.close()
    story.fact("route", "THRU_HOST_BRIDGE (IOMMU-mapped MMIO)")
    story.fact("MR faults", f"{mr.faults} (registration, then after the reset)")
    story.fact("zaps by the reset", zaps)
    _clean(story, m, before)


# ---------------------------------------------------------------- bus offset


@scenario("vfio-gpu-bus-offset", "a VFIO BAR to a GPU under a host bridge whose bus addresses are offset")
def vfio_gpu_bus_offset(story: Story) -> None:
    """Host bridge hb2 translates CPU physical addresses to PCI bus
    addresses with an offset (as on some ARM servers).  vfio1 and gpu1 sit
    behind one switch under it, so gpu1 reaches vfio1's BAR by bus address
    through the switch, without the IOMMU: the DMA address must be the bus
    address, phys + offset, not the CPU physical address.  gpu0, under
    another host bridge, cannot reach it: the path crosses hb2, whose root
    complex is not on the kernel's P2P whitelist."""
    m = _machine()
    before = _live(m)
    gpu1, gpu0 = m.device("gpu1"), m.device("gpu0")
    hb = gpu1.host_bridge
    vfio = VfioPciBar(m, "vfio1", nbytes=1 << 20)
    buf = vfio.export()
    paddr, n = _bar(vfio)
    prov = m.device("vfio1").p2p_provider(0)
    assert prov is not None
    off = _signed(prov.bus_offset)
    story.step(f"vfio1 exports BAR0 [{paddr:#x} +{_fmt_size(n)}]; {hb.name} offsets bus addresses by "
               f"{'-' if off < 0 else '+'}{abs(off):#x}")

    story.step("gpu1's driver attaches dynamically (peer to peer, revocable) and maps")
    ops = _Polite()
    a = buf.dynamic_attach(gpu1, ops)
    ops.table = a.map_unlocked(BIDI)
    (dma, length), = ops.table.dma_ranges().tolist()
    story.detail(f"route {a.p2p_route.name if a.p2p_route is not None else None}: one DMA-only entry [{dma:#x} +{_fmt_size(length)}] = phys {paddr:#x} "
                 f"{'-' if off < 0 else '+'} {abs(off):#x}; the IOMMU maps nothing")
    m.memory.write(paddr, b"peer data")
    story.detail(f"gpu1 reads {gpu1.dma_read(dma, 9)!r} at the bus address")
    wrong = story.refused(gpu1.dma_read, paddr, 9, expect=errors.DmaBufError)
    story.detail("(the CPU physical address means nothing on the bus)")

    story.step("a classic DRM PRIME import of it (a static importer of pages, no allow_peer2peer)")
    story.refused(DrmGpu.prime_import, gpu1, buf, expect=errors.InvalidArgument)
    story.step(f"gpu0, under {gpu0.host_bridge.name}, attaches: the traffic would cross {hb.name}, "
               "whose root complex is not on the kernel's P2P whitelist")
    story.refused(buf.dynamic_attach, gpu0, _Polite(), expect=errors.InvalidArgument)
    story.detail("(the SGT P2P entry matches only an importer with a P2P route: the negotiation refuses it)")

    story.step("teardown")
    a.unmap_unlocked(ops.table, BIDI)
    ops.table = None
    buf.detach(a)
    buf.put()
    vfio.close()
    story.fact("route", "BUS_ADDR (through the switch, no IOMMU)")
    story.fact("DMA address", f"phys {'-' if off < 0 else '+'} {abs(off):#x}")
    story.fact("CPU physical address on the bus", type(wrong).__name__)
    story.fact("gpu0 (other host bridge)", "NOT_SUPPORTED: attach refused (EINVAL)")
    _clean(story, m, before)


# ---------------------------------------------------------------- reset


@scenario("device-reset", "a device reset while every importer holds a mapping")
def device_reset(story: Story) -> None:
    """vfio0's BAR is in use by four importers at once: an iommufd IO
    address space (for gpu0), a KVM guest slot, an RDMA MR on nic0 and a
    GPU driver's dynamic attachment on gpu0.  User space resets the device.
    VFIO revokes first: every importer is told, under the reservation lock,
    and stops; VFIO waits until nothing is mapped, resets, and un-revokes.
    Afterwards the dynamic importers map again and work, iommufd's area
    stays revoked, and the one access made on purpose through a dropped
    address faults once the IOTLB was invalidated: gpu0's domain is lazy
    (DMA-FQ), so its driver's unmap at the revoke only queued the
    invalidation, and until the flush queue's timer fires a translation
    gpu0 cached before the reset still reaches the BAR (see
    ``lazy-iotlb-window``).  The scenario waits for that flush (it runs
    the timer's work with ``IommuDomain.flush()``) before the stale
    access; only then does hardware promise a fault."""
    m = _machine()
    before = _live(m)
    gpu0, nic = m.device("gpu0"), m.device("nic0")
    vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
    buf = vfio.export()
    paddr, n = _bar(vfio)
    m.memory.write(paddr, b"before reset")
    story.step(f"vfio0 exports BAR0 [{paddr:#x} +{_fmt_size(n)}]; four importers map it")

    ioas = IommufdIoas(m)
    ioas.attach_device(m.device("gpu1"))
    iova = ioas.map_file(buf, 0, n)
    vm = KvmVm(m, private_mem=True)
    gpa = 1 << 32
    vm.set_user_memory_region2(0, KVM_MEM_VFIO_DMABUF, gpa, n, guest_memfd=buf)
    vm.guest_read(gpa, 4)
    mr = RdmaMr.register(nic, buf, 0, n)
    ops = _Polite()
    a = buf.dynamic_attach(gpu0, ops)
    ops.table = a.map_unlocked(BIDI)
    old = int(ops.table.dma_ranges()[0, 0])
    gpu0.dma_read(old, 4)  # gpu0's IOTLB now caches the translation
    story.detail(f"iommufd for gpu1 at IOVA {iova:#x}; KVM slot at GPA {gpa:#x}; nic0 MR {_addr(mr)}; "
                 f"gpu0 driver {_addr(ops.table)} (gpu0 has read through it)")
    story.detail(f"{len(buf.attachments)} attachments, {buf.live_mappings} live mappings, "
                 f"{sum(at.pin_count for at in buf.attachments)} pin (iommufd)")

    story.step("VFIO_DEVICE_RESET")
    vfio.reset(timeout=5)
    story.detail(f"told at the revoke and again at the un-revoke: gpu0 driver {ops.invalidations}x; "
                 f"RDMA MR zapped {mr.zaps}x, KVM zapped {vm.zaps}x (nothing left the second time), "
                 f"iommufd area revoked={ioas.areas[0].revoked}")
    story.detail(f"after the reset: {buf.live_mappings} live mappings, device resets {vfio.resets}")

    story.step("gpu0's lazy domain flushes its queue (the 10 ms timer's work: one IOTLB flush)")
    dom0 = gpu0.domain
    assert dom0 is not None  # gpu0 is behind iommu0
    dom0.flush()
    story.detail("the driver's unmap at the revoke was queued with no invalidation: until the flush, the "
                 "translation gpu0 cached still reached the BAR; the flush invalidates the IOTLB and frees the IOVA")
    story.step("gpu0 uses the address it had before (deliberately stale)")
    stale = story.refused(gpu0.dma_read, old, 4, expect=errors.IommuFault)

    story.step("everyone carries on")
    ops.table = a.map_unlocked(BIDI)
    results = {
        "gpu0 driver": gpu0.dma_read(int(ops.table.dma_ranges()[0, 0]), 6),
        "RDMA MR": mr.read(0, 6),
        "KVM guest": vm.guest_read(gpa, 6),
    }
    for who, data in results.items():
        story.detail(f"{who} reads {data!r}")
    dead = story.refused(m.device("gpu1").dma_read, iova, 4, expect=errors.IommuFault)
    story.detail("iommufd's area stays revoked, as upstream: user space must map it again")

    story.step("teardown")
    a.unmap_unlocked(ops.table, BIDI)
    ops.table = None
    buf.detach(a)
    mr.dereg()
    vm.close()
    ioas.close()
    buf.put()
    vfio.close()
    story.fact("importers told", 4)
    story.fact("importers working after the reset", f"{sum(d == b'before' for d in results.values())} of 3 dynamic")
    story.fact("faults afterwards", f"1 deliberate stale access ({type(stale).__name__}) + iommufd's revoked area "
               f"({type(dead).__name__})")
    story.fact("stale access faults", f"after the IOTLB flush ({dom0.type} domain)")
    _clean(story, m, before)


# ---------------------------------------------------------------- the IOTLB


def _machine(strict: bool | None = None) -> Machine:
    """The default machine with no flush-queue timer on its IOMMUs (and,
    with ``strict``, every domain strict or lazy): a lazy domain then
    flushes only when its queue fills or the scenario flushes it, so what
    a scenario narrates (which IOVA is reused, whether a stale IOTLB entry
    still hits) does not depend on whether 10 ms of wall time passed."""
    return Machine.default(flush_timer=False, strict=strict)


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
    gdom = gpu.domain
    assert gdom is not None  # gpu0 is behind iommu0
    base = prov.bar.cpu_start
    rows = np.array([[base, 0x4000], [base + 0x100000, 0x2000], [base + 0x300000, 0x1000]], dtype=np.uint64)
    story.step(f"vfio0's BAR0 at {base:#x}: three slices "
               + ", ".join(f"[{int(p):#x} +{_fmt_size(int(n))}]" for p, n in rows))
    story.detail(f"route from {vfio.name} to {gpu.name}: {m.p2p_map_type(prov, gpu).name} "
                 f"({gpu.name} is behind {gdom.iommu.name if hasattr(gdom, 'iommu') else 'an IOMMU'})")

    story.step("dma_buf_phys_vec_to_sgt(gpu0, provider, ranges), the model's default")
    t = dma_buf_phys_vec_to_sgt(gpu, prov, rows)
    (iova, length), = t.dma_ranges().tolist()
    story.detail(f"one DMA-only entry [{iova:#x} +{_fmt_size(length)}], nents {t.nents}, orig_nents {t.orig_nents}")
    layout = []
    for i, (p, n) in enumerate(rows.tolist()):
        off = int(rows[:i, 1].sum())
        got = gdom.iova_to_phys(iova + off)
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


def _kind(a: Any) -> str:
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
    from pydmabuf import mapping
    from pydmabuf.exporters.xe_vfio import XeSriovPf, XeVfioPciBar, xe_iov_importer, xe_iov_map, xe_iov_unmap

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
    import copy

    from pydmabuf.machine import DEFAULT_SPEC

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
    import threading
    import time

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
