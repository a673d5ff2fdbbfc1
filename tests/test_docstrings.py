"""Every public callable the README shows has an example in its docstring,
and the examples run (doctest, in the defining module's namespace)."""

from __future__ import annotations

import doctest
import inspect

import pytest

from pydmabuf import IovaState, Machine, RangeTable, SgTable, checks, dma_map_sgtable, dma_unmap_sgtable
from pydmabuf.dmabuf import Attachment, DmaBuf
from pydmabuf.exporters import SystemHeap, VfioPciBar
from pydmabuf.importers import IommufdIoas
from pydmabuf.machine import Device
from pydmabuf.memory import PhysMemory

# What the README's blocks call, by the name a reader looks up.
SHOWN = {
    "SgTable.from_pages": SgTable.from_pages,
    "SgTable.from_ranges": SgTable.from_ranges,
    "SgTable.from_buffer": SgTable.from_buffer,
    "SgTable.append_pages": SgTable.append_pages,
    "SgTable.cpu_ranges": SgTable.cpu_ranges,
    "SgTable.dma_ranges": SgTable.dma_ranges,
    "RangeTable.insert": RangeTable.insert,
    "RangeTable.find_gap": RangeTable.find_gap,
    "Machine.default": Machine.default,
    "Machine.device": Machine.device,
    "Machine.describe": Machine.describe,
    "Machine.from_spec": Machine.from_spec,
    "Machine.from_toml": Machine.from_toml,
    "Machine.from_host": Machine.from_host,
    "Device.dma_write": Device.dma_write,
    "Device.dma_read": Device.dma_read,
    "PhysMemory.read": PhysMemory.read,
    "dma_map_sgtable": dma_map_sgtable,
    "dma_unmap_sgtable": dma_unmap_sgtable,
    "IovaState.try_alloc": IovaState.try_alloc,
    "IovaState.link_ranges": IovaState.link_ranges,
    "IovaState.sync": IovaState.sync,
    "IovaState.destroy": IovaState.destroy,
    "SystemHeap.allocate": SystemHeap.allocate,
    "DmaBuf.attach": DmaBuf.attach,
    "DmaBuf.dynamic_attach": DmaBuf.dynamic_attach,
    "DmaBuf.detach": DmaBuf.detach,
    "DmaBuf.put": DmaBuf.put,
    "DmaBuf.move": DmaBuf.move,
    "DmaBuf.__enter__": DmaBuf.__enter__,
    "Attachment.map": Attachment.map,
    "Attachment.unmap": Attachment.unmap,
    "Attachment.map_unlocked": Attachment.map_unlocked,
    "Attachment.__enter__": Attachment.__enter__,
    "checks.report_mode": checks.report_mode,
    "VfioPciBar": VfioPciBar,
    "VfioPciBar.export": VfioPciBar.export,
    "VfioPciBar.set_memory_decode": VfioPciBar.set_memory_decode,
    "VfioPciBar.close": VfioPciBar.close,
    "IommufdIoas": IommufdIoas,
    "IommufdIoas.attach_device": IommufdIoas.attach_device,
    "IommufdIoas.map_file": IommufdIoas.map_file,
    "IommufdIoas.close": IommufdIoas.close,
}


@pytest.mark.parametrize("name", sorted(SHOWN))
def test_readme_callable_has_a_running_example(name):
    fn = SHOWN[name]
    assert ">>>" in (inspect.getdoc(fn) or ""), f"{name}: no example in its docstring"
    module = inspect.getmodule(fn)
    tests = doctest.DocTestFinder(recurse=False).find(fn, name, module=module, globs=vars(module).copy())
    assert tests and tests[0].examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{name}: {runner.failures} failing example(s), see the output above"
