"""VFIO PCI: slices of a BAR exported as dma-bufs (``VFIO_DEVICE_FEATURE_DMA_BUF``).

The model of ``drivers/vfio/pci/vfio_pci_dmabuf.c`` (the buffer, in
:mod:`pydmabuf.exporters.vfio_dmabuf`, re-exported here) and its callers in
``vfio_pci_core.c`` / ``vfio_pci_config.c`` (this module: the device, its
open files, the feature ioctl, power, reset), as merged for 6.19 and
changed for 7.1 (``kernel="7.1"``, the default; ``kernel="6.19"`` gives
the earlier rules where they differ):

* :meth:`VfioPciBar.feature_dma_buf` is the ioctl, validating in the
  kernel's order with the kernel's errno; :meth:`VfioPciBar.export` is the
  usual ``GET`` of the handle's slice.
* The buffer (:class:`VfioPciDmaBuf`, the exporter of one dma-buf) has no
  pages and no vmap.  Maps are DMA-only tables built by
  :func:`~pydmabuf.dma_buf_mapping.dma_buf_phys_vec_to_sgt` for the importer's route to
  the BAR.  Its physical-range op gives the BAR ranges and the BAR's P2P
  provider.
* Mapping types (the 2026 RFC, P12/P22): the exporter offers ``[PAL,
  SGT P2P]``: iommufd gets the BAR's physical ranges, a peer-to-peer
  capable importer with a route to the BAR a DMA-only scatterlist, any
  other importer (static, no P2P, no route) EINVAL at attach.
* Attach then refuses revoked buffers (ENODEV) and (7.1) importers that
  cannot be revoked (EOPNOTSUPP).
* A buffer is born revoked when the device does not decode memory (command
  register MEMORY bit off, or D3hot).  Turning decoding off, entering
  D3hot or runtime low power, a function or hot reset, and closing the
  device revoke every buffer of the device (7.1: the documented sequence,
  :meth:`~pydmabuf.dmabuf.DmaBuf.revoke`, waiting for fences and unmaps);
  decoding coming back un-revokes them for new maps.  Closing revokes for
  good.  ``device.memory_decode`` and ``device.power_state`` follow, so
  device accesses to the BAR fault while it does not decode.
* :func:`vfio_pci_dma_buf_iommufd_map`, the private interconnect of 6.19
  (deleted by the RFC's P23), stays as a thin layer over PAL.
* mmap (``kernel="7.1"``; 6.19 has no ``mmap`` op, so
  ``dma_buf_mmap_internal`` fails with EINVAL): as Matt Evans's series
  "vfio/pci: Support mmap() of a VFIO DMABUF" (v4, July 2026, on the 7.1
  revoke code) does it.  ``vfio_pci_dma_buf_mmap`` refuses a revoked
  buffer (ENODEV) and maps the BAR pages write-combining where the BAR is
  prefetchable and uncached (``pgprot_noncached``) where it is not, as
  PCI's own BAR mmap allows WC only on prefetchable resources; user space
  can choose either for later mmaps with
  ``VFIO_DEVICE_FEATURE_DMA_BUF_MEMATTR``
  (:meth:`VfioPciBar.set_dma_buf_memattr`).  The posted series is looser:
  it starts every buffer uncached and never looks at the prefetchable bit.  The fault handler inserts the BAR's pfns under ``memory_lock``
  and gives SIGBUS once revoked; a revoke zaps the mapping
  (``unmap_mapping_range`` of the buffer's file) and an un-revoke lets the
  next access fault it back in (:class:`~pydmabuf.dmabuf.CpuMapping`).

Where the kernel waits forever (7.1 revoke: fences and unmaps, holding
``memory_lock``) every call here takes a ``timeout``: on expiry it raises
:class:`~pydmabuf.errors.TimedOut` at the point where the kernel would
block, without making the hardware change it was about to make (no
decode change, no power change, no reset, the device stays open); the
buffers revoked so far stay revoked and the next call that finds memory
enabled un-revokes them.  An importer whose invalidation callback raises
(a bug: the kernel's callback cannot fail) stops nothing: every buffer is
revoked and every importer told, then the checker's report of it is raised
at that same point, before the hardware change (strict mode).  Where the kernel is loose (research notes
section 10) the model is correct by default: it links multi-range buffers
at running IOVA offsets, and un-revokes only devices that are open.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
from typing import Any, Iterable

import numpy as np

from pydmabuf import _core, errors
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SIZE, Caching, _fmt_size
from pydmabuf._uapi import U32_MAX, U64_MAX, as_u64_pairs, as_uint
from pydmabuf.dmabuf import DmaBuf, close, dma_buf_get, export
from pydmabuf.dmabuf_ops import timeout_arg
from pydmabuf.exporters.vfio_dmabuf import (IOMMUFD_MODULE, VfioPciDmaBuf, every_buffer, flip_619,
                                            vfio_pci_dma_buf_iommufd_map)
from pydmabuf.locking import Mutex
from pydmabuf.machine import Device, Machine, P2pProvider

log = logging.getLogger(__name__)

__all__ = [
    "VfioPciBar",
    "VfioPciDmaBuf",
    "VfioFeature",
    "vfio_pci_dma_buf_iommufd_map",
    "vfio_pci_hot_reset",
    "VFIO_DEVICE_FEATURE_DMA_BUF",
    "VFIO_PCI_ROM_REGION_INDEX",
    "IOMMUFD_MODULE",
    "POWER_STATES",
]

#: ``VFIO_DEVICE_FEATURE_DMA_BUF``.
VFIO_DEVICE_FEATURE_DMA_BUF = 11
#: Region indexes below this are BAR0-BAR5.
VFIO_PCI_ROM_REGION_INDEX = 6
#: ``sizeof(struct vfio_device_feature_dma_buf)``: the header before the ranges.
DMA_BUF_FEATURE_MINSZ = 16
#: ``sizeof(struct vfio_region_dma_range)``.
DMA_RANGE_SIZE = 16
#: ``DMA_IOVA_USE_SWIOTLB``: a dma-buf size with this bit set is refused.
DMA_IOVA_USE_SWIOTLB = 1 << 63
#: Power states the model's devices take.
POWER_STATES = ("D0", "D3hot")
KERNELS = ("6.19", "7.1")
_GMASK = np.uint64(PAGE_SIZE - 1)


class VfioFeature(enum.IntFlag):
    """The operation bits of ``struct vfio_device_feature.flags``."""

    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


def _feature_op(op: Any) -> VfioFeature:
    if isinstance(op, str):
        bits = VfioFeature(0)
        for part in filter(None, (p.strip().upper() for p in op.split("|"))):
            try:
                bits |= VfioFeature[part]
            except KeyError:
                raise ValueError(f"op: {part!r} is not GET, SET or PROBE") from None
        return bits
    v = as_uint(op, "op", 32)
    if v & ~int(VfioFeature.GET | VfioFeature.SET | VfioFeature.PROBE):
        raise errors.InvalidArgument(f"op {v:#x} has bits other than GET, SET and PROBE")
    return VfioFeature(v)


# ------------------------------------------------------------- the device


class _VfioPciCore:
    """``struct vfio_pci_core_device``: what every open of one device shares.

    ``memory_lock`` is the kernel's rw-semaphore, always taken for write
    here (the paths modelled are all writers)."""

    def __init__(self, device: Device, kernel: str, has_dmabuf_phys: bool) -> None:
        self.device = device
        self.kernel = kernel
        self.has_dmabuf_phys = has_dmabuf_phys
        self.memory_lock = Mutex("&vdev->memory_lock")
        self.open_count = 0
        self.user_power_state = device.power_state
        self.pm_runtime_engaged = False
        self.dmabufs: list[VfioPciDmaBuf] = []
        self.resets = 0
        self.bar_zaps = 0

    def memory_enabled(self) -> bool:
        """``__vfio_pci_memory_enabled()``: the device is in D0 and its
        command register decodes memory."""
        return self.device.power_state == "D0" and bool(self.device.memory_decode)

    def apply_power(self) -> None:
        low = self.user_power_state != "D0" or self.pm_runtime_engaged
        self.device.power_state = "D3hot" if low else "D0"

    def zap_bars(self) -> None:
        """``vfio_pci_zap_bars()``: user mmaps of the BARs go (counted only:
        the model has no user mappings of BARs)."""
        self.bar_zaps += 1

    def move(self, revoked: bool, timeout: float | None) -> None:
        """``vfio_pci_dma_buf_move()``; ``memory_lock`` held.  Buffers being
        released are skipped; only those whose state differs change.

        An importer whose invalidation callback raises (a LifetimeError
        from the buffer's revoke, see :meth:`DmaBuf.revoke`) does not stop
        the walk: every buffer is revoked and every importer told, then the
        first such error is raised (before the hardware change, as a
        TimedOut would be).  A TimedOut stops the walk where the kernel
        would block."""
        with every_buffer() as each:
            for priv in list(self.dmabufs):
                buf = priv.dmabuf
                if buf is None or buf.released:
                    continue  # get_file_active() failed: the buffer is dying
                buf.get()
                try:
                    if buf.revoked == revoked:
                        continue
                    if self.kernel == "6.19":
                        each(flip_619, buf, revoked)
                    elif revoked:
                        each(buf.revoke, timeout)
                    else:
                        each(buf.unrevoke, timeout)
                finally:
                    buf.put()


# A device's VFIO state lives on the device (as vfio_pci_core_device is the
# driver data of the PCI device), not in a global table: a table keyed by
# the device whose values refer back to it would keep both alive forever.
_cores_lock = threading.Lock()
#: ``vdev->vdev.dev_set->lock`` (one set for the model's devices).
_dev_set_lock = Mutex("&dev_set->lock")


def _core_of(device: Device) -> _VfioPciCore | None:
    core = getattr(device, "_vfio_core", None)
    return core if isinstance(core, _VfioPciCore) else None


def _core_for(device: Device, kernel: str, has_dmabuf_phys: bool) -> _VfioPciCore:
    with _cores_lock:
        core = _core_of(device)
        if core is None:
            core = _VfioPciCore(device, kernel, has_dmabuf_phys)
            setattr(device, "_vfio_core", core)
        elif core.kernel != kernel or core.has_dmabuf_phys != has_dmabuf_phys:
            raise errors.InvalidArgument(
                f"{device.name} is already driven as kernel {core.kernel} with has_dmabuf_phys="
                f"{core.has_dmabuf_phys}; one device has one driver")
        return core



# ------------------------------------------------------------- the handle


class VfioPciBar(Owner):
    """An open VFIO PCI device and a slice of one of its BARs.

    Each instance is one open of the device (its file descriptor); the
    device's state (its dma-bufs, ``memory_lock``, low-power engagement)
    is shared by all opens.  Closing the last open revokes every dma-buf
    of the device for good.

    Parameters
    ----------
    machine : Machine
    device : Device or str
        A device of ``machine`` assigned to VFIO (``vfio`` set in its
        spec); NoDevice (ENODEV) otherwise.
    bar : int
        The BAR (region index) :meth:`export` uses.
    offset, nbytes : int
        The slice :meth:`export` exports: ``[offset, offset + nbytes)`` of
        the BAR; ``nbytes`` defaults to the rest of the BAR.
    ranges : sequence of (offset, nbytes), optional
        Several slices of the BAR instead (exported as one dma-buf, in this
        order); then ``offset`` and ``nbytes`` must be left alone.
    kernel : str
        ``"7.1"`` (revoke waits for fences and unmaps; only revocable
        importers) or ``"6.19"`` (revoke only notifies).
    has_dmabuf_phys : bool
        The driver provides ``get_dmabuf_phys`` (vfio-pci and nvgrace-gpu
        do); False models a variant driver that does not (EOPNOTSUPP).

    Slices are checked when exported, with the kernel's errors.

    Examples
    --------
    >>> from pydmabuf import Machine
    >>> m = Machine.default()
    >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
    >>> bar = vfio.export()                 # a dma-buf of the first MiB of BAR 0
    >>> bar.size
    1048576
    >>> bar.put(); vfio.close()
    """

    #: The exporter of each dma-buf (a variant driver supplies its own).
    _dmabuf_class: type[VfioPciDmaBuf] = VfioPciDmaBuf

    def __init__(self, machine: Machine, device: Device | str, bar: int = 0, offset: int = 0,
                 nbytes: int | None = None, ranges: Iterable[tuple[int, int]] | None = None, *,
                 kernel: str = "7.1", has_dmabuf_phys: bool = True) -> None:
        if not isinstance(machine, Machine):
            raise TypeError(f"machine must be a Machine, not {type(machine).__name__}")
        dev = machine.device(device) if isinstance(device, str) else device
        if not isinstance(dev, Device):
            raise TypeError(f"device must be a Device or a device name, not {type(device).__name__}")
        if dev.machine is not machine:
            raise errors.InvalidArgument(f"{dev.name} is not a device of {machine!r}")
        if not dev.vfio:
            raise errors.NoDevice(f"{dev.name} is not bound to vfio-pci")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        self.machine = machine
        self.device = dev
        self.bar = as_uint(bar, "bar", 32)
        if ranges is None:
            off = as_uint(offset, "offset")
            if nbytes is None:
                size = dev.bars[self.bar].nbytes if self.bar in dev.bars else 0
                nbytes = max(size - off, 0)
            self.ranges = as_u64_pairs([[off, as_uint(nbytes, "nbytes")]], "ranges")
        else:
            if offset != 0 or nbytes is not None:
                raise ValueError("give either offset/nbytes or ranges, not both")
            self.ranges = as_u64_pairs(ranges, "ranges")
        self._core = _core_for(dev, kernel, bool(has_dmabuf_phys))
        with self._core.memory_lock:
            self._core.open_count += 1
        self._open = True

    # ------------------------------------------------------------- state

    @property
    def kernel(self) -> str:
        """The driver rules in force: ``"7.1"`` or ``"6.19"``."""
        return self._core.kernel

    def _owns(self) -> bool:
        return self._open

    def _leak_message(self) -> str:
        return f"{self!r} collected while open: close() it (its dma-bufs are revoked only then)"

    @property
    def is_open(self) -> bool:
        """This device file is open (:meth:`close` not called yet)."""
        return self._open

    @property
    def memory_decode(self) -> bool:
        """The command register's MEMORY bit."""
        return bool(self.device.memory_decode)

    @property
    def power_state(self) -> str:
        """``"D0"`` or ``"D3hot"`` (also while runtime low power is engaged)."""
        return str(self.device.power_state)

    @property
    def memory_enabled(self) -> bool:
        """``__vfio_pci_memory_enabled()``: what decides revoked or not."""
        return self._core.memory_enabled()

    @property
    def dmabufs(self) -> list[DmaBuf]:
        """The device's live dma-bufs, oldest first."""
        with self._core.memory_lock:
            return [p.dmabuf for p in self._core.dmabufs if p.dmabuf is not None and not p.dmabuf.released]

    @property
    def resets(self) -> int:
        """Function and hot resets done on the device."""
        return self._core.resets

    def _need_open(self, what: str) -> _VfioPciCore:
        if not self._open:
            raise errors.BadHandle(f"{what}: this VFIO device file was closed")
        return self._core

    # ----------------------------------------------------------- the ioctl

    def feature_dma_buf(self, region_index: int, flags: int, open_flags: int, ranges: Any, *,
                        op: str | int = "GET", argsz: int | None = None) -> int:
        """``VFIO_DEVICE_FEATURE`` with ``VFIO_DEVICE_FEATURE_DMA_BUF``.

        Parameters
        ----------
        region_index : int
            The BAR (0-5).
        flags : int
            ``vfio_device_feature_dma_buf.flags``: must be 0.
        open_flags : int
            File flags of the new fd (not validated, as in the kernel).
        ranges : sequence of (offset, nbytes) or (N, 2) u64 array
            Slices of the BAR; both page aligned, lengths non-zero.  Ranges
            may overlap and repeat.
        op : str or int
            ``"GET"``, ``"SET"``, ``"PROBE"``, a ``|``-joined mix, or
            :class:`VfioFeature` bits.
        argsz : int, optional
            The ioctl's ``argsz``; default the header plus the ranges.

        Returns
        -------
        int
            For GET, the new dma-buf's fd (take it with
            :func:`~pydmabuf.dmabuf.dma_buf_get`; close it with
            :func:`~pydmabuf.dmabuf.close`); 0 for PROBE.

        Raises
        ------
        In the kernel's order (``vfio_pci_core_feature_dma_buf``):

        NotSupported
            (EOPNOTSUPP) the driver has no ``get_dmabuf_phys`` (PROBE too).
        InvalidArgument
            (EINVAL) SET asked for, neither GET nor SET without PROBE,
            ``argsz`` below the 16-byte header; then no ranges or ``flags``
            not 0.
        NoDevice
            (ENODEV) ``region_index`` is not BAR0-BAR5, or the device has
            no such BAR (its resources cannot be claimed).
        InvalidArgument
            (EINVAL) a range of length 0 or not page aligned, a total that
            overflows or has bit 63 set; then (per range, in order) the
            BAR is not a memory BAR (no P2P provider) ...
        Overflow
            (EOVERFLOW) ... the BAR's address plus the offset, or plus the
            length, wraps past 2**64 - 1 ...
        InvalidArgument
            (EINVAL) ... the range ends past the BAR.
        BadHandle
            (EBADF) this device file was closed.

        A failed call exports nothing.
        """
        core = self._need_open("feature_dma_buf")
        bits = _feature_op(op)
        region = as_uint(region_index, "region_index", 32)
        flags = as_uint(flags, "flags", 32)
        open_flags = as_uint(open_flags, "open_flags", 32)
        rows = as_u64_pairs(ranges, "ranges", max_rows=U32_MAX)  # nr_ranges is a u32
        nr = len(rows)
        argsz = as_uint(DMA_BUF_FEATURE_MINSZ + DMA_RANGE_SIZE * nr if argsz is None else argsz, "argsz")
        dev = self.device
        # 1. the driver must describe its BARs physically
        if not core.has_dmabuf_phys:
            raise errors.NotSupported(f"{dev.name}: the driver has no get_dmabuf_phys")
        # 2. vfio_check_feature(): GET only
        if bits & (VfioFeature.GET | VfioFeature.SET) & ~VfioFeature.GET:
            raise errors.InvalidArgument("VFIO_DEVICE_FEATURE_DMA_BUF supports GET only")
        if bits & VfioFeature.PROBE:
            return 0
        if not bits & (VfioFeature.GET | VfioFeature.SET):
            raise errors.InvalidArgument("VFIO_DEVICE_FEATURE needs GET or SET without PROBE")
        if argsz < DMA_BUF_FEATURE_MINSZ:
            raise errors.InvalidArgument(f"argsz {argsz} is below the {DMA_BUF_FEATURE_MINSZ}-byte header")
        # 3. header
        if nr == 0 or flags:
            raise errors.InvalidArgument("nr_ranges must not be 0" if nr == 0 else f"flags {flags:#x} must be 0")
        # 4. region: a standard BAR whose resources VFIO holds
        if region >= VFIO_PCI_ROM_REGION_INDEX or region not in dev.bars:
            raise errors.NoDevice(f"{dev.name}: region {region} is not a BAR the device has")
        # 6. validate_dmabuf_input(): alignment, no empty range, sane total
        offs, lens = rows[:, 0], rows[:, 1]
        bad = (lens == 0) | ((offs & _GMASK) != 0) | ((lens & _GMASK) != 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise errors.InvalidArgument(f"range {i} ({int(offs[i]):#x}, {int(lens[i]):#x}): lengths must be "
                                         "non-zero and offsets and lengths page aligned")
        # The core sums in u64 with a carry check (zero lengths and an empty
        # table were refused above); a carry is EINVAL here, as in
        # validate_dmabuf_input() (check_add_overflow on the total).
        try:
            total = int(_core.ranges_total(rows, "VFIO_DEVICE_FEATURE_DMA_BUF"))
        except errors.Overflow:
            raise errors.InvalidArgument("the ranges add up to more than 2**64 - 1 bytes") from None
        if total & DMA_IOVA_USE_SWIOTLB:
            raise errors.InvalidArgument(f"the ranges add up to {total:#x}: bit 63 is DMA_IOVA_USE_SWIOTLB")
        # 8. get_dmabuf_phys(): the provider, then each range inside the BAR
        provider = dev.p2p_provider(region)
        if provider is None:
            raise errors.InvalidArgument(f"{dev.name} BAR{region} is not a memory BAR (no P2P provider)")
        phys = _fill_phys_vec(rows, provider)
        # 10-12. export, link under memory_lock and the lock (born revoked
        # unless memory is enabled), install the fd
        priv = self._dmabuf_class(core, provider, phys, total, region, open_flags)
        buf = export(priv, total, name=f"vfio {dev.name} BAR{region}"[:31])
        priv.dmabuf = buf
        with core.memory_lock:
            buf.resv.lock()
            try:
                buf.revoked = not core.memory_enabled()
                core.dmabufs.append(priv)
            finally:
                buf.resv.unlock()
        return buf.fd()

    def set_dma_buf_memattr(self, dmabuf: DmaBuf | int, memattr: Caching | str) -> None:
        """``VFIO_DEVICE_FEATURE_DMA_BUF_MEMATTR`` (SET; the Evans series'
        ``vfio_pci_core_feature_dma_buf_memattr``): the caching of later
        mmaps of ``dmabuf``, a buffer (or fd) this device exported;
        mappings that exist keep theirs.

        Raises :class:`~pydmabuf.errors.NoDevice` (ENODEV) for a buffer of
        another device or exporter, :class:`~pydmabuf.errors.NotFound`
        (ENOENT) for a memattr other than uncached (NC) or write-combine
        (WC)."""
        core = self._need_open("VFIO_DEVICE_FEATURE_DMA_BUF_MEMATTR")
        buf = dmabuf if isinstance(dmabuf, DmaBuf) else dma_buf_get(dmabuf)
        try:
            priv = buf.exporter
            if not isinstance(priv, VfioPciDmaBuf) or priv._core is not core:
                raise errors.NoDevice(f"{buf.name} is not a dma-buf of {self.device.name}")
            try:
                attr = Caching(memattr)
            except ValueError:
                attr = None
            if attr not in (Caching.UNCACHED, Caching.WRITE_COMBINE):
                raise errors.NotFound(f"memattr {memattr!r}: only uncached (NC) and write-combine (WC)")
            priv.memattr = attr
        finally:
            if buf is not dmabuf:
                buf.put()

    def export(self) -> DmaBuf:
        """Export this handle's slice(s) of ``bar``.

        Returns
        -------
        DmaBuf
            A new dma-buf holding one reference for the caller (drop it with
            :meth:`~pydmabuf.dmabuf.DmaBuf.put`).  Raises as
            :meth:`feature_dma_buf`.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> m = Machine.default()
        >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        >>> bar = vfio.export()
        >>> bar
        <DmaBuf 'vfio vfio0 BAR0' 1 MiB by vfio-pci, refs=1>
        >>> bar.put(); vfio.close()
        """
        fd = self.feature_dma_buf(self.bar, 0, os.O_RDWR | os.O_CLOEXEC, self.ranges)
        buf = dma_buf_get(fd)
        close(fd)
        return buf

    # ---------------------------------------------- what revokes and un-revokes

    def set_memory_decode(self, enabled: bool, *, timeout: float | None = None) -> None:
        """A config write of the command register's MEMORY bit.

        Clearing it zaps user BAR mmaps and revokes every dma-buf first
        (7.1: importers told, fences and unmaps awaited); the write comes
        after, so the BAR stops decoding only once nobody maps it.
        Setting it (or any write that leaves memory enabled) un-revokes
        them for new maps.

        Raises TimedOut (see the module notes) and BadHandle (EBADF)
        after close.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> m = Machine.default()
        >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        >>> bar = vfio.export()
        >>> vfio.set_memory_decode(False, timeout=5)      # revokes the dma-buf
        >>> bar.revoked
        True
        >>> vfio.set_memory_decode(True, timeout=5)
        >>> bar.put(); vfio.close()
        """
        timeout_arg(timeout, "set_memory_decode")  # before anything is zapped or revoked
        core = self._need_open("set_memory_decode")
        with core.memory_lock:
            if not enabled:
                core.zap_bars()
                core.move(True, timeout)
            self.device.memory_decode = bool(enabled)
            if core.memory_enabled():
                core.move(False, timeout)

    def set_power_state(self, state: str, *, timeout: float | None = None) -> None:
        """A PMCSR write: ``"D3hot"`` revokes first, then powers down;
        ``"D0"`` powers up and un-revokes if memory decoding is on.
        InvalidArgument (EINVAL) for other states."""
        if state not in POWER_STATES:
            raise errors.InvalidArgument(f"power state {state!r} is not one of {POWER_STATES}")
        timeout_arg(timeout, "set_power_state")  # before anything is zapped or revoked
        core = self._need_open("set_power_state")
        with core.memory_lock:
            if state != "D0":
                core.zap_bars()
                core.move(True, timeout)
            core.user_power_state = state
            core.apply_power()
            if core.memory_enabled():
                core.move(False, timeout)

    def low_power_entry(self, *, timeout: float | None = None) -> None:
        """``VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY``: revoke, then let the
        device runtime-suspend (the model puts it in D3hot).  InvalidArgument
        (EINVAL) if already engaged (after the revoke, as the kernel)."""
        timeout_arg(timeout, "low_power_entry")  # before anything is zapped or revoked
        core = self._need_open("low_power_entry")
        with core.memory_lock:
            core.zap_bars()
            core.move(True, timeout)
            if core.pm_runtime_engaged:
                raise errors.InvalidArgument(f"{self.device.name}: low power is already engaged")
            core.pm_runtime_engaged = True
            core.apply_power()

    def low_power_exit(self, *, timeout: float | None = None) -> None:
        """``VFIO_DEVICE_FEATURE_LOW_POWER_EXIT``: resume (D0) and un-revoke
        if memory decoding is on."""
        timeout_arg(timeout, "low_power_exit")  # before anything is zapped or revoked
        core = self._need_open("low_power_exit")
        with core.memory_lock:
            if core.pm_runtime_engaged:
                core.pm_runtime_engaged = False
                core.user_power_state = "D0"
                core.apply_power()
            if core.memory_enabled():
                core.move(False, timeout)

    def reset(self, *, timeout: float | None = None) -> None:
        """``VFIO_DEVICE_RESET``: revoke around a function reset (which puts
        the device in D0), un-revoke after if memory is enabled."""
        timeout_arg(timeout, "reset")  # before anything is zapped or revoked
        core = self._need_open("reset")
        with core.memory_lock:
            core.zap_bars()
            core.move(True, timeout)
            core.user_power_state = "D0"
            core.apply_power()
            core.resets += 1
            if core.memory_enabled():
                core.move(False, timeout)

    def close(self, *, timeout: float | None = None) -> None:
        """Close this VFIO device file.  The last close of the device
        revokes every dma-buf for good (``vfio_pci_dma_buf_cleanup``): the
        buffers stay valid, attach and map fail with ENODEV.  BadHandle
        (EBADF) if already closed; TimedOut leaves the device open.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> m = Machine.default()
        >>> vfio = VfioPciBar(m, "vfio0", nbytes=1 << 20)
        >>> vfio.export().put()
        >>> vfio.close()
        """
        timeout_arg(timeout, "close")  # before anything is zapped or revoked
        core = self._need_open("close")
        with core.memory_lock:
            if core.open_count == 1:
                if core.kernel == "6.19":
                    with every_buffer() as each:
                        for priv in list(core.dmabufs):
                            buf = priv.dmabuf
                            if buf is None or buf.released:
                                continue
                            priv._core = None
                            each(flip_619, buf, True)
                else:
                    core.move(True, timeout)
                for priv in core.dmabufs:
                    priv._core = None
                core.dmabufs.clear()
            core.open_count -= 1
            self._open = False

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        dec = "decoding" if self.device.memory_decode else "decode off"
        return (f"<VfioPciBar {self.device.name} BAR{self.bar} {len(self.ranges)} range(s), {state}, {dec}, "
                f"{self.device.power_state}, {len(self._core.dmabufs)} dma-buf(s), kernel {self.kernel}>")


def _fill_phys_vec(rows: np.ndarray, provider: P2pProvider) -> np.ndarray:
    """``vfio_pci_core_fill_phys_vec()``: BAR offsets to CPU physical
    ranges, the first failing range deciding the error."""
    bar = provider.bar
    start = np.uint64(bar.cpu_start)
    max_addr = bar.cpu_start + bar.nbytes
    offs, lens = rows[:, 0], rows[:, 1]
    with np.errstate(over="ignore"):
        paddr = offs + start
        end = paddr + lens
    wrapped = (paddr < offs) | (end < paddr)
    # A row that did not wrap has offs + lens <= end <= 2**64 - 1: u64 is exact.
    past = ~wrapped & (end > np.uint64(max_addr)) if max_addr <= U64_MAX else np.zeros_like(wrapped)
    fail = wrapped | past
    if fail.any():
        i = int(np.argmax(fail))
        what = f"range {i} (offset {int(offs[i]):#x}, length {int(lens[i]):#x})"
        if wrapped[i]:
            raise errors.Overflow(f"{what}: {bar!r} start plus the range wraps past 2**64 - 1")
        raise errors.InvalidArgument(f"{what} ends past the {_fmt_size(bar.nbytes)} BAR")
    return np.ascontiguousarray(np.stack([paddr, lens], axis=1))


def vfio_pci_hot_reset(devices: Iterable[Device | VfioPciBar], *, timeout: float | None = None) -> None:
    """``VFIO_DEVICE_PCI_HOT_RESET`` of a device set: every device's
    dma-bufs are revoked, the bus is reset, and the devices that are open
    and decode memory get them back.  Devices of the set nobody opened are
    left alone (the kernel once read their unset virtual config here,
    research note 10.18).  The caller owns the set's choice of devices."""
    timeout_arg(timeout, "vfio_pci_hot_reset")  # before anything is zapped or revoked
    devs = [d.device if isinstance(d, VfioPciBar) else d for d in devices]
    cores = []
    for d in devs:
        if not isinstance(d, Device):
            raise TypeError(f"expected Devices or VfioPciBar handles, not {type(d).__name__}")
        core = _core_of(d)
        if core is not None:
            cores.append(core)
    with contextlib.ExitStack() as stack:
        # vfio_pci_dev_set_hot_reset(): under the set's lock, every
        # device's memory_lock (down_write_nest_lock(..., &dev_set->lock)).
        stack.enter_context(_dev_set_lock)
        for core in cores:
            core.memory_lock.lock(nest_lock=_dev_set_lock)
            stack.callback(core.memory_lock.unlock)
            core.zap_bars()
            core.move(True, timeout)
        for core in cores:
            core.user_power_state = "D0"
            core.apply_power()
            core.resets += 1
        for core in cores:
            if core.open_count and core.memory_enabled():
                core.move(False, timeout)
