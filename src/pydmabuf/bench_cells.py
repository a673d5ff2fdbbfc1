"""The study's mapping strategies: their names, the baseline, the
devices of the machine they map for (:class:`_Bench`), the importers the
dma-buf strategies attach with, and the counters read around one map +
unmap (page-table writes, IOTLB invalidations, the stale-IOTLB window).
The cells themselves are timed in :mod:`pydmabuf.bench`; the public
names here are also importable from there.
"""

from __future__ import annotations


import numpy as np

from pydmabuf import errors, iotlb
from pydmabuf.dmabuf import PHYS_NAMESPACE, Attachment, ImporterOps
from pydmabuf.machine import Device, Machine
from pydmabuf.mapping import PAL_MODULE

#: The level of every confidence interval of the study.
CI_LEVEL = 0.95
#: A cell whose median or ratio interval is wider than this (half-width
#: over the value) is marked ``wide_ci``: it cannot tell a 10% difference.
WIDE_CI = 0.05

#: Mapping strategies of the study, in the order the table prints them.
MAPPING_STRATEGIES = ("sg_iommu", "sg_direct", "link_pages", "link_runs", "ranges_to_table",
                      "dmabuf_static", "dmabuf_dynamic", "dmabuf_ranges", "dmabuf_pal", "pte_floor")
#: The scatterlist baseline the other strategies are compared with.
BASELINE = "sg_iommu"
#: Mapping "strategies" that are reference floors, not ways to map: their
#: ratio to the baseline is agreed on apart from the strategies' (a floor
#: of a few ns a page is at the clock's resolution at small sizes).
FLOOR_STRATEGIES = ("pte_floor",)

_BIDI = 0


class _QuietImporter(ImporterOps):
    """The study's dynamic importer: nothing moves the buffer while it runs."""

    def invalidate_mappings(self, attachment: Attachment) -> None:
        pass


class _QuietPhysImporter(_QuietImporter):
    """The same, declaring the physical-range namespace (dmabuf_ranges)."""

    import_namespaces = frozenset({PHYS_NAMESPACE})


class _QuietPalImporter(_QuietImporter):
    """The same, for the mapping-types PAL path (dmabuf_pal): its ops name
    the module ``pal_map_phys`` is reserved for, as iommufd's do."""

    import_namespaces = frozenset({PAL_MODULE})


class _Bench:
    """The devices of the default machine the study maps for."""

    def __init__(self, machine: Machine | None = None) -> None:
        # No flush-queue timer: a lazy domain's 10 ms timer reads the wall
        # clock, and a flush landing inside a counted map + unmap would
        # change the counts and the stale window from run to run.
        self.machine = machine or Machine.default(flush_timer=False)
        self.iommu_dev = self.machine.device("gpu0")
        self.direct_dev = self.machine.device("direct0")
        provider = self.machine.device("vfio0").p2p_provider(0)
        if provider is None:
            raise errors.NoDevice(f"machine {self.machine.name!r}: vfio0 has no memory BAR0 to export ranges from")
        self.provider = provider
        # Synthetic layouts start at 4 GiB: keep them in the RAM range there.
        r = self.machine.address_map.lookup(1 << 32)
        self.ram_limit_pfn = (r.end >> 12) if r is not None else None

    def domain_counters(self, dev: Device) -> dict[str, int]:
        if dev.domain is None:
            return {"pte_writes": 0, "iotlb_invalidations": 0}
        dev.domain.flush()  # count the deferred invalidations too
        s = dev.domain.stats
        return {"pte_writes": s["pte_writes"], "iotlb_invalidations": s["iotlb_invalidations"]}


def _bar_ranges(b: _Bench, phys: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The layout's runs placed inside the exporter's BAR (same lengths,
    starts folded into the BAR), as a VFIO exporter's ranges would be."""
    bar = b.provider.bar
    pages = bar.nbytes >> 12
    maxrun = int(lens.max()) >> 12 if len(lens) else 1
    span = max(pages - maxrun, 1)
    starts = (phys >> np.uint64(12)) % np.uint64(span)
    out = np.empty((len(lens), 2), dtype=np.uint64)
    out[:, 0] = np.uint64(bar.cpu_start) + (starts << np.uint64(12))
    out[:, 1] = lens
    return out


def _stale_window(dev: Device | None) -> tuple[int, int]:
    """(unmaps, bytes) a strategy's unmap left on its domain's flush queue:
    page-table entries cleared, IOTLB not yet invalidated, so a device with
    a cached translation still reaches the old pages
    (:func:`pydmabuf.iotlb.stale_window`; zero on a strict domain and
    without an IOMMU)."""
    if dev is None or dev.domain is None:
        return 0, 0
    w = iotlb.stale_window(dev.domain)
    return w.queued_unmaps, w.queued_bytes
