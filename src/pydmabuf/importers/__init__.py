"""Importers: drivers that map dma-bufs for their devices.

* :class:`IommufdIoas`: an iommufd IO address space; VFIO dma-bufs are
  mapped into its hardware page tables through VFIO's private physical
  range call, and revoked for good when VFIO revokes.
* :class:`KvmVm`: a KVM guest whose memory slots are backed by VFIO
  dma-bufs, faulting their pages into its second-stage table; this is a
  posted proposal (an RFC), not upstream KVM.
"""

from pydmabuf.importers.iommufd import HwPagetable, IoasArea, IommufdIoas
from pydmabuf.importers.kvm import KvmMemslot, KvmVm

__all__ = ["IommufdIoas", "HwPagetable", "IoasArea", "KvmVm", "KvmMemslot"]
