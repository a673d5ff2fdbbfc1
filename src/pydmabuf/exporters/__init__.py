"""Exporters: where dma-bufs come from.

* :class:`SystemHeap`: buffers of RAM pages from the machine (a chosen
  layout, or the pages of a real Python buffer), mapped through
  scatterlists; movable (a dynamic exporter) or not.
* :class:`PrivateMemory`: confidential-computing private memory, for
  trusted devices only and never mapped by the host CPU.
"""

from pydmabuf.exporters.private import PrivateMemory
from pydmabuf.exporters.system_heap import SystemHeap

__all__ = ["PrivateMemory", "SystemHeap"]
