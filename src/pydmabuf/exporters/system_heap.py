"""The system heap: dma-bufs of RAM pages."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pydmabuf import errors, workloads
from pydmabuf._core import SgTable, pagemap
from pydmabuf._types import PAGE_SIZE, DmaDirection, RangeKind
from pydmabuf.dma import dma_map_sgtable, dma_unmap_sgtable
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf, Exporter, PhysVec, export

__all__ = ["SystemHeap", "HeapBuffer", "MovableHeapBuffer"]


class HeapBuffer(Exporter):
    """The exporter behind one system-heap buffer: pages that never move
    (a static exporter, like the kernel's system heap)."""

    name = "system-heap"

    def __init__(self, machine: Any, pfns: np.ndarray, nbytes: int, *, owned: bool, layout: str, seed: int,
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

    def _table(self) -> SgTable:
        return SgTable.from_pages(self.pfns, offset=self.offset, nbytes=self.nbytes)

    def map_dma_buf(self, attachment: Attachment, direction: DmaDirection) -> SgTable:
        t = self._table()
        dma_map_sgtable(attachment.device, t, direction)
        self.maps += 1
        return t

    def unmap_dma_buf(self, attachment: Attachment, table: SgTable, direction: DmaDirection) -> None:
        dma_unmap_sgtable(attachment.device, table, direction)
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
            phys, lens = workloads.numpy_coalesce(self.pfns)
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
        # The copy moves only pages that hold written data: clear the rest
        # of the new pages first, or they would show their last owner's.
        self.machine.memory.zero_pages(new)
        self.machine.memory.copy_pages(old, new)
        self.pfns = new
        self.moves += 1
        machine = self.machine
        return lambda: machine.pages.free(old)


class SystemHeap:
    """dma-bufs of the machine's RAM (``/dev/dma_heap/system``).

    Parameters
    ----------
    machine : Machine
        Where the pages come from (``machine.pages``).
    """

    def __init__(self, machine: Any) -> None:
        from pydmabuf.machine import Machine

        if not isinstance(machine, Machine):
            raise TypeError(f"SystemHeap: machine must be a Machine, not {type(machine).__name__}")
        self.machine = machine

    def allocate(self, nbytes: int, *, layout: str = "fragmented", seed: int = 1, movable: bool = False,
                 name: str | None = None) -> DmaBuf:
        """A buffer of ``nbytes`` (rounded up to whole pages), zero-filled
        (the kernel's heap allocates with ``__GFP_ZERO``).

        ``layout``: ``contiguous``, ``fragmented`` (runs of mean length 8),
        ``scattered`` (every page alone) or ``thp`` (2 MiB runs); ``seed``
        makes it repeatable.  ``movable`` gives a dynamic exporter whose
        pages :meth:`DmaBuf.move` can migrate.  ENOMEM when RAM is short.
        """
        if not isinstance(nbytes, int):
            raise TypeError(f"allocate: nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise errors.InvalidArgument(f"allocate: nbytes must be positive (got {nbytes!r})")
        npages = -(-nbytes // PAGE_SIZE)
        pfns = self.machine.pages.alloc(npages, layout, seed)
        # system_heap_allocate() takes its pages with __GFP_ZERO: a buffer
        # never shows what the pages' last owner wrote.
        self.machine.memory.zero_pages(pfns)
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
        from pydmabuf._core import buffer_span

        pfns = pagemap(buffer)
        addr, nbytes = buffer_span(buffer)
        for p in (int(pfns.min()), int(pfns.max())):
            k = self.machine.what_is(p << 12)
            if k is None or k[0] not in (RangeKind.RAM, RangeKind.SWIOTLB):
                raise errors.InvalidArgument(f"from_buffer: page {p:#x} is not RAM of {self.machine.name!r}")
        exp = HeapBuffer(self.machine, pfns, nbytes, owned=False, layout="pagemap", seed=0,
                         offset=addr & (PAGE_SIZE - 1), keepalive=buffer)
        return export(exp, nbytes, name=name)
