/* IO page-table helpers of the core (src/_core_pgtable.pxi).
 *
 * Included by Cython through `cdef extern from "pdb_pgtable.h"`; static, so each
 * extension module that includes it has its own copy. */
#ifndef PYDMABUF_PDB_PGTABLE_H
#define PYDMABUF_PDB_PGTABLE_H

#include <stdint.h>

#include <stdlib.h>
#include <string.h>
static uint64_t *pdb_table_alloc(void)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, 4096) != 0)
        return NULL;
    memset(p, 0, 4096);
    return (uint64_t *)p;
}

#define PDB_PTE_ADDR_MASK 0x000FFFFFFFFFF000ULL
#define PDB_PGSIZE_BITMAP (0x1000ULL | 0x200000ULL | 0x40000000ULL)

#endif /* PYDMABUF_PDB_PGTABLE_H */
