"""Stubs for the DMA API's compiled scatterlist path (src/_dma_sg.pyx)."""

from typing import Any

from typing_extensions import disjoint_base

from pydmabuf._types import DmaAttrs, DmaDirection

__all__ = ["SgMapping", "map_iommu", "unmap_iommu"]

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

def map_iommu(device: object, table: object, direction: object, attrs: object) -> int: ...
def unmap_iommu(device: object, table: object, direction: object, attrs: object) -> bool: ...
