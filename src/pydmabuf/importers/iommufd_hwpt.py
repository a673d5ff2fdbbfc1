"""iommufd's hardware page tables (``drivers/iommu/iommufd/hw_pagetable.c``):
:class:`HwPagetable`, an unmanaged IOMMU domain of one IOMMU that an IOAS
maps its areas into, filled in batches as ``batch_to_domain()`` fills
them.  Re-exported by :mod:`pydmabuf.importers.iommufd`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pydmabuf import _core
from pydmabuf._core import IommuDomain
from pydmabuf._types import PAGE_SHIFT, _fmt_size
from pydmabuf.machine import Device, Iommu

if TYPE_CHECKING:
    from pydmabuf.importers.iommufd import IommufdIoas

__all__ = ["HwPagetable", "TEMP_MEMORY_LIMIT"]

#: ``TEMP_MEMORY_LIMIT``: the most one batch's arrays may take (bytes).
TEMP_MEMORY_LIMIT = 65536


# ------------------------------------------------------------ page tables


class HwPagetable:
    """``struct iommufd_hwpt_paging``: an unmanaged IOMMU domain owned by an
    IOAS, shared by the attached devices behind one IOMMU.

    Attributes
    ----------
    domain : IommuDomain
        The page table devices translate through (strict invalidation; its
        IOVA allocator is unused: the IOAS places areas).
    iommu : Iommu
    devices : list of Device
    map_calls, unmap_calls : int
        ``iommu_map`` / ``iommu_unmap`` calls iommufd made on the domain.
    """

    def __init__(self, ioas: IommufdIoas, iommu: Iommu, hwpt_id: int) -> None:
        self.ioas = ioas
        self.iommu = iommu
        self.id = hwpt_id
        self.domain = IommuDomain(strict=True, aperture_bits=iommu.aperture_bits, granule=iommu.granule,
                                  ncpus=iommu.ncpus, fq_timeout=None)
        self.devices: list[Device] = []
        self.map_calls = 0
        self.unmap_calls = 0

    def map(self, iova: int, phys: int, nbytes: int, prot: int) -> None:
        """``iommu_map()`` of ``[iova, +nbytes)`` to ``phys`` (counted);
        raises as :meth:`~pydmabuf.IommuDomain.map`."""
        self.domain.map(iova, phys, nbytes, prot)
        self.map_calls += 1

    def map_runs(self, iova: int, runs: np.ndarray, prot: int) -> int:
        """``batch_to_domain()`` for every batch of ``runs`` ((pfn, npfns)
        rows) from ``iova``: the runs go in batches of
        ``min(pages, TEMP_MEMORY_LIMIT // 12)`` entries (``__batch_init``:
        8-byte pfn + 4-byte count per entry, one temporary allocation),
        one ``iommu_map`` per entry (counted in :attr:`map_calls`).  The
        model writes a batch's entries with one bulk page-table call and
        one IOTLB sync.  All or nothing.  Returns the batches."""
        if len(runs) == 0:
            return 0
        npages = int(runs[:, 1].sum(dtype=object))
        cap = max(1, min(npages, TEMP_MEMORY_LIMIT // 12))
        pairs = np.ascontiguousarray(np.stack([runs[:, 0] << np.uint64(PAGE_SHIFT),
                                               runs[:, 1] << np.uint64(PAGE_SHIFT)], axis=1))
        done = 0
        nbatches = -(-len(runs) // cap)
        try:
            for b in range(nbatches):  # one pass per batch, as pfn_reader_next() refills it
                part = pairs[b * cap:(b + 1) * cap]
                n = int(_core.iova_link_ranges(self.domain, iova + done, 0, part, prot))
                self.domain.sync_map(iova + done, n)
                self.map_calls += len(part)
                done += n
        except BaseException:
            if done:
                self.unmap(iova, done)
            raise
        return nbatches

    def unmap(self, iova: int, nbytes: int) -> None:
        """``iommu_unmap()`` of ``[iova, +nbytes)`` (counted)."""
        self.domain.unmap(iova, nbytes)
        self.unmap_calls += 1

    @property
    def aperture_end(self) -> int:
        """The highest IOVA the domain translates (inclusive)."""
        return int(self.domain.aperture_end)

    def __repr__(self) -> str:
        return (f"<HwPagetable #{self.id} on {self.iommu.name}: {', '.join(d.name for d in self.devices) or 'no devices'}, "
                f"{_fmt_size(self.domain.stats['mapped_nbytes'])} mapped>")

