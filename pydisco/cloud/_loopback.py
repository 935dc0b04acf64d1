"""A cloud on this machine: a pydisco server on loopback, behind the link emulator.

The embedded default for ``pydisco run``, the benchmarks and the tests: a real server speaking
the real protocol over real TLS (WebSocket or QUIC; or Zenoh, plain) with a real model behind it, reached
through a user-space link that adds a realistic last hop's latency, jitter and loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import secrets
import ssl
from collections.abc import AsyncIterator

import trio

from ._backends import Backend, LlamaBackend
from ..linkemu import REALISTIC_LAST_HOP, LinkControl, LinkProfile, serve_tcp_proxy, serve_udp_proxy
from ._server import PLAIN_SCHEMES, RunningServer, ServerConfig, backend_admission, serve
from ._tls import client_ssl_context, self_signed, server_ssl_context
from .._groups import single_exception

LOOPBACK = "127.0.0.1"
# zenoh:// runs over tcp/, so the TCP link emulator sits in front of it as of WebSocket.
LOOPBACK_TRANSPORTS = ("ws", "wss", "quic", "zenoh")


@dataclasses.dataclass(frozen=True)
class LoopbackCloud:
    """Where the loopback cloud is and how to reach it.

    ``url`` goes through the emulated link; ``direct_url`` skips it. ``link`` cuts and
    restores the link (failover tests); ``server`` has the server's statistics.
    """

    url: str
    direct_url: str
    token: str
    ssl_context: ssl.SSLContext
    link: LinkControl
    server: RunningServer


@contextlib.asynccontextmanager
async def open_loopback_cloud(
    *,
    backend: Backend | None = None,
    model_path: str | None = None,
    n_threads: int | None = None,
    transport: str = "wss",
    profile: LinkProfile | None = REALISTIC_LAST_HOP,
    seed: int = 1,
) -> AsyncIterator[LoopbackCloud]:
    """Start the server (a llama.cpp backend on ``model_path`` unless ``backend`` is given)
    and the link emulator in front of it; stop both on exit. ``profile=None``: a link that
    adds nothing (still cuttable). An exception raised in the block comes out unchanged."""
    if transport not in LOOPBACK_TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(LOOPBACK_TRANSPORTS)}, not {transport!r}")
    credentials = self_signed()
    token = secrets.token_urlsafe(16)
    owned = backend is None
    if backend is None:
        backend = await trio.to_thread.run_sync(lambda: LlamaBackend(model_path, n_threads=n_threads))
    link_profile = profile or LinkProfile(latency=0.0)
    control = LinkControl()
    parallel, max_queue = backend_admission(backend)  # as `pydisco serve` takes it in
    try:
        try:
            async with trio.open_nursery() as nursery:
                config = ServerConfig(
                    listen=[f"{transport}://{LOOPBACK}:0"],
                    tokens=[token],
                    backend=backend,
                    ssl_context=server_ssl_context(credentials) if transport not in PLAIN_SCHEMES else None,
                    parallel=parallel,
                    max_queue=max_queue,
                )
                server: RunningServer = await nursery.start(serve, config)
                port = server.listeners[0].port
                proxy = serve_udp_proxy if transport == "quic" else serve_tcp_proxy
                proxy_port: int = await nursery.start(
                    functools.partial(
                        proxy, LOOPBACK, 0, LOOPBACK, port, link_profile, link_profile, seed=seed, control=control
                    )
                )
                yield LoopbackCloud(
                    url=f"{transport}://{LOOPBACK}:{proxy_port}",
                    direct_url=f"{transport}://{LOOPBACK}:{port}",
                    token=token,
                    ssl_context=client_ssl_context(credentials),
                    link=control,
                    server=server,
                )
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the block's own error, not a group around it
            raise single_exception(group) from None
    finally:
        if owned:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
