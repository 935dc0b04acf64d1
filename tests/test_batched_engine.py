"""BatchedEngine and its endpoint on the real SmolLM2 model: a batch of one equals the solo
engine, a schedule repeats exactly, sequences of one batch shape do not affect each other, a
shared system prompt is computed once, release mid-prefill or mid-decode leaves the engine
usable, a resume in a batch of one is exact, bad input is refused before work, and concurrent
``generate`` calls through the endpoint each get their own answer.

What does *not* hold, and is measured rather than asserted (``bench/multistream.py --numerics``,
docs/device.md): a sequence decoded beside others is computed with other kernels than alone,
and its numbers depend on where its cells sit in the cache, so its greedy answer may depart from
its solo run. Hence every comparison here starts from an empty cache."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import pytest
import trio
from device_support import THREADS, run_engine, shared_engine, trio_test
from llama_cpp import llama_cpp as C

import pydisco
from pydisco._errors import ConfigurationError, PromptTooLongError
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece
from pydisco.batching import AdmissionRefused
from pydisco.device import BatchedEngine, measure_step_profile, open_batched_device_endpoint
from pydisco.policies import Slo

pytestmark = pytest.mark.model

# The system text makes the prompt longer than one prefill chunk (64 rows).
SYSTEM = {"role": "system", "content": "You are a poet. You write short, vivid poems about nature. " * 4}


def chat(question: str, max_tokens: int = 16, system: bool = False, **kwargs: object) -> GenerationRequest:
    messages = [SYSTEM] if system else []
    messages.append({"role": "user", "content": question})
    return GenerationRequest(messages=messages, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


POEM = chat("Write a short poem about the sea.", 20, system=True)
STORM = chat("Describe a storm at night.", 20, system=True)


def counting(start: int, max_tokens: int = 16) -> GenerationRequest:
    """Prompts of one length (44 tokens) whose answers run to max_tokens: batch companions that
    keep the batch's shape the same whatever their text."""
    return chat(f"Count from {start} to 100, separated by commas.", max_tokens)


@functools.cache
def engine() -> BatchedEngine:
    return BatchedEngine(n_threads=THREADS, max_batch=4, n_ctx=2048)


Answers = dict[int, tuple[list[TokenPiece], str]]


def drive(eng: BatchedEngine, requests: Sequence[GenerationRequest], *, chunk: int | None = None) -> Answers:
    """A fixed FCFS schedule: admit all, then each step decodes every sequence that has its
    first token and carries one prefill chunk of the first one still prefilling."""
    chunk = chunk or eng.prefill_chunk
    left = {i: eng.admit(i, r).prefill_tokens for i, r in enumerate(requests)}
    pieces: dict[int, list[TokenPiece]] = {i: [] for i in left}
    ended: dict[int, str] = {}
    while len(ended) < len(requests):
        prefill = next(((i, min(chunk, n)) for i, n in left.items() if n > 0), None)
        decoding = [i for i, n in left.items() if n == 0 and i not in ended]
        if prefill is not None:
            left[prefill[0]] -= prefill[1]
        for event in eng.step(decoding, prefill):
            if event.piece is not None:
                pieces[event.seq_id].append(event.piece)
            if event.finish is not None:
                ended[event.seq_id] = event.finish
                eng.release(event.seq_id)
    return {i: (pieces[i], ended[i]) for i in pieces}


def cold(requests: Sequence[GenerationRequest], **kwargs: object) -> Answers:
    eng = engine()
    eng.clear()
    return drive(eng, requests, **kwargs)  # type: ignore[arg-type]


def ids(pieces: Sequence[TokenPiece]) -> list[int]:
    return [p.token_id for p in pieces]


@contextlib.contextmanager
def recorded_logits(eng: BatchedEngine) -> Iterator[dict[int, list[bytes]]]:
    """The logits each sequence's tokens were sampled from, as bytes (compared bit for bit)."""
    seen: dict[int, list[bytes]] = {}
    sample = eng._sample

    def spy(rows: list) -> list:  # type: ignore[type-arg]
        for i, row in enumerate(rows):
            if row.samples:
                logits = ctypes.string_at(C.llama_get_logits_ith(eng._ctx, i), 4 * eng.vocabulary.n_vocab)
                seen.setdefault(row.sequence.slot.owner, []).append(logits)
        return sample(rows)

    eng._sample = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del eng._sample


def solo(request: GenerationRequest) -> tuple[list[TokenPiece], str]:
    single = shared_engine()
    single.clear_cache()
    pieces, result = run_engine(single, request)
    return pieces, result.finish_reason


# -- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [POEM, chat("Name three colours.", 12), chat("Say hello.", 16, stop=("!",)), GenerationRequest(prompt="Hi", max_tokens=8)],
    ids=["two-chunk-prompt", "short", "stop-string", "two-token-prompt"],
)
def test_a_batch_of_one_equals_the_solo_engine(request_: GenerationRequest) -> None:
    assert cold([request_])[0] == solo(request_)


def test_the_same_schedule_twice_gives_the_same_tokens() -> None:
    requests = [POEM, counting(1), STORM]
    first = cold(requests, chunk=16)
    assert cold(requests, chunk=16) == first
    assert {reason for _, reason in first.values()} <= {"stop", "length"}


def test_sequences_of_one_batch_shape_do_not_affect_each_other() -> None:
    """The poem beside two counting answers, three times with other companions of the same
    prompt length that also run to max_tokens: the poem's logits are the same bit for bit."""
    eng = engine()
    runs = []
    for a, b in [(1, 2), (3, 4), (5, 6)]:
        eng.clear()
        with recorded_logits(eng) as logits:
            answers = drive(eng, [counting(a), POEM, counting(b)], chunk=32)
        assert answers[0][1] == answers[2][1] == "length"  # the shape did not change
        runs.append((answers[1], logits[1]))
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert len(runs[0][1]) == len(runs[0][0][0])


# -- prefix sharing ----------------------------------------------------------------------------


def test_a_second_sequence_with_the_same_system_prompt_prefills_only_the_rest() -> None:
    eng = engine()
    eng.clear()
    prompt_poem, prompt_storm = eng.vocabulary.prompt(POEM), eng.vocabulary.prompt(STORM)
    shared = next(i for i, (a, b) in enumerate(zip(prompt_poem, prompt_storm)) if a != b)
    assert shared > 64  # the system prompt and more
    first = eng.admit(0, POEM)
    eng.step([], (0, 64))
    eng.step([], (0, first.prefill_tokens - 64))  # the poem's prompt is cached, it decodes now
    assert eng.admission(1, STORM).prefill_tokens == len(prompt_storm) - shared
    second = eng.admit(1, STORM)  # shared from a live sequence
    assert second.prefill_tokens == len(prompt_storm) - shared
    assert second.prefill_tokens <= eng.prefill_chunk
    eng.step([0], (1, second.prefill_tokens))
    eng.release(0)
    eng.release(1)
    # From a released slot: the shared cells give the answer computing them gives.
    sharing = drive(eng, [STORM])[0]
    assert sharing == cold([STORM])[0]


def test_a_repeated_prompt_computes_only_its_last_row() -> None:
    cold([POEM])
    assert engine().admission(0, POEM).prefill_tokens == 1


def test_an_idle_slots_cells_are_given_up_when_the_cache_is_full() -> None:
    small = BatchedEngine(n_threads=THREADS, max_batch=2, n_ctx=512)
    try:
        first = GenerationRequest(prompt="word " * 300, max_tokens=4)
        second = GenerationRequest(prompt="other " * 300, max_tokens=4)
        expected = drive(small, [second])
        small.clear()
        drive(small, [first])  # released: its cells stay in its slot
        (kept,) = [slot for slot in small._slots if slot.cached]
        assert len(kept.cached) + len(small.vocabulary.prompt(second)) > small.n_ctx
        assert drive(small, [second]) == expected  # it needs the room the idle slot's cells held
        assert not kept.cached
    finally:
        small.close()


# -- release, resume, refusal ------------------------------------------------------------------


def test_release_mid_prefill_and_mid_decode_leaves_the_engine_usable(poem: tuple[list[TokenPiece], str]) -> None:
    eng = engine()
    eng.clear()
    eng.admit(0, STORM)
    eng.step([], (0, 40))  # part of the prompt
    eng.release(0)
    decoding = eng.admit(1, counting(7))
    eng.step([], (1, decoding.prefill_tokens))
    for _ in range(3):
        eng.step([1], None)
    eng.release(1)
    assert eng.live == 0
    assert drive(eng, [POEM])[0] == poem


@pytest.fixture(scope="module")
def poem() -> tuple[list[TokenPiece], str]:
    """The poem, uninterrupted, in a batch of one."""
    return cold([POEM])[0]


@pytest.mark.parametrize("k", [1, 7, 19])
def test_a_resume_in_a_batch_of_one_continues_exactly(poem: tuple[list[TokenPiece], str], k: int) -> None:
    full, reason = poem
    resumed = GenerationRequest(messages=POEM.messages, max_tokens=POEM.max_tokens, resume_token_ids=tuple(ids(full[:k])))
    answer = cold([resumed])[0]
    assert [p.position for p in answer[0]] == list(range(k, len(full)))
    assert answer == (full[k:], reason)
    assert answer == solo(resumed)


def test_a_resume_at_max_tokens_ends_at_once() -> None:
    request = chat("Hi", 3, resume_token_ids=(1, 2, 3))
    eng = engine()
    assert eng.admission(0, request).max_new_tokens == 0
    assert cold([request])[0] == ([], "length")


def test_a_prompt_too_long_is_refused_before_work() -> None:
    eng = engine()
    eng.clear()
    too_long = GenerationRequest(prompt="word " * 2100, max_tokens=8)
    with pytest.raises(PromptTooLongError, match="exceeds the context of 2048"):
        eng.validate(too_long)
    with pytest.raises(PromptTooLongError):
        eng.admit(0, too_long)
    with pytest.raises(ConfigurationError):
        eng.validate(chat("Hi", stop=("",)))
    assert eng.live == 0 and all(not slot.cached for slot in eng._slots)


def test_misuse_of_the_step_interface_is_a_clear_error() -> None:
    eng = engine()
    eng.clear()
    eng.admit(0, POEM)
    try:
        with pytest.raises(ValueError, match="prefill is not done"):
            eng.step([0], None)
        with pytest.raises(ValueError, match="not admitted"):
            eng.step([5], None)
        with pytest.raises(ValueError, match="already admitted"):
            eng.admit(0, POEM)
        with pytest.raises(ValueError, match="at most 4 decodes and a prefill chunk of 64 rows"):
            eng.step([], (0, 65))
    finally:
        eng.release(0)


def test_the_step_profile_is_measured_on_the_engine() -> None:
    eng = engine()
    profile = measure_step_profile(eng)
    assert len(profile.decode_s) == eng.max_batch and profile.prefill_s_per_token > 0
    assert list(profile.decode_s) == sorted(profile.decode_s)  # a larger batch is never faster
    assert eng.live == 0 and all(not slot.cached for slot in eng._slots)


# -- the endpoint --------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.pieces: list[TokenPiece] = []
        self.times: list[float] = []
        self.admitted_at: float | None = None

    def __call__(self, piece: TokenPiece) -> None:
        self.pieces.append(piece)
        self.times.append(trio.current_time())

    def admitted(self) -> None:
        self.admitted_at = trio.current_time()

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


SEQUENCES = {"1, 2, 3, 4, 5,": " 6, 7,", "a, b, c, d, e,": " f, g,", "10, 20, 30, 40,": " 50,"}


@trio_test(240)
async def test_concurrent_answers_through_the_endpoint_each_get_their_own_tokens() -> None:
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=2, n_ctx=1024) as device:
        sinks = {prompt: Sink() for prompt in SEQUENCES}
        results = {}
        ahead: list[int] = []

        async def one(prompt: str) -> None:
            def sink(piece: TokenPiece) -> None:
                ahead.append(device.answers_ahead)
                sinks[prompt](piece)

            sink.admitted = sinks[prompt].admitted  # type: ignore[attr-defined]
            results[prompt] = await device.generate(GenerationRequest(prompt=prompt, max_tokens=6), sink)

        async with trio.open_nursery() as nursery:
            for prompt in SEQUENCES:
                nursery.start_soon(one, prompt)
        for prompt, expected in SEQUENCES.items():
            sink = sinks[prompt]
            assert sink.text.startswith(expected), (prompt, sink.text)
            assert [p.position for p in sink.pieces] == list(range(6))
            assert results[prompt].finish_reason == "length" and sink.admitted_at is not None
        # Two places for three answers: the last one admitted waited while the others decoded
        # (it is admitted when one of them ends; their first tokens reached their tasks before).
        waited = max(sinks.values(), key=lambda s: s.admitted_at or 0.0)
        assert waited.admitted_at is not None
        assert all(s.times[0] <= waited.admitted_at for s in sinks.values() if s is not waited)
        statistics = device.statistics()
        assert statistics.queued == statistics.running == 0 and statistics.tokens == 18
        assert ahead[0] >= 1 and device.answers_ahead == 0  # three answers, two places: one waited
        assert device.cost.totals().answers == 3 and not device.busy


@trio_test(240)
async def test_several_runtime_streams_at_once_share_the_batched_device() -> None:
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=4, n_ctx=1024) as device:
        config = pydisco.RuntimeConfig(device_model=None, cloud_url=None)
        async with pydisco.open_runtime(config, endpoints={"device": device}) as rt:
            texts: dict[str, str] = {}

            async def one(prompt: str) -> None:
                async with rt.stream(prompt=prompt, max_tokens=6, pace=False) as answer:
                    texts[prompt] = "".join([piece.text async for piece in answer])
                assert answer.report.finish_reason == "length"

            async with trio.open_nursery() as nursery:
                for prompt in SEQUENCES:
                    nursery.start_soon(one, prompt)
        for prompt, expected in SEQUENCES.items():
            assert texts[prompt].startswith(expected), (prompt, texts[prompt])
        assert device.statistics().tokens == 18


@trio_test(240)
async def test_a_cancelled_answer_leaves_the_others_running() -> None:
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=2, n_ctx=1024) as device:
        kept, cancelled = Sink(), Sink()
        results = []

        async def keep() -> None:
            results.append(await device.generate(GenerationRequest(prompt="1, 2, 3, 4, 5,", max_tokens=12), kept))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep)
            with trio.CancelScope() as scope:

                def cancel_at_third(piece: TokenPiece) -> None:
                    cancelled(piece)
                    if len(cancelled.pieces) == 3:
                        scope.cancel()

                await device.generate(GenerationRequest(prompt="a, b, c, d, e,", max_tokens=12), cancel_at_third)
        assert scope.cancelled_caught and len(cancelled.pieces) == 3
        assert results[0].finish_reason == "length" and len(kept.pieces) == 12
        assert [entry.finish_reason for entry in device.cost.recent].count("cancelled") == 1
        assert device.engine.live == 0


@trio_test(240)
async def test_prepare_leaves_the_prefix_cached_for_the_answer() -> None:
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=2, n_ctx=1024) as device:
        request = dataclasses.replace(POEM, resume_token_ids=(9690, 28, 253))  # a committed prefix
        target = device.count_prompt_tokens(request) + 3
        assert await device.prepare(request) == target
        assert device.tokens_to_prefill(request) == 1  # only the last row, for its logits
        sink = Sink()
        result = await device.generate(request, sink)
        assert result.prefilled_tokens == 1 and sink.pieces[0].position == 3
        assert [entry.finish_reason for entry in device.cost.recent] == ["prepared", result.finish_reason]
        assert device.cost.recent[0].decoded_tokens == 0


@trio_test(240)
async def test_a_refused_request_is_a_clear_error() -> None:
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=2, n_ctx=1024, scheduler="slice") as device:
        with pytest.raises(AdmissionRefused, match="slice scheduler refused it") as refused:
            await device.generate(GenerationRequest(prompt="Hi", max_tokens=4), Sink(), slo=Slo(reading_rate=100_000))
        assert refused.value.code == "rejected"
        with pytest.raises(PromptTooLongError):
            await device.generate(GenerationRequest(prompt="word " * 1100, max_tokens=4), Sink())


@trio_test(240)
async def test_an_answer_beyond_the_engines_sequences_waits_for_the_slot_and_then_answers() -> None:
    """fastserve admits whatever fits the KV cache; with one sequence slot, the second answer
    it admits waits until the first has ended and freed the slot (the step loop guards the
    slots), then answers: neither is refused, and they never ran at once."""
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=1, max_sequences=1, n_ctx=1024,
                                            scheduler="fastserve") as device:  # fmt: skip
        sinks = {prompt: Sink() for prompt in list(SEQUENCES)[:2]}
        results: dict[str, GenerationResult] = {}

        async def one(prompt: str) -> None:
            results[prompt] = await device.generate(GenerationRequest(prompt=prompt, max_tokens=6), sinks[prompt])

        async with trio.open_nursery() as nursery:
            for prompt in sinks:
                nursery.start_soon(one, prompt)
        assert all(r.generated_tokens == len(sinks[p].pieces) > 0 for p, r in results.items()) and len(results) == 2
        first, second = sorted(sinks.values(), key=lambda sink: sink.times[0])
        assert first.times[-1] <= second.times[0]  # one slot: the second started after the first ended
        assert device.statistics().running == 0 and device.statistics().rejected == 0


@trio_test(60)
async def test_an_unknown_scheduler_is_refused_before_loading() -> None:
    with pytest.raises(ConfigurationError, match="unknown step scheduler 'nope'"):
        async with open_batched_device_endpoint(scheduler="nope", model_path="/nonexistent.gguf"):
            pass


SHARED_PREFIX = "Count on: " + ", ".join(str(i) for i in range(1, 50)) + ","  # ~100 prompt tokens


@trio_test(300)
async def test_answers_reusing_a_released_prefix_reserve_its_cells() -> None:
    """A released answer's prompt stays in its slot; three newcomers share it. The scheduler
    reserves their computed rows and tokens (which fit 512 cells together) but not the shared
    prefix they pin: before, the step then found no room and every answer failed with kv_full.
    Now the pinned cells come off the capacity, one newcomer waits, and all three complete."""
    async with open_batched_device_endpoint(n_threads=THREADS, max_batch=4, n_ctx=512) as device:
        engine = device.engine
        assert engine.n_ctx == 512
        first = await device.generate(GenerationRequest(prompt=SHARED_PREFIX + " 50", max_tokens=2), Sink())
        assert first.finish_reason == "length"
        prefix = len(engine.vocabulary.prompt(GenerationRequest(prompt=SHARED_PREFIX + " 50", max_tokens=2)))
        max_tokens = 150
        newcomers = [f"{SHARED_PREFIX} {n}" for n in (60, 70, 80)]
        computed = [len(engine.vocabulary.prompt(GenerationRequest(prompt=p, max_tokens=1))) - prefix + 8 for p in newcomers]
        # Their reservations fit the cache; with the prefix they pin, they do not.
        assert sum(c + max_tokens for c in computed) <= 512 < prefix - 8 + sum(c + max_tokens for c in computed)
        results = {}

        async def one(prompt: str) -> None:
            results[prompt] = await device.generate(GenerationRequest(prompt=prompt, max_tokens=max_tokens), Sink())

        async with trio.open_nursery() as nursery:
            for prompt in newcomers:
                nursery.start_soon(one, prompt)
        assert all(r.generated_tokens > 0 for r in results.values()) and len(results) == 3
        assert engine.pinned_cells() == 0  # nothing live
