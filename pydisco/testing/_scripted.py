"""A scripted endpoint: delivers a fixed answer on a fixed timeline, for property tests of the
runtime's timing, policies and migration in virtual time. It honours resume positions,
cancellation and failures like a real endpoint, and can model a KV cache; it is never a
substitute for the real model in tests of inference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from .._errors import EndpointUnavailable
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink, notify_admitted


class ScriptedEndpoint:
    """Answers every request with ``answer`` (from the request's start position on).

    Timing: ``prefill_s + prefill_s_per_token × (tokens to prefill)`` before the first token,
    then ``gaps_s[i]`` between token *i* and token *i+1* (cycled; a stall is just a long gap).
    Without ``kv_cache`` the tokens to prefill are the prompt's (``prompt_tokens``) plus the
    resumed prefix; with it, the endpoint remembers how much of the current answer its cache
    holds (what it prefilled in ``prepare`` or generated) and prefills only the rest, as a
    real engine reusing its KV cache does (``prefilled_tokens`` reports the same).

    ``prompt_tokens``: the prompt's length in tokens, or a function of the request giving it.

    ``fails_after``: raise EndpointUnavailable after delivering that many tokens in one run.
    ``fails_on_run``: which of the endpoint's runs fails, counted over its lifetime (0 = its
    first ``generate`` call, whatever answer it belongs to); None = every run.
    """

    def __init__(
        self,
        name: str,
        answer: Sequence[TokenPiece],
        *,
        prefill_s: float = 0.02,
        prefill_s_per_token: float = 0.0,
        gaps_s: Sequence[float] = (0.01,),
        prompt_tokens: int | Callable[[GenerationRequest], int] = 16,
        fails_after: int | None = None,
        fails_on_run: int | None = 0,
        kv_cache: bool = False,
    ) -> None:
        if not gaps_s:
            raise ValueError("gaps_s needs at least one gap")
        self._name = name
        self._answer = list(answer)
        self._prefill_s = prefill_s
        self._prefill_s_per_token = prefill_s_per_token
        self._gaps = list(gaps_s)
        self._prompt_tokens = prompt_tokens
        self._fails_after = fails_after
        self._fails_on_run = fails_on_run
        self._kv_cache = kv_cache
        self._cached: tuple[object, int] | None = None  # (the request's prompt, tokens cached)
        self._busy = trio.Lock()  # one request at a time, as one model on one thread serves them
        self.runs = 0
        self.tokens_sent = 0

    queues_requests = True  # one request at a time, like one model on one thread

    @property
    def name(self) -> str:
        return self._name

    @property
    def answers_ahead(self) -> int:
        """Requests a new one would wait for (one at a time): the running one and the queued."""
        stats = self._busy.statistics()
        return int(stats.locked) + stats.tasks_waiting

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """How many tokens this endpoint counts in ``request``'s prompt (its script says)."""
        count = self._prompt_tokens
        return count if isinstance(count, int) else count(request)

    def cached_tokens(self, request: GenerationRequest) -> int:
        """Prompt and answer tokens of ``request`` its cache holds (0 without ``kv_cache``)."""
        if not self._kv_cache or self._cached is None or self._cached[0] != _prompt_key(request):
            return 0
        return self._cached[1]

    def tokens_to_prefill(self, request: GenerationRequest) -> int:
        """Tokens ``request`` would compute before its first token (its cache holds the rest)."""
        return max(0, self.count_prompt_tokens(request) + request.start_position - self.cached_tokens(request))

    def _remember(self, request: GenerationRequest, tokens: int) -> None:
        if self._kv_cache:
            self._cached = (_prompt_key(request), tokens)

    async def _prefill(self, request: GenerationRequest) -> int:
        tokens = self.tokens_to_prefill(request)
        await trio.sleep(self._prefill_s + self._prefill_s_per_token * tokens)
        self._remember(request, self.count_prompt_tokens(request) + request.start_position)
        return tokens

    async def prepare(self, request: GenerationRequest) -> int:
        """Prefill only (a migration target); returns the tokens computed. Cancellation stops
        it at once (nothing more is cached)."""
        async with self._busy:
            return await self._prefill(request)

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """Deliver the answer from ``request.start_position`` (after any request in progress
        here: one at a time). Cancellation stops it at once."""
        async with self._busy:
            notify_admitted(sink)
            return await self._generate(request, sink)

    async def _generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        run = self.runs
        self.runs += 1
        start = request.start_position
        end = min(len(self._answer), request.max_tokens)  # max_tokens bounds the whole answer
        prefilled = await self._prefill(request)
        sent = 0
        for position in range(start, end):
            if self._fails_after is not None and sent >= self._fails_after and self._fails_on_run in (None, run):
                raise EndpointUnavailable(f"{self._name}: scripted failure after {sent} tokens")
            if position > start:
                await trio.sleep(self._gaps[(position - 1) % len(self._gaps)])
            sink(self._answer[position])
            sent += 1
            self.tokens_sent += 1
            self._remember(request, self.count_prompt_tokens(request) + position)  # its KV is computed when the next is
        finish = "stop" if end == len(self._answer) else "length"
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=self.count_prompt_tokens(request),
            prefilled_tokens=prefilled,
            generated_tokens=sent,
        )


def _prompt_key(request: GenerationRequest) -> object:
    if request.messages is not None:
        return tuple((m["role"], m["content"]) for m in request.messages)
    return request.prompt
