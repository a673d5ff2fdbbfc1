# The physical pages behind a Python buffer, read from /proc/self/pagemap.

from cpython.buffer cimport (PyBUF_ANY_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from libc.errno cimport errno as c_errno

cdef extern from "pdb_pagemap.h":
    int pdb_read_pagemap(uint64_t first, uint64_t npages, uint64_t *out,
                         int64_t *bad, int *hidden) nogil
    int pdb_populate(uint64_t addr, uint64_t length, int writable) nogil
    void pdb_touch(uint64_t addr, uint64_t length) nogil


cdef tuple _buffer_span(object buffer):
    """(address, nbytes) of a contiguous buffer."""
    cdef Py_buffer view
    try:
        PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS)
    except (BufferError, ValueError) as e:
        raise BufferError(f"the buffer must be contiguous: {e}") from None
    except TypeError:
        raise TypeError(f"{type(buffer).__name__} does not support the buffer protocol") from None
    try:
        return (<uint64_t><size_t>view.buf, <uint64_t>view.len)
    finally:
        PyBuffer_Release(&view)


def pagemap(buffer, populate=True):
    """Physical frame numbers of the pages behind a Python buffer.

    Parameters
    ----------
    buffer : object with the buffer protocol
        Any contiguous buffer (bytes, bytearray, NumPy array, mmap ...).
    populate : bool
        Fault the pages in first (``MADV_POPULATE_WRITE`` for writable
        buffers so each page gets its own frame, ``MADV_POPULATE_READ``
        otherwise); the buffer's contents are not changed.

    Returns
    -------
    numpy.ndarray of uint64
        One PFN per page the buffer touches, first page first.  The buffer
        starts ``address % 4096`` bytes into the first page.

    Raises
    ------
    InvalidArgument
        (EINVAL) an empty buffer.
    NotPermitted
        (EPERM) the process may not read PFNs (needs CAP_SYS_ADMIN; the
        kernel then reports every PFN as 0).
    NotFound
        (ENOENT) a page is not resident (``populate=False``, or a mapping
        that cannot be populated).
    DmaBufError
        /proc/self/pagemap cannot be read (its errno).
    """
    cdef Py_buffer view
    cdef uint64_t addr, length, first, last, npages
    cdef int writable = 0
    cdef int rc = 0
    cdef int64_t bad = -1
    cdef int hidden = 0
    cdef _Buffer out
    cdef bint pop = populate
    try:
        PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS | PyBUF_WRITABLE)
        writable = 1
    except (BufferError, TypeError, ValueError):
        try:
            PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS)
        except (BufferError, ValueError) as e:
            raise BufferError(f"pagemap: the buffer must be contiguous: {e}") from None
        except TypeError:
            raise TypeError(f"pagemap: {type(buffer).__name__} does not support the buffer protocol") from None
    try:
        addr = <uint64_t><size_t>view.buf
        length = <uint64_t>view.len
        if length == 0:
            raise _errors.InvalidArgument("pagemap: the buffer is empty")
        first = addr >> PDB_PAGE_SHIFT
        last = (addr + length - 1) >> PDB_PAGE_SHIFT
        npages = last - first + 1
        out = _new_buffer(npages, 0, 8, b"Q")
        with nogil:
            if pop:
                rc = pdb_populate(first << PDB_PAGE_SHIFT, npages << PDB_PAGE_SHIFT, writable)
                if rc < 0:
                    pdb_touch(first << PDB_PAGE_SHIFT, npages << PDB_PAGE_SHIFT)
            rc = pdb_read_pagemap(first, npages, <uint64_t *>out.data, &bad, &hidden)
    finally:
        PyBuffer_Release(&view)
    if rc < 0:
        raise _errors.from_errno(-rc, f"pagemap: cannot read /proc/self/pagemap: {_os_strerror(-rc)}")
    if bad >= 0:
        raise _errors.NotFound(f"pagemap: page {bad} of the buffer (at {(first + bad) << 12:#x}) is not resident")
    if hidden:
        raise _errors.NotPermitted(
            "pagemap: the kernel hides PFNs from this process (reading them needs CAP_SYS_ADMIN)")
    return _np().asarray(out)


cdef str _os_strerror(int e):
    import os
    return os.strerror(e)


def thread_cpu(uint32_t ncpus):
    """The CPU the calling thread stands for among ``ncpus`` (per-CPU IOVA
    caches, flush queues): its native thread id modulo ``ncpus``."""
    if ncpus == 0:
        raise ValueError("thread_cpu: ncpus must be at least 1")
    return pdb_thread_cpu(ncpus)


def buffer_span(buffer):
    """(address, nbytes) of a contiguous buffer: where its bytes are."""
    return _buffer_span(buffer)
