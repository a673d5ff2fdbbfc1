"""Stubs for the DMA API's compiled per-call paths (src/_dma_api.pyx)."""

from typing import Any

from typing_extensions import disjoint_base

from pydmabuf._core import IovaStateCore, SgTable
from pydmabuf._types import DmaAttrs, DmaDirection

__all__ = ["SgMapping", "claim", "map_iommu", "unmap_iommu", "iova_link", "iova_destroy"]

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
def iova_link(st: IovaStateCore, ranges: object, direction: object, attrs: object, offset: object,
              all_at_offset: object) -> int: ...
def iova_destroy(st: IovaStateCore, mapped_nbytes: object, direction: object, attrs: object) -> bool: ...
