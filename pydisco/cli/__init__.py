"""The ``pydisco`` command. Each subcommand lives in its own module with ``add_parser``.

Every failure ends in one line on stderr: exit status 2 for a command line or configuration
that cannot work (argparse's usage errors included), 1 for an answer that failed or a bug,
130 for Ctrl-C. ``--debug`` (on every subcommand) adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from .._errors import ConfigurationError, ModelError, PydiscoError
from .._groups import single_exception
from ._config import enable_config, resolve_options

# Modules that provide subcommands: each has `add_parser(subparsers) -> None`, and the parser it
# adds sets `func=callable(args) -> int`, which raises to fail.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pydisco.cli._run",
    "pydisco.cli._profile",
    "pydisco.cli._serve",
    "pydisco.cli._replay",
    "pydisco.cli._bench",
)

EXIT_FAILED = 1  # the work was tried and failed (no endpoint could finish the answer), or a bug
EXIT_USAGE = 2  # the command line or the configuration it names cannot work (argparse's status)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


DESCRIPTION = "Stream LLM answers with an on-device and a cloud model working together."
EPILOG = (
    "Whatever goes wrong, stderr gets one line naming the problem. Exit status: 0 done; 1 the answer "
    "failed or pydisco hit a bug; 2 a command line or configuration that cannot work; 130 Ctrl-C. "
    "--debug adds the traceback."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydisco", description=DESCRIPTION, epilog=EPILOG)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    for subparser in subparsers.choices.values():
        subparser.add_argument("--debug", action="store_true", help="Print the traceback of an error.")
    for name, subparser in subparsers.choices.items():  # last: --config covers every option above
        if any(action.dest == "config" for action in subparser._actions):
            enable_config(subparser, name, frozenset(subparsers.choices))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args = resolve_options(args)  # --config FILE and the defaults of what was not given
        status: int = args.func(args)
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as error:
        return report_failure(f"pydisco {args.command}", error, debug=args.debug is True)
    return status


def report_failure(prog: str, error: BaseException, *, debug: bool) -> int:
    """Say in one line on stderr what went wrong (after the traceback, with ``debug``); the
    exit status. Ctrl-C is quiet."""
    story = single_exception(error) if isinstance(error, BaseExceptionGroup) else error
    if isinstance(story, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(error)
    if isinstance(story, (ConfigurationError, ModelError, OSError)):
        message, status = str(story), EXIT_USAGE
    elif isinstance(story, PydiscoError):
        message, status = str(story), EXIT_FAILED
    else:
        message = f"unexpected {type(story).__name__}: {story} (a bug in pydisco; --debug shows where)"
        status = EXIT_FAILED
    # One line, whatever the message holds (llama.cpp's log lines, say).
    print(f"{prog}: {' '.join(message.split()) or type(story).__name__}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
