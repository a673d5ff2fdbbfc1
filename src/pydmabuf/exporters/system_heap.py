"""The system heap: dma-bufs of RAM pages."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pydmabuf import access, errors, page_alloc
from pydmabuf._core import SgTable, buffer_span, pagemap
from pydmabuf._types import PAGE_SIZE, DmaDirection, RangeKind
from pydmabuf.dma import dma_map_sgtable, dma_unmap_sgtable
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf, Exporter, PhysVec, export
from pydmabuf.machine import Machine
from pydmabuf.mapping import PhysList, match_mapping, pal_exporter, sgt_dma_device, sgt_exporter

__all__ = ["SystemHeap", "HeapBuffer", "MovableHeapBuffer", "PalHeapBuffer"]


class HeapBuffer(Exporter):
    """The exporter behind one system-heap buffer: pages that never move
    (a static exporter, like the kernel's system heap)."""

    name = "system-heap"

    def __init__(self, machine: Machine, pfns: np.ndarray, nbytes: int, *, owned: bool, layout: str, seed: int,
                 offset: int = 0, keepalive: Any = None) -> None:
        self.machine = machine
        self.pfns = pfns
        self.nbytes = nbytes
        self.owned = owned  # pages from the machine's allocator (given back on release)
        self.layout = layout
        self.seed = seed
        self.offset = offset  # of the data in the first page (real buffers)
        self.keepalive = keepalive
        self.maps = 0
        self.unmaps = 0
        self.released = 0
        self.provider = None
        self._ranges: np.ndarray | None = None
        self._ranges_of: np.ndarray | None = None  # the pfns array _ranges describes

    def map_dma_buf(self, attachment: Attachment, direction: DmaDirection) -> SgTable:
        dev = sgt_dma_device(attachment)
        if dev is None:
            raise errors.InvalidArgument("map_dma_buf on an attachment that is not SGT")
        t = SgTable.from_pages(self.pfns, offset=self.offset, nbytes=self.nbytes)
        dma_map_sgtable(dev, t, direction)
        self.maps += 1
        return t

    def unmap_dma_buf(self, attachment: Attachment, table: SgTable, direction: DmaDirection) -> None:
        dev = sgt_dma_device(attachment)
        assert dev is not None  # a table exists only for an SGT attachment
        dma_unmap_sgtable(dev, table, direction)
        self.unmaps += 1

    def release(self, dmabuf: DmaBuf) -> None:
        self.released += 1
        if self.owned:
            self.machine.pages.free(self.pfns)
        self.keepalive = None

    def get_phys_vec(self, attachment: Attachment | None) -> PhysVec:
        """The pages as physical ranges (runs of consecutive frames),
        worked out once per set of pages (again after a migration) and
        handed out read-only."""
        if self._ranges is None or self._ranges_of is not self.pfns:
            phys, lens = page_alloc.numpy_coalesce(self.pfns)
            rows = np.ascontiguousarray(np.stack([phys, lens], axis=1))
            if self.offset or rows[:, 1].sum() != self.nbytes:
                rows[0, 0] += np.uint64(self.offset)
                rows[0, 1] -= np.uint64(self.offset)
                rows[-1, 1] -= np.uint64(int(rows[:, 1].sum()) - self.nbytes)
            rows.flags.writeable = False
            self._ranges, self._ranges_of = rows, self.pfns
        return PhysVec(self._ranges, None)

    def mmap(self, dmabuf: DmaBuf, mapping: CpuMapping) -> None:
        pass

    def vmap(self, dmabuf: DmaBuf) -> CpuMapping:
        return CpuMapping(dmabuf, 0, dmabuf.size, takes_lock=False)

    def vunmap(self, dmabuf: DmaBuf, mapping: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.pfns)} pages, {self.layout}>"


class MovableHeapBuffer(HeapBuffer):
    """A dynamic exporter: pinnable, and its pages can move (as TTM's)."""

    name = "system-heap-movable"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pins = 0
        self.moves = 0

    def pin(self, attachment: Attachment) -> None:
        self.pins += 1

    def unpin(self, attachment: Attachment) -> None:
        self.pins -= 1

    def migrate(self, dmabuf: DmaBuf) -> Callable[[], None]:
        """New pages in the same layout; the contents are copied."""
        if self.pins:
            raise errors.Busy("pinned pages cannot move")
        old = self.pfns
        new = self.machine.pages.alloc(len(old), self.layout, self.seed + self.moves + 1)
        access.migrate_pages(self.machine, old, new)
        self.pfns = new
        self.moves += 1
        machine = self.machine
        return lambda: machine.pages.free(old)


class PalHeapBuffer(HeapBuffer):
    """A heap buffer whose exporter is aware of mapping types and offers
    ``[SGT, PAL]``: scatterlist importers get the usual table, importers
    that ask for a physical address list (iommufd-style, :data:`PAL_MODULE
    <pydmabuf.mapping.PAL_MODULE>`) get the pages' runs.  No upstream heap
    offers PAL (the RFC's PAL exporters are VFIO and the iommufd selftest);
    this is the exporter the study measures the PAL path on, over the same
    page layouts as the other paths."""

    name = "system-heap-pal"

    def match_mapping(self, args: Any) -> None:
        match_mapping(args, [sgt_exporter(self), pal_exporter(self)])

    def map_phys(self, attachment: Attachment) -> PhysList:
        """The pages' runs (read-only rows, worked out once)."""
        if attachment.dmabuf.revoked:
            raise errors.Revoked(f"{attachment.dmabuf.name} was revoked")
        return PhysList(self.get_phys_vec(attachment).ranges)

    def unmap_phys(self, attachment: Attachment, phys_list: PhysList) -> None:
        pass  # a copy: nothing to free


class SystemHeap:
    """dma-bufs of the machine's RAM (``/dev/dma_heap/system``).

    Parameters
    ----------
    machine : Machine
        Where the pages come from (``machine.pages``).
    """

    def __init__(self, machine: Machine) -> None:
        if not isinstance(machine, Machine):
            raise TypeError(f"SystemHeap: machine must be a Machine, not {type(machine).__name__}")
        self.machine = machine

    def allocate(self, nbytes: int, *, layout: str = "fragmented", seed: int = 1, movable: bool = False,
                 name: str | None = None) -> DmaBuf:
        """A buffer of ``nbytes`` rounded up to whole pages (its ``size`` is
        the rounded length, as the kernel's heaps export it), zero-filled
        (the kernel's heap allocates with ``__GFP_ZERO``).

        ``layout``: ``contiguous``, ``fragmented`` (runs of mean length 8),
        ``scattered`` (every page alone) or ``thp`` (2 MiB runs); ``seed``
        makes it repeatable.  ``movable`` gives a dynamic exporter whose
        pages :meth:`DmaBuf.move` can migrate.  ENOMEM when RAM is short.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> buf = SystemHeap(Machine.default()).allocate(64 << 10, layout="scattered", name="frames")
        >>> buf.size, buf.name
        (65536, 'frames')
        >>> buf.put()
        """
        if not isinstance(nbytes, int):
            raise TypeError(f"allocate: nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise errors.InvalidArgument(f"allocate: nbytes must be positive (got {nbytes!r})")
        npages = -(-nbytes // PAGE_SIZE)
        # dma_heap_buffer_alloc(): "allocations from all heaps have to begin
        # and end on page boundaries" -- the buffer is PAGE_ALIGN(len), so its
        # last page is whole and mmap can map it.
        nbytes = npages * PAGE_SIZE
        pfns = self.machine.pages.alloc(npages, layout, seed)
        # system_heap_allocate() takes its pages with __GFP_ZERO: a buffer
        # never shows what the pages' last owner wrote.
        access.zero_pages(self.machine, pfns)
        cls = MovableHeapBuffer if movable else HeapBuffer
        exp = cls(self.machine, pfns, nbytes, owned=True, layout=layout, seed=seed)
        try:
            return export(exp, nbytes, name=name)
        except BaseException:
            self.machine.pages.free(pfns)
            raise

    def from_buffer(self, buffer: Any, *, name: str | None = None) -> DmaBuf:
        """A buffer of the pages behind a Python buffer (read through
        :func:`pydmabuf.pagemap`); they stay the Python object's (kept alive
        until release) and never move.  Its pages must lie in the machine's
        RAM (EINVAL otherwise)."""
        pfns = pagemap(buffer)
        addr, nbytes = buffer_span(buffer)
        for p in (int(pfns.min()), int(pfns.max())):
            k = self.machine.what_is(p << 12)
            if k is None or k[0] not in (RangeKind.RAM, RangeKind.SWIOTLB):
                raise errors.InvalidArgument(f"from_buffer: page {p:#x} is not RAM of {self.machine.name!r}")
        exp = HeapBuffer(self.machine, pfns, nbytes, owned=False, layout="pagemap", seed=0,
                         offset=addr & (PAGE_SIZE - 1), keepalive=buffer)
        return export(exp, nbytes, name=name)
