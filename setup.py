"""Build the native core ``pydmabuf._core`` from ``src/_core.pyx``.

Environment switches (read at build time):

``PYDMABUF_DEBUG=1``
    Cython bounds, wraparound and initialisation checks on, C asserts and the
    core's invariant checks on (``PYDMABUF_DEBUG`` macro), ``-O1 -g``.
``PYDMABUF_SANITIZE=address,undefined``
    Build with the named ``-fsanitize=`` options (implies the debug build).
    Run the tests with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``.
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
}

cflags = ["-O1", "-g", "-UNDEBUG", "-DPYDMABUF_DEBUG=1"] if debug else ["-O3", "-DNDEBUG"]
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
