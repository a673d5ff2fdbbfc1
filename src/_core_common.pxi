# Shared machinery of the core: the errno bridge, object locks, and the
# buffer object the core hands its bulk outputs out in.

# ------------------------------------------------------------------ errors

cdef object _check(int64_t rc, what):
    """The one bridge from a kernel's return code to an exception.

    Returns ``rc`` when it is >= 0, raises the :mod:`pydmabuf.errors` class
    for ``-rc`` otherwise, with ``what`` (a string, or a callable producing
    one) as the message.
    """
    if rc >= 0:
        return rc
    if callable(what):
        what = what()
    raise _errors.from_errno(-rc, what)


# Object locks (_new_lock, _acquire, _release): pydmabuf/_core_base.pxd

# --------------------------------------------------------- integer parsing

cdef uint64_t _u64(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    """A Python int in [0, 2**64 - 1], or a clear exception."""
    if not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if value < 0:
        raise _errors.InvalidArgument(f"{name} must not be negative (got {value})")
    if value > _U64_MAX:
        raise _errors.Overflow(f"{name} does not fit in 64 bits (got {value:#x})")
    return <uint64_t>value


cdef int _window(object start, object nbytes, str what, uint64_t *first,
                 uint64_t *last) except -1:
    """(start, nbytes) at the Python surface -> inclusive [first, last]."""
    cdef uint64_t s = _u64(start, "start")
    if not isinstance(nbytes, int):
        try:
            nbytes = nbytes.__index__()
        except AttributeError:
            raise TypeError(f"nbytes must be an integer, not {type(nbytes).__name__}") from None
    if nbytes <= 0:
        raise _errors.InvalidArgument(f"{what}: nbytes must be positive (got {nbytes})")
    if s + nbytes - 1 > _U64_MAX:
        raise _errors.Overflow(
            f"{what}: [{s:#x}, +{nbytes:#x}) runs past 2**64 - 1")
    first[0] = s
    last[0] = <uint64_t>(s + nbytes - 1)
    return 0


# ------------------------------------------------------------------ buffers

cdef class _Buffer:
    """Memory the core hands out: C-contiguous, 1 or 2 dimensions.

    Owned by this object (freed with it) unless ``base`` keeps another
    owner alive.  ``numpy.asarray(buf)`` views it without copying.
    """
    # Attributes: pydmabuf/_core_base.pxd

    def __cinit__(self):
        self.data = NULL
        self.owns = False

    def __init__(self):
        raise TypeError("_Buffer objects are made by the core only")

    def __dealloc__(self):
        if self.owns and self.data != NULL:
            free(self.data)
        self.data = NULL

    def __getbuffer__(self, Py_buffer *view, int flags):
        if (flags & PyBUF_WRITABLE) and self.readonly:
            raise BufferError("this buffer is read-only")
        view.buf = <void *>self.data
        view.obj = self
        view.len = self.shape[0] * self.strides[0]
        view.readonly = self.readonly
        view.itemsize = self.itemsize
        view.format = <char *>self.fmt if (flags & PyBUF_FORMAT) else NULL
        view.ndim = self.ndim
        view.shape = self.shape if (flags & PyBUF_ND) else NULL
        view.strides = self.strides if (flags & PyBUF_STRIDES) else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.shape[0]


cdef _Buffer _new_buffer(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t itemsize,
                         bytes fmt, bint readonly=False):
    """A zeroed owning buffer of ``rows`` x ``cols`` items (cols 0 = 1-D).

    A size that is negative or does not fit in Py_ssize_t bytes (a u64
    count cast by the caller), or memory the C allocator refuses, raises
    :class:`~pydmabuf.errors.OutOfMemory` (ENOMEM, as kmalloc would)."""
    cdef _Buffer b
    cdef size_t width = <size_t>(cols if cols > 0 else 1)
    cdef size_t n
    if rows < 0 or cols < 0 or itemsize <= 0 or \
            <size_t>rows > <size_t>PY_SSIZE_T_MAX // width // <size_t>itemsize:
        # Name the count the caller had: a negative rows is a u64 cast.
        raise _errors.OutOfMemory(f"cannot allocate {<uint64_t>rows} x {width} items of {itemsize} bytes: "
                                  "the size does not fit in memory")
    n = <size_t>rows * width * <size_t>itemsize
    b = _Buffer.__new__(_Buffer)
    b.data = <char *>calloc(n if n > 0 else 1, 1)
    if b.data == NULL:
        raise _errors.OutOfMemory(f"cannot allocate {n} bytes")
    b.owns = True
    b.itemsize = itemsize
    b.fmt = fmt
    b.readonly = readonly
    if cols > 0:
        b.ndim = 2
        b.shape[0] = rows
        b.shape[1] = cols
        b.strides[0] = cols * itemsize
        b.strides[1] = itemsize
    else:
        b.ndim = 1
        b.shape[0] = rows
        b.shape[1] = 0
        b.strides[0] = itemsize
        b.strides[1] = 0
    return b


# --------------------------------------------------- u64 buffer arguments
#
# Every argument that must be a buffer of u64 (PFNs, addresses, lengths) or
# of (address, nbytes) u64 pairs is parsed here, once, into a _U64Arg: a
# held, validated view of the caller's buffer.  The format and item size
# are checked by this code before any typed memoryview is taken (Cython's
# own format parser must never see a caller's format: it has crashed on
# structured formats), and the caller's buffer stays exported, so nobody
# can resize or free it, for as long as the _U64Arg lives -- which is the
# whole call, since the typed memoryview the entry point takes of it keeps
# it alive.

cdef bytes _U64_FMT = b"Q"
cdef uint64_t _u64_empty = 0
#: The byte-order prefix that means native order with standard sizes here.
cdef bytes _NATIVE_STD = b"<" if _sys.byteorder == "little" else b">"


cdef class _U64Arg:
    """A caller's buffer of u64, validated and held (see above).

    Exports itself as a read-only, C-contiguous 1-D buffer of ``n`` items of
    format ``Q``; the caller's buffer is released when this object dies.
    """
    # Attributes: pydmabuf/_core_base.pxd

    def __cinit__(self):
        self.held = False
        self.data = &_u64_empty
        self.n = 0

    def __init__(self):
        raise TypeError("_U64Arg objects are made by the core only")

    def __dealloc__(self):
        if self.held:
            self.held = False
            PyBuffer_Release(&self.src)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a u64 argument is read-only")
        self.shape[0] = self.n
        self.strides[0] = 8
        view.buf = <void *>self.data
        view.obj = self
        view.len = self.n * 8
        view.readonly = 1
        view.itemsize = 8
        view.format = <char *>_U64_FMT if (flags & PyBUF_FORMAT) else NULL
        view.ndim = 1
        view.shape = self.shape if (flags & PyBUF_ND) else NULL
        view.strides = self.strides if (flags & PyBUF_STRIDES) else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.n


cdef bint _is_u64_format(const char *fmt, Py_ssize_t itemsize) noexcept:
    """True for a PEP 3118 format of one unsigned 8-byte integer in native
    byte order: ``Q`` or ``L`` (the C type ``unsigned long`` is 8 bytes on
    LP64), optionally after ``@``, ``=`` or the native order's ``<``/``>``.
    Anything else -- structured (``T{...}``), repeated (``2Q``), signed,
    floating, other sizes, the other byte order -- is refused."""
    cdef const char *f = fmt
    if itemsize != 8:
        return False
    if f == NULL:       # no format means bytes ("B")
        return False
    if f[0] == b'@' or f[0] == b'=' or f[0] == (<const char *>_NATIVE_STD)[0]:
        f += 1
    return (f[0] == b'Q' or f[0] == b'L') and f[1] == 0


cdef _U64Arg _hold_u64(object obj, str name, str what, bint pairs):
    """Export ``obj``, check it is ``what`` and hold it in a _U64Arg.

    ``pairs``: accept (N, 2) rows or an even-length 1-D buffer (the flat
    rows); else exactly 1-D.  TypeError for an object without the buffer
    protocol; ValueError for the wrong format, item size, shape or layout;
    a ``BufferError`` from the exporter passes through.
    """
    cdef _U64Arg a = _U64Arg.__new__(_U64Arg)
    cdef Py_buffer *v = &a.src
    cdef bytes fmt
    try:
        PyObject_GetBuffer(obj, v, PyBUF_FULL_RO)
    except (ValueError, TypeError, BufferError) as e:
        raise type(e)(f"{name} must be {what}: {e}") from None
    a.held = True
    if not _is_u64_format(v.format, v.itemsize):
        fmt = v.format if v.format != NULL else b"B"
        raise ValueError(f"{name} must be {what}, not a buffer of format "
                         f"{fmt.decode('ascii', 'replace')!r} with {v.itemsize}-byte items")
    if v.suboffsets != NULL or not PyBuffer_IsContiguous(v, b'C'):
        raise ValueError(f"{name} must be {what}: the buffer is not C-contiguous")
    if pairs:
        if v.ndim == 2:
            if v.shape[1] != 2:
                raise ValueError(f"{name} must have 2 columns, not {v.shape[1]}")
        elif v.ndim == 1:
            if v.shape[0] % 2:
                raise ValueError(f"{name} must hold (address, nbytes) pairs: odd length {v.shape[0]}")
        else:
            raise ValueError(f"{name} must be {what}, not {v.ndim}-dimensional")
    elif v.ndim != 1:
        raise ValueError(f"{name} must be {what}, not {v.ndim}-dimensional")
    a.n = v.len // 8
    if a.n > 0:
        a.data = <const uint64_t *>v.buf
    return a


cdef object _as_u64_view(object obj, str name):
    """The caller's buffer of u64 as a held, validated :class:`_U64Arg`.

    Accepts C-contiguous 1-D buffers of unsigned 64-bit integers in native
    order (NumPy ``uint64``, ``array.array('Q')``, memoryviews cast to
    ``'Q'``, read-only ones too); lists and tuples of ints are converted (a
    copy, owned by the result).  Assign the result to a
    ``const uint64_t[::1]`` local: the local keeps the caller's buffer
    exported until the call returns.
    """
    cdef _U64Arg a
    what = "a C-contiguous 1-D buffer of unsigned 64-bit integers"
    if obj is None:     # a typed memoryview would take None as empty
        raise TypeError(f"{name} must be {what}, not None")
    if isinstance(obj, (list, tuple)):
        conv = _ints_to_u64(obj, name)
        if conv.ndim != 1:
            raise ValueError(f"{name} must be a flat sequence of integers, not shape {conv.shape}")
        a = _hold_u64(conv, name, what, False)
        a.owned = conv
        return a
    return _hold_u64(obj, name, what, False)


cdef object _pairs_view(object pairs, str name):
    """The caller's (N, 2) buffer of (address, nbytes) u64 rows (or its flat
    even-length form) as a held, validated :class:`_U64Arg` of 2N items.

    Same rules as :func:`_as_u64_view`; lists of pairs are converted."""
    cdef _U64Arg a
    what = "a C-contiguous (N, 2) buffer of u64"
    if pairs is None:   # a typed memoryview would take None as empty
        raise TypeError(f"{name} must be {what}, not None")
    if isinstance(pairs, (list, tuple)):
        conv = _ints_to_u64(pairs, name)
        if (conv.ndim != 2 or conv.shape[1] != 2) and conv.size != 0:
            raise ValueError(f"{name} must be (N, 2) rows of (address, nbytes), not shape {conv.shape}")
        a = _hold_u64(conv.reshape(-1), name, what, True)
        a.owned = conv
        return a
    return _hold_u64(pairs, name, what, True)


cdef object _small_ints_to_u64(object seq):
    """The fast path of :func:`_ints_to_u64` for short lists of ints or of
    equal-length rows of ints, all in range; None for anything else (the
    general path then converts it or raises the right error)."""
    cdef Py_ssize_t n = len(seq), w = 0, i, j
    cdef uint64_t[::1] v
    first = seq[0]
    if type(first) is not int:
        if type(first) is not list and type(first) is not tuple:
            return None
        w = len(first)
        if w == 0:
            return None
    np = _np()
    if w == 0:
        out = np.empty(n, dtype=np.uint64)
    else:
        out = np.empty((n, w), dtype=np.uint64)
    v = out.reshape(-1)
    for i in range(n):
        x = seq[i]
        if w == 0:
            if type(x) is not int or x < 0 or x > 0xFFFFFFFFFFFFFFFF:
                return None
            v[i] = <uint64_t>x
        else:
            if (type(x) is not list and type(x) is not tuple) or len(x) != w:
                return None
            for j in range(w):
                y = x[j]
                if type(y) is not int or y < 0 or y > 0xFFFFFFFFFFFFFFFF:
                    return None
                v[i * w + j] = <uint64_t>y
    return out


cdef object _ints_to_u64(object seq, str name):
    """A list or tuple of ints as a NumPy u64 array (a copy), strictly."""
    np = _np()
    if len(seq) == 0:
        return np.zeros(0, dtype=np.uint64)
    if len(seq) <= 1024:
        fast = _small_ints_to_u64(seq)
        if fast is not None:
            return fast
    try:
        a = np.asarray(seq)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: not a rectangular sequence of integers: {e}") from None
    kind = a.dtype.kind
    if kind == "u":
        return np.ascontiguousarray(a, dtype=np.uint64)
    if kind == "i":
        if (a < 0).any():
            raise _errors.InvalidArgument(f"{name}: values must not be negative")
        return np.ascontiguousarray(a, dtype=np.uint64)
    if kind in "fO":
        # Either not integers, or ints NumPy could not hold in one integer
        # dtype (a mix of values above 2**63 and below 0 or small ones).
        flat = np.asarray(seq, dtype=object).ravel().tolist()
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
            raise TypeError(f"{name} must hold integers")
        try:
            return np.ascontiguousarray(np.array(seq, dtype=np.uint64))
        except OverflowError:
            raise _errors.InvalidArgument(f"{name}: every value must be in [0, 2**64 - 1]") from None
    raise TypeError(f"{name} must hold integers, not {a.dtype}")
