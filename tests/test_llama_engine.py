"""LlamaEngine on the real SmolLM2 model: streaming, resume, UTF-8, stops, aborts, bad input."""

from __future__ import annotations

import ctypes
import pathlib

import pytest
from device_support import chat, run_engine, shared_engine

from pydisco._errors import ConfigurationError, ModelError, PromptTooLongError
from pydisco.device._engine import LlamaEngine, _chunk_end, _computed_alone
from pydisco.device._text import PieceStream
from pydisco.device import default_model_path, model_id
from pydisco._types import GenerationRequest, Sampling, TokenPiece

pytestmark = pytest.mark.model

N = 24  # tokens per answer: enough to cross several resume points, cheap on 2 busy cores
# The system text makes the prompt longer than one prefill chunk (64 tokens), so that cache
# reuse and the chunked schedule are exercised.
SYSTEM = {"role": "system", "content": "You are a poet. You write short, vivid poems about nature. " * 4}


def poem_request(max_tokens: int = N, **kwargs: object) -> GenerationRequest:
    messages = [SYSTEM, {"role": "user", "content": "Write a short poem about the sea."}]
    return GenerationRequest(messages=messages, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


POEM = poem_request()
OTHER = GenerationRequest(messages=[SYSTEM, {"role": "user", "content": "List three fruits."}], max_tokens=6)


@pytest.fixture(scope="module")
def poem() -> list[TokenPiece]:
    """The uninterrupted greedy answer, generated from an empty cache."""
    engine = shared_engine()
    engine.clear_cache()
    pieces, result = run_engine(engine, POEM)
    assert result.finish_reason == "length" and len(pieces) == N
    return pieces


def _logits(engine: LlamaEngine) -> bytes:
    """The context's last logits, as bytes (compared bit for bit)."""
    from llama_cpp import llama_cpp as C

    return ctypes.string_at(C.llama_get_logits_ith(engine._ctx, -1), 4 * engine.n_vocab)


@pytest.fixture(scope="module")
def poem_logits(poem: list[TokenPiece]) -> dict[int, bytes]:
    """The logits each position of the uninterrupted run was sampled from."""
    engine = shared_engine()
    engine.clear_cache()
    seen: dict[int, bytes] = {}
    engine.generate(POEM, lambda piece: seen.setdefault(piece.position, _logits(engine)))
    assert len(seen) == N
    return seen


def test_streams_positions_in_order_and_text_matches_the_tokens(poem: list[TokenPiece]) -> None:
    engine = shared_engine()
    assert [p.position for p in poem] == list(range(N))
    text = "".join(p.text for p in poem)
    assert text == engine.detokenize([p.token_id for p in poem]).decode("utf-8")
    assert len(text.split()) > 5


def test_a_repeated_request_reuses_the_cache_and_gives_the_same_answer(poem: list[TokenPiece]) -> None:
    engine = shared_engine()
    pieces, result = run_engine(engine, POEM)
    assert pieces == poem
    # Only the prompt's last two rows are computed again (fresh logits, in a batch of two rows
    # as the uninterrupted prefill computed them), not the whole prompt.
    assert result.prompt_tokens > 64
    assert result.prefilled_tokens == 2


def test_a_prompt_sharing_a_prefix_computes_only_the_rest(poem: list[TokenPiece]) -> None:
    engine = shared_engine()
    engine.clear_cache()
    run_engine(engine, OTHER)  # the same system text, another question
    expected = engine.tokens_to_prefill(POEM)
    pieces, result = run_engine(engine, POEM)
    assert pieces == poem  # as from an empty cache
    assert result.prefilled_tokens == expected
    # The shared system text (more than one 64-token chunk, cut at no chunk boundary) is kept.
    assert expected < result.prompt_tokens - 64


def test_a_conversation_keeps_its_earlier_turns_cached() -> None:
    engine = shared_engine()
    engine.clear_cache()
    first = [SYSTEM, {"role": "user", "content": "Name a tree."}]
    pieces, turn1 = run_engine(engine, GenerationRequest(messages=first, max_tokens=8))
    reply = "".join(p.text for p in pieces)
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a flower?"}]
    _, turn2 = run_engine(engine, GenerationRequest(messages=second, max_tokens=4))
    # The first turn's prompt stays cached; its answer rows, decoded one at a time, are computed
    # again in a batch so that the new prompt's numbers do not depend on the conversation's past.
    assert turn2.prefilled_tokens <= turn2.prompt_tokens - (turn1.prompt_tokens - 2)


@pytest.mark.parametrize("k", [0, 3, 11, N - 1])
@pytest.mark.parametrize("history", ["cold", "other-prompt", "other-continuation", "aborted-prefill"])
def test_greedy_resume_is_exact_whatever_the_cache_held_before(
    poem: list[TokenPiece], poem_logits: dict[int, bytes], k: int, history: str
) -> None:
    engine = shared_engine()
    ids = tuple(p.token_id for p in poem)
    engine.clear_cache()
    if history == "other-prompt":
        run_engine(engine, OTHER)
    elif history == "other-continuation":  # the cache holds the prompt, two right ids, a wrong one
        wrong = (ids[2] + 1) % engine.n_vocab
        engine.prefill_only(poem_request(resume_token_ids=ids[:2] + (wrong,)))
    elif history == "aborted-prefill":  # stopped after some rows of the first chunk
        calls = iter(range(10**6))
        engine.prefill_only(POEM, should_abort=lambda: next(calls) > 40)
    request = poem_request(resume_token_ids=ids[:k])
    expected = engine.tokens_to_prefill(request)
    assert engine.prefill_only(request) == expected
    assert _logits(engine) == poem_logits[k]  # bit for bit, not only the same greedy choice
    pieces, result = run_engine(engine, request)
    assert pieces == poem[k:] and result.prefilled_tokens == 0
    if history == "cold":
        assert expected == result.prompt_tokens + k
    elif history == "other-continuation" and k >= 3:
        assert expected == k - 2  # the prompt and the two right ids are kept


@pytest.mark.parametrize(
    ("k", "cache"),
    [(1, "warm"), (9, "warm"), (N - 1, "warm"), (1, "cold"), (N - 1, "cold"), (9, "other-prompt")],
)
def test_greedy_resume_by_token_ids_equals_the_uninterrupted_run(poem: list[TokenPiece], k: int, cache: str) -> None:
    engine = shared_engine()
    if cache == "cold":
        engine.clear_cache()
    elif cache == "other-prompt":
        run_engine(engine, OTHER)
    ids = tuple(p.token_id for p in poem)
    request = poem_request(resume_token_ids=ids[:k])
    pieces, result = run_engine(engine, request)
    assert pieces == poem[k:]  # same ids, positions and text
    assert result.finish_reason == "length" and result.generated_tokens == N - k
    if cache == "warm":
        assert result.prefilled_tokens <= 1  # the cache already held prompt + prefix


@pytest.mark.parametrize("k", [6, 15])
def test_greedy_resume_by_text_equals_the_uninterrupted_run(poem: list[TokenPiece], k: int) -> None:
    engine = shared_engine()
    prefix_text = "".join(p.text for p in poem[:k])
    # Precondition: the answer so far re-tokenises to the same ids (true for this text).
    assert engine.tokenize(prefix_text) == [p.token_id for p in poem[:k]]
    request = poem_request(resume_text=prefix_text, resume_position=k)
    pieces, _ = run_engine(engine, request)
    assert pieces == poem[k:]


def test_resume_at_max_tokens_generates_nothing(poem: list[TokenPiece]) -> None:
    ids = tuple(p.token_id for p in poem)
    pieces, result = run_engine(shared_engine(), poem_request(resume_token_ids=ids))
    assert pieces == [] and result.finish_reason == "length" and result.prefilled_tokens == 0


CHINESE = chat("Translate to Chinese: I love my family.", max_tokens=20)


@pytest.fixture(scope="module")
def chinese() -> list[TokenPiece]:
    return run_engine(shared_engine(), CHINESE)[0]


def test_multibyte_text_is_never_split_inside_a_character(chinese: list[TokenPiece]) -> None:
    engine = shared_engine()
    ids = [p.token_id for p in chinese]
    # The test means something only if some token ends inside a character.
    split = [i for i in ids if not _decodes(engine.detokenize([i]))]
    assert split, "expected tokens that carry part of a character"
    for piece in chinese:
        piece.text.encode("utf-8")  # whole characters: no lone surrogates
        assert "\ufffd" not in piece.text
    whole = engine.detokenize(ids)
    text = _complete_prefix(whole)  # max_tokens may cut the last character short
    assert len(whole) - len(text.encode()) < 4
    assert "".join(p.text for p in chinese) == text
    assert any(ord(ch) > 0x2E80 for ch in text)  # CJK really came out


def test_resume_inside_a_split_character_completes_it(chinese: list[TokenPiece]) -> None:
    k = next(i for i, p in enumerate(chinese) if p.text == "") + 1  # just after a partial character
    ids = tuple(p.token_id for p in chinese)
    request = chat("Translate to Chinese: I love my family.", max_tokens=20, resume_token_ids=ids[:k])
    assert run_engine(shared_engine(), request)[0] == chinese[k:]


def test_stop_strings_end_the_answer_before_them() -> None:
    engine = shared_engine()
    request = GenerationRequest(prompt="1, 2, 3, 4, 5,", max_tokens=30, stop=("9, 1",))
    pieces, result = run_engine(engine, request)
    text = "".join(p.text for p in pieces)
    assert result.finish_reason == "stop"
    assert text == " 6, 7, 8, ", text
    assert [p.position for p in pieces] == list(range(len(pieces)))


def test_an_abort_between_decode_steps_stops_at_once_and_the_engine_stays_usable(poem: list[TokenPiece]) -> None:
    engine = shared_engine()
    got: list[TokenPiece] = []
    result = engine.generate(POEM, got.append, should_abort=lambda: len(got) >= 5)
    assert result.finish_reason == "cancelled"
    assert got == poem[:5] and result.generated_tokens == 5
    assert run_engine(engine, POEM)[0] == poem


def test_an_abort_inside_a_prefill_chunk_stops_llama_decode() -> None:
    engine = shared_engine()
    engine.clear_cache()
    calls = [0]

    def should_abort() -> bool:
        # Polled before each 64-token chunk and, by llama.cpp, once per graph node inside one.
        calls[0] += 1
        return calls[0] >= 3

    request = GenerationRequest(prompt="The quick brown fox jumps over the lazy dog. " * 20, max_tokens=2)
    got: list[TokenPiece] = []
    result = engine.generate(request, got.append, should_abort)
    assert result.finish_reason == "cancelled" and got == []
    assert result.prompt_tokens > 3 * 64
    # Had only the between-chunk polls run, the third would have come after two whole chunks.
    assert result.prefilled_tokens == 0 == engine.cached_tokens and calls[0] == 3
    pieces, again = run_engine(engine, request)  # still usable
    assert again.prefilled_tokens == again.prompt_tokens and len(pieces) == 2


def test_an_exception_in_on_token_propagates_and_the_engine_stays_usable(poem: list[TokenPiece]) -> None:
    engine = shared_engine()

    def boom(piece: TokenPiece) -> None:
        if piece.position == 3:
            raise KeyError("sink")

    with pytest.raises(KeyError):
        engine.generate(POEM, boom)
    assert run_engine(engine, POEM)[0] == poem


def test_prefill_only_warms_the_cache_for_a_migration_target(poem: list[TokenPiece]) -> None:
    engine = shared_engine()
    engine.clear_cache()
    ids = tuple(p.token_id for p in poem)
    request = poem_request(resume_token_ids=ids[:12])
    computed = engine.prefill_only(request)
    assert computed == engine.cached_tokens > 12
    pieces, result = run_engine(engine, request)
    assert result.prefilled_tokens == 0 and pieces == poem[12:]


def test_sampling_with_temperature_is_reproducible_per_seed() -> None:
    engine = shared_engine()
    hot = Sampling(temperature=1.0, top_p=0.95, seed=7)
    a, _ = run_engine(engine, chat("Name a colour.", max_tokens=12, sampling=hot))
    b, _ = run_engine(engine, chat("Name a colour.", max_tokens=12, sampling=hot))
    assert a == b


def test_bad_requests_fail_before_any_work() -> None:
    engine = shared_engine()
    run_engine(engine, OTHER)
    cached = list(engine._cached)
    with pytest.raises(PromptTooLongError):
        engine.generate(GenerationRequest(prompt="word " * 2100, max_tokens=8), lambda _: None)
    with pytest.raises(PromptTooLongError):  # max_tokens counts too
        engine.validate(chat("Hi", max_tokens=2040))
    with pytest.raises(ConfigurationError):
        engine.generate(chat("Hi", stop=("",)), lambda _: None)
    with pytest.raises(ConfigurationError):
        engine.generate(chat("Hi", resume_token_ids=(10**9,)), lambda _: None)
    with pytest.raises(ConfigurationError):
        engine.validate(GenerationRequest(prompt=""))
    assert engine._cached == cached  # nothing was computed


def test_bad_model_files_raise_model_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        LlamaEngine(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF"):
        LlamaEngine(tmp_path / "text.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(default_model_path().read_bytes()[: 1 << 20])
    with pytest.raises(ModelError, match="could not load"):
        LlamaEngine(truncated)
    with pytest.raises(ConfigurationError):
        LlamaEngine(n_threads=0)


def test_model_id_names_the_file_and_ignores_where_it_lives(tmp_path: pathlib.Path) -> None:
    engine = shared_engine()
    assert engine.model_id.startswith("SmolLM2-135M-Instruct.Q4_1-")
    copy = tmp_path / default_model_path().name
    copy.write_bytes(default_model_path().read_bytes())
    assert model_id(copy) == engine.model_id
    with copy.open("r+b") as f:  # a different header is a different model
        f.seek(100)
        f.write(b"\xff")
    assert model_id(copy) != engine.model_id


def _complete_prefix(data: bytes) -> str:
    """``data`` decoded, without a partial character at the end."""
    for cut in range(4):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"invalid UTF-8 inside {data!r}")


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- the piece stream alone (pure logic; the model tests above exercise it for real) --------


def _stream(chunks: list[bytes], stops: tuple[str, ...] = (), primer: bytes = b"") -> tuple[list[TokenPiece], bool]:
    stream = PieceStream(stops, primer, primer.decode("utf-8", "replace"))
    out: list[TokenPiece] = []
    for i, data in enumerate(chunks):
        pieces, stopped = stream.push(i, 100 + i, data)
        out += pieces
        if stopped:
            return out, True
    return out + stream.flush(), False


# Where a prefill may start: never on the last prompt row of a longer prompt (_reusable backs
# off one row), else anywhere in the prompt or past it.
STARTS = [
    (n, start)
    for n in (1, 2, 3, 63, 64, 65, 66, 129, 130)
    for start in (0, 1, 5, 62, 63, 64)
    if not (n >= 2 and start >= n - 1)
]


@pytest.mark.parametrize(("n_prompt", "start"), STARTS)
def test_prefill_batches_never_hold_a_single_prompt_row(n_prompt: int, start: int) -> None:
    pos, batches = start, []
    while pos < n_prompt + 2:
        end = _chunk_end(pos, n_prompt, 64)
        batches.append((pos, end))
        pos = end
    for a, b in batches:
        assert 0 < b - a <= 64
        assert (b - a == 1) == _computed_alone(a, n_prompt)  # as the uninterrupted run computes it


def test_piece_stream_holds_a_partial_character_until_it_completes() -> None:
    euro = "€".encode()
    pieces, _ = _stream([b"a", euro[:1], euro[1:2], euro[2:] + b"b"])
    assert [p.text for p in pieces] == ["a", "", "", "€b"]
    resumed, _ = _stream([euro[2:] + b"b"], primer=b"a" + euro[:2])
    assert [p.text for p in resumed] == ["€b"]


def test_piece_stream_cuts_a_stop_string_spanning_tokens() -> None:
    pieces, stopped = _stream([b"Hello", b" wor", b"ld", b"!"], stops=("o wo", "world"))
    assert stopped and "".join(p.text for p in pieces) == "Hell"
    pieces, stopped = _stream([b"ab", b"c", b"d"], stops=("cx",))
    assert not stopped and "".join(p.text for p in pieces) == "abcd"
    pieces, stopped = _stream([b"X", b"!"], stops=("ZX",), primer=b"Z")  # begins in the prefix
    assert stopped and pieces == []


def test_a_messages_list_changed_in_place_is_tokenised_again() -> None:
    engine = shared_engine()
    history = [{"role": "user", "content": "Name a tree."}]
    request = GenerationRequest(messages=history, max_tokens=4)
    before = engine.count_prompt_tokens(request)
    assert engine.count_prompt_tokens(request) == before  # the kept tokens
    history.append({"role": "assistant", "content": "An oak."})
    history.append({"role": "user", "content": "And a flower?"})
    assert engine.count_prompt_tokens(request) > before
    assert engine.count_prompt_tokens(request) == engine.count_prompt_tokens(GenerationRequest(messages=list(history)))
