"""Shared test configuration.

Tests import the installed ``pydmabuf`` (CI builds and installs the wheel);
during development ``PYTHONPATH=src`` after ``python setup.py build_ext
--inplace`` works too.

The machine most tests use is the fixture ``m`` below; a test file that
needs another machine defines its own (``test_vram``'s two GPUs,
``test_phys_vec``'s two switches) or builds one in the test body
(``Machine.default(flush_timer=False)``, the small machines of
``machines.py``).

Hypothesis profiles: ``default`` (the CI run, a few minutes in all) and
``thorough`` (``HYPOTHESIS_PROFILE=thorough``) for long local runs.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from pydmabuf import Machine, checks

settings.register_profile(
    "default",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def m() -> Machine:
    """A fresh :meth:`Machine.default` for each test, with the checker's
    report log emptied first so the reports a test reads are its own.

    Function-scoped on purpose: a machine carries state (IOVA, page
    tables, allocated pages, open files) that must not pass from one test
    to the next.
    """
    checks.clear()
    return Machine.default()
