"""Confidential-computing private memory as dma-bufs (the TDX Connect /
TDISP direction, research dma-buf.md section 9).

A confidential VM's private memory is encrypted with a key the host does not
hold.  Only a device the TEE has accepted (a TDISP device interface in the
RUN state issuing T=1 requests) may reach it; the host may not keep CPU
mappings of it.  Upstream has no merged exporter of such memory: the model
follows the proposals discussed on the list.

* attach by a device that is not ``cc_trusted`` fails with EPERM (the
  proposals put this check in the exporter; nothing in the merged dma-buf
  core carries "trusted" metadata);
* the physical-range op returns the private ranges (the dma-buf core
  additionally refuses :meth:`~pydmabuf.dmabuf.Attachment.phys_vec` to
  untrusted devices);
* mmap and vmap fail with EPERM (a host-unmappable dma-buf, as the private
  VFIO dma-buf of the KVM proposals);
* DMA by an untrusted device that still reaches the pages (a shared IOMMU
  domain, a stray mapping) faults in :mod:`pydmabuf.dma`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydmabuf import access, errors
from pydmabuf._types import PAGE_SIZE
from pydmabuf.dmabuf import Attachment, CpuMapping, DmaBuf, PhysVec, export
from pydmabuf.exporters.system_heap import HeapBuffer
from pydmabuf.machine import Machine

__all__ = ["PrivateMemory", "PrivateBuffer"]


class PrivateBuffer(HeapBuffer):
    """The exporter behind one buffer of private pages: the system heap's
    static exporter (same tables, same ranges) with the confidential
    rules on top."""

    name = "cc-private"

    def __init__(self, machine: Machine, pfns: np.ndarray, nbytes: int, layout: str) -> None:
        super().__init__(machine, pfns, nbytes, owned=False, layout=layout, seed=0)
        self.refused = 0

    def attach(self, attachment: Attachment) -> None:
        """Refuse (EPERM) every device the TEE has not accepted."""
        dev = attachment.device  # None for an attachment that names no device (not SGT): not trusted
        if dev is None or not dev.cc_trusted:
            self.refused += 1
            who = dev.name if dev is not None else repr(attachment.importer_ops)
            raise errors.NotPermitted(f"{who} is not trusted for confidential memory: it may not attach "
                                      "to a private dma-buf")

    def release(self, dmabuf: DmaBuf) -> None:
        super().release(dmabuf)
        self.machine.private_pages.free(self.pfns)

    def get_phys_vec(self, attachment: Attachment | None) -> PhysVec:
        """The private ranges.  Called with ``attachment`` None only by the
        generic CPU mapping, which this exporter never allows."""
        if attachment is None:
            raise errors.NotPermitted("the host may not map confidential memory")
        return super().get_phys_vec(attachment)

    def mmap(self, dmabuf: DmaBuf, mapping: CpuMapping) -> None:
        raise errors.NotPermitted(f"{dmabuf.name}: the host may not map confidential memory (mmap)")

    def vmap(self, dmabuf: DmaBuf) -> Any:
        raise errors.NotPermitted(f"{dmabuf.name}: the host may not map confidential memory (vmap)")

    def __repr__(self) -> str:
        return f"<PrivateBuffer {len(self.pfns)} private pages, {self.layout}>"


class PrivateMemory:
    """dma-bufs of the machine's PRIVATE (confidential-computing) memory.

    Parameters
    ----------
    machine : Machine
        Pages come from ``machine.private_pages`` (the PRIVATE ranges of
        its address map; Machine.default() has 4 GiB at 60 GiB).
    """

    def __init__(self, machine: Machine) -> None:
        if not isinstance(machine, Machine):
            raise TypeError(f"PrivateMemory: machine must be a Machine, not {type(machine).__name__}")
        self.machine = machine

    def allocate(self, nbytes: int, *, layout: str = "contiguous", seed: int = 1, name: str | None = None) -> DmaBuf:
        """A buffer of ``nbytes`` of private memory (rounded up to whole
        pages) in ``layout`` (as :meth:`SystemHeap.allocate`).

        Raises InvalidArgument (EINVAL) for a size that is not positive and
        OutOfMemory (ENOMEM) when the private memory is exhausted (or the
        machine has none)."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise errors.InvalidArgument(f"allocate: nbytes must be a positive int (got {nbytes!r})")
        pages = self.machine.private_pages
        npages = -(-nbytes // PAGE_SIZE)
        if pages.total_pages == 0:
            raise errors.OutOfMemory(f"machine {self.machine.name!r} has no private memory")
        pfns = pages.alloc(npages, layout, seed)
        access.zero_pages(self.machine, pfns)    # as the heap: never the last owner's bytes
        try:
            return export(PrivateBuffer(self.machine, pfns, nbytes, layout), nbytes, name=name)
        except BaseException:
            pages.free(pfns)
            raise

    def __repr__(self) -> str:
        p = self.machine.private_pages
        return f"<PrivateMemory of {self.machine.name!r}: {p.allocated_pages}/{p.total_pages} pages used>"
