# The core half of dma.IovaState (struct dma_iova_state and the list-free
# dma_iova_* calls): the reservation, the record of linked windows and the
# per-call checks live here, so a one-page try_alloc / link / sync /
# destroy round trip costs a few C calls instead of a few dozen Python
# ones.  The Python class (pydmabuf.dma.IovaState) subclasses this and
# keeps what needs Python: directions and attributes, the swiotlb bounces
# of an untrusted device, the context manager and the leak warning.
#
# The linked windows are the model's own record beside the page table (the
# kernel keeps none: the caller tracks what it linked).  They are [start,
# end) offsets into the reservation, sorted, parts that touch merged, in a
# small malloc'ed array.




cdef bint _fast_pairs(object obj, Py_buffer *view) except -1:
    """A fast path beside ``_pairs_view`` for the common argument, a
    C-contiguous (N, 2) buffer of native u64 (format ``Q`` or ``L``) with
    N > 0: take the buffer itself (held until the caller releases it) and
    skip the typed-memoryview machinery.  False, with nothing held, for
    anything else: the caller then parses with ``_pairs_view`` (same
    accepted inputs, same errors)."""
    cdef const char *f
    if obj is None or type(obj) is list or type(obj) is tuple:
        return False
    try:
        PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except Exception:       # not a buffer, or not contiguous: the general path says why
        return False
    f = view.format
    if view.ndim == 2 and view.itemsize == 8 and view.shape[1] == 2 and view.shape[0] > 0 and f != NULL \
            and (f[0] == b'Q' or f[0] == b'L') and f[1] == 0:
        return True
    PyBuffer_Release(view)
    return False


cdef inline object _plain_int(object v):
    """An int's own value as a plain int: an int subclass's comparison and
    arithmetic methods must not decide a range check the C code then
    ignores (int.__index__ reads the value itself)."""
    return v if type(v) is int else int.__index__(v)


cdef int _raise_link_error(int64_t rc, uint64_t bad, const uint64_t *flat, uint64_t offset) except -1:
    raise _errors.from_errno(-rc, f"dma_iova_link: range {bad} ({flat[2 * bad]:#x}, {flat[2 * bad + 1]:#x}) "
                             f"at offset {offset:#x}: " + {
                                 -EIO: "only the first link may start inside a granule",
                                 -EEXIST: "the IOVA is already mapped",
                                 -EINVAL: "a zero length, ranges beyond the reservation, or IOVA and "
                                          "physical address not granule aligned",
                                 -ERANGE: "beyond the page table's address width",
                             }.get(rc, _os_strerror(-rc)))


cdef class IovaStateCore:
    """The core half of :class:`pydmabuf.IovaState`: the reservation and
    its link/sync/unlink/destroy walks.  Users make an IovaState."""

    # Fields and cdef methods: declared in pydmabuf/_core_dma.pxd.

    def __dealloc__(self):
        free(self.win)
        self.win = NULL

    def __del__(self):
        # A leaked reservation: the kernel would keep the IOVA forever.
        if self._live:
            _warnings.warn(f"{self!r} collected with its IOVA still reserved", ResourceWarning, stacklevel=2)

    # ------------------------------------------------ the linked windows

    cdef int _win_room(self, Py_ssize_t n) except -1:
        cdef uint64_t *w
        cdef Py_ssize_t cap
        if n <= self.capwin:
            return 0
        cap = self.capwin * 2 if self.capwin else 4
        if cap < n:
            cap = n
        w = <uint64_t *>realloc(self.win, <size_t>cap * 2 * sizeof(uint64_t))
        if w == NULL:
            raise MemoryError("IovaState: no memory for the record of linked windows")
        self.win = w
        self.capwin = cap
        return 0

    cdef int _win_mark(self, uint64_t lo, uint64_t hi) except -1:
        """Record [lo, hi) as linked: every window touching or overlapping
        it is merged into it (the windows stay sorted by (start, end))."""
        cdef Py_ssize_t i, k = 0, at
        cdef uint64_t s, e
        self._win_room(self.nwin + 1)
        for i in range(self.nwin):
            s = self.win[2 * i]
            e = self.win[2 * i + 1]
            if e < lo or s > hi:
                self.win[2 * k] = s
                self.win[2 * k + 1] = e
                k += 1
            else:
                if s < lo:
                    lo = s
                if e > hi:
                    hi = e
        at = k
        while at > 0 and (self.win[2 * (at - 1)] > lo or
                          (self.win[2 * (at - 1)] == lo and self.win[2 * (at - 1) + 1] > hi)):
            at -= 1
        if at < k:
            memmove(&self.win[2 * (at + 1)], &self.win[2 * at], <size_t>(k - at) * 2 * sizeof(uint64_t))
        self.win[2 * at] = lo
        self.win[2 * at + 1] = hi
        self.nwin = k + 1
        return 0

    cdef uint64_t _win_covered(self, uint64_t lo, uint64_t hi) noexcept:
        """Bytes of [lo, hi) that are linked."""
        cdef Py_ssize_t i
        cdef uint64_t s, e, total = 0
        for i in range(self.nwin):
            s = self.win[2 * i] if self.win[2 * i] > lo else lo
            e = self.win[2 * i + 1] if self.win[2 * i + 1] < hi else hi
            if e > s:
                total += e - s
        return total

    cdef int _win_cut(self, uint64_t lo, uint64_t hi) except -1:
        """Take [lo, hi) out of the windows (a window may split in two)."""
        cdef Py_ssize_t i, k = 0, n = self.nwin
        cdef uint64_t s, e
        cdef uint64_t *old
        self._win_room(n + 1)
        # Work from a copy: a split window writes two entries.
        old = <uint64_t *>malloc(<size_t>(n if n else 1) * 2 * sizeof(uint64_t))
        if old == NULL:
            raise MemoryError("IovaState: no memory for the record of linked windows")
        memcpy(old, self.win, <size_t>n * 2 * sizeof(uint64_t))
        for i in range(n):
            s = old[2 * i]
            e = old[2 * i + 1]
            if s < lo:
                self.win[2 * k] = s
                self.win[2 * k + 1] = e if e < lo else lo
                k += 1
            if e > hi:
                self.win[2 * k] = s if s > hi else hi
                self.win[2 * k + 1] = e
                k += 1
        free(old)
        self.nwin = k
        return 0

    cdef uint64_t _win_total(self) noexcept:
        cdef Py_ssize_t i
        cdef uint64_t total = 0
        for i in range(self.nwin):
            total += self.win[2 * i + 1] - self.win[2 * i]
        return total

    @property
    def linked_nbytes(self):
        """Bytes linked now."""
        return self._win_total()

    @property
    def _linked(self):
        """The linked windows as a list of ``(start, end)`` offsets (a copy)."""
        return [(self.win[2 * i], self.win[2 * i + 1]) for i in range(self.nwin)]

    def _mark(self, offset, nbytes):
        """Record ``[offset, +nbytes)`` as linked, merged with touching parts."""
        self._win_mark(offset, <uint64_t>offset + <uint64_t>nbytes)

    def _covered(self, lo, hi):
        """Bytes of ``[lo, hi)`` that are linked."""
        return self._win_covered(lo, hi)

    def _cut(self, lo, hi):
        """Forget ``[lo, hi)`` (unlinked)."""
        self._win_cut(lo, hi)

    # ------------------------------------------------ state and checks

    @property
    def uses_iova(self):
        """``dma_use_iova()``."""
        return self.size != 0

    @property
    def live(self):
        return self._live

    cpdef object _need(self, str what):
        """The domain, for a call that needs a live reservation."""
        # uses_iova implies a domain: try_alloc reserved the IOVA in it.
        if self._dom is None or self.size == 0:
            raise _errors.NotSupported(f"IovaState.{what}: the state does not use IOVA (use dma_map_phys)")
        if not self._live:
            raise _errors.LifetimeError(f"IovaState.{what}: the state was destroyed or freed")
        return self._dom

    cpdef tuple _check_window(self, str what, object offset, object nbytes):
        """``(offset, nbytes)`` as plain ints, checked to lie inside the
        reservation; the caller goes on with these."""
        if not isinstance(offset, int) or not isinstance(nbytes, int):
            raise TypeError("offset and nbytes must be ints")
        offset = _plain_int(offset)
        nbytes = _plain_int(nbytes)
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.size:
            raise _errors.InvalidArgument(f"IovaState.{what}: [{offset:#x}, +{nbytes:#x}) is outside the "
                                          f"{self.size:#x}-byte reservation")
        return offset, nbytes

    # ------------------------------------------------ the calls

    def _reserve(self, object phys, object nbytes, object dma_limit, bint prefer32, uint32_t ncpus=1):
        """The reservation of ``dma_iova_try_alloc()`` (``iommu_dma_alloc_iova()``
        through CPU 0's caches, as ``IommuDomain.alloc_iova_pci``).  Returns
        the device's 32-bit preference after the call, or None when there is
        no IOVA (the state then does not use IOVA).  ``ncpus``: the IOMMU's
        CPUs, among which :meth:`_destroy` picks the calling thread's."""
        cdef IommuDomain dom = <IommuDomain?>self._dom
        cdef iommu_domain *d = _dom_of(dom)
        cdef uint64_t p = _u64(phys, "phys")
        cdef uint64_t n = _u64(nbytes, "nbytes")
        cdef uint64_t lim = _u64(dma_limit, "dma_limit")
        cdef uint64_t o = p & (PDB_PAGE_SIZE - 1)
        cdef uint64_t span = (n + o + PDB_PAGE_SIZE - 1) & ~(<uint64_t>PDB_PAGE_SIZE - 1)
        cdef uint64_t iova = 0
        cdef bint p32 = prefer32
        cdef int rc
        if ncpus == 0:
            raise ValueError("dma_iova_try_alloc: the IOMMU has no CPUs")
        _acquire(dom.lock)
        rc = iommu_dma_alloc_iova(d, span, lim, &p32, 0, &iova)
        _release(dom.lock)
        if prefer32 and not p32:
            _log.info("IOMMU domain: Using %d-bit DMA addresses", _fls64(min(lim, d.aperture_end)))
        if rc == -ENOMEM:
            return None
        _check(rc, lambda: f"alloc_iova: no {span:#x}-byte IOVA range at or below {lim:#x}")
        self.addr = iova + o
        self.size = n
        self._offset = o
        self._reserved = span
        self._ncpus = ncpus
        self._live = True
        return p32

    def _link(self, ranges, uint32_t prot, object offset, bint all_at_offset):
        """``link_ranges`` for a device that does not bounce: parse, check
        the offset, link in one core call, record the window."""
        return self.link(ranges, prot, offset, all_at_offset)

    cdef object link(self, object ranges, uint32_t prot, object offset, bint all_at_offset):
        cdef Py_buffer view
        cdef const uint64_t[::1] flat
        if _fast_pairs(ranges, &view):
            try:
                return self._link_pairs(<const uint64_t *>view.buf, <uint64_t>view.shape[0], prot, offset,
                                        all_at_offset)
            finally:
                PyBuffer_Release(&view)
        flat = _pairs_view(ranges, "dma_iova_link ranges")
        if flat.shape[0] == 0:
            return 0
        return self._link_pairs(&flat[0], flat.shape[0] // 2, prot, offset, all_at_offset)

    cdef object _link_pairs(self, const uint64_t *pairs, uint64_t n, uint32_t prot, object offset,
                            bint all_at_offset):
        cdef IommuDomain dom
        cdef iommu_domain *d
        cdef uint64_t off, bad = 0
        cdef int64_t rc
        if n == 0:
            return 0
        if not isinstance(offset, int):
            raise TypeError(f"dma_iova_link: offset must be an int, not {type(offset).__name__}")
        offset = _plain_int(offset)
        if offset < 0 or offset >= self.size:
            raise _errors.InvalidArgument(f"IovaState.link: offset {offset!r} is outside the {self.size:#x}-byte "
                                          "reservation")
        off = offset
        dom = <IommuDomain?>self._dom
        d = _dom_of(dom)
        _acquire(dom.lock)
        if n > 256:             # releasing the GIL costs more than a short link
            with nogil:
                rc = dma_iova_link_ranges(d, self.addr, off, pairs, n, prot, all_at_offset, self.size - off, &bad)
        else:
            rc = dma_iova_link_ranges(d, self.addr, off, pairs, n, prot, all_at_offset, self.size - off, &bad)
        _release(dom.lock)
        if rc < 0:
            _raise_link_error(rc, bad, pairs, off)
        self._win_mark(off, off + (pairs[1] if all_at_offset else <uint64_t>rc))
        return rc

    def sync(self, offset=0, nbytes=None):
        """``dma_iova_sync()``: one ``iotlb_sync_map`` for the linked span.

        Examples
        --------
        >>> from pydmabuf import DmaDirection, IovaState, Machine
        >>> m = Machine.default()
        >>> gpu = m.device("gpu0")
        >>> st = IovaState.try_alloc(gpu, 0, 4096)
        >>> n = st.link_ranges([[0x100000000, 0x1000]], DmaDirection.TO_DEVICE)
        >>> st.sync(0, n)                       # one IOTLB sync for everything linked
        >>> m.memory.write(0x100000000, b"ok")
        >>> gpu.dma_read(st.addr, 2)
        b'ok'
        >>> st.destroy(n, DmaDirection.TO_DEVICE)
        """
        cdef IommuDomain dom = <IommuDomain?>self._need("sync")
        cdef iommu_domain *d = _dom_of(dom)
        if nbytes is None:
            nbytes = self.size - offset
        offset, nbytes = self._check_window("sync", offset, nbytes)
        cdef uint64_t start = (self.addr + <uint64_t>offset) & ~(<uint64_t>PDB_PAGE_SIZE - 1)
        cdef uint64_t end = (self.addr + <uint64_t>offset + <uint64_t>nbytes + PDB_PAGE_SIZE - 1) \
            & ~(<uint64_t>PDB_PAGE_SIZE - 1)
        _acquire(dom.lock)
        iommu_sync_map(d, start, end - start)
        _release(dom.lock)

    def _destroy(self, object mapped_nbytes):
        """The checks and the unmap + free of ``dma_iova_destroy()``, through
        the calling thread's CPU; False when ``mapped_nbytes`` is 0 (the
        caller frees)."""
        return self.destroy_linked(mapped_nbytes)

    cdef bint destroy_linked(self, object mapped_nbytes) except -1:
        cdef uint64_t m, span
        if not isinstance(mapped_nbytes, int):
            raise TypeError(f"dma_iova_destroy: mapped_nbytes must be an int, not {type(mapped_nbytes).__name__}")
        mapped_nbytes = _plain_int(mapped_nbytes)
        if mapped_nbytes < 0 or mapped_nbytes > self.size:
            raise _errors.InvalidArgument(f"dma_iova_destroy: mapped_nbytes {mapped_nbytes!r} is not in "
                                          f"0..{self.size:#x}")
        m = mapped_nbytes
        if m == 0:
            return False
        if not (self.nwin == 1 and self.win[0] == 0 and self.win[1] == m):
            linked = [(s, e - s) for s, e in self._linked]
            raise _errors.LifetimeError(f"dma_iova_destroy: mapped_nbytes {m:#x} but linked {linked}")
        span = (m + self._offset + PDB_PAGE_SIZE - 1) & ~(<uint64_t>PDB_PAGE_SIZE - 1)
        iova_destroy_span(<IommuDomain?>self._dom, self.addr - self._offset, span, self._reserved,
                          pdb_thread_cpu(self._ncpus))
        self.nwin = 0
        return True


# The name the Python layer used before it was made public (issue 13).
