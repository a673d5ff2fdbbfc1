"""The ``pydmabuf`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

__all__ = ["main"]


def _sizes(text: str) -> list[int]:
    """Sizes as a comma list of byte counts with optional K/M/G suffixes."""
    out = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("B").removesuffix("I")
        mult = 1
        if part and part[-1] in "KMG":
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[part[-1]]
            part = part[:-1]
        nbytes = int(float(part) * mult)
        if nbytes < 4096 or nbytes % 4096:
            raise argparse.ArgumentTypeError(f"{text!r}: sizes must be whole pages (multiples of 4 KiB)")
        out.append(nbytes // 4096)
    return out


def _parser() -> argparse.ArgumentParser:
    from pydmabuf import __version__

    p = argparse.ArgumentParser(
        prog="pydmabuf",
        description="An executable model of the Linux dma-buf / DMA-mapping stack.",
    )
    p.add_argument("--version", action="version", version=f"pydmabuf {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser(
        "bench",
        help="run the mapping-throughput study",
        description="Time the mapping walks on page layouts and buffer sizes, "
        "against a C floor and NumPy run in the same process.",
    )
    b.add_argument("--quick", action="store_true", help="a run of a few seconds")
    b.add_argument("--layouts", default=None, help="comma list of layouts (default: all)")
    b.add_argument("--sizes", type=_sizes, default=None, help="comma list of buffer sizes, e.g. 4K,1M,4G")
    b.add_argument("--seed", type=int, default=1, help="seed of the random layouts (default 1)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    b.add_argument("--csv", metavar="FILE", help="write the results as CSV ('-' for stdout)")
    b.add_argument("--markdown", metavar="FILE", help="write a Markdown summary of the mapping costs ('-' for stdout)")
    b.add_argument("--plot", metavar="FILE.png", help="draw throughput against buffer size (needs matplotlib)")
    b.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                   help="print the ratios between two saved results instead of running")
    b.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    b.add_argument("--cost-profile", metavar="FILE",
                   help="TOML unit costs for the kernel-cost estimate (default: the shipped profile; "
                        "each unit a table with ns and source)")
    b.add_argument("--explain", metavar="CELL", action="append",
                   help="print one cell's kernel-cost estimate term by term (count x unit cost = ns) beside "
                        "the model's own time; CELL is LAYOUT:PAGES:STRATEGY, PAGES a page count or a size "
                        "(e.g. scattered:65536:sg_iommu or scattered:256M:link_pages); repeat it to explain "
                        "several cells of one run (same unit costs); runs only those layouts and sizes "
                        "unless --layouts/--sizes say otherwise")

    s = sub.add_parser(
        "scenario",
        help="run a narrated driver scenario (VFIO, iommufd, KVM, RDMA, GPU ...)",
        description="Run one of the built-in scenarios on the default machine, "
        "narrating each step and ending with a summary.",
    )
    s.add_argument("name", nargs="?", help="the scenario to run (see --list)")
    s.add_argument("--list", action="store_true", help="list the scenarios")
    s.add_argument("--all", action="store_true", help="run every scenario in turn")
    _replay_parser(sub)
    return p


def _replay_parser(sub: Any) -> None:
    from pydmabuf.replay import STRATEGIES

    r = sub.add_parser(
        "replay",
        help="replay a real machine's DMA trace (tracefs trace / trace-cmd report) through the model",
        description="Read the text of tracefs's trace file or of trace-cmd report (events dma:*, iommu:*, "
        "swiotlb:*), rebuild each device's map/unmap stream and replay it on each mapping strategy: kernel "
        "work counts, kernel-cost estimate, IOVA high-water mark and fragmentation, swiotlb use. See docs/replay.md.",
    )
    r.add_argument("trace", metavar="TRACE", help="the trace text ('-' for stdin)")
    r.add_argument("--machine", metavar="SPEC.toml",
                   help="the traced machine (its IOMMU domains' geometry): the model's IOVA choices are "
                        "compared with the trace's DMA addresses")
    r.add_argument("--strategies", default=None,
                   help=f"comma list (default: all): {', '.join(STRATEGIES)}")
    r.add_argument("--device", metavar="NAME", help="replay only this device (its name in the trace)")
    r.add_argument("--limit", type=int, metavar="N", help="stop after N map/unmap operations")
    r.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
    r.add_argument("--csv", metavar="FILE", help="write one row per device and strategy as CSV ('-' for stdout)")
    r.add_argument("--markdown", metavar="FILE", help="write a Markdown report ('-' for stdout)")
    r.add_argument("--cost-profile", metavar="FILE", help="TOML unit costs for the kernel-cost estimate")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def _bench(args: argparse.Namespace) -> int:
    import json

    from pydmabuf import bench

    if args.compare:
        try:
            old, new = (json.loads(open(p).read()) for p in args.compare)
            text = bench.compare(old, new)  # TypeError, ValueError: not a study result
        except (OSError, ValueError, TypeError) as e:
            print(f"pydmabuf bench --compare: {e}", file=sys.stderr)
            return 2
        print(text)
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pydmabuf bench --plot needs matplotlib: pip install 'pydmabuf[plot]'", file=sys.stderr)
            return 2
    layouts = args.layouts.split(",") if args.layouts else list(bench.DEFAULT_LAYOUTS)
    sizes = args.sizes or list(bench.QUICK_SIZES if args.quick else bench.DEFAULT_SIZES)
    from pydmabuf import kernel_work

    try:
        profile = kernel_work.load_profile(args.cost_profile) if args.cost_profile else None
        if args.explain:
            cells = [kernel_work.parse_cell(c) for c in args.explain]
            for text, (lay, npages, strat) in zip(args.explain, cells):
                if strat not in bench.MAPPING_STRATEGIES and strat != "sg_from_pages":
                    raise ValueError(f"--explain {text}: no kernel estimate for strategy {strat!r}; known: "
                                     f"{', '.join(bench.MAPPING_STRATEGIES + ('sg_from_pages',))}")
            layouts = layouts if args.layouts else list(dict.fromkeys(c[0] for c in cells))
            sizes = sizes if args.sizes else list(dict.fromkeys(c[1] for c in cells))
        result = bench.run_study(layouts, sizes, seed=args.seed, quick=args.quick,
                                 progress=False if args.no_progress else None, cost_profile=profile)
        explained = "\n\n".join(bench.explain(result, c) for c in args.explain) if args.explain else None
    except (OSError, ValueError) as e:  # a bad profile or cell; run_study checks before it runs anything
        print(f"pydmabuf bench: {e}", file=sys.stderr)
        return 2
    if explained is not None:
        print(explained)
    if args.json:
        _write(args.json, bench.to_json(result))
    if args.csv:
        _write(args.csv, bench.to_csv(result))
    if args.markdown:
        _write(args.markdown, bench.format_markdown(result))
    if args.plot:
        bench.plot(result, args.plot)
    if "-" not in (args.json, args.csv, args.markdown) and explained is None:
        print(bench.format_table(result))
    return 0


def _scenario(args: argparse.Namespace) -> int:
    from pydmabuf import errors, scenarios

    if args.list or (args.name is None and not args.all):
        width = max(len(n) for n in scenarios.names())
        for n in scenarios.names():
            print(f"{n:<{width}}  {scenarios.get(n).title}")
        return 0
    if not args.verbose:
        # The narration shows what the checker records; do not repeat it.
        logging.getLogger("pydmabuf.checks").setLevel(logging.ERROR)
    todo = scenarios.names() if args.all else [args.name]
    for i, n in enumerate(todo):
        if i:
            print()
        try:
            scenarios.run(n)
        except errors.NotFound as e:
            print(f"pydmabuf scenario: {e.strerror}", file=sys.stderr)
            return 2
    return 0


def _replay(args: argparse.Namespace) -> int:
    from pydmabuf import errors, kernel_work, replay

    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()] if args.strategies else \
        list(replay.STRATEGIES)
    try:
        if args.limit is not None and args.limit < 0:
            raise ValueError("--limit must be >= 0")
        bad = [x for x in strategies if x not in replay.STRATEGIES]
        if bad or not strategies:
            raise ValueError(f"unknown strategy {', '.join(bad) or '(none)'}; known: {', '.join(replay.STRATEGIES)}")
        geometry = None
        if args.machine:
            from pydmabuf import Machine

            geometry = replay.geometry_from_machine(Machine.from_toml(args.machine))
        profile = kernel_work.load_profile(args.cost_profile) if args.cost_profile else None
        units = kernel_work.unit_costs(profile, rounds=5)
        source: Any = sys.stdin.buffer if args.trace == "-" else args.trace
        result = replay.replay(source, strategies=strategies, units=units, geometry=geometry, device=args.device,
                               limit=args.limit, progress=False if args.no_progress else None)
    except (OSError, ValueError, errors.DmaBufError) as e:
        print(f"pydmabuf replay: {e}", file=sys.stderr)
        return 2
    if args.json:
        _write(args.json, replay.to_json(result))
    if args.csv:
        _write(args.csv, replay.to_csv(result))
    if args.markdown:
        _write(args.markdown, replay.format_markdown(result))
    if "-" not in (args.json, args.csv, args.markdown):
        print(replay.format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pydmabuf`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:
        _parser().print_help()
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "scenario":
        return _scenario(args)
    if args.command == "replay":
        return _replay(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
