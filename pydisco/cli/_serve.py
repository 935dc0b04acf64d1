"""``pydisco serve``: run the cloud server from the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import tempfile
from typing import TYPE_CHECKING, Any

import trio

from .._errors import ConfigurationError
from .._groups import single_exception
from . import EXIT_INTERRUPTED
from ._args import existing_file, gguf_model, http_url, non_empty, positive_int, transport_url
from ._args import add_logging_options, configure_logging_from, host_port

if TYPE_CHECKING:
    from ..cloud._backends import Backend
    from ..cloud._server import ServerConfig


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        usage="%(prog)s --listen URL (--token T | --token-file FILE) [options]",
        help="run the cloud server",
        description="Serve answers to pydisco clients over WebSocket, QUIC or any registered transport. "
        "Ctrl-C (SIGINT) or SIGTERM stops it after telling connected clients.",
    )
    parser.add_argument("--listen", action="append", required=True, metavar="URL", type=transport_url,
                        help="where to listen, e.g. wss://0.0.0.0:8443 or quic://0.0.0.0:8443 (repeatable)")  # fmt: skip
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", action="append", type=non_empty, help="an accepted bearer token (repeatable)")
    auth.add_argument("--token-file", type=existing_file, metavar="FILE",
                      help="a file of accepted bearer tokens, one per line (# starts a comment)")  # fmt: skip
    parser.add_argument("--model", type=gguf_model, metavar="PATH",
                        help="GGUF model for the built-in llama.cpp backend (default: SmolLM2)")  # fmt: skip
    parser.add_argument("--upstream", metavar="URL", type=http_url,
                        help="an OpenAI-compatible API to forward to, e.g. http://host:8000/v1")  # fmt: skip
    parser.add_argument("--upstream-key", help="bearer key for the upstream API")
    parser.add_argument("--upstream-model", help="model name to ask the upstream for")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--cert", type=existing_file, metavar="FILE", help="TLS certificate chain (PEM), with --key")
    tls.add_argument("--self-signed", action="store_true",
                     help="make a throwaway certificate for loopback names; its path is printed for clients")  # fmt: skip
    parser.add_argument("--key", type=existing_file, metavar="FILE", help="TLS private key (PEM), with --cert")
    parser.add_argument("--parallel", type=positive_int, default=1, metavar="N",
                        help="answers generated at once (engines); default 1")  # fmt: skip
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help="threads per llama.cpp engine")
    parser.add_argument("--max-streams", type=positive_int, default=16, metavar="N",
                        help="concurrent answers per connection (default 16)")  # fmt: skip
    parser.add_argument("--metrics-listen", type=host_port, metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics and a health check on /healthz")  # fmt: skip
    add_logging_options(parser)
    parser.set_defaults(func=run)


def _tokens(args: argparse.Namespace) -> list[str]:
    if args.token_file is None:
        return list(args.token)
    try:
        lines = args.token_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read --token-file: {e}") from e
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ConfigurationError(f"--token-file {args.token_file} holds no tokens (one per line; # starts a comment)")
    return tokens


def _check_backend_options(args: argparse.Namespace) -> None:
    if args.upstream is not None:
        if args.model is not None:
            raise ConfigurationError("give --model or --upstream, not both")
        if not args.upstream_model:
            raise ConfigurationError("--upstream needs --upstream-model")
    elif args.upstream_key or args.upstream_model:
        raise ConfigurationError("--upstream-key and --upstream-model go with --upstream")


def _backend(args: argparse.Namespace) -> Backend:
    """The answer engine; loads the model (the slow part), so it goes after every other check."""
    from ..cloud._backends import LlamaBackend, OpenAIUpstreamBackend

    if args.upstream is not None:
        return OpenAIUpstreamBackend(args.upstream, model=args.upstream_model, api_key=args.upstream_key)
    return LlamaBackend(args.model, parallel=args.parallel, n_threads=args.threads)


def _tls(args: argparse.Namespace, folder: str) -> ssl.SSLContext | None:
    from ..cloud._server import PLAIN_SCHEMES
    from ..cloud._tls import LOOPBACK_NAMES, Credentials, self_signed, server_ssl_context
    from ..transports import split_url

    if (args.cert is None) != (args.key is None):
        raise ConfigurationError("--cert and --key go together")
    if args.self_signed:
        credentials = self_signed(LOOPBACK_NAMES)
        cert, _ = credentials.write(folder)
        print(f"self-signed certificate for {', '.join(LOOPBACK_NAMES)}: {cert}", flush=True)
        return server_ssl_context(credentials)
    if args.cert is not None:
        try:
            return server_ssl_context(Credentials.from_files(args.cert, args.key))
        except ConfigurationError as e:
            raise ConfigurationError(f"--cert {args.cert} with --key {args.key}: {e}") from e
    secure = [url for url in args.listen if split_url(url)[0] not in PLAIN_SCHEMES]
    if secure:
        raise ConfigurationError(f"{secure[0]} needs TLS: give --cert and --key, or --self-signed")
    return None


def run(args: argparse.Namespace) -> int:
    from ..cloud._server import ServerConfig

    configure_logging_from(args, default=logging.WARNING)
    _check_backend_options(args)
    tokens = _tokens(args)
    with tempfile.TemporaryDirectory(prefix="pydisco-serve-") as folder:
        ssl_context = _tls(args, folder)
        config = ServerConfig(
            listen=args.listen,
            tokens=tokens,
            backend=_backend(args),
            ssl_context=ssl_context,
            parallel=args.parallel,
            max_streams_per_connection=args.max_streams,
            metrics_listen=args.metrics_listen,
        )
        stopped_by = trio.run(_serve_until_signal, config)
    return EXIT_INTERRUPTED if stopped_by == signal.SIGINT else 0


async def _serve_until_signal(config: ServerConfig) -> int:
    """Serve until SIGINT or SIGTERM; the signal that stopped it."""
    from ..cloud._server import RunningServer, serve

    stopped_by: int = signal.SIGTERM
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    server: RunningServer = await nursery.start(serve, config)
                except OSError as e:  # the OS refused a listener (port taken, address not here)
                    where = " or ".join(config.listen)
                    raise ConfigurationError(f"cannot listen on {where}: {e.strerror or e}") from e
                for url in server.urls:
                    print(f"listening on {url}", flush=True)
                if server.metrics_listener is not None:
                    print(f"metrics on {server.metrics_listener.url}/metrics", flush=True)
                async for stopped_by in signals:
                    print("stopping", flush=True)
                    nursery.cancel_scope.cancel()
                    break
        except BaseExceptionGroup as group:  # a bad config or a taken port: one error, say it plainly
            story = single_exception(group)
            raise story from story.__cause__  # not `from None`: that would drop the OSError behind it
    return stopped_by
