"""A batched executor for the server tests: many sequences, deterministic tokens, every step and
release recorded (the llama.cpp batched engine's own tests are elsewhere)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from pydisco._types import GenerationRequest, TokenPiece
from pydisco.batching import Admission, StepEvent

PROMPT_TOKENS = 8


def token_text(request: GenerationRequest, position: int) -> str:
    """The text of the token at ``position`` of the answer to ``request`` (its prompt names it)."""
    return f"{request.prompt}:{position} "


class RecordingExecutor:
    """Answers ``request`` with ``max_tokens`` tokens ``"{prompt}:{position} "`` (id = position),
    from its start position on; a step takes ``step_s`` of real time. ``steps`` counts the steps
    run; ``released`` maps each released sequence to the step count at its release; ``decoded``
    logs who decoded at each step."""

    kv_capacity = 1 << 16
    prefill_chunk = 64
    model_id = "recording-executor"

    def __init__(self, *, max_batch: int = 4, step_s: float = 0.002) -> None:
        self.max_batch = max_batch
        self.step_s = step_s
        self.steps = 0
        self.decoded: list[tuple[int, ...]] = []
        self.released: dict[int, int] = {}
        self.requests: dict[int, GenerationRequest] = {}
        self._live: dict[int, list[int]] = {}  # id -> [prefill left, next position, end]
        self._lock = threading.Lock()  # steps run in the loop's thread; tests read from theirs

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt is None:
            raise ValueError("this executor answers raw prompts only")

    def admission(self, seq_id: int, request: GenerationRequest) -> Admission:
        return Admission(PROMPT_TOKENS + request.start_position, PROMPT_TOKENS, request.max_tokens - request.start_position)

    def admit(self, seq_id: int, request: GenerationRequest) -> None:
        self.requests[seq_id] = request
        self._live[seq_id] = [PROMPT_TOKENS + request.start_position, request.start_position, request.max_tokens]

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        time.sleep(self.step_s)
        ids = list(decode)
        if prefill is not None:
            seq = self._live[prefill[0]]
            seq[0] -= prefill[1]
            if seq[0] <= 0:
                ids.append(prefill[0])  # the prefill's last row samples the first token
        events = []
        for seq_id in ids:
            seq = self._live[seq_id]
            piece = TokenPiece(seq[1], seq[1], token_text(self.requests[seq_id], seq[1]))
            seq[1] += 1
            events.append(StepEvent(seq_id, piece, "length" if seq[1] >= seq[2] else None))
        with self._lock:
            self.steps += 1
            self.decoded.append(tuple(decode))
        return events

    def release(self, seq_id: int) -> None:
        self._live.pop(seq_id, None)
        with self._lock:
            self.released[seq_id] = self.steps

    def step_count(self) -> int:
        with self._lock:
            return self.steps
