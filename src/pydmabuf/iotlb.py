"""The IOMMU's translation cache (IOTLB), and the window a lazy domain leaves.

Each :class:`~pydmabuf.machine.Iommu` has one :class:`Iotlb`: a bounded
cache of 4 KiB translations, tagged by domain (as hardware tags entries by
domain ID).  Device DMA through an IOMMU looks the cache up first (in the
access gate's translate step, :mod:`pydmabuf.access`); a miss walks the
page table and fills the cache.

Invalidation follows what the domain issues, never what the page table
says:

* a strict domain (``IOMMU_DOMAIN_DMA``) invalidates the range at unmap
  (``__iommu_unmap`` gathers the cleared leaves in an
  ``iommu_iotlb_gather`` and ``iommu_iotlb_sync`` invalidates them before
  the unmap returns), and so does ``iommu_unmap()`` on any domain;
* a lazy domain (``IOMMU_DOMAIN_DMA_FQ``) invalidates nothing at a DMA-API
  unmap: ``iommu_dma_free_iova`` hands the IOVA to ``queue_iova`` and the
  cached translation survives until ``fq_flush_iotlb`` runs the
  domain's ``flush_iotlb_all`` (the cookie's flush callback,
  ``iommu_dma_flush_iotlb_all``; from ``fq_flush_timeout`` when the 10 ms timer
  fires, from ``queue_iova`` when a ring is full, or
  ``IommuDomain.flush()``); only then are the IOVAs freed, so the stale
  entry can only ever point at the page that was unmapped.

The model reads those invalidations off the domain: a domain-wide flush
bumps the page table's ``iotlb_full_flushes`` counter (entries filled
before it are dropped); a cached entry whose page-table entry changed is
still live only while its IOVA sits on the flush queue (no range
invalidation was issued for it), and is dropped otherwise (a strict unmap
or ``iommu_unmap`` invalidated it).

A device access that hits a live stale entry reaches the OLD page, as
hardware does; the gate reports it as the ``stale-iotlb`` lifetime rule
(strict checker: :class:`~pydmabuf.errors.LifetimeError` naming the entry,
the mapping it came from and the importer that unmapped it; report mode:
recorded, and the access goes through).

Replacement policy: least recently used, ``Iommu.iotlb_entries`` entries
per IOMMU (machine spec key ``iotlb_entries``, default
:data:`DEFAULT_ENTRIES`).  Real IOTLB sizes and policies are
implementation-specific and mostly undisclosed; the default is a round
figure of the right order, not a measurement.  One entry caches one 4 KiB
page (a large-page leaf is cached page by page); an access of more pages
than the cache holds leaves its last pages cached.

:func:`stale_window` gives the study's exposure figure for a domain: how
many unmaps sit on the flush queue and how many bytes they leave reachable
through any cached translation until the flush.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from pydmabuf import errors
from pydmabuf._core import IommuDomain

if TYPE_CHECKING:
    from pydmabuf.device import Device

__all__ = ["DEFAULT_ENTRIES", "Iotlb", "StaleHit", "StaleWindow", "add_describer", "stale_window"]

#: Entries per IOMMU when the machine spec does not say.
DEFAULT_ENTRIES = 64

_SHIFT = 12
_PAGE = 1 << _SHIFT
_U64 = (1 << 64) - 1

#: ``fn(device, addr, nbytes) -> (mapping, culprit) or None``: who mapped a
#: DMA address, asked when an access fills the cache (registered by the
#: dma-buf layer, which knows its importers' mappings).
Describer = Callable[[Any, int, int], "tuple[Any, Any] | None"]
_describers: list[Describer] = []


def add_describer(fn: Describer) -> None:
    """Register ``fn(device, addr, nbytes)`` returning ``(mapping,
    culprit)`` for the mapping a DMA address belongs to (or None).  Asked
    when an access fills the IOTLB; a later stale hit names them."""
    _describers.append(fn)


class StaleHit(NamedTuple):
    """A device access that reached a page through a stale IOTLB entry."""

    iova: int  #: the page's IOVA
    phys: int  #: the old physical page the entry still points at
    npages: int  #: consecutive stale pages of the access from ``iova``
    domain: IommuDomain
    mapping: Any  #: what mapped the IOVA when the entry was filled (or None)
    culprit: Any  #: who owned that mapping, hence unmapped it (or None)

    def describe(self) -> str:
        return (f"stale IOTLB entry iova {self.iova:#x} -> old phys {self.phys:#x}"
                f"{f' (+{self.npages - 1} more pages)' if self.npages > 1 else ''} on {self.domain.type} domain")


@dataclass(frozen=True)
class StaleWindow:
    """Exposure of a lazy domain's queued unmaps (see :func:`stale_window`)."""

    queued_unmaps: int  #: unmaps on the flush queue, not yet invalidated
    queued_bytes: int  #: bytes they cleared: reachable by any cached translation
    cached_stale_pages: int  #: of those, pages this model's IOTLB holds now
    cached_stale_bytes: int


class Iotlb:
    """One IOMMU's translation cache: ``entries`` 4 KiB translations, LRU.

    Parameters
    ----------
    entries : int
        Capacity (1..65536).

    Notes
    -----
    The arrays hold one row per entry; a free row has tag 0.  ``stats``
    counts ``hits`` (pages found), ``misses`` (pages walked and filled),
    ``evictions``, ``invalidated`` (entries dropped by an invalidation the
    domain issued) and ``stale_hits`` (accesses that reached an old page).
    """

    #: Take the one-page lookup (index, plain ints) for accesses within a
    #: page; False sends them through the array scan, which the tests use
    #: to pin that both give the same results, counts and LRU order.
    _one_page_path = True

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        if not isinstance(entries, int) or isinstance(entries, bool):
            raise TypeError("iotlb entries must be an int")
        if not 1 <= entries <= 65536:
            raise errors.InvalidArgument(f"iotlb entries must be in 1..65536 (got {entries})")
        self.entries = entries
        self._lock = threading.RLock()
        self._tag = np.zeros(entries, np.int64)  # 0: free
        self._pfn = np.zeros(entries, np.uint64)  # IOVA page
        self._ppfn = np.zeros(entries, np.uint64)  # physical page
        self._flushes = np.zeros(entries, np.int64)  # domain's full flushes at fill
        self._used = np.zeros(entries, np.int64)  # LRU stamp
        self._prov = np.zeros(entries, np.int64)  # key into _provenance (0: none)
        self._clock = 0
        self._doms: dict[int, IommuDomain] = {}  # tag -> domain (while entries carry the tag)
        self._seen: dict[int, int] = {}  # tag -> the domain's full-flush count when last synced
        self._tags: dict[int, int] = {}  # id(domain) -> tag
        self._next_tag = 1
        self._provenance: dict[int, tuple[Any, Any]] = {}
        self._next_prov = 1
        # (tag, IOVA page) -> row, for the one-page lookup without a scan of
        # the arrays.  Written at every fill; never trusted alone: a row is
        # taken only while it still holds that tag and page (a dropped or
        # reused row leaves a dead key, pruned with the provenance).
        self._index: dict[tuple[int, int], int] = {}
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "invalidated": 0, "stale_hits": 0}

    # ---------------------------------------------------------------- state

    def _tag_of(self, dom: IommuDomain) -> int:
        t = self._tags.get(id(dom))
        if t is None or self._doms.get(t) is not dom:
            t = self._next_tag
            self._next_tag += 1
            self._tags[id(dom)] = t
            self._doms[t] = dom
        return t

    def _drop(self, mask: np.ndarray) -> None:
        n = int(mask.sum())
        if n:
            self._tag[mask] = 0
            self._prov[mask] = 0
            self.stats["invalidated"] += n

    def _sync(self, dom: IommuDomain, tag: int) -> int:
        """Apply the domain-wide flushes issued since the entries were
        filled (the flush queue's timer fires first if due,
        ``fq_flush_timeout``); returns the domain's flush count."""
        dom.poll()
        full = int(dom.pgtable.stats["iotlb_full_flushes"])
        if self._seen.get(tag) != full:  # a flush since this tag was last looked at
            self._drop((self._tag == tag) & (self._flushes < full))
            self._seen[tag] = full
        return full

    def flush(self) -> None:
        """Drop every entry (the IOMMU's global invalidation)."""
        with self._lock:
            self._drop(self._tag != 0)

    def cached(self, dom: IommuDomain) -> np.ndarray:
        """The IOVAs (of pages) cached for ``dom``, LRU first: a u64 array (a
        copy)."""
        _need_domain(dom, "Iotlb.cached")
        with self._lock:
            t = self._tags.get(id(dom))
            if t is None:
                return np.zeros(0, np.uint64)
            sel = np.flatnonzero(self._tag == t)
            sel = sel[np.argsort(self._used[sel], kind="stable")]
            return self._pfn[sel] << np.uint64(_SHIFT)

    # ----------------------------------------------------------- translation

    def translate(self, device: Device, dom: IommuDomain, addr: int, nbytes: int, need: int,
                  walk: Callable[[int, int], "tuple[Any, int, int]"],
                  fault: Callable[[int, int], Exception]) -> tuple[list[tuple[int, int]], list[StaleHit]]:
        """Translate a device access through the cache: physical runs and
        the stale entries it used.

        ``walk(addr, nbytes)`` is the page-table walk (``(rows, fault_at,
        fault_prot)``, rows None on a fault); ``fault(addr, prot)`` builds
        the device's IommuFault.  Pages found in the cache with a live
        entry are taken from it (a coherent entry agrees with the walk; a
        stale one does not and wins, as in hardware); the others are
        walked, and filled."""
        _need_domain(dom, "Iotlb.translate")
        with self._lock:
            tag = self._tag_of(dom)
            full = self._sync(dom, tag)
            first = addr >> _SHIFT
            last = (addr + nbytes - 1) >> _SHIFT
            if first == last and self._one_page_path:
                # One page (the common small access): at most one entry can
                # hold it (a tag caches a page once), found through the index.
                i = self._index.get((tag, first))
                if i is not None and (int(self._tag[i]) != tag or int(self._pfn[i]) != first):
                    i = None
                rows, fault_at, fprot = walk(addr, nbytes)
                runs = [(p, n) for p, n in rows.tolist()] if rows is not None else []
                if len(runs) == 1 and (i is None or runs[0][0] >> _SHIFT == int(self._ppfn[i])):
                    # A miss, or a hit that agrees with the walk: no stale entry.
                    self._hit_fill_page(device, tag, addr, nbytes, runs[0][0] >> _SHIFT, i, full)
                    return runs, []
                sel = np.array([] if i is None else [i], np.int64)
            else:
                # first <= pfn <= last as one unsigned compare (below first wraps high)
                sel = np.flatnonzero((self._tag == tag) & ((self._pfn - np.uint64(first)) <= np.uint64(last - first)))
                rows, fault_at, fprot = walk(addr, nbytes)
                runs = [(p, n) for p, n in rows.tolist()] if rows is not None else []
            stale = sel
            if len(sel) and rows is not None:
                # Entries that agree with the walk are coherent hits.
                stale = sel[_phys_pages(runs, addr, self._pfn[sel]) != self._ppfn[sel]]
            if len(stale):
                stale = self._stale_among(dom, stale)
                sel = sel[self._tag[sel] == tag]  # without the dropped ones
            if len(stale):
                return self._translate_stale(device, dom, addr, nbytes, need, stale, sel, walk, fault, full)
            if rows is None:
                raise fault(fault_at, fprot)
            self._hit_fill(device, tag, addr, nbytes, runs, sel, full)
            return runs, []

    def _stale_among(self, dom: IommuDomain, sel: np.ndarray) -> np.ndarray:
        """Of the cached entries ``sel``, those whose page-table entry no
        longer maps their page: live (returned) while their IOVA is on the
        flush queue, dropped otherwise (the unmap invalidated them)."""
        changed = []
        for i in sel.tolist():  # at most `entries` cache rows, never a buffer's pages
            iova = int(self._pfn[i]) << _SHIFT
            phys = dom.iova_to_phys(iova)
            if phys is None or (phys >> _SHIFT) != int(self._ppfn[i]):
                changed.append(i)
        if not changed:
            return np.zeros(0, np.int64)
        ch = np.asarray(changed, np.int64)
        q = dom.queued()
        if len(q):
            va = self._pfn[ch] << np.uint64(_SHIFT)
            lo = q[:, 0]
            hi = q[:, 0] + q[:, 1]
            live = ((va[:, None] >= lo[None, :]) & (va[:, None] < hi[None, :])).any(axis=1)
        else:
            live = np.zeros(len(ch), bool)
        dead = np.zeros(self.entries, bool)
        dead[ch[~live]] = True
        self._drop(dead)
        out: np.ndarray = ch[live]
        return out

    def _translate_stale(self, device: Device, dom: IommuDomain, addr: int, nbytes: int, need: int, stale: np.ndarray,
                         sel: np.ndarray, walk: Callable[[int, int], "tuple[Any, int, int]"],
                         fault: Callable[[int, int], Exception], full: int) -> tuple[list[tuple[int, int]],
                                                                                      list[StaleHit]]:
        order = stale[np.argsort(self._pfn[stale])]
        runs: list[tuple[int, int]] = []
        hits: list[StaleHit] = []
        pos, end = addr, addr + nbytes

        def add(p: int, n: int) -> None:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((p, n))

        for i in order.tolist():  # the stale cache rows in the range, at most `entries`
            pg = int(self._pfn[i]) << _SHIFT
            if pos < pg:  # the pages before it: walked
                rows, fault_at, fprot = walk(pos, pg - pos)
                if rows is None:
                    raise fault(fault_at, fprot)
                for p, n in rows.tolist():
                    add(int(p), int(n))
                pos = pg
            take = min(end, pg + _PAGE) - pos
            add((int(self._ppfn[i]) << _SHIFT) + (pos - pg), take)
            prov = self._provenance.get(int(self._prov[i]), (None, None))
            if hits and hits[-1].iova + hits[-1].npages * _PAGE == pg and hits[-1].phys + hits[-1].npages * _PAGE \
                    == int(self._ppfn[i]) << _SHIFT:
                h = hits[-1]
                hits[-1] = h._replace(npages=h.npages + 1)
            else:
                hits.append(StaleHit(pg, int(self._ppfn[i]) << _SHIFT, 1, dom, prov[0], prov[1]))
            self._clock += 1
            self._used[i] = self._clock
            pos += take
        if pos < end:
            rows, fault_at, fprot = walk(pos, end - pos)
            if rows is None:
                raise fault(fault_at, fprot)
            for p, n in rows.tolist():
                add(int(p), int(n))
        self.stats["stale_hits"] += 1
        self.stats["hits"] += len(order)
        return runs, hits

    def _hit_fill_page(self, device: Device, tag: int, addr: int, nbytes: int, ppfn: int, hit: int | None,
                       full: int) -> None:
        """:meth:`_hit_fill` for an access within one page (``ppfn`` its
        physical page, ``hit`` the row that holds it or None), in plain ints:
        the same counts, stamps, victim and row."""
        self._clock += 1
        if hit is not None:
            self.stats["hits"] += 1
            self._used[hit] = self._clock
            return
        self.stats["misses"] += 1
        prov = self._describe(device, addr, nbytes)
        free = np.flatnonzero(self._tag == 0)
        if len(free):
            row = int(free[0])
        else:  # every row taken, none by this access: the least recently used (lowest row on a tie)
            row = int(np.argmin(self._used))
            self.stats["evictions"] += 1
        pfn = addr >> _SHIFT
        self._tag[row] = tag
        self._pfn[row] = pfn
        self._ppfn[row] = ppfn
        self._flushes[row] = full
        self._used[row] = self._clock
        self._prov[row] = prov
        self._index[(tag, pfn)] = row
        self._prune()

    def _hit_fill(self, device: Device, tag: int, addr: int, nbytes: int, runs: list[tuple[int, int]],
                  sel: np.ndarray, full: int) -> None:
        """Refresh the entries the access hit; fill its other pages (its
        last ``entries`` pages at most), evicting least recently used."""
        first = addr >> _SHIFT
        last = (addr + nbytes - 1) >> _SHIFT
        lo = max(first, last - self.entries + 1)
        self.stats["hits"] += int(len(sel))
        self.stats["misses"] += int((last - first + 1) - len(sel))
        self._clock += 1
        if len(sel):
            self._used[sel] = self._clock
            if len(sel) == last - first + 1:  # every page hit (a tag caches a page once)
                return
        pages = np.arange(lo, last + 1, dtype=np.uint64)
        new = pages[~np.isin(pages, self._pfn[sel])] if len(sel) else pages
        if not len(new):
            return
        ppfn = _phys_pages(runs, addr, new)
        prov = self._describe(device, addr, nbytes)
        free = np.flatnonzero(self._tag == 0)
        need = len(new)
        if len(free) < need:
            cand = np.flatnonzero(self._tag != 0)
            cand = cand[~np.isin(cand, sel)] if len(sel) else cand
            victims = cand[np.argsort(self._used[cand], kind="stable")[: need - len(free)]]
            self.stats["evictions"] += len(victims)
            free = np.concatenate((free, victims))
        rows = free[:need]
        # When the access has more pages than the cache can hold, keep its last.
        new, ppfn = new[len(new) - len(rows):], ppfn[len(ppfn) - len(rows):]
        self._tag[rows] = tag
        self._pfn[rows] = new
        self._ppfn[rows] = ppfn
        self._flushes[rows] = full
        self._used[rows] = self._clock
        self._prov[rows] = prov
        self._index.update(zip(zip(itertools.repeat(tag), new.tolist()), rows.tolist()))
        self._prune()

    def _describe(self, device: Device, addr: int, nbytes: int) -> int:
        for fn in _describers:
            d = fn(device, addr, nbytes)
            if d is not None:
                k = self._next_prov
                self._next_prov += 1
                self._provenance[k] = d
                return k
        return 0

    def _prune(self) -> None:
        """Forget provenance and domains no entry refers to any more."""
        if len(self._provenance) > 2 * self.entries:
            live = set(self._prov[self._tag != 0].tolist())
            self._provenance = {k: v for k, v in self._provenance.items() if k in live}
        if len(self._index) > 2 * self.entries:
            rows = np.flatnonzero(self._tag != 0)
            self._index = dict(zip(zip(self._tag[rows].tolist(), self._pfn[rows].tolist()), rows.tolist()))
        if len(self._doms) > 8:
            live_t = set(self._tag[self._tag != 0].tolist())
            for t in [t for t in self._doms if t not in live_t]:
                d = self._doms.pop(t)
                self._tags.pop(id(d), None)
                self._seen.pop(t, None)

    def stale_pages(self, dom: IommuDomain) -> int:
        """Pages cached for ``dom`` whose translation was cleared but not
        yet invalidated (a device can still reach them)."""
        _need_domain(dom, "Iotlb.stale_pages")
        with self._lock:
            t = self._tags.get(id(dom))
            if t is None:
                return 0
            self._sync(dom, t)
            sel = np.flatnonzero(self._tag == t)
            return int(len(self._stale_among(dom, sel))) if len(sel) else 0

    def __repr__(self) -> str:
        return f"<Iotlb {int((self._tag != 0).sum())}/{self.entries} entries>"


def _need_domain(dom: IommuDomain, what: str) -> None:
    if type(dom) is IommuDomain:
        return
    if not isinstance(dom, IommuDomain):
        raise TypeError(f"{what}: domain must be an IommuDomain, not {type(dom).__name__}")


def _phys_pages(runs: list[tuple[int, int]], addr: int, pfns: np.ndarray) -> np.ndarray:
    """The physical page each IOVA page of ``pfns`` (all inside the access
    ``[addr, ...)`` that ``runs`` translate) maps to (vectorized)."""
    if len(runs) == 1 and not (runs[0][0] ^ addr) & (_PAGE - 1):
        # One run keeping the page offset (what an IOMMU's page-granular
        # translation gives): the pages follow one another.
        delta: np.ndarray = pfns.astype(np.uint64) + np.uint64(((runs[0][0] >> _SHIFT) - (addr >> _SHIFT)) & _U64)
        return delta
    pts0 = np.maximum(pfns.astype(np.uint64) << np.uint64(_SHIFT), np.uint64(addr)) - np.uint64(addr)
    if len(runs) == 1:
        one: np.ndarray = (np.uint64(runs[0][0]) + pts0) >> np.uint64(_SHIFT)
        return one
    r = np.asarray(runs, np.uint64).reshape(-1, 2)
    starts = np.concatenate(([0], np.cumsum(r[:, 1])[:-1])).astype(np.uint64)
    pts = pts0
    k = np.searchsorted(starts, pts, side="right") - 1
    out: np.ndarray = (r[k, 0] + (pts - starts[k])) >> np.uint64(_SHIFT)
    return out


def stale_window(domain: IommuDomain, iotlb: Iotlb | None = None) -> StaleWindow:
    """The stale-translation window a domain's unmaps leave open right now.

    On a lazy domain every DMA-API unmap since the last flush sits on the
    flush queue with its page-table entries cleared and no invalidation
    issued (``iommu_dma_free_iova`` -> ``queue_iova``); until
    ``fq_flush_iotlb`` runs, a device holding a cached translation of any
    of those bytes still reaches the old pages.  Take it before the flush
    (e.g. at the end of a strategy's unmap phase).  A strict domain always
    gives zeros: its unmaps invalidate before they return.

    Parameters
    ----------
    domain : IommuDomain
    iotlb : Iotlb, optional
        The IOMMU's cache, to also count the stale pages it holds now.

    Returns
    -------
    StaleWindow
        ``queued_unmaps`` and ``queued_bytes`` (the hardware-independent
        exposure: what any IOTLB may still reach), and
        ``cached_stale_pages`` / ``cached_stale_bytes`` (what this model's
        cache does reach).
    """
    _need_domain(domain, "stale_window")
    if iotlb is not None and not isinstance(iotlb, Iotlb):
        raise TypeError(f"stale_window: iotlb must be an Iotlb or None, not {type(iotlb).__name__}")
    q = domain.queued()
    pages = iotlb.stale_pages(domain) if iotlb is not None else 0
    return StaleWindow(int(len(q)), int(q[:, 1].sum()) if len(q) else 0, pages, pages * _PAGE)
