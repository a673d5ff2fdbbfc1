"""Every Python block of the README runs on its own, as written: a reader
can paste any one of them into a fresh interpreter."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if README.exists() else []

# What each block prints that shows it did its job, by a line of the block.
EXPECT = {
    "SgTable.from_pages(np.array([10, 11, 12, 40, 41]": ["[EINVAL] max_segment 0xfff rounds down below PAGE_SIZE",
                                                        "[EEXIST]"],
    "IovaState.try_alloc(gpu, 0, 3 * 4096)": ["PTE writes so far"],
    "class Nic(ImporterOps)": ["without the reservation lock", "<SgTable"],
    "vfio.set_memory_decode(False": ["DMA fault at"],
}


def test_the_readme_has_its_blocks():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed test run elsewhere)")
    assert len(BLOCKS) >= 4
    for key in EXPECT:  # each expectation names a block that exists
        assert sum(key in code for code in BLOCKS) == 1, key


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs_on_its_own(index):
    code = BLOCKS[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{README}:block{index}", "exec"), {"__name__": "readme"})  # a fresh namespace
    for key, wanted in EXPECT.items():
        if key in code:
            for text in wanted:
                assert text in out.getvalue(), (text, out.getvalue())
