"""The ``kronfac`` command line: ``kronfac bench`` and the subcommands other components register."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kronfac import __version__
from kronfac.bench import bench, thermo_cost

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kronfac", description="Kronecker-factored deep learning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kronfac {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(subparsers)
    thermo_cost.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
