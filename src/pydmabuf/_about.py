"""The package's version, for the modules that report it (a leaf).

The build writes ``_version.py`` (setuptools-scm); a source tree that was
never built has none, and an installed distribution without it still
knows its version from its metadata.
"""

from __future__ import annotations

__all__ = ["VERSION"]


def _find() -> str:
    try:
        from pydmabuf._version import version
    except ImportError:  # an unbuilt tree; the build writes _version.py
        try:
            from importlib.metadata import version as dist_version

            return dist_version("pydmabuf")
        except Exception:
            return "0.0.0+unknown"
    return str(version)


VERSION: str = _find()
