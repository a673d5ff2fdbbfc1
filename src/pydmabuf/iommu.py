"""IOMMU instances and groups (``drivers/iommu/iommu.c``).

An :class:`Iommu` holds what its DMA domains inherit (strict or lazy
invalidation, input width, granule, flush-queue timer) and its IOTLB; an
:class:`IommuGroup` is the set of devices the IOMMU cannot tell apart, on
one domain at a time (its default DMA domain, or an unmanaged domain of
iommufd / VFIO).  The domains themselves are the core's
:class:`~pydmabuf.IommuDomain`; :meth:`pydmabuf.machine.Machine.new_dma_domain`
makes the default ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydmabuf._core import IommuDomain
from pydmabuf._types import PAGE_SIZE
from pydmabuf.iotlb import DEFAULT_ENTRIES, Iotlb

if TYPE_CHECKING:
    from pydmabuf.device import Device

__all__ = ["Iommu", "IommuGroup", "MSI_WINDOW"]

#: x86's MSI doorbell window, an IOMMU reserved region on every domain.
MSI_WINDOW = (0xFEE0_0000, 0x10_0000)


class Iommu:
    """An IOMMU instance: its page-size granule, input width, and whether its
    DMA domains invalidate strictly (``IOMMU_DOMAIN_DMA``) or through a flush
    queue (``IOMMU_DOMAIN_DMA_FQ``), and its IOTLB of ``iotlb_entries``
    4 KiB translations (LRU; :data:`pydmabuf.iotlb.DEFAULT_ENTRIES` by
    default)."""

    def __init__(self, name: str, *, strict: bool = False, aperture_bits: int = 48, granule: int = PAGE_SIZE,
                 ncpus: int = 1, fq_timeout: float | None = 0.01, iotlb_entries: int | None = None) -> None:
        self.name = name
        self.strict = strict
        self.aperture_bits = aperture_bits
        self.granule = granule
        self.ncpus = ncpus
        #: Seconds before a lazy domain's flush queue flushes by timer (the
        #: kernel's 10 ms); None: only on a full ring or ``domain.flush()``.
        self.fq_timeout = fq_timeout
        #: The translation cache device DMA goes through (:mod:`pydmabuf.iotlb`).
        self.iotlb = Iotlb(DEFAULT_ENTRIES if iotlb_entries is None else iotlb_entries)
        self.groups: list[IommuGroup] = []

    def __repr__(self) -> str:
        return f"<Iommu {self.name} {'strict' if self.strict else 'lazy (flush queue)'}>"


class IommuGroup:
    """Devices the IOMMU cannot tell apart; they share one domain."""

    def __init__(self, name: str, iommu: Iommu) -> None:
        self.name = name
        self.iommu = iommu
        self.devices: list[Device] = []
        self.default_domain: IommuDomain | None = None
        self.domain: IommuDomain | None = None  # the attached domain (default or an unmanaged one)
        iommu.groups.append(self)

    def __repr__(self) -> str:
        return f"<IommuGroup {self.name} on {self.iommu.name}: {', '.join(d.name for d in self.devices)}>"
