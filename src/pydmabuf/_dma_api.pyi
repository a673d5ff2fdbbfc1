"""Stubs for the DMA API's compiled per-call paths (src/_dma_api.pyx)."""

from typing import Any, Callable

from typing_extensions import disjoint_base

from pydmabuf._core import IovaStateCore, SgTable
from pydmabuf._types import DmaAttrs, DmaDirection
from pydmabuf.device import Device

__all__ = ["SgMapping", "claim", "map_iommu", "unmap_iommu", "bind_sgtable", "dma_map_sgtable", "dma_unmap_sgtable",
           "iova_link", "iova_destroy"]

@disjoint_base
class SgMapping:
    device: Any
    direction: DmaDirection
    attrs: DmaAttrs
    kind: str
    iova: int
    iova_nbytes: int
    bounces: list[tuple[int, int, int, int]]
    singles: list[tuple[int, int, int]]
    def __init__(self, device: Any, direction: DmaDirection, attrs: DmaAttrs, kind: str, iova: int = ...,
                 iova_nbytes: int = ..., bounces: list[tuple[int, int, int, int]] | None = ...,
                 singles: list[tuple[int, int, int]] | None = ...) -> None: ...
    @property
    def device_name(self) -> str: ...

def claim(table: SgTable, record: object) -> object: ...
def map_iommu(device: object, table: object, direction: object, attrs: object) -> int: ...
def unmap_iommu(device: object, table: object, direction: object, attrs: object) -> bool: ...
def bind_sgtable(map_general: Callable[[Any, SgTable, Any, int], int],
                 unmap_general: Callable[[Any, SgTable, Any, int], None]) -> None: ...
def dma_map_sgtable(device: Device, table: SgTable, direction: DmaDirection | int, attrs: int = ...) -> int: ...
def dma_unmap_sgtable(device: Device, table: SgTable, direction: DmaDirection | int, attrs: int = ...) -> None: ...
def iova_link(st: IovaStateCore, ranges: object, direction: object, attrs: object, offset: object,
              all_at_offset: object) -> int: ...
def iova_destroy(st: IovaStateCore, mapped_nbytes: object, direction: object, attrs: object) -> bool: ...
