# cython: language_level=3
"""pydmabuf._core: the native core of pydmabuf.

Every per-page or per-range loop of pydmabuf lives in the core, in
``noexcept nogil`` kernels that take C pointers and lengths and return a
count >= 0 or a negative errno.  The ``def`` methods parse arguments, take
buffer views, call the kernel (releasing the GIL for bulk work) and turn a
negative result into a :mod:`pydmabuf.errors` exception through one
bridge, ``_check``.

The core is built as several extension modules, one per group of kernel
files, so a C compiler can build them in parallel; each has a ``.pxd``
declaring what the others (and Cython consumers) use:

=========================  ===================================================
``pydmabuf._core_base``    errno bridge, locks, argument parsing, buffers,
                           pagemap (``_core_common.pxi``, ``_core_pagemap.pxi``)
``pydmabuf._core_iova``    range table, IOVA allocator (lib/interval_tree,
                           drivers/iommu/iova.c)
``pydmabuf._core_iommu``   IO page tables, IOMMU domain (io-pgtable-arm.c,
                           iommu.c, dma-iommu.c's IOVA policy and flush queue)
``pydmabuf._core_dma``     scatterlists and the DMA walks over them
                           (lib/scatterlist.c, kernel/dma/direct.c,
                           dma-iommu.c, block/blk-mq-dma.c)
``pydmabuf._core_ww``      tasks, signalling sections, ww mutexes
                           (kernel/locking/ww_mutex.h)
``pydmabuf._core_fence``   fences, arrays, chains, reservation objects
                           (drivers/dma-buf/dma-fence*.c, dma-resv.c)
=========================  ===================================================

This module is the one Python face of them all: it re-exports every name
the Python layer uses.  ``pydmabuf/_core.pxd`` cimports every module's
declarations, so ``cimport pydmabuf._core`` gives a Cython consumer all
of them.
"""

# The names are copied into this module's namespace (not imported by name:
# this module's .pxd cimports the same classes, and Cython binds a
# cimported class name to the C type, not to a module global).
from pydmabuf import _core_base, _core_dma, _core_fence, _core_iommu, _core_iova, _core_ww

_EXPORTS = {
    _core_base: (
        "buffer_span", "pagemap", "thread_cpu", "_Buffer", "_U64Arg",
    ),
    _core_iova: (
        "IovaDomain", "RangeTable", "_remove_many",
    ),
    _core_iommu: (
        "IoPageTable", "IommuDomain",
    ),
    _core_dma: (
        "MAX_SG_ENT_SZ", "P2pContext", "SCATTERLIST_MAX_SEGMENT", "SG_CHAIN", "SG_DMA_BUS_ADDRESS",
        "SG_DMA_SWIOTLB", "SG_END", "SG_MAX_SINGLE_ALLOC", "SgTable", "drain_arena_cache",
        # The seam: what the Python layer calls in the core (_core.pyi).
        "IovaStateCore", "blk_map_iter", "destroy_iova_span", "iova_link_ranges", "map_sg_direct",
        "map_sg_iommu", "map_single", "map_single_many", "ranges_total", "ranges_touch", "set_sg_with_hook",
        "sg_clear_dma", "sg_set_dma", "translate_iova", "u64_array", "u64_pairs", "unmap_sg_iommu",
        "unmap_single_many",
    ),
    _core_ww: (
        "AcquireContext", "WwClass", "WwMutex", "begin_signalling", "end_signalling",
        "flush_signals", "in_signalling_section", "reservation_ww_class", "signal_pending",
        "signal_thread", "set_lockdep_hooks", "thread_lock_state", "ThreadHeld",
    ),
    _core_fence: (
        "Fence", "FenceArray", "FenceCallback", "FenceChain", "Resv", "ResvIter",
        "fence_chain_contained", "fence_chain_find_seqno", "fence_context_alloc", "fence_merge",
        "fence_unwrap", "fence_wait_any", "get_stub_fence", "private_stub_fence", "usage_rw",
        "_ArrayCallback", "_ChainCallback", "_StubFence", "_fence_cmp_py",
    ),
}

for _mod, _names in _EXPORTS.items():
    for _name in _names:
        globals()[_name] = getattr(_mod, _name)
del _mod, _names, _name
