# cython: language_level=3
"""pydmabuf._dmabuf_api: the dma-buf attachment's state and per-call
paths, compiled.

:class:`AttachmentCore` holds the fields of ``struct dma_buf_attachment``
(:class:`pydmabuf.dmabuf.Attachment` is its one Python subclass, through
:class:`pydmabuf.dmabuf_ops.AttachmentBase`), and :class:`_Mapping` the
checker's record of one table handed to an importer;
:class:`MatchCore` the fields of ``struct dma_buf_mapping_match``
(:class:`pydmabuf.dma_buf_mapping.MappingMatch`).  The functions are the
entry points, with their documentation: the Python classes bind them as
their methods (``DmaBuf.attach = dmabuf_attach``), so no Python frame of
the package stands between the caller and the work:

* :func:`dmabuf_attach` (``DmaBuf.attach``), :func:`sgt_attach` (called
  by ``DmaBuf.dynamic_attach``), :func:`attach` (by
  ``DmaBuf.mapping_attach``), :func:`dmabuf_detach` (``DmaBuf.detach``):
  ``dma_buf_mapping_attach()``, its SGT wrappers, ``dma_buf_detach()``;
* :func:`map_attachment` / :func:`unmap_attachment` and their ``_unlocked``
  forms (``Attachment.map`` ...): ``dma_buf_map_attachment()`` and
  friends;
* :func:`buf_alive` / :func:`buf_released`: the buffer base class's
  ``_alive`` check and ``released`` property, which these paths read
  without a call while the buffer's class keeps them;
* :func:`track` / :func:`untrack`: the checker's record of what an
  importer holds (a table, a PAL list, DMA addresses it mapped itself),
  kept per attachment, per buffer and per device (:func:`live_maps`, read
  by the access gate and the IOTLB).

The mapping-type negotiation is here too: ``dma_buf_match_mapping()``'s
loop (:func:`match_mapping`, :func:`exporter_matches`), the built-in SGT
type's ``match`` / ``finish_match``, the entry builders and
``dma_buf_sgt_dma_device()``.

This is the one home of these paths: there is no second, Python
implementation.  What stays Python is what a user or a driver provides
(the exporter's and the importer's callbacks, a driver's own mapping
types, an exporter's ``match_mapping``, a reservation object subclass's
methods), the checker's reports and the error messages' text, all called
from here as before and in the same order.

The module sits at the dma-buf layer (docs/layers.md).  The Python modules
above it that it calls import it, so they hand themselves over once:
:mod:`pydmabuf.dma_buf_mapping` (:func:`bind_matcher`),
:mod:`pydmabuf.mapping` (:func:`bind_types`) and
:mod:`pydmabuf.dmabuf_attach` (:func:`bind`).

Where the user made an attachment or a mapping (``created_at``): as
:func:`pydmabuf.checks.created_at` says, the first frame outside the
package (the bundled scenarios count as user code), found from here by
walking up from the innermost Python frame (these functions make none).
The frame's code and last instruction are kept; the line and the
``file:line`` text are made when first read.
"""

from cpython.method cimport PyMethod_GET_FUNCTION, PyMethod_GET_SELF
from cpython.object cimport PyObject_GenericSetAttr
from cpython.ref cimport PyObject, Py_DECREF
from cpython.weakref cimport PyWeakref_NewRef
from pydmabuf._core_dma cimport SgTable
from pydmabuf._core_fence cimport Resv
from pydmabuf._core_ww cimport WwMutex, _ww_held, _ww_lock_plain

import threading
import types
import weakref

import numpy as _np

from pydmabuf import checks as _checks
from pydmabuf._lifecycle import Owner as _Owner
from pydmabuf import errors as _errors
from pydmabuf._args import _DIRS as _dirs_cache
from pydmabuf._args import _dir as _py_dir
from pydmabuf._core_dma import ranges_touch as _ranges_touch
from pydmabuf._core_dma import u64_pairs as _u64_pairs
from pydmabuf._types import DmaDirection as _DmaDirection
from pydmabuf._types import Usage as _Usage

__all__ = ["AttachmentCore", "MatchCore", "bind", "bind_matcher", "bind_types", "match_of", "match_args_of", "sgt_importer",
           "sgt_match", "sgt_finish_match", "match_mapping", "exporter_matches", "sgt_dma_device", "attach",
           "sgt_attach", "dmabuf_attach", "dmabuf_detach", "buf_alive", "buf_released", "map_attachment", "map_unlocked", "unmap_attachment", "unmap_unlocked", "track",
           "untrack", "table_map", "live_maps"]

# The parsed directions (a dict look-up in C), filled by pydmabuf._args.
cdef dict _DIRS = _dirs_cache
cdef object _KERNEL = _Usage.KERNEL
_BIDI = _DmaDirection.BIDIRECTIONAL
# checks.created_at's record of which files are user code, and its look-up
# for a file not seen yet (one home for that rule).
cdef dict _FILE_KIND = _checks._FILE_KIND
cdef object _user_file = _checks._user_file
cdef type _WeakRef = weakref.ReferenceType
cdef type _MethodType = types.MethodType
cdef bytes _NO_ROWS = b""
cdef tuple _EMPTY = ()
cdef object _MISSING = object()
cdef object _NotSupported = _errors.NotSupported
cdef object _InvalidArgument = _errors.InvalidArgument


cdef extern from "Python.h":
    ctypedef struct PyFrameObject:
        pass
    PyFrameObject *PyEval_GetFrame()
    PyObject *PyFrame_GetBack(PyFrameObject *frame)
    object PyFrame_GetCode(PyFrameObject *frame)
    int PyFrame_GetLineNumber(PyFrameObject *frame)
    int PyFrame_GetLasti(PyFrameObject *frame)
    ctypedef struct PyCodeObject:
        PyObject *co_filename
    int PyCode_Addr2Line(PyCodeObject *co, int addr)
    object PyObject_GenericGetDict(object o, void *context)
    int PyObject_GenericSetDict(object o, object d, void *context) except -1
    ctypedef object (*newfunc)(PyTypeObject *, PyObject *, PyObject *)
    ctypedef PyObject *(*getattrofunc)(PyObject *, PyObject *)
    PyObject *PyObject_GenericGetAttr(PyObject *o, PyObject *name)
    ctypedef struct PyTypeObject:
        PyObject *tp_dict
        newfunc tp_new
        getattrofunc tp_getattro
        unsigned int tp_version_tag


cdef class _Site:
    """Where the user's code was, for ``created_at``: a file's base name and
    the frame's code and last instruction, the line found from them and
    the text formatted when first read."""
    cdef object name
    cdef object code  # None once the text is made
    cdef int lasti
    cdef object text

    def __str__(self):
        cdef int line
        if self.text is None:
            # The line the frame was at (PyFrame_GetLineNumber's answer
            # outside a trace function): -1 where the code has no location
            # (f_lineno None).
            line = PyCode_Addr2Line(<PyCodeObject *>self.code, self.lasti) if self.code is not None else 0
            self.text = f"{self.name}:{line if line >= 0 else None}"
            self.code = None
        return self.text


cdef object _user_site():
    """``checks.created_at()`` from compiled code: the first frame outside
    the package, as a _Site, or "?" when there is none."""
    cdef PyFrameObject *f = PyEval_GetFrame()
    cdef PyObject *back
    cdef _Site site
    if f == NULL:
        return "?"
    frame = <object><PyObject *>f  # a reference of our own while walking
    while True:
        code = PyFrame_GetCode(<PyFrameObject *>frame)
        fn = <object>(<PyCodeObject *>code).co_filename
        name = _FILE_KIND[fn] if fn in _FILE_KIND else _user_file(fn)
        if name is not None:
            site = _Site.__new__(_Site)
            site.name = name
            site.lasti = PyFrame_GetLasti(<PyFrameObject *>frame)
            if site.lasti < 0:  # not started: its line now
                site.text = f"{name}:{PyFrame_GetLineNumber(<PyFrameObject *>frame)}"
            else:
                site.code = code
            return site
        back = PyFrame_GetBack(<PyFrameObject *>frame)
        if back == NULL:
            return "?"
        frame = <object>back
        Py_DECREF(frame)  # PyFrame_GetBack's reference: ``frame`` holds one


cdef inline object _site_text(object site):
    if site is None:
        raise AttributeError("created_at")  # deleted
    return site if isinstance(site, str) else str(site)


cdef inline object _site_value(object value):
    """A ``created_at`` written from Python: any str (None is a delete)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"created_at must be a str, not {type(value).__name__}")
    return value


cdef class _Sited:
    """What the checker made where the user's code was (an attachment, a
    mapping): ``created_at``."""

    # A _Site until read, then its text ("?": no user frame; None: deleted).
    cdef object _site

    def __cinit__(self):
        self._site = "?"

    @property
    def created_at(self):
        """Where the user made it (``file:line``; ``?`` when no frame of the
        stack was the user's)."""
        s = self._site = _site_text(self._site)
        return s

    @created_at.setter
    def created_at(self, value):
        self._site = _site_value(value)

    @created_at.deleter
    def created_at(self):
        self._site = None


cdef class MatchCore:
    """The C base of :class:`pydmabuf.dma_buf_mapping.MappingMatch`
    (``struct dma_buf_mapping_match``), which keeps the constructor, the
    documentation and, as plain instance attributes, everything an entry
    holds (``type``, ``exp_ops``, ``_data`` and the type's data).

    It adds no field; it is the entry's getattr slot: a name the entry
    does not have is looked up in its ``_data`` (an entry built without
    its constructor), then is an AttributeError naming the type.  Being a
    C slot, reading an entry's attributes, found or not, needs no
    Python-level ``__getattr__`` hook (CPython dispatches every read of a
    class with one through its slot machinery and, for a miss, a Python
    call)."""

    def __getattr__(self, name):
        # Only reached for names the entry does not have.  The instance's
        # dict is read directly (a look-up of __dict__ would come back
        # here for an object without one).
        try:
            d = PyObject_GenericGetDict(self, NULL)
        except AttributeError:
            d = {}
        data = d.get("_data", {})
        try:
            return data[name]
        except KeyError:
            # Not self.type: an entry built without __init__ would come
            # back here.
            t = d.get("type")
            raise AttributeError(f"{getattr(t, 'name', 'mapping')} entry has no {name!r}") from None

    def __reduce_ex__(self, protocol):
        # copy and pickle as for a plain object (state: the instance's
        # dict and slots), with protocol 2's reduce for 0 and 1 too:
        # copyreg's older one cannot make an object of a C base class.
        return object.__reduce_ex__(self, protocol if protocol >= 2 else 2)


cdef newfunc _MATCH_NEW = (<PyTypeObject *>MatchCore).tp_new


# Bound by bind_matcher() (pydmabuf.dma_buf_mapping), bind_types()
# (pydmabuf.mapping) and bind() (pydmabuf.dmabuf_attach): the Python layer
# above this module.
cdef object _p2p_no_device = None   # mapping._warn_p2p_without_device (its logger, its file)
cdef object _MappingMatch = None    # dma_buf_mapping.MappingMatch
cdef object _MatchArgs = None       # dma_buf_mapping.MatchArgs
cdef object _match_result = None    # dma_buf_mapping._match_result
cdef object _SGT = None             # mapping.SGT
cdef object _SGT_CLS = None         # its class
cdef object _COMPAT_ENTRIES = None  # mapping._COMPAT_ENTRIES
cdef object _NO_P2P = None          # the SgtP2p members
cdef object _REQUIRES_P2P = None
cdef object _ACCEPTS_P2P = None
cdef object _Attachment = None      # pydmabuf.dmabuf_attach.Attachment
cdef object _Exporter = None        # pydmabuf.dmabuf_ops.Exporter
cdef object _HAS = None             # Exporter.has, Exporter.is_dynamic (their functions)
cdef object _IS_DYNAMIC = None
cdef object _Device = None          # pydmabuf.device.Device
cdef object _new_attachment = None  # Attachment.__new__
cdef bint _attachment_c_new = False  # ... which is AttachmentCore's


def bind_matcher(match_cls, args_cls, match_result):
    """Called by :mod:`pydmabuf.dma_buf_mapping` once it defines the
    matcher's structures."""
    global _MappingMatch, _MatchArgs, _match_result
    if not isinstance(match_cls, type) or not isinstance(args_cls, type) or not callable(match_result):
        raise TypeError("bind_matcher: two classes and a callable")
    if not issubclass(match_cls, MatchCore):
        raise TypeError("bind_matcher: the entry class must derive from MatchCore")
    # CPython gives a Python subclass of a class with ``__getattr__`` its
    # generic slot hook, which looks up ``__getattribute__`` and
    # ``__getattr__`` on every read and calls the latter through Python on
    # a miss; MatchCore's C slot already does both.  The entry class, when
    # it adds neither method, gets that slot back (its own subclasses, and
    # it after a later assignment of either, get the hook again, as
    # CPython would decide).
    if (match_cls.__bases__ == (MatchCore,) and "__getattr__" not in match_cls.__dict__
            and "__getattribute__" not in match_cls.__dict__):
        (<PyTypeObject *>match_cls).tp_getattro = (<PyTypeObject *>MatchCore).tp_getattro
    _MappingMatch, _MatchArgs, _match_result = match_cls, args_cls, match_result


def bind_types(sgt, compat_entries, no_p2p, requires_p2p, accepts_p2p, p2p_no_device):
    """Called by :mod:`pydmabuf.mapping` once it defines the built-in
    types: the SGT type, the compat entries, the SgtP2p members and the
    warning a P2P entry without a device logs."""
    global _SGT, _SGT_CLS, _COMPAT_ENTRIES, _NO_P2P, _REQUIRES_P2P, _ACCEPTS_P2P, _p2p_no_device
    if not callable(p2p_no_device):
        raise TypeError("bind_types: the warning must be callable")
    entries = tuple(compat_entries)
    _p2p_no_device = p2p_no_device
    _SGT, _COMPAT_ENTRIES, _SGT_CLS = sgt, entries, type(sgt)
    _NO_P2P, _REQUIRES_P2P, _ACCEPTS_P2P = no_p2p, requires_p2p, accepts_p2p


def bind(attachment_cls, device_cls, exporter_cls, buffer_cls):
    """Called once by :mod:`pydmabuf.dmabuf_attach`: the attachment class
    (derived from :class:`AttachmentCore`), the device class, the
    exporters' base class and the buffers' (whose ``released`` property
    is read through :func:`buf_released`)."""
    global _Attachment, _Device, _new_attachment, _attachment_c_new, _Exporter, _HAS, _IS_DYNAMIC
    global _EXP_ATTACH, _EXP_DETACH, _RELEASED_PROP
    if (not isinstance(attachment_cls, type) or not issubclass(attachment_cls, AttachmentCore)
            or not issubclass(attachment_cls, _Owner)):
        raise TypeError("bind: the attachment class must derive from AttachmentCore and the lifecycle's Owner")
    if not isinstance(device_cls, type) or not isinstance(exporter_cls, type) or not isinstance(buffer_cls, type):
        raise TypeError("bind: the device, exporter and buffer classes must be classes")
    new = attachment_cls.__new__
    c_new = new is AttachmentCore.__new__  # then _new() calls the C type's tp_new directly
    has = exporter_cls.has.__func__
    is_dynamic = exporter_cls.is_dynamic.__func__
    exp_attach = exporter_cls.__dict__["attach"]
    exp_detach = exporter_cls.__dict__["detach"]
    released = buffer_cls.__dict__["released"]
    if not isinstance(released, property) or released.fget is not _buf_released_fn:
        raise TypeError("bind: the buffer class's released must be property(buf_released)")
    # Nothing is rebound until everything was found.
    _Attachment, _Device, _new_attachment, _attachment_c_new = attachment_cls, device_cls, new, c_new
    _Exporter, _HAS, _IS_DYNAMIC = exporter_cls, has, is_dynamic
    _EXP_ATTACH, _EXP_DETACH, _RELEASED_PROP = exp_attach, exp_detach, released


# Answers about classes, remembered per class version: _has()'s by the
# built-in rule and _class_attr_is()'s.  A class's version tag changes
# whenever it or a base is modified (as in CPython's own method cache), so
# an entry of an older tag is stale.  No reference is held: a dead class's
# address and tag together cannot come back (tags are never reused).  A
# few (class, question) pairs are live at once; the table is searched
# whole and refilled round-robin.
cdef struct _ClassAnswer:
    void *cls
    unsigned int tag
    void *key   # the question: an interned str of this module, and its kind
    int kind
    bint result

cdef enum:
    _ANSWERS = 16
cdef _ClassAnswer _answers[_ANSWERS]
cdef int _answers_next = 0


cdef inline _ClassAnswer *_answer_of(object cls, object key, int kind):
    """The remembered answer, or NULL."""
    cdef unsigned int tag = (<PyTypeObject *>cls).tp_version_tag
    cdef int i
    if tag == 0 or type(cls) is not type:  # a metaclass may answer look-ups itself
        return NULL
    for i in range(_ANSWERS):
        if _answers[i].cls == <void *>cls and _answers[i].key == <void *>key and _answers[i].kind == kind:
            return &_answers[i] if _answers[i].tag == tag else NULL
    return NULL


cdef inline void _remember(object cls, object key, int kind, bint result):
    """Keep an answer for the class's version now (after the look-ups that
    gave the class one, if it can have one); none for a class of another
    metaclass than ``type``."""
    global _answers_next
    cdef int i, slot = -1
    if type(cls) is not type:
        return
    for i in range(_ANSWERS):
        if _answers[i].cls == <void *>cls and _answers[i].key == <void *>key and _answers[i].kind == kind:
            slot = i
            break
    if slot < 0:
        slot = _answers_next
        _answers_next = (_answers_next + 1) % _ANSWERS
    _answers[slot].cls = <void *>cls
    _answers[slot].tag = (<PyTypeObject *>cls).tp_version_tag
    _answers[slot].key = <void *>key
    _answers[slot].kind = kind
    _answers[slot].result = result


cdef bint _class_attr_is(object cls, str name, object value) except -1:
    """``getattr(cls, name) is value`` for a class (``value`` is one of this
    module's bound constants, fixed for the module's life)."""
    cdef _ClassAnswer *e = _answer_of(cls, name, 1)
    if e != NULL:
        return e.result
    result = getattr(cls, name, None) is value
    _remember(cls, name, 1, result)
    return result


cdef bint _has(object cls, str op) except -1:
    """``cls.has(op)``: does the exporter class provide ``op`` (override the
    base's)?  Asked in C unless a class overrides ``has`` itself."""
    cdef _ClassAnswer *e
    if isinstance(cls, type):
        e = _answer_of(cls, op, 0)
        if e != NULL:
            return e.result
    h = cls.has
    if getattr(h, "__func__", None) is _HAS and getattr(h, "__self__", None) is cls:
        result = getattr(cls, op) is not getattr(_Exporter, op)
        if isinstance(cls, type):
            _remember(cls, op, 0, result)
        return result
    return bool(h(op))


cdef bint _is_dynamic(object exp) except -1:
    """``exp.is_dynamic()`` (``dma_buf_is_dynamic()``: the exporter has
    ``pin``), asked in C unless the exporter overrides it."""
    f = exp.is_dynamic
    if type(f) is _MethodType:  # the usual bound classmethod: its parts read in C
        func = <object>PyMethod_GET_FUNCTION(f)
        cls = <object>PyMethod_GET_SELF(f)
    else:
        func = getattr(f, "__func__", None)
        cls = getattr(f, "__self__", None)
    # ``cls``: the class it is bound to (a delegating exporter's may be another's).
    if func is _IS_DYNAMIC and isinstance(cls, type):
        return _has(cls, "pin")
    return bool(f())


cdef inline bint _bound_to(object f, object func):
    """``f`` is a bound method of ``func`` (its parts read in C)."""
    return type(f) is _MethodType and PyMethod_GET_FUNCTION(f) == <PyObject *>func


# The buffer base class's accessors the paths here use, compiled (one
# home: pydmabuf.dmabuf_ops.DmaBufBase binds them), and the exporter base
# class's attach / detach, which do nothing (bound by bind()).
cdef object _EXP_ATTACH = None
cdef object _EXP_DETACH = None
cdef object _RELEASED_PROP = None  # DmaBufBase.released


def buf_alive(self, what):
    """The checker's use-after-release unless the buffer is alive
    (DmaBufBase._alive)."""
    _buf_alive(self, what)


cdef int _buf_alive(object buf, object what) except -1:
    if buf._released:
        _checker().lifetime("use-after-release", f"{what} on a released dma-buf", buf)
    return 0


def buf_released(self):
    """Released: the last reference was put (DmaBufBase.released)."""
    return self._released


cdef object _buf_alive_fn = buf_alive
cdef object _buf_released_fn = buf_released


cdef int _alive(object buf, str what) except -1:
    """``buf._alive(what)`` (a class's own is called)."""
    f = buf._alive
    if _bound_to(f, _buf_alive_fn):
        return _buf_alive(buf, what)
    f(what)
    return 0


cdef bint _released(object buf) except -1:
    """``buf.released`` (a class's own property, or attribute look-up, is
    asked)."""
    cls = type(buf)
    if (_RELEASED_PROP is not None and (<PyTypeObject *>cls).tp_getattro == PyObject_GenericGetAttr
            and _class_attr_is(cls, "released", _RELEASED_PROP)):
        return bool(buf._released)
    return bool(buf.released)


cdef int _exporter_op(object exp, str op, object base, object a) except -1:
    """``exp.attach(a)`` / ``exp.detach(a)``; the base class's (``base``),
    which does nothing, is not called."""
    f = getattr(exp, op)
    if _bound_to(f, base):
        return 0
    f(a)
    return 0


cdef inline object _direction(object direction):
    """``_args._dir``: a plain int or DmaDirection seen before is a dict
    hit; anything else takes the parser (which raises)."""
    cdef object d
    if type(direction) is int or type(direction) is _DmaDirection:
        d = _DIRS.get(direction)
        if d is not None:
            return d
    return _py_dir(direction)


# A buffer's reservation lock: the core's own calls for a plain Resv, the
# methods for a subclass (which may override them).
cdef inline bint _held(object resv) except -1:
    if type(resv) is Resv:
        return _ww_held(<WwMutex>resv)
    return bool(resv.held_by_current_thread())


cdef inline int _lock(object resv) except -1:
    if type(resv) is Resv:
        return _ww_lock_plain(<WwMutex>resv)
    resv.lock()
    return 0


cdef inline int _unlock(object resv) except -1:
    if type(resv) is Resv:
        return (<WwMutex>resv)._unlock()
    resv.unlock()
    return 0


cdef inline object _checker():
    # Read at each report: a test may swap the module's checker.
    return _checks.checker


# ------------------------------------------------------------ the fields
# (_MapRefs, a device's record of mappings, comes first: an attachment
# keeps its device's.)


cdef class _MapRefs(dict):
    """One device's record: id(mapping) -> weak reference."""

    cdef public Py_ssize_t sweep_at

    def __cinit__(self):
        self.sweep_at = 64

    def sweep(self):
        """Drop the dead references; called (under _maps_lock) when the dict
        has doubled since the last sweep, so it costs O(1) amortised."""
        for k in [k for k, r in self.items() if r() is None]:
            del self[k]
        self.sweep_at = max(64, 2 * len(self))


cdef class AttachmentCore(_Sited):
    """``struct dma_buf_attachment``'s fields (set by the attach) and the
    checks every attachment operation starts with.

    Attributes
    ----------
    dmabuf : DmaBuf
    device : Device or None
        The importing DMA device of an SGT attachment.
    map_type : MappingMatch or None
        The negotiated entry, fixed for the attachment's life.
    importer_ops, importer_priv
        The importer's (``importer_ops`` None: a static importer).
    peer2peer : bool
        The importer accepts peer-to-peer addresses (the negotiated SGT
        entry says so).
    priv
        The exporter's, opaque.
    pin_count, invalidations : int
    detached : bool
    created_at : str
        Where the user attached (``file:line``).
    """

    cdef public object dmabuf
    cdef public object device
    cdef public object map_type
    cdef public object importer_ops
    cdef public object importer_priv
    cdef public bint peer2peer
    cdef public object priv
    cdef public Py_ssize_t pin_count
    cdef public Py_ssize_t invalidations
    cdef public bint detached
    # On the buffer's list (the exporter accepted it).
    cdef public bint _listed
    # The live mappings (_Mapping records) this attachment holds (the set
    # itself is fixed: Python reads it, never replaces it).
    cdef readonly set _maps
    # The checker's record of the device's mappings, found at the first map.
    cdef public _MapRefs _dev_refs

    def __cinit__(self):
        self._maps = set()

    @property
    def dynamic(self):
        """``dma_buf_attachment_is_dynamic()``: has importer ops."""
        return self.importer_ops is not None

    @property
    def live_mappings(self):
        return len(self._maps)

    cdef bint usable(self, str what) except -1:
        if self.detached:
            _checker().lifetime("use-after-detach", f"{what} on a detached attachment", self)
            return False
        if _released(_buf(self)):
            _checker().lifetime("use-after-release", f"{what} on an attachment of a released dma-buf", self)
            return False
        return True

    cdef int require_resv(self, str what, object resv=None) except -1:
        """``resv``: the buffer's, when the caller has read it."""
        if not _held(_buf(self).resv if resv is None else resv):
            _checker().locking(f"{what}-without-resv", f"dma_buf_{what} without the reservation lock held", self)
        return 0

    def _usable(self, str what not None):
        """False (after the checker's report) on a detached attachment or
        one of a released buffer."""
        return self.usable(what)

    def _owns(self):
        """Still attached (the lifecycle's leak check): on the list, not
        detached, and its buffer not released (a release reported it)."""
        if not self._listed or self.detached:
            return False
        buf = self.dmabuf
        if buf is None:  # cleared by hand: nothing to tell (as a missing attribute was)
            raise AttributeError("the attachment's dmabuf was cleared")
        return not _released(buf)

    def __del__(self):
        # The lifecycle's leak check (pydmabuf._lifecycle.Owner.__del__,
        # which Attachment inherits after this class): asked in C whether
        # the attachment still owns anything, the common answer being no;
        # when it does, Owner.__del__ itself warns, as before.
        try:
            owns = self._owns()
        except AttributeError:  # half built (Owner.__del__ ignores it too)
            return
        if owns:
            _Owner.__del__(self)  # looked up now (it asks _owns() again)

    def _require_resv(self, str what not None):
        """The checker's ``<what>-without-resv`` unless this thread holds
        the buffer's reservation lock."""
        self.require_resv(what)


cdef inline object _buf(AttachmentCore a):
    """The attachment's buffer (TypeError for one never attached: made
    with ``__new__``, bypassing the attach)."""
    buf = a.dmabuf
    if buf is None:
        raise TypeError(f"{type(a).__name__} was never attached (use DmaBuf.attach)")
    return buf


cdef inline object _sgt_ops(AttachmentCore a):
    """``dma_buf_get_sgt_ops()`` (mapping.get_sgt_ops) on an attachment."""
    mt = a.map_type
    if mt is None or mt.type is not _SGT:
        return None
    return mt.exp_ops


cdef newfunc _ATTACHMENT_NEW = (<PyTypeObject *>AttachmentCore).tp_new


cdef object _new(object dmabuf, object ops, object priv):
    """A new attachment of ``dmabuf``, on no list yet (no __init__ runs)."""
    cdef AttachmentCore a
    if _attachment_c_new:  # the class's __new__ is AttachmentCore's: its C function, without the wrapper
        a = <AttachmentCore>_ATTACHMENT_NEW(<PyTypeObject *>_Attachment, <PyObject *>_EMPTY, NULL)
    else:
        a = _new_attachment(_Attachment)
    a.dmabuf = dmabuf
    a.importer_ops = ops
    a.importer_priv = priv
    a.peer2peer = bool(ops.allow_peer2peer) if ops is not None else False
    a._site = _user_site()
    return a


# ------------------------------------------------------- the mapping record


cdef class _Mapping(_Sited):
    """A table (or PAL list, or DMA addresses) handed to an importer, as
    the checker tracks it.

    Attributes
    ----------
    attachment : Attachment
    table : SgTable or None
    direction : DmaDirection
    stale : bool
        The exporter invalidated or revoked it (the importer was told).
    created_at : str
    pinned : bool
        The map pinned the buffer for a static importer (unmap unpins).
    """

    cdef public object attachment
    cdef public object table
    cdef public object direction
    cdef public bint stale
    # The (DMA address, nbytes) rows: native u64 pairs copied from the table
    # at map time (bytes), or the (N, 2) array given to track_dma (read
    # through, as the importer's own record of what it mapped).
    cdef public object _dma
    cdef public bint pinned
    cdef object __weakref__

    def __init__(self):
        raise TypeError("mappings are made by Attachment.map and track_dma")

    @property
    def dma(self):
        """The (DMA address, nbytes) rows the mapping covers: (N, 2) u64
        (read-only for a table's mapping)."""
        d = self._rows()
        return _np.frombuffer(d, dtype=_np.uint64).reshape(-1, 2) if type(d) is bytes else d

    cdef object _rows(self):
        d = self._dma
        if d is None:
            raise TypeError("a mapping made with __new__ covers nothing (mappings come from Attachment.map)")
        return d

    def covers(self, addr, nbytes):
        """Does ``[addr, +nbytes)`` touch a segment?  Compared on inclusive
        last bytes: an access or segment may end exactly at 2**64."""
        d = self._rows()
        return _ranges_touch(d if type(d) is bytes else d.tobytes(), addr, nbytes)

    def __repr__(self):
        return f"<mapping of {self.attachment!r}{' STALE' if self.stale else ''}>"


# What the checker watches, weakly: a mapping lives as long as its
# attachment keeps it, so nothing here keeps a leaked buffer (and the
# ResourceWarning it owes) from being collected.  Each device's record
# holds plain weak references keyed by id(), put in by track and taken
# out by untrack (no callbacks: one could run from a garbage collection
# inside _maps_lock).  A mapping collected without an unmap (its
# attachment leaked) leaves a dead reference: skipped when read, and swept
# out when the dict has doubled since its last sweep.  A table finds its
# mapping through the same weak reference, kept on the table itself
# (``SgTable._dmabuf_ref``) while the mapping is live.


device_maps = weakref.WeakKeyDictionary()
maps_lock = threading.Lock()
cdef object _device_maps = device_maps
cdef object _maps_lock = maps_lock
# The last device whose record was looked up, as (weak reference, record):
# attachments come and go for the same few devices, and the weak key
# dictionary's get is Python code.  One object, replaced whole.
cdef tuple _last_dev = (None, None)


cdef _MapRefs _dev_record(object dev):
    global _last_dev
    cdef tuple last = _last_dev
    wr = last[0]
    if wr is not None and wr() is dev:
        return <_MapRefs>last[1]
    with _maps_lock:
        refs = _device_maps.get(dev)
        if refs is None:
            refs = _device_maps[dev] = _MapRefs()
    _last_dev = (PyWeakref_NewRef(dev, None), <_MapRefs?>refs)
    return <_MapRefs>refs


def live_maps(device):
    """The device's tracked mappings that are still alive (dead references
    are skipped; _MapRefs.sweep drops them)."""
    with _maps_lock:
        maps = _device_maps.get(device)
        refs = list(maps.values()) if maps else []
    return [m for m in (r() for r in refs) if m is not None]


def table_map(table):
    """The live tracked mapping whose table is ``table``, or None."""
    return _table_map(table)


cdef object _table_map(object table):
    """The live tracked mapping whose table is ``table``, or None."""
    if not isinstance(table, SgTable):
        return None
    r = (<SgTable>table)._dmabuf_ref  # a public slot: anything a user wrote there is no mapping
    m = r() if type(r) is _WeakRef else None
    return m if type(m) is _Mapping and (<_Mapping>m).table is table else None


# The buffer's lock (a threading.RLock) and the device records' (a Lock)
# are taken here through their types' own methods: a ``with`` statement
# would make and free two bound methods and call __exit__ with three
# arguments each time.  Any other lock object goes through its
# __enter__ / __exit__.
cdef type _RLockType = type(threading.RLock())
cdef type _LockType = type(threading.Lock())
cdef object _rlock_acquire = _RLockType.acquire
cdef object _rlock_release = _RLockType.release
cdef object _plain_acquire = _LockType.acquire
cdef object _plain_release = _LockType.release


cdef inline int _acquire(object lk) except -1:
    if type(lk) is _RLockType:
        _rlock_acquire(lk)
    elif type(lk) is _LockType:
        _plain_acquire(lk)
    else:
        _with_method(lk, "__exit__")  # as a with statement: both looked up first
        _with_method(lk, "__enter__")()
    return 0


cdef inline int _release(object lk) except -1:
    if type(lk) is _RLockType:
        _rlock_release(lk)
    elif type(lk) is _LockType:
        _plain_release(lk)
    else:
        _with_method(lk, "__exit__")(None, None, None)
    return 0


cdef object _with_method(object lk, str name):
    """``lk``'s special method ``name`` as a with statement finds it: in
    its type's MRO (not the metaclass), bound through the descriptor
    protocol; AttributeError(name) if missing."""
    for k in type(lk).__mro__:
        f = k.__dict__.get(name, _MISSING)
        if f is not _MISSING:
            get = getattr(type(f), "__get__", None)
            return get(f, lk, type(lk)) if get is not None else f
    raise AttributeError(name)


cdef _Mapping _track(AttachmentCore a, object table, object d, bint pinned, object dma):
    cdef _Mapping m = _Mapping.__new__(_Mapping)
    cdef set maps = a._maps  # a reference of our own while the set hashes and compares
    cdef _MapRefs refs
    m.attachment = a
    m.table = table
    m.direction = d
    m._site = _user_site()
    m._dma = dma
    m.pinned = pinned
    buf = _buf(a)
    lk = buf._lock
    _acquire(lk)
    try:
        maps.add(m)
        buf._mappings.add(m)
    finally:
        _release(lk)
    ref = PyWeakref_NewRef(m, None)
    if table is not None:
        (<SgTable>table)._dmabuf_ref = ref
    if a._dev_refs is None:
        dev = a.device
        if dev is None:
            return m
        a._dev_refs = _dev_record(dev)  # found once per attachment (its device is fixed)
    refs = a._dev_refs
    _acquire(_maps_lock)
    try:
        refs[id(m)] = ref
        if len(refs) > refs.sweep_at:
            refs.sweep()
    finally:
        _release(_maps_lock)
    return m


def track(AttachmentCore a not None, table, direction, bint pinned, dma_ranges=None):
    """Record a mapping for the checker (``table`` an SgTable or None, its
    rows taken from the table when ``dma_ranges`` is None, else parsed
    from it as (N, 2) u64 pairs)."""
    if table is not None and not isinstance(table, SgTable):
        raise TypeError("track: table must be an SgTable or None")
    d = _direction(direction)  # the direction first, as track_dma always checked it
    if dma_ranges is None:
        # The core's own rows: nothing to parse.
        dma = (<SgTable>table)._dma_snapshot() if table is not None else _NO_ROWS
    else:
        dma = _u64_pairs(dma_ranges, "dma ranges")
    return _track(a, table, d, pinned, dma)


cdef int _untrack(AttachmentCore a, _Mapping m) except -1:
    cdef set maps = a._maps
    buf = _buf(a)
    lk = buf._lock
    _acquire(lk)
    try:
        maps.discard(m)
        buf._mappings.discard(m)
        if buf._idle_waiters:
            buf._idle.notify_all()
    finally:
        _release(lk)
    t = m.table
    if isinstance(t, SgTable):
        r = (<SgTable>t)._dmabuf_ref
        if type(r) is _WeakRef and r() is m:
            (<SgTable>t)._dmabuf_ref = None
    cdef _MapRefs refs = a._dev_refs
    if refs is None:  # not in the device's record (no device, or never mapped)
        return 0
    _acquire(_maps_lock)
    try:
        refs.pop(id(m), None)
    finally:
        _release(_maps_lock)
    return 0


def untrack(AttachmentCore a not None, _Mapping m not None):
    """Take a record out (the importer gave the mapping back)."""
    _untrack(a, m)


# ------------------------------------------------------------ negotiation
# dma_buf_match_mapping() and the built-in SGT type's callbacks
# (pydmabuf.dma_buf_mapping and pydmabuf.mapping call these, or bind them
# under their own names).


cdef object _match_of(object cls, object mtype, object exp_ops, dict data):
    # For this module's own entries (MappingMatch, str keys that are no
    # name of the class).  MatchCore's own tp_new for the class (a __new__
    # a subclass defines is not called, as object.__new__ would not have);
    # the fields are plain instance attributes, given as one new __dict__
    # (no __setattr__ override runs): measured, cheaper than six attribute
    # stores into the instance's inline values.
    self = _MATCH_NEW(<PyTypeObject *>cls, <PyObject *>_EMPTY, NULL)
    cdef dict d = data.copy()
    d["type"] = mtype
    d["exp_ops"] = exp_ops
    d["_data"] = data
    PyObject_GenericSetDict(self, d, NULL)
    return self


def match_of(cls, mtype, exp_ops, dict data not None):
    """What ``MappingMatch(type, exp_ops, **data)`` makes, for the
    built-in entries: ``type`` is a MappingType and ``data`` a dict of
    their own, with no name the class has (the callers' literals)."""
    if not isinstance(cls, type) or not issubclass(cls, MatchCore):
        raise TypeError(f"match_of: {cls!r} is not a MatchCore class")
    # From Python the data may be anything: stored one attribute at a time
    # (names must be str; a class's property or slot takes its own).
    self = _MATCH_NEW(<PyTypeObject *>cls, <PyObject *>_EMPTY, NULL)
    for k, v in data.items():
        PyObject_GenericSetAttr(self, k, v)
    PyObject_GenericSetAttr(self, "type", mtype)
    PyObject_GenericSetAttr(self, "exp_ops", exp_ops)
    PyObject_GenericSetAttr(self, "_data", data)
    return self


cdef object _args_of(object cls, object dmabuf, object attach, tuple imp):
    args = object.__new__(cls)
    args.dmabuf = dmabuf
    args.attach = attach
    args.imp_matches = imp
    args.chosen = None
    return args


def match_args_of(cls, dmabuf, attach, tuple imp not None):
    """``MatchArgs(dmabuf, attach, imp)`` for the attach, whose importer
    entries are a tuple of MappingMatch checked already."""
    return _args_of(cls, dmabuf, attach, imp)


cdef object _sgt_importer(object device, bint accepts):
    return _match_of(_MappingMatch, _SGT, None, {"importing_dma_device": device,
                                                 "importer_accepts_p2p": _ACCEPTS_P2P if accepts else _NO_P2P})


def sgt_importer(device, accepts_p2p=False):
    """``DMA_BUF_IMAPPING_SGT(dev, accepts)`` (mapping.sgt_importer)."""
    return _sgt_importer(device, bool(accepts_p2p))


def sgt_match(self, dmabuf, exp, imp):
    """The SGT type's ``match``: compatible unless the exporter entry
    requires P2P, which the importer must accept and reach
    (``pci_p2pdma_distance() >= 0``)."""
    req = getattr(exp, "exporter_requires_p2p", _NO_P2P)
    if req != _REQUIRES_P2P:
        return None  # NO_P2P, or a value the switch does not know: compatible
    pdev = getattr(exp, "exporting_p2p_device", None)
    if pdev is None:
        _p2p_no_device()  # pydmabuf.mapping logs it (its logger, its file)
        raise _NotSupported("the exporter entry requires P2P but names no PCI device")
    if getattr(imp, "importer_accepts_p2p", _NO_P2P) != _ACCEPTS_P2P:
        raise _NotSupported("the importer does not accept peer-to-peer addresses")
    dev = getattr(imp, "importing_dma_device", None)
    if dev is None or pdev.machine.p2p_distance(pdev, [dev]) < 0:  # pci_p2pdma_distance()
        raise _NotSupported(f"{getattr(dev, 'name', None)} has no P2P route to {pdev.name}")
    return None


def sgt_finish_match(self, args, exp, imp):
    """The SGT type's ``finish_match``: the attachment's entry names the
    importing device and both P2P choices (the exporting P2P device is
    left out, as upstream keeps it opaque); the legacy ``peer2peer``
    field follows the negotiation (compat period)."""
    a = args.attach
    if a is None:
        return None
    accepts = getattr(imp, "importer_accepts_p2p", _NO_P2P)
    _sgt_record(a, self, exp.exp_ops, getattr(imp, "importing_dma_device", None), accepts,
                getattr(exp, "exporter_requires_p2p", _NO_P2P))
    return None


cdef int _sgt_record(object a, object sgt, object exp_ops, object device, object accepts, object requires) except -1:
    """What the SGT ``finish_match`` records on the attachment: its entry
    (the importing device and both P2P choices) and the legacy
    ``peer2peer``."""
    entry = _match_of(_MappingMatch, sgt, exp_ops, {
        "importing_dma_device": device, "importer_accepts_p2p": accepts, "exporter_requires_p2p": requires})
    if isinstance(a, AttachmentCore):  # the fields, written in C
        (<AttachmentCore>a).map_type = entry
        (<AttachmentCore>a).peer2peer = accepts == _ACCEPTS_P2P
    else:
        a.map_type = entry
        a.peer2peer = accepts == _ACCEPTS_P2P
    return 0


# The built-in SGT callbacks, as the SGT class holds them (_sgt_compat).
cdef object _sgt_match_fn = sgt_match
cdef object _sgt_finish_fn = sgt_finish_match


cdef int _match(object args, tuple exps) except -1:
    """The loop of dma_buf_match_mapping(): exporter entries outside,
    importer entries inside (restarted for each), the first compatible
    pair gets its type's finish_match."""
    for exp in exps:
        for imp in args.imp_matches:
            t = exp.type
            if imp.type is not t:
                continue
            m = t.match
            if m is not None:
                try:
                    rv = m(args.dmabuf, exp, imp)
                    if rv is not None:
                        _match_result(rv, t.name + ": match")
                except _NotSupported:
                    continue
            t.finish_match(args, exp, imp)
            args.chosen = (exp, imp)
            return 0
    raise _InvalidArgument(
        f"no compatible mapping type: the exporter offers [{', '.join([e.type.name for e in exps])}], "
        f"the importer takes [{', '.join([e.type.name for e in args.imp_matches])}]")


def match_mapping(args, exp_matches):
    """``dma_buf_match_mapping()`` (pydmabuf.dma_buf_mapping.match_mapping
    documents it)."""
    _match_checked(args, exp_matches)


cdef int _match_checked(object args, object exp_matches) except -1:
    if not isinstance(args, _MatchArgs):
        raise TypeError(f"match_mapping: args must be MatchArgs, not {type(args).__name__}")
    exps = tuple(exp_matches) if exp_matches is not None else ()
    for exp in exps:
        if not isinstance(exp, _MappingMatch):
            raise TypeError(f"match_mapping: exporter entries must be MappingMatch, not {type(exp).__name__}")
    return _match(args, exps)


cdef int _exporter_matches(object args, object exporter) except -1:
    if _has(type(exporter), "match_mapping"):
        _match_result(exporter.match_mapping(args), f"{exporter.name}: match_mapping")
        return 0
    single = getattr(exporter, "single_exporter_match", None)
    if single is not None:
        return _match_checked(args, [single])
    _match_checked(args, _COMPAT_ENTRIES)
    return 0


def exporter_matches(args, exporter):
    """What ``dma_buf_mapping_attach()`` does with the exporter
    (pydmabuf.mapping.exporter_matches documents it)."""
    _exporter_matches(args, exporter)


cdef class _LegacySgtOps:
    """``dma_buf_sgt_exp_compat_match``'s ops: forward to the unaware
    exporter of the attachment's buffer, its own ``map_dma_buf`` /
    ``unmap_dma_buf`` (the kernel's compat entry calls ``dmabuf->ops``).
    Stateless: one instance serves every buffer."""

    def map_dma_buf(self, attachment, direction):
        return _buf_of(attachment).exporter.map_dma_buf(attachment, direction)

    def unmap_dma_buf(self, attachment, table, direction):
        _buf_of(attachment).exporter.unmap_dma_buf(attachment, table, direction)


cdef inline object _buf_of(object attachment):
    """``attachment.dmabuf`` (the C field of an attachment)."""
    if isinstance(attachment, AttachmentCore):
        return (<AttachmentCore>attachment).dmabuf
    return attachment.dmabuf


cdef object _sgt_dma_device(object attachment):
    if isinstance(attachment, AttachmentCore):
        mt = (<AttachmentCore>attachment).map_type
    else:
        try:
            mt = attachment.map_type
        except AttributeError:  # not an attachment (or a half-built one)
            return None
    if mt is None or mt.type is not _SGT:
        return None
    return getattr(mt, "importing_dma_device", None)  # None: an SGT entry without the field


def sgt_dma_device(attachment):
    """``dma_buf_sgt_dma_device()``: the device the exporter maps for, or
    None when the attachment is not SGT."""
    return _sgt_dma_device(attachment)


# ------------------------------------------------------------- attaching


def attach(buf, tuple imp not None, ops, priv):
    """``dma_buf_mapping_attach()`` after its argument checks: negotiate,
    the exporter's ``attach``, then the list under the lock."""
    return _attach(buf, imp, ops, priv)


cdef object _attach(object buf, tuple imp, object ops, object priv, object device=None, bint accepts=False,
                    object exp=None):
    """``imp`` None: the SGT wrappers' one importer entry, for ``device``
    (accepting P2P or not).  ``exp``: the buffer's exporter, if the caller
    read it (a buffer's exporter and reservation object are fixed at
    export: each is read once per call)."""
    resv = buf.resv
    if exp is None:
        exp = buf.exporter
    if _held(resv):
        _checker().locking("attach-with-resv", "dma_buf_attach with the reservation lock held", buf)
    cdef AttachmentCore a = _new(buf, ops, priv)
    if imp is not None or not _sgt_compat(a, exp, device, accepts):
        if imp is None:
            imp = (_sgt_importer(device, accepts),)
        args = _args_of(_MatchArgs, buf, a, imp)
        _exporter_matches(args, exp)
        if a.map_type is None:
            chosen = args.chosen
            raise TypeError(f"{chosen[0].type.name if chosen else 'the type'}: finish_match recorded "
                            "nothing on the attachment")
    a.device = _sgt_dma_device(a)
    _exporter_op(exp, "attach", _EXP_ATTACH, a)
    _lock(resv)
    try:
        lk = buf._lock
        _acquire(lk)
        try:
            buf._attachments.insert(0, a)
            a._listed = True
        finally:
            _release(lk)
    finally:
        _unlock(resv)
    return a


cdef bint _sgt_compat(AttachmentCore a, object exporter, object device, bint accepts) except -1:
    """The negotiation of an SGT wrapper's attach to an unaware exporter,
    worked out directly; False (nothing done) when it may differ from the
    general one, which then runs.

    The general path builds the importer entry and the MatchArgs only to
    hand them to the SGT type's own ``match`` and ``finish_match``.  When
    those are the built-in ones and the exporter offers the one compat
    entry (SGT), the outcome is known: ``match`` passes a NO_P2P entry
    without looking at the importer, and ``finish_match`` records this
    entry.  Nothing a user or a driver wrote would see the difference."""
    cdef tuple entries = _COMPAT_ENTRIES
    if _has(type(exporter), "match_mapping") or getattr(exporter, "single_exporter_match", None) is not None:
        return False
    if entries is None or len(entries) != 1:
        return False
    exp = entries[0]
    if type(exp) is not _MappingMatch or exp.type is not _SGT or type(_SGT) is not _SGT_CLS:
        return False
    if not _class_attr_is(_SGT_CLS, "match", _sgt_match_fn) or not _class_attr_is(_SGT_CLS, "finish_match", _sgt_finish_fn):
        return False  # replaced by someone: they are called, on the general path
    own = <dict>PyObject_GenericGetDict(_SGT, NULL)
    if "match" in own or "finish_match" in own:
        return False  # likewise, on the instance
    req = getattr(exp, "exporter_requires_p2p", _NO_P2P)
    if req == _REQUIRES_P2P:
        return False  # the general path asks the route (or refuses), as the match does
    _sgt_record(a, _SGT, exp.exp_ops, device, _ACCEPTS_P2P if accepts else _NO_P2P, req)
    return True


def sgt_attach(buf, device, ops, priv, str what not None):
    """``dma_buf_sgt_attach()`` / ``dma_buf_sgt_dynamic_attach()``: one SGT
    importer entry for ``device``, accepting P2P when the importer says."""
    return _sgt_attach(buf, device, ops, priv, what)


def dmabuf_attach(self, device):
    """``dma_buf_attach()`` (``dma_buf_sgt_attach()`` after the mapping
    types series): a static importer of a scatterlist mapped for
    ``device`` (no invalidation, and a dynamic exporter pins the buffer
    on every map).  Never peer-to-peer: an exporter that only offers a
    P2P scatterlist (VFIO) refuses it with EINVAL.

    Examples
    --------
    >>> from pydmabuf import DmaDirection, Machine
    >>> from pydmabuf.exporters import SystemHeap
    >>> m = Machine.default()
    >>> buf = SystemHeap(m).allocate(1 << 16)
    >>> a = buf.attach(m.device("gpu0"))
    >>> a.dynamic
    False
    >>> buf.detach(a)
    >>> buf.put()
    """
    return _sgt_attach(self, device, None, None, "dma_buf_attach")


cdef object _sgt_attach(object buf, object device, object ops, object priv, str what):
    _alive(buf, "attach")
    if not isinstance(device, _Device):
        raise _errors.InvalidArgument(f"{what}: {device!r} is not a device")
    exp = buf.exporter
    machine = getattr(exp, "machine", None)
    if machine is not None and device.machine is not machine:
        raise _errors.InvalidArgument(f"{what}: {device.name} is a device of machine "
                                      f"{device.machine.name!r}, not of the exporter's {machine.name!r}")
    accepts = ops is not None and bool(ops.allow_peer2peer)
    return _attach(buf, None, ops, priv, device, accepts, exp)


def dmabuf_detach(self, attachment):
    """``dma_buf_detach()``: take the attachment off the list (under the
    lock), then the exporter's ``detach``.  Detaching with mappings or
    pins still live is a LifetimeError (the kernel does not check).

    Examples
    --------
    >>> from pydmabuf import Machine
    >>> from pydmabuf.exporters import SystemHeap
    >>> m = Machine.default()
    >>> buf = SystemHeap(m).allocate(1 << 16)
    >>> a = buf.attach(m.device("gpu0"))
    >>> buf.detach(a)
    >>> a.detached, buf.attachments
    (True, [])
    >>> buf.put()
    """
    _detach(self, attachment)


cdef int _detach(object buf, object attachment) except -1:
    # The C type first (isinstance on a cdef class checks the object's real
    # type; a faked __class__ cannot pass it), then the Python class.
    if (not isinstance(attachment, AttachmentCore) or not isinstance(attachment, _Attachment)
            or (<AttachmentCore>attachment).dmabuf is not buf):
        _checker().lifetime("detach-foreign", "dma_buf_detach of an attachment of another buffer",
                            buf, attachment)
        return 0
    cdef AttachmentCore a = <AttachmentCore>attachment
    if a.detached:
        _checker().lifetime("double-detach", "dma_buf_detach of a detached attachment", a)
        return 0
    resv = buf.resv
    if _held(resv):
        _checker().locking("detach-with-resv", "dma_buf_detach with the reservation lock held", a)
    if a._maps or a.pin_count:
        _checker().lifetime("detach-with-mappings",
                            f"detach with {len(a._maps)} live mapping(s) and {a.pin_count} pin(s)", a,
                            culprit=a.importer_ops or a)
    _lock(resv)
    try:
        lk = buf._lock
        _acquire(lk)
        try:
            buf._attachments.remove(a)
        finally:
            _release(lk)
    finally:
        _unlock(resv)
    a.detached = True
    _exporter_op(buf.exporter, "detach", _EXP_DETACH, a)
    return 0


# ------------------------------------------------------------- mapping


def map_attachment(AttachmentCore self not None, direction=_BIDI):
    """``dma_buf_map_attachment()``: the reservation lock must be held.

    A static importer of a dynamic exporter pins the buffer first (and
    unpins it at unmap); a static importer then waits (interruptibly)
    for the KERNEL fences.  Returns a new table the caller owns; the
    exporter refusing raises its error (ENODEV once revoked).

    Examples
    --------
    >>> from pydmabuf import DmaDirection, Machine
    >>> from pydmabuf.exporters import SystemHeap
    >>> m = Machine.default()
    >>> buf = SystemHeap(m).allocate(1 << 16, layout="contiguous")
    >>> a = buf.attach(m.device("gpu0"))
    >>> with buf.resv:
    ...     table = a.map(DmaDirection.BIDIRECTIONAL)
    ...     a.live_mappings
    1
    >>> table.dma_ranges().shape
    (1, 2)
    >>> with buf.resv:
    ...     a.unmap(table, DmaDirection.BIDIRECTIONAL)
    >>> buf.detach(a); buf.put()
    """
    return _map(self, direction)


cdef object _map(AttachmentCore a, object direction, object resv=None):
    """``resv``: the buffer's, when the caller has read it."""
    d = _direction(direction)
    if not a.usable("map"):
        raise _errors.LifetimeError("map on a dead attachment")
    sgt = _sgt_ops(a)
    if sgt is None:
        raise _errors.InvalidArgument(f"dma_buf_map_attachment: the attachment negotiated "
                                      f"{a._type_name()!r}, not a scatterlist")
    buf = _buf(a)
    if resv is None:
        resv = buf.resv
    a.require_resv("map", resv)
    if buf.revoked:
        raise _errors.Revoked(f"{buf.name} was revoked: no new mappings")
    exp = buf.exporter
    cdef bint dynamic = a.importer_ops is not None
    cdef bint pin = not dynamic and _is_dynamic(exp)
    if pin:
        exp.pin(a)
        a.pin_count += 1
    try:
        table = sgt.map_dma_buf(a, d)
        if table is None:
            raise _errors.OutOfMemory(f"{exp.name}: map_dma_buf returned no table")
        if not isinstance(table, SgTable):
            raise TypeError(f"{exp.name}: map_dma_buf returned a {type(table).__name__}, not an SgTable")
    except BaseException:
        if pin:
            a.pin_count -= 1
            exp.unpin(a)
        raise
    if not dynamic:
        try:
            # A Resv with no fence waits for nothing (Resv.wait checks its
            # arguments, constants here, and returns at once).
            if type(resv) is not Resv or (<Resv>resv).num:
                resv.wait(_KERNEL, interruptible=True)
        except BaseException:
            sgt.unmap_dma_buf(a, table, d)
            if pin:
                a.pin_count -= 1
                exp.unpin(a)
            raise
    _track(a, table, d, pin, (<SgTable>table)._dma_snapshot())
    return table


def map_unlocked(AttachmentCore self not None, direction=_BIDI):
    """Take the reservation lock, :meth:`map`, drop it; must not be
    called with the lock held (LockingError).

    Examples
    --------
    >>> from pydmabuf import DmaDirection, Machine
    >>> from pydmabuf.exporters import SystemHeap
    >>> m = Machine.default()
    >>> buf = SystemHeap(m).allocate(1 << 16)
    >>> a = buf.attach(m.device("gpu0"))
    >>> table = a.map_unlocked(DmaDirection.TO_DEVICE)
    >>> a.unmap_unlocked(table, DmaDirection.TO_DEVICE)
    >>> buf.detach(a); buf.put()
    """
    # A held lock is a LockingError report; then it maps under the
    # caller's lock, through the attachment's own map.
    cdef AttachmentCore a = self
    buf = _buf(a)
    resv = buf.resv
    if _held(resv):
        _checker().locking("unlocked-with-resv", "map_attachment_unlocked with the reservation lock held", a)
        return a.map(direction)
    _lock(resv)
    try:
        return _map(a, direction, resv)
    finally:
        _unlock(resv)


def unmap_attachment(AttachmentCore self not None, table, direction=_BIDI):
    """``dma_buf_unmap_attachment()`` (lock held): the exporter's unmap,
    then unpin if the map pinned.

    Examples
    --------
    >>> from pydmabuf import DmaDirection, Machine
    >>> from pydmabuf.exporters import SystemHeap
    >>> m = Machine.default()
    >>> buf = SystemHeap(m).allocate(1 << 16)
    >>> a = buf.attach(m.device("gpu0"))
    >>> with buf.resv:
    ...     table = a.map(DmaDirection.TO_DEVICE)
    ...     a.unmap(table, DmaDirection.TO_DEVICE)
    >>> a.live_mappings
    0
    >>> buf.detach(a); buf.put()
    """
    _unmap(self, table, direction)


cdef int _unmap(AttachmentCore a, object table, object direction, object resv=None) except -1:
    """``resv``: the buffer's, when the caller has read it."""
    d = _direction(direction)
    a.require_resv("unmap", resv)
    m = _table_map(table)
    cdef set maps = a._maps
    if m is None or (<_Mapping>m).attachment is not a or m not in maps:
        _checker().lifetime("bad-unmap", "dma_buf_unmap_attachment of a table that is not a live "
                            "mapping of this attachment (a double unmap?)", a, culprit=a.importer_ops)
        return 0
    cdef _Mapping rec = <_Mapping>m
    if rec.direction != d:
        _checker().lifetime("unmap-direction", f"mapped {rec.direction.name}, unmapped {d.name}", a)
    sgt = _sgt_ops(a)  # a tracked table means the attachment is SGT
    sgt.unmap_dma_buf(a, table, rec.direction)
    _untrack(a, rec)
    if rec.pinned:
        a.pin_count -= 1
        _buf(a).exporter.unpin(a)
    return 0


def unmap_unlocked(AttachmentCore self not None, table, direction=_BIDI):
    """Take the reservation lock, :meth:`unmap`, drop it; must not be
    called with the lock held (LockingError).
    """
    cdef AttachmentCore a = self
    buf = _buf(a)
    resv = buf.resv
    if _held(resv):
        _checker().locking("unlocked-with-resv", "unmap_attachment_unlocked with the reservation lock held", a)
        a.unmap(table, direction)
        return
    _lock(resv)
    try:
        _unmap(a, table, direction, resv)
    finally:
        _unlock(resv)
