"""iommufd IOAS import of VFIO dma-bufs: IOMMU_IOAS_MAP_FILE's checks,
MMIO areas in every hardware page table, the one-way revoke, no splits,
accounting."""

from __future__ import annotations

import copy
import errno

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pydmabuf import DmaDirection, IommuProt, Machine, checks, errors, mapping
from pydmabuf.dmabuf import Exporter, ImporterOps, close, dma_buf_get, export
from pydmabuf.exporters import SystemHeap, VfioPciBar
from pydmabuf.importers import IommufdIoas
from pydmabuf.importers.iommufd import (IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE,
                                        IOMMU_IOAS_MAP_WRITEABLE)
from pydmabuf.machine import DEFAULT_SPEC, MSI_WINDOW

from driver_helpers import vfio_export
from kernel_rc import kernel_rc

G = 4096
U64 = 2**64 - 1
FIXED_RW = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
MMIO_RW = int(IommuProt.MMIO | IommuProt.READ | IommuProt.WRITE)


def leaves(hwpt):
    return hwpt.domain.pgtable.leaves()[:, [0, 1, 2, 3]].tolist()


def mapped(hwpt):
    return hwpt.domain.stats["mapped_nbytes"]


class Watch(ImporterOps):
    """Another importer of the same buffer, told after iommufd (older
    attachments are told later): records what iommufd had done by then."""

    allow_peer2peer = True

    def __init__(self, hwpts):
        self.hwpts = hwpts
        self.seen = []

    def invalidate_mappings(self, a):
        self.seen.append([mapped(h) for h in self.hwpts])


# ------------------------------------------------------------ the mapping


def test_a_two_page_area_of_mmio_maps_uncached_and_reaches_the_bar(m):
    with vfio_export(m, "vfio0", nbytes=1 << 20) as (v, b):
        paddr = int(b.exporter.ranges[0, 0])
        with IommufdIoas(m) as ioas:
            h = ioas.attach_device(m.device("gpu0"))
            iova = ioas.map_file(b, 0x1000, 0x2000, iova=0x40000, flags=FIXED_RW)
            assert iova == 0x40000
            (area,) = ioas.areas
            assert (area.iova, area.nbytes, area.npages, area.phys) == (0x40000, 0x2000, 2, paddr + 0x1000)
            assert leaves(h) == [[0x40000, paddr + 0x1000, G, MMIO_RW], [0x41000, paddr + 0x2000, G, MMIO_RW]]
            assert not area.prot & IommuProt.CACHE
            assert ioas.locked_vm_pages == 0 and ioas.stats["locked_vm_pages"] == 0
            att = area.pages.attachment
            assert att.pin_count == 1 and att.dynamic and att.map_type.type is mapping.PAL and att.device is None
            assert att.live_mappings == 1  # the PAL list it holds; iommufd never maps a scatterlist
            m.memory.write(paddr + 0x1ffe, b"\x01\x02\x03\x04")
            assert m.device("gpu0").dma_read(0x40ffe, 4) == b"\x01\x02\x03\x04"  # across the two pages
            # A second device behind the same IOMMU joins the same page table.
            assert ioas.attach_device(m.device("ext0")) is h and len(ioas.hwpts) == 1
        assert b.refcount == 1 and not b.attachments  # the IOAS let go of its reference and attachment


def test_map_file_checks_in_order(m):
    with vfio_export(m, "vfio0", nbytes=16 * G) as (v, b):
        ioas = IommufdIoas(m)
        ioas.attach_device(m.device("gpu0"))
        fd = b.get().fd()
        mf = ioas.map_file
        assert kernel_rc(mf, fd, 0, G, flags=1 << 3) == -errno.EOPNOTSUPP
        assert kernel_rc(mf, fd, 0, U64) == -errno.EOVERFLOW  # length ULONG_MAX
        assert kernel_rc(mf, fd, 0, G, iova=U64) == -errno.EOVERFLOW
        assert kernel_rc(mf, fd, 0, G, flags=IOMMU_IOAS_MAP_FIXED_IOVA) == -errno.EINVAL  # neither R nor W
        assert kernel_rc(mf, 999, 0, 0) == -errno.EINVAL  # length 0, before the fd is looked at
        assert kernel_rc(mf, fd, U64 - G + 2, G) == -errno.EOVERFLOW  # start + length - 1 wraps
        assert kernel_rc(mf, 999, 0, G) == -errno.EBADF
        other = __import__("pydmabuf").files.install(object())
        assert kernel_rc(mf, other, 0, G) == -errno.EOPNOTSUPP  # not a dma-buf: memfd is not modelled
        __import__("pydmabuf").files.close(other)
        assert kernel_rc(mf, fd, 15 * G, 2 * G) == -errno.EINVAL  # past the end of the dma-buf
        assert kernel_rc(mf, fd, 0, 0x1800) == -errno.EINVAL  # length not a page multiple
        assert kernel_rc(mf, fd, 0x800, G) == -errno.EINVAL  # start inside a page
        assert kernel_rc(mf, fd, 0, G, iova=0x800, flags=FIXED_RW) == -errno.EINVAL
        assert kernel_rc(mf, fd, 0, 2 * G, iova=U64 - G + 1 - G, flags=FIXED_RW) == -errno.EINVAL  # past the aperture
        assert kernel_rc(mf, fd, 0, G, iova=MSI_WINDOW[0], flags=FIXED_RW) == -errno.EINVAL  # reserved (MSI)
        assert not b.attachments and b.refcount == 2  # nothing was left behind
        assert ioas.map_file(fd, 15 * G, G, iova=0x10000, flags=FIXED_RW) == 0x10000  # the very last page
        assert kernel_rc(mf, fd, 0, 2 * G, iova=0xF000, flags=FIXED_RW) == -errno.EEXIST
        assert len(b.attachments) == 1
        ioas.close()
        close(fd)


def test_map_file_refuses_too_many_pages_for_one_batch(m):
    # 1024 repeats of the whole 16 GiB BAR: a 16 TiB dma-buf.  A slice of
    # 2**32 pages is refused before VFIO is even asked about the ranges.
    v = VfioPciBar(m, "vfio0", ranges=[(0, 16 << 30)] * 1024)
    b = v.export()
    with IommufdIoas(m) as ioas:
        assert kernel_rc(ioas.map_file, b, 0, 16 << 40) == -errno.EINVAL
        # 1024 ranges: the RFC's multi-range walker (P24) takes them
        assert ioas.map_file(b, 0, (16 << 40) - 2 * G) and ioas.areas[0].pages.exp_phys.length == 1024
    b.put()
    v.close()


def test_only_pal_exporters_and_several_ranges_map(m):
    heap = SystemHeap(m).allocate(8 * G)
    v = VfioPciBar(m, "vfio0", ranges=[(0, G), (2 * G, G)])
    two = v.export()
    v1 = VfioPciBar(m, "vfio1")
    v1.set_memory_decode(False)
    revoked = v1.export()
    with IommufdIoas(m) as ioas:
        assert kernel_rc(ioas.map_file, heap, 0, G) == -errno.EINVAL  # SGT only: no PAL to match
        assert ioas.map_file(two, 0, 2 * G)  # two ranges: the walker maps both (P24)
        assert kernel_rc(ioas.map_file, revoked, 0, G) == -errno.ENODEV  # VFIO's attach refuses it
        assert len(ioas.areas) == 1
        ioas.unmap_all()
    for buf in (heap, two, revoked):
        assert not buf.attachments and buf.refcount == 1
        buf.put()
    v.close()
    v1.close()


# -------------------------------------------------------------- revoking


def test_revoke_unmaps_every_domain_at_once(m):
    with vfio_export(m, "vfio0", nbytes=1 << 20) as (v, b):
        ioas = IommufdIoas(m)
        h0 = ioas.attach_device(m.device("gpu0"))
        h1 = ioas.attach_device(m.device("gpu1"))  # another IOMMU: another page table
        watch = Watch([h0, h1])
        wa = b.dynamic_attach(m.device("gpu0"), watch)  # older than iommufd's: told after it
        iova = ioas.map_file(b, 0, 1 << 20)
        m.memory.write(int(b.exporter.ranges[0, 0]), b"x")
        assert m.device("gpu0").dma_read(iova, 1) == b"x" and m.device("gpu1").dma_read(iova, 1) == b"x"
        assert mapped(h0) == mapped(h1) == 1 << 20
        v.set_memory_decode(False, timeout=5)
        assert watch.seen == [[0, 0]]  # iommufd had unmapped both by the time the next importer heard
        (area,) = ioas.areas
        assert area.revoked and area.pages.revokes == 1 and area.phys == 0
        for dev in ("gpu0", "gpu1"):
            with pytest.raises(errors.IommuFault):
                m.device(dev).dma_read(iova, 1)
        # VFIO un-revoking tells iommufd again: nothing happens.
        writes = h0.domain.stats["pte_writes"]
        v.set_memory_decode(True, timeout=5)
        assert area.revoked and area.pages.revokes == 1 and mapped(h0) == 0
        assert h0.domain.stats["pte_writes"] == writes
        with pytest.raises(errors.IommuFault):
            m.device("gpu0").dma_read(iova, 1)
        # Unmapping the revoked area needs no IOMMU unmap.
        calls = (h0.unmap_calls, h1.unmap_calls)
        assert calls == (1, 1)  # the revoke's
        assert ioas.unmap(iova, 1 << 20) == 1 << 20
        assert (h0.unmap_calls, h1.unmap_calls) == calls and h0.domain.stats["pte_writes"] == writes
        # User space maps it again; it works.
        iova2 = ioas.map_file(b, 0, 1 << 20)
        assert m.device("gpu1").dma_read(iova2, 1) == b"x"
        ioas.close()
        b.detach(wa)


def test_a_page_table_attached_after_the_revoke_gets_nothing(m):
    with vfio_export(m, "vfio0", nbytes=64 * G) as (v, b):
        ioas = IommufdIoas(m)
        iova = ioas.map_file(b, 0, 64 * G)  # no device yet: no page table
        v.reset(timeout=5)  # revoke, reset, un-revoke: the area stays revoked
        h = ioas.attach_device(m.device("gpu0"))
        assert mapped(h) == 0 and ioas.areas[0].revoked
        assert ioas.areas[0].pages.tracker == [(ioas.areas[0], h)]
        ioas.detach_device(m.device("gpu0"))  # no unmap for a revoked area
        assert ioas.areas[0].pages.tracker == [] and ioas.hwpts == [] and h.unmap_calls == h.map_calls == 0
        assert ioas.unmap(iova, 64 * G) == 64 * G
        ioas.close()


def test_closing_the_vfio_device_revokes_iommufd(m):
    v = VfioPciBar(m, "vfio0", nbytes=16 * G)
    b = v.export()
    fd = b.fd()
    ioas = IommufdIoas(m)
    h = ioas.attach_device(m.device("gpu0"))
    ioas.map_file(fd, 0, 16 * G)
    v.close(timeout=5)
    assert ioas.areas[0].revoked and mapped(h) == 0
    again = dma_buf_get(fd)  # the fd is still a working dma-buf
    assert again is b and b.revoked
    again.put()
    assert kernel_rc(ioas.map_file, fd, 0, G) == -errno.ENODEV  # attach refused
    ioas.close()
    close(fd)


# ------------------------------------------------------------- unmapping


def test_an_area_cannot_be_split(m):
    with vfio_export(m, "vfio0", nbytes=1 << 20) as (v, b):
        ioas = IommufdIoas(m)
        h = ioas.attach_device(m.device("gpu0"))
        a1 = ioas.map_file(b, 0, 8 * G, iova=0x100000, flags=FIXED_RW)
        a2 = ioas.map_file(b, 8 * G, 8 * G, iova=0x108000, flags=FIXED_RW)
        before = mapped(h)
        assert kernel_rc(ioas.unmap, a1, 4 * G, split=True) == -errno.EOPNOTSUPP  # VFIO type1 compat
        assert kernel_rc(ioas.unmap, a1 + 4 * G, 4 * G, split=True) == -errno.EOPNOTSUPP
        assert kernel_rc(ioas.unmap, a1, 4 * G) == -errno.ENOENT  # IOAS_UNMAP never splits
        # A range over the whole first area and half the second: refused, and
        # (unlike the kernel) the first area is still there.
        assert kernel_rc(ioas.unmap, a1, 12 * G) == -errno.ENOENT
        assert len(ioas.areas) == 2 and mapped(h) == before
        assert kernel_rc(ioas.unmap, 0x200000, G) == -errno.ENOENT  # nothing there
        assert kernel_rc(ioas.unmap, a1, 0) == -errno.EINVAL
        assert kernel_rc(ioas.unmap, U64 - G + 1, 2 * G) == -errno.EOVERFLOW
        assert kernel_rc(ioas.unmap, a1, U64) == -errno.EOVERFLOW
        # Cuts at the areas' own edges are no cut: the compat unmap of both works.
        assert ioas.unmap(a1, 16 * G, split=True) == 16 * G and mapped(h) == 0
        ioas.map_file(b, 0, 4 * G, iova=0x100000, flags=FIXED_RW)
        assert ioas.unmap(0, U64) == 4 * G  # the "unmap everything" form
        assert ioas.unmap_all() == 0
        ioas.close()


# ------------------------------------------------------- devices, IOVA


def test_hardware_page_tables(m):
    with vfio_export(m, "vfio0", nbytes=64 * G) as (v, b):
        ioas = IommufdIoas(m)
        iova = ioas.map_file(b, 0, 64 * G)
        h0 = ioas.attach_device(m.device("gpu0"))
        h_sep = ioas.attach_device(m.device("ext0"), new_hwpt=True)  # same IOMMU, its own table on request
        assert h0 is not h_sep and mapped(h0) == mapped(h_sep) == 64 * G
        assert kernel_rc(ioas.attach_device, m.device("gpu0")) == -errno.EINVAL
        assert kernel_rc(ioas.attach_device, m.device("legacy0")) == -errno.ENODEV  # no IOMMU
        with pytest.raises(TypeError):
            ioas.attach_device("gpu0")
        assert m.device("gpu0").domain is h0.domain  # the whole group moved
        ioas.detach_device(m.device("gpu0"))
        assert m.device("gpu0").domain is m.device("gpu0").iommu_group.default_domain
        assert ioas.hwpts == [h_sep] and mapped(h0) == 0  # the table went with its last device
        assert kernel_rc(ioas.detach_device, m.device("gpu0")) == -errno.ENOENT
        ioas.unmap(iova, 64 * G)
        assert mapped(h_sep) == 0
        ioas.close()
        assert ioas.hwpts == [] and kernel_rc(ioas.map_file, b, 0, G) == -errno.EBADF


def test_reserved_regions_meet_existing_areas(m):
    with vfio_export(m, "vfio0", nbytes=16 * G) as (v, b):
        ioas = IommufdIoas(m)
        ioas.map_file(b, 0, G, iova=MSI_WINDOW[0] + G, flags=FIXED_RW)  # no device yet: not reserved
        assert kernel_rc(ioas.attach_device, m.device("gpu0")) == -errno.EADDRINUSE
        assert ioas.hwpts == [] and ioas.devices == [] and ioas.reserved == []
        ioas.unmap_all()
        ioas.map_file(b, 0, G, iova=1 << 50, flags=FIXED_RW)  # past a 48-bit aperture
        assert kernel_rc(ioas.attach_device, m.device("gpu0")) == -errno.EADDRINUSE
        ioas.unmap_all()
        ioas.attach_device(m.device("gpu0"))
        assert (MSI_WINDOW[0], MSI_WINDOW[0] + MSI_WINDOW[1] - 1) in ioas.reserved
        ioas.close()


def test_iova_allocation_like_the_kernel():
    spec = copy.deepcopy(DEFAULT_SPEC)
    spec["iommus"][1]["aperture_bits"] = 32  # smmu1: a 4 GiB aperture
    m = Machine.from_spec(spec)
    v = VfioPciBar(m, "vfio0")
    b = v.export()
    ioas = IommufdIoas(m)
    ioas.attach_device(m.device("gpu1"))
    assert ioas.map_file(b, 0, 3 * G) == 4 * G  # aligned to 4 pages, never IOVA 0
    assert ioas.map_file(b, 4 * G, G) == G  # the lowest fit, aligned to its start's alignment
    ioas.unmap_all()
    msi_lo, msi_hi = MSI_WINDOW[0], MSI_WINDOW[0] + MSI_WINDOW[1]
    ioas.map_file(b, 0, (msi_lo - (2 << 20)) - (2 << 20), iova=2 << 20, flags=FIXED_RW)  # up to 2 MiB below MSI
    four_m = ioas.map_file(b, 0, 4 << 20)  # does not fit below the window: after it, 2 MiB aligned
    assert four_m == (msi_hi + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert ioas.map_file(b, 0, 2 << 20) == msi_lo - (2 << 20)  # exactly fills the hole below it
    with pytest.raises(errors.NoSpace):
        ioas.map_file(b, 0, 64 << 20)  # nothing left below the 4 GiB aperture
    assert len(ioas.areas) == 3 and len(b.attachments) == 3
    ioas.close()
    b.put()
    v.close()


def test_accounting_and_references(m):
    v = VfioPciBar(m, "vfio0", nbytes=32 * G)
    b = v.export()
    ioas = IommufdIoas(m)
    ioas.attach_device(m.device("gpu0"))
    for k in range(3):
        ioas.map_file(b, k * 8 * G, 8 * G)
    b.put()  # the IOAS keeps the buffer alive
    assert not b.released and b.refcount == 3
    assert ioas.stats == {"areas": 3, "revoked_areas": 0, "nbytes": 24 * G, "npages": 24, "locked_vm_pages": 0,
                          "pinned_attachments": 3, "hwpts": 1, "devices": 1}
    v.set_memory_decode(False)
    assert ioas.stats["revoked_areas"] == 3
    assert "3 area(s) (3 revoked)" in repr(ioas) and "REVOKED" in repr(ioas.areas[0])
    ioas.close()
    assert b.released  # the last area took the last reference with it
    v.close()


# ------------------------------------------------------ a lifecycle model


class IoasLifecycle(RuleBasedStateMachine):
    """Fixed-IOVA maps and unmaps of two VFIO buffers, devices joining and
    leaving, VFIO revoking and un-revoking, against a plain model: every
    page table maps exactly the live, unrevoked areas."""

    SLOTS = [0x100000 + k * 0x10000 for k in range(6)]

    def __init__(self):
        super().__init__()
        self.m = Machine.default()
        self.vfio = {"vfio0": VfioPciBar(self.m, "vfio0", nbytes=256 * G),
                     "vfio1": VfioPciBar(self.m, "vfio1", nbytes=256 * G)}
        self.bufs = {k: v.export() for k, v in self.vfio.items()}
        self.ioas = IommufdIoas(self.m)
        self.areas = {}  # iova -> [buffer name, start, nbytes, revoked]
        self.devices = set()

    @rule(slot=st.integers(0, 5), which=st.sampled_from(["vfio0", "vfio1"]), pages=st.integers(1, 16),
          start=st.integers(0, 200))
    def map(self, slot, which, pages, start):
        iova = self.SLOTS[slot]
        n = pages * G
        clash = any(a < iova + n and iova < a + spec[2] for a, spec in self.areas.items())
        decoding = self.m.device(which).memory_decode
        got = kernel_rc(self.ioas.map_file, self.bufs[which], start * G, n, iova=iova, flags=FIXED_RW)
        want = -errno.ENODEV if not decoding else -errno.EEXIST if clash else iova
        assert got == want
        if got > 0:
            self.areas[iova] = [which, start * G, n, False]

    @rule(slot=st.integers(0, 5), pages=st.integers(1, 40))
    def unmap(self, slot, pages):
        lo, hi = self.SLOTS[slot], self.SLOTS[slot] + pages * G
        inside = [a for a, s in self.areas.items() if a < hi and lo < a + s[2]]
        cut = [a for a in inside if a < lo or a + self.areas[a][2] > hi]
        got = kernel_rc(self.ioas.unmap, lo, hi - lo)
        assert got == (-errno.ENOENT if cut or not inside else sum(self.areas[a][2] for a in inside))
        if got > 0:
            for a in inside:
                del self.areas[a]

    @rule(dev=st.sampled_from(["gpu0", "gpu1", "ext0"]))
    def toggle_device(self, dev):
        d = self.m.device(dev)
        if dev in self.devices:
            self.ioas.detach_device(d)
            self.devices.discard(dev)
        else:
            self.ioas.attach_device(d)
            self.devices.add(dev)

    @rule(which=st.sampled_from(["vfio0", "vfio1"]), on=st.booleans())
    def decode(self, which, on):
        self.vfio[which].set_memory_decode(on)
        if not on:
            for spec in self.areas.values():
                if spec[0] == which:
                    spec[3] = True

    @precondition(lambda self: self.areas)
    @rule(data=st.data())
    def device_dma(self, data):
        iova = data.draw(st.sampled_from(sorted(self.areas)))
        which, start, n, revoked = self.areas[iova]
        for dev in self.devices:
            if revoked:
                with pytest.raises(errors.IommuFault):
                    self.m.device(dev).dma_read(iova, 1)
            else:
                self.m.device(dev).dma_read(iova + n - 1, 1)

    @invariant()
    def page_tables_map_the_live_areas(self):
        want = []
        for iova, (which, start, n, revoked) in sorted(self.areas.items()):
            if not revoked:
                base = int(self.bufs[which].exporter.ranges[0, 0]) + start
                want += [[iova + k * G, base + k * G] for k in range(n // G)]
        for h in self.ioas.hwpts:
            got = h.domain.pgtable.leaves()
            rows = [[int(i) + k * G, int(p) + k * G] for i, p, s, _ in got.tolist() for k in range(int(s) // G)]
            assert rows == want
            assert set(got[:, 3].tolist()) <= {MMIO_RW}
        assert [(a.iova, a.revoked) for a in self.ioas.areas] == [(i, s[3]) for i, s in sorted(self.areas.items())]

    def teardown(self):
        self.ioas.close()
        for b in self.bufs.values():
            b.put()
        for v in self.vfio.values():
            v.close()


TestIoasLifecycle = IoasLifecycle.TestCase
TestIoasLifecycle.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


# ------------------------------------ multi-range lists (the RFC's P24/P25)


class SelftestDmabuf(Exporter):
    """The iommufd selftest's mock exporter after P25: one separately
    allocated page per PAGE_SIZE, one PAL entry per page, ENODEV once
    revoked; it offers PAL only."""

    name = "iommufd-selftest"

    def __init__(self, m, npages, layout="fragmented", rows=None):
        self.machine = m
        self.pfns = m.pages.alloc(npages, layout, 3)
        self.rows = rows if rows is not None else np.stack(
            [self.pfns << np.uint64(12), np.full(npages, G, dtype=np.uint64)], axis=1)
        self.given_back = 0

    def match_mapping(self, args):
        mapping.match_mapping(args, [mapping.pal_exporter(self)])

    def map_phys(self, attachment):
        if attachment.dmabuf.revoked:
            raise errors.Revoked("the mock dma-buf was revoked")
        return mapping.PhysList(self.rows)

    def unmap_phys(self, attachment, phys_list):
        self.given_back += 1

    def release(self, dmabuf):
        self.machine.pages.free(self.pfns)


def dmabuf_get(m, length, **kw):
    """``IOMMU_TEST_OP_DMABUF_GET``: length > 0, whole pages, at most 512."""
    if length <= 0 or length % G or length > 512 * G:
        raise errors.InvalidArgument(f"mock dma-buf length {length:#x}")
    return export(SelftestDmabuf(m, length // G, **kw), length)


def md_check_dmabuf(hwpt, buf, iova, length, offset):
    """``IOMMU_TEST_OP_MD_CHECK_DMABUF``: every page of ``[iova, +length)``
    translates to the backing page ``(offset + i) / PAGE_SIZE``."""
    if iova % G or length % G or offset % G or offset + length > buf.size:
        raise errors.InvalidArgument("md_check_dmabuf arguments")
    i = np.arange(length // G, dtype=np.uint64)
    got = hwpt.domain.pgtable.iova_to_phys_many(np.uint64(iova) + i * np.uint64(G))
    want = buf.exporter.pfns[(offset // G) + i.astype(np.int64)] << np.uint64(12)
    return got.tolist() == want.tolist()


def test_dmabuf_get_checks_the_length(m):
    for bad in (0, G + 1, 513 * G):
        assert kernel_rc(dmabuf_get, m, bad) == -errno.EINVAL


@pytest.mark.parametrize("npages", [1, 64])
def test_dmabuf_multi_page_whole_buffer(m, npages):
    buf = dmabuf_get(m, npages * G)
    with IommufdIoas(m) as ioas:
        h = ioas.attach_device(m.device("gpu0"))
        iova = ioas.map_file(buf, 0, npages * G)
        assert md_check_dmabuf(h, buf, iova, npages * G, 0)
        runs = mapping_runs(buf)
        assert h.map_calls == runs and ioas.areas[0].pages.batches == 1  # one batch, one iommu_map per run
    assert buf.exporter.given_back == 1 and not buf.attachments
    buf.put()


def mapping_runs(buf):
    """Runs of physically contiguous pages of the mock buffer."""
    p = buf.exporter.pfns
    return int(1 + np.count_nonzero(p[1:] != p[:-1] + np.uint64(1)))


def test_dmabuf_multi_page_offset_into_the_middle(m):
    buf = dmabuf_get(m, 16 * G)
    with IommufdIoas(m) as ioas:
        h = ioas.attach_device(m.device("gpu0"))
        iova = ioas.map_file(buf, 4 * G, 8 * G)  # seek into the list: entries 4..11
        assert md_check_dmabuf(h, buf, iova, 8 * G, 4 * G)
        assert not md_check_dmabuf(h, buf, iova, 8 * G, 0)
    buf.put()


def test_dmabuf_multi_page_two_areas_of_one_buffer(m):
    buf = dmabuf_get(m, 16 * G)
    with IommufdIoas(m) as ioas:
        h = ioas.attach_device(m.device("gpu0"))
        i1 = ioas.map_file(buf, 0, 4 * G)
        i2 = ioas.map_file(buf, 8 * G, 4 * G)
        assert md_check_dmabuf(h, buf, i1, 4 * G, 0) and md_check_dmabuf(h, buf, i2, 4 * G, 8 * G)
        assert len(buf.attachments) == 2  # one attachment, one list, per area
        buf.revoke(timeout=5)  # both give their list back inside the callback
        assert all(a.revoked for a in ioas.areas) and buf.exporter.given_back == 2 and buf.live_mappings == 0
        assert h.domain.stats["mapped_nbytes"] == 0
    buf.put()


def test_dmabuf_walker_resumes_when_the_batch_is_full(m, monkeypatch):
    import pydmabuf.importers.iommufd_hwpt as iommufd_hwpt  # batch_to_domain() sizes its batches there

    buf = dmabuf_get(m, 64 * G, layout="fragmented")
    runs = mapping_runs(buf)
    assert runs >= 5
    monkeypatch.setattr(iommufd_hwpt, "TEMP_MEMORY_LIMIT", 12 * 2)  # two batch entries
    with IommufdIoas(m) as ioas:
        h = ioas.attach_device(m.device("gpu0"))
        iova = ioas.map_file(buf, 0, 64 * G)
        assert md_check_dmabuf(h, buf, iova, 64 * G, 0)
        assert ioas.areas[0].pages.batches == -(-runs // 2) and h.map_calls == runs
    buf.put()


def test_dmabuf_walker_merges_contiguous_entries(m):
    buf = dmabuf_get(m, 32 * G, layout="contiguous")
    with IommufdIoas(m) as ioas:
        h = ioas.attach_device(m.device("gpu0"))
        ioas.map_file(buf, 0, 32 * G)
        assert h.map_calls == 1  # 32 one-page entries, one run
    buf.put()


def test_dmabuf_runs_edge_cases():
    from pydmabuf.importers.iommufd import dmabuf_runs

    rows = np.array([[0x100000, 2 * G], [0x102000, G], [0x200000, 4 * G]], dtype=np.uint64)
    assert dmabuf_runs(rows, 0, 7).tolist() == [[0x100, 3], [0x200, 4]]  # the first two merge
    assert dmabuf_runs(rows, 3 * G, 2).tolist() == [[0x200, 2]]  # seek past two entries
    assert dmabuf_runs(rows, G, 3).tolist() == [[0x101, 2], [0x200, 1]]
    assert dmabuf_runs(rows, 0, 0).tolist() == []
    with pytest.raises(errors.InvalidArgument):  # past the end of the list
        dmabuf_runs(rows, 4 * G, 4)
    sub = np.array([[0x100000, G + 0x800], [0x200000, G]], dtype=np.uint64)
    with pytest.raises(errors.InvalidArgument):  # not whole pages: the kernel's offsets would wrap
        dmabuf_runs(sub, 0, 2)
    empty = np.array([[0x100000, G], [0x300000, 0], [0x200000, G]], dtype=np.uint64)
    with pytest.raises(errors.InvalidArgument):
        dmabuf_runs(empty, 0, 2)


def test_dmabuf_lists_that_are_not_whole_pages_are_refused(m):
    rows = np.array([[0x100000, G + 0x800], [0x200000, G - 0x800]], dtype=np.uint64)
    buf = dmabuf_get(m, 2 * G, rows=rows)
    with IommufdIoas(m) as ioas:
        ioas.attach_device(m.device("gpu0"))
        assert kernel_rc(ioas.map_file, buf, 0, 2 * G) == -errno.EINVAL  # strict PAL validation
        assert ioas.areas == [] and not buf.attachments and buf.exporter.given_back == 1
    buf.put()


def test_dmabuf_revoked_mock_is_enodev_and_a_non_pal_exporter_einval(m):
    buf = dmabuf_get(m, 4 * G)
    heap = SystemHeap(m).allocate(4 * G)
    buf.revoke(timeout=1)
    with IommufdIoas(m) as ioas:
        assert kernel_rc(ioas.map_file, buf, 0, 4 * G) == -errno.ENODEV
        assert kernel_rc(ioas.map_file, heap, 0, 4 * G) == -errno.EINVAL
    assert not buf.attachments and not heap.attachments
    buf.put()
    heap.put()


def test_the_publish_revoke_window_exists_only_in_kernel_compat(m, monkeypatch):
    import pydmabuf.importers.iommufd as iommufd

    def revoke_now(pages):
        pages.dmabuf.revoke(timeout=1)

    monkeypatch.setattr(iommufd, "_publish_window", revoke_now)
    buf = dmabuf_get(m, 4 * G)
    with IommufdIoas(m) as ioas:  # default: published under the lock, the hook never runs
        ioas.map_file(buf, 0, 4 * G)
        assert not buf.revoked
    buf2 = dmabuf_get(m, 4 * G)
    with IommufdIoas(m, kernel_compat=True) as ioas:
        with pytest.raises(errors.LifetimeError, match="NULL attachment"):
            ioas.map_file(buf2, 0, 4 * G)
    with checks.report_mode():
        buf3 = dmabuf_get(m, 4 * G)
        with IommufdIoas(m, kernel_compat=True) as ioas:
            ioas.map_file(buf3, 0, 4 * G)
            assert ioas.areas[0].revoked and checks.reports("iommufd-revoke-before-publish")
        buf3.put()
    checks.clear()
    for b in (buf, buf2):
        assert not b.attachments
        b.put()
