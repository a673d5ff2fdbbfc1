"""Shared test configuration.

Tests import the installed ``pydmabuf`` (CI builds and installs the wheel);
during development ``PYTHONPATH=src`` after ``python setup.py build_ext
--inplace`` works too.

Hypothesis profiles: ``default`` (the CI run, a few minutes in all) and
``thorough`` (``HYPOTHESIS_PROFILE=thorough``) for long local runs.
"""

import os

from hypothesis import HealthCheck, settings

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
