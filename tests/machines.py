"""Small machines for tests: one host bridge, one root port, the devices
asked for, a strict and a deterministic lazy IOMMU."""

from __future__ import annotations

import copy
from typing import Any

from pydmabuf import Machine

BASE: dict[str, Any] = {
    "name": "test",
    "memory": [
        {"start": 0, "size": "3G", "kind": "ram"},
        {"start": "4G", "size": "56G", "kind": "ram"},
        {"start": "60G", "size": "4G", "kind": "private"},
    ],
    "swiotlb": [{"name": "swiotlb", "start": 0x8000000, "size": "4M"}],
    "iommus": [
        {"name": "strict", "strict": True},
        {"name": "lazy", "strict": False, "fq_timeout": None},
    ],
    "host_bridges": [
        {"name": "hb", "root_vendor": 0x8086, "root_device": 0x2020,
         "windows": [{"cpu": 0xC0000000, "size": "512M"}, {"cpu": "256G", "size": "64G", "prefetch": True}]},
    ],
    "ports": [{"name": "rp", "bdf": "0000:00:01.0", "parent": "hb", "kind": "root_port"}],
    "devices": [],
}


def machine(*devices: dict[str, Any], **top: Any) -> Machine:
    """A test machine with the given device entries (parent ``rp`` and a
    made-up BDF unless given)."""
    spec = copy.deepcopy(BASE)
    spec.update(top)
    for i, d in enumerate(devices):
        d = dict(d)
        d.setdefault("bdf", f"0000:{i + 1:02x}:00.0")
        d.setdefault("parent", "rp")
        spec["devices"].append(d)
    return Machine.from_spec(spec)


def iommu_device(iommu: str = "strict", **kw: Any) -> Any:
    m = machine({"name": "d", "iommu": iommu, **kw})
    return m, m.device("d")


def direct_device(**kw: Any) -> Any:
    m = machine({"name": "d", **kw})
    return m, m.device("d")


def make_table(rows: list[tuple[int, int, int]]) -> Any:
    """An SgTable whose data entries are exactly (pfn, offset, length)."""
    import numpy as np

    from pydmabuf import SgTable

    t = SgTable.alloc(len(rows))
    e = t.entries
    data = np.flatnonzero((e["page_link"] & np.uint64(1)) == 0)[: len(rows)]
    for slot, (pfn, off, ln) in zip(data.tolist(), rows):
        keep = int(e["page_link"][slot]) & 3
        e["page_link"][slot] = (pfn << 12) | keep
        e["offset"][slot] = off
        e["length"][slot] = ln
    return t
