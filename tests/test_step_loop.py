"""The step loop's mechanism over a fake batched executor: answers interleave as the scheduler
plans, each gets exactly its own tokens, cancellation and refusal end one answer only, and
admission is signalled. (The real llama.cpp batched engine: tests/test_batched_engine.py.)"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import pytest
import trio

from pydisco._types import GenerationRequest, TokenPiece
from pydisco.batching import Admission, AdmissionRefused, StepEvent, StepLoop, rough_profile
from pydisco.policies import Phase, Slo, StepPlan, StepView, create_step_scheduler


class FakeExecutor:
    """Sequence i answers "i:0 i:1 …" (max_tokens tokens); a step takes ``step_s``."""

    kv_capacity = 4096
    max_batch = 4
    prefill_chunk = 16

    def __init__(self, step_s: float = 0.002) -> None:
        self.step_s = step_s
        self.steps: list[tuple[tuple[int, ...], tuple[int, int] | None]] = []
        self.live: dict[int, list[int]] = {}  # id -> [prefill left, next position, limit]
        self.released: list[int] = []

    def validate(self, request: GenerationRequest) -> None:
        pass

    def admission(self, seq_id: int, request: GenerationRequest) -> Admission:
        return Admission(prefill_tokens=20, prompt_tokens=20, max_new_tokens=request.max_tokens)

    def admit(self, seq_id: int, request: GenerationRequest) -> None:
        self.live[seq_id] = [20, 0, request.max_tokens]

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        time.sleep(self.step_s)
        self.steps.append((tuple(decode), prefill))
        events = []
        ids = list(decode)
        if prefill is not None:
            seq = self.live[prefill[0]]
            seq[0] -= prefill[1]
            if seq[0] <= 0:
                ids.append(prefill[0])  # the last prefill chunk samples the first token
        for i in ids:
            seq = self.live[i]
            piece = TokenPiece(seq[1], i * 1000 + seq[1], f"{i}:{seq[1]} ")
            seq[1] += 1
            events.append(StepEvent(i, piece, "length" if seq[1] >= seq[2] else None))
        return events

    def release(self, seq_id: int) -> None:
        self.live.pop(seq_id, None)
        self.released.append(seq_id)


def loop(executor: FakeExecutor, scheduler: str = "fcfs") -> StepLoop:
    step_loop = StepLoop(executor, create_step_scheduler(scheduler), rough_profile(0.002, 0.0001, executor.max_batch))
    step_loop.start()
    return step_loop


def test_answers_share_the_steps_and_each_gets_only_its_tokens() -> None:
    executor = FakeExecutor()
    step_loop = loop(executor)
    got: dict[int, list[TokenPiece]] = {}

    async def one(n: int) -> None:
        got[n] = []
        result = await step_loop.generate(GenerationRequest(prompt=f"q{n}", max_tokens=6 + n), got[n].append)
        assert result.finish_reason == "length" and result.generated_tokens == 6 + n

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(one, n)

    try:
        trio.run(main)
    finally:
        step_loop.close()
    for n, pieces in got.items():
        seq_ids = {p.token_id // 1000 for p in pieces}
        assert len(seq_ids) == 1  # no cross-talk
        (seq_id,) = seq_ids
        assert [p.text for p in pieces] == [f"{seq_id}:{k} " for k in range(6 + n)]
    assert max(len(decode) for decode, _ in executor.steps) == 3  # they really shared steps


def test_cancelling_one_answer_leaves_the_others_and_waits_for_its_release() -> None:
    executor = FakeExecutor(step_s=0.005)
    step_loop = loop(executor)

    async def main() -> tuple[list[TokenPiece], list[TokenPiece]]:
        long_one: list[TokenPiece] = []
        other: list[TokenPiece] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(step_loop.generate, GenerationRequest(prompt="b", max_tokens=30), other.append)
                with trio.move_on_after(0.1):
                    await step_loop.generate(GenerationRequest(prompt="a", max_tokens=1000), long_one.append)
                # Cancellation returned only once the loop had let it go.
                assert long_one and long_one[0].token_id // 1000 in executor.released
        return long_one, other

    try:
        long_one, other = trio.run(main)
    finally:
        step_loop.close()
    assert len(other) == 30 and len(long_one) < 1000


def test_slice_refuses_a_rate_it_cannot_meet_and_signals_admission() -> None:
    executor = FakeExecutor()
    step_loop = loop(executor, "slice")
    admitted: list[float] = []

    class Sink:
        def __init__(self) -> None:
            self.pieces: list[TokenPiece] = []

        def __call__(self, piece: TokenPiece) -> None:
            self.pieces.append(piece)

        def admitted(self) -> None:
            admitted.append(trio.current_time())

    async def main() -> None:
        with trio.fail_after(30):
            sink = Sink()
            result = await step_loop.generate(GenerationRequest(prompt="ok", max_tokens=5), sink, Slo(reading_rate=20.0, realtime=True))
            assert result.generated_tokens == 5 and len(admitted) == 1
            # 2000 tokens/s at ≥ 2 ms a step cannot fit one second.
            with pytest.raises(AdmissionRefused, match="slice scheduler refused it"):
                await step_loop.generate(GenerationRequest(prompt="no", max_tokens=5), Sink(), Slo(reading_rate=2000.0, realtime=True))
            assert len(admitted) == 1  # the refused one was never admitted

    try:
        trio.run(main)
    finally:
        step_loop.close()
    assert step_loop.statistics().rejected == 1


def test_the_same_state_runs_in_virtual_time_over_a_simulated_engine() -> None:
    import trio.testing

    from pydisco.batching import SimulatedExecutor, VirtualStepLoop
    from pydisco.policies import StepProfile

    profile = StepProfile(decode_s=(0.010, 0.012, 0.014, 0.016), prefill_s_per_token=0.0002)
    executor = SimulatedExecutor(profile, kv_capacity=8192, max_batch=4, prefill_chunk=64, prompt_tokens=lambda r: 100)
    step_loop = VirtualStepLoop(executor, create_step_scheduler("fcfs"))
    finished: dict[int, float] = {}

    async def one(n: int) -> None:
        pieces: list[TokenPiece] = []
        result = await step_loop.generate(GenerationRequest(prompt=f"q{n}", max_tokens=50), pieces.append)
        assert [p.position for p in pieces] == list(range(50)) and result.generated_tokens == 50
        finished[n] = trio.current_time()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step_loop.run)
            async with trio.open_nursery() as answers:
                for n in range(4):
                    answers.start_soon(one, n)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Four prompts of 100 tokens prefill in 64-token chunks (7 chunk steps beside decodes), then
    # the four decode together at 16 ms a step: about 50 × 16 ms, not 4 × 50 × 10 ms one by one.
    assert max(finished.values()) < 1.2
    assert step_loop.statistics().tokens == 200


def test_learned_profile_follows_steps_and_skips_rebuilding_an_unchanged_one() -> None:
    """A step that took what the profile says leaves it as it is (the same object: nothing is
    rebuilt); a different one moves it, and the table stays monotone in the batch size."""
    from pydisco.batching._profile import LearnedStepProfile
    from pydisco.policies._step import StepProfile

    learned = LearnedStepProfile(StepProfile(decode_s=(0.02, 0.01, 0.03), prefill_s_per_token=0.001), max_batch=3)
    learned.record(1, 0, 0.02)  # as said: the first record still builds the monotone table
    first = learned.current()
    assert [first.decode(b) for b in (1, 2, 3)] == [0.02, 0.02, 0.03]
    learned.record(3, 0, 0.03)
    assert learned.current() is first
    learned.record(3, 0, 0.05)  # slower than said: learnt
    assert learned.current().decode(3) == pytest.approx(0.03 + 0.1 * 0.02)
    learned.record(1, 100, 0.02 + 100 * 0.002)  # prefill twice as dear
    assert learned.current().prefill_s_per_token == pytest.approx(0.001 + 0.1 * 0.001)


def test_virtual_loop_hands_tokens_to_the_sink_in_the_answers_context_and_none_after_cancel() -> None:
    """The virtual loop calls a waiting answer's sink itself (no wake-up of the answer's task):
    in that task's context, never after the task was cancelled, and a sink's error still
    comes out of generate."""
    import contextvars

    import trio.testing

    from pydisco.batching import SimulatedExecutor, VirtualStepLoop
    from pydisco.policies import StepProfile

    whose: contextvars.ContextVar[str] = contextvars.ContextVar("whose", default="nobody")
    executor = SimulatedExecutor(StepProfile(decode_s=(0.01, 0.01), prefill_s_per_token=0.0), kv_capacity=4096,
                                 max_batch=2, prompt_tokens=lambda r: 1)  # fmt: skip
    step_loop = VirtualStepLoop(executor, create_step_scheduler("fcfs"))
    seen: list[tuple[str, int]] = []

    def sink(piece: TokenPiece) -> None:
        seen.append((whose.get(), piece.position))
        if whose.get() == "failing" and piece.position == 2:
            raise ValueError("the sink broke")

    async def answer(name: str, cancel_after_s: float | None = None) -> None:
        whose.set(name)
        with trio.move_on_after(math.inf if cancel_after_s is None else cancel_after_s):
            await step_loop.generate(GenerationRequest(prompt=name, max_tokens=20), sink)

    async def failing() -> None:
        whose.set("failing")
        with pytest.raises(ValueError, match="the sink broke"):
            await step_loop.generate(GenerationRequest(prompt="f", max_tokens=20), sink)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step_loop.run)
            async with trio.open_nursery() as answers:
                answers.start_soon(answer, "cancelled", 0.055)
                answers.start_soon(failing)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    cancelled = [p for who, p in seen if who == "cancelled"]
    assert cancelled == list(range(len(cancelled))) and 3 <= len(cancelled) <= 6  # stopped at ~55 ms of 10 ms steps
    assert [p for who, p in seen if who == "failing"] == [0, 1, 2]  # nothing after the error
    assert {who for who, _ in seen} == {"cancelled", "failing"}  # never the loop's own context


class TwoSlotExecutor(FakeExecutor):
    """An engine that holds two sequences at once (as BatchedEngine holds ``max_sequences``,
    preempted ones included) and refuses a third, as it does."""

    max_sequences = 2

    def admit(self, seq_id: int, request: GenerationRequest) -> None:
        if len(self.live) >= self.max_sequences:
            raise AdmissionRefused(f"all {self.max_sequences} sequence slots hold admitted answers")
        super().admit(seq_id, request)


class AdmitEveryone:
    """A scheduler that admits every waiting answer at once and decodes every admitted one,
    with no regard for the engine's sequence slots."""

    name = "admit-everyone"

    def schedule(self, view: StepView) -> StepPlan:
        prefilling = [s for s in view.sequences if s.phase == Phase.PREFILLING]
        prefill = (prefilling[0].id, min(view.prefill_chunk, prefilling[0].prefill_tokens - prefilling[0].prefilled)) if prefilling else None
        return StepPlan(
            decode=tuple(s.id for s in view.sequences if s.phase in (Phase.DECODING, Phase.PREEMPTED)),
            prefill=prefill,
            admit=tuple(s.id for s in view.sequences if s.phase == Phase.WAITING),
        )


def test_an_answer_admitted_beyond_the_engines_sequence_slots_waits_for_one_instead_of_failing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine's slots are the mechanism's to guard: a scheduler's admission beyond them
    (Andes with streams preempted, each holding its slot) leaves the answer waiting, told why,
    and it starts once a slot frees; before, it ended with AdmissionRefused."""
    caplog.set_level(logging.INFO, logger="pydisco")
    executor = TwoSlotExecutor()
    step_loop = StepLoop(executor, AdmitEveryone(), rough_profile(0.002, 0.0001, executor.max_batch))
    step_loop.start()
    got: dict[int, str] = {}
    most_live = 0

    async def one(n: int) -> None:
        pieces: list[TokenPiece] = []
        result = await step_loop.generate(GenerationRequest(prompt=f"q{n}", max_tokens=5), pieces.append)
        assert result.finish_reason == "length"
        got[n] = "".join(p.text for p in pieces)

    async def main() -> None:
        nonlocal most_live
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(one, n)
                while len(got) < 4:
                    most_live = max(most_live, len(executor.live))
                    await trio.sleep(0.001)

    try:
        trio.run(main)
    finally:
        step_loop.close()
    assert sorted(got) == [0, 1, 2, 3]
    assert all(len(text.split()) == 5 for text in got.values())
    assert most_live <= 2 and step_loop.statistics().rejected == 0
    waited = [r.getMessage() for r in caplog.records if "waits for admission" in r.getMessage()]
    assert len(waited) == 2 and all("all 2 sequence slots hold admitted answers" in m for m in waited)


class NewcomersFirst:
    """A scheduler that gives a waiting answer the engine at once: it admits every waiting
    answer and preempts every decoding one for it (fastserve does so when a newcomer joins
    above the running ones' level), with no regard for the engine's sequence slots."""

    name = "newcomers-first"

    def schedule(self, view: StepView) -> StepPlan:
        waiting = tuple(s.id for s in view.sequences if s.phase == Phase.WAITING)
        prefilling = [s for s in view.sequences if s.phase == Phase.PREFILLING]
        prefill = (prefilling[0].id, min(view.prefill_chunk, prefilling[0].prefill_tokens - prefilling[0].prefilled)) if prefilling else None
        running = tuple(s.id for s in view.sequences if s.phase in (Phase.DECODING, Phase.PREEMPTED))
        if waiting:
            decoding = tuple(s.id for s in view.sequences if s.phase == Phase.DECODING)
            return StepPlan(decode=(), prefill=prefill, admit=waiting, preempt=decoding)
        return StepPlan(decode=running, prefill=prefill)


def test_answers_holding_every_slot_keep_decoding_while_a_newcomer_waits_for_one() -> None:
    """A newcomer that cannot have a slot must not stop the answers that hold them: the step
    loop keeps them decoding (it drops the preemptions meant to make room for it), so they end,
    free their slots, and the newcomer starts. Before, the scheduler preempted both for it,
    nothing decoded, and the loop spun with every answer waiting for ever (CI caught this with
    fastserve on the real engine and one slot)."""
    executor = TwoSlotExecutor()
    step_loop = StepLoop(executor, NewcomersFirst(), rough_profile(0.002, 0.0001, executor.max_batch))
    step_loop.start()
    got: dict[int, int] = {}

    async def one(n: int) -> None:
        pieces: list[TokenPiece] = []
        result = await step_loop.generate(GenerationRequest(prompt=f"q{n}", max_tokens=5), pieces.append)
        assert result.finish_reason == "length"
        got[n] = len(pieces)

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(2):
                    nursery.start_soon(one, n)
                while not executor.live:
                    await trio.sleep(0.001)
                await trio.sleep(0.005)  # both hold their slots and decode
                nursery.start_soon(one, 2)

    try:
        trio.run(main)
    finally:
        step_loop.close()
    assert got == {0: 5, 1: 5, 2: 5}
    assert step_loop.statistics().rejected == 0
