"""Stubs for the dma-buf attachment's compiled state and paths (src/_dmabuf_api.pyx)."""

import threading
import weakref
from types import ModuleType
from typing import Any

from typing_extensions import disjoint_base

from pydmabuf._core import SgTable

__all__ = ["AttachmentCore", "bind", "attach", "sgt_attach", "detach", "map_attachment", "map_unlocked",
           "unmap_attachment", "unmap_unlocked", "track", "untrack", "table_map", "live_maps"]

@disjoint_base
class _MapRefs(dict[int, "weakref.ReferenceType[_Mapping]"]):
    sweep_at: int
    def sweep(self) -> None: ...

@disjoint_base
class AttachmentCore:
    dmabuf: Any
    device: Any
    map_type: Any
    importer_ops: Any
    importer_priv: Any
    peer2peer: bool
    priv: Any
    pin_count: int
    invalidations: int
    detached: bool
    created_at: str
    _listed: bool
    _maps: set[_Mapping]
    _dev_refs: _MapRefs | None
    @property
    def dynamic(self) -> bool: ...
    @property
    def live_mappings(self) -> int: ...
    def _usable(self, what: str) -> bool: ...
    def _require_resv(self, what: str) -> None: ...

@disjoint_base
class _Mapping:
    attachment: Any
    table: SgTable | None
    direction: Any
    stale: bool
    created_at: str
    _dma: Any
    pinned: bool
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    @property
    def dma(self) -> Any: ...
    def covers(self, addr: int, nbytes: int) -> bool: ...

device_maps: weakref.WeakKeyDictionary[Any, _MapRefs]
maps_lock: threading.Lock

def bind(mapping: ModuleType, attachment_cls: type, device_cls: type) -> None: ...
def live_maps(device: Any) -> list[_Mapping]: ...
def table_map(table: object) -> _Mapping | None: ...
def track(a: AttachmentCore, table: SgTable | None, direction: Any, pinned: bool, dma_ranges: Any = ...,
          depth: int = ...) -> _Mapping: ...
def untrack(a: AttachmentCore, m: _Mapping) -> None: ...
def attach(buf: Any, imp: tuple[Any, ...], ops: Any, priv: Any, depth: int = ...) -> Any: ...
def sgt_attach(buf: Any, device: Any, ops: Any, priv: Any, what: str, depth: int = ...) -> Any: ...
def detach(buf: Any, attachment: object) -> None: ...
def map_attachment(a: AttachmentCore, direction: Any, depth: int = ...) -> SgTable: ...
def map_unlocked(a: AttachmentCore, direction: Any, depth: int = ...) -> SgTable: ...
def unmap_attachment(a: AttachmentCore, table: object, direction: Any) -> None: ...
def unmap_unlocked(a: AttachmentCore, table: object, direction: Any) -> None: ...
