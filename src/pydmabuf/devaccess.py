"""What a device sees at a DMA address: its own translation, then the gate.

:func:`device_read` / :func:`device_write` (also ``Device.dma_read`` /
``dma_write``) translate a DMA address as the device's DMA would travel: a
PCI bus address a switch routes straight to a peer's BAR, the IOMMU page
table through the IOTLB, or dma-direct's ``dma_range_map``.  What lies at
the physical runs is then the access gate's to judge
(:mod:`pydmabuf.access`): refusals are IOMMU faults (EFAULT) naming the
device.  :func:`accessor` is the device as the gate sees it; the swiotlb
bounce copies use it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydmabuf import _core, access, errors
from pydmabuf._args import _bad_range
from pydmabuf._types import U64_MAX, IommuProt
from pydmabuf.pci import HostBridge, P2PMapType

if TYPE_CHECKING:
    from pydmabuf.device import Device

__all__ = ["accessor", "device_read", "device_write"]


def _fault(device: Device, addr: int, reason: str) -> errors.IommuFault:
    return errors.IommuFault(f"{device.name}: DMA fault at {addr:#x}: {reason}")


def accessor(device: Device) -> access.Accessor:
    """The device as the access gate sees it (made once per device): its
    refusals are IOMMU faults (EFAULT) naming it; it may reach
    confidential memory only while ``cc_trusted``."""
    acc: access.Accessor | None = getattr(device, "_gate", None)
    if acc is None:
        acc = access.Accessor(access.DEVICE, device.name, device.machine, device,
                              lambda addr, reason: _fault(device, addr, reason),
                              lambda: bool(device.cc_trusted))
        device._gate = acc  # type: ignore[attr-defined]  # this module's cache, kept on the device
    return acc


def _peer_bus_target(device: Device, addr: int, nbytes: int) -> int | None:
    """A PCI bus address that a switch routes straight to a peer's BAR (the
    BUS_ADDR route bypasses the IOMMU): its CPU physical address."""
    if device.bdf is None:  # not PCI
        return None
    # Bus addresses mean something only inside the device's own PCI
    # hierarchy: a switch routes them to a peer below the same host bridge.
    # The bridge is found once per device (walking up the tree on every
    # access cost a tenth of a small access).  The PCI tree is fixed once
    # built (nothing re-parents a node); the parent it was found through is
    # kept beside it as a guard all the same.
    hb: tuple[Any, HostBridge] | None = getattr(device, "_dma_host_bridge", None)
    if hb is None or hb[0] is not device.parent:
        hb = (device.parent, device.host_bridge)
        device._dma_host_bridge = hb  # type: ignore[attr-defined]  # this module's cache, like _gate
    m = device.machine
    for w in hb[1].windows:
        if w.bus_start <= addr < w.bus_start + w.nbytes:
            cpu = (addr - w.bus_offset) & U64_MAX
            bar = m.bar_at(cpu)
            if bar is not None and m.p2p_map_type(bar.owner, device) == P2PMapType.BUS_ADDR:
                if cpu + nbytes - 1 > bar.last:
                    raise _fault(device, addr, "access runs past the peer's BAR")
                return cpu
    return None


def _translate(device: Device, addr: int, nbytes: int, write: bool) -> list[tuple[int, int]] | access.Translation:
    """The device's own translation of a DMA address (peer bus address,
    IOMMU page table and IOTLB, or dma-direct): physical runs.  The checks
    of what lies there are the gate's (:mod:`pydmabuf.access`)."""
    cpu = _peer_bus_target(device, addr, nbytes)
    if cpu is not None:
        return [(cpu, nbytes)]
    dom = device.domain
    if dom is not None:
        need = int(IommuProt.WRITE if write else IommuProt.READ)

        def walk(a: int, n: int) -> tuple[Any, int, int]:
            r: tuple[Any, int, int] = _core.translate_iova(dom, a, n, need)
            return r

        def fault(at: int, fprot: int) -> errors.IommuFault:
            if fprot:
                return _fault(device, at, f"{'write' if write else 'read'} not permitted by the mapping "
                                          f"(prot {IommuProt(fprot)!r})")
            return _fault(device, at, "no IOMMU mapping (unmapped or stale IOVA)")

        assert device.iommu_group is not None  # a device with a domain is in a group
        runs, stale = device.iommu_group.iommu.iotlb.translate(device, dom, addr, nbytes, need, walk, fault)
        return access.Translation(runs, stale) if stale else runs
    if not device.dma_capable(addr, nbytes):
        raise _fault(device, addr, f"beyond the device's {device.dma_limit.bit_length()}-bit DMA limit")
    phys = device.dma_to_phys(addr)
    if phys is None:
        raise _fault(device, addr, "outside the device's dma-ranges")
    return [(phys, nbytes)]


def _need_access(addr: int, nbytes: int) -> None:
    if type(addr) is not int or type(nbytes) is not int:
        if not isinstance(addr, int) or not isinstance(nbytes, int):
            raise TypeError("addr and nbytes must be ints")
    if _bad_range(addr, nbytes):
        raise errors.InvalidArgument(f"bad access [{addr:#x}, +{nbytes:#x})")


def device_read(device: Device, addr: int, nbytes: int) -> bytes:
    """What ``device`` reads at DMA address ``addr`` (see ``Device.dma_read``),
    through the access gate."""
    _need_access(addr, nbytes)
    out = access.access(accessor(device), addr, nbytes, lambda: _translate(device, addr, nbytes, False))
    assert out is not None  # a read returns the bytes
    return out


def device_write(device: Device, addr: int, data: bytes | bytearray | memoryview) -> None:
    """``device`` writes ``data`` at DMA address ``addr``, through the access gate."""
    buf = memoryview(data).cast("B")
    n = len(buf)
    _need_access(addr, n)
    access.access(accessor(device), addr, n, lambda: _translate(device, addr, n, True), data=buf)
