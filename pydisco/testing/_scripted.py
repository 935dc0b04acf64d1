"""A scripted endpoint: delivers a fixed answer on a fixed timeline, for property tests of the
runtime's timing, policies and migration in virtual time. It honours resume positions,
cancellation and failures like a real endpoint, and can model a KV cache; it is never a
substitute for the real model in tests of inference."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from .._errors import EndpointUnavailable
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink, notify_admitted, notify_prefilled

if TYPE_CHECKING:  # the strategies module needs Hypothesis; a scripted endpoint does not
    from ._strategies import EndpointTimeline


class ScriptedEndpoint:
    """Answers every request with ``answer`` (from the request's start position on).

    Timing: ``prefill_s + prefill_s_per_token × (tokens to prefill)`` before the first token,
    then ``gaps_s[i]`` between token *i* and token *i+1* (cycled; a stall is just a long gap).
    Without ``kv_cache`` the tokens to prefill are the prompt's (``prompt_tokens``) plus the
    resumed prefix; with it, the endpoint remembers how much of the current answer its cache
    holds (what it prefilled in ``prepare`` or generated) and prefills only the rest, as a
    real engine reusing its KV cache does (``prefilled_tokens`` reports the same).

    ``prompt_tokens``: the prompt's length in tokens, or a function of the request giving it.

    ``fails_after``: raise EndpointUnavailable after delivering that many tokens in one run
    (0: after its prefill, before any token). Which runs fail, counted per answer:
    ``fails_on_run`` is the run of each answer (0 = the answer's first ``generate`` call here,
    1 = its next, e.g. a resume after a failover; None = every run) and ``fails_on_answer`` the
    answer (0 = the first answer this endpoint serves, in the order their first runs start;
    None = every answer). Answers are told apart by ``request_id`` (the runtime gives each
    answer its own).

    :meth:`from_timeline` makes one from a :class:`~pydisco.testing.EndpointTimeline`.
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
        fails_on_answer: int | None = None,
        kv_cache: bool = False,
    ) -> None:
        if not gaps_s:
            raise ValueError("gaps_s needs at least one gap")
        if min(gaps_s) < 0 or prefill_s < 0 or prefill_s_per_token < 0:
            raise ValueError("prefill_s, prefill_s_per_token and gaps_s must be >= 0")
        self._name = name
        self._answer = list(answer)
        self._prefill_s = prefill_s
        self._prefill_s_per_token = prefill_s_per_token
        self._gaps = list(gaps_s)
        self._prompt_tokens = prompt_tokens
        self._fails_after = fails_after
        self._fails_on_run = fails_on_run
        self._fails_on_answer = fails_on_answer
        self._answer_index: dict[str, int] = {}  # request id -> which answer it is, here
        self._runs_of_answer: collections.Counter[str] = collections.Counter()
        self._kv_cache = kv_cache
        self._cached: tuple[object, int] | None = None  # (the request's prompt, tokens cached)
        self._busy = trio.Lock()  # one request at a time, as one model on one thread serves them
        self.runs = 0  # generate calls over its lifetime, every answer's
        self.tokens_sent = 0

    queues_requests = True  # one request at a time, like one model on one thread

    @classmethod
    def from_timeline(
        cls,
        timeline: EndpointTimeline,
        answer: Sequence[TokenPiece],
        *,
        prompt_tokens: int | Callable[[GenerationRequest], int] = 16,
        kv_cache: bool = False,
    ) -> ScriptedEndpoint:
        """An endpoint that delivers ``answer`` as ``timeline`` says: token *i* of a run from
        position 0 arrives ``timeline.arrivals_s[i]`` after the run starts, and the first run
        of each answer fails after ``timeline.fails_after`` tokens (if set). A resumed run
        waits ``arrivals_s[0]`` for its first token, then keeps the timeline's gaps from its
        position on. ``timeline.name`` names it; ``answer`` may be shorter than the timeline.
        """
        arrivals = timeline.arrivals_s
        if len(answer) > len(arrivals):
            raise ValueError(f"the timeline has {len(arrivals)} arrivals for an answer of {len(answer)} tokens")
        if any(t < 0 for t in arrivals) or any(b < a for a, b in itertools.pairwise(arrivals)):
            raise ValueError("a timeline's arrival times must be >= 0 and non-decreasing")
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return cls(
            timeline.name,
            answer,
            prefill_s=arrivals[0] if arrivals else 0.0,
            gaps_s=gaps or [0.0],  # one token or none: no gap is ever waited
            prompt_tokens=prompt_tokens,
            fails_after=timeline.fails_after,
            fails_on_run=0,
            kv_cache=kv_cache,
        )

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

    def _run_fails(self, request: GenerationRequest) -> bool:
        """Count this run of ``request``'s answer; does its script say it fails?"""
        answer = self._answer_index.setdefault(request.request_id, len(self._answer_index))
        run = self._runs_of_answer[request.request_id]
        self._runs_of_answer[request.request_id] += 1
        return (
            self._fails_after is not None
            and self._fails_on_run in (None, run)
            and self._fails_on_answer in (None, answer)
        )

    async def _generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        fails = self._run_fails(request)
        self.runs += 1
        start = request.start_position
        end = min(len(self._answer), request.max_tokens)  # max_tokens bounds the whole answer
        prefilled = await self._prefill(request)
        notify_prefilled(sink, prefilled)  # counted even if the script fails this run
        sent = 0
        for position in range(start, end):
            if fails and self._fails_after is not None and sent >= self._fails_after:
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
