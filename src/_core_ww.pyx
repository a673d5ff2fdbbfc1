# cython: language_level=3
"""pydmabuf._core_ww: tasks, fence-signalling sections and ww mutexes.

Declared for the other core modules in ``pydmabuf/_core_ww.pxd``.
"""

include "_core_imports.pxi"
include "_core_task.pxi"
include "_core_sigsection.pxi"
include "_core_ww.pxi"
