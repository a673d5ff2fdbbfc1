"""The ``pydmabuf`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from types import ModuleType
from typing import Any, Sequence

from pydmabuf import bench, errors, kernel_work, replay, scenarios
from pydmabuf._about import VERSION
from pydmabuf._types import _parse_size
from pydmabuf.machine import Machine

__all__ = ["main"]


def _sizes(text: str) -> list[int]:
    """``--sizes``: a comma list of sizes in the machine files' syntax
    (``4096``, ``0x1000``, ``64K``, ``4 GiB``), each a whole number of pages;
    returned as page counts."""
    out = []
    for part in text.split(","):
        nbytes = _parse_size(part)
        if nbytes is None:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a size (e.g. 4096, 0x1000, 64K, 4 GiB)")
        if nbytes < 4096 or nbytes % 4096:
            raise argparse.ArgumentTypeError(f"{text!r}: sizes must be whole pages (multiples of 4 KiB)")
        out.append(nbytes // 4096)
    return out


def _check_output(path: str | None, option: str) -> str | None:
    """Why ``path`` cannot be written, or None: checked before a run so a
    typo does not cost the run."""
    if path is None or path == "-":
        return None
    if os.path.isdir(path):
        return f"{option} {path}: is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{option} {path}: no directory {parent}"
    if not os.access(parent if not os.path.exists(path) else path, os.W_OK):
        return f"{option} {path}: permission denied"
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pydmabuf",
        description="An executable model of the Linux dma-buf / DMA-mapping stack.",
    )
    p.add_argument("--version", action="version", version=f"pydmabuf {VERSION}")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser(
        "bench",
        help="run the mapping-throughput study",
        description="Time the mapping strategies on page layouts and buffer sizes, interleaved in rounds, "
        "with a 95% interval per cell, against a C floor and NumPy run in the same process.",
    )
    b.add_argument("--quick", action="store_true", help="a run of a few seconds")
    b.add_argument("--layouts", default=None, help="comma list of layouts (default: all)")
    b.add_argument("--sizes", type=_sizes, default=None,
                   help="comma list of buffer sizes, e.g. 4K,1M,4G (default 4K..4G; a pagemap buffer above "
                   "256 MiB is made only when its size is given here)")
    b.add_argument("--seed", type=int, default=1, help="seed of the random layouts (default 1)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    b.add_argument("--csv", metavar="FILE", help="write the results as CSV ('-' for stdout)")
    b.add_argument("--markdown", metavar="FILE", help="write a Markdown summary of the mapping costs ('-' for stdout)")
    b.add_argument("--plot", metavar="FILE.png",
                   help="draw ns/page against buffer size per layout, and the work per page in FILE-work.png "
                   "(needs matplotlib)")
    b.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                   help="compare two saved results instead of running: the significant differences "
                   "and how well the runs agree")
    b.add_argument("--all", action="store_true", help="with --compare: list every cell, not only significant ones")
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


def _replay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
                   help=f"comma list (default: all): {', '.join(replay.STRATEGIES)}")
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


def _load_study(path: str) -> dict[str, object]:
    """A saved study, or ValueError saying why the file is not one."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a pydmabuf bench study (not JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError(f"{path}: not a pydmabuf bench study (no list of cells; write one with "
                         "'pydmabuf bench --json FILE')")
    return data


def _write_outputs(args: argparse.Namespace, result: dict[str, Any], fmt: ModuleType) -> None:
    """``--json``, ``--csv``, ``--markdown``: each asked-for file, written
    by the formatter module of the command (bench or replay)."""
    for path, render in ((args.json, fmt.to_json), (args.csv, fmt.to_csv), (args.markdown, fmt.format_markdown)):
        if path:
            _write(path, render(result))


def _bench(args: argparse.Namespace) -> int:
    if args.compare:
        try:
            old, new = (_load_study(p) for p in args.compare)
            text = bench.compare(old, new, show_all=args.all)  # TypeError, ValueError: not a study result
        except (OSError, ValueError, TypeError) as e:
            print(f"pydmabuf bench --compare: {e}", file=sys.stderr)
            return 2
        print(text)
        return 0
    for option in ("json", "csv", "markdown", "plot"):
        problem = _check_output(getattr(args, option), f"--{option}")
        if problem:
            print(f"pydmabuf bench: {problem}", file=sys.stderr)
            return 2
    if args.plot:
        try:  # imported here on purpose: matplotlib is the optional [plot] extra, only --plot needs it
            import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            print("pydmabuf bench --plot needs matplotlib: pip install 'pydmabuf[plot]'", file=sys.stderr)
            return 2
    layouts = args.layouts.split(",") if args.layouts else list(bench.DEFAULT_LAYOUTS)
    sizes = args.sizes or list(bench.QUICK_SIZES if args.quick else bench.DEFAULT_SIZES)
    # Sizes named on the command line are made even for the pagemap layout.
    max_real = None if args.sizes else bench.QUICK_MAX_REAL_PAGES if args.quick else bench.DEFAULT_MAX_REAL_PAGES
    result: dict[str, object] = {}
    rc = 0
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
            if not args.sizes:
                max_real = None  # the cells asked for are measured, whatever their size
    except (OSError, ValueError) as e:  # a bad profile or cell, refused before anything runs
        print(f"pydmabuf bench: {e}", file=sys.stderr)
        return 2
    try:
        bench.run_study(layouts, sizes, seed=args.seed, quick=args.quick,
                        progress=False if args.no_progress else None, max_real_pages=max_real, result=result,
                        cost_profile=profile)
    except (ValueError, TypeError) as e:  # an unknown layout: run_study checks before it runs anything
        print(f"pydmabuf bench: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a size too big for memory, refused before anything runs
        print(f"pydmabuf bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pydmabuf bench: interrupted; writing the cells measured so far", file=sys.stderr)
        rc = 130
    if not result.get("cells") and rc:
        return rc
    explained = None
    if args.explain:
        try:
            explained = "\n\n".join(bench.explain(result, c) for c in args.explain)
        except ValueError as e:  # the cell was skipped or interrupted
            print(f"pydmabuf bench: {e}", file=sys.stderr)
            return 1
        print(explained)
    _write_outputs(args, result, bench)
    if args.plot:
        for path in bench.plot(result, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if "-" not in (args.json, args.csv, args.markdown) and explained is None:
        print(bench.format_table(result))
    return rc


def _scenario(args: argparse.Namespace) -> int:
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
            geometry = replay.geometry_from_machine(Machine.from_toml(args.machine))
        profile = kernel_work.load_profile(args.cost_profile) if args.cost_profile else None
        units = kernel_work.unit_costs(profile, rounds=5)
        source: Any = sys.stdin.buffer if args.trace == "-" else args.trace
        result = replay.replay(source, strategies=strategies, units=units, geometry=geometry, device=args.device,
                               limit=args.limit, progress=False if args.no_progress else None)
    except (OSError, ValueError, errors.DmaBufError) as e:
        print(f"pydmabuf replay: {e}", file=sys.stderr)
        return 2
    _write_outputs(args, result, replay)
    if "-" not in (args.json, args.csv, args.markdown):
        print(replay.format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pydmabuf`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:  # as argparse does for a missing argument
        parser = _parser()
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: name a command (bench, scenario, replay); see pydmabuf --help", file=sys.stderr)
        return 2
    commands = {"bench": _bench, "scenario": _scenario, "replay": _replay}
    try:
        status = commands[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return status
    except BrokenPipeError:
        # The reader went away (`pydmabuf bench | head -1`): stop quietly,
        # and keep Python from reporting the failed flush of stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


if __name__ == "__main__":
    sys.exit(main())
