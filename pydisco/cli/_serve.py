"""``pydisco serve``: run the cloud server from the command line."""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import ssl
import sys
import tempfile
from typing import Any

import trio

from ..cloud._backends import Backend, LlamaBackend, OpenAIUpstreamBackend
from .._errors import ConfigurationError, PydiscoError
from ..cloud._server import RunningServer, ServerConfig, serve
from .._groups import single_exception
from ..cloud._tls import LOOPBACK_NAMES, self_signed, server_ssl_context


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the cloud server",
        description="Serve answers to pydisco clients over WebSocket, QUIC or any registered transport.",
    )
    parser.add_argument("--listen", action="append", required=True, metavar="URL",
                        help="where to listen, e.g. wss://0.0.0.0:8443 or quic://0.0.0.0:8443 (repeatable)")  # fmt: skip
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", action="append", help="an accepted bearer token (repeatable)")
    auth.add_argument("--token-file", type=pathlib.Path, help="a file of accepted bearer tokens, one per line")
    parser.add_argument("--model", help="GGUF model for the built-in llama.cpp backend (default: SmolLM2)")
    parser.add_argument("--upstream", metavar="URL", help="an OpenAI-compatible API to forward to, e.g. http://host:8000/v1")
    parser.add_argument("--upstream-key", help="bearer key for the upstream API")
    parser.add_argument("--upstream-model", help="model name to ask the upstream for")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--cert", type=pathlib.Path, help="TLS certificate chain (PEM), with --key")
    tls.add_argument("--self-signed", action="store_true",
                     help="make a throwaway certificate for loopback names; its path is printed for clients")  # fmt: skip
    parser.add_argument("--key", type=pathlib.Path, help="TLS private key (PEM), with --cert")
    parser.add_argument("--parallel", type=int, default=1, help="answers generated at once (engines); default 1")
    parser.add_argument("--threads", type=int, default=None, help="threads per llama.cpp engine")
    parser.add_argument("--max-streams", type=int, default=16, help="concurrent answers per connection")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    parser.set_defaults(func=run)


def _tokens(args: argparse.Namespace) -> list[str]:
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text().splitlines()
        except OSError as e:
            raise ConfigurationError(f"cannot read --token-file: {e}") from e
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(args.token)


def _backend(args: argparse.Namespace) -> Backend:
    if args.upstream is not None:
        if args.model is not None:
            raise ConfigurationError("give --model or --upstream, not both")
        if not args.upstream_model:
            raise ConfigurationError("--upstream needs --upstream-model")
        return OpenAIUpstreamBackend(args.upstream, model=args.upstream_model, api_key=args.upstream_key)
    if args.upstream_key or args.upstream_model:
        raise ConfigurationError("--upstream-key and --upstream-model go with --upstream")
    return LlamaBackend(args.model, parallel=args.parallel, n_threads=args.threads)


def _tls(args: argparse.Namespace, folder: str) -> ssl.SSLContext | None:
    if (args.cert is None) != (args.key is None):
        raise ConfigurationError("--cert and --key go together")
    if args.self_signed:
        credentials = self_signed(LOOPBACK_NAMES)
        cert, _ = credentials.write(folder)
        print(f"self-signed certificate for {', '.join(LOOPBACK_NAMES)}: {cert}", flush=True)
        return server_ssl_context(credentials)
    return None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="pydisco-serve-") as folder:
            config = ServerConfig(
                listen=args.listen,
                tokens=_tokens(args),
                backend=_backend(args),
                ssl_context=_tls(args, folder),
                cert_file=str(args.cert) if args.cert is not None else None,
                key_file=str(args.key) if args.key is not None else None,
                parallel=args.parallel,
                max_streams_per_connection=args.max_streams,
            )
            trio.run(_serve_until_signal, config)
    except (PydiscoError, OSError) as e:
        print(f"pydisco serve: {e}", file=sys.stderr)
        return 2
    return 0


async def _serve_until_signal(config: ServerConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                server: RunningServer = await nursery.start(serve, config)
                for url in server.urls:
                    print(f"listening on {url}", flush=True)
                async for _ in signals:
                    print("stopping", flush=True)
                    nursery.cancel_scope.cancel()
                    break
        except BaseExceptionGroup as group:  # a bad config or a taken port: one error, say it plainly
            raise single_exception(group) from None
