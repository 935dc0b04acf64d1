"""Workload loaders on the real public files and on small malformed ones; the synthetic default."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import random
import statistics

import pytest

from pydisco.workloads import (
    AZURE_CONV_OUTPUT_TOKENS,
    AZURE_CONV_PROMPT_TOKENS,
    LogNormalLengths,
    TraceRequest,
    WorkloadFormatError,
    approx_token_count,
    load_andes_qoe_trace,
    load_azure_trace,
    load_server_ttft,
    synthetic_workload,
)

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "traces" / "AzureLLMInferenceTrace_conv.csv"
ANDES = DATA / "traces" / "sharegpt_qoe_trace.json"
SERVER_TTFT = DATA / "server_ttft"


def needs(path: pathlib.Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.exists(), reason=f"{path} is not here; the public data lives outside the repo"
    )


# ----- Azure trace -----------------------------------------------------------------------------


@pytest.mark.shared_data
@needs(AZURE)
def test_azure_trace_matches_the_file() -> None:
    requests = load_azure_trace(AZURE)
    with AZURE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(requests) == len(rows)
    assert [r.prompt_tokens for r in requests] == [int(row["ContextTokens"]) for row in rows]
    assert [r.output_tokens for r in requests] == [int(row["GeneratedTokens"]) for row in rows]
    assert requests[0].arrival_s == 0.0
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals)
    # The span agrees with the timestamps, to the trace's 100 ns resolution.
    first, last = rows[0]["TIMESTAMP"], rows[-1]["TIMESTAMP"]
    span = (_seconds(last) - _seconds(first))
    assert arrivals[-1] == pytest.approx(span, abs=1e-6)


def _seconds(stamp: str) -> float:
    day, clock = stamp.split(" ")
    h, m, s = clock.split(":")
    return int(day[-2:]) * 86400 + int(h) * 3600 + int(m) * 60 + float(s)


def _write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body, line, words",
    [
        ("", 1, "empty"),
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.1,3\n", 1, "GeneratedTokens"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,4\n2023-11-16 18:15:47.0,3\n", 3, "expected 3 fields"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,many,4\n", 2, "ContextTokens is not an integer"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,-4\n", 2, "GeneratedTokens is negative"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,3,4\n", 2, "TIMESTAMP"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.x1,3,4\n", 2, "fractional"),
    ],
)
def test_azure_trace_errors_name_file_line_and_problem(
    tmp_path: pathlib.Path, body: str, line: int, words: str
) -> None:
    path = _write(tmp_path, "trace.csv", body)
    with pytest.raises(WorkloadFormatError) as info:
        load_azure_trace(path)
    assert info.value.line == line
    assert str(path) in str(info.value) and f":{line}" in str(info.value)
    assert words in str(info.value)


def test_azure_trace_sorts_and_measures_from_the_earliest(tmp_path: pathlib.Path) -> None:
    path = _write(
        tmp_path,
        "trace.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:47.2500000,10,1\n"
        "2023-11-16 18:15:46.0000001,20,2\n"
        "\n"
        "2023-11-16 18:16:46,30,3\n",
    )
    requests = load_azure_trace(path)
    assert [r.prompt_tokens for r in requests] == [20, 10, 30]
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 1.2499999, 59.9999999], abs=1e-9)


# ----- Andes QoE trace ----------------------------------------------------------------------


@pytest.mark.shared_data
@needs(ANDES)
def test_andes_trace_matches_the_file() -> None:
    records = json.loads(ANDES.read_text())
    requests = load_andes_qoe_trace(ANDES, rate_per_s=2.0, seed=3)
    assert len(requests) == len(records)
    for r, rec in zip(requests, records):
        assert r.prompt_text == rec["prompt"]
        assert r.output_tokens == rec["output_len"]
        assert r.slo is not None and r.slo.reading_rate == pytest.approx(1 / rec["latency"])
        assert r.slo.ttft_target_s == rec["ttft"] and r.max_ttft_s == rec["max_ttft"]
        assert r.prompt_tokens == approx_token_count(rec["prompt"])
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    # Poisson arrivals at the asked rate (mean gap 1/rate, within sampling error).
    gaps = [b - a for a, b in zip([0.0] + arrivals, arrivals)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 2.0, rel=4 / math.sqrt(len(gaps)))


def test_andes_trace_counts_tokens_with_the_given_tokenizer(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "t.json", json.dumps(
        [{"prompt": "a b c", "output_len": 3, "ttft": 1, "max_ttft": 10, "latency": 0.25}]
    ))
    [r] = load_andes_qoe_trace(path, count_tokens=len)
    assert r.prompt_tokens == 5 and r.arrival_s == 0.0 and r.slo is not None
    assert r.slo.reading_rate == 4.0


@pytest.mark.parametrize(
    "text, words, record",
    [
        ("[{]", "invalid JSON", None),
        ('{"prompt": "x"}', "JSON list", None),
        ('[{"prompt": "x", "output_len": 3, "ttft": 1, "max_ttft": 10}]', "'latency'", 0),
        ('[{"prompt": "x", "output_len": 3, "ttft": 1, "max_ttft": 10, "latency": 0}]', "positive", 0),
        ('[{"prompt": "x", "output_len": 3, "ttft": 1, "max_ttft": 10, "latency": 0.2}, 7]', "object", 1),
        ('[{"prompt": 5, "output_len": 3, "ttft": 1, "max_ttft": 10, "latency": 0.2}]', "'prompt'", 0),
        ('[{"prompt": "x", "output_len": 2.5, "ttft": 1, "max_ttft": 10, "latency": 0.2}]', "'output_len'", 0),
        ('[{"prompt": "x", "output_len": 2, "ttft": true, "max_ttft": 10, "latency": 0.2}]', "'ttft'", 0),
    ],
)
def test_andes_trace_errors(tmp_path: pathlib.Path, text: str, words: str, record: int | None) -> None:
    path = _write(tmp_path, "t.json", text)
    with pytest.raises(WorkloadFormatError) as info:
        load_andes_qoe_trace(path)
    assert str(path) in str(info.value) and words in str(info.value)
    assert info.value.record == record


def test_json_syntax_error_names_the_line(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "t.json", '[\n{"ttft_s": 1,\n"oops"}\n]')
    with pytest.raises(WorkloadFormatError) as info:
        load_server_ttft(path)
    assert info.value.line == 3 and f"{path}:3" in str(info.value)


# ----- llmperf server records -------------------------------------------------------------------


@pytest.mark.shared_data
@needs(SERVER_TTFT)
def test_server_ttft_skips_errored_records() -> None:
    path = SERVER_TTFT / "lepton_70b.json"
    records = json.loads(path.read_text())
    ok = [r for r in records if r["error_code"] is None]
    samples = load_server_ttft(path)
    assert samples.ttft_s == tuple(float(r["ttft_s"]) for r in ok)
    assert samples.inter_token_latency_s == tuple(float(r["inter_token_latency_s"]) for r in ok)
    assert samples.skipped_errors == len(records) - len(ok) > 0
    assert samples.sources == (path,)


@pytest.mark.shared_data
@needs(SERVER_TTFT)
def test_server_ttft_directory_pools_every_file() -> None:
    files = sorted(SERVER_TTFT.glob("*.json"))
    pooled = load_server_ttft(SERVER_TTFT)
    singles = [load_server_ttft(f) for f in files]
    assert pooled.sources == tuple(files)
    assert pooled.ttft_s == tuple(x for s in singles for x in s.ttft_s)
    assert pooled.skipped_errors == sum(s.skipped_errors for s in singles)


def test_server_ttft_errors(tmp_path: pathlib.Path) -> None:
    good = {"ttft_s": 0.2, "inter_token_latency_s": 0.01, "error_code": None}
    cases = [
        ([good, {"inter_token_latency_s": 0.01, "error_code": None}], "missing field 'ttft_s'", 1),
        ([good, {**good, "ttft_s": "fast"}], "'ttft_s' must be a finite number", 1),
        ([{**good, "ttft_s": -1.0}], "'ttft_s' must be >= 0", 0),
        ([good, [0.2]], "expected an object", 1),
    ]
    for records, words, record in cases:
        path = _write(tmp_path, "s.json", json.dumps(records))
        with pytest.raises(WorkloadFormatError) as info:
            load_server_ttft(path)
        assert words in str(info.value) and info.value.record == record
        assert f"{path}: record {record}" in str(info.value)
    # Errored records are skipped whatever else they carry.
    path = _write(tmp_path, "s.json", json.dumps([good, {"ttft_s": 0, "error_code": 429}]))
    assert load_server_ttft(path).skipped_errors == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x_summary.json").write_text("{}")
    with pytest.raises(WorkloadFormatError, match="no llmperf"):
        load_server_ttft(empty)


# ----- synthetic workload ------------------------------------------------------------------------


def test_synthetic_workload_is_deterministic_and_well_formed() -> None:
    a = synthetic_workload(300, seed=7)
    assert a == synthetic_workload(300, seed=7)
    assert a != synthetic_workload(300, seed=8)
    assert all(isinstance(r, TraceRequest) and r.slo is not None for r in a)
    arrivals = [r.arrival_s for r in a]
    assert arrivals == sorted(arrivals)
    for r in a:
        assert r.slo is not None
        assert r.slo.ttft_target_s == max(r.prompt_tokens / 5000, 1.0)
        assert 3.7 < r.slo.reading_rate < 5.2
    assert synthetic_workload(3, seed=1, slo=None)[0].slo is None


def test_synthetic_workload_follows_its_documented_distributions() -> None:
    n, rate = 20000, 5.0
    requests = synthetic_workload(n, seed=11, rate_per_s=rate)
    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    # Median and mean of each log-normal, within sampling error (the clip moves neither much).
    for values, dist in ((prompts, AZURE_CONV_PROMPT_TOKENS), (outputs, AZURE_CONV_OUTPUT_TOKENS)):
        assert min(values) >= dist.minimum and max(values) <= dist.maximum
        assert statistics.median(values) == pytest.approx(dist.median, rel=0.05)
        assert statistics.fmean(values) == pytest.approx(dist.mean, rel=0.05)
    assert requests[-1].arrival_s == pytest.approx(n / rate, rel=4 / math.sqrt(n))


@pytest.mark.shared_data
@needs(AZURE)
def test_synthetic_default_resembles_the_azure_conversation_trace() -> None:
    real = load_azure_trace(AZURE)
    fake = synthetic_workload(len(real), seed=5)
    for attr in ("prompt_tokens", "output_tokens"):
        r = [getattr(x, attr) for x in real]
        f = [getattr(x, attr) for x in fake]
        assert statistics.median(f) == pytest.approx(statistics.median(r), rel=0.1)
        assert statistics.fmean(f) == pytest.approx(statistics.fmean(r), rel=0.1)
    assert fake[-1].arrival_s == pytest.approx(real[-1].arrival_s, rel=0.1)


def test_lognormal_lengths_validate_and_clip() -> None:
    with pytest.raises(ValueError):
        LogNormalLengths(median=10, mean=5)
    tight = LogNormalLengths(median=100, mean=400, minimum=50, maximum=60)
    rng = random.Random(0)
    assert {tight.sample(rng) for _ in range(200)} <= set(range(50, 61))
