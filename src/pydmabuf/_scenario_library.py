"""The scenarios ``pydmabuf scenario`` runs (registered on import), part
one: a VFIO BAR exported to importers (iommufd and KVM, RDMA peer to
peer, a host bridge with a bus offset, a device reset), and the helpers
every scenario shares.  Part two is :mod:`pydmabuf._scenario_library_memory`.

Written as a user of pydmabuf would write them: public API only, the
default machine, one function per scenario.  Each registers itself in
:mod:`pydmabuf._scenario_registry`; see :mod:`pydmabuf.scenarios`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pydmabuf import errors
from pydmabuf._scenario_registry import Story, scenario
from pydmabuf._types import DmaDirection, _fmt_size
from pydmabuf._core import SgTable
from pydmabuf.dmabuf import Attachment, ImporterOps
from pydmabuf.exporters.vfio import VfioPciBar
from pydmabuf.importers import DrmGpu, IommufdIoas, KvmVm, RdmaMr
from pydmabuf.importers.kvm import KVM_MEM_VFIO_DMABUF
from pydmabuf.machine import Device, Machine

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


class _DmaMapped(Protocol):
    """What has DMA addresses to show: a mapped table, an RDMA MR."""

    def dma_ranges(self) -> np.ndarray: ...


def _addr(t: _DmaMapped | None) -> str:
    assert t is not None, "nothing mapped to show"
    r = t.dma_ranges()
    return ", ".join(f"[{int(a):#x} +{_fmt_size(int(n))}]" for a, n in r[:3]) + (" ..." if len(r) > 3 else "")


def _machine(strict: bool | None = None) -> Machine:
    """The default machine with no flush-queue timer on its IOMMUs (and,
    with ``strict``, every domain strict or lazy): a lazy domain then
    flushes only when its queue fills or the scenario flushes it, so what
    a scenario narrates (which IOVA is reused, whether a stale IOTLB entry
    still hits) does not depend on whether 10 ms of wall time passed."""
    return Machine.default(flush_timer=False, strict=strict)



# ---------------------------------------------------------------- VFIO -> iommufd and KVM


class _Polite(ImporterOps):
    """A peer-to-peer importer (a GPU driver's dynamic attachment) that
    drops its mapping when told and maps again before its next job."""

    allow_peer2peer = True

    def __init__(self) -> None:
        self.table: SgTable | None = None
        self.invalidations = 0

    def invalidate_mappings(self, attachment: Attachment) -> None:
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

    def invalidate_mappings(self, attachment: Attachment) -> None:
        pass


class ObedientGpu(_Polite):
    """Drops its mapping when told (under the lock the exporter holds);
    maps again before the next job."""


class LazyNic(ImporterOps):
    """Says nothing, does nothing: keeps DMAing to the old addresses."""

    def __init__(self) -> None:
        self.invalidations = 0

    def invalidate_mappings(self, attachment: Attachment) -> None:
        self.invalidations += 1


def _iommu(dev: Device) -> str:
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
