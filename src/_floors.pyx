# cython: language_level=3
"""pydmabuf._floors: reference floors for the study's benchmarks.

Reference floors: the least work a C programmer would do for the two
hottest walks, compiled with the same compiler and flags as the core so
benchmarks can report "core time / floor time" from one run.

  coalesce: PFN array -> 32-byte scatterlist-shaped entries, merging runs
            of consecutive PFNs up to max_seg bytes (one pass, no chaining,
            no kernel rules).
  pte:      one 8-byte leaf entry per page.

Kept out of the product core (pydmabuf._core*): the model never carries
its own measuring sticks.  Built with the core's hot modules' flags.
"""

from pydmabuf._core_base cimport *

include "_core_imports.pxi"

cdef extern from "pdb_floors.h":
    size_t pdb_floor_coalesce(const uint64_t *pfn, size_t n, uint64_t max_seg,
                              void *out) nogil
    void pdb_floor_pte(const uint64_t *pfn, size_t n, uint64_t *pte) nogil


def floor_coalesce(pfns, max_segment=0xFFFFF000, _Buffer out=None):
    """Run the C floor of the scatterlist walk over ``pfns``.

    Writes up to ``len(pfns)`` 32-byte entries into ``out`` (allocated if
    not given; pass the same one back to time the loop alone) and returns
    the number of entries.  This is a measuring stick, not a scatterlist:
    it knows none of the kernel's rules.
    """
    cdef const uint64_t[::1] p = _as_u64_view(pfns, "pfns")
    cdef size_t n = p.shape[0]
    cdef size_t k
    cdef uint64_t maxseg = _u64(max_segment, "max_segment")
    if out is None:
        out = _new_buffer(n if n else 1, 0, 32, b"32B")
    elif <size_t>out.shape[0] * <size_t>out.itemsize < n * 32:
        raise ValueError("out is too small")
    with nogil:
        k = pdb_floor_coalesce(&p[0] if n else NULL, n, maxseg, out.data)
    return k


def floor_pte(pfns, _Buffer out=None):
    """Run the C floor of a page-table walk: one 8-byte write per page."""
    cdef const uint64_t[::1] p = _as_u64_view(pfns, "pfns")
    cdef size_t n = p.shape[0]
    if out is None:
        out = _new_buffer(n if n else 1, 0, 8, b"Q")
    elif <size_t>out.shape[0] * <size_t>out.itemsize < n * 8:
        raise ValueError("out is too small")
    with nogil:
        if n:
            pdb_floor_pte(&p[0], n, <uint64_t *>out.data)
    return n


def floor_buffer(n, itemsize):
    """An output buffer for the floors, so a benchmark times only the loop."""
    if not isinstance(n, int) or not isinstance(itemsize, int):
        raise TypeError("n and itemsize must be ints")
    if n < 1 or itemsize not in (8, 32):
        raise ValueError("n must be >= 1 and itemsize 8 or 32")
    if n > PY_SSIZE_T_MAX:
        raise _errors.OutOfMemory(f"floor_buffer: {n} items do not fit in memory")
    return _new_buffer(n, 0, itemsize, b"Q" if itemsize == 8 else b"32B")
