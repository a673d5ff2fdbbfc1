"""pydmabuf: an executable, fast model of the Linux buffer-sharing stack.

dma-buf exporters, importers and attachments; the reservation locks and
fences that order them; and under them scatterlists, dma-direct, IOMMU
domains with IOVA allocation and IO page tables, and the list-free two-step
IOVA API.  See the README for a tour.
"""

from __future__ import annotations

from pydmabuf import errors
from pydmabuf._types import PAGE_SHIFT, PAGE_SIZE, DmaDirection, IommuProt, Range, RangeKind
from pydmabuf._core import (
    MAX_SG_ENT_SZ,
    SCATTERLIST_MAX_SEGMENT,
    IommuDomain,
    IoPageTable,
    IovaDomain,
    RangeTable,
    SgTable,
    pagemap,
)

try:
    from pydmabuf._version import version as __version__
except ImportError:  # an unbuilt tree; the build writes _version.py
    try:
        from importlib.metadata import version as _dist_version

        __version__ = _dist_version("pydmabuf")
    except Exception:
        __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "errors",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "MAX_SG_ENT_SZ",
    "SCATTERLIST_MAX_SEGMENT",
    "DmaDirection",
    "IommuDomain",
    "IommuProt",
    "IoPageTable",
    "IovaDomain",
    "Range",
    "RangeKind",
    "RangeTable",
    "SgTable",
    "pagemap",
]
