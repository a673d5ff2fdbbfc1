/* The benchmark floors (src/_floors.pyx).
 *
 * Included by Cython through `cdef extern from "pdb_floors.h"`; static, so each
 * extension module that includes it has its own copy. */
#ifndef PYDMABUF_PDB_FLOORS_H
#define PYDMABUF_PDB_FLOORS_H

#include <stdint.h>

struct pdb_floor_entry {
    uint64_t phys;
    uint32_t offset, length;
    uint64_t dma_address;
    uint32_t dma_length, pad;
};

/* One scatterlist entry of a run of `len` bytes from page `start`. */
static inline void pdb_floor_emit(struct pdb_floor_entry *e, uint64_t start, uint64_t len)
{
    e->phys = start << 12;
    e->offset = 0;
    e->length = (uint32_t)len;
    e->dma_address = 0;
    e->dma_length = 0;
    e->pad = 0;
}

static size_t pdb_floor_coalesce(const uint64_t *pfn, size_t n, uint64_t max_seg,
                                 void *out_)
{
    struct pdb_floor_entry *out = (struct pdb_floor_entry *)out_;
    size_t k = 0;
    uint64_t start, len;
    if (n == 0)
        return 0;
    start = pfn[0];
    len = 4096;
    for (size_t i = 1; i < n; i++) {
        if (pfn[i] == pfn[i - 1] + 1 && len + 4096 <= max_seg) {
            len += 4096;
            continue;
        }
        pdb_floor_emit(&out[k++], start, len);
        start = pfn[i];
        len = 4096;
    }
    pdb_floor_emit(&out[k], start, len);
    return k + 1;
}

static void pdb_floor_pte(const uint64_t *pfn, size_t n, uint64_t *pte)
{
    for (size_t i = 0; i < n; i++)
        pte[i] = (pfn[i] << 12) | 3;
}

#endif /* PYDMABUF_PDB_FLOORS_H */
