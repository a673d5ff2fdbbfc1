"""Benchmarks run against the installed package, like the tests."""

import pytest

from pydmabuf import Machine


@pytest.fixture(scope="module")
def machine() -> Machine:
    """One default machine per benchmark module: its buffers and mappings
    stay within the module that made them (module scope in a conftest
    gives each module its own instance)."""
    return Machine.default()
