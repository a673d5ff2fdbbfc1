/* Reading /proc/self/pagemap and populating pages (src/_core_pagemap.pxi).
 *
 * Included by Cython through `cdef extern from "pdb_pagemap.h"`; static, so each
 * extension module that includes it has its own copy. */
#ifndef PYDMABUF_PDB_PAGEMAP_H
#define PYDMABUF_PDB_PAGEMAP_H

#include <stdint.h>

#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <errno.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Read the pagemap entries of npages pages from page index first on.
   Returns 0, or -errno; *bad is the index of the first page that is not
   present (-1 if all are), *hidden is 1 when PFNs read as zero. */
static int pdb_read_pagemap(uint64_t first, uint64_t npages, uint64_t *out,
                            int64_t *bad, int *hidden)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t done = 0, i;
    if (fd < 0)
        return -errno;
    while (done < npages) {
        ssize_t r = pread(fd, (char *)(out + done), (npages - done) * 8,
                          (off_t)((first + done) * 8));
        if (r < 0) {
            int e = errno;
            if (e == EINTR)
                continue;
            close(fd);
            return -e;
        }
        if (r == 0 || r % 8) {
            close(fd);
            return -EIO;
        }
        done += (uint64_t)r / 8;
    }
    close(fd);
    *bad = -1;
    *hidden = 0;
    for (i = 0; i < npages; i++) {
        uint64_t e = out[i];
        if (!(e >> 63)) {
            *bad = (int64_t)i;
            return 0;
        }
        out[i] = e & ((1ULL << 55) - 1);
        if (out[i] == 0)
            *hidden = 1;
    }
    return 0;
}

static int pdb_populate(uint64_t addr, uint64_t len, int writable)
{
    if (madvise((void *)(uintptr_t)addr, len,
                writable ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) == 0)
        return 0;
    return -errno;
}

static void pdb_touch(uint64_t addr, uint64_t len)
{
    volatile const char *p = (volatile const char *)(uintptr_t)addr;
    uint64_t off;
    for (off = 0; off < len; off += 4096)
        (void)p[off];
}

#endif /* PYDMABUF_PDB_PAGEMAP_H */
