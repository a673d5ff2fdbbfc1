/* Fence helpers of the core (src/_core_fence.pxi).
 *
 * Included by Cython through `cdef extern from "pdb_fence.h"`; static, so each
 * extension module that includes it has its own copy. */
#ifndef PYDMABUF_PDB_FENCE_H
#define PYDMABUF_PDB_FENCE_H

#include <stdint.h>

/* Take k values from *p (atomically); -1 if that would pass 2**64 - 1. */
static int pdb_reserve_u64(uint64_t *p, uint64_t k, uint64_t *first) {
    uint64_t old = __atomic_load_n(p, __ATOMIC_RELAXED), next;
    do {
        if (__builtin_add_overflow(old, k, &next))
            return -1;
    } while (!__atomic_compare_exchange_n(p, &old, next, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *first = old;
    return 0;
}

#endif /* PYDMABUF_PDB_FENCE_H */
