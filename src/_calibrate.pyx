# cython: language_level=3
"""Unit costs of kernel operations, measured on this host by small C loops.

Each loop does one kind of work the kernel does on a mapping path, with
data shaped as the kernel's (8-byte entries in 512-entry tables, 32-byte
scatterlist entries, a red-black tree of ranges, zeroed allocations), so
``pydmabuf bench`` can turn exact counts of kernel work into nanoseconds.
They are measuring sticks, compiled apart from the model's core so the
product's hot path carries none of them.
"""

from libc.stdint cimport uint64_t

cdef extern from "pdb_calibrate.h":
    struct pcal_pt:
        pass
    struct pcal_sg:
        pass
    int pcal_pt_init(pcal_pt *pt, size_t nl3) nogil
    void pcal_pt_free(pcal_pt *pt) nogil
    uint64_t pcal_walk(pcal_pt *pt, size_t n) nogil
    uint64_t pcal_calls(pcal_pt *pt, size_t n) nogil
    uint64_t pcal_batch(pcal_pt *pt, size_t n) nogil
    uint64_t pcal_visit(pcal_sg *sg, size_t n) nogil
    uint64_t pcal_alloc(size_t n, size_t nbytes) nogil
    uint64_t pcal_tree(size_t n, size_t live) nogil
    uint64_t pcal_magazine(size_t n) nogil

from libc.stdlib cimport calloc, free


def measure(int rounds=7, size_t walks=100000, size_t entries=131072, size_t allocs=4000,
            size_t tree_ops=8000, size_t tree_live=1024):
    """Run every loop ``rounds`` times, interleaved (one of each per round);
    returns ``{name: [ns per unit of each round]}``.

    Units: ``walk_write`` one 4-level descent ending in one leaf write
    (io-pgtable-arm's recursive __arm_lpae_map shape); ``map_call`` one
    one-page iommu_map_nosync-shaped call (checks, iommu_pgsize, an indirect
    map_pages call, the same descent and write);
    ``pte_write`` one entry written in a batch of 512; ``entry_visit`` one
    32-byte scatterlist entry visited by a pass; ``alloc_4k`` one zeroed
    4 KiB allocation and its free; ``tree_pair`` one node allocated,
    inserted into and erased from a red-black tree of ``tree_live`` ranges,
    then freed; ``magazine_pair`` one pfn popped from and pushed back into
    a 127-entry magazine, each under a spin lock.  MemoryError when the
    buffers cannot be allocated.
    """
    if rounds < 1 or walks < 1 or entries < 1 or allocs < 1 or tree_ops < 1 or tree_live < 1:
        raise ValueError("rounds and sizes must be positive")
    cdef pcal_pt pt
    cdef pcal_sg *sg = <pcal_sg *>calloc(entries, 32)
    cdef uint64_t t
    cdef int _p
    if sg == NULL:
        raise MemoryError("calibration: no memory for the entries")
    if pcal_pt_init(&pt, 2048) < 0:
        free(sg)
        raise MemoryError("calibration: no memory for the page table")
    out = {"walk_write": [], "map_call": [], "pte_write": [], "entry_visit": [], "alloc_4k": [], "tree_pair": [],
           "magazine_pair": []}
    try:
        with nogil:
            pcal_walk(&pt, walks)          # warm up: fault everything in
            pcal_batch(&pt, 2048 * 512)
            pcal_visit(sg, entries)
        for _ in range(rounds):
            with nogil:
                t = pcal_walk(&pt, walks)
            out["walk_write"].append(<double>t / walks)
            with nogil:
                t = pcal_calls(&pt, walks)
            out["map_call"].append(<double>t / walks)
            # The memory-bound loops run several passes a round: one pass
            # over a few MiB varies with what the caches and the prefetcher
            # happened to hold, and a longer sample averages that out.
            with nogil:
                t = 0
                for _p in range(4):
                    t += pcal_batch(&pt, 512 * 512)
            out["pte_write"].append(t / (4 * 512.0 * 512))
            with nogil:
                t = 0
                for _p in range(4):
                    t += pcal_visit(sg, entries)
            out["entry_visit"].append(<double>t / (4 * entries))
            with nogil:
                t = pcal_alloc(allocs, 4096)
            out["alloc_4k"].append(<double>t / allocs)
            with nogil:
                t = pcal_tree(tree_ops, tree_live)
            out["tree_pair"].append(<double>t / tree_ops)
            with nogil:
                t = pcal_magazine(tree_ops * 8)
            out["magazine_pair"].append(t / (tree_ops * 8.0))
    finally:
        pcal_pt_free(&pt)
        free(sg)
    for k, v in out.items():
        if not all(x > 0 for x in v):
            raise RuntimeError(f"calibration: the {k} loop failed (clock or allocation)")
    return out
