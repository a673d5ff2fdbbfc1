"""Build the native core of pydmabuf: ``pydmabuf._core`` and its modules.

The core is several extension modules, one per group of kernel files
(``src/_core_*.pyx``, listed in ``src/_core.pyx``), plus Cython's shared
utility code (``pydmabuf._cyutility``), the benchmark floors
(``pydmabuf._floors``) and the study's unit-cost loops
(``pydmabuf._calibrate``).  ``build_ext`` compiles them in parallel, one
job per CPU, so a plain ``pip install .`` uses every CPU.

Environment switches (read at build time):

``PYDMABUF_DEBUG=1``
    Cython bounds, wraparound and initialisation checks on, C asserts and the
    core's invariant checks on (``PYDMABUF_DEBUG`` macro), ``-O1 -g``.
``PYDMABUF_SANITIZE=address,undefined``
    Build with the named ``-fsanitize=`` options (implies the debug build).
    Run the tests with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``.

Release builds use ``-g0`` and a per-module ``-O`` level (``CORE_MODULES``).
The flags given here come after Python's own CFLAGS (``-g -O3`` on most
builds of CPython), so they win.  Measured with gcc 12 (CPU seconds of the
C compiler, summed over the units, on a loaded 2-CPU VM):

* before the split, one 8 MB C file at ``-O3 -g0``: 49.9 s in one process
  (earlier, on a quiet machine: ``-O3 -g`` 79-87 s, ``-O3 -g0`` 54 s,
  ``-O2`` 47 s, ``-O1`` 28 s);
* split, with the shared utility module: 40.4 s over ten units, the
  largest (``_core_dma``, ``-O3``) 9.2 s, so about 21 s on two CPUs.

Wall time on a quiet 2-CPU VM, back to back: ``python setup.py build_ext
--inplace --force`` (Cython included) 64.2 s before, 31.9 s after; ``pip
install .`` into a fresh venv 72.7 s before, 42.9 s after.

``-O3`` stays on the modules holding the per-page and per-range loops
(scatterlists and DMA walks, IOVA and range table, page tables and IOMMU
domain) and the floors they are compared with: ``-O2`` made
``SgTable.from_pages`` on contiguous pages 2.1x and on fragmented pages 1.2x
slower than ``-O3``.  The locking and fence code, argument parsing and the
utility code are ``-O2``; the re-exporting ``pydmabuf._core`` is ``-O1``.
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

# The core, one extension module per group of kernel files (src/_core.pyx
# says which), so the C compiler builds them in parallel; pydmabuf._core
# re-exports them all.  Release optimisation per module, chosen by
# measurement (see the module docstring): -O3 where the per-page and
# per-range loops run, -O2 for the locking and fence code, -O1 for glue.
CORE_MODULES = {
    "_core_base": "-O2",
    "_core_iova": "-O3",
    "_core_iommu": "-O3",
    "_core_dma": "-O3",
    "_core_ww": "-O2",
    "_core_fence": "-O2",
    "_core": "-O1",
    # Benchmark floors: the same flags as the hot walks they are compared with.
    "_floors": "-O3",
    # The DMA API's per-call paths (glue around the core's walks).
    "_dma_api": "-O2",
    # The dma-buf attachment's fields and per-call paths (glue around the exporter's callbacks).
    "_dmabuf_api": "-O2",
}


def _extension(name, opt):
    flags = cflags if debug else [opt, *cflags[1:]]
    return Extension(
        f"pydmabuf.{name}",
        sources=[f"src/{name}.pyx"],
        include_dirs=["src"],
        extra_compile_args=flags,
        extra_link_args=ldflags,
    )


core = [_extension(name, opt) for name, opt in CORE_MODULES.items()]
# Cython's own utility code (memoryviews, buffer checks, type imports) in one
# shared module instead of a copy compiled into each of the modules above:
# a third less C to compile.  Cython writes src/_cyutility.c itself.
core.append(Extension(
    "pydmabuf._cyutility",
    sources=["src/_cyutility.c"],
    extra_compile_args=cflags if debug else ["-O2", *cflags[1:]],
    extra_link_args=ldflags,
))

# Unit-cost loops for the study's kernel-cost estimate, kept out of the core.
calibrate = Extension(
    "pydmabuf._calibrate",
    sources=["src/_calibrate.pyx"],
    include_dirs=["src"],
    extra_compile_args=(["-O1", "-g"] if debug else ["-O2"]) + ["-Wno-unused-function"],
    extra_link_args=ldflags,
)

jobs = os.cpu_count() or 1

setup(
    ext_modules=cythonize(
        [*core, calibrate],
        include_path=["src"],
        compiler_directives=directives,
        nthreads=jobs if jobs > 1 else 0,
        shared_utility_qualified_name="pydmabuf._cyutility",
    ),
    # Compile the extension modules in parallel, one per CPU, also under a
    # plain `pip install .` (setuptools reads this as `build_ext -j N`).
    options={"build_ext": {"parallel": jobs}},
)
