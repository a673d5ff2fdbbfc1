"""The hardware's view of memory: the one gate every access passes.

A device's DMA (through the IOMMU, dma-direct or a peer's BAR), a swiotlb
bounce copy made on a device's behalf, a CPU mapping (mmap or vmap) and a
guest access through KVM's second stage all reach physical memory through
:func:`access` (or, for the bounce copies, :func:`bounce_check` /
:func:`bounce_copy`).  The gate, in one order for every path:

1. runs the state checks the upper layers registered for the accessor's
   kind (:func:`add_check`; dma-buf registers "DMA through a mapping its
   importer was told to drop");
2. translates the address with the path's own ``translate`` (IOMMU page
   table and IOTLB, dma_range_map, EPT, the exporter's ranges ...) and
   checks the outcome: a translation through a stale IOTLB entry (its
   page-table entry was cleared, the invalidation not yet issued) reaches
   the old page as hardware does, and is the ``stale-iotlb`` lifetime
   rule (:func:`stale_translation`);
3. checks the lease, when the path holds one: the pages' owner is still
   the generation the mapping was made against, not revoked, not
   released (:class:`Lease`);
4. checks every physical run against the machine's address map with the
   accessor's capability: confidential memory only for a trusted
   accessor, no reserved region, no BAR that stopped decoding, nothing
   where no memory is;
5. only then copies, with :class:`~pydmabuf.memory.PhysMemory`'s raw
   accessors, which nothing else in the package calls (a test keeps it so).

Every refusal is the accessor's own error (a device's IOMMU fault, the
CPU's SIGBUS, a guest's fault), names the accessor, and for stale
mappings the importer held responsible.  The module sits in the hardware
layer: it imports nothing above :mod:`pydmabuf.machine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydmabuf import checks, errors
from pydmabuf._types import RangeKind
from pydmabuf.pci import Bar
from pydmabuf.memory import PhysMemory

if TYPE_CHECKING:
    from pydmabuf.machine import Machine

__all__ = ["Accessor", "Lease", "PageOwner", "Translation", "access", "stale_translation", "add_check", "bounce_check", "bounce_copy",
           "migrate_pages", "DEVICE", "CPU", "GUEST"]

#: Accessor kinds.
DEVICE = "device"
CPU = "cpu"
GUEST = "guest"

Runs = list[tuple[int, int]]


class PageOwner(Protocol):
    """What the gate reads of the owner of a set of pages (a dma-buf):
    its name, the generation of its backing (bumped on every move), and
    whether it was revoked or released."""

    @property
    def name(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def revoked(self) -> bool: ...
    @property
    def released(self) -> bool: ...


class Lease:
    """A mapping's claim on its owner's pages: the owner and the generation
    of the backing the mapping was resolved against.  Stale once the owner
    moved its memory, was revoked or released.

    Parameters
    ----------
    owner : PageOwner
    holder : str
        The mapping that holds the lease, named when it is refused (a
        description, not the object: a lease never keeps its mapping
        alive).
    """

    __slots__ = ("owner", "generation", "holder")

    def __init__(self, owner: PageOwner, holder: str) -> None:
        self.owner = owner
        self.generation = owner.generation
        self.holder = holder

    def stale(self) -> str | None:
        """Why the lease no longer holds, or None."""
        o = self.owner
        if o.released:
            return f"{o.name} was released"
        if o.revoked:
            return f"{o.name} was revoked"
        if o.generation != self.generation:
            return (f"{o.name} moved its memory (generation {self.generation} -> {o.generation}); "
                    f"{self.holder} still points at the old pages")
        return None

    def __repr__(self) -> str:
        return f"<Lease {self.owner.name} gen {self.generation}>"


class Accessor:
    """Who reaches memory.

    Parameters
    ----------
    kind : str
        :data:`DEVICE`, :data:`CPU` or :data:`GUEST`: picks the checks the
        upper layers registered.
    name : str
        Named in every refusal.
    machine : Machine
        Whose memory and address map.
    subject : Any
        The device, mapping or VM; handed to the registered checks.
    fault : callable
        ``fault(addr, reason) -> DmaBufError``: the accessor's refusal (a
        device's IommuFault, the CPU's SIGBUS ...).
    trusted : callable
        Whether the accessor may reach confidential (private) memory, read
        at each access (a device's TDISP state can change).
    """

    __slots__ = ("kind", "name", "machine", "subject", "fault", "trusted")

    def __init__(self, kind: str, name: str, machine: Any, subject: Any,
                 fault: Callable[[int, str], errors.DmaBufError], trusted: Callable[[], bool]) -> None:
        if kind not in _checks:
            raise ValueError(f"unknown accessor kind {kind!r}")
        self.kind = kind
        self.name = name
        self.machine = machine
        self.subject = subject
        self.fault = fault
        self.trusted = trusted

    def __repr__(self) -> str:
        return f"<Accessor {self.kind} {self.name}>"


class Translation:
    """What a ``translate`` callable may return instead of bare runs: the
    runs and the stale IOTLB entries (:class:`pydmabuf.iotlb.StaleHit`)
    the translation went through."""

    __slots__ = ("runs", "stale")

    def __init__(self, runs: Runs, stale: list[Any]) -> None:
        self.runs = runs
        self.stale = stale


def stale_translation(acc: Accessor, addr: int, hits: list[Any]) -> None:
    """The gate's ``stale-iotlb`` check: the access reached pages through
    IOTLB entries whose page-table entries were cleared but not yet
    invalidated (a lazy domain's unmap waits on the flush queue:
    ``iommu_dma_free_iova`` -> ``queue_iova``; the invalidation comes with
    ``fq_flush_iotlb``).  Hardware reaches the old page; the checker raises
    (strict) or records (report mode, and the access goes on)."""
    for h in hits:
        what = (f"through a mapping of {h.mapping!r}" if h.mapping is not None
                else "through an IOVA that was unmapped")
        checks.checker.lifetime(
            "stale-iotlb",
            f"{acc.name} did DMA at {addr:#x} {what}: it hit a {h.describe()}; the mapping was unmapped "
            "but the IOMMU has not been invalidated yet (lazy flush queue), so the device still reaches "
            "the old page",
            *((h.mapping,) if h.mapping is not None else ()), culprit=h.culprit)


Check = Callable[[Any, int, int, bool], None]
_checks: dict[str, list[Check]] = {DEVICE: [], CPU: [], GUEST: []}


def add_check(kind: str, fn: Check) -> None:
    """Register ``fn(subject, addr, nbytes, write)``, run before every
    access of ``kind`` (it raises, or reports through the checker, to
    refuse).  How an upper layer that knows a buffer's state (dma-buf's
    mapping tracking) puts that knowledge into the gate without the gate
    importing it."""
    if kind not in _checks:
        raise ValueError(f"unknown accessor kind {kind!r}")
    _checks[kind].append(fn)


_RAM, _PRIVATE, _RESERVED, _MMIO = RangeKind.RAM, RangeKind.PRIVATE, RangeKind.RESERVED, RangeKind.MMIO


def _check_runs(acc: Accessor, runs: Runs, addr: int, forbidden_only: bool = False) -> None:
    """Step 4: every run against the address map, with the accessor's
    capability (one range-table query per run).  ``forbidden_only``: only
    what the accessor may never reach (confidential memory), for the CPU
    copies of a bounce, which the kernel makes wherever the driver's
    address points."""
    m = acc.machine
    overlapping = m.address_map.overlapping
    trusted: bool | None = None
    for phys, n in runs:
        covered = 0
        for r in overlapping(phys, n):
            kind = r.kind
            if kind == _RAM:  # the common case first; same outcome as falling through the others
                pass
            elif kind == _PRIVATE:
                if trusted is None:
                    trusted = acc.trusted()
                if not trusted:
                    raise acc.fault(addr, f"untrusted {acc.kind} touched confidential memory at phys {phys:#x}")
            elif forbidden_only:
                pass
            elif kind == _RESERVED:
                raise acc.fault(addr, f"phys {max(r.start, phys):#x} is a reserved region")
            elif kind == _MMIO:
                bar = m.owner_of(r.owner)
                if isinstance(bar, Bar) and (not bar.owner.memory_decode or bar.owner.power_state != "D0"):
                    raise acc.fault(addr, f"{bar.owner.name}'s BAR{bar.index} does not decode "
                                          "(memory decode off or low power): unsupported request")
            covered += min(r.end, phys + n) - max(r.start, phys)
        if covered != n and not forbidden_only:
            raise acc.fault(addr, f"no memory or BAR behind phys [{phys:#x}, +{n:#x})")


def access(acc: Accessor, addr: int, nbytes: int, translate: Callable[[], Runs | Translation], *,
           data: memoryview | None = None, leases: tuple[Lease, ...] = ()) -> bytes | None:
    """One access of ``nbytes`` at ``addr`` (in the accessor's address
    space) through the gate: read (``data`` None, returns the bytes) or
    write ``data`` (its length must be ``nbytes``).

    ``translate()`` turns the address into physical runs, (phys, nbytes)
    in order, summing to ``nbytes`` (or a :class:`Translation` carrying
    the stale IOTLB entries it used); it raises the path's own fault.
    ``leases``: the claims of the mapping the path translated through
    (every one must still hold).  Nothing is read or written unless every
    step passes; a refusal raises the accessor's error naming it (and the
    culprit)."""
    write = data is not None
    subject = acc.subject
    for fn in _checks[acc.kind]:
        fn(subject, addr, nbytes, write)
    runs = translate()
    if isinstance(runs, Translation):
        if runs.stale:
            stale_translation(acc, addr, runs.stale)
        runs = runs.runs
    for lease in leases:
        why = lease.stale()
        if why is not None:
            raise acc.fault(addr, f"stale mapping: {why}")
    _check_runs(acc, runs, addr)
    mem: PhysMemory = acc.machine.memory
    if data is None:
        if len(runs) == 1:
            return mem._raw_read(runs[0][0], runs[0][1])
        return b"".join(mem._raw_read(p, n) for p, n in runs)
    pos = 0
    for p, n in runs:
        mem._raw_write(p, data[pos : pos + n])
        pos += n
    return None


def bounce_check(acc: Accessor, orig: int, nbytes: int) -> None:
    """May ``acc`` be given a swiotlb bounce of ``[orig, +nbytes)``?  A
    bounce copies the original to and from shared memory the device
    reaches, so the device reaches the original: the same address-map
    rules as a direct access, checked when the bounce is set up (before
    any slot is taken or byte copied).  Only what the device may never
    reach is refused here (confidential memory without the capability):
    the kernel bounces whatever address the driver hands it."""
    _check_runs(acc, [(orig, nbytes)], orig, forbidden_only=True)


def bounce_copy(acc: Accessor, dst: int, src: int, nbytes: int) -> None:
    """``swiotlb_bounce()``: copy between a bounce slot and the original,
    on behalf of ``acc``; both ends pass the address-map checks."""
    if nbytes:
        _check_runs(acc, [(src, nbytes), (dst, nbytes)], src, forbidden_only=True)
        mem: PhysMemory = acc.machine.memory
        mem._raw_write(dst, mem._raw_read(src, nbytes))


def migrate_pages(machine: Machine, src_pfns: Any, dst_pfns: Any) -> int:
    """The exporter's migration copy (the kernel's own, trusted: the pages
    are the exporter's on both sides, under the reservation lock).  The
    destination ends as an exact copy: its pages are cleared first, since
    the copy moves only pages that hold written data and the rest must not
    show their last owner's bytes.  Returns the pages copied."""
    machine.memory._raw_zero_pages(dst_pfns)
    n: int = machine.memory._raw_copy_pages(src_pfns, dst_pfns)
    return n


def zero_pages(machine: Machine, pfns: Any) -> int:
    """The page allocator's clearing of newly allocated pages
    (``__GFP_ZERO``; the kernel's, trusted): no buffer ever shows its
    pages' previous owner's bytes.  Returns the pages cleared."""
    n: int = machine.memory._raw_zero_pages(pfns)
    return n
