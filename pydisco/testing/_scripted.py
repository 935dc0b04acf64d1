"""A scripted endpoint: delivers a fixed answer on a fixed timeline, for property tests of the
runtime's timing, policies and migration in virtual time. It honours resume positions,
cancellation and failures like a real endpoint; it is never a substitute for the real model
in tests of inference."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .._errors import EndpointUnavailable
from .._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink


class ScriptedEndpoint:
    """Answers every request with ``answer`` (from the request's start position on).

    Timing: ``prefill_s + prefill_s_per_token × (prompt + prefix tokens)`` before the first
    token, then ``gaps_s[i]`` before token *i* (cycled; a stall is just a long gap).
    ``fails_after``: raise EndpointUnavailable after delivering that many tokens in one run.
    ``fails_on_run``: which of its runs fails (0 = the first generate call); None = every run.
    """

    def __init__(
        self,
        name: str,
        answer: Sequence[TokenPiece],
        *,
        prefill_s: float = 0.02,
        prefill_s_per_token: float = 0.0,
        gaps_s: Sequence[float] = (0.01,),
        prompt_tokens: int = 16,
        fails_after: int | None = None,
        fails_on_run: int | None = 0,
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
        self.runs = 0
        self.tokens_sent = 0

    @property
    def name(self) -> str:
        return self._name

    def _prefill_time(self, request: GenerationRequest) -> float:
        return self._prefill_s + self._prefill_s_per_token * (self._prompt_tokens + request.start_position)

    async def prepare(self, request: GenerationRequest) -> int:
        """Prefill only (a migration target). Cancellation stops it at once."""
        await trio.sleep(self._prefill_time(request))
        return self._prompt_tokens + request.start_position

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """Deliver the answer from ``request.start_position``. Cancellation stops it at once."""
        run = self.runs
        self.runs += 1
        start = request.start_position
        end = min(len(self._answer), request.max_tokens)  # max_tokens bounds the whole answer
        await trio.sleep(self._prefill_time(request))
        sent = 0
        for position in range(start, end):
            if self._fails_after is not None and sent >= self._fails_after and self._fails_on_run in (None, run):
                raise EndpointUnavailable(f"{self._name}: scripted failure after {sent} tokens")
            if position > start:
                await trio.sleep(self._gaps[(position - 1) % len(self._gaps)])
            sink(self._answer[position])
            sent += 1
            self.tokens_sent += 1
        finish = "stop" if end == len(self._answer) else "length"
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=self._prompt_tokens,
            prefilled_tokens=self._prompt_tokens + start,
            generated_tokens=sent,
        )
