"""Plain data shared by every part of pydisco: what is asked for, and what comes back.

These records cross actor, transport and policy boundaries, so they are frozen and hold only
plain values. Positions are 0-based indices into the answer (not the prompt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Callable, Protocol

from ._errors import ConfigurationError

Message = Mapping[str, str]
"""A chat message: ``{"role": "user" | "system" | "assistant", "content": str}``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` means greedy (reproducible)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigurationError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigurationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One answer to generate, on any endpoint.

    Exactly one of ``messages`` (chat, formatted with the model's template) and ``prompt``
    (raw text) is set. ``resume_token_ids`` / ``resume_text`` carry an already committed
    prefix of the *answer*: the endpoint continues after it, and the first token it reports
    has position ``len(prefix)`` (in tokens). Token ids are used when the vocabulary matches;
    otherwise the text is re-tokenised and positions continue from ``resume_position``.
    ``max_tokens`` bounds the whole answer, the resumed prefix included: a resumed request
    ends where the uninterrupted one would have ended.
    """

    messages: Sequence[Message] | None = None
    prompt: str | None = None
    max_tokens: int = 128
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    resume_token_ids: tuple[int, ...] = ()
    resume_text: str | None = None
    resume_position: int | None = None
    request_id: str = ""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ConfigurationError("give exactly one of messages= and prompt=")
        if self.messages is not None:
            for m in self.messages:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ConfigurationError(f"a message needs string 'role' and 'content': {m!r}")
        if self.max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if self.resume_token_ids and self.resume_text is not None:
            raise ConfigurationError("give at most one of resume_token_ids= and resume_text=")

    @property
    def start_position(self) -> int:
        """Position of the first token this request will produce."""
        if self.resume_position is not None:
            return self.resume_position
        return len(self.resume_token_ids)


@dataclasses.dataclass(frozen=True, slots=True)
class TokenPiece:
    """One token of an answer as an endpoint reports it.

    ``token_id`` is -1 when the endpoint cannot name one (a text-only upstream). ``text`` is
    always whole UTF-8 characters: an endpoint holds back a partial character and reports it
    with a later token (that token's piece then carries both).

    ``age_ns`` is how long before this piece reached the sink the token was produced (the
    device's worker thread, the server's backend): a duration, so it needs no clock shared
    between endpoint and runtime. 0 means "just now" or unknown.
    """

    position: int
    token_id: int
    text: str
    age_ns: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationResult:
    """How an endpoint's generation ended."""

    finish_reason: str  # "stop" (end of text or a stop string), "length" (max_tokens), "cancelled"
    prompt_tokens: int
    prefilled_tokens: int  # prompt + resumed prefix tokens actually computed (not reused from cache)
    generated_tokens: int
    cost_units: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReaderState:
    """The answer's reader now: ``buffered_tokens`` committed and not yet read, taken at
    ``reading_rate_tps`` tokens/s (None: not paced, it reads as fast as the application)."""

    buffered_tokens: int
    reading_rate_tps: float | None


TokenSink = Callable[[TokenPiece], None]
"""Called in the Trio thread for each token, in order. Must not block.

The runtime's sinks also have an ``admitted()`` method: an endpoint that makes requests wait
(one model serving them in turn, a step scheduler's admission) declares
``queues_requests = True`` and calls ``getattr(sink, "admitted", None)`` when the request leaves
its queue and starts, so the runtime's first-token deadline counts from there, not from the
wait. And a ``prefilled(tokens)`` method: an endpoint that may fail after its prefill tells
how many tokens it computed (:func:`notify_prefilled`), so usage and cost count them even
when no :class:`GenerationResult` comes back. And ``reader_state() -> ReaderState``: a remote
endpoint whose server schedules by it (the cloud client, protocol version 2) reports it to the
server. And ``slo``: the answer's :class:`~pydisco.Slo`, which a batched device endpoint's step
scheduler serves it by."""


def notify_admitted(sink: TokenSink) -> None:
    """Tell ``sink`` its request has started (a no-op for a plain function)."""
    admitted = getattr(sink, "admitted", None)
    if admitted is not None:
        admitted()


def notify_prefilled(sink: TokenSink, tokens: int) -> None:
    """Tell ``sink`` the request's prefill computed ``tokens`` tokens (a no-op for a plain
    function). Its :class:`GenerationResult`, if one comes, has the last word."""
    prefilled = getattr(sink, "prefilled", None)
    if prefilled is not None:
        prefilled(tokens)


class Endpoint(Protocol):
    """Something that generates an answer: the device actor, a cloud connection, a fake."""

    @property
    def name(self) -> str: ...

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """Generate ``request``, calling ``sink`` for each token in order, and return how it ended.

        On cancellation (the surrounding Trio cancel scope), generation stops within one decode
        step and ``trio.Cancelled`` propagates; the endpoint stays usable.
        """
        ...
