"""The scenarios ``pydmabuf scenario`` runs (registered on import).

Written as a user of pydmabuf would write them: public API only, the
default machine, one function per scenario.  See :mod:`pydmabuf.scenarios`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydmabuf import checks, errors
from pydmabuf._types import DmaDirection, RangeKind, _fmt_size
from pydmabuf.dma import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import ImporterOps
from pydmabuf.exporters import PrivateMemory, SystemHeap
from pydmabuf.exporters.private import PrivateBuffer
from pydmabuf.importers import DrmGpu, RdmaMr
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


# ---------------------------------------------------------------- stale importer


@scenario("stale-importer", "an importer that ignores invalidation is caught by the checker")
def stale_importer(story: Story) -> None:
    """A movable system-heap buffer shared by a GPU that obeys invalidation
    and a NIC whose importer acknowledges it and keeps using its old
    mapping.  The exporter moves the buffer; the NIC's next DMA goes through
    the stale mapping and the checker names the culprit."""
    m = Machine.default()
    before = _live(m)
    gpu, nic = m.device("gpu0"), m.device("nic0")

    class ObedientGpu(ImporterOps):
        """Drops its mapping when told; maps again before the next job."""

        def __init__(self) -> None:
            self.table: Any = None
            self.invalidations = 0

        def invalidate_mappings(self, attachment: Any) -> None:
            self.invalidations += 1
            if self.table is not None:
                attachment.unmap(self.table, BIDI)  # the lock is held in the callback
                self.table = None

    class LazyNic(ImporterOps):
        """Says nothing, does nothing: keeps DMAing to the old addresses."""

        invalidations = 0

        def invalidate_mappings(self, attachment: Any) -> None:
            LazyNic.invalidations += 1

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
    m = Machine.default()
    before = _live(m)
    vfio, gpu = m.device("vfio0"), m.device("gpu0")
    prov = vfio.p2p_provider(0)
    assert prov is not None  # the default machine's vfio0 has a memory BAR0
    base = prov.bar.cpu_start
    rows = np.array([[base, 0x4000], [base + 0x100000, 0x2000], [base + 0x300000, 0x1000]], dtype=np.uint64)
    story.step(f"vfio0's BAR0 at {base:#x}: three slices "
               + ", ".join(f"[{int(p):#x} +{_fmt_size(int(n))}]" for p, n in rows))
    story.detail(f"route from {vfio.name} to {gpu.name}: {m.p2p_map_type(prov, gpu).name} "
                 f"({gpu.name} is behind {gpu.domain.iommu.name if hasattr(gpu.domain, 'iommu') else 'an IOMMU'})")

    story.step("dma_buf_phys_vec_to_sgt(gpu0, provider, ranges), the model's default")
    t = dma_buf_phys_vec_to_sgt(gpu, prov, rows)
    (iova, length), = t.dma_ranges().tolist()
    story.detail(f"one DMA-only entry [{iova:#x} +{_fmt_size(length)}], nents {t.nents}, orig_nents {t.orig_nents}")
    layout = []
    for i, (p, n) in enumerate(rows.tolist()):
        off = int(rows[:i, 1].sum())
        got = gpu.domain.iova_to_phys(iova + off)
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


# ---------------------------------------------------------------- private memory


@scenario("private-memory", "confidential-computing private memory offered to a trusted and an untrusted importer")
def private_memory(story: Story) -> None:
    """A confidential VM's private memory exported as a dma-buf (after the
    TDX Connect / TDISP proposals; nothing is merged upstream).  gpu0 is a
    TDISP device the TEE accepted (``cc_trusted``); nic0 and direct0 are
    not.  Only gpu0 may attach; the host may not map it; DMA that still
    reaches the pages from an untrusted device faults."""
    m = Machine.default()
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
