"""KVM dma-buf memslots after the posted RFC (not upstream): the slot
checks, first-touch faults through the second-stage table, zap on
invalidation, EIO while revoked."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pydmabuf import IommuProt, Machine, errors, files
from pydmabuf.dmabuf import close
from pydmabuf.exporters import SystemHeap, VfioPciBar
from pydmabuf.importers import KvmVm
from pydmabuf.importers.kvm import (KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
                                    KVM_MEM_VFIO_DMABUF, KVM_USER_MEM_SLOTS)

from driver_helpers import vfio_export
from kernel_rc import kernel_rc

G = 4096
DMABUF = KVM_MEM_VFIO_DMABUF
GPA = 1 << 32


def test_the_slot_and_the_dma_buf_must_be_the_same_size(m):
    with vfio_export(m, "vfio1", nbytes=32 << 10) as (v, b):
        vm = KvmVm(m, private_mem=True)
        assert kernel_rc(vm.set_user_memory_region2, 0, DMABUF, GPA, 28 << 10, guest_memfd=b) == -errno.EINVAL
        assert kernel_rc(vm.set_user_memory_region2, 0, DMABUF, GPA, 36 << 10, guest_memfd=b) == -errno.EINVAL
        assert vm.memslots == [] and not b.attachments and b.refcount == 1
        fd = b.get().fd()
        vm.set_user_memory_region2(0, DMABUF, GPA, 32 << 10, guest_memfd=fd)
        (s,) = vm.memslots
        assert (s.gpa, s.nbytes, s.npages) == (GPA, 32 << 10, 8) and s.attachment.dynamic and s.attachment.peer2peer
        assert b.refcount == 3  # ours, the fd's and the slot's
        assert vm.stats["mapped_pages"] == 0  # nothing until the guest touches it
        vm.close()
        assert not b.attachments and b.refcount == 2
        close(fd)


def test_only_vms_with_private_memory_take_the_dmabuf_flag(m):
    with vfio_export(m, "vfio1", nbytes=8 * G) as (v, b):
        plain = KvmVm(m)
        assert kernel_rc(plain.set_user_memory_region2, 0, DMABUF, GPA, 8 * G, guest_memfd=b) == -errno.EINVAL
        cvm = KvmVm(m, private_mem=True)
        for flags in (DMABUF | KVM_MEM_GUEST_MEMFD, DMABUF | KVM_MEM_LOG_DIRTY_PAGES, DMABUF | KVM_MEM_READONLY,
                      DMABUF | 1 << 4):
            assert kernel_rc(cvm.set_user_memory_region2, 0, flags, GPA, 8 * G, guest_memfd=b) == -errno.EINVAL
        # Plain slots pass KVM's checks but have no backing in the model.
        assert kernel_rc(plain.set_user_memory_region2, 0, KVM_MEM_READONLY, GPA, 8 * G) == -errno.EOPNOTSUPP
        assert kernel_rc(cvm.set_user_memory_region2, 0, KVM_MEM_GUEST_MEMFD, GPA, 8 * G) == -errno.EOPNOTSUPP
        assert not b.attachments


def test_slot_checks_in_kvms_order(m):
    with vfio_export(m, "vfio1", nbytes=8 * G) as (v, b):
        vm = KvmVm(m, private_mem=True)
        s = vm.set_user_memory_region2
        assert kernel_rc(s, KVM_USER_MEM_SLOTS, DMABUF, GPA, 8 * G, guest_memfd=b) == -errno.EINVAL
        assert kernel_rc(s, KVM_USER_MEM_SLOTS, 1 << 9, GPA, 8 * G) == -errno.EINVAL  # the id check comes first
        assert kernel_rc(s, 0, DMABUF, GPA, 0x1800, guest_memfd=b) == -errno.EINVAL
        assert kernel_rc(s, 0, DMABUF, GPA + 0x800, 8 * G, guest_memfd=b) == -errno.EINVAL
        assert kernel_rc(s, 0, DMABUF, GPA, 8 * G, userspace_addr=0x800, guest_memfd=b) == -errno.EINVAL
        assert kernel_rc(s, 0, DMABUF, GPA, 8 * G, userspace_addr=1 << 47, guest_memfd=b) == -errno.EINVAL
        assert kernel_rc(s, 1 << 16, DMABUF, GPA, 8 * G, guest_memfd=b) == -errno.EINVAL  # one address space
        assert kernel_rc(s, 0, DMABUF, 2**64 - G, 8 * G, guest_memfd=b) == -errno.EINVAL  # wraps
        assert kernel_rc(s, 0, DMABUF, GPA, (1 << 31) << 12, guest_memfd=b) == -errno.EINVAL  # too many pages
        assert kernel_rc(s, 3, DMABUF, GPA, 0) == -errno.EINVAL  # deleting nothing
        assert kernel_rc(s, 0, DMABUF, 1 << 48, 8 * G, guest_memfd=b) == -errno.EINVAL  # the model's 48-bit EPT
        assert kernel_rc(s, 0, DMABUF, GPA, 8 * G, guest_memfd=b, guest_memfd_offset=G) == -errno.EINVAL
        assert kernel_rc(s, 0, DMABUF, GPA, 8 * G, guest_memfd=999) == -errno.EBADF
        other = files.install(object())
        assert kernel_rc(s, 0, DMABUF, GPA, 8 * G, guest_memfd=other) == -errno.EINVAL
        files.close(other)
        s(0, DMABUF, GPA, 8 * G, guest_memfd=b)
        assert kernel_rc(s, 1, DMABUF, GPA + 4 * G, 8 * G, guest_memfd=b) == -errno.EEXIST
        assert kernel_rc(s, 0, DMABUF, GPA, 16 * G, guest_memfd=b) == -errno.EINVAL  # resizing
        assert kernel_rc(s, 0, 0, GPA, 8 * G) == -errno.EINVAL  # losing the flag
        assert len(vm.memslots) == 1 and len(b.attachments) == 1
        s(0, DMABUF, GPA, 8 * G, guest_memfd=b)  # nothing to change
        assert len(b.attachments) == 1
        v.set_memory_decode(False)
        assert kernel_rc(s, 2, DMABUF, 2 * GPA, 8 * G, guest_memfd=b) == -errno.ENODEV  # VFIO's attach
        assert len(vm.memslots) == 1 and len(b.attachments) == 1
        vm.close()
        with pytest.raises(errors.BadHandle):
            s(0, DMABUF, GPA, 8 * G, guest_memfd=b)


def test_first_touch_faults_and_guest_access(m):
    with vfio_export(m, "vfio1", nbytes=64 * G, offset=16 * G) as (v, b):
        phys = int(b.exporter.ranges[0, 0])
        with KvmVm(m, private_mem=True) as vm:
            vm.set_user_memory_region2(0, DMABUF, GPA, 64 * G, guest_memfd=b)
            m.memory.write(phys + 3 * G - 2, b"abcd")
            assert vm.guest_read(GPA + 3 * G - 2, 4) == b"abcd"  # two pages faulted in
            assert vm.faults == 2 and vm.memslots[0].faults == 2
            assert vm.guest_read(GPA + 3 * G - 2, 4) == b"abcd" and vm.faults == 2  # present now
            vm.guest_write(GPA + 10 * G, b"from the guest")
            assert m.memory.read(phys + 10 * G, 14) == b"from the guest" and vm.faults == 3
            leaves = vm.ept.leaves().tolist()
            assert [r[:3] for r in leaves] == [[GPA + 2 * G, phys + 2 * G, G], [GPA + 3 * G, phys + 3 * G, G],
                                               [GPA + 10 * G, phys + 10 * G, G]]
            assert {r[3] for r in leaves} == {int(IommuProt.READ | IommuProt.WRITE | IommuProt.MMIO)}
            assert vm.pre_fault_memory(GPA, 64 * G) == 61 and vm.stats["mapped_pages"] == 64
            with pytest.raises(errors.IommuFault):
                vm.guest_read(GPA + 64 * G, 1)  # no slot there
            with pytest.raises(errors.IommuFault):
                vm.guest_read(GPA - 1, 2)  # starts outside
            with pytest.raises(errors.InvalidArgument):
                vm.guest_read(GPA, 0)


def test_revoke_zaps_and_access_fails_until_unrevoked(m):
    with vfio_export(m, "vfio1", nbytes=16 * G) as (v, b), KvmVm(m, private_mem=True) as vm:
        vm.set_user_memory_region2(0, DMABUF, GPA, 16 * G, guest_memfd=b)
        vm.pre_fault_memory(GPA, 16 * G)
        flushes = vm.tlb_flushes
        v.set_memory_decode(False, timeout=5)  # VFIO revokes: the slot is zapped first
        assert vm.stats["mapped_pages"] == 0 and vm.zaps == 1 and vm.tlb_flushes == flushes + 1
        with pytest.raises(errors.IOFailure) as ei:
            vm.guest_read(GPA, 8)
        assert ei.value.errno == errno.EIO and "KVM_EXIT_MEMORY_FAULT" in str(ei.value)
        assert vm.stats["mapped_pages"] == 0
        v.set_memory_decode(True, timeout=5)
        assert vm.zaps == 2  # told again: nothing left to zap
        m.memory.write(int(b.exporter.ranges[0, 0]), b"back")
        assert vm.guest_read(GPA, 4) == b"back"
        v.close(timeout=5)  # closing the device revokes for good
        with pytest.raises(errors.IOFailure):
            vm.guest_read(GPA, 4)


def test_a_multi_range_buffer_and_two_slots(m):
    with vfio_export(m, "vfio0", ranges=[(5 * G, 2 * G), (100 * G, 3 * G)]) as (v, b), \
            vfio_export(m, "vfio1", nbytes=4 * G) as (v2, b2), KvmVm(m, private_mem=True) as vm:
        vm.set_user_memory_region2(0, DMABUF, GPA, 5 * G, guest_memfd=b)
        vm.set_user_memory_region2(1, DMABUF, GPA + 5 * G, 4 * G, guest_memfd=b2)  # right after it
        r = b.exporter.ranges
        want = [int(r[0, 0]), int(r[0, 0]) + G, int(r[1, 0]), int(r[1, 0]) + G, int(r[1, 0]) + 2 * G,
                *[int(b2.exporter.ranges[0, 0]) + k * G for k in range(4)]]
        data = bytes(range(256)) * (9 * G // 256)
        vm.guest_write(GPA, data)  # one access over both slots
        assert [m.memory.read(p, 1)[0] for p in want] == [data[k * G] for k in range(9)]
        assert vm.guest_read(GPA, 9 * G) == data
        assert vm.ept.leaves()[:, 1].tolist() == want
        v2.set_memory_decode(False)  # only the second slot goes
        assert vm.stats["mapped_pages"] == 5 and vm.memslots[1].zaps == 1 and vm.memslots[0].zaps == 0
        with pytest.raises(errors.IOFailure):
            vm.guest_read(GPA + 4 * G, 2 * G)


def test_moving_and_deleting_slots(m):
    with vfio_export(m, "vfio1", nbytes=4 * G) as (v, b):
        vm = KvmVm(m, private_mem=True)
        vm.set_user_memory_region2(7, DMABUF, GPA, 4 * G, guest_memfd=b)
        vm.pre_fault_memory(GPA, 4 * G)
        old = vm.memslots[0].attachment
        vm.set_user_memory_region2(7, DMABUF, 2 * GPA, 4 * G, guest_memfd=b)  # move: bound again, old range zapped
        (s,) = vm.memslots
        assert s.gpa == 2 * GPA and s.attachment is not old and b.attachments == [s.attachment]
        assert vm.stats["mapped_pages"] == 0
        with pytest.raises(errors.IommuFault):
            vm.guest_read(GPA, 1)
        vm.guest_read(2 * GPA, 1)
        vm.set_user_memory_region2(7, DMABUF, 2 * GPA, 0)  # delete
        assert vm.memslots == [] and not b.attachments and b.refcount == 1 and vm.stats["mapped_pages"] == 0
        vm.close()


def test_exporters_without_get_pfn_fault_with_eio(m):
    heap = SystemHeap(m).allocate(4 * G)
    vm = KvmVm(m, private_mem=True)
    vm.set_user_memory_region2(0, DMABUF, GPA, 4 * G, guest_memfd=heap)  # the RFC binds it...
    with pytest.raises(errors.IOFailure) as ei:
        vm.guest_read(GPA, 1)  # ...but only VFIO got the get_pfn op
    assert "get_pfn" in str(ei.value)
    assert "1 slot(s)" in repr(vm) and "confidential" in repr(vm)
    vm.close()
    assert "destroyed" in repr(vm)
    heap.put()


# ------------------------------------------------------ a lifecycle model


class KvmLifecycle(RuleBasedStateMachine):
    """Slots of two VFIO buffers created, moved and deleted, VFIO revoking
    and un-revoking, guest reads and writes, against a plain model: every
    second-stage entry lies in a live slot of an unrevoked buffer and
    points at the right page; accesses succeed, fail with EIO, or fail
    with EFAULT exactly as the model says."""

    BASES = [GPA + k * 16 * G for k in range(4)]

    def __init__(self):
        super().__init__()
        self.m = Machine.default()
        self.vfio = {"a": VfioPciBar(self.m, "vfio0", ranges=[(0, 4 * G), (64 * G, 4 * G)]),
                     "b": VfioPciBar(self.m, "vfio1", offset=32 * G, nbytes=8 * G)}
        self.bufs = {k: v.export() for k, v in self.vfio.items()}
        self.vm = KvmVm(self.m, private_mem=True)
        self.slots = {}  # slot id -> (buffer name, gpa)

    def page_phys(self, which, k):
        r = self.bufs[which].exporter.ranges
        ends = np.cumsum(r[:, 1]).tolist()
        off = k * G
        i = next(i for i, e in enumerate(ends) if off < e)
        return int(r[i, 0]) + off - (ends[i] - int(r[i, 1]))

    def where(self, gpa):
        for sid, (which, base) in self.slots.items():
            if base <= gpa < base + 8 * G:
                return which, (gpa - base) // G
        return None

    @rule(sid=st.integers(0, 2), base=st.integers(0, 3), which=st.sampled_from(["a", "b"]))
    def set_slot(self, sid, base, which):
        gpa = self.BASES[base]
        clash = any(s != sid and b == gpa for s, (_, b) in self.slots.items())
        cur = self.slots.get(sid)
        got = kernel_rc(self.vm.set_user_memory_region2, sid, DMABUF, gpa, 8 * G, guest_memfd=self.bufs[which])
        if clash:
            assert got == -errno.EEXIST
        elif cur is not None and cur[1] == gpa:
            assert got == 0  # same place, size and flags: nothing changes, not even the buffer
        elif not self.m.device("vfio0" if which == "a" else "vfio1").memory_decode:
            assert got == -errno.ENODEV
        else:
            assert got == 0
            self.slots[sid] = (which, gpa)

    @rule(sid=st.integers(0, 2))
    def delete(self, sid):
        got = kernel_rc(self.vm.set_user_memory_region2, sid, DMABUF, 0, 0)
        assert got == (0 if sid in self.slots else -errno.EINVAL)
        self.slots.pop(sid, None)

    @rule(which=st.sampled_from(["a", "b"]), on=st.booleans())
    def decode(self, which, on):
        self.vfio[which].set_memory_decode(on)

    @rule(base=st.integers(0, 3), page=st.integers(0, 9), data=st.binary(min_size=1, max_size=64))
    def access(self, base, page, data):
        gpa = self.BASES[base] + page * G + 100
        hit = self.where(gpa)
        decoding = hit is not None and self.m.device("vfio0" if hit[0] == "a" else "vfio1").memory_decode
        try:
            self.vm.guest_write(gpa, data)
        except errors.IOFailure:
            assert hit is not None and not decoding
            return
        except errors.IommuFault:
            assert hit is None
            return
        assert decoding
        assert self.m.memory.read(self.page_phys(*hit) + 100, len(data)) == data
        assert self.vm.guest_read(gpa, len(data)) == data

    @invariant()
    def entries_point_at_live_unrevoked_pages(self):
        for gpa, phys, size, _ in self.vm.ept.leaves().tolist():
            hit = self.where(gpa)
            assert hit is not None and size == G
            assert not self.bufs[hit[0]].revoked
            assert phys == self.page_phys(*hit)

    def teardown(self):
        self.vm.close()
        for b in self.bufs.values():
            b.put()
        for v in self.vfio.values():
            v.close()


TestKvmLifecycle = KvmLifecycle.TestCase
TestKvmLifecycle.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_slot_deletion_against_guest_faults_leaves_no_mapping_and_no_keyerror(m):
    """Thread stress: vCPU threads fault and access a slot while another
    thread deletes it and creates it again over another buffer.  Right
    after each deletion no second-stage entry of the slot's range is left
    (a fault racing the deletion maps nothing); every racing access
    returns whole bytes of one buffer or a guest fault (EFAULT / EIO),
    never a bare KeyError; and the last slot's bytes are what is read."""
    import threading

    rounds, nbytes = 150, 8 * G
    with vfio_export(m, "vfio1", nbytes=nbytes) as (_, a), vfio_export(m, "vfio0", nbytes=nbytes) as (_, b), \
            KvmVm(m, private_mem=True) as vm:
        for buf, fill in ((a, b"A"), (b, b"B")):
            m.memory.write(int(buf.exporter.ranges[0, 0]), fill * nbytes)
        stop = threading.Event()
        bad: list[BaseException] = []
        seen: set[bytes] = set()

        def vcpu(seed: int) -> None:
            k = seed
            while not stop.is_set():
                k = (k * 1103515245 + 12345) & 0x7FFFFFFF
                off = (k % (nbytes // 8)) * 8
                try:
                    got = vm.guest_read(GPA + off, 8) if k & 1 else vm.pre_fault_memory(GPA + off, 2 * G)
                except (errors.IommuFault, errors.IOFailure):
                    continue
                except BaseException as e:  # KeyError, or anything else the race lets out
                    bad.append(e)
                    return
                if isinstance(got, bytes):
                    seen.add(got)

        threads = [threading.Thread(target=vcpu, args=(s,)) for s in (1, 2, 3)]
        for t in threads:
            t.start()
        try:
            for r in range(rounds):
                vm.set_user_memory_region2(0, DMABUF, GPA, nbytes, guest_memfd=(a, b)[r & 1])
                vm.pre_fault_memory(GPA, G)
                vm.set_user_memory_region2(0, DMABUF, GPA, 0)  # delete, with the vCPUs faulting
                leaves = vm.ept.leaves()
                left = leaves[(leaves[:, 0] >= GPA) & (leaves[:, 0] < GPA + nbytes)] if len(leaves) else leaves
                assert len(left) == 0, f"round {r}: {len(left)} guest mapping(s) alive with no slot"
                with pytest.raises(errors.IommuFault):
                    vm.guest_read(GPA, 8)
                assert not bad, bad
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not bad, bad
        assert seen <= {b"A" * 8, b"B" * 8}
        vm.set_user_memory_region2(0, DMABUF, GPA, nbytes, guest_memfd=b)
        assert vm.guest_read(GPA + G, 8) == b"B" * 8


# ------------------------------------------- the invalidation sequence retry
#
# kvm_faultin_pfn() reads mmu_invalidate_seq before it resolves the pfn;
# is_page_fault_stale() -> mmu_invalidate_retry_gfn() under mmu_lock
# sends the fault back (RET_PF_RETRY) when an invalidation completed since
# or is in progress over the gfn, so no entry from before it is installed.


def test_a_fault_racing_a_completed_invalidation_retries(m):
    with vfio_export(m, "vfio1", nbytes=4 * G) as (v, b), KvmVm(m, private_mem=True) as vm:
        vm.set_user_memory_region2(0, DMABUF, GPA, 4 * G, guest_memfd=b)
        m.memory.write(int(b.exporter.ranges[0, 0]), b"bar!")
        calls = []

        def between(slot, gfns):  # after get_pfn, before mmu_lock
            calls.append(vm.mmu_invalidate_seq)
            if len(calls) == 1:
                v.set_memory_decode(False, timeout=5)  # revoke: zap, seq + 1
                v.set_memory_decode(True, timeout=5)  # and back: seq + 1

        vm._after_get_pfn = between
        seq0 = vm.mmu_invalidate_seq
        assert vm.guest_read(GPA, 4) == b"bar!"
        assert vm.fault_retries == 1 and vm.memslots[0].fault_retries == 1
        assert calls == [seq0, seq0 + 2]  # the second try read the new sequence
        assert vm.stats["mapped_pages"] == 1


def test_a_fault_racing_a_revoke_installs_nothing(m):
    with vfio_export(m, "vfio1", nbytes=4 * G) as (v, b), KvmVm(m, private_mem=True) as vm:
        vm.set_user_memory_region2(0, DMABUF, GPA, 4 * G, guest_memfd=b)

        def between(slot, gfns):
            vm._after_get_pfn = None
            v.set_memory_decode(False, timeout=5)

        vm._after_get_pfn = between
        # Without the retry the fault would install the pfns it read before
        # the revoke, and the guest would reach a BAR that stopped decoding.
        with pytest.raises(errors.IOFailure):
            vm.guest_read(GPA, 4)
        assert vm.fault_retries == 1 and vm.stats["mapped_pages"] == 0


def test_a_fault_during_an_invalidation_in_progress_retries(m):
    # mmu_invalidate_in_progress with the gfn in [range_start, range_end):
    # retry even though the sequence has not moved yet.
    with vfio_export(m, "vfio1", nbytes=4 * G) as (v, b), KvmVm(m, private_mem=True) as vm:
        vm.set_user_memory_region2(0, DMABUF, GPA, 4 * G, guest_memfd=b)
        began, resolved = threading.Event(), threading.Event()
        seen: dict[str, object] = {}

        def fault_waits(slot, gfns):  # the fault read its pfns; let the invalidation begin
            vm._after_get_pfn = None
            resolved.set()
            began.wait(5)

        def inside(slot):  # between kvm_mmu_invalidate_begin() and _end()
            began.set()
            deadline = 500
            while vm.fault_retries == 0 and deadline:
                threading.Event().wait(0.01)
                deadline -= 1
            seen["seq during"] = vm.mmu_invalidate_seq
            seen["in progress"] = vm.mmu_invalidate_in_progress

        def guest():
            try:
                seen["read"] = vm.guest_read(GPA, 4)
            except errors.DmaBufError as e:
                seen["read"] = e

        vm._after_get_pfn = fault_waits
        t = threading.Thread(target=guest)
        t.start()
        assert resolved.wait(5)
        vm._after_invalidate_begin = inside
        v.set_memory_decode(False, timeout=5)
        t.join(10)
        assert vm.fault_retries == 1 and seen["in progress"] == 1
        assert isinstance(seen["read"], errors.IOFailure)  # the retry found the buffer revoked
        assert vm.stats["mapped_pages"] == 0 and vm.mmu_invalidate_in_progress == 0


def test_guest_reads_racing_revokes_never_reach_a_revoked_bar(m):
    with vfio_export(m, "vfio1", nbytes=8 * G) as (v, b), KvmVm(m, private_mem=True) as vm:
        vm.set_user_memory_region2(0, DMABUF, GPA, 8 * G, guest_memfd=b)
        m.memory.write(int(b.exporter.ranges[0, 0]) + 5 * G, b"page5")
        stop = threading.Event()
        outcomes: dict[str, int] = {"ok": 0, "eio": 0}
        bad: list[BaseException] = []

        def guest():
            while not stop.is_set():
                try:
                    got = vm.guest_read(GPA + 5 * G, 5)
                except errors.IOFailure:
                    outcomes["eio"] += 1
                    continue
                except errors.IommuFault as e:
                    # The access gate refuses an entry of a buffer already
                    # marked revoked whose zap has not run yet (the model is
                    # stricter than hardware in that window).
                    if "was revoked" not in str(e):
                        bad.append(e)
                        return
                    outcomes["eio"] += 1
                    continue
                except BaseException as e:  # anything else is a bug
                    bad.append(e)
                    return
                if got != b"page5":
                    bad.append(AssertionError(got))
                    return
                outcomes["ok"] += 1

        t = threading.Thread(target=guest)
        t.start()
        for _ in range(40):
            v.set_memory_decode(False, timeout=5)
            assert vm.stats["mapped_pages"] == 0  # nothing faulted in from before the revoke survives
            v.set_memory_decode(True, timeout=5)
        stop.set()
        t.join(10)
        assert not bad and outcomes["ok"] + outcomes["eio"] > 0
        assert vm.mmu_invalidate_seq >= 80 and vm.mmu_invalidate_in_progress == 0
        assert vm.guest_read(GPA + 5 * G, 5) == b"page5"
