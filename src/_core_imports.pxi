# The Python modules every module of the core uses, bound under the same
# names in each (included first by every src/_core*.pyx).  Layer 0 only:
# the core imports no Python module above it (docs/layers.md).

cimport cython

import errno as _errno
import sys as _sys
import warnings as _warnings

from pydmabuf import errors as _errors
# Bound at import: reprs run from __del__ at interpreter shutdown, when
# nothing can be imported any more.
from pydmabuf._types import _fmt_size

_U64_MAX = 0xFFFFFFFFFFFFFFFF
