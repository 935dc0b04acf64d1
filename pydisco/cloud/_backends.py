"""What the cloud server generates with: a local llama.cpp engine pool, or an OpenAI-compatible
upstream (vLLM, llama.cpp's server, a hosted API) for users who outgrow one machine.

A backend meets the :class:`Backend` protocol; the server (pydisco.cloud._server) puts its FCFS queue
in front and maps the exceptions raised here to stable error codes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx
import httpx_sse
import trio

from .._errors import ConfigurationError, EndpointError, PromptTooLongError, PydiscoError
from .protocol import Code
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink


class Backend(Protocol):
    """Something the server can generate with."""

    @property
    def model_id(self) -> str:
        """Identifies the model (clients compare it to their device model's to reuse token ids)."""
        ...

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """Generate ``request``, calling ``sink`` in the Trio thread for each token, in order.

        Raises ConfigurationError / PromptTooLongError for requests it cannot run and
        EndpointError(code=...) for its own failures. On cancellation it stops within one
        decode step and trio.Cancelled propagates; the backend stays usable.
        """
        ...


# -- llama.cpp ----------------------------------------------------------------------------


class LlamaBackend:
    """A pool of ``parallel`` :class:`~pydisco.device.LlamaEngine` s, each driven by one worker
    thread at a time. Requests wait in FIFO order for a free engine; of the free engines a
    request takes the one whose KV cache saves it the most prefill (as llama.cpp's server picks
    the slot with the longest common prefix), so a shared system prompt stays warm."""

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        parallel: int = 1,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        seed: int = 0,
    ) -> None:
        from ..device._engine import LlamaEngine  # loads llama.cpp: only when this backend is used

        if parallel < 1:
            raise ConfigurationError(f"parallel must be >= 1, got {parallel!r}")
        engines = []
        try:
            for _ in range(parallel):
                engines.append(LlamaEngine(model_path, n_threads=n_threads, n_ctx=n_ctx, seed=seed))
        except BaseException:
            for engine in engines:
                engine.close()
            raise
        self._init(engines)

    @classmethod
    def from_engines(cls, engines: Sequence[Any]) -> LlamaBackend:
        """A backend over engines that already exist (shared with a device endpoint, a test)."""
        if not engines:
            raise ConfigurationError("a LlamaBackend needs at least one engine")
        self = cls.__new__(cls)
        self._init(list(engines))
        return self

    def _init(self, engines: list[Any]) -> None:
        ids = {e.model_id for e in engines}
        if len(ids) != 1:
            raise ConfigurationError(f"all engines of a backend must hold the same model, got {sorted(ids)}")
        self._engines = engines
        self._idle: collections.deque[Any] = collections.deque(engines)
        # Not a trio.Semaphore: the backend may outlive one trio.run (a test session's fixture).
        self._waiters: collections.deque[trio.Event] = collections.deque()
        self._model_id: str = ids.pop()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def parallel(self) -> int:
        return len(self._engines)

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """See :class:`Backend`. Cancellation aborts the engine between decode steps (or inside
        prefill) and waits for its thread to return, so the engine is free again afterwards."""
        engine = await self._acquire(request)
        try:
            return await _run_engine(engine, request, sink)
        finally:
            self._release(engine)

    async def _acquire(self, request: GenerationRequest) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._idle and not self._waiters:
            return self._take(request)
        turn = trio.Event()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn in self._waiters:
                self._waiters.remove(turn)
            elif self._idle:  # woken and cancelled at once: pass the turn on
                self._wake()
            raise
        return self._take(request)

    def _take(self, request: GenerationRequest) -> Any:
        """The idle engine that computes the fewest tokens for ``request`` (the first on ties)."""
        best = min(self._idle, key=lambda engine: _tokens_to_prefill(engine, request))
        self._idle.remove(best)
        return best

    def _release(self, engine: Any) -> None:
        self._idle.append(engine)
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()

    def close(self) -> None:
        """Free every engine's model and context. Idempotent."""
        for engine in self._engines:
            engine.close()


def _tokens_to_prefill(engine: Any, request: GenerationRequest) -> int:
    count = getattr(engine, "tokens_to_prefill", None)  # engines in tests may not say
    try:
        return 0 if count is None else int(count(request))
    except PydiscoError:  # a request this engine refuses: generate() will say why
        return 0


async def _run_engine(engine: Any, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
    token = trio.lowlevel.current_trio_token()
    sink_error: list[BaseException] = []

    def deliver(piece: TokenPiece) -> None:  # in the Trio thread
        if sink_error:
            return
        try:
            sink(piece)
        except BaseException as e:  # must not escape into Trio's run loop
            sink_error.append(e)

    def on_token(piece: TokenPiece) -> None:  # in the worker thread: never wait for Trio
        token.run_sync_soon(deliver, piece)

    def should_abort() -> bool:  # in the worker thread, between decode steps
        if sink_error:
            return True
        try:
            trio.from_thread.check_cancelled()
        except trio.Cancelled:
            return True
        return False

    # run_sync_soon callbacks run in order, and the thread's completion is reported the same
    # way, so every token reaches the sink before this await returns.
    result: GenerationResult = await trio.to_thread.run_sync(
        engine.generate, request, on_token, should_abort, abandon_on_cancel=False
    )
    # With abandon_on_cancel=False the thread's result comes back even when we were cancelled
    # meanwhile (the engine then stopped early): honour the cancellation here.
    await trio.lowlevel.checkpoint_if_cancelled()
    if sink_error:
        raise sink_error[0]
    return result


# -- OpenAI-compatible upstream -----------------------------------------------------------


class OpenAIUpstreamBackend:
    """Streams from an OpenAI-compatible HTTP API (``/chat/completions`` or ``/completions``).

    Token ids are -1 (the API gives text pieces, one per streamed chunk). Resuming works from
    text: a raw prompt continues as ``prompt + resume_text``; a chat answer continues only when
    the upstream understands vLLM's ``continue_final_message`` (``chat_resume=True``), since the
    plain API has no way to continue an assistant message. Resume from token ids is refused.

    One HTTP client is kept per Trio run (connections are reused between requests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        chat_resume: bool = False,
        send_top_k: bool = True,
        model_id: str | None = None,
        verify: bool | str = True,
        extra_body: Mapping[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"the upstream URL must be http(s)://..., got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self._timeout = timeout
        self._chat_resume = chat_resume
        self._send_top_k = send_top_k
        self._verify = verify
        self._extra_body = dict(extra_body or {})  # server-specific knobs (vLLM, llama.cpp) sent as-is
        self._transport = transport  # httpx's own seam: a MockTransport in tests
        self._model_id = model_id or f"upstream:{model}"
        self._client: httpx.AsyncClient | None = None
        self._client_run: object = None

    @property
    def model_id(self) -> str:
        return self._model_id

    def _http(self) -> httpx.AsyncClient:
        run = trio.lowlevel.current_root_task()
        if self._client is None or self._client_run is not run:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self._timeout, connect=10.0),
                verify=self._verify,
                transport=self._transport,
            )
            self._client_run = run
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._client_run is trio.lowlevel.current_root_task():
            await self._client.aclose()
        self._client = None

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        if request.resume_token_ids:
            raise EndpointError(
                "an OpenAI-compatible upstream resumes from text only: send resume_text", code=Code.BAD_REQUEST
            )
        s = request.sampling
        body: dict[str, Any] = {
            **self._extra_body,
            "model": self.model,
            "stream": True,
            "max_tokens": request.max_tokens - request.start_position,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        }
        if self._send_top_k:
            body["top_k"] = s.top_k
        if request.stop:
            body["stop"] = list(request.stop)
        if request.messages is not None:
            messages = [{"role": m["role"], "content": m["content"]} for m in request.messages]
            if request.resume_text:
                if not self._chat_resume:
                    raise EndpointError(
                        "this upstream cannot continue a chat answer (chat_resume is off)", code=Code.BAD_REQUEST
                    )
                messages.append({"role": "assistant", "content": request.resume_text})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = messages
            body["stream_options"] = {"include_usage": True}
            return "/chat/completions", body
        assert request.prompt is not None
        body["prompt"] = request.prompt + (request.resume_text or "")
        body["stream_options"] = {"include_usage": True}
        return "/completions", body

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """See :class:`Backend`. Cancellation closes the HTTP stream, which tells the upstream to
        stop (how fast it stops is up to the upstream)."""
        path, body = self._body(request)
        position = request.start_position
        if body["max_tokens"] <= 0:
            return GenerationResult("length", 0, 0, 0)
        finish: str | None = None
        usage: dict[str, Any] = {}
        headers = {"Accept": "text/event-stream"}
        try:
            async with self._http().stream("POST", self.base_url + path, json=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _http_error(response)
                done = False
                async with contextlib.aclosing(httpx_sse.EventSource(response).aiter_sse()) as events:
                    async for event in events:
                        if not event.data:
                            continue  # an event with no data (a keep-alive)
                        if event.data.strip() == "[DONE]":
                            done = True
                            break
                        chunk = _json(event.data)
                        if isinstance(chunk.get("error"), dict):
                            raise EndpointError(f"upstream error: {chunk['error'].get('message', chunk)}",
                                                code=Code.UPSTREAM_ERROR)  # fmt: skip
                        if isinstance(chunk.get("usage"), dict):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices") or ():
                            text = _choice_text(choice)
                            if text:
                                sink(TokenPiece(position, -1, text))
                                position += 1
                            if choice.get("finish_reason"):
                                finish = "length" if choice["finish_reason"] == "length" else "stop"
                if not done and finish is None:
                    # llama-cpp-python does this for a prompt over its context: 200, then nothing.
                    raise EndpointError(
                        "the upstream ended the stream without finishing it (no finish_reason, no [DONE])",
                        code=Code.UPSTREAM_ERROR,
                    )
        except httpx_sse.SSEError as e:  # a 200 that is not an event stream
            raise EndpointError(f"the upstream did not answer with an event stream: {e}", code=Code.UPSTREAM_ERROR) from e
        except httpx.TimeoutException as e:
            raise EndpointError(f"the upstream timed out: {e!r}", code=Code.UPSTREAM_UNAVAILABLE) from e
        except httpx.TransportError as e:
            raise EndpointError(f"the upstream is unreachable: {e!r}", code=Code.UPSTREAM_UNAVAILABLE) from e
        generated = position - request.start_position
        # Servers that ignore stream_options.include_usage (llama-cpp-python) report no usage: 0.
        prompt_tokens = usage.get("prompt_tokens")
        prompt_tokens = prompt_tokens if type(prompt_tokens) is int and prompt_tokens >= 0 else 0
        return GenerationResult(finish or "stop", prompt_tokens, prompt_tokens, generated)


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _json(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as e:
        raise EndpointError(f"the upstream sent an event that is not JSON: {data[:80]!r}", code=Code.UPSTREAM_ERROR) from e
    if not isinstance(chunk, dict):
        raise EndpointError(f"the upstream sent an unexpected event: {data[:80]!r}", code=Code.UPSTREAM_ERROR)
    return chunk


def _http_error(response: httpx.Response) -> Exception:
    """Map an upstream HTTP error to the error the client should see."""
    detail: Any = None
    try:
        detail = response.json()
        error = detail.get("error") if isinstance(detail.get("error"), dict) else {}
        message = str(error.get("message") or detail.get("detail") or detail)
    except (ValueError, AttributeError):
        message = response.text[:200]
    status = response.status_code
    text = f"upstream HTTP {status}: {message}"
    error_code = ""
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        error_code = str(detail["error"].get("code", ""))
    if error_code == "context_length_exceeded" or (status == 400 and "context length" in message.lower()):
        return PromptTooLongError(text)
    if status in (400, 404, 422):
        return EndpointError(text, code=Code.BAD_REQUEST)
    if status in (429, 503):
        return EndpointError(text, code=Code.OVERLOADED)
    # 401/403 mean the server's own upstream key is wrong: the client cannot fix that.
    return EndpointError(text, code=Code.UPSTREAM_ERROR)
