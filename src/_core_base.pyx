# cython: language_level=3
"""pydmabuf._core_base: what every module of the native core shares.

The errno bridge, object locks, argument parsing, the buffer object the
core hands bulk outputs out in, and the pagemap reader.  Declared for the
other core modules in ``pydmabuf/_core_base.pxd``.
"""

include "_core_imports.pxi"
include "_core_common.pxi"
include "_core_pagemap.pxi"
