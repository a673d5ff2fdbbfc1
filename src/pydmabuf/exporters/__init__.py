"""Exporters: drivers that share memory as dma-bufs.

* :class:`SystemHeap`: buffers of RAM pages from the machine (a chosen
  layout, or the pages of a real Python buffer), mapped through
  scatterlists; movable (a dynamic exporter) or not.
* :class:`VfioPciBar`: slices of a VFIO device's PCI BAR
  (``VFIO_DEVICE_FEATURE_DMA_BUF``): MMIO with no CPU side, DMA-only
  tables for peer-to-peer importers, revoked when the device stops
  decoding its BARs.
* :class:`PrivateMemory`: confidential-computing private memory, for
  trusted devices only and never mapped by the host CPU.
* :class:`VramDevice`: a GPU's BAR-visible VRAM managed as TTM does
  (amdgpu, xe): buffers evicted to system memory and back by fenced,
  asynchronous copies.
"""

from pydmabuf.exporters.private import PrivateMemory
from pydmabuf.exporters.system_heap import SystemHeap
from pydmabuf.exporters.vfio import VfioPciBar
from pydmabuf.exporters.vram import VramDevice

__all__ = ["PrivateMemory", "SystemHeap", "VfioPciBar", "VramDevice"]
