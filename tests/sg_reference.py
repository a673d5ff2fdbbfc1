"""A slow, literal Python model of the kernel's scatterlist builders.

Chunks are separate Python lists of slots, as the kernel's separate
allocations are; the model follows ``sg_alloc_append_table_from_pages()``
and ``get_next_sg()`` step by step.  pydmabuf's core lays the chunks out back
to back in one arena; ``flatten()`` gives the same view for comparison.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

PAGE = 4096
MAX_SINGLE_ALLOC = 128
UINT_MAX = 2**32 - 1


class RefError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.errno = code


@dataclass
class Slot:
    pfn: int | None = None  # None: no page (zeroed slot)
    offset: int = 0
    length: int = 0
    end: bool = False
    chain: bool = False


@dataclass
class RefTable:
    chunks: list[list[Slot]] = field(default_factory=list)
    nents: int = 0
    orig_nents: int = 0
    total_nents: int = 0
    prv: tuple[int, int] | None = None  # (chunk, index)

    # -------------------------------------------------------------- walking
    def slot(self, pos: tuple[int, int]) -> Slot:
        return self.chunks[pos[0]][pos[1]]

    def sg_next(self, pos: tuple[int, int]) -> tuple[int, int] | None:
        if self.slot(pos).end:
            return None
        c, i = pos[0], pos[1] + 1
        if self.chunks[c][i].chain:
            return (c + 1, 0)
        return (c, i)

    def data_positions(self, count: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos: tuple[int, int] | None = (0, 0) if self.chunks else None
        while pos is not None and len(out) < count:
            out.append(pos)
            pos = self.sg_next(pos)
        return out

    def _new_chunk(self, alloc: int) -> list[Slot]:
        chunk = [Slot() for _ in range(alloc)]
        chunk[-1].end = True
        self.chunks.append(chunk)
        return chunk

    def _make_link(self, pos: tuple[int, int]) -> None:
        s = self.slot(pos)
        s.pfn, s.offset, s.length, s.end, s.chain = None, 0, 0, False, True

    def get_next_sg(self, cur: tuple[int, int] | None, needed: int) -> tuple[int, int]:
        if cur is not None:
            nxt = self.sg_next(cur)
            assert nxt is not None, "the model reopens closed tables first"
            if not self.slot(nxt).end or needed == 1:
                return nxt
        alloc = min(needed, MAX_SINGLE_ALLOC)
        self._new_chunk(alloc)
        if cur is not None:
            self.total_nents += alloc - 1
            self._make_link(nxt)
        else:
            self.total_nents = alloc
        return (len(self.chunks) - 1, 0)

    # ----------------------------------------------------------- building
    def append_pages(
        self,
        pfns: list[int],
        offset: int = 0,
        size: int | None = None,
        max_segment: int = UINT_MAX,
        left_pages: int = 0,
    ) -> None:
        n = len(pfns)
        # The model's argument rules (the kernel reads past the array or
        # wraps the size instead).
        if n == 0 or not 0 <= offset < PAGE:
            raise RefError(errno.EINVAL)
        full = n * PAGE - offset
        if size is None:
            size = full
        if size > full or size <= full - PAGE:
            raise RefError(errno.EINVAL)
        max_segment &= ~(PAGE - 1)
        if max_segment < PAGE:
            raise RefError(errno.EINVAL)
        pfns = list(pfns)
        s = self.prv
        if self.prv is not None:
            if offset:
                raise RefError(errno.EINVAL)
            e = self.slot(self.prv)
            assert e.pfn is not None
            next_pfn = (e.pfn * PAGE + e.offset + e.length) // PAGE
            if pfns[0] == next_pfn:
                last = next_pfn - 1
                while pfns and pfns[0] == last + 1:
                    if e.length + PAGE > max_segment:
                        break
                    e.length += PAGE
                    last = pfns.pop(0)
                if not pfns:
                    if not left_pages:
                        e.end, e.chain = True, False
                    return
        n = len(pfns)
        chunks = 1
        seg_len = 0
        for i in range(1, n):
            seg_len += PAGE
            if seg_len >= max_segment or pfns[i] != pfns[i - 1] + 1:
                chunks += 1
                seg_len = 0
        if s is not None and self.slot(s).end:
            # Reopen a closed table (pydmabuf's documented extension).
            self.slot(s).end = False
            c, i = s
            alloc = min(chunks + left_pages + 1, MAX_SINGLE_ALLOC)
            if len(self.chunks) == 1 and len(self.chunks[0]) == 1:
                # A one-entry table grows its only chunk.
                grown = [Slot() for _ in range(alloc)]
                grown[0] = self.chunks[0][0]
                grown[-1].end = True
                self.chunks[0] = grown
                self.total_nents += alloc - 1
            elif c == len(self.chunks) - 1 and i == len(self.chunks[c]) - 1:
                saved = self.slot(s)
                chunk = self._new_chunk(alloc)
                self.total_nents += alloc - 1
                chunk[0] = Slot(saved.pfn, saved.offset, saved.length, False, False)
                self.chunks[c][i] = Slot()
                self._make_link((c, i))
                s = (len(self.chunks) - 1, 0)
                self.prv = s
        cur_page = 0
        added = 0
        for i in range(chunks):
            seg_len = 0
            j = cur_page + 1
            while j < n:
                seg_len += PAGE
                if seg_len >= max_segment or pfns[j] != pfns[j - 1] + 1:
                    break
                j += 1
            s = self.get_next_sg(s, chunks - i + left_pages)
            chunk_size = (((j - cur_page) * PAGE) - offset) & 0xFFFFFFFF
            slot = self.slot(s)
            slot.pfn = pfns[cur_page]
            slot.offset = offset
            slot.length = min(size, chunk_size)
            added += 1
            size = (size - chunk_size) % 2**64
            offset = 0
            cur_page = j
        self.nents += added
        self.orig_nents = self.nents
        self.prv = s
        if not left_pages:
            sl = self.slot(s)
            sl.end, sl.chain = True, False

    def alloc(self, nents: int) -> None:
        """sg_alloc_table(): page chunks of 127 entries plus a link."""
        if nents == 0:
            raise RefError(errno.EINVAL)
        left = nents
        while left:
            alloc = left
            if alloc > MAX_SINGLE_ALLOC:
                alloc = MAX_SINGLE_ALLOC
                data = alloc - 1
            else:
                data = alloc
            left -= data
            chunk = [Slot() for _ in range(alloc)]
            if self.chunks:
                self._make_link((len(self.chunks) - 1, len(self.chunks[-1]) - 1))
            self.chunks.append(chunk)
            if not left:
                chunk[data - 1].end = True
                self.prv = (len(self.chunks) - 1, data - 1)
        self.nents = self.orig_nents = self.total_nents = nents

    # ------------------------------------------------------------ viewing
    def flatten(self) -> list[tuple[int | None, int, int, bool, bool]]:
        return [(s.pfn, s.offset, s.length, s.end, s.chain) for c in self.chunks for s in c]

    def cpu_ranges(self) -> list[tuple[int, int]]:
        out = []
        for pos in self.data_positions(self.orig_nents):
            s = self.slot(pos)
            out.append(((s.pfn or 0) * PAGE + s.offset, s.length))
        return out

    @property
    def nslots(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def metadata_nbytes(self) -> int:
        def kmalloc(nslots: int) -> int:
            if nslots == MAX_SINGLE_ALLOC:
                return PAGE
            b = nslots * 32
            for c in (32, 64, 96, 128, 192):
                if b <= c:
                    return c
            c = 256
            while c < b:
                c *= 2
            return c

        return sum(kmalloc(len(c)) for c in self.chunks)


def core_slots(table) -> list[tuple[int | None, int, int, bool, bool]]:
    """The core table's slots in the reference model's shape.

    Link slots must hold the address of the slot that follows them (the
    next chunk's first slot); that is checked here.
    """
    e = table.entries
    base = e.__array_interface__["data"][0] if len(e) else 0
    out = []
    for i, row in enumerate(e.tolist()):
        page_link, offset, length, dma_address, dma_length, dma_flags = row
        chain = bool(page_link & 1)
        end = bool(page_link & 2)
        if chain:
            assert page_link & ~3 == base + 32 * (i + 1), f"slot {i}: link does not point at slot {i + 1}"
            out.append((None, offset, length, end, True))
            continue
        addr = page_link & ~0xFFF
        # A zeroed slot reads as page 0; the model's slots know "no page".
        pfn = addr >> 12
        out.append((pfn, offset, length, end, False))
    return out


def ref_slots_for_compare(ref: RefTable) -> list[tuple[int | None, int, int, bool, bool]]:
    return [(None if chain else (pfn or 0), off, ln, end, chain) for pfn, off, ln, end, chain in ref.flatten()]
