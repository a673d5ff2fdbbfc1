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
        out[k].phys = start << 12;
        out[k].offset = 0;
        out[k].length = (uint32_t)len;
        out[k].dma_address = 0;
        out[k].dma_length = 0;
        out[k].pad = 0;
        k++;
        start = pfn[i];
        len = 4096;
    }
    out[k].phys = start << 12;
    out[k].offset = 0;
    out[k].length = (uint32_t)len;
    out[k].dma_address = 0;
    out[k].dma_length = 0;
    out[k].pad = 0;
    return k + 1;
}

static void pdb_floor_pte(const uint64_t *pfn, size_t n, uint64_t *pte)
{
    for (size_t i = 0; i < n; i++)
        pte[i] = (pfn[i] << 12) | 3;
}

#endif /* PYDMABUF_PDB_FLOORS_H */
