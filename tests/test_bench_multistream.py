"""bench/multistream.py's server QoE part (a tiny real run) and its llama-server anchor (skipped
cleanly without the binary)."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
import trio
import trio.testing

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import _llama_server  # type: ignore[import-not-found]  # noqa: E402  (bench/ holds scripts, not a package)
import _server_qoe  # type: ignore[import-not-found]  # noqa: E402
import multistream  # type: ignore[import-not-found]  # noqa: E402

from pydisco.papers._andes import BURST_SHARE, CYCLES  # noqa: E402
from pydisco._types import TokenPiece  # noqa: E402
from pydisco.workloads import TraceRequest  # noqa: E402
from pydisco.policies import Slo  # noqa: E402

TRACE = _server_qoe.trace_path()
needs_trace = pytest.mark.skipif(TRACE is None, reason="the Andes trace (../shared/data/traces/sharegpt_qoe_trace.json) is not here")


def test_the_plan_bursts_around_the_sustainable_rate_with_the_records_slos() -> None:
    records = [TraceRequest(0.0, 10 * (i + 1), 20 + i, slo=Slo(reading_rate=4.0 + i / 10)) for i in range(5)]
    seconds, sustainable = 400.0, 2.0
    answers = _server_qoe.plan(records, sustainable, seconds, seed=3)
    assert all(0 < a.arrival_s < seconds for a in answers)
    assert [a.slo for a in answers[:5]] == [r.slo for r in records]
    assert [a.max_tokens for a in answers[:5]] == [r.output_tokens for r in records]
    period = seconds / CYCLES
    in_bursts = sum(a.arrival_s % period < BURST_SHARE * period for a in answers)
    burst_rate = in_bursts / (BURST_SHARE * seconds)
    base_rate = (len(answers) - in_bursts) / ((1 - BURST_SHARE) * seconds)
    assert 1.5 * sustainable < burst_rate < 2.5 * sustainable  # Andes' 1.5-2.5x, for 35 % of each cycle
    assert base_rate < sustainable / 2


def test_a_reader_buffers_what_it_has_not_read_at_its_rate() -> None:
    async def read() -> list[int]:
        reader = _server_qoe.Reader(4.0)
        seen = [reader.reader_state().buffered_tokens]
        for i in range(8):
            reader(TokenPiece(i, i, str(i)))
        seen.append(reader.reader_state().buffered_tokens)
        await trio.sleep(1.0)  # four read
        seen.append(reader.reader_state().buffered_tokens)
        assert reader.reader_state().reading_rate_tps == 4.0 and len(reader.stamps) == 8
        return seen

    assert trio.run(read, clock=trio.testing.MockClock(autojump_threshold=0)) == [0, 8, 4]


@needs_trace
def test_the_server_part_measures_both_schedulers_on_a_tiny_real_run() -> None:
    figures = _server_qoe.server_qoe(None, threads=1, answers=8, max_answer_tokens=12)
    assert figures["server_answers"] > 0 and figures["server_aggregate_tok_s"] > 0
    for key in multistream.SERVER_QOE_KEYS:
        assert math.isfinite(figures[key]) and 0.0 <= figures[key] <= 1.0, key
    for name in _server_qoe.SCHEDULERS:
        assert figures[f"{name}_failed"] == 0 and figures[f"{name}_rejected"] == 0


def test_without_the_binary_the_anchor_says_why_and_the_rest_is_measured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_llama_server, "find_llama_server", lambda: None)
    multistream.main(["--json", "--no-slo", "--no-server", "--rounds", "1", "--tokens", "24", "--threads", "1"])
    figures = json.loads(capsys.readouterr().out)
    assert figures["batch8_vs_llama_server"] is None
    assert "no llama-server binary" in figures["llama_server_not_measured"]
    assert figures["engine1_tok_s"] > 0 and figures["raw8_tok_s"] > 0
    assert all(figures[key] is None for key in multistream.SERVER_QOE_KEYS)


def test_the_anchor_gets_the_engines_settings_where_the_binary_has_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_llama_server, "use_extra_buffers", lambda: False)
    new = _llama_server.server_command("llama-server", "m.gguf", slots=8, n_ctx=4096, threads=1, port=9,
                                       help_text="--flash-attn --kv-unified --no-repack")  # fmt: skip
    old = _llama_server.server_command("llama-server", "m.gguf", slots=8, n_ctx=4096, threads=1, port=9, help_text="")
    assert new[new.index("-np") + 1] == "8" and "--cont-batching" in new and new[new.index("-t") + 1] == "1"
    assert {"--no-repack", "--kv-unified"} <= set(new) and not {"--no-repack", "--kv-unified", "--flash-attn"} & set(old)
