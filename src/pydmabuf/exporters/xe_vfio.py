"""A driver-private mapping type: a GPU's physical function importing the
VFIO BAR of one of its own virtual functions (the "IOV interconnect").

The 2025 thread (Vivek Kasireddy, "[RFC v2 0/8] dma-buf: Add support for
mapping dmabufs via interconnects", and Jason Gunthorpe's answer that a
driver can declare its own mapping type) proposed it for xe: the PF
driver imports a dma-buf of its VF's VRAM BAR exported by the VF's VFIO
variant driver (xe-vfio-pci), and gets device-physical VRAM addresses
instead of a scatterlist of BAR addresses.  Nothing of it is merged.

* :data:`XE_IOV` is the type, declared here entirely (no core change):
  it matches only when the importer is the PF of the exporter's VF
  (:class:`XeSriovPf` records the relation; the default machine has no
  SR-IOV, so a scenario declares it) and both name the same BAR.
* :class:`XeVfioPciBar` is the variant driver's device handle; its
  dma-bufs (:class:`XeVfioPciDmaBuf`) offer ``[XE_IOV, PAL, SGT P2P]``.
* :func:`xe_iov_map` / :func:`xe_iov_unmap` are the type's map calls
  (each type has its own signatures, as the RFC wanted): VRAM ranges of
  the VF's slice, checked against the VF's provisioned VRAM so a VF can
  never reach another's (EPERM), refused once revoked (ENODEV).  The
  reservation lock is held, as for the other types.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from pydmabuf import errors, mapping
from pydmabuf.exporters.vfio import VfioPciBar, VfioPciDmaBuf
from pydmabuf.machine import Device

__all__ = ["XE_IOV", "XeSriovPf", "XeVfioPciBar", "XeVfioPciDmaBuf", "xe_iov_importer", "xe_iov_exporter",
           "xe_iov_map", "xe_iov_unmap"]


class _XeIovType(mapping.MappingType):
    """The IOV interconnect type: entries carry ``pf`` (the PF device) and
    ``bar``; exporter entries also ``vf``."""

    name = "Xe IOV interconnect"

    def match(self, dmabuf: Any, exp: mapping.MappingMatch, imp: mapping.MappingMatch) -> None:
        if getattr(imp, "pf", None) is not getattr(exp, "pf", None):
            raise errors.NotSupported("the importer is not the physical function of the exporter's VF")
        if getattr(imp, "bar", None) != getattr(exp, "bar", None):
            raise errors.NotSupported("the importer names another BAR")

    def finish_match(self, args: mapping.MatchArgs, exp: mapping.MappingMatch, imp: mapping.MappingMatch) -> None:
        if args.attach is not None:
            args.attach.map_type = mapping.MappingMatch(self, exp.exp_ops, pf=exp.pf, vf=exp.vf, bar=exp.bar)

    def debugfs_dump(self, attach: Any) -> str:
        mt = attach.map_type
        return f" {mt.pf.name} <- {mt.vf.name} BAR{mt.bar}"


#: The type (one instance: compared by identity).
XE_IOV: mapping.MappingType = _XeIovType()


def xe_iov_importer(pf: Device, bar: int) -> mapping.MappingMatch:
    """The PF driver's entry: it takes its VF's ``bar`` over the IOV link."""
    return mapping.MappingMatch(XE_IOV, pf=pf, bar=bar)


def xe_iov_exporter(ops: Any, vf: Device, pf: Device, bar: int) -> mapping.MappingMatch:
    """The VF variant driver's entry (``ops.map_vram(attachment)`` /
    ``ops.unmap_vram(attachment, ranges)``)."""
    if not callable(getattr(ops, "map_vram", None)) or not callable(getattr(ops, "unmap_vram", None)):
        raise TypeError("xe_iov_exporter: ops need map_vram and unmap_vram")
    return mapping.MappingMatch(XE_IOV, ops, vf=vf, pf=pf, bar=bar)


class XeSriovPf:
    """A PF driver's SR-IOV state: which devices are its VFs and where in
    its VRAM each VF's memory (its BAR, offset 0 on) lives.

    Parameters
    ----------
    pf : Device
        The physical function.
    """

    _lock = threading.Lock()

    def __init__(self, pf: Device) -> None:
        if not isinstance(pf, Device):
            raise TypeError(f"XeSriovPf: pf must be a Device, not {type(pf).__name__}")
        self.pf = pf
        self.vfs: dict[Device, tuple[int, int]] = {}

    def provision_vf(self, vf: Device, vram_base: int, vram_nbytes: int) -> None:
        """Give ``vf`` the VRAM ``[vram_base, +vram_nbytes)`` (device
        physical), seen through its BAR from offset 0.  EBUSY if ``vf``
        already belongs to a PF."""
        if not isinstance(vf, Device):
            raise TypeError(f"provision_vf: vf must be a Device, not {type(vf).__name__}")
        with self._lock:
            if getattr(vf, "_xe_sriov_pf", None) is not None:
                raise errors.Busy(f"{vf.name} is already a VF of a PF")
            self.vfs[vf] = (int(vram_base), int(vram_nbytes))
            setattr(vf, "_xe_sriov_pf", self)

    def __repr__(self) -> str:
        return f"<XeSriovPf {self.pf.name}: {len(self.vfs)} VF(s)>"


def _sriov_of(vf: Device) -> XeSriovPf | None:
    pf = getattr(vf, "_xe_sriov_pf", None)
    return pf if isinstance(pf, XeSriovPf) else None


class XeVfioPciDmaBuf(VfioPciDmaBuf):
    """A dma-buf of xe-vfio-pci: VFIO's, plus the IOV entry first when the
    device is a provisioned VF."""

    name = "xe-vfio-pci"

    def match_mapping(self, args: Any) -> None:
        sriov = _sriov_of(self.device)
        entries = [mapping.pal_exporter(self), mapping.sgt_exporter_p2p(self, self.device)]
        if sriov is not None:
            entries.insert(0, xe_iov_exporter(self, self.device, sriov.pf, self.region_index))
        mapping.match_mapping(args, entries)

    def map_vram(self, attachment: Any) -> np.ndarray:
        """The slice's ranges as PF VRAM (device physical) (N, 2) rows."""
        buf = attachment.dmabuf
        if buf.revoked:
            raise errors.Revoked(f"{buf.name} is revoked")
        sriov = _sriov_of(self.device)
        if sriov is None:
            raise errors.NoDevice(f"{self.device.name} is no longer a VF")
        base, size = sriov.vfs[self.device]
        off = self.ranges[:, 0] - np.uint64(self.provider.bar.cpu_start)
        end = off + self.ranges[:, 1]
        if bool((end > np.uint64(size)).any()):
            raise errors.NotPermitted(f"{buf.name} reaches past {self.device.name}'s {size:#x} bytes of VRAM "
                                      "(another VF's memory)")
        rows = np.stack([off + np.uint64(base), self.ranges[:, 1]], axis=1)
        rows.flags.writeable = False
        self.vram_maps += 1
        return rows

    def unmap_vram(self, attachment: Any, ranges: np.ndarray) -> None:
        self.vram_unmaps += 1

    vram_maps = 0
    vram_unmaps = 0


class XeVfioPciBar(VfioPciBar):
    """A VFIO device driven by xe-vfio-pci (see :class:`VfioPciBar`)."""

    _dmabuf_class = XeVfioPciDmaBuf


def _iov_ops(attachment: Any, what: str) -> Any:
    mt = attachment.map_type
    if mt is None or mt.type is not XE_IOV:
        raise errors.InvalidArgument(f"{what}: the attachment did not negotiate {XE_IOV.name!r}")
    return mt.exp_ops


def xe_iov_map(attachment: Any) -> np.ndarray:
    """The PF's map over the IOV link (reservation lock held): VRAM
    (device-physical) (N, 2) u64 rows of the VF BAR slice.  EINVAL on an
    attachment of another type; ENODEV once revoked; EPERM if the slice
    reaches past the VF's VRAM."""
    ops = _iov_ops(attachment, "xe_iov_map")
    attachment._require_resv("xe_iov_map")
    rows: np.ndarray = ops.map_vram(attachment)
    return rows


def xe_iov_unmap(attachment: Any, ranges: np.ndarray) -> None:
    """Give the VRAM ranges back (reservation lock held)."""
    ops = _iov_ops(attachment, "xe_iov_unmap")
    attachment._require_resv("xe_iov_unmap")
    ops.unmap_vram(attachment, ranges)
