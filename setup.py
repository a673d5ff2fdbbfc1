"""Build the native core ``pydmabuf._core`` from ``src/_core.pyx``.

Environment switches (read at build time):

``PYDMABUF_DEBUG=1``
    Cython bounds, wraparound and initialisation checks on, C asserts and the
    core's invariant checks on (``PYDMABUF_DEBUG`` macro), ``-O1 -g``.
``PYDMABUF_SANITIZE=address,undefined``
    Build with the named ``-fsanitize=`` options (implies the debug build).
    Run the tests with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``.

The release build is ``-O3 -g0``.  The flags given here come after
Python's own CFLAGS (``-g -O3`` on most builds of CPython), so they win.
Measured on a 2-CPU VM (gcc 12, the 8 MB C file Cython writes for the
core; Cython itself takes 5 s): ``-O3 -g`` 79-87 s, ``-O3 -g0`` 54 s,
``-O2 -g0`` 47 s, ``-O1 -g0`` 28 s.  Debug info cost a third of the build
and 7.5 of the 8.9 MB of the shared object, and nobody debugs a release
wheel with it.  ``-O2`` was not taken: in interleaved runs of the core's
benchmarks it made ``SgTable.from_pages`` on contiguous pages 2.1x and on
fragmented pages 1.2x slower than ``-O3``, for 7 s less of build.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("PYDMABUF_DEBUG", "") not in ("", "0")
sanitize = os.environ.get("PYDMABUF_SANITIZE", "").strip()
if sanitize:
    debug = True

directives = {
    "language_level": 3,
    "binding": True,
    "embedsignature": True,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    # The core's objects stand for kernel objects with identity and locks;
    # Cython's automatic pickling only made half-valid copies of the few
    # whose fields happened to be convertible (ResvIter, FenceCallback).
    "auto_pickle": False,
}

cflags = ["-O1", "-g", "-UNDEBUG", "-DPYDMABUF_DEBUG=1"] if debug else ["-O3", "-g0", "-DNDEBUG"]
cflags += ["-Wno-unused-function", "-fno-strict-aliasing"]
ldflags = []
if sanitize:
    cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    ldflags += [f"-fsanitize={sanitize}"]

ext = Extension(
    "pydmabuf._core",
    sources=["src/_core.pyx"],
    include_dirs=["src"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

# Unit-cost loops for the study's kernel-cost estimate, kept out of the core.
calibrate = Extension(
    "pydmabuf._calibrate",
    sources=["src/_calibrate.pyx"],
    extra_compile_args=(["-O1", "-g"] if debug else ["-O2"]) + ["-Wno-unused-function"],
    extra_link_args=ldflags,
)

setup(
    ext_modules=cythonize(
        [ext, calibrate],
        include_path=["src"],
        compiler_directives=directives,
    ),
)
