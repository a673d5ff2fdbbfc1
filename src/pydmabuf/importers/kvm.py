"""KVM guest memory slots backed by a VFIO dma-buf: a posted proposal.

**Nothing here is merged upstream.**  Upstream KVM (mid-2026) has no
dma-buf support: assigned BARs reach guests through a VFIO mmap resolved
by KVM's MMU notifier.  This models Xu Yilun's RFCs ("Private MMIO support
for private assigned dev", Jan 2025; the TDX Connect series, May 2025),
which let a confidential VM map a host-unmappable VFIO dma-buf:

* ``KVM_SET_USER_MEMORY_REGION2`` takes ``KVM_MEM_VFIO_DMABUF`` (1 << 3)
  with the dma-buf fd in the ``guest_memfd`` field
  (:meth:`KvmVm.set_user_memory_region2`): only for VMs with private
  memory (``kvm_arch_has_private_mem``), exclusive with
  ``KVM_MEM_GUEST_MEMFD``, no dirty logging and no read-only slots,
  ``guest_memfd_offset`` 0, and the dma-buf exactly as large as the slot;
  the slot's other checks are upstream KVM's, in its order.
* Binding takes a dma-buf reference and attaches as a dynamic importer
  asking for ``[PAL, SGT]`` (mapping types: VFIO gives PAL) whose
  invalidation zaps the slot.
* A guest access (:meth:`KvmVm.guest_read` / :meth:`KvmVm.guest_write`)
  translates through the VM's second-stage table (the EPT/NPT, an
  :class:`~pydmabuf.IoPageTable`); pages not mapped there fault in through
  the RFC's ``get_pfn`` under the reservation lock (here the exporter's
  physical ranges), 4 KiB per page.
* The exporter invalidating (VFIO revoking) zaps every entry of the slot
  and flushes; the next access faults again and, while the buffer is
  revoked, fails.
* A fault follows KVM's invalidation protocol: it reads
  ``mmu_invalidate_seq`` before ``get_pfn`` (which takes and drops the
  reservation lock) and installs the entries under ``mmu_lock`` only if
  ``mmu_invalidate_retry_gfn()`` finds no invalidation in progress over
  them and none completed since; otherwise it retries
  (``fault_retries``).  Locks: the reservation lock before ``mmu_lock``
  (the invalidation runs under the first and takes the second).

Errors of guest accesses (chosen, as the RFC has no guest-visible ABI for
them): a failed ``get_pfn`` (revoked buffer, or an exporter without the
RFC's ``get_pfn`` op, which only VFIO got) is :class:`~pydmabuf.errors.IOFailure`
(EIO), what ``KVM_RUN`` returns with ``KVM_EXIT_MEMORY_FAULT`` in the RFC;
an access outside every slot is :class:`~pydmabuf.errors.IommuFault`
(EFAULT), standing in for the MMIO exit a VMM would emulate.

Model choices where the RFC is loose or could not work upstream: the RFC
attaches with no device, which the merged dma-buf core refuses (EINVAL),
so the model attaches from a non-PCI stand-in device of the VM; the RFC
never forbids changing ``KVM_MEM_VFIO_DMABUF`` on an existing slot, the
model does (EINVAL); the model's
second-stage table takes 48-bit guest addresses (EINVAL beyond).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pydmabuf import access, errors, mapping
from pydmabuf._core import IoPageTable, RangeTable
from pydmabuf._lifecycle import Owner
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE, IommuProt, RangeKind, _fmt_size
from pydmabuf._uapi import U64_MAX, as_uint
from pydmabuf.dmabuf import PHYS_NAMESPACE, Attachment, DmaBuf, ImporterOps, dma_buf_ref
from pydmabuf.exporters.vfio import VfioPciDmaBuf
from pydmabuf.locking import Mutex
from pydmabuf.machine import Device, Machine

log = logging.getLogger(__name__)

__all__ = [
    "KvmVm",
    "KvmMemslot",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_VFIO_DMABUF",
    "KVM_USER_MEM_SLOTS",
]

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
#: The RFC's flag.
KVM_MEM_VFIO_DMABUF = 1 << 3
#: x86: SHRT_MAX slot ids, three of them KVM's own.
KVM_MEM_SLOTS_NUM = 32767
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - 3
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
#: x86-64 user address space (``access_ok``).
TASK_SIZE = 1 << 47
#: The model's second-stage table input width.
GPA_BITS = 48
_PRIVATE = KVM_MEM_GUEST_MEMFD | KVM_MEM_VFIO_DMABUF
_NOT_MAPPED = np.uint64(U64_MAX)
#: How often one guest access faults in and finds its pages zapped again
#: before it gives up with EAGAIN (KVM would retry for ever).
_FAULT_RETRIES = 1000
#: Second-stage entries of MMIO: read, write, uncached device memory.
_EPT_PROT = int(IommuProt.READ | IommuProt.WRITE | IommuProt.MMIO)


class _SlotBinding(ImporterOps):
    """``kv_dmabuf_attach_ops``: peer-to-peer, and an invalidation that
    zaps the slot.  Declares the physical-range interface, the model's
    stand-in for the RFC's ``dma_buf_get_pfn_unlocked``."""

    allow_peer2peer = True
    import_namespaces = frozenset({PHYS_NAMESPACE})

    def __init__(self, vm: KvmVm) -> None:
        self.vm = vm
        self.slot: KvmMemslot | None = None

    def invalidate_mappings(self, attachment: Attachment) -> None:
        if self.slot is not None:
            self.vm._zap(self.slot)


@dataclass(eq=False)
class KvmMemslot:
    """``struct kvm_memory_slot`` of a dma-buf slot."""

    slot: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    dmabuf: DmaBuf | None = None
    attachment: Attachment | None = None
    binding: _SlotBinding | None = field(default=None, repr=False)
    faults: int = 0
    zaps: int = 0
    #: Faults that found an invalidation raced them and started again.
    fault_retries: int = 0
    #: KVM_MEMSLOT_INVALID: set under ``mmu_lock`` when the slot is being
    #: deleted; a fault that finds it set maps nothing.
    deleted: bool = field(default=False, repr=False)
    #: The generation of the dma-buf the present entries were faulted from
    #: (the access gate checks it); None while nothing is faulted in.
    lease: access.Lease | None = field(default=None, repr=False)

    @property
    def as_id(self) -> int:
        """The address space (``slot >> 16``)."""
        return self.slot >> 16

    @property
    def gpa(self) -> int:
        """The first guest physical address."""
        return self.base_gfn << PAGE_SHIFT

    @property
    def nbytes(self) -> int:
        """The slot's size in bytes."""
        return self.npages << PAGE_SHIFT

    def __repr__(self) -> str:
        return (f"<KvmMemslot {self.slot} gpa [{self.gpa:#x}, +{_fmt_size(self.nbytes)}] flags={self.flags:#x} "
                f"faults={self.faults} zaps={self.zaps}>")


class KvmVm(Owner):
    """A KVM virtual machine with dma-buf memory slots (the RFC).

    Parameters
    ----------
    machine : Machine
    private_mem : bool
        A confidential VM (TDX, SEV-SNP): ``kvm_arch_has_private_mem``.
        The RFC's flag is refused (EINVAL) without it.
    readonly_mem : bool
        ``kvm_arch_has_readonly_mem`` (x86: True).
    name : str

    Attributes
    ----------
    ept : IoPageTable
        The second-stage table (guest physical -> host physical).
    faults, zaps, tlb_flushes : int
        Pages faulted in, slot zaps, remote TLB flushes.
    """

    def __init__(self, machine: Machine, *, private_mem: bool = False, readonly_mem: bool = True,
                 name: str = "vm") -> None:
        if not isinstance(machine, Machine):
            raise TypeError(f"machine must be a Machine, not {type(machine).__name__}")
        self.machine = machine
        self.name = name
        self.private_mem = bool(private_mem)
        self.readonly_mem = bool(readonly_mem)
        self.ept = IoPageTable(ias=GPA_BITS, oas=52)
        self.slots_lock = Mutex("&kvm->slots_lock")
        #: An rwlock (x86) taken for write on every path modelled here.
        self.mmu_lock = Mutex("&kvm->mmu_lock")
        #: x86: two address spaces (SMM) unless the VM has protected state.
        self.nr_address_spaces = 1 if self.private_mem else 2
        self._slots: dict[int, KvmMemslot] = {}
        self._gpa = [RangeTable() for _ in range(self.nr_address_spaces)]
        self._device = Device(machine, f"kvm:{name}", description="KVM (the RFC attaches with no device)")
        # The guest as the access gate sees it: its refusals are guest
        # faults naming the VM; a confidential VM may reach private memory.
        trusted = self.private_mem
        self._gate = access.Accessor(
            access.GUEST, name, machine, name,
            lambda gpa, reason: errors.IommuFault(f"{name}: guest access at gpa {gpa:#x}: {reason}"),
            lambda: trusted)
        self.faults = 0
        self.zaps = 0
        self.tlb_flushes = 0
        #: kvm->mmu_invalidate_seq / _in_progress / _range_start/_end (gfns).
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = 0
        self.mmu_invalidate_range_end = 0
        self.fault_retries = 0
        #: Test hooks for deterministic interleavings: called between a
        #: fault's get_pfn and its mmu_lock section (slot, gfns), and
        #: between an invalidation's begin and end (slot).
        self._after_get_pfn: Any = None
        self._after_invalidate_begin: Any = None
        self.closed = False

    # ------------------------------------------------------------ slots

    @property
    def memslots(self) -> list[KvmMemslot]:
        """The slots, by address space and guest address."""
        with self.slots_lock:
            return sorted(self._slots.values(), key=lambda s: (s.as_id, s.base_gfn))

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int = 0, guest_memfd: int | DmaBuf = -1,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: create, move or (``memory_size``
        0) delete a slot.  Only ``KVM_MEM_VFIO_DMABUF`` slots have backing
        in the model (others: NotSupported after every check).

        Parameters
        ----------
        slot : int
            ``as_id << 16 | id``.
        flags : int
            ``KVM_MEM_*``.
        guest_phys_addr, memory_size : int
            Page aligned.
        userspace_addr : int
            Unused by dma-buf slots, checked as KVM checks it.
        guest_memfd : int or DmaBuf
            The dma-buf fd (the RFC reuses this field), or the buffer.
        guest_memfd_offset : int
            Must be 0 for a dma-buf slot.

        Raises
        ------
        In KVM's order:

        InvalidArgument
            (EINVAL) a slot id past the user slots; private flags together;
            a flag the VM does not take (``KVM_MEM_VFIO_DMABUF`` without
            private memory; dirty logging or read-only with it); sizes,
            addresses or the user address not page aligned or out of range;
            an address space or id past KVM's; a wrapping or too large
            region; deleting a slot that does not exist; changing size,
            user address or read-only-ness of a slot (or, in the model,
            its dma-buf flag).
        AlreadyExists
            (EEXIST) the region overlaps another slot.
        InvalidArgument
            (EINVAL) ``guest_memfd_offset`` not 0; the dma-buf is not the
            slot's size.
        BadHandle
            (EBADF) ``guest_memfd`` is not an open fd (EINVAL if it is not
            a dma-buf).
        NotSupported / NoDevice
            The exporter refused the attachment (VFIO: revoked is ENODEV).

        A failed call changes no slot.
        """
        slot = as_uint(slot, "slot", 32)
        flags = as_uint(flags, "flags", 32)
        gpa = as_uint(guest_phys_addr, "guest_phys_addr")
        size = as_uint(memory_size, "memory_size")
        uaddr = as_uint(userspace_addr, "userspace_addr")
        offset = as_uint(guest_memfd_offset, "guest_memfd_offset")
        # kvm_vm_ioctl_set_memory_region()
        if slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise errors.InvalidArgument(f"slot id {slot & 0xFFFF} is not a user slot (< {KVM_USER_MEM_SLOTS})")
        with self.slots_lock:
            self._need_open("set_user_memory_region2")
            self._check_flags(flags)
            as_id, sid = slot >> 16, slot & 0xFFFF
            # kvm_set_memory_region(): general sanity checks
            if size & (PAGE_SIZE - 1):
                raise errors.InvalidArgument(f"memory_size {size:#x} is not page aligned")
            if gpa & (PAGE_SIZE - 1):
                raise errors.InvalidArgument(f"guest_phys_addr {gpa:#x} is not page aligned")
            if uaddr & (PAGE_SIZE - 1) or uaddr + size > TASK_SIZE:
                raise errors.InvalidArgument(f"userspace_addr {uaddr:#x} (+{size:#x}) is not an aligned user range")
            if flags & KVM_MEM_GUEST_MEMFD and (offset & (PAGE_SIZE - 1) or offset + size > U64_MAX):
                raise errors.InvalidArgument("guest_memfd_offset is not page aligned or wraps")
            if as_id >= self.nr_address_spaces or sid >= KVM_MEM_SLOTS_NUM:
                raise errors.InvalidArgument(f"address space {as_id} / slot id {sid} out of range")
            if gpa + size > U64_MAX:
                raise errors.InvalidArgument(f"[{gpa:#x}, +{size:#x}) wraps")
            if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
                raise errors.InvalidArgument(f"{size >> PAGE_SHIFT} pages is more than a slot holds")
            old = self._slots.get(slot)
            if size == 0:
                if old is None:
                    raise errors.InvalidArgument(f"slot {slot} does not exist")
                self._delete(old)
                return
            base_gfn, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
            if old is not None:
                if flags & KVM_MEM_GUEST_MEMFD:
                    raise errors.InvalidArgument("private memslots cannot change, only be deleted")
                if uaddr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
                    raise errors.InvalidArgument(f"slot {slot}: only its address or flags may change")
                if (flags ^ old.flags) & KVM_MEM_VFIO_DMABUF:
                    raise errors.InvalidArgument(f"slot {slot}: the model does not let a slot gain or lose "
                                                 "KVM_MEM_VFIO_DMABUF")
                if base_gfn == old.base_gfn and flags == old.flags:
                    return  # nothing to change
            moving = old is None or base_gfn != old.base_gfn
            if moving:
                for r in self._gpa[as_id].overlapping(gpa, size):
                    if r.owner != slot + 1:
                        raise errors.AlreadyExists(f"[{gpa:#x}, +{size:#x}) overlaps slot {r.owner - 1}")
            if gpa + size > 1 << GPA_BITS:
                raise errors.InvalidArgument(f"the model's second-stage table takes {GPA_BITS}-bit guest addresses")
            if flags & KVM_MEM_GUEST_MEMFD:
                raise errors.NotSupported("guest_memfd slots are not modelled")
            if not flags & KVM_MEM_VFIO_DMABUF:
                raise errors.NotSupported("only KVM_MEM_VFIO_DMABUF slots have backing in the model")
            if offset:
                raise errors.InvalidArgument("a dma-buf slot needs guest_memfd_offset 0")
            new = KvmMemslot(slot, base_gfn, npages, flags, uaddr)
            self._bind(new, guest_memfd)
            # kvm_set_memslot(): the old slot goes (zapped, unbound)
            if old is not None:
                self._delete(old)
            with self.mmu_lock:  # published whole: a fault sees both maps or neither
                self._slots[slot] = new
                self._gpa[as_id].insert(gpa, size, kind=RangeKind.OTHER, owner=slot + 1)

    def _check_flags(self, flags: int) -> None:
        """``check_memory_region_flags()`` with the RFC's change."""
        private = flags & _PRIVATE
        if private & (private - 1):
            raise errors.InvalidArgument("KVM_MEM_GUEST_MEMFD and KVM_MEM_VFIO_DMABUF exclude each other")
        valid = KVM_MEM_LOG_DIRTY_PAGES
        if self.private_mem:
            valid |= private
        if private:
            valid &= ~KVM_MEM_LOG_DIRTY_PAGES
        if self.readonly_mem and not private:
            valid |= KVM_MEM_READONLY
        if flags & ~valid:
            why = " (private memory flags need a VM with private memory)" if private and not self.private_mem else ""
            raise errors.InvalidArgument(f"memslot flags {flags:#x} not valid for {self.name}{why}")

    def _bind(self, slot: KvmMemslot, fd: int | DmaBuf) -> None:
        """``kvm_vfio_dmabuf_bind()``."""
        buf = dma_buf_ref(fd, "kvm_vfio_dmabuf_bind")
        try:
            if slot.nbytes != buf.size:
                raise errors.InvalidArgument(f"the dma-buf is {_fmt_size(buf.size)}, the slot "
                                             f"{_fmt_size(slot.nbytes)}: they must be equal")
            binding = _SlotBinding(self)
            # Mapping types: the physical list first; a scatterlist for the
            # VM's stand-in device otherwise (any exporter binds, as in the
            # RFC; only a PAL exporter serves faults).
            a = buf.mapping_attach([mapping.pal_importer(), mapping.sgt_importer(self._device, True)],
                                   binding, slot)
        except BaseException:
            buf.put()
            raise
        binding.slot = slot
        slot.dmabuf, slot.attachment, slot.binding = buf, a, binding

    def _delete(self, slot: KvmMemslot) -> None:
        """``kvm_set_memslot(DELETE)``: under ``mmu_lock``, in one step,
        mark the slot invalid, take it out of the address space and zap its
        entries (``kvm_invalidate_memslot`` then the zap, as KVM does
        before it publishes the new slots): a racing fault either mapped
        before the zap (and is zapped) or finds the slot gone; a racing
        access sees no slot.  Then ``kvm_vfio_dmabuf_unbind()``: detach,
        put (outside ``mmu_lock``: detach takes the reservation lock,
        which orders before it)."""
        with self.mmu_lock:
            slot.deleted = True
            self._gpa[slot.as_id].remove(slot.gpa)
            del self._slots[slot.slot]
            if slot.binding is not None:
                slot.binding.slot = None
            self._zap_locked(slot)
        if slot.attachment is not None and slot.dmabuf is not None:
            slot.dmabuf.detach(slot.attachment)
            slot.dmabuf.put()
            slot.attachment = slot.dmabuf = None

    # ------------------------------------------------------ the second stage

    def _zap(self, slot: KvmMemslot) -> None:
        """``kv_dmabuf_move_notify()``: an invalidation of the slot's range
        bracketed as KVM brackets every invalidation
        (``kvm_mmu_invalidate_begin()`` / ``kvm_mmu_invalidate_range_add()``
        then the zap, under ``mmu_lock``; ``kvm_mmu_invalidate_end()``
        bumps ``mmu_invalidate_seq`` under it again), so a fault that read
        the pfns before it retries instead of installing them."""
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        with self.mmu_lock:
            # kvm_mmu_invalidate_begin() + kvm_mmu_invalidate_range_add()
            self.mmu_invalidate_in_progress += 1
            if self.mmu_invalidate_in_progress == 1:
                self.mmu_invalidate_range_start, self.mmu_invalidate_range_end = start, end
            else:
                self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
                self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)
            self._zap_locked(slot)
        hook = self._after_invalidate_begin
        if hook is not None:
            hook(slot)
        with self.mmu_lock:
            # kvm_mmu_invalidate_end(): the sequence first, then the count.
            self.mmu_invalidate_seq += 1
            self.mmu_invalidate_in_progress -= 1

    def _retry_gfn(self, mmu_seq: int, gfns: np.ndarray) -> bool:
        """``mmu_invalidate_retry_gfn()`` (``mmu_lock`` held): an
        invalidation covering one of ``gfns`` is in progress, or one
        finished since the fault read ``mmu_seq``."""
        self.mmu_lock.assert_held()
        if self.mmu_invalidate_in_progress:
            lo, hi = np.uint64(self.mmu_invalidate_range_start), np.uint64(self.mmu_invalidate_range_end)
            if bool(((gfns >= lo) & (gfns < hi)).any()):
                return True
        return self.mmu_invalidate_seq != mmu_seq

    def _zap_locked(self, slot: KvmMemslot) -> None:
        """Drop every second-stage entry of the slot (private and shared)
        and flush the TLBs if any went (``mmu_lock`` held)."""
        self.mmu_lock.assert_held()
        leaves = self.ept.leaves()
        lo, hi = np.uint64(slot.gpa), np.uint64(slot.gpa + slot.nbytes)
        mine = leaves[(leaves[:, 0] >= lo) & (leaves[:, 0] < hi)]
        slot.zaps += 1
        self.zaps += 1
        slot.lease = None
        if len(mine) == 0:
            return
        starts, sizes = mine[:, 0], mine[:, 2]
        brk = np.flatnonzero(starts[1:] != starts[:-1] + sizes[:-1]) + 1
        first = np.concatenate(([0], brk))
        last = np.concatenate((brk, [len(mine)])) - 1
        for i, j in zip(first.tolist(), last.tolist()):
            s = int(starts[i])
            self.ept.unmap(s, int(starts[j] + sizes[j]) - s)
        self.tlb_flushes += 1

    def _slot_at(self, as_id: int, gpa: int) -> KvmMemslot | None:
        """The slot holding ``gpa`` now, or None (under ``mmu_lock``, which
        deletion holds while it takes a slot out of both maps)."""
        with self.mmu_lock:
            r = self._gpa[as_id].lookup(gpa)
            return None if r is None else self._slots.get(r.owner - 1)

    def _fault_in(self, slot: KvmMemslot, gfns: np.ndarray) -> np.ndarray:
        """Fault the slot's missing ``gfns`` (sorted) in, the RFC's fault
        path with KVM's invalidation retry (``kvm_faultin_pfn()`` then
        ``is_page_fault_stale()`` of ``arch/x86/kvm/mmu/mmu.c``): read
        ``mmu_invalidate_seq``; ``get_pfn`` (the reservation lock taken and
        dropped inside, as ``dma_buf_get_pfn_unlocked``); then under
        ``mmu_lock`` install the entries unless
        ``mmu_invalidate_retry_gfn()`` says an invalidation ran or is
        running over them, in which case the fault starts again (counted in
        ``fault_retries``).  Returns the pages' physical addresses."""
        buf, a = slot.dmabuf, slot.attachment
        assert buf is not None and a is not None
        where = f"KVM_RUN: -EIO (KVM_EXIT_MEMORY_FAULT at gpa {int(gfns[0]) << PAGE_SHIFT:#x})"
        if not isinstance(buf.exporter, VfioPciDmaBuf):
            raise errors.IOFailure(f"{where}: {buf.exporter.name} has no get_pfn op")
        for _ in range(_FAULT_RETRIES):
            mmu_seq = self.mmu_invalidate_seq  # then smp_rmb(): read before the pfns
            buf.resv.lock()
            try:
                lease = access.Lease(buf, f"{self.name}'s slot {slot.slot}")
                try:
                    pv = a.phys_vec()
                except errors.DmaBufError as e:
                    raise errors.IOFailure(f"{where}: get_pfn failed: {e.strerror}") from None
            finally:
                buf.resv.unlock()
            rows = np.asarray(pv.ranges, dtype=np.uint64).reshape(-1, 2)
            off = (gfns - np.uint64(slot.base_gfn)) << np.uint64(PAGE_SHIFT)
            phys: np.ndarray
            if len(rows) == 1:
                phys = off + rows[0, 0]
            else:
                ends = np.cumsum(rows[:, 1])
                idx = np.searchsorted(ends, off, side="right")
                phys = rows[idx, 0] + (off - (ends[idx] - rows[idx, 1]))
            hook = self._after_get_pfn
            if hook is not None:
                hook(slot, gfns)
            with self.mmu_lock:
                if slot.deleted:  # deleted since the lookup: map nothing
                    raise errors.IommuFault(f"{self.name}: guest access at gpa {int(gfns[0]) << PAGE_SHIFT:#x} "
                                            "hits no memslot (deleted while the fault ran)")
                if self._retry_gfn(mmu_seq, gfns):
                    # is_page_fault_stale(): the pfns may be gone; retry.
                    slot.fault_retries += 1
                    self.fault_retries += 1
                    continue
                # Another vCPU may have faulted some of these pages in since
                # the lookup (no invalidation since: same pages); KVM
                # finds the entry present and takes the fault as spurious.
                now = self.ept.iova_to_phys_many(gfns << np.uint64(PAGE_SHIFT))
                todo = now == _NOT_MAPPED
                mg, mp = gfns[todo], phys[todo]
                slot.lease = lease
                if len(mg):
                    brk = np.flatnonzero(mg[1:] != mg[:-1] + np.uint64(1)) + 1
                    for part_g, part_p in zip(np.split(mg, brk), np.split(mp, brk)):
                        self.ept.map_many(int(part_g[0]) << PAGE_SHIFT, np.ascontiguousarray(part_p), PAGE_SIZE,
                                          _EPT_PROT)
                slot.faults += len(mg)
                self.faults += len(mg)
                return phys
        raise errors.TryAgain(f"{self.name}: a fault at gpa {int(gfns[0]) << PAGE_SHIFT:#x} raced "
                              f"{_FAULT_RETRIES} invalidations in a row")

    def _present(self, gpa: int, nbytes: int) -> np.ndarray:
        """The host physical address of every page of the access, faulting
        the missing ones in, slot by slot in address order (pages of an
        earlier slot stay faulted in if a later one fails)."""
        if nbytes <= 0 or gpa + nbytes > 1 << GPA_BITS:
            raise errors.InvalidArgument(f"bad guest access [{gpa:#x}, +{nbytes:#x})")
        first, last = gpa >> PAGE_SHIFT, (gpa + nbytes - 1) >> PAGE_SHIFT
        # Walk no further than the first page no slot holds: the access
        # faults there, and the page arrays never outgrow the slots.
        pos = gpa
        for r in self._gpa[0].overlapping(gpa, nbytes):
            if r.start > pos:
                break
            pos = r.last + 1
        if pos < gpa + nbytes:
            last = min(last, pos >> PAGE_SHIFT)
        gfns = np.arange(first, last + 1, dtype=np.uint64)
        phys: np.ndarray = self.ept.iova_to_phys_many(gfns << np.uint64(PAGE_SHIFT))
        hole = np.flatnonzero(phys == _NOT_MAPPED)
        while len(hole):
            g0 = int(gfns[hole[0]])
            slot = self._slot_at(0, g0 << PAGE_SHIFT)
            if slot is None:
                raise errors.IommuFault(f"{self.name}: guest access at gpa {g0 << PAGE_SHIFT:#x} hits no memslot "
                                        "(KVM would exit to user space to emulate MMIO)")
            mine = hole[gfns[hole] < np.uint64(slot.base_gfn + slot.npages)]
            phys[mine] = self._fault_in(slot, gfns[mine])
            hole = hole[len(mine):]
        return phys

    def _ept_runs(self, gpa: int, nbytes: int) -> list[tuple[int, int]] | None:
        """The access's host physical runs from the second stage alone, or
        None if a page is not present (``mmu_lock`` held)."""
        inner = gpa & (PAGE_SIZE - 1)
        if nbytes <= PAGE_SIZE - inner:  # one page: no arrays
            p = self.ept.iova_to_phys(gpa - inner)
            return None if p is None else [(p + inner, nbytes)]
        pos = gpa  # slots must hold the whole access before its pages are listed
        for r in self._gpa[0].overlapping(gpa, nbytes):
            if r.start > pos:
                break
            pos = r.last + 1
        if pos < gpa + nbytes:
            return None  # a hole: the fault path names it
        gfns = np.arange(gpa >> PAGE_SHIFT, ((gpa + nbytes - 1) >> PAGE_SHIFT) + 1, dtype=np.uint64)
        phys: np.ndarray = self.ept.iova_to_phys_many(gfns << np.uint64(PAGE_SHIFT))
        if (phys == _NOT_MAPPED).any():
            return None
        lens = np.full(len(phys), PAGE_SIZE, dtype=np.uint64)
        lens[0] -= np.uint64(inner)
        phys[0] += np.uint64(inner)
        lens[-1] -= np.uint64(PAGE_SIZE - 1 - ((gpa + nbytes - 1) & (PAGE_SIZE - 1)))
        brk = np.flatnonzero(phys[1:] != phys[:-1] + lens[:-1]) + 1
        starts = np.concatenate(([0], brk))
        stops = np.concatenate((brk, [len(phys)]))
        return [(int(phys[i]), int(lens[i:j].sum())) for i, j in zip(starts.tolist(), stops.tolist())]

    def _leases(self, gpa: int, nbytes: int) -> tuple[access.Lease, ...]:
        """The leases of the slots under the access (``mmu_lock`` held)."""
        out = []
        for r in self._gpa[0].overlapping(gpa, nbytes):
            s = self._slots.get(r.owner - 1)
            if s is not None and s.lease is not None:
                out.append(s.lease)
        return tuple(out)

    def _guest_access(self, gpa: int, nbytes: int, data: memoryview | None) -> bytes | None:
        """One guest access through the access gate: translated and copied
        under ``mmu_lock``, so a zap (invalidation or slot deletion) comes
        wholly before or wholly after it; missing pages fault in first
        (without ``mmu_lock``: the fault takes the reservation lock, which
        orders before it) and the access retries, as a vCPU re-enters the
        guest after a fault."""
        if nbytes <= 0 or gpa + nbytes > 1 << GPA_BITS:
            raise errors.InvalidArgument(f"bad guest access [{gpa:#x}, +{nbytes:#x})")
        for _ in range(_FAULT_RETRIES):
            with self.mmu_lock:
                runs = self._ept_runs(gpa, nbytes)
                if runs is not None:
                    return access.access(self._gate, gpa, nbytes, lambda: runs, data=data,
                                         leases=self._leases(gpa, nbytes))
            self._present(gpa, nbytes)
        raise errors.TryAgain(f"{self.name}: guest access at gpa {gpa:#x} was zapped {_FAULT_RETRIES} times "
                              "in a row while it faulted in")

    def pre_fault_memory(self, gpa: int, nbytes: int) -> int:
        """``KVM_PRE_FAULT_MEMORY``: fault ``[gpa, gpa + nbytes)`` in without
        an access; returns the pages faulted.  Raises as a guest access."""
        before = self.faults
        self._need_open("pre_fault_memory")
        self._present(as_uint(gpa, "gpa"), as_uint(nbytes, "nbytes"))
        return self.faults - before

    def guest_read(self, gpa: int, nbytes: int) -> bytes:
        """What the guest reads at guest physical ``gpa`` (faulting pages in).

        Raises IOFailure (EIO: the dma-buf is revoked, or its exporter has
        no ``get_pfn``), IommuFault (EFAULT: no slot there), InvalidArgument
        (an empty or out-of-range access)."""
        self._need_open("guest_read")
        out = self._guest_access(as_uint(gpa, "gpa"), as_uint(nbytes, "nbytes"), None)
        assert out is not None  # a read returns the bytes
        return out

    def guest_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """The guest writes ``data`` at ``gpa``; raises as :meth:`guest_read`."""
        self._need_open("guest_write")
        buf = memoryview(data).cast("B")
        self._guest_access(as_uint(gpa, "gpa"), len(buf), buf)

    # ---------------------------------------------------------- lifetime

    @property
    def stats(self) -> dict[str, int]:
        """``slots``, ``faults``, ``zaps``, ``tlb_flushes``, ``mapped_pages``."""
        return {"slots": len(self._slots), "faults": self.faults, "zaps": self.zaps,
                "tlb_flushes": self.tlb_flushes, "mapped_pages": self.ept.stats["mapped_nbytes"] >> PAGE_SHIFT}

    def _need_open(self, what: str) -> None:
        if self.closed:
            raise errors.BadHandle(f"{what}: {self.name} was destroyed")

    def close(self) -> None:
        """Destroy the VM: every slot deleted (zapped, unbound)."""
        with self.slots_lock:
            if self.closed:
                return
            for s in list(self._slots.values()):
                self._delete(s)
            self.closed = True

    def _owns(self) -> bool:
        # A VM with no slot binds nothing: collecting it leaks nothing.
        return not self.closed and bool(self._slots)

    def _leak_message(self) -> str:
        return f"{self!r} collected without close(): its slots stay bound to their dma-bufs"

    def __exit__(self, *exc: object) -> None:
        self.close()  # the block destroys the VM, slots or none

    def __repr__(self) -> str:
        kind = "confidential" if self.private_mem else "plain"
        return (f"<KvmVm {self.name} ({kind}): {len(self._slots)} slot(s), {self.faults} faults, "
                f"{self.zaps} zaps{', destroyed' if self.closed else ''}>")
