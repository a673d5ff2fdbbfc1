"""Small value types shared by the core and the Python layer."""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

__all__ = ["Caching", "RangeKind", "Range", "DmaDirection", "DmaAttrs", "IommuProt", "Usage", "PAGE_SIZE", "PAGE_SHIFT",
           "U64_MAX", "DMA_MAPPING_ERROR"]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MAX = 2**64 - 1
#: What a failed mapping returns (``DMA_MAPPING_ERROR``, all ones).
DMA_MAPPING_ERROR = U64_MAX


class RangeKind(enum.IntEnum):
    """What a range of an address map is.

    Range tables accept any kind in ``0..255``; these are the ones pydmabuf
    itself uses.
    """

    OTHER = 0
    RAM = 1  #: system RAM with struct pages
    MMIO = 2  #: device memory (a PCI BAR): no struct pages, not cacheable
    PRIVATE = 3  #: confidential-computing private memory
    RESERVED = 4  #: holes, firmware, IOMMU reserved regions, MSI windows
    IOVA = 5  #: an allocated IO virtual address range
    SWIOTLB = 6  #: a bounce-buffer pool


class Caching(enum.Enum):
    """The memory type of a CPU mapping's page-table entries (its
    ``vm_page_prot`` caching bits).

    System memory is mapped write-back; device memory (a BAR) uncached
    (``pgprot_noncached``) or write-combining (``pgprot_writecombine``),
    never write-back: a read must reach the device and a write must not
    linger in the CPU's caches.
    """

    WRITE_BACK = "write-back"
    UNCACHED = "uncached"
    WRITE_COMBINE = "write-combine"

    def __str__(self) -> str:
        return self.value


class Range(NamedTuple):
    """One range of a :class:`~pydmabuf.RangeTable`: ``[start, start + nbytes)``."""

    start: int
    nbytes: int
    kind: int
    owner: int
    flags: int

    @property
    def last(self) -> int:
        """The inclusive last address, ``start + nbytes - 1``."""
        return self.start + self.nbytes - 1

    @property
    def end(self) -> int:
        """The exclusive end, ``start + nbytes`` (may be 2**64)."""
        return self.start + self.nbytes

    def __repr__(self) -> str:
        kind = self.kind.name if isinstance(self.kind, RangeKind) else str(self.kind)
        return (
            f"Range([{self.start:#x}, {self.last:#x}], {_fmt_size(self.nbytes)}, {kind}"
            f"{f', owner={self.owner}' if self.owner else ''}"
            f"{f', flags={self.flags:#x}' if self.flags else ''})"
        )


class DmaDirection(enum.IntEnum):
    """``enum dma_data_direction``."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2
    NONE = 3


class DmaAttrs(enum.IntFlag):
    """``DMA_ATTR_*``."""

    NONE = 0
    WEAK_ORDERING = 1 << 1
    WRITE_COMBINE = 1 << 2
    NO_KERNEL_MAPPING = 1 << 4
    SKIP_CPU_SYNC = 1 << 5
    FORCE_CONTIGUOUS = 1 << 6
    ALLOC_SINGLE_PAGES = 1 << 7
    NO_WARN = 1 << 8
    PRIVILEGED = 1 << 9
    #: Not RAM: no swiotlb, no cache maintenance, IOMMU_MMIO in the PTEs.
    MMIO = 1 << 10


class IommuProt(enum.IntFlag):
    """IOMMU mapping permissions and attributes (``IOMMU_*`` in ``linux/iommu.h``).

    A mapping must allow at least one of ``READ`` and ``WRITE``.
    """

    READ = 1 << 0  #: the device may read
    WRITE = 1 << 1  #: the device may write
    CACHE = 1 << 2  #: cache-coherent access (the device snoops CPU caches)
    NOEXEC = 1 << 3  #: no instruction fetch through this mapping
    MMIO = 1 << 4  #: device memory (MSI doorbells, PCI BARs): never cacheable
    PRIV = 1 << 5  #: privileged accesses only


class Usage(enum.IntEnum):
    """``enum dma_resv_usage``: how a fence in a reservation object uses
    the buffer.

    Ordered ``KERNEL < WRITE < READ < BOOKKEEP``; asking a
    :class:`~pydmabuf.Resv` for usage U returns every fence of usage <= U.
    A fence may be promoted to a smaller usage by adding it again, never
    degraded.
    """

    KERNEL = 0  #: kernel memory management (moves, clears): everyone waits
    WRITE = 1  #: implicit-sync writers
    READ = 2  #: implicit-sync readers
    BOOKKEEP = 3  #: not part of implicit sync (preemption, page tables)


def _fmt_size(nbytes: int) -> str:
    """A byte count for people: ``4 KiB``, ``1.5 MiB``, ``16 EiB``."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            if unit == "B" or n == int(n):
                return f"{int(n)} {unit}"
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_SIZE_RE = re.compile(r"^\s*(0x[0-9a-f_]+|\d[\d_]*)\s*(?:([kmgtpe])(i?b)?|b)?\s*$", re.I)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def _parse_size(text: str) -> int | None:
    """A byte count written as machine files and ``pydmabuf bench --sizes``
    write them, or None if ``text`` is not one.

    An integer (decimal or ``0x`` hex, ``_`` allowed between digits), then
    an optional binary unit: ``K``, ``M``, ``G``, ``T``, ``P`` or ``E``, alone
    or followed by ``B`` or ``iB``, in any case (``4K`` = ``4 KiB`` =
    ``4kb`` = 4096).  A lone ``B`` means bytes.

    Examples
    --------
    >>> [_parse_size(t) for t in ("4096", "0x1000", "4K", "64 MiB", "1gb", "3 B")]
    [4096, 4096, 4096, 67108864, 1073741824, 3]
    >>> _parse_size("1.5M") is None
    True
    """
    m = _SIZE_RE.match(text)
    if m is None:
        return None
    return int(m.group(1).replace("_", ""), 0) << _SIZE_SHIFT[(m.group(2) or "").upper()]
