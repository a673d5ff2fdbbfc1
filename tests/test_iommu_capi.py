"""The IOMMU C API of ``pydmabuf/_core.pxd``, used from another module.

Compiles a small Cython consumer that cimports ``pydmabuf._core`` and runs
a list-free link walk on an IommuDomain through the C kernels alone: the
IOVA policy, page-by-page links (the inlined ``pgt_map_page``), one
``iommu_sync_map``, and a strict or lazy ``iommu_dma_unmap``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pydmabuf
from pydmabuf import IommuDomain

CONSUMER = textwrap.dedent(
    """
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from cpython.pythread cimport PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK
    cimport pydmabuf._core as core

    def link_walk(core.IommuDomain dom, const uint64_t[::1] phys, uint64_t dma_limit, bint pci):
        '''Reserve IOVA for len(phys) pages, link them one by one, sync once.
        Returns (iova, prefer32 after, rc).'''
        cdef uint64_t n = phys.shape[0], i, iova = 0
        cdef bint prefer32 = pci
        cdef int rc
        PyThread_acquire_lock(dom.lock, WAIT_LOCK)
        with nogil:
            rc = core.iommu_dma_alloc_iova(dom.d, n * 4096, dma_limit, &prefer32, 0, &iova)
            if rc == 0:
                for i in range(n):
                    rc = core.pgt_map_page(&dom.d.pgt, iova + i * 4096, phys[i],
                                           core.PDB_IOMMU_READ | core.PDB_IOMMU_WRITE)
                    if rc < 0:
                        break
                if rc == 0:
                    rc = core.iommu_sync_map(dom.d, iova, n * 4096)
        PyThread_release_lock(dom.lock)
        return iova, prefer32, rc

    def destroy(core.IommuDomain dom, uint64_t iova, uint64_t nbytes):
        cdef long long r
        PyThread_acquire_lock(dom.lock, WAIT_LOCK)
        with nogil:
            r = core.iommu_dma_unmap(dom.d, iova, nbytes, 0)
        PyThread_release_lock(dom.lock)
        return r

    def iova_roundtrip(core.IovaDomain d, uint64_t npages, uint64_t limit):
        cdef uint64_t pfn = 0
        cdef int rc
        PyThread_acquire_lock(d.lock, WAIT_LOCK)
        rc = core.iova_alloc_fast(d.d, npages, limit, True, 0, &pfn)
        if rc == 0:
            rc = core.iova_free_fast(d.d, pfn, npages, 0)
        PyThread_release_lock(d.lock)
        return pfn, rc
    """
)

SETUP = textwrap.dedent(
    """
    from setuptools import setup, Extension
    from Cython.Build import cythonize
    setup(ext_modules=cythonize([Extension("consumer", ["consumer.pyx"])],
                                include_path=[{src!r}], quiet=True),
          script_args=["build_ext", "--inplace"])
    """
)


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    src = str(Path(pydmabuf.__file__).resolve().parent.parent)
    if not (Path(src) / "pydmabuf" / "_core.pxd").exists():
        pytest.fail("pydmabuf/_core.pxd is not installed beside the package")
    d = tmp_path_factory.mktemp("consumer")
    (d / "consumer.pyx").write_text(CONSUMER)
    (d / "setup.py").write_text(SETUP.format(src=src))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "setup.py"], cwd=d, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("consumer")
    finally:
        sys.path.remove(str(d))


@pytest.mark.slow
@pytest.mark.parametrize("strict", [True, False])
def test_link_walk_through_the_c_api(consumer, strict):
    dom = IommuDomain(strict=strict, fq_timeout=None)
    phys = (np.arange(1000, dtype=np.uint64)[::-1] + 5000) * 4096
    iova, prefer32, rc = consumer.link_walk(dom, phys, (1 << 48) - 1, True)
    assert rc == 0 and prefer32 and iova < 1 << 32  # PCI: 32-bit space first
    s = dom.stats
    assert s["leaf_sets"] == 1000 and s["sync_map_calls"] == 1
    assert (dom.pgtable.iova_to_phys_many(iova + np.arange(1000, dtype=np.uint64) * 4096) == phys).all()
    assert consumer.destroy(dom, iova, 1000 * 4096) == 1000 * 4096
    s = dom.stats
    assert s["mapped_nbytes"] == 0
    # 1000 pages at a 4 MiB-aligned IOVA: one 2M step clears a table
    # descriptor (a walk invalidation), then 488 4K leaves; the gather syncs
    # when the page size changes.
    assert s["iotlb_walk_invalidations"] == 1 and s["table_clears"] == 1 and s["leaf_clears"] == 488
    if strict:
        assert s["iotlb_range_invalidations"] == 2 and s["fq_pending"] == 0
    else:
        assert s["iotlb_range_invalidations"] == 0 and s["fq_pending"] == 1
    assert consumer.destroy(dom, iova, 4096) == -2  # ENOENT: freed or queued


@pytest.mark.slow
def test_link_walk_reports_eexist(consumer):
    dom = IommuDomain()
    iova = dom.alloc_iova(4 * 4096)
    dom.free_iova(iova, 4 * 4096)
    dom.map(iova + 2 * 4096, 0, 4096)  # a stray mapping where the walk will go
    _, _, rc = consumer.link_walk(dom, np.arange(1, 5, dtype=np.uint64) * 4096, (1 << 48) - 1, False)
    assert rc == -17


@pytest.mark.slow
def test_iova_c_api(consumer):
    d = pydmabuf.IovaDomain()
    assert consumer.iova_roundtrip(d, 3, (1 << 20) - 1) == ((1 << 20) - 4, 0)
    assert d.stats["cached_ranges"] == 1
