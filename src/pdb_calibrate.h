/* The unit-cost loops of pydmabuf._calibrate (see src/_calibrate.pyx):
 * C shaped as the kernel's data, timed by the study. */
#ifndef PDB_CALIBRATE_H
#define PDB_CALIBRATE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <search.h>
#include <time.h>

static uint64_t pcal_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A 4-level table with 4 KiB granule: one L0, one L1, `nl2` L2 tables,
 * `nl3` L3 tables spread over them; entries are pointers | 3 (valid,
 * table) as io-pgtable-arm stores them. */
struct pcal_pt {
    uint64_t *l0, *l1, **l2, **l3;
    size_t nl2, nl3;
};

static void pcal_pt_free(struct pcal_pt *pt)
{
    size_t i;
    if (pt->l3) for (i = 0; i < pt->nl3; i++) free(pt->l3[i]);
    if (pt->l2) for (i = 0; i < pt->nl2; i++) free(pt->l2[i]);
    free(pt->l3); free(pt->l2); free(pt->l1); free(pt->l0);
    memset(pt, 0, sizeof(*pt));
}

static int pcal_pt_init(struct pcal_pt *pt, size_t nl3)
{
    size_t i;
    memset(pt, 0, sizeof(*pt));
    pt->nl3 = nl3;
    pt->nl2 = (nl3 + 511) / 512;
    pt->l0 = aligned_alloc(4096, 4096);
    pt->l1 = aligned_alloc(4096, 4096);
    pt->l2 = calloc(pt->nl2, sizeof(uint64_t *));
    pt->l3 = calloc(nl3, sizeof(uint64_t *));
    if (!pt->l0 || !pt->l1 || !pt->l2 || !pt->l3) { pcal_pt_free(pt); return -1; }
    memset(pt->l0, 0, 4096); memset(pt->l1, 0, 4096);
    pt->l0[0] = (uint64_t)(uintptr_t)pt->l1 | 3;
    for (i = 0; i < pt->nl2; i++) {
        pt->l2[i] = aligned_alloc(4096, 4096);
        if (!pt->l2[i]) { pcal_pt_free(pt); return -1; }
        memset(pt->l2[i], 0, 4096);
        pt->l1[i] = (uint64_t)(uintptr_t)pt->l2[i] | 3;
    }
    for (i = 0; i < nl3; i++) {
        pt->l3[i] = aligned_alloc(4096, 4096);
        if (!pt->l3[i]) { pcal_pt_free(pt); return -1; }
        memset(pt->l3[i], 0, 4096);
        pt->l2[i / 512][i % 512] = (uint64_t)(uintptr_t)pt->l3[i] | 3;
    }
    return 0;
}

static inline uint64_t *pcal_next(uint64_t e)
{
    return (uint64_t *)(uintptr_t)(e & ~(uint64_t)0xfff);
}

/* The shape of io-pgtable-arm's map: __arm_lpae_map recurses from the
 * root, one call per level, and at the level whose block size matches
 * writes up to the end of that table (reading each old entry first, as
 * arm_lpae_init_pte checks it). */
static __attribute__((noinline)) int pcal_lpae_map(uint64_t *table, int lvl, uint64_t iova,
                                                   uint64_t paddr, size_t size, size_t pgcount,
                                                   uint64_t prot, size_t *mapped)
{
    unsigned shift = 12 + 9 * (3 - lvl);
    unsigned idx = (unsigned)((iova >> shift) & 511);
    uint64_t *ptep = table + idx, pte;
    if (size == ((size_t)1 << shift)) {
        size_t max = 512 - idx, num = pgcount < max ? pgcount : max;
        for (size_t i = 0; i < num; i++) {
            if (((volatile uint64_t *)ptep)[i] & 2 && lvl < 3)
                return -17;
            ((volatile uint64_t *)ptep)[i] = (paddr + i * size) | prot;
        }
        *mapped += num * size;
        return 0;
    }
    if (lvl >= 3)
        return -22;
    pte = ((volatile uint64_t *)ptep)[0];
    if (!(pte & 1))
        return -12;
    return pcal_lpae_map(pcal_next(pte), lvl + 1, iova, paddr, size, pgcount, prot, mapped);
}

typedef int (*pcal_map_pages_fn)(struct pcal_pt *pt, uint64_t iova, uint64_t paddr, size_t pgsize,
                                 size_t pgcount, int prot, size_t *mapped);

/* arm_lpae_map_pages: argument checks, prot to PTE bits, the descent */
static __attribute__((noinline)) int pcal_map_pages(struct pcal_pt *pt, uint64_t iova, uint64_t paddr,
                                                    size_t pgsize, size_t pgcount, int prot, size_t *mapped)
{
    uint64_t pteprot = 3 | ((uint64_t)1 << 10);
    if (!pgsize || (pgsize & 0x40201000ull) != pgsize || !pgcount)
        return -22;
    if ((int64_t)iova >> 48)
        return -34;
    if (!(prot & 3))
        return 0;
    if (!(prot & 2))
        pteprot |= (uint64_t)1 << 7;
    return pcal_lpae_map((uint64_t *)pt->l0, 0, iova, paddr, pgsize, pgcount, pteprot, mapped);
}

static pcal_map_pages_fn volatile pcal_ops_map_pages = pcal_map_pages;

/* iommu_pgsize() */
static size_t pcal_pgsize(uint64_t bitmap, uint64_t iova, uint64_t paddr, size_t size, size_t *count)
{
    unsigned idx, nidx;
    uint64_t addr_merge = paddr | iova, sizes, next, off;
    sizes = bitmap & (((uint64_t)2 << (63 - __builtin_clzll(size))) - 1);
    if (addr_merge)
        sizes &= ((uint64_t)2 << __builtin_ctzll(addr_merge)) - 1;
    idx = 63 - __builtin_clzll(sizes);
    sizes = bitmap & ~(((uint64_t)2 << idx) - 1);
    if (sizes) {
        nidx = __builtin_ctzll(sizes);
        next = (uint64_t)1 << nidx;
        if (!((iova ^ paddr) & (next - 1))) {
            off = next - (addr_merge & (next - 1));
            if (off + next <= size)
                size = off;
        }
    }
    *count = size >> idx;
    return (size_t)1 << idx;
}

/* iommu_map_nosync -> __iommu_map: alignment check, then pgsize + one
 * indirect map_pages call per step */
static __attribute__((noinline)) int pcal_iommu_map(struct pcal_pt *pt, uint64_t iova, uint64_t paddr,
                                                    size_t size, int prot)
{
    const uint64_t bitmap = 0x40201000ull;
    size_t min_pagesz = (size_t)1 << __builtin_ctzll(bitmap);
    if ((iova | paddr | size) & (min_pagesz - 1))
        return -22;
    while (size) {
        size_t count, mapped = 0, pgsize = pcal_pgsize(bitmap, iova, paddr, size, &count);
        int ret = pcal_ops_map_pages(pt, iova, paddr, pgsize, count, prot, &mapped);
        size -= mapped;
        if (ret)
            return ret;
        iova += mapped;
        paddr += mapped;
    }
    return 0;
}

/* the IOVAs of the loops: consecutive pages, as the study's paths map
 * them (each run or page right after the previous one in one IOVA
 * range), wrapping over the tables */
#define PCAL_NEXT_IOVA(pt, t, slot) do { if (++(slot) == 512) { (slot) = 0; \
    if (++(t) >= (pt)->nl3) (t) = 0; } } while (0)

/* n descents from the root, each ending in one leaf write */
static uint64_t pcal_walk(struct pcal_pt *pt, size_t n)
{
    uint64_t t0 = pcal_now();
    size_t i, t = 0, slot = 0, mapped = 0;
    for (i = 0; i < n; i++) {
        uint64_t iova = ((uint64_t)t << 21) | ((uint64_t)slot << 12);
        if (pcal_lpae_map((uint64_t *)pt->l0, 0, iova, iova + 0x40000000ull, 4096, 1, 3, &mapped))
            return 0;
        PCAL_NEXT_IOVA(pt, t, slot);
    }
    return pcal_now() - t0;
}

/* n one-page iommu_map_nosync calls (call, pgsize, indirect call, descent, write) */
static uint64_t pcal_calls(struct pcal_pt *pt, size_t n)
{
    uint64_t t0 = pcal_now();
    size_t i, t = 0, slot = 0;
    for (i = 0; i < n; i++) {
        uint64_t iova = ((uint64_t)t << 21) | ((uint64_t)slot << 12);
        if (pcal_iommu_map(pt, iova, iova + 0x40000000ull, 4096, 3))
            return 0;
        PCAL_NEXT_IOVA(pt, t, slot);
    }
    return pcal_now() - t0;
}

/* n leaf writes in batches of 512 consecutive entries (one table each):
 * what one descent's map_pages/unmap_pages does after the descent. */
static uint64_t pcal_batch(struct pcal_pt *pt, size_t n)
{
    uint64_t t0 = pcal_now();
    size_t i, t = 0;
    for (i = 0; i < n; i += 512) {
        volatile uint64_t *p = pt->l3[t];
        for (size_t j = 0; j < 512; j++)
            p[j] = ((uint64_t)(i + j) << 12) | 3;
        /* Cycle over 32 tables (128 KiB): a map writes into a table it
         * has just walked, which is in cache; a batch over megabytes
         * of tables would time the memory system and the process's
         * page placement (THP or not) instead, differently per run. */
        if (++t >= (pt->nl3 < 32 ? pt->nl3 : 32)) t = 0;
    }
    return pcal_now() - t0;
}

struct pcal_sg { uint64_t page_link; uint32_t offset, length; uint64_t dma_address; uint32_t dma_length, dma_flags; };

/* One pass over n 32-byte entries doing what __finalise_sg does to each:
 * read the stashed fields, write them back, write the DMA side. */
static uint64_t pcal_visit(struct pcal_sg *sg, size_t n)
{
    uint64_t t0 = pcal_now(), dma = 0x100000000ull;
    for (size_t i = 0; i < n; i++) {
        uint32_t off = (uint32_t)sg[i].dma_address, len = sg[i].dma_length;
        sg[i].offset += off;
        sg[i].length = len ? len : 4096;
        sg[i].dma_address = dma + off;
        sg[i].dma_length = sg[i].length;
        dma += sg[i].length;
    }
    return pcal_now() - t0;
}

/* n zeroed allocations of `bytes` and their frees (kzalloc + kfree). */
static uint64_t pcal_alloc(size_t n, size_t bytes)
{
    uint64_t t0 = pcal_now();
    for (size_t i = 0; i < n; i++) {
        void *volatile p = malloc(bytes);
        if (!p) return 0;
        memset(p, 0, bytes);
        free(p);
    }
    return pcal_now() - t0;
}

/* A red-black tree of [lo, hi] ranges (glibc tsearch is one), `live`
 * nodes in it; n times: allocate a node, insert it, erase it, free it
 * -- the tree work of alloc_iova + __free_iova without the gap search. */
static int pcal_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void pcal_nofree(void *p) { (void)p; }

/* A per-CPU IOVA magazine (IOVA_MAG_SIZE = 127 pfns) behind a spin
 * lock, as iova_rcache_get / iova_rcache_insert use it: n times, lock,
 * pop a pfn, unlock, then lock, push it back, unlock. */
struct pcal_mag { int lock; unsigned long size; unsigned long pfns[127]; };

static inline void pcal_lock(int *l)
{
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            ;
}

static inline void pcal_unlock(int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static uint64_t pcal_magazine(size_t n)
{
    static struct pcal_mag mag;
    uint64_t t0;
    unsigned long pfn = 0;
    mag.size = 64;
    for (size_t i = 0; i < 127; i++) mag.pfns[i] = 0x1000 + i * 16;
    t0 = pcal_now();
    for (size_t i = 0; i < n; i++) {
        pcal_lock(&mag.lock);
        if (mag.size) pfn = mag.pfns[--mag.size];
        pcal_unlock(&mag.lock);
        pcal_lock(&mag.lock);
        if (mag.size < 127) mag.pfns[mag.size++] = pfn;
        pcal_unlock(&mag.lock);
    }
    return pcal_now() - t0;
}

static uint64_t pcal_tree(size_t n, size_t live)
{
    void *root = NULL;
    uint64_t *keys = malloc(live * sizeof(uint64_t));
    uint64_t t0, dt, x = 88172645463325252ull;
    size_t i;
    if (!keys) return 0;
    for (i = 0; i < live; i++) {
        keys[i] = (uint64_t)(i * 2 + 1) << 20;
        if (!tsearch(&keys[i], &root, pcal_cmp)) { free(keys); return 0; }
    }
    t0 = pcal_now();
    for (i = 0; i < n; i++) {
        uint64_t *node = malloc(2 * sizeof(uint64_t));
        if (!node) { dt = 0; goto out; }
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        node[0] = ((x % live) * 2) << 20;   /* a gap between two live ranges */
        node[1] = node[0] + 0xfff;
        tsearch(node, &root, pcal_cmp);
        tdelete(node, &root, pcal_cmp);
        free(node);
    }
    dt = pcal_now() - t0;
out:
    tdestroy(root, pcal_nofree);
    free(keys);
    return dt;
}

#endif /* PDB_CALIBRATE_H */
