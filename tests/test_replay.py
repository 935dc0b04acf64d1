"""The replay harness: the shipped runtime against the endpoint models in virtual time —
deterministic for a seed, every request accounted for, a server that queues under load, a
calibration that reproduces the measured TTFTs at light load, sweeps on a process pool, and
flat memory over a long stream."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import tracemalloc

import pytest

from pydisco.linkemu import REALISTIC_LAST_HOP
from pydisco.replay import DeviceModel, LastHop, Outages, ReplayConfig, RequestRow, ServerModel, replay
from pydisco.replay._sweep import WorkloadSpec, run_one, sweep
from pydisco.workloads import (
    ConstantLengths,
    CyclicBurstArrivals,
    PoissonArrivals,
    TraceRequest,
    UniformLengths,
    iter_synthetic,
    load_server_ttft,
)

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
SERVER_TTFT = DATA / "server_ttft"
AZURE = DATA / "traces" / "AzureLLMInferenceTrace_conv.csv"

DEVICE = DeviceModel(prefill_a_s=0.02, prefill_c_s_per_token=0.001, decode_s_per_token=0.008, context_tokens=2048)


def small(n: int = 30, seed: int = 1, rate: float = 2.0, prompt: object = None, output: object = None) -> list[TraceRequest]:
    return list(iter_synthetic(n, seed=seed, arrivals=PoissonArrivals(rate),
                               prompt_len_dist=prompt or UniformLengths(20, 600),  # type: ignore[arg-type]
                               output_len_dist=output or UniformLengths(2, 12)))  # type: ignore[arg-type]


def config(**kw: object) -> ReplayConfig:
    base: dict[str, object] = dict(dispatch="race-both", device=DEVICE, server=ServerModel.assumed(), seed=3)
    base.update(kw)
    return ReplayConfig(**base)  # type: ignore[arg-type]


def rows_of(requests: list[TraceRequest], cfg: ReplayConfig) -> tuple[list[RequestRow], dict[str, object]]:
    rows: list[RequestRow] = []
    summary = replay(requests, cfg, on_row=rows.append)
    rows.sort(key=lambda r: r.index)
    return rows, summary.to_json()


def test_a_replay_is_deterministic_for_a_seed() -> None:
    link = LastHop(REALISTIC_LAST_HOP, REALISTIC_LAST_HOP, Outages(per_hour=120, mean_s=2.0, seed=5))
    cfg = config(link=link, dispatch="disco-d", budget=0.5)
    a, sa = rows_of(small(), cfg)
    b, sb = rows_of(small(), cfg)
    assert a == b
    assert {k: v for k, v in sa.items() if k != "wall_s"} == {k: v for k, v in sb.items() if k != "wall_s"}
    c, _ = rows_of(small(), dataclasses.replace(cfg, seed=4))
    assert [r.ttft_s for r in c] != [r.ttft_s for r in a]  # the seed reaches the models' draws


def test_every_request_is_accounted_for_and_none_is_dropped() -> None:
    requests = small(12) + [
        TraceRequest(arrival_s=30.0, prompt_tokens=5000, output_tokens=4),  # longer than the device's context
        TraceRequest(arrival_s=31.0, prompt_tokens=10, output_tokens=0),  # nothing to answer
    ]
    rows, summary = rows_of(requests, config(dispatch="device-only"))
    assert [r.index for r in rows] == list(range(len(requests)))
    assert sum(summary["outcomes"].values()) == summary["requests"] == len(requests)  # type: ignore[attr-defined]
    long, empty = rows[-2], rows[-1]
    assert long.outcome == "completed" and long.device_refused and long.endpoints == "cloud"  # routed
    assert summary["routed_from_device"] == 1
    assert empty.outcome == "empty"
    for r in rows[:-1]:
        assert r.tokens == r.output_tokens  # each answer whole
    # Without a cloud to route to, the same request is counted as refused, with the reason.
    rows, summary = rows_of(requests, config(dispatch="device-only", server=None))
    assert rows[-2].outcome == "refused" and "context" in rows[-2].error
    assert summary["outcomes"]["refused"] == 1  # type: ignore[index]


def test_outages_fail_over_to_the_device() -> None:
    link = LastHop(outages=Outages(per_hour=600, mean_s=3.0, seed=2))
    rows, summary = rows_of(small(40, output=ConstantLengths(40)), config(dispatch="cloud-only", link=link))
    assert summary["failovers"] > 0  # type: ignore[operator]
    assert sum(summary["outcomes"].values()) == 40  # type: ignore[attr-defined]
    assert any("device" in r.endpoints for r in rows)


def test_the_server_queues_under_load_like_a_server() -> None:
    """The same requests, arriving faster than a small server serves them: TTFT grows (they
    queue), not just sampled independently. (No device: it would take answers over.)"""
    server = ServerModel.assumed(max_batch=4)
    work = dict(prompt=ConstantLengths(200), output=ConstantLengths(30))
    light = rows_of(small(40, rate=0.5, **work), config(dispatch="cloud-only", server=server, device=None))[1]  # type: ignore[arg-type]
    heavy = rows_of(small(40, rate=20.0, **work), config(dispatch="cloud-only", server=server, device=None))[1]  # type: ignore[arg-type]
    assert heavy["ttft_s"]["mean"] > 2 * light["ttft_s"]["mean"]  # type: ignore[index]


@pytest.mark.shared_data
@pytest.mark.skipif(not SERVER_TTFT.exists(), reason=f"{SERVER_TTFT} is not here; the public data lives outside the repo")
def test_at_light_load_the_server_reproduces_its_measured_ttfts() -> None:
    samples = load_server_ttft(SERVER_TTFT / "groq_70b.json")
    server = ServerModel.from_samples(samples)
    requests = small(150, rate=0.5, prompt=ConstantLengths(550), output=ConstantLengths(3))
    rows, _ = rows_of(requests, config(dispatch="cloud-only", server=server, device=None))
    simulated = [r.ttft_s for r in rows]
    measured = samples.ttft_s
    for q in (0.25, 0.5, 0.75):
        sim = statistics.quantiles(simulated, n=100)[round(q * 100) - 1]
        real = statistics.quantiles(measured, n=100)[round(q * 100) - 1]
        assert sim == pytest.approx(real, rel=0.15)


def test_a_sweep_on_the_default_process_pool_matches_serial_runs() -> None:
    workload = WorkloadSpec(synthetic=15, seed=2, output_lengths=ConstantLengths(5), prompt_lengths=UniformLengths(10, 400))
    configs = [config(dispatch=d, budget=b) for d in ("disco-d", "disco-s") for b in (0.2, 0.8)]
    pooled = sweep(workload, configs)
    with concurrent.futures.ThreadPoolExecutor(1) as one:  # any Executor will do
        serial = sweep(workload, configs, executor=one)
    strip = lambda s: {k: v for k, v in s.items() if k != "wall_s"}  # noqa: E731
    assert [strip(s) for s in pooled] == [strip(s) for s in serial] == [strip(run_one(workload, c)) for c in configs]
    assert [s["config"]["dispatch"] for s in pooled] == ["disco-d", "disco-d", "disco-s", "disco-s"]  # type: ignore[index]


def test_memory_stays_flat_over_a_long_stream() -> None:
    """The workload is a generator and the summary keeps histograms: once the runtime's windows
    of recent answers are full (1000 answers), memory does not grow with the requests."""
    full, n = 1100, 2200
    stream = iter_synthetic(n, seed=1, arrivals=PoissonArrivals(50.0), prompt_len_dist=ConstantLengths(10),
                            output_len_dist=ConstantLengths(2))
    marks: dict[int, int] = {}

    def progress(done: int, _: float) -> None:
        if done in (full, n):
            gc.collect()  # finished answers' reference cycles are garbage, not memory held
            marks[done] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        replay(stream, config(dispatch="cloud-only", pace=False), progress=progress)
    finally:
        tracemalloc.stop()
    first, last = marks[full] - base, marks[n] - base
    assert last < 1.1 * first  # twice the requests, not twice the memory


def test_cyclic_bursts_with_andes_and_fcfs_both_account_for_everything() -> None:
    bursts = CyclicBurstArrivals(base_rate_per_s=0.5, burst_rate_per_s=15.0, period_s=20.0, burst_s=3.0)
    requests = list(iter_synthetic(40, seed=6, arrivals=bursts, prompt_len_dist=ConstantLengths(100),
                                   output_len_dist=ConstantLengths(20)))
    for scheduler in ("fcfs", "andes"):
        server = ServerModel.assumed(max_batch=4, scheduler=scheduler)
        _, summary = rows_of(requests, config(dispatch="cloud-only", server=server))
        assert summary["outcomes"]["completed"] == 40  # type: ignore[index]


# ----- the command ---------------------------------------------------------------------------------


def _azure(tmp_path: pathlib.Path, n: int) -> pathlib.Path:
    path = tmp_path / "trace.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:{15 + i // 60:02d}:{i % 60:02d}.5000000,{50 + 37 * i % 900},{3 + i % 7}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pydisco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydisco.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_replays_a_trace_to_json_and_a_csv_table(tmp_path: pathlib.Path) -> None:
    trace = _azure(tmp_path, 25)
    out = tmp_path / "rows.csv"
    done = _pydisco("replay", str(trace), "--dispatch", "disco-d", "--budget", "0.3", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == 25 and sum(summary["outcomes"].values()) == 25
    for key in ("ttft_s", "tbt_s", "qoe", "cost", "budget"):
        assert key in summary
    assert summary["budget"]["on"] == "device" and summary["budget"]["share_asked"] == 0.3
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 25 and set(RequestRow.columns()) == set(table[0])
    assert done.stderr == ""  # no progress bar when stderr is not a terminal


def test_cli_sweep_prints_one_summary_per_run(tmp_path: pathlib.Path) -> None:
    trace = _azure(tmp_path, 8)
    done = _pydisco("replay", str(trace), "--dispatch", "cloud-only,race-both", "--seed", "1,2", "--json", "--workers", "2")
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert [(r["config"]["dispatch"], r["config"]["seed"]) for r in runs] == [
        ("cloud-only", 1), ("cloud-only", 2), ("race-both", 1), ("race-both", 2)]


@pytest.mark.parametrize("args, words", [
    (["--budget", "2"], "budget is a share"),
    (["--format", "nope"], "invalid choice"),
    (["--no-device", "--no-cloud"], "nothing to replay"),
    (["--out", "x.parquet"], "pyarrow"),
])
def test_cli_bad_options_get_one_line_and_status_2(args: list[str], words: str) -> None:
    if "x.parquet" in args:
        pytest.importorskip("pytest")
        try:
            import pyarrow  # noqa: F401
            pytest.skip("pyarrow is installed: Parquet works")
        except ImportError:
            pass
    done = _pydisco("replay", "--synthetic", "2", *args)
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2  # argparse's usage line, then the error
