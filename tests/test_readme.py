"""The README's tour runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed test run elsewhere)")
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_tour_runs(capsys):
    blocks = python_blocks()
    assert blocks, "the README has a Python tour"
    ns = {"__name__": "readme"}  # one tour: later blocks use what earlier ones made
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)
    out = capsys.readouterr().out
    assert "[EINVAL] max_segment 0xfff rounds down below PAGE_SIZE" in out
    assert "[EEXIST]" in out
    assert "without the reservation lock" in out  # the checker refused the unlocked map
    assert "DMA fault at" in out  # the revoked iommufd area
