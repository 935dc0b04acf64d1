"""Argument types shared by the subcommands (argparse ``type=`` functions).

Each turns one command-line string into a checked value or raises ArgumentTypeError with a
line naming what is accepted, so a bad command line stops at parsing: before any model loads,
any port opens or any work starts.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from urllib.parse import urlsplit

from ..policies import dispatch_policy_names, migration_policy_names, step_scheduler_names

# Schemes whose transport only connects within one process (tests): useless from a shell.
IN_PROCESS_SCHEMES = frozenset({"memory"})


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def dispatch_policy(text: str) -> str:
    return _known("dispatch policy", text, dispatch_policy_names())


def migration_policy(text: str) -> str:
    return _known("migration policy", text, migration_policy_names())


def step_scheduler(text: str) -> str:
    return _known("step scheduler", text, step_scheduler_names())


def _known(kind: str, text: str, known: tuple[str, ...]) -> str:
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown {kind} {text!r}; known: {', '.join(known)}")
    return text


def shell_schemes() -> tuple[str, ...]:
    """The transport URL schemes a command line can use (every registered one but in-process)."""
    from .. import transports

    return tuple(s for s in transports.known_schemes() if s not in IN_PROCESS_SCHEMES)


def transport_url(text: str) -> str:
    """``scheme://host[:port]`` with a registered scheme whose transport loads here."""
    from .. import transports

    try:
        scheme, _, _ = transports.split_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    accepted = ", ".join(shell_schemes())
    if scheme not in transports.known_schemes():
        raise argparse.ArgumentTypeError(f"unknown URL scheme {scheme!r} in {text!r}; known: {accepted}")
    if scheme in IN_PROCESS_SCHEMES:
        raise argparse.ArgumentTypeError(f"{scheme}:// works only inside one process; use {accepted}")
    try:
        transports.get_transport(scheme)
    except transports.UnknownTransportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a host (an OpenAI-compatible API's base)."""
    parts = urlsplit(text)
    try:
        parts.port
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL such as http://host:8000/v1, got {text!r}")
    return text


def zenoh_key_prefix(text: str) -> str:
    from ..runtime._zenoh import answer_keys  # imports no zenoh: the check is pure

    try:
        answer_keys(text, "id")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip("/")


def zenoh_endpoint(text: str) -> str:
    protocol, _, address = text.partition("/")
    if not protocol or not address or not protocol.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected a Zenoh endpoint like tcp/127.0.0.1:7447, got {text!r}")
    return text


def existing_file(text: str) -> pathlib.Path:
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def gguf_model(text: str) -> str:
    """A readable GGUF model file (checked by its header, without loading it)."""
    from .._errors import MissingExtraError, ModelError

    try:
        from ..device._models import check_gguf  # imports llama.cpp's bindings, not a model

        check_gguf(pathlib.Path(text).expanduser())
    except (ModelError, MissingExtraError) as e:  # a model path is no use without the device extra
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def host_port(text: str) -> str:
    """``HOST:PORT`` for a plain HTTP listener (``[::1]:9100`` for IPv6)."""
    from .._errors import ConfigurationError
    from ..observability._http import parse_host_port

    try:
        parse_host_port(text)
    except ConfigurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def log_level(text: str) -> int:
    """A logging level by name: debug, info, warning, error, critical (any case)."""
    from ..observability._logging import LEVELS

    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; known: {', '.join(LEVELS)}")
    return level


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """``-v`` (info; ``-vv`` debug), ``--log-level LEVEL`` and ``--log-json``: pydisco's log
    records on stderr, each with the id of the answer it is about."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="Log what pydisco does on stderr (-v: decisions and events, -vv: debug detail).")  # fmt: skip
    parser.add_argument("--log-level", type=log_level, metavar="LEVEL",
                        help="Log records at this level and above: debug, info, warning, error or critical.")  # fmt: skip
    parser.add_argument("--log-json", action="store_true",
                        help="Log as JSON lines, one object per record with its answer_id.")  # fmt: skip


def configure_logging_from(args: argparse.Namespace, default: int | None) -> None:
    """Set up logging as the options of ``add_logging_options`` say. With none of them, log at
    ``default`` (None: nothing at all, the library's own default)."""
    import logging

    from ..observability._logging import configure_logging

    level = args.log_level
    if level is None and args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if level is None and args.log_json:
        level = logging.INFO
    if level is None:
        level = default
    if level is not None:
        configure_logging(level, json_lines=args.log_json)
