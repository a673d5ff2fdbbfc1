/* Scatterlist helpers of the core: the arena cache and the page-run scan (src/_core_sg.pxi).
 *
 * Included by Cython through `cdef extern from "pdb_sg.h"`; static, so each
 * extension module that includes it has its own copy. */
#ifndef PYDMABUF_PDB_SG_H
#define PYDMABUF_PDB_SG_H

#include <stdint.h>

#define PDB_POOL_SLOTS 8
#define PDB_POOL_MIN_BYTES (64u << 10)
#define PDB_POOL_LIMIT_BYTES (128ull << 20)
struct pdb_pool_ent { void *p; uint64_t cap; };
static struct pdb_pool_ent pdb_pool[PDB_POOL_SLOTS];
static uint64_t pdb_pool_bytes;
static char pdb_pool_busy;
static void pdb_pool_lock(void) {
    while (__atomic_test_and_set(&pdb_pool_busy, __ATOMIC_ACQUIRE))
        ;
}
static void pdb_pool_unlock(void) { __atomic_clear(&pdb_pool_busy, __ATOMIC_RELEASE); }

/* An arena of at least want slots of esz bytes; *cap gets its size. */
static void *pdb_pool_get(uint64_t want, uint64_t esz, uint64_t *cap) {
    int best = -1, i;
    void *p;
    if (want * esz >= PDB_POOL_MIN_BYTES) {
        pdb_pool_lock();
        for (i = 0; i < PDB_POOL_SLOTS; i++)
            if (pdb_pool[i].p && pdb_pool[i].cap >= want &&
                (best < 0 || pdb_pool[i].cap < pdb_pool[best].cap))
                best = i;
        if (best >= 0 && pdb_pool[best].cap <= 4 * want + 1024) {
            p = pdb_pool[best].p;
            *cap = pdb_pool[best].cap;
            pdb_pool[best].p = NULL;
            pdb_pool_bytes -= *cap * esz;
            pdb_pool_unlock();
            return p;
        }
        pdb_pool_unlock();
    }
    p = malloc(want * esz);
    *cap = p ? want : 0;
    return p;
}

static void pdb_pool_put(void *p, uint64_t cap, uint64_t esz) {
    int i;
    if (!p)
        return;
    if (cap * esz >= PDB_POOL_MIN_BYTES) {
        pdb_pool_lock();
        if (pdb_pool_bytes + cap * esz <= PDB_POOL_LIMIT_BYTES) {
            for (i = 0; i < PDB_POOL_SLOTS; i++) {
                if (!pdb_pool[i].p) {
                    pdb_pool[i].p = p;
                    pdb_pool[i].cap = cap;
                    pdb_pool_bytes += cap * esz;
                    pdb_pool_unlock();
                    return;
                }
            }
        }
        pdb_pool_unlock();
    }
    free(p);
}

static void pdb_pool_drain(void) {
    int i;
    pdb_pool_lock();
    for (i = 0; i < PDB_POOL_SLOTS; i++) {
        free(pdb_pool[i].p);
        pdb_pool[i].p = NULL;
    }
    pdb_pool_bytes = 0;
    pdb_pool_unlock();
}

/* For each of m pages, p[j] - p[j - 1] - 1 (0 when the page continues
   the previous one); ORs the PFNs into *acc; returns the OR of the
   differences.  Compiled for AVX2 too, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("avx2", "default")))
#endif
static uint64_t pdb_sg_mark(const uint64_t *restrict p, uint64_t m,
                            uint64_t *restrict dif, uint64_t *acc)
{
    uint64_t d = 0, a = *acc, j;
    for (j = 0; j < m; j++) {
        uint64_t x = p[j] - p[j - 1] - 1;
        dif[j] = x;
        d |= x;
        a |= p[j];
    }
    *acc = a;
    return d;
}

#endif /* PYDMABUF_PDB_SG_H */
