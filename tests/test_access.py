"""The one access gate (docs/access-gate.md): every way a device, the CPU
or a guest reaches memory passes :mod:`pydmabuf.access`, which refuses
what the rules forbid (confidential memory to an untrusted device, even
through a bounce buffer; pages of an older generation; a released buffer)
with the accessor's own error naming it."""

from __future__ import annotations

import ast
import errno
import pathlib

import numpy as np
import pytest

import pydmabuf
from pydmabuf import DmaDirection, IovaState, Machine, SgTable, access, errors
from pydmabuf.dma import dma_map_phys, dma_map_sgtable, dma_unmap_phys
from pydmabuf.dmabuf import ImporterOps, export
from pydmabuf.exporters import SystemHeap
from pydmabuf.exporters.system_heap import HeapBuffer

G = 4096
BIDI = DmaDirection.BIDIRECTIONAL
TO = DmaDirection.TO_DEVICE
FROM = DmaDirection.FROM_DEVICE
#: A page of the default machine's confidential memory.
SECRET = 61 << 30
PKG = pathlib.Path(pydmabuf.__file__).parent


@pytest.fixture
def m(m: Machine) -> Machine:
    """The shared default machine with a secret in its confidential memory."""
    m.memory.write(SECRET, b"top secret" * 500)
    return m


# --------------------------------------------------------------- structure


def _calls(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(receiver text, method, line) of every call ``x.method(...)``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            out.append((ast.unparse(node.func.value), node.func.attr, node.lineno))
    return out


def test_only_the_gate_touches_raw_memory_and_no_path_reads_memory_past_it():
    """No module but access.py calls PhysMemory's raw accessors, and no
    module of the model reads or writes ``machine.memory`` directly: a new
    path that tries fails here.  The scenario library is user code (it
    seeds a BAR's contents, as a test would)."""
    raw, direct = [], []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for recv, attr, line in _calls(path):
            if attr.startswith("_raw_") and rel not in ("access.py", "memory.py"):
                raw.append(f"{rel}:{line} {recv}.{attr}")
            if (attr in ("read", "write", "copy", "copy_pages") and recv.split(".")[-1] == "memory"
                    and rel not in ("_scenario_library.py", "_scenario_library_memory.py")):
                direct.append(f"{rel}:{line} {recv}.{attr}")
    assert raw == [] and direct == []
    assert not hasattr(pydmabuf.memory.PhysMemory, "copy")  # bounce copies go through access.bounce_copy


def test_the_gate_runs_registered_checks_for_its_kind_only(m):
    seen = []

    def spy(subject, addr, nbytes, write):
        seen.append((subject, addr, nbytes, write))

    access.add_check(access.DEVICE, spy)
    try:
        d = m.device("direct0")
        d.dma_write(0x1_0000_0000, b"abcd")
        assert d.dma_read(0x1_0000_0000, 4) == b"abcd"
        b = SystemHeap(m).allocate(G)
        with b.mmap() as c:
            c.write(0, b"x")
        b.put()
        assert seen == [(d, 0x1_0000_0000, 4, True), (d, 0x1_0000_0000, 4, False)]
    finally:
        access._checks[access.DEVICE].remove(spy)
    with pytest.raises(ValueError):
        access.add_check("dsp", spy)


# -------------------------------------- confidential memory through bounces


@pytest.mark.parametrize("direction", [TO, FROM, BIDI])
def test_untrusted_direct_device_may_not_bounce_confidential_memory(m, direction):
    """legacy0 reaches 32 bits: confidential memory at 61 GiB would be
    bounced through swiotlb, the CPU copying it into memory the device
    reads.  Refused as the device's own access is (EFAULT), before a slot
    is taken, whatever the direction."""
    pool = m.swiotlb_pools["swiotlb"]
    d = m.device("legacy0")
    with pytest.raises(errors.IommuFault) as ei:
        dma_map_phys(d, SECRET, G, direction)
    assert ei.value.errno == errno.EFAULT and "legacy0" in str(ei.value) and "confidential" in str(ei.value)
    assert pool.slots_used == 0 and pool.bounced_to_device == 0
    t = SgTable.from_pages(np.array([SECRET >> 12, (SECRET >> 12) + 1], dtype=np.uint64))
    with pytest.raises(errors.IommuFault):
        dma_map_sgtable(d, t, direction)
    assert t.mapping is None and pool.slots_used == 0
    assert b"secret" not in m.memory.read(pool.phys_start, 64 << 10)


def test_untrusted_external_device_may_not_bounce_confidential_memory(m):
    """ext0 bounces sub-granule pieces (iommu_dma_map_phys, the IOVA link
    and map_sg of an untrusted device): each is refused; aligned pieces map
    and fault at the access, as before."""
    pool = m.swiotlb_pools["swiotlb"]
    d = m.device("ext0")
    with pytest.raises(errors.IommuFault):
        dma_map_phys(d, SECRET + 0x10, 0x100, TO)
    with pytest.raises(errors.IommuFault):
        dma_map_sgtable(d, SgTable.from_pages(np.array([SECRET >> 12], dtype=np.uint64), offset=0x100, nbytes=0x200),
                        BIDI)
    st = IovaState.try_alloc(d, SECRET + 0x10, 2 * G)
    with pytest.raises(errors.IommuFault):
        st.link(SECRET + 0x10, 0, 0x100, BIDI)
    assert st.linked_nbytes == 0
    st.free()
    assert pool.slots_used == 0 and pool.bounced_to_device == 0
    dma = dma_map_phys(d, SECRET, G, BIDI)  # aligned: no bounce; the access faults
    with pytest.raises(errors.IommuFault):
        d.dma_read(dma, 8)
    dma_unmap_phys(d, dma, G, BIDI)


def test_bouncing_ordinary_memory_still_copies_both_ways(m):
    d = m.device("legacy0")
    phys = 0x1_0000_0000  # above legacy0's 32-bit reach
    m.memory.write(phys, b"plain data")
    dma = dma_map_phys(d, phys, G, BIDI)
    assert d.dma_read(dma, 10) == b"plain data"
    d.dma_write(dma, b"PLAIN")
    dma_unmap_phys(d, dma, G, BIDI)
    assert m.memory.read(phys, 10) == b"PLAIN data"


# ------------------------------------------------------------- CPU mappings


def test_a_vmap_pins_its_pages_against_a_move_and_a_stale_one_is_refused(m):
    b = SystemHeap(m).allocate(4 * G, movable=True)
    with b.resv:
        v = b.vmap()
        v.write(0x20, b"kept")
        with pytest.raises(errors.Busy):
            b.move()
        assert b.generation == 0
        b.vunmap(v)
        b.move()  # allowed now: nothing maps the old pages for good
        assert b.generation == 1
        with pytest.raises(errors.IOFailure) as ei:
            v.read(0x20, 4)  # the old vmap still points at the old pages: the gate refuses it
        assert "moved" in str(ei.value)
        v2 = b.vmap()
        assert v2.read(0x20, 4) == b"kept"
        b.vunmap(v2)
    b.put()


def test_an_mmap_holds_the_buffer_until_it_is_closed(m):
    heap = SystemHeap(m)
    b = heap.allocate(4 * G)
    pages = m.pages.allocated_pages
    c = b.mmap()
    assert b.refcount == 2
    c.write(0, b"mine")
    b.put()  # the user's last reference: the mapping still holds the file
    assert not b.released and m.pages.allocated_pages == pages
    other = heap.allocate(4 * G)  # cannot be handed the mapped pages
    with other.mmap() as oc:
        oc.write(0, b"theirs")
    assert c.read(0, 4) == b"mine"
    assert not set(other.exporter.pfns.tolist()) & set(b.exporter.pfns.tolist())
    c.close()
    assert b.released and m.pages.allocated_pages == pages  # b's pages went, other's came
    with pytest.raises(errors.IOFailure):
        c.read(0, 4)
    c.close()  # twice: nothing
    other.put()
    assert m.pages.allocated_pages == 0


def test_a_dropped_mapping_puts_its_reference(m):
    b = SystemHeap(m).allocate(G)
    b.mmap().write(0, b"x")  # collected at once
    assert b.refcount == 1
    b.put()
    assert b.released


def test_the_cpu_never_reaches_confidential_memory(m):
    """An exporter that (wrongly) lets the host map confidential pages:
    the gate still refuses the CPU access."""
    class Leaky(HeapBuffer):
        def mmap(self, dmabuf, mapping):
            pass

    b = export(Leaky(m, np.array([SECRET >> 12], dtype=np.uint64), G, owned=False, layout="contiguous", seed=0), G)
    with b.mmap() as c:
        with pytest.raises(errors.IOFailure) as ei:
            c.read(0, 10)
        assert "confidential" in str(ei.value)
    b.put()


@pytest.mark.parametrize("nbytes", [1, G - 1, G + 1, 5000, 3 * G - 1, 3 * G])
def test_heap_buffers_are_whole_pages_and_mmap_maps_them_whole(m, nbytes):
    """dma_heap_buffer_alloc() page-aligns the size, so mmap() with its
    defaults maps every byte asked for (dma_buf_mmap_internal refuses a
    trailing partial page, which a heap buffer no longer has)."""
    b = SystemHeap(m).allocate(nbytes)
    assert b.size == -(-nbytes // G) * G
    with b.mmap() as c:
        c.write(nbytes - 1, b"z")
        assert c.read(nbytes - 1, 1) == b"z" and c.nbytes == b.size
    b.put()


# ------------------------------------------------------ the top of the space


class _Told(ImporterOps):
    def invalidate_mappings(self, attachment):
        pass  # told, keeps the mapping: DMA through it is now stale


@pytest.mark.parametrize("name", ["gpu0", "gpu1", "ext0", "legacy0", "direct0", "nic0"])
def test_an_access_ending_at_2_64_faults_even_with_a_stale_mapping(m, name):
    d = m.device(name)
    b = SystemHeap(m).allocate(4 * G)
    a = b.dynamic_attach(d, _Told())
    with b.resv:
        t = a.map(BIDI)
        b.invalidate_mappings()
    for call in (lambda: d.dma_read(2**64 - 8, 8), lambda: d.dma_write(2**64 - 1, b"x")):
        with pytest.raises(errors.IommuFault) as ei:
            call()
        assert ei.value.errno == errno.EFAULT and name in str(ei.value)
    with b.resv:
        a.unmap(t, BIDI)
    b.detach(a)
    b.put()


def test_dma_through_a_mapping_of_a_released_buffer_is_reported(m):
    """Report mode lets a buffer be released with a live mapping (the
    kernel WARNs and goes on); DMA through that mapping afterwards reaches
    pages the allocator may have handed on, and the gate's dma-buf check
    reports it, naming the importer."""
    from pydmabuf import checks

    d = m.device("gpu0")
    b = SystemHeap(m).allocate(2 * G)
    a = b.attach(d)
    t = a.map_unlocked(BIDI)
    addr = int(t.dma_ranges()[0, 0])
    checks.clear()
    with checks.report_mode():
        b.put()  # release-with-users, recorded
        assert b.released
        d.dma_read(addr, 8)
        rep = checks.reports("dma-after-release")
    assert len(rep) == 1 and "gpu0" in rep[0].message and rep[0].culprit
    with pytest.raises(errors.LifetimeError, match="released"):
        d.dma_read(addr, 8)
    checks.clear()
    with checks.report_mode():
        a.unmap_unlocked(t, BIDI)
        b.detach(a)
    checks.clear()
