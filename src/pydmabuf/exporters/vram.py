"""A GPU's VRAM as a dma-buf exporter, in the style of TTM (amdgpu, xe).

Buffers live in the GPU's BAR-visible VRAM (a large prefetchable BAR;
the default machine's ``gpu0`` BAR1) and move between VRAM and system
memory: evicted under memory pressure (an allocation that finds VRAM full
evicts the least recently placed unpinned buffers, trylocking their
reservation objects as ``ttm_bo_evict_alloc()`` does) or on request
(:meth:`VramDevice.evict` / :meth:`VramDevice.restore`).

A move is asynchronous, as TTM's accelerated moves are
(``amdgpu_bo_move()`` -> ``amdgpu_move_blit()`` ->
``ttm_bo_move_accel_cleanup()``), all under the buffer's reservation
lock:

1. refused with EBUSY while the buffer is pinned (a static importer's map
   pins it, ``amdgpu_dma_buf_pin()``);
2. the destination is allocated (nothing changes if that fails);
3. importers are invalidated (``amdgpu_bo_move_notify()`` ->
   ``dma_buf_move_notify()``);
4. the new placement is published at once: the physical ranges, the
   buffer's generation (the access gate's leases) change now;
5. the copy is queued on the GPU's copy engine behind every fence the
   buffer had (the copy syncs to the whole reservation object) and its
   fence is added with usage KERNEL; old system pages stay allocated until
   the copy is done (TTM's ghost object), old VRAM goes back to the
   manager at once and whoever is placed there next waits for the move
   fence (``ttm_bo_move_pipeline_evict()``, ``ttm_bo_add_move_fence()``).

The copy runs when :meth:`VramDevice.run_copies` drives the engine (the
model has no clock: a test or scenario stands for the GPU's ring); then
its fence signals and the old backing is freed.  Until then the new
location holds whatever it held: DMA into it is the bug the kernel's
rule against ("dynamic importers must wait for the KERNEL fences before
touching the buffer after a move") is about.  The access gate checks it:
device DMA through a mapping of a buffer whose move fence has not
signalled is a ``LifetimeError`` (rule ``dma-before-move-fence``) naming
the importer (report mode: recorded, and the device reads the stale
bytes).

Who gets what, as ``amdgpu_dma_buf_attach()`` / ``amdgpu_dma_buf_pin()``
/ ``amdgpu_dma_buf_map()`` decide: an attachment is peer-to-peer when the
importer allows it and the PCI topology routes the GPU's BAR to it;
mapping VRAM for it gives bus addresses of the BAR; mapping or pinning for
an attachment that is not peer-to-peer first migrates the buffer to
system memory (GTT).

Not modelled: CPU mmap and vmap (no ``mmap``/``vmap`` ops: EINVAL);
VRAM fragmentation and the buddy allocator (pages come from a first-fit
free map); the copy engine's own DMA through the GPU's IOMMU (the copy is
the exporter's trusted migration, :func:`pydmabuf.access.migrate_pages`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from pydmabuf import access, checks, errors, page_alloc
from pydmabuf._core import Fence, SgTable, fence_context_alloc
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE, DmaDirection, Usage
from pydmabuf.dma import dma_map_sgtable, dma_unmap_sgtable
from pydmabuf.dma_buf_mapping import dma_buf_free_sgt, dma_buf_phys_vec_to_sgt
from pydmabuf.dmabuf import Attachment, DmaBuf, Exporter, PhysVec, export
from pydmabuf.machine import Bar, Device, P2PMapType

__all__ = ["VramDevice", "VramBuffer", "CopyJob", "VRAM", "SYSTEM"]

#: Placements (TTM_PL_VRAM, TTM_PL_TT).
VRAM = "vram"
SYSTEM = "system"


class CopyJob:
    """One move's copy on the GPU's copy engine: ``src`` to ``dst`` pages,
    after ``deps``; ``fence`` signals when it is done.

    Attributes
    ----------
    buffer : VramBuffer
    src_placement, dst_placement : str
    fence : Fence
        The move fence (in the reservation object with usage KERNEL).
    done : bool
    """

    __slots__ = ("buffer", "src", "src_placement", "dst", "dst_placement", "fence", "deps", "done", "__weakref__")

    def __init__(self, buffer: VramBuffer, src: np.ndarray, src_placement: str, dst: np.ndarray,
                 dst_placement: str, fence: Fence, deps: list[Any]) -> None:
        self.buffer = buffer
        self.src, self.src_placement = src, src_placement
        self.dst, self.dst_placement = dst, dst_placement
        self.fence = fence
        self.deps = deps
        self.done = False

    def ready(self) -> bool:
        """Every fence the copy waits for has signalled."""
        return all(f.is_signaled() for f in self.deps)

    def __repr__(self) -> str:
        state = "done" if self.done else ("ready" if self.ready() else "waiting")
        return (f"<CopyJob {self.buffer.dmabuf_name!r} {self.src_placement} -> {self.dst_placement} "
                f"{len(self.dst)} pages, {state}>")


#: Copies queued and not yet done, for the access gate's check.
_in_flight: "weakref.WeakSet[CopyJob]" = weakref.WeakSet()
_in_flight_lock = threading.Lock()


def _move_fence_check(device: Device, addr: int, nbytes: int, write: bool) -> None:
    """The access gate's check (device DMA): through a mapping made after a
    move whose copy has not finished (its KERNEL fence unsignalled)?"""
    with _in_flight_lock:
        jobs = [j for j in _in_flight if not j.done]
    for job in jobs:
        buf = job.buffer.dmabuf
        if buf is None:
            continue
        for a in buf.attachments:
            if a.device is not device:
                continue
            for m in list(a._maps):
                if not m.stale and m.covers(addr, nbytes):
                    checks.checker.lifetime(
                        "dma-before-move-fence",
                        f"{device.name} did DMA at {addr:#x} into {buf.name!r}, whose move "
                        f"{job.src_placement} -> {job.dst_placement} has not finished (its KERNEL fence "
                        f"{job.fence!r} is unsignalled): the importer must wait for the KERNEL fences "
                        "after it re-maps",
                        m, buf, culprit=a.importer_ops or a)


access.add_check(access.DEVICE, _move_fence_check)


def _dma_device(attachment: Attachment) -> Device:
    """The device an SGT attachment maps for (every attachment of this
    exporter is one: it offers only the SGT type)."""
    dev = attachment.device
    if dev is None:
        raise errors.InvalidArgument(f"{attachment!r} has no DMA device: the VRAM exporter offers only SGT")
    return dev


class VramBuffer(Exporter):
    """The exporter behind one buffer object (``struct amdgpu_bo`` with its
    TTM resource): a dynamic exporter (pin, unpin, and importers told of
    moves).

    Attributes
    ----------
    placement : str
        :data:`VRAM` or :data:`SYSTEM`, published at the start of a move.
    pfns : ndarray
        The page frames of the current placement (BAR pages in VRAM).
    pins, moves, maps, unmaps : int
    """

    name = "vram"

    def __init__(self, vdev: VramDevice, pfns: np.ndarray, nbytes: int) -> None:
        self.vdev = vdev
        self.machine = vdev.machine
        self.placement = VRAM
        self.pfns = pfns
        self.nbytes = nbytes
        self.pins = 0
        self.moves = 0
        self.maps = 0
        self.unmaps = 0
        self.dmabuf: DmaBuf | None = None
        self.dmabuf_name = "?"
        self.released = False
        self._p2p_tables: set[int] = set()
        self._ranges: np.ndarray | None = None

    @property
    def provider(self) -> Any:
        """The BAR's P2P provider while in VRAM (None in system memory)."""
        return self.vdev.provider if self.placement == VRAM else None

    def _phys_ranges(self) -> np.ndarray:
        if self._ranges is None:
            phys, lens = page_alloc.numpy_coalesce(self.pfns)
            rows = np.ascontiguousarray(np.stack([phys, lens], axis=1))
            rows.flags.writeable = False
            self._ranges = rows
        return self._ranges

    # -------------------------------------------------------------- dma-buf ops

    def attach(self, attachment: Attachment) -> None:
        # amdgpu_dma_buf_attach(): peer-to-peer only if the importer allows
        # it and the topology routes the BAR to its device.
        if attachment.peer2peer:
            dev = _dma_device(attachment)
            route = dev.machine.p2p_map_type(self.vdev.provider, dev)
            if route not in (P2PMapType.BUS_ADDR, P2PMapType.THRU_HOST_BRIDGE):
                attachment.peer2peer = False

    def pin(self, attachment: Attachment) -> None:
        # amdgpu_dma_buf_pin(): an importer that cannot reach VRAM pins the
        # buffer in GTT, so it moves there first.
        if not attachment.peer2peer and self.placement == VRAM:
            self.vdev._move(self, SYSTEM)
        self.pins += 1

    def unpin(self, attachment: Attachment) -> None:
        self.pins -= 1

    def map_dma_buf(self, attachment: Attachment, direction: DmaDirection) -> SgTable:
        # amdgpu_dma_buf_map(): a dynamic importer that is not p2p gets the
        # buffer validated into GTT first (a move, fenced).
        if self.placement == VRAM and not attachment.peer2peer:
            self.vdev._move(self, SYSTEM)
        if self.placement == VRAM:
            t = dma_buf_phys_vec_to_sgt(attachment, self.vdev.provider, self._phys_ranges(), self.nbytes, direction)
            self._p2p_tables.add(id(t))
        else:
            t = SgTable.from_pages(self.pfns, nbytes=self.nbytes)
            dma_map_sgtable(_dma_device(attachment), t, direction)
        self.maps += 1
        return t

    def unmap_dma_buf(self, attachment: Attachment, table: SgTable, direction: DmaDirection) -> None:
        if id(table) in self._p2p_tables:
            self._p2p_tables.discard(id(table))
            dma_buf_free_sgt(table, direction)
        else:
            dma_unmap_sgtable(_dma_device(attachment), table, direction)
        self.unmaps += 1

    def get_phys_vec(self, attachment: Attachment | None) -> PhysVec:
        return PhysVec(self._phys_ranges(), self.provider)

    def release(self, dmabuf: DmaBuf) -> None:
        self.released = True
        self.dmabuf = None  # no cycle back to the buffer that is going
        self.vdev._release(self)

    def __repr__(self) -> str:
        return f"<VramBuffer {self.dmabuf_name!r} {self.nbytes >> PAGE_SHIFT} pages in {self.placement}>"


class VramDevice:
    """A GPU's VRAM manager (``struct ttm_device`` with its VRAM resource
    manager) over one prefetchable memory BAR.

    Parameters
    ----------
    device : Device
        The GPU (default machine: ``gpu0``).
    bar : int
        The BAR that exposes VRAM (default: the largest prefetchable one).
    vram_bytes : int, optional
        Use only this much of the BAR (to make memory pressure easy to
        reach); default the whole BAR.

    Attributes
    ----------
    evictions, restores : int
        Moves to system memory and back (pressure and requests).
    """

    def __init__(self, device: Device, *, bar: int | None = None, vram_bytes: int | None = None) -> None:
        if not isinstance(device, Device):
            raise TypeError(f"VramDevice: device must be a Device, not {type(device).__name__}")
        bars = [b for b in device.bars.values() if isinstance(b, Bar) and b.is_mem and b.prefetch]
        if bar is not None:
            bars = [b for b in bars if b.index == bar]
        if not bars:
            raise errors.InvalidArgument(f"{device.name} has no prefetchable memory BAR"
                                         f"{'' if bar is None else f' {bar}'} to expose VRAM through")
        self.bar = max(bars, key=lambda b: b.nbytes)
        size = self.bar.nbytes if vram_bytes is None else int(vram_bytes)
        if size <= 0 or size > self.bar.nbytes or size % PAGE_SIZE:
            raise errors.InvalidArgument(f"vram_bytes must be whole pages within the {self.bar.nbytes:#x}-byte BAR")
        self.device = device
        self.machine = device.machine
        prov = device.p2p_provider(self.bar.index)
        if prov is None:
            raise errors.InvalidArgument(f"{self.bar!r} has no P2P provider")
        self.provider = prov
        self._base_pfn = self.bar.cpu_start >> PAGE_SHIFT
        self._free = np.ones(size >> PAGE_SHIFT, dtype=bool)
        self._lru: list[VramBuffer] = []  # VRAM residents, least recently placed first
        self._queue: list[CopyJob] = []
        self._fence_ctx = fence_context_alloc()
        self._evict_fence: Fence | None = None
        self._seqno = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.restores = 0

    # ------------------------------------------------------------- VRAM pages

    @property
    def vram_free(self) -> int:
        """Free VRAM, bytes."""
        return int(self._free.sum()) << PAGE_SHIFT

    def _take_vram(self, npages: int) -> np.ndarray | None:
        with self._lock:
            idx = np.flatnonzero(self._free)[:npages]
            if len(idx) < npages:
                return None
            self._free[idx] = False
        return (idx + self._base_pfn).astype(np.uint64)

    def _give_vram(self, pfns: np.ndarray) -> None:
        with self._lock:
            self._free[(pfns - np.uint64(self._base_pfn)).astype(np.int64)] = True

    def _alloc_vram(self, npages: int, skip: VramBuffer | None) -> np.ndarray:
        """VRAM pages, evicting unpinned residents under pressure
        (``ttm_bo_evict_alloc()``: victims by LRU, each only if its
        reservation lock can be trylocked); ENOMEM when nothing more can
        go."""
        pfns = self._take_vram(npages)
        for victim in list(self._lru):
            if pfns is not None:
                break
            if victim is skip or victim.pins or victim.dmabuf is None:
                continue
            resv = victim.dmabuf.resv
            if not resv.trylock():
                continue
            try:
                self._move(victim, SYSTEM)
            except errors.Busy:
                pass
            finally:
                resv.unlock()
            pfns = self._take_vram(npages)
        if pfns is None:
            raise errors.OutOfMemory(f"{self.device.name}: no {npages} free VRAM pages and nothing more "
                                     "can be evicted (the rest is pinned or locked)")
        return pfns

    # ---------------------------------------------------------------- buffers

    def allocate(self, nbytes: int, *, name: str | None = None) -> DmaBuf:
        """A buffer of ``nbytes`` (rounded up to pages) in VRAM, exported as
        a dma-buf (``amdgpu_gem_prime_export``).  Evicts others under
        pressure; ENOMEM if VRAM cannot make room."""
        if not isinstance(nbytes, int):
            raise TypeError(f"allocate: nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise errors.InvalidArgument(f"allocate: nbytes must be positive (got {nbytes!r})")
        npages = -(-nbytes // PAGE_SIZE)
        pfns = self._alloc_vram(npages, None)
        bo = VramBuffer(self, pfns, npages * PAGE_SIZE)
        try:
            buf = export(bo, npages * PAGE_SIZE, name=name)
        except BaseException:
            self._give_vram(pfns)
            raise
        bo.dmabuf = buf
        bo.dmabuf_name = buf.name
        ev = self._evict_fence
        if ev is not None and not ev.is_signaled():
            # ttm_bo_add_move_fence(): the pages may still be an eviction's
            # copy source; the new buffer is usable once that copy is done.
            with buf.resv:
                buf.resv.reserve_fences(1)
                buf.resv.add_fence(ev, Usage.KERNEL)
        with self._lock:
            self._lru.append(bo)
        return buf

    @staticmethod
    def _bo(buf: DmaBuf) -> VramBuffer:
        if not isinstance(buf, DmaBuf) or not isinstance(buf.exporter, VramBuffer):
            raise TypeError("expected a dma-buf exported by a VramDevice")
        return buf.exporter

    def evict(self, buf: DmaBuf) -> Fence | None:
        """Move ``buf`` to system memory (``ttm_bo_evict()``), taking its
        reservation lock; returns the move fence (None if it was already
        there).  EBUSY while it is pinned."""
        bo = self._bo(buf)
        with buf.resv:
            fence = self._move(bo, SYSTEM)
        return fence

    def restore(self, buf: DmaBuf) -> Fence | None:
        """Move ``buf`` back into VRAM (validation into the VRAM domain),
        evicting others if needed; returns the move fence or None."""
        bo = self._bo(buf)
        with buf.resv:
            fence = self._move(bo, VRAM)
        return fence

    def _move(self, bo: VramBuffer, to: str) -> Fence | None:
        """The asynchronous move (module docstring); the reservation lock
        must be held.  Returns the move fence, None when already there."""
        buf = bo.dmabuf
        if buf is None or bo.released:
            raise errors.LifetimeError(f"{bo!r} was released")
        resv = buf.resv
        if not resv.held_by_current_thread():
            checks.checker.locking("move-without-resv", "moving a buffer object without its reservation lock", buf)
        if bo.placement == to:
            return None
        if bo.pins:
            raise errors.Busy(f"{buf.name} is pinned ({bo.pins}) and cannot move")
        n = len(bo.pfns)
        dst = self._alloc_vram(n, bo) if to == VRAM else self.machine.pages.alloc(n, "contiguous", bo.moves + 1)
        try:
            deps = list(resv.get_fences(Usage.BOOKKEEP))
            resv.reserve_fences(1)
        except BaseException:
            self._free_backing(dst, to)
            raise
        if to == VRAM and self._evict_fence is not None and not self._evict_fence.is_signaled():
            deps.append(self._evict_fence)  # the pages may be an eviction's source still
        buf.invalidate_mappings()  # amdgpu_bo_move_notify(), under the lock
        src, src_place = bo.pfns, bo.placement
        bo.pfns, bo.placement, bo._ranges = dst, to, None
        buf._generation += 1  # leases of the old placement go stale now
        bo.moves += 1
        self._seqno += 1
        fence = Fence(self._fence_ctx, self._seqno)
        resv.add_fence(fence, Usage.KERNEL)  # ttm_bo_move_accel_cleanup()
        job = CopyJob(bo, src, src_place, dst, to, fence, deps)
        if src_place == VRAM:
            # ttm_bo_move_pipeline_evict(): the VRAM goes back to the
            # manager now; whoever gets it next waits for this fence
            # (the manager's move fence, ttm_bo_add_move_fence()).
            self._give_vram(src)
            self._evict_fence = fence
        with self._lock:
            self._queue.append(job)
            if to == VRAM:
                self._lru.append(bo)
                self.restores += 1
            else:
                if bo in self._lru:
                    self._lru.remove(bo)
                self.evictions += 1
        with _in_flight_lock:
            _in_flight.add(job)
        return fence

    def _free_backing(self, pfns: np.ndarray, placement: str) -> None:
        if placement == VRAM:
            self._give_vram(pfns)
        else:
            self.machine.pages.free(pfns)

    # ----------------------------------------------------------- copy engine

    @property
    def pending_copies(self) -> list[CopyJob]:
        """Copies queued and not done, in ring order."""
        with self._lock:
            return list(self._queue)

    def run_copies(self, max_jobs: int | None = None) -> int:
        """Drive the copy engine: run queued copies in order while their
        dependencies have signalled (a ring executes in order, so the first
        one still waiting stops it); each copies the pages, signals its
        fence and frees the old backing.  Returns the copies run."""
        ran = 0
        while max_jobs is None or ran < max_jobs:
            with self._lock:
                if not self._queue or not self._queue[0].ready():
                    break
                job = self._queue.pop(0)
            access.migrate_pages(self.machine, job.src, job.dst)
            job.done = True
            job.fence.signal()
            if job.src_placement == SYSTEM:  # VRAM sources went back at the move
                self._free_backing(job.src, SYSTEM)
            bo = job.buffer
            if bo.released and not any(j.buffer is bo for j in self._queue):
                self._free_backing(bo.pfns, bo.placement)
                bo.pfns = bo.pfns[:0]
            ran += 1
        return ran

    @contextlib.contextmanager
    def engine(self, poll: float = 0.001) -> Iterator[VramDevice]:
        """Run the copy engine in a background thread for the block: every
        copy runs as soon as its dependencies signal (the GPU's ring on its
        own clock).  Without it copies run only when :meth:`run_copies` is
        called."""
        stop = threading.Event()

        def ring() -> None:
            while not stop.is_set():
                self.run_copies()
                stop.wait(poll)

        t = threading.Thread(target=ring, name=f"{self.device.name}-sdma", daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            self.run_copies()

    def _release(self, bo: VramBuffer) -> None:
        with self._lock:
            if bo in self._lru:
                self._lru.remove(bo)
            busy = any(j.buffer is bo for j in self._queue)
        if not busy:  # else the last copy frees it (TTM's delayed delete)
            self._free_backing(bo.pfns, bo.placement)
            bo.pfns = bo.pfns[:0]

    def __repr__(self) -> str:
        return (f"<VramDevice {self.device.name} BAR{self.bar.index}: {self.vram_free >> 20} MiB of "
                f"{(len(self._free) << PAGE_SHIFT) >> 20} MiB free, {len(self._queue)} copies queued>")
