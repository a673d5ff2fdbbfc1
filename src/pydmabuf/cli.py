"""The ``pydmabuf`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

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

    s = sub.add_parser(
        "scenario",
        help="run a narrated driver scenario (VFIO, iommufd, KVM, RDMA, GPU ...)",
        description="Run one of the built-in scenarios on the default machine, "
        "narrating each step and ending with a summary.",
    )
    s.add_argument("name", nargs="?", help="the scenario to run (see --list)")
    s.add_argument("--list", action="store_true", help="list the scenarios")
    s.add_argument("--all", action="store_true", help="run every scenario in turn")
    return p


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def _load_study(path: str) -> dict[str, object]:
    """A saved study, or ValueError saying why the file is not one."""
    import json

    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a pydmabuf bench study (not JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError(f"{path}: not a pydmabuf bench study (no list of cells; write one with "
                         "'pydmabuf bench --json FILE')")
    return data


def _bench(args: argparse.Namespace) -> int:
    from pydmabuf import bench

    if args.compare:
        try:
            old, new = (_load_study(p) for p in args.compare)
            text = bench.compare(old, new, show_all=args.all)  # TypeError, ValueError: not a study result
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
    # Sizes named on the command line are made even for the pagemap layout.
    max_real = None if args.sizes else bench.QUICK_MAX_REAL_PAGES if args.quick else bench.DEFAULT_MAX_REAL_PAGES
    result: dict[str, object] = {}
    rc = 0
    try:
        bench.run_study(layouts, sizes, seed=args.seed, quick=args.quick,
                        progress=False if args.no_progress else None, max_real_pages=max_real, result=result)
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
    if args.json:
        _write(args.json, bench.to_json(result))
    if args.csv:
        _write(args.csv, bench.to_csv(result))
    if args.markdown:
        _write(args.markdown, bench.format_markdown(result))
    if args.plot:
        for path in bench.plot(result, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if "-" not in (args.json, args.csv, args.markdown):
        print(bench.format_table(result))
    return rc


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
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
