"""The server with the real model (SmolLM2, greedy) over every transport scheme."""

from __future__ import annotations

import msgpack
import pytest
import trio

from cloud_support import (
    TOKEN,
    MODEL_THREADS,
    CountingBackend,
    StallingBackend,
    client_context,
    drain,
    handshake,
    local_answer,
    raw_connect,
    reference_engine,
    running_server,
    server_backend,
    start_server,
    Token,
    tokens_of,
    trio_test,
    wait_until,
)
from pydisco.cloud import protocol as P
from pydisco.cloud import open_cloud_endpoint
from pydisco._errors import AuthenticationError, EndpointUnavailable
from pydisco._types import GenerationRequest, TokenPiece
from transport_schemes import SCHEMES

pytestmark = pytest.mark.model


def chat(question: str, max_tokens: int = 8, request_id: str = "") -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                             request_id=request_id)  # fmt: skip


_expected: dict[str, tuple[Token, ...]] = {}


def expected(request: GenerationRequest) -> tuple[Token, ...]:
    """The local engine's greedy answer (computed once per session for each request)."""
    key = repr(request)
    if key not in _expected:
        _expected[key] = tokens_of(local_answer(request)[0])
    return _expected[key]


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(30)
async def test_the_answer_equals_the_local_greedy_answer(scheme: str) -> None:
    request = chat("What is the capital of France?")
    async with running_server(server_backend(), [scheme]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
            got: list[TokenPiece] = []
            result = await cloud.generate(request, got.append)
            stats = cloud.statistics()
    assert tokens_of(got) == expected(request)
    assert result.generated_tokens == len(got) and result.finish_reason in ("stop", "length")
    assert result.prompt_tokens > 0
    assert len(stats.ttft_samples) == 1 and stats.server_model == server_backend().model_id


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(40)
async def test_concurrent_clients_and_streams_each_get_their_own_answer(scheme: str) -> None:
    requests = [chat("Name a color.", 6), chat("Say hello.", 6), chat("What is 2+2?", 6)]
    answers: dict[int, list[TokenPiece]] = {i: [] for i in range(len(requests))}
    async with running_server(server_backend(), [scheme]) as server:
        url, ctx = server.urls[0], client_context(scheme)
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=ctx) as one, open_cloud_endpoint(
            url, token=TOKEN, ssl_context=ctx
        ) as two:
            async with trio.open_nursery() as nursery:
                # Two streams on one connection, one on another connection, all at once.
                nursery.start_soon(one.generate, requests[0], answers[0].append)
                nursery.start_soon(one.generate, requests[1], answers[1].append)
                nursery.start_soon(two.generate, requests[2], answers[2].append)
            assert server.statistics().connections_open == 2
        assert server.statistics().streams_completed == 3
    for i, request in enumerate(requests):
        assert tokens_of(answers[i]) == expected(request), i


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(30)
async def test_wrong_or_missing_tokens_are_refused_counted_and_generate_nothing(scheme: str) -> None:
    backend = CountingBackend(server_backend())
    async with running_server(backend, [scheme]) as server:
        url = server.urls[0]
        async with open_cloud_endpoint(url, token="wrong", ssl_context=client_context(scheme)) as cloud:
            with pytest.raises(AuthenticationError):
                await cloud.generate(chat("Hi"), lambda piece: None)
        # Missing: hello, then straight to generate with no auth frame.
        raw = await raw_connect(url, scheme)
        await raw.send_frame(0, P.encode(P.Hello((1,))))
        await raw.send_frame(1, P.encode(P.Generate(chat("Hi"))))
        frames = [P.decode(data) for _, data in await drain(raw)]
        await raw.aclose()
        assert isinstance(frames[0], P.Welcome)
        assert frames[-1] == P.Error(P.Code.UNAUTHORIZED, frames[-1].message)  # type: ignore[union-attr]
        await wait_until(lambda: server.statistics().connections_open == 0)
        stats = server.statistics()
    assert stats.auth_failures == 2
    assert backend.calls == 0 and stats.streams_started == 0 and stats.tokens_generated == 0


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(40)
async def test_malformed_frames_close_only_their_connection(scheme: str) -> None:
    request = chat("Tell me about the sea.", 12)
    limit = 4096
    bad_inputs = [
        ("garbage", False, 0, b"\xc1\xff\x00garbage", P.Code.BAD_FRAME),
        ("wrong types", True, 1, msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": "ten"}), P.Code.BAD_FRAME),
        ("oversized", True, 1, P.encode(P.Generate(GenerationRequest(prompt="x" * limit, max_tokens=4))),
         P.Code.FRAME_TOO_LARGE),
    ]  # fmt: skip
    async with running_server(server_backend(), [scheme], max_frame_size=limit) as server:
        url = server.urls[0]
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=client_context(scheme)) as good:
            got: list[TokenPiece] = []
            first_token = trio.Event()

            def sink(piece: TokenPiece) -> None:
                got.append(piece)
                first_token.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(good.generate, request, sink)
                await first_token.wait()  # the good answer is streaming while the bad clients come
                for name, authenticate, sid, data, code in bad_inputs:
                    raw = await raw_connect(url, scheme)
                    if authenticate:
                        await handshake(raw)
                    await raw.send_frame(sid, data)
                    frames = [(s, P.decode(d)) for s, d in await drain(raw)]
                    await raw.aclose()
                    assert frames and frames[-1][0] == 0, name
                    error = frames[-1][1]
                    assert isinstance(error, P.Error) and error.code == code, (name, error)
        stats = server.statistics()
    assert tokens_of(got) == expected(request)
    assert stats.protocol_errors == len(bad_inputs) and stats.streams_completed == 1


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(40)
async def test_a_client_that_vanishes_mid_answer_stops_the_backend(scheme: str) -> None:
    backend = CountingBackend(server_backend())
    max_tokens = 300
    request = GenerationRequest(prompt="Count: 1, 2, 3, 4, 5, 6,", max_tokens=max_tokens, request_id="vanish")
    async with running_server(backend, [scheme]) as server:
        raw = await raw_connect(server.urls[0], scheme)
        await handshake(raw)
        await raw.send_frame(1, P.encode(P.Generate(request)))
        for _ in range(3):
            sid, data = await raw.receive_frame()
            assert sid == 1 and isinstance(P.decode(data), P.Token)
        await raw.aclose()  # no cancel frame: the client is simply gone
        await wait_until(lambda: "vanish" in backend.finished)
        produced_at_stop = backend.produced["vanish"]
        await wait_until(lambda: server.statistics().connections_open == 0)
        await trio.sleep(0.1)
        stats = server.statistics()
    assert backend.finished["vanish"] == "cancelled"
    assert 3 <= produced_at_stop < max_tokens
    assert backend.produced["vanish"] == produced_at_stop  # nothing after the stop
    assert stats.streams_cancelled == 1 and stats.streams_completed == 0 and stats.running == 0


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(40)
async def test_a_server_restart_is_a_clear_error_and_resume_gives_the_same_answer(scheme: str) -> None:
    request = chat("Why is the sky blue?", 10)
    full = expected(request)
    committed: list[TokenPiece] = []
    stalling = StallingBackend(server_backend(), limit=4)
    failure: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        first, first_life = await start_server(nursery, stalling, [scheme])
        url = first.urls[0]
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=client_context(scheme)) as cloud:

            async def ask() -> None:
                try:
                    await cloud.generate(request, committed.append)
                except EndpointUnavailable as e:
                    failure.append(e)

            nursery.start_soon(ask)
            await stalling.stalled.wait()
            await wait_until(lambda: len(committed) == 4)
            first_life.cancel()  # the server goes down mid-answer
            await wait_until(lambda: bool(failure))
            assert "after 4 tokens" in str(failure[0])
            assert tokens_of(committed) == full[:4]
            assert not cloud.statistics().connected
            # A new server on the same URL: the same endpoint reconnects and resumes.
            await first_life.stopped.wait()  # a restarted server binds once the old one let go
            _, second_life = await start_server(nursery, server_backend(), [scheme], url=url)
            resume = GenerationRequest(messages=request.messages, max_tokens=request.max_tokens,
                                       resume_token_ids=tuple(p.token_id for p in committed))  # fmt: skip
            rest: list[TokenPiece] = []
            await cloud.generate(resume, rest.append)
            assert cloud.statistics().connects == 2
        second_life.cancel()
    assert tokens_of(committed + rest) == full


SYSTEM_TEXT = "You answer questions about ships and harbours in one short sentence. " * 6


def _ask(question: str) -> GenerationRequest:
    messages = [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": question}]
    return GenerationRequest(messages=messages, max_tokens=2)


@trio_test(120)
async def test_the_backend_gives_a_request_the_engine_that_holds_its_prefix() -> None:
    from pydisco.cloud import LlamaBackend
    from pydisco.device import LlamaEngine

    second = LlamaEngine(n_ctx=1024, n_threads=MODEL_THREADS)
    backend = LlamaBackend.from_engines([reference_engine(), second])
    try:
        for engine in (reference_engine(), second):
            engine.clear_cache()
        await backend.generate(_ask("What is a pier?"), lambda _: None)  # the first engine
        # Both idle again, the warm one last in line: it is still the one chosen, and only the
        # part after the shared system prompt is computed.
        result = await backend.generate(_ask("What is a tide?"), lambda _: None)
        assert result.prefilled_tokens < result.prompt_tokens - 64
        assert second.cached_tokens == 0
    finally:
        second.close()
