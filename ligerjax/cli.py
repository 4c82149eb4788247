"""The ``ligerjax`` command line: ``ligerjax bench NAME [options]``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each benchmark module defines `add_arguments(parser)` and `run(args) -> int`, and prints
# one fixed-format result line (`bench=NAME key=value ...`).
BENCHMARKS: dict[str, str] = {
    "attention": "ligerjax.bench.attention",
    "contention": "ligerjax.bench.contention",
    "generate": "ligerjax.bench.generate",
    "interleave": "ligerjax.bench.interleave",
    "liger-headline": "ligerjax.bench.liger_headline",
    "memory": "ligerjax.bench.memory",
    "throughput": "ligerjax.bench.throughput",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ligerjax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark against a peer in the same run")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = benches.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
