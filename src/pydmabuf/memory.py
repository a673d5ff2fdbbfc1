"""Contents of physical memory, for DMA that moves real bytes.

The model keeps the bytes that were written: RAM, private memory, BAR
memory and bounce buffers alike, in 64 KiB chunks allocated on first write
(never-written memory reads as zeros).  Copies are bulk NumPy operations,
one per chunk touched.

The ``_raw_*`` methods are what :mod:`pydmabuf.access` (the one access
gate) copies with; nothing else in the package calls them.  :meth:`read`
and :meth:`write` are the harness's view (a debugger's look at RAM, to
seed a BAR or check what landed where): no path of the model uses them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

__all__ = ["PhysMemory"]

_CHUNK_SHIFT = 16
_CHUNK = 1 << _CHUNK_SHIFT


class PhysMemory:
    """Sparse byte store over the 64-bit physical address space."""

    def __init__(self) -> None:
        self._chunks: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _pieces(self, phys: int, nbytes: int) -> Iterator[tuple[int, int, int]]:
        end = phys + nbytes
        while phys < end:
            idx = phys >> _CHUNK_SHIFT
            off = phys & (_CHUNK - 1)
            n = min(_CHUNK - off, end - phys)
            yield idx, off, n
            phys += n

    def read(self, phys: int, nbytes: int) -> bytes:
        """``nbytes`` at ``phys`` (zeros where nothing was written): the
        harness's look at memory, past every rule of the model.

        Examples
        --------
        >>> from pydmabuf import Machine
        >>> m = Machine.default()
        >>> m.memory.write(0x2000, b"abc")
        >>> m.memory.read(0x2000, 3)
        b'abc'
        """
        return self._raw_read(phys, nbytes)

    def write(self, phys: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Store ``data`` at ``phys``: the harness seeding memory (a BAR's
        contents, a test pattern), past every rule of the model."""
        self._raw_write(phys, data)

    def _raw_read(self, phys: int, nbytes: int) -> bytes:
        off = phys & (_CHUNK - 1)
        if off + nbytes <= _CHUNK:  # within one chunk (a small access): one slice, no staging array
            with self._lock:
                c = self._chunks.get(phys >> _CHUNK_SHIFT)
                return c[off : off + nbytes].tobytes() if c is not None else bytes(nbytes)
        out = np.zeros(nbytes, dtype=np.uint8)
        pos = 0
        with self._lock:
            for idx, off, n in self._pieces(phys, nbytes):
                c = self._chunks.get(idx)
                if c is not None:
                    out[pos : pos + n] = c[off : off + n]
                pos += n
        return out.tobytes()

    def _raw_write(self, phys: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        # An array's .data is the memoryview memoryview(array) would give
        # (NumPy's stubs declare no buffer protocol before Python 3.12).
        view = data.data if isinstance(data, np.ndarray) else memoryview(data)
        src = np.frombuffer(view.cast("B"), dtype=np.uint8)
        pos = 0
        with self._lock:
            for idx, off, n in self._pieces(phys, len(src)):
                c = self._chunks.get(idx)
                if c is None:
                    c = self._chunks[idx] = np.zeros(_CHUNK, dtype=np.uint8)
                c[off : off + n] = src[pos : pos + n]
                pos += n

    def _raw_copy_pages(self, src_pfns: np.ndarray, dst_pfns: np.ndarray) -> int:
        """Copy page i of ``src_pfns`` to page i of ``dst_pfns`` (a
        migration), touching only pages that hold written data; returns the
        pages copied."""
        with self._lock:
            backed = np.fromiter(self._chunks.keys(), dtype=np.uint64, count=len(self._chunks))
        if len(backed) == 0:
            return 0
        src = np.asarray(src_pfns, dtype=np.uint64)
        hit = np.flatnonzero(np.isin(src >> np.uint64(_CHUNK_SHIFT - 12), backed))
        dst = np.asarray(dst_pfns, dtype=np.uint64)
        per = _CHUNK >> 12  # pages per chunk: a page never straddles two
        chunks = self._chunks
        with self._lock:  # chunk to chunk, without a bytes copy of each page
            for s, d in zip(src[hit].tolist(), dst[hit].tolist()):
                so, do = (s % per) << 12, (d % per) << 12
                c = chunks.get(d // per)
                if c is None:
                    c = chunks[d // per] = np.zeros(_CHUNK, dtype=np.uint8)
                c[do : do + 4096] = chunks[s // per][so : so + 4096]
        return len(hit)

    def _raw_zero_pages(self, pfns: np.ndarray) -> int:
        """Zero whole pages, as ``__GFP_ZERO`` does for an allocation.

        One vectorised pass finds the pages that lie in chunks holding
        written data (the others read as zeros already); each such chunk is
        then cleared in one step (dropped when every page of it is in
        ``pfns``), so the work follows the chunks touched, not the pages.
        Returns the pages cleared."""
        pf = np.asarray(pfns, dtype=np.uint64).reshape(-1)
        if len(pf) == 0:
            return 0
        per = _CHUNK >> 12
        with self._lock:
            if not self._chunks:
                return 0
            backed = np.fromiter(self._chunks.keys(), dtype=np.uint64, count=len(self._chunks))
            idx = pf >> np.uint64(_CHUNK_SHIFT - 12)
            hit = np.isin(idx, backed)
            nhit = int(np.count_nonzero(hit))
            if nhit == 0:
                return 0
            order = np.argsort(idx[hit], kind="stable")
            chunk_of = idx[hit][order]
            slot = (pf[hit][order] & np.uint64(per - 1)).astype(np.intp)
            chunks, first = np.unique(chunk_of, return_index=True)
            bounds = np.append(first, len(chunk_of))
            for k, c in enumerate(chunks.tolist()):     # one step per chunk, not per page
                rows = np.unique(slot[bounds[k]:bounds[k + 1]])
                if len(rows) == per:
                    del self._chunks[c]                 # all of it: back to "never written"
                else:
                    self._chunks[c].reshape(per, 4096)[rows] = 0
        return nhit

    @property
    def backed_nbytes(self) -> int:
        """Bytes of model memory holding written data."""
        return len(self._chunks) * _CHUNK
