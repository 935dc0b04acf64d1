"""OpenAIUpstreamBackend against a real OpenAI-compatible server: llama-cpp-python's, started
here on the same SmolLM2 model, behind a pydisco server."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from cloud_support import TOKEN, running_server, text_of, trio_test
from pydisco.cloud._backends import OpenAIUpstreamBackend
from pydisco.cloud import open_cloud_endpoint
from pydisco._errors import EndpointError, PromptTooLongError
from pydisco.device import default_model_path
from pydisco.device._llama import llama_cpp_server_command
from pydisco._types import GenerationRequest, TokenPiece

UPSTREAM_KEY = "upstream-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """Base URL (``.../v1``) of a llama-cpp-python server running the default model."""
    port = _free_port()
    args = llama_cpp_server_command(sys.executable, "--model", str(default_model_path()), "--host", "127.0.0.1",
                                    "--port", str(port), "--n_ctx", "512", "--n_threads", "1", "--api_key", UPSTREAM_KEY,
                                    "--verbose", "False")  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the upstream server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{base}/models", headers=_auth(), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the upstream server did not start within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _auth(key: str = UPSTREAM_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def direct(base: str, path: str, body: dict[str, Any]) -> list[str]:
    """Text pieces as the upstream streams them, read with plain httpx (the reference)."""
    pieces = []
    with httpx.stream("POST", base + path, json={**body, "stream": True}, headers=_auth(), timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        pieces.append(piece)
    return pieces


def backend(base: str, **kw: Any) -> OpenAIUpstreamBackend:
    return OpenAIUpstreamBackend(base, model="smollm2", api_key=kw.pop("api_key", UPSTREAM_KEY), **kw)


async def through_pydisco(upstream_backend: OpenAIUpstreamBackend, request: GenerationRequest) -> list[TokenPiece]:
    async with running_server(upstream_backend, ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            await cloud.generate(request, got.append)
    await upstream_backend.aclose()
    return got


PROMPT = "The three primary colors are"


@trio_test(60)
async def test_a_completion_through_pydisco_equals_the_direct_stream(upstream: str) -> None:
    want = direct(upstream, "/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "seed": 0, "top_p": 1.0})
    got = await through_pydisco(backend(upstream), GenerationRequest(prompt=PROMPT, max_tokens=10))
    assert [p.text for p in got] == want
    assert [p.position for p in got] == list(range(len(want)))
    assert all(p.token_id == -1 for p in got)


@trio_test(60)
async def test_a_chat_answer_through_pydisco_equals_the_direct_stream(upstream: str) -> None:
    messages = [{"role": "user", "content": "Name a fruit."}]
    want = direct(upstream, "/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0, "seed": 0, "top_p": 1.0})
    got = await through_pydisco(backend(upstream), GenerationRequest(messages=messages, max_tokens=8))
    assert text_of(got) == "".join(want) and len(got) == len(want)


@trio_test(60)
async def test_usage_and_finish_reason_come_through(upstream: str) -> None:
    async with running_server(backend(upstream), ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            result = await cloud.generate(GenerationRequest(prompt=PROMPT, max_tokens=4), lambda p: None)
    assert result.finish_reason == "length" and result.generated_tokens == 4
    # llama-cpp-python ignores stream_options.include_usage: no usage, so 0 (see the canned tests).
    assert result.prompt_tokens == 0


@trio_test(60)
async def test_a_raw_prompt_resumes_from_text(upstream: str) -> None:
    full = direct(upstream, "/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "seed": 0, "top_p": 1.0})
    prefix = "".join(full[:4])
    got = await through_pydisco(
        backend(upstream), GenerationRequest(prompt=PROMPT, max_tokens=10, resume_text=prefix, resume_position=4)
    )
    assert [p.position for p in got] == list(range(4, 4 + len(got)))
    assert prefix + text_of(got) == "".join(full)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, resume_text="Hel"), "bad_request"),
        (GenerationRequest(prompt="Hi", max_tokens=4, resume_token_ids=(1, 2)), "bad_request"),
        # Streaming, llama-cpp-python answers an over-long prompt with 200 and an empty stream.
        (GenerationRequest(prompt="word " * 600, max_tokens=4), "upstream_error"),
    ],
    ids=["chat-resume", "token-id-resume", "too-long"],
)
@trio_test(60)
async def test_requests_the_upstream_cannot_serve_get_stable_codes(upstream: str, request_: GenerationRequest, code: str) -> None:
    with pytest.raises(EndpointError) as info:
        await through_pydisco(backend(upstream), request_)
    assert info.value.code == code


@trio_test(60)
async def test_a_wrong_upstream_key_is_an_upstream_error_not_the_clients(upstream: str) -> None:
    with pytest.raises(EndpointError) as info:
        await through_pydisco(backend(upstream, api_key="wrong"), GenerationRequest(prompt="Hi", max_tokens=2))
    assert info.value.code == "upstream_error" and "401" in str(info.value)


@trio_test(60)
async def test_an_unreachable_upstream_is_upstream_unavailable() -> None:
    dead = OpenAIUpstreamBackend(f"http://127.0.0.1:{_free_port()}/v1", model="m")
    with pytest.raises(EndpointError) as info:
        await through_pydisco(dead, GenerationRequest(prompt="Hi", max_tokens=2))
    assert info.value.code == "upstream_unavailable"


@trio_test(60)
async def test_cancelling_mid_stream_frees_the_upstream_for_the_next_answer(upstream: str) -> None:
    up = backend(upstream)
    async with running_server(up, ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            with trio.CancelScope() as scope:

                def sink(piece: TokenPiece) -> None:
                    got.append(piece)
                    if len(got) == 2:
                        scope.cancel()

                await cloud.generate(GenerationRequest(prompt=PROMPT, max_tokens=200), sink)
            assert scope.cancelled_caught and len(got) == 2
            while server.statistics().streams_cancelled == 0:
                await trio.sleep(0.01)
            after = await through_pydisco(backend(upstream), GenerationRequest(prompt=PROMPT, max_tokens=3))
            assert len(after) == 3
    await up.aclose()


# -- canned upstream answers (what llama-cpp-python does not produce, vLLM and OpenAI do) --------


def canned(status: int, body: str, content_type: str = "text/event-stream") -> OpenAIUpstreamBackend:
    def respond(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        return httpx.Response(status, text=body, headers={"content-type": content_type})

    return OpenAIUpstreamBackend("http://upstream.test/v1", model="m", api_key="k", transport=httpx.MockTransport(respond))


def sse(*events: object) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def chunk(text: str = "", finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


@trio_test(10)
async def test_usage_from_the_final_chunk_is_reported() -> None:
    stream = sse(chunk("Hel"), chunk("lo"), chunk(finish="stop"),
                 {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, "[DONE]")  # fmt: skip
    got: list[TokenPiece] = []
    chat = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=5, resume_position=3)
    with pytest.raises(EndpointError):  # a chat resume needs chat_resume=True
        await canned(200, stream).generate(dataclasses.replace(chat, resume_text="abc"), got.append)
    result = await canned(200, stream).generate(chat, got.append)
    assert text_of(got) == "Hello" and [p.position for p in got] == [3, 4] and {p.token_id for p in got} == {-1}
    assert (result.finish_reason, result.prompt_tokens, result.generated_tokens) == ("stop", 7, 2)


@trio_test(10)
async def test_a_stream_that_is_not_an_event_stream_is_an_upstream_error() -> None:
    backend = canned(200, sse(chunk("a", finish="stop")), content_type="application/json")
    with pytest.raises(EndpointError, match="event stream") as info:
        await backend.generate(GenerationRequest(prompt="x", max_tokens=4), lambda p: None)
    assert info.value.code == "upstream_error"


@trio_test(10)
async def test_events_across_lines_comments_and_line_endings_are_read_as_sse_says() -> None:
    """Comments and data-less events are skipped, multi-line data is joined with newlines,
    CR LF and CR end lines too."""
    first = json.dumps(chunk("Hel"))
    stream = (": keep-alive\r\n\r\nevent: ping\n\n"
              f"data: {first[:10]}\ndata: {first[10:]}\n\n"
              f"data: {json.dumps(chunk('lo', finish='stop'))}\r\rdata: [DONE]\r\n\r\n")  # fmt: skip
    got: list[TokenPiece] = []
    result = await canned(200, stream).generate(GenerationRequest(prompt="x", max_tokens=4), got.append)
    assert [p.text for p in got] == ["Hel", "lo"] and result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, '{"error": {"message": "too long", "code": "context_length_exceeded"}}', "prompt_too_long"),
        (400, '{"error": {"message": "This model\'s maximum context length is 4096 tokens"}}', "prompt_too_long"),
        (400, '{"error": {"message": "unknown field"}}', "bad_request"),
        (429, '{"error": {"message": "slow down"}}', "overloaded"),
        (503, "busy", "overloaded"),
        (500, "boom", "upstream_error"),
        (200, sse(chunk("a"), {"error": {"message": "died"}}), "upstream_error"),
        (200, sse(chunk("a")) + "data: {not json\n\n", "upstream_error"),
        (200, sse(chunk("a")), "upstream_error"),  # neither finish_reason nor [DONE]
        (200, sse(chunk("a")) + "data: [DONE]", "upstream_error"),  # an event without its blank line is not one
    ],
)
@trio_test(10)
async def test_upstream_failures_map_to_stable_codes(status: int, body: str, code: str) -> None:
    with pytest.raises(Exception) as info:
        await canned(status, body).generate(GenerationRequest(prompt="x", max_tokens=4), lambda p: None)
    error = info.value
    mapped = "prompt_too_long" if isinstance(error, PromptTooLongError) else getattr(error, "code", None)
    assert mapped == code, error
