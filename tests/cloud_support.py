"""Helpers shared by the cloud tests (server, client, transports, upstream).

Model objects are cached per process, so however many test modules use them the model loads
once per test session.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import trio.testing

from pydisco.cloud import Backend, LlamaBackend
from pydisco.cloud import RunningServer, ServerConfig, serve
from pydisco.cloud import Credentials, client_ssl_context, self_signed, server_ssl_context
from pydisco.cloud import protocol as P
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink

from pydisco import transports



TOKEN = "test-token-1"
F = TypeVar("F", bound=Callable[..., Any])


def trio_test(timeout: float = 20.0, *, mock_clock: bool = False) -> Callable[[F], F]:
    """Run an async test under trio.run, failing it if it takes longer than ``timeout``.

    With ``mock_clock`` time is virtual (MockClock, autojump): timeouts of seconds take none, and
    ``timeout`` still bounds the virtual time the test may use.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            async def main() -> Any:
                with trio.fail_after(timeout):
                    return await fn(*args, **kwargs)

            clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
            return trio.run(main, clock=clock)

        # pytest reads the signature for fixtures: keep the wrapped one.
        wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


# -- TLS ----------------------------------------------------------------------------------


@functools.cache
def credentials() -> Credentials:
    return self_signed()


def server_tls() -> ssl.SSLContext:
    return server_ssl_context(credentials())


def client_tls() -> ssl.SSLContext:
    return client_ssl_context(credentials())


def listen_url(scheme: str) -> str:
    return f"{scheme}://srv:0" if scheme == "memory" else f"{scheme}://127.0.0.1:0"


PLAIN = ("ws", "memory", "zenoh")  # schemes without TLS of their own


def client_context(scheme: str) -> ssl.SSLContext | None:
    return None if scheme in PLAIN else client_tls()


# -- the model ----------------------------------------------------------------------------


# One thread per engine: the test machines are shared, and llama.cpp's threads wait for each
# other at every step, which costs far more than they gain when the cores are busy elsewhere.
MODEL_THREADS = 1


@functools.cache
def reference_engine() -> Any:
    """A LlamaEngine used only to compute the expected (local, greedy) answers."""
    from pydisco.device import LlamaEngine

    return LlamaEngine(n_ctx=1024, n_threads=MODEL_THREADS)


@functools.cache
def server_backend() -> LlamaBackend:
    """The backend every model test's server uses: one engine, loaded once per session."""
    return LlamaBackend(n_ctx=1024, n_threads=MODEL_THREADS)


def local_answer(request: GenerationRequest) -> tuple[list[TokenPiece], GenerationResult]:
    pieces: list[TokenPiece] = []
    result = reference_engine().generate(request, pieces.append)
    return pieces, result


def text_of(pieces: Sequence[TokenPiece]) -> str:
    return "".join(p.text for p in pieces)


Token = tuple[int, int, str]


def tokens_of(pieces: Sequence[TokenPiece]) -> tuple[Token, ...]:
    """What the pieces say (position, token id, text), without their ages, which depend on
    the run (a cloud piece's age includes the link's round trip)."""
    return tuple((p.position, p.token_id, p.text) for p in pieces)


# -- backends for tests -------------------------------------------------------------------


class CountingBackend:
    """Wraps a backend and counts what it actually produced, per request id."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.produced: dict[str, int] = {}
        self.calls = 0
        self.finished: dict[str, str] = {}  # request id -> "done" / "cancelled" / "error"

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        self.calls += 1
        key = request.request_id
        self.produced[key] = 0

        def counting_sink(piece: TokenPiece) -> None:
            self.produced[key] += 1
            sink(piece)

        try:
            result = await self.inner.generate(request, counting_sink)
        except trio.Cancelled:
            self.finished[key] = "cancelled"
            raise
        except BaseException:
            self.finished[key] = "error"
            raise
        self.finished[key] = "done"
        return result


class StubBackend:
    """Emits ``text{position}`` tokens every ``period`` seconds of Trio time."""

    def __init__(self, period: float = 0.001, first_delay: float = 0.0, model_id: str = "stub") -> None:
        self.period = period
        self.first_delay = first_delay
        self._model_id = model_id
        self.produced = 0
        self.cancelled = 0

    @property
    def model_id(self) -> str:
        return self._model_id

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        n = 0
        try:
            await trio.sleep(self.first_delay)
            for position in range(request.start_position, request.max_tokens):
                if n:
                    await trio.sleep(self.period)
                self.produced += 1
                sink(TokenPiece(position, position, f"t{position} "))
                n += 1
        except trio.Cancelled:
            self.cancelled += 1
            raise
        return GenerationResult("length", 1, 1, n)


class StallingBackend:
    """Runs the inner backend for ``limit`` tokens, then hangs: a server that dies mid-answer."""

    def __init__(self, inner: Backend, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.stalled = trio.Event()

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        short = dataclasses.replace(request, max_tokens=request.start_position + self.limit)
        await self.inner.generate(short, sink)
        self.stalled.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


# -- servers ------------------------------------------------------------------------------


def server_config(backend: Backend, schemes: Sequence[str], **options: Any) -> ServerConfig:
    return ServerConfig(
        listen=[options.pop("url", None) or listen_url(s) for s in schemes],
        tokens=options.pop("tokens", [TOKEN]),
        backend=backend,
        ssl_context=server_tls() if any(s not in PLAIN for s in schemes) else None,
        **options,
    )


@asynccontextmanager
async def running_server(backend: Backend, schemes: Sequence[str], **options: Any) -> AsyncIterator[RunningServer]:
    """A server on loopback (port 0) for ``schemes``, stopped when the block ends."""
    config = server_config(backend, schemes, **options)
    try:
        async with trio.open_nursery() as nursery:
            server: RunningServer = await nursery.start(serve, config)
            yield server
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # let tests see the one exception that happened
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


class ServerLife:
    """A server started by :func:`start_server`: ``cancel()`` stops it (a crash or a restart);
    ``stopped`` is set once it has let go of everything (a QUIC server's one UDP socket stays
    bound while its sessions say goodbye, so a restart on the same port waits for this)."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    def cancel(self) -> None:
        self.scope.cancel()


async def start_server(
    nursery: trio.Nursery, backend: Backend, schemes: Sequence[str], **options: Any
) -> tuple[RunningServer, ServerLife]:
    """A server in ``nursery``, and its life to end it."""
    config = server_config(backend, schemes, **options)
    life = ServerLife()

    async def run(task_status: trio.TaskStatus[RunningServer]) -> None:
        try:
            with life.scope:
                await serve(config, task_status=task_status)
        finally:
            life.stopped.set()

    server: RunningServer = await nursery.start(run)
    return server, life


async def wait_until(predicate: Callable[[], bool], *, poll: float = 0.005) -> None:
    while not predicate():
        await trio.sleep(poll)


async def raw_connect(url: str, scheme: str) -> transports.FrameConnection:
    return await transports.connect(url, ssl_context=client_context(scheme))


async def handshake(connection: transports.FrameConnection, token: str = TOKEN) -> P.ClientProtocol:
    """Hello + auth on a raw transport connection; returns the ready client protocol once
    auth_ok arrived."""
    proto = P.ClientProtocol(token=token)
    for data in proto.handshake():
        await connection.send_frame(0, data)
    while proto.state is P.ClientState.HANDSHAKE:
        sid, data = await connection.receive_frame()
        for out in proto.receive(sid, data):
            assert not isinstance(out, P.CloseConnection), out
    return proto


async def drain(connection: transports.FrameConnection) -> list[tuple[int, bytes]]:
    """Every frame until the peer closes; the close itself must be EndOfChannel or a break."""
    frames = []
    while True:
        try:
            frames.append(await connection.receive_frame())
        except (trio.EndOfChannel, trio.BrokenResourceError):
            return frames
