"""The ``pydisco`` command. Each subcommand lives in its own module with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that provide subcommands: each has `add_parser(subparsers) -> None`, and the parser it
# adds sets `func=callable(args) -> int`.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pydisco.cli._run",
    "pydisco.cli._profile",
    "pydisco.cli._serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydisco", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
