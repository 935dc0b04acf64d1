"""Workload loaders on the real public files and on small malformed ones; the synthetic default."""

from __future__ import annotations

import csv
import itertools
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


# ----- streaming loaders for the other formats --------------------------------------------------

from pydisco import workloads  # noqa: E402
from pydisco.workloads import (  # noqa: E402
    ConstantLengths,
    CyclicBurstArrivals,
    EmpiricalLengths,
    GammaArrivals,
    PoissonArrivals,
    UniformLengths,
    detect_format,
    iter_andes_qoe_trace,
    iter_azure_trace,
    iter_burstgpt_trace,
    iter_mooncake_trace,
    iter_synthetic,
    iter_trace,
    length_distribution,
)


def test_azure_2024_timestamps_with_a_zone(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                  "2024-05-10 00:00:00.009930+00:00,5,6\n"
                  "2024-05-10 02:00:01.509930+02:00,7,8\n"  # 00:00:01.50993 UTC
                  "2024-05-10 00:00:02Z,9,10\n")
    requests = list(iter_azure_trace(path))
    assert [r.prompt_tokens for r in requests] == [5, 7, 9]
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 1.5, 1.99007], abs=1e-9)


def test_loaders_stream_a_request_before_reading_the_rest(tmp_path: pathlib.Path) -> None:
    """A generator yields early requests before it reaches a bad line far below."""
    path = _write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:{15 + i // 60:02d}:{i % 60:02d}.0,{i},1\n" for i in range(50)) + "oops,1,1\n")
    stream = iter_azure_trace(path, reorder_window=4)
    assert next(stream).prompt_tokens == 0
    with pytest.raises(WorkloadFormatError, match=":52"):
        list(stream)


def test_azure_refuses_a_row_older_than_the_window(tmp_path: pathlib.Path) -> None:
    body = "".join(f"2023-11-16 18:16:{i:02d}.0,{i},1\n" for i in range(10)) + "2023-11-16 18:15:00.0,1,1\n"
    path = _write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + body)
    with pytest.raises(WorkloadFormatError, match="older than rows 3 before"):
        list(iter_azure_trace(path, reorder_window=3))
    assert len(list(iter_azure_trace(path, reorder_window=20))) == 11  # a deep window sorts it


BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def test_burstgpt_rows(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "b.csv", BURSTGPT_HEADER +
                  "5,ChatGPT,472,18,490,Conversation log\n"
                  "45,ChatGPT,1087,0,1087,API log\n"
                  "118.5,GPT-4,417,276,693,Conversation log\n")
    requests = list(iter_burstgpt_trace(path))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests] == [
        (0.0, 472, 18), (40.0, 1087, 0), (113.5, 417, 276)]
    conversation = list(iter_burstgpt_trace(path, log_type="Conversation log"))
    assert [r.prompt_tokens for r in conversation] == [472, 417]
    assert detect_format(path) == "burstgpt"


@pytest.mark.parametrize("row, words", [
    ("x,ChatGPT,1,1,2,API log", "Timestamp is not a number"),
    ("1,ChatGPT,-1,1,2,API log", "Request tokens is negative"),
    ("1,ChatGPT,1,1,2", "expected 6 fields"),
])
def test_burstgpt_errors(tmp_path: pathlib.Path, row: str, words: str) -> None:
    path = _write(tmp_path, "b.csv", BURSTGPT_HEADER + "0,ChatGPT,1,1,2,API log\n" + row + "\n")
    with pytest.raises(WorkloadFormatError, match=words) as info:
        list(iter_burstgpt_trace(path))
    assert info.value.line == 3


def test_burstgpt_refuses_unsorted_rows(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "b.csv", BURSTGPT_HEADER + "9,M,1,1,2,API log\n3,M,1,1,2,API log\n")
    with pytest.raises(WorkloadFormatError, match="earlier"):
        list(iter_burstgpt_trace(path))


def test_mooncake_lines(tmp_path: pathlib.Path) -> None:
    lines = [{"timestamp": 1000, "input_length": 6955, "output_length": 52, "hash_ids": [1, 2]},
             {"timestamp": 1500, "input_length": 10, "output_length": 3, "hash_ids": []}]
    path = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    requests = list(iter_mooncake_trace(path))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests] == [(0.0, 6955, 52), (0.5, 10, 3)]
    assert detect_format(path) == "mooncake"


@pytest.mark.parametrize("line, words", [
    ('{"timestamp": 1, "input_length": 2}', "'output_length'"),
    ('{"timestamp": 1, "input_length": 2.5, "output_length": 1}', "integer"),
    ('[1]', "expected an object"),
    ('{"timestamp": 1,', "invalid JSON"),
])
def test_mooncake_errors(tmp_path: pathlib.Path, line: str, words: str) -> None:
    path = _write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n' + line + "\n")
    with pytest.raises(WorkloadFormatError, match=words) as info:
        list(iter_mooncake_trace(path))
    assert info.value.line == 2


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_andes_json_streams_across_any_chunk_boundary(tmp_path: pathlib.Path, chunk: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"prompt": f"p {i} " * (i + 1), "output_len": 10 * i + 1, "ttft": 1, "max_ttft": 10,
                "latency": 0.2 + i / 100} for i in range(12)]
    path = _write(tmp_path, "a.json", json.dumps(records, indent=4))
    monkeypatch.setattr(workloads, "_JSON_CHUNK", chunk)
    got = list(iter_andes_qoe_trace(path))
    assert [r.output_tokens for r in got] == [r["output_len"] for r in records]
    assert [r.prompt_text for r in got] == [r["prompt"] for r in records]


def test_andes_json_errors_while_streaming(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workloads, "_JSON_CHUNK", 5)
    good = '{"prompt": "x", "output_len": 3, "ttft": 1, "max_ttft": 10, "latency": 0.2}'
    path = _write(tmp_path, "a.json", f"[\n{good},\n{good}\n{good}]")
    stream = iter_andes_qoe_trace(path)
    assert next(stream).output_tokens == 3
    with pytest.raises(WorkloadFormatError, match="delimiter") as info:
        list(stream)
    assert info.value.line == 4
    path = _write(tmp_path, "b.json", f"[{good}] extra")
    with pytest.raises(WorkloadFormatError, match="Extra data"):
        list(iter_andes_qoe_trace(path))


def test_detect_format_and_iter_trace(tmp_path: pathlib.Path) -> None:
    azure = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,4\n")
    andes = _write(tmp_path, "q.json", json.dumps([{"prompt": "a b", "output_len": 3, "ttft": 1, "max_ttft": 10, "latency": 0.25}]))
    assert detect_format(azure) == "azure" and detect_format(andes) == "andes"
    assert [r.output_tokens for r in iter_trace(azure)] == [4]
    assert [r.output_tokens for r in iter_trace(andes, andes_rate_per_s=1.0)] == [3]
    llmperf = _write(tmp_path, "s.json", json.dumps([{"ttft_s": 0.2, "inter_token_latency_s": 0.01, "error_code": None}]))
    with pytest.raises(WorkloadFormatError, match="not a trace"):
        detect_format(llmperf)
    other = _write(tmp_path, "o.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(WorkloadFormatError, match="not a known trace format"):
        detect_format(other)


@pytest.mark.shared_data
@needs(AZURE)
def test_real_azure_trace_is_recognised_and_streams_like_the_list() -> None:
    assert detect_format(AZURE) == "azure"
    assert list(iter_trace(AZURE)) == load_azure_trace(AZURE)


@pytest.mark.shared_data
@needs(ANDES)
def test_real_andes_trace_streams_like_the_whole_file() -> None:
    assert detect_format(ANDES) == "andes"
    records = json.loads(ANDES.read_text())
    streamed = list(iter_trace(ANDES))
    assert len(streamed) == len(records) == 3000
    assert [r.prompt_text for r in streamed] == [r["prompt"] for r in records]


# ----- synthetic generators -----------------------------------------------------------------------


def test_gamma_arrivals_have_their_rate_and_cv() -> None:
    rng = random.Random(3)
    for cv in (0.5, 1.0, 3.0):
        process = GammaArrivals(rate_per_s=4.0, cv=cv)
        t, gaps = 0.0, []
        for _ in range(40000):
            nxt = process.next_arrival(t, rng)
            gaps.append(nxt - t)
            t = nxt
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(0.25, rel=0.05)
        assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.08)


def test_cyclic_bursts_crowd_arrivals_into_the_bursts() -> None:
    process = CyclicBurstArrivals(base_rate_per_s=1.0, burst_rate_per_s=20.0, period_s=10.0, burst_s=2.0)
    requests = list(iter_synthetic(20000, seed=4, arrivals=process, slo=None))
    in_burst = sum(1 for r in requests if r.arrival_s % 10.0 < 2.0)
    expected = 20.0 * 2.0 / (20.0 * 2.0 + 1.0 * 8.0)  # share of arrivals that fall in bursts
    assert in_burst / len(requests) == pytest.approx(expected, abs=0.02)
    rate = len(requests) / requests[-1].arrival_s
    assert rate == pytest.approx(process.mean_rate_per_s, rel=0.05)


def test_iter_synthetic_is_seeded_and_endless_when_asked() -> None:
    a = list(itertools.islice(iter_synthetic(None, seed=9), 50))
    assert a == list(iter_synthetic(50, seed=9))
    assert a != list(iter_synthetic(50, seed=10))
    assert list(iter_synthetic(5, seed=1)) == synthetic_workload(5, seed=1)
    poisson = list(iter_synthetic(5, seed=1, arrivals=PoissonArrivals(workloads.AZURE_CONV_RATE_PER_S)))
    assert poisson == synthetic_workload(5, seed=1)


def test_length_distributions_by_name(tmp_path: pathlib.Path) -> None:
    assert length_distribution("azure-conv-prompt") is AZURE_CONV_PROMPT_TOKENS
    assert length_distribution("constant:7") == ConstantLengths(7)
    assert length_distribution("uniform:2:9") == UniformLengths(2, 9)
    assert length_distribution("lognormal:100:150") == LogNormalLengths(100, 150)
    trace = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:15:46.1,3,4\n2023-11-16 18:15:47.1,5,6\n")
    assert length_distribution(f"empirical:{trace}:output") == EmpiricalLengths((4, 6))
    rng = random.Random(0)
    assert {UniformLengths(2, 4).sample(rng) for _ in range(100)} == {2, 3, 4}
    for bad in ("nope", "constant:x", "uniform:5", "lognormal:10:5", f"empirical:{trace}:both"):
        with pytest.raises(ValueError, match="expected"):
            length_distribution(bad)
