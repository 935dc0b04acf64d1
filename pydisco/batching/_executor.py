"""What a step loop drives: an engine that decodes many sequences a step (``BatchExecutor``).

The llama.cpp batched engine (``pydisco.device.BatchedEngine``) is one; a simulated engine for
replays is another. An executor is synchronous and used by one thread (the loop's). One that
holds a fixed number of sequences at once has a ``max_sequences`` attribute: the loop then
keeps a newly admitted answer waiting while that many are admitted (preempted ones included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from .._types import GenerationRequest, TokenPiece


@dataclasses.dataclass(frozen=True, slots=True)
class StepEvent:
    """What one step did for one sequence: a token it produced (``piece``; a prefill that ends
    also yields the first token), and whether it ended (``finish``: "stop" or "length")."""

    seq_id: int
    piece: TokenPiece | None = None
    finish: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """A sequence the executor has taken in: how many tokens it must still prefill (prompt and
    resumed prefix, less a cached prefix it reuses), the prompt's length, and the most tokens it
    may produce."""

    prefill_tokens: int
    prompt_tokens: int
    max_new_tokens: int


class BatchExecutor(Protocol):
    @property
    def kv_capacity(self) -> int: ...

    @property
    def max_batch(self) -> int: ...

    @property
    def prefill_chunk(self) -> int: ...

    def validate(self, request: GenerationRequest) -> None:
        """Raise ConfigurationError / PromptTooLongError if ``request`` can never run here."""
        ...

    def admission(self, seq_id: int, request: GenerationRequest) -> Admission:
        """What admitting ``request`` as ``seq_id`` would take, as of now (changes nothing)."""
        ...

    def admit(self, seq_id: int, request: GenerationRequest) -> Admission | None:
        """Take ``request`` in as sequence ``seq_id`` (reusing whatever cached prefix matches).
        Returns what admitting took when it can differ from the earlier :meth:`admission` (a
        cache that changed while the request waited); None means as :meth:`admission` said."""
        ...

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        """One engine step: one token for each of ``decode``, and ``prefill``'s chunk."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget the sequence (its cache may be kept for prefix reuse)."""
        ...
