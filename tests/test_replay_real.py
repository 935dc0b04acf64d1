"""Simulated against real (pydisco.replay._real): the same slice through the real runtime, device
model and loopback server in real time gives the same rows as the replay in virtual time on the
models calibrated from this machine; the server calibration reproduces what it was measured
from; the serial device queues as the real single-engine device does."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import subprocess
import sys

import pytest

from pydisco.replay import DeviceModel, ReplayConfig, ServerModel, replay
from pydisco.replay._real import (
    RealSetup,
    agreement,
    calibrate_server,
    clip_slice,
    counting_prompt,
    sim_vs_real,
)
from pydisco.workloads import ServerTtftSamples, TraceRequest

DEVICE = DeviceModel(prefill_a_s=0.02, prefill_c_s_per_token=0.001, decode_s_per_token=0.01)


def light_load(n: int, prompt: int, answer: int, gap_s: float = 5.0) -> list[TraceRequest]:
    return [TraceRequest(arrival_s=i * gap_s, prompt_tokens=prompt, output_tokens=answer) for i in range(n)]


def test_the_server_calibrated_from_samples_reproduces_their_medians() -> None:
    ttfts = (0.21, 0.25, 0.26, 0.3, 0.34, 0.45)
    itls = (0.018, 0.02, 0.021, 0.022, 0.03, 0.019)
    samples = ServerTtftSamples(ttft_s=ttfts, inter_token_latency_s=itls, skipped_errors=0, sources=())
    server = calibrate_server(samples, prompt_tokens=100, prefill_s_per_token=0.001)
    # Light load (one request at a time), the calibration's prompt: what was measured comes back.
    config = ReplayConfig(dispatch="cloud-only", server=server, device=None, pace=False, seed=3)
    rows: list = []
    summary = replay(light_load(60, prompt=100, answer=10), config, on_row=rows.append)
    assert summary.outcomes["completed"] == 60
    assert statistics.median(r.ttft_s for r in rows) == pytest.approx(statistics.median(ttfts), rel=0.1)
    assert summary.tbt.quantile(0.5) == pytest.approx(statistics.median(itls), rel=0.05)
    # One engine: of two requests at once, one waits for the other's answer (the loopback
    # server has parallel=1).
    steady = ServerTtftSamples(ttft_s=(0.3,), inter_token_latency_s=(0.02,), skipped_errors=0, sources=())
    one_engine = ReplayConfig(dispatch="cloud-only", server=calibrate_server(steady, prompt_tokens=100, prefill_s_per_token=0.001),
                              device=None, pace=False)  # fmt: skip
    together = replay(light_load(2, prompt=100, answer=10, gap_s=0.0), one_engine)
    assert together.ttft.minimum == pytest.approx(0.3)
    assert together.ttft.maximum > 0.3 + 9 * 0.02  # it waited for the first answer (parallel: 0.3 too)
    # A device profile slower than the server's fastest TTFT allows is capped to it: the
    # calibration's TTFTs still come back.
    capped = calibrate_server(steady, prompt_tokens=100, prefill_s_per_token=0.01)
    assert capped.step.prefill_s_per_token == pytest.approx(0.003)
    alone = replay(light_load(3, prompt=100, answer=10), dataclasses.replace(one_engine, server=capped))
    assert alone.ttft.quantile(0.5) == pytest.approx(0.3, rel=0.01)


def test_the_serial_device_makes_requests_take_turns() -> None:
    work = light_load(3, prompt=100, answer=20, gap_s=0.0)
    fleet = replay(work, ReplayConfig(dispatch="device-only", device=DEVICE, pace=False))
    serial = replay(work, ReplayConfig(dispatch="device-only", device=DEVICE, device_mode="serial", pace=False))
    one_answer = DEVICE.prefill_s(100) + 19 * DEVICE.decode_s_per_token
    assert fleet.ttft.maximum == pytest.approx(DEVICE.prefill_s(100), rel=0.05)  # each its own device
    assert serial.ttft.maximum == pytest.approx(2 * one_answer + DEVICE.prefill_s(100), rel=0.05)  # the third waits


def test_clip_slice_rebases_arrivals_and_clips_lengths() -> None:
    work = [TraceRequest(10.0, 5000, 900), TraceRequest(12.0, 3, 0), TraceRequest(13.0, 150, 20)]
    clipped = clip_slice(work, max_prompt=200, max_answer=64, arrival_scale=2.0)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in clipped] == [(0.0, 200, 64), (4.0, 8, 0), (6.0, 150, 20)]


def test_agreement_is_the_relative_error_of_each_figure() -> None:
    fast = replay(light_load(5, 50, 8), ReplayConfig(dispatch="device-only", device=DEVICE, pace=False))
    slow_device = DeviceModel(prefill_a_s=0.04, prefill_c_s_per_token=0.002, decode_s_per_token=0.02)
    slow = replay(light_load(5, 50, 8), ReplayConfig(dispatch="device-only", device=slow_device, pace=False))
    errors = agreement(fast, slow)
    assert set(errors) == {"ttft_p50_err", "ttft_p99_err", "tbt_p50_err", "qoe_err"}
    assert errors["ttft_p50_err"] == pytest.approx(0.5, rel=0.02)  # half the real TTFT
    assert errors["tbt_p50_err"] == pytest.approx(0.5, rel=0.02)
    assert agreement(fast, fast) == {k: 0.0 for k in errors}


def test_a_counting_prompt_has_about_the_tokens_asked() -> None:
    from device_support import shared_engine

    engine = shared_engine()
    for tokens in (8, 40, 200):
        n = len(engine.tokenize(counting_prompt(engine.tokenize, tokens, 123)))
        assert tokens - 8 <= n <= tokens


def test_the_real_run_and_its_simulation_answer_the_same_slice(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the fresh device profile is cached there
    work = clip_slice(light_load(5, prompt=60, answer=8, gap_s=1.5))
    config = ReplayConfig(dispatch="disco-d", budget=0.5, device=DEVICE, server=ServerModel.assumed(), pace=False, seed=1)
    setup = RealSetup(calibration_requests=3, calibration_prompt_tokens=60, calibration_answer_tokens=8)
    result = sim_vs_real(work, config, setup=setup)
    sim, real = result.sim, result.real
    assert sim.requests == real.requests == 5
    assert sim.outcomes == real.outcomes == {"completed": 5, "failed": 0, "refused": 0, "empty": 0}
    assert [r.index for r in result.sim_rows] == [r.index for r in result.real_rows] == list(range(5))
    assert [(r.prompt_tokens, r.output_tokens) for r in result.sim_rows] == [(r.prompt_tokens, r.output_tokens) for r in result.real_rows]
    assert all(1 <= r.tokens <= 8 for r in result.real_rows)  # the model counts on; it may stop early
    assert real.config["mode"] == "real" and sim.config["device"]["mode"] == "serial"  # type: ignore[index]
    errors = result.agreement
    assert set(errors) == {"ttft_p50_err", "ttft_p99_err", "tbt_p50_err", "qoe_err"}
    assert all(math.isfinite(v) and v >= 0 for v in errors.values())
    assert errors["ttft_p50_err"] < 3.0  # generous: the same order of magnitude on a noisy machine
    # The calibration's server, replayed unloaded at its calibration prompt, gives back the
    # measured TTFT median.
    cal = result.calibration
    unloaded = replay(light_load(30, prompt=60, answer=8),
                      ReplayConfig(dispatch="cloud-only", server=cal.server, device=None, pace=False))  # fmt: skip
    assert unloaded.ttft.quantile(0.5) == pytest.approx(statistics.median(cal.server_samples.ttft_s), rel=0.2)


def test_a_cloud_that_does_not_announce_admission_times_out_in_its_queue() -> None:
    # The real cloud client hears nothing until the first token: a request queued at the
    # one-engine server longer than the first-token deadline fails there (and fails over).
    slow = ServerTtftSamples(ttft_s=(0.3,), inter_token_latency_s=(0.1,), skipped_errors=0, sources=())
    server = calibrate_server(slow, prompt_tokens=50, prefill_s_per_token=0.001)
    work = light_load(3, prompt=50, answer=30, gap_s=0.0)
    common = dict(dispatch="cloud-only", server=server, device=None, pace=False, first_token_timeout_s=2.0)
    announced = replay(work, ReplayConfig(**common))  # type: ignore[arg-type]
    silent = replay(work, ReplayConfig(**common, cloud_announces_admission=False))  # type: ignore[arg-type]
    assert announced.outcomes["completed"] == 3
    assert silent.outcomes["completed"] == 1 and silent.requests == 3


def _pydisco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydisco.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_real_refuses_a_sweep_in_one_line() -> None:
    done = _pydisco("replay", "--synthetic", "3", "--real", "--dispatch", "cloud-only,race-both")
    assert done.returncode == 2
    assert "not a sweep" in done.stderr and "Traceback" not in done.stderr


def test_cli_real_prints_both_summaries_and_the_agreement() -> None:
    done = _pydisco("replay", "--synthetic", "3", "--real", "--no-pace", "--rate", "1", "--prompt-lengths", "constant:20",
                    "--output-lengths", "constant:4", "--dispatch", "race-both", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["sim"]["requests"] == out["real"]["requests"] == 3
    assert out["real"]["config"]["mode"] == "real"
    assert set(out["agreement"]) == {"ttft_p50_err", "ttft_p99_err", "tbt_p50_err", "qoe_err"}
