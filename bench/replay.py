"""Benchmark of the replay harness: its speed, its memory, and the four papers' headline
comparisons computed by replaying through the shipped runtime in virtual time.

    python bench/replay.py              # a table
    python bench/replay.py --json       # the figures as JSON
    python bench/replay.py --full       # also the whole Azure hour and the 1,000,000-request stream (long)

Workloads: the first ``--azure-requests`` requests of the Azure conversation trace
(``../shared/data``; the DiSCo figures are skipped without it), server calibrated from the
llmperf records of ``--server`` (``../shared/data/server_ttft``), the device from SmolLM2's
cached profile (``pydisco profile``). Every ``paper_*`` figure is the paper's own, printed
beside ours for comparison; it is never measured here.

* azure: wall seconds to replay the slice (``azure_slice_*``); the whole hour
  (``azure_hour_wall_s``) only with ``--full``, else ``null`` next to a linear extrapolation
  (``azure_hour_wall_s_extrapolated``, labelled as such).
* memory: peak RSS of a streamed synthetic workload (``stream_peak_rss_mb`` for
  ``--stream-requests``; ``million_peak_rss_mb`` only with ``--full``).
* DiSCo: disco-d (device budget) against cloud-only at the same budget: cut of mean and p99
  TTFT; cost of disco-d with migration against the same without (``--migration never``).
* P/D-Device: pd-device against cloud-only on long prompts: TTFT cut, max TBT seen by the
  reader, cloud tokens per answer.
* Andes: andes against fcfs as the server's step scheduler, cyclic bursts, cloud only.
* SLICE: slice against fcfs on a mix of real-time (20 tok/s, 30 %) and chat tasks, on a small
  server: share of requests with TTFT on target and QoE >= 0.95, slice / fcfs.
* sim_vs_real_*: not measured yet (``null``): it needs the real model and a real loopback
  server on the same slice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import math
import os
import pathlib
import random
import resource
import time
from typing import Any

from _stats import emit  # the script's own folder is on sys.path

from pydisco.policies._base import Slo
from pydisco.replay import DeviceModel, ReplayConfig, ServerModel, replay
from pydisco.workloads import (
    ConstantLengths,
    CyclicBurstArrivals,
    PoissonArrivals,
    UniformLengths,
    iter_azure_trace,
    iter_synthetic,
    load_server_ttft,
)

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "traces" / "AzureLLMInferenceTrace_conv.csv"
AZURE_REQUESTS = 19366

PAPER = {
    "paper_disco_p99_ttft_cut": "11-52 %",
    "paper_disco_mean_ttft_cut": "6-78 %",
    "paper_disco_cost_cut": "up to 84 %",
    "paper_pd_ttft_cut": "60 %",
    "paper_pd_max_tpot_ms": "tens of ms",
    "paper_andes_avg_qoe": "0.88 -> 0.99",
    "paper_andes_qoe95_share": "75 % -> 97 %",
    "paper_slice_attainment_ratio": "up to 35x",
}


def _server(name: str, **kw: Any) -> ServerModel:
    path = DATA / "server_ttft" / f"{name}.json"
    return ServerModel.from_samples(load_server_ttft(path), **kw) if path.exists() else ServerModel.assumed(**kw)


def _azure(n: int) -> Any:
    return itertools.islice(iter_azure_trace(AZURE), n)


def _mixed_slo(prompt: int, rng: random.Random) -> Slo:
    if rng.random() < 0.3:
        return Slo(ttft_target_s=0.5, reading_rate=20.0, realtime=True)
    return Slo(ttft_target_s=1.0, reading_rate=4.5)


# Each job is a top-level function of plain arguments, so a process pool can run it.


def job_azure(n: int, dispatch: str, migration: str, server: str) -> dict[str, Any]:
    cfg = ReplayConfig(dispatch=dispatch, migration=migration, budget=0.3, device=DeviceModel.smollm2(), server=_server(server))
    return replay(_azure(n), cfg).to_json()


def job_pd(n: int, dispatch: str, server: str) -> dict[str, Any]:
    rows: list[Any] = []
    work = iter_synthetic(n, seed=2, arrivals=PoissonArrivals(0.5), prompt_len_dist=UniformLengths(1200, 1800),
                          output_len_dist=ConstantLengths(64), slo=None)
    cfg = ReplayConfig(dispatch=dispatch, device=DeviceModel.smollm2(), server=_server(server), device_standby=False)
    s = replay(work, cfg, on_row=rows.append).to_json()
    s["cloud_tokens_per_answer"] = sum(r.cloud_tokens for r in rows) / max(1, len(rows))
    s["max_tbt_s"] = max((r.tbt_max_s for r in rows if not math.isnan(r.tbt_max_s)), default=None)
    return s


def job_scheduler(n: int, scheduler: str, mixed: bool, server: str) -> dict[str, Any]:
    rows: list[Any] = []
    if mixed:
        work = iter_synthetic(n, seed=4, arrivals=PoissonArrivals(3.0), prompt_len_dist=UniformLengths(50, 400),
                              output_len_dist=UniformLengths(20, 120), slo=_mixed_slo)
    else:
        bursts = CyclicBurstArrivals(base_rate_per_s=1.0, burst_rate_per_s=12.0, period_s=30.0, burst_s=5.0)
        work = iter_synthetic(n, seed=3, arrivals=bursts, prompt_len_dist=UniformLengths(100, 800),
                              output_len_dist=UniformLengths(30, 200))
    cfg = ReplayConfig(dispatch="cloud-only", server=_server(server, max_batch=8, scheduler=scheduler))
    s = replay(work, cfg, on_row=rows.append).to_json()
    ok = sum(1 for r in rows if r.outcome == "completed" and r.ttft_s <= r.ttft_target_s and r.qoe >= 0.95)
    s["slo_attainment"] = ok / max(1, len(rows))
    return s


def job_stream(n: int) -> dict[str, Any]:
    work = iter_synthetic(n, seed=1, arrivals=PoissonArrivals(50.0), prompt_len_dist=ConstantLengths(10),
                          output_len_dist=ConstantLengths(2), slo=None)
    started = time.perf_counter()
    replay(work, ReplayConfig(dispatch="cloud-only", server=ServerModel.assumed(), pace=False))
    return {"wall_s": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cut(base: float | None, ours: float | None) -> float | None:
    if base is None or ours is None or not base:
        return None
    return (base - ours) / base


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    f: dict[str, Any] = dict(PAPER)
    f.update(sim_vs_real_ttft_p50_err=None, sim_vs_real_ttft_p99_err=None, sim_vs_real_qoe_err=None,
             sim_vs_real_note="not measured: needs the real model and loopback server on the same slice")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
        jobs: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        if AZURE.exists():
            n = args.azure_requests
            for d, m in (("cloud-only", "never"), ("disco-d", "disco-migrate"), ("disco-d", "never")):
                jobs[f"azure {d} {m}"] = pool.submit(job_azure, n, d, m, args.server)
        jobs["pd cloud-only"] = pool.submit(job_pd, args.pd_requests, "cloud-only", args.server)
        jobs["pd pd-device"] = pool.submit(job_pd, args.pd_requests, "pd-device", args.server)
        for sched in ("fcfs", "andes"):
            jobs[f"bursts {sched}"] = pool.submit(job_scheduler, args.scheduler_requests, sched, False, args.server)
        for sched in ("fcfs", "slice"):
            jobs[f"mixed {sched}"] = pool.submit(job_scheduler, args.scheduler_requests, sched, True, args.server)
        jobs["stream"] = pool.submit(job_stream, args.stream_requests)
        if args.full:
            jobs["million"] = pool.submit(job_stream, 1_000_000)
            if AZURE.exists():
                jobs["azure hour"] = pool.submit(job_azure, AZURE_REQUESTS, "disco-d", "disco-migrate", args.server)
        r = {k: v.result() for k, v in jobs.items()}
    rows: list[tuple[str, str]] = []
    if AZURE.exists():
        base, disco, never = r["azure cloud-only never"], r["azure disco-d disco-migrate"], r["azure disco-d never"]
        f["azure_slice_requests"] = args.azure_requests
        f["azure_slice_wall_s"] = disco["wall_s"]
        f["azure_slice_virtual_s"] = disco["virtual_s"]
        f["azure_hour_wall_s"] = r["azure hour"]["wall_s"] if "azure hour" in r else None
        f["azure_hour_wall_s_extrapolated"] = disco["wall_s"] * AZURE_REQUESTS / args.azure_requests
        f["disco_mean_ttft_cut"] = _cut(base["ttft_s"]["mean"], disco["ttft_s"]["mean"])
        f["disco_p99_ttft_cut"] = _cut(base["ttft_s"]["p99"], disco["ttft_s"]["p99"])
        f["disco_cost_cut"] = _cut(never["cost"], disco["cost"])
        f["disco_device_share_used"] = disco["budget"]["share_used"]
        rows += [
            ("azure slice", f"{args.azure_requests} requests ({disco['virtual_s']:.0f} s of traffic) in {disco['wall_s']:.1f} s wall"),
            ("azure hour (extrapolated)", f"{f['azure_hour_wall_s_extrapolated']:.0f} s wall"),
            ("TTFT mean cloud-only / disco-d", f"{base['ttft_s']['mean'] * 1e3:.0f} / {disco['ttft_s']['mean'] * 1e3:.0f} ms (paper cut {PAPER['paper_disco_mean_ttft_cut']})"),
            ("TTFT p99 cloud-only / disco-d", f"{base['ttft_s']['p99'] * 1e3:.0f} / {disco['ttft_s']['p99'] * 1e3:.0f} ms (paper cut {PAPER['paper_disco_p99_ttft_cut']})"),
            ("cost disco-d no migration / migration", f"{never['cost']:.0f} / {disco['cost']:.0f} (paper cut {PAPER['paper_disco_cost_cut']})"),
        ]
    else:
        rows.append(("azure", f"skipped: {AZURE} is not here"))
    pd_base, pd = r["pd cloud-only"], r["pd pd-device"]
    f["pd_ttft_cut"] = _cut(pd_base["ttft_s"]["mean"], pd["ttft_s"]["mean"])
    f["pd_max_tpot_ms"] = pd["max_tbt_s"] * 1e3 if pd["max_tbt_s"] is not None else None
    f["pd_cloud_tokens_per_answer"] = pd["cloud_tokens_per_answer"]
    f["pd_cloud_only_tokens_per_answer"] = pd_base["cloud_tokens_per_answer"]
    fcfs, andes = r["bursts fcfs"], r["bursts andes"]
    f["andes_avg_qoe"] = andes["qoe"]["mean"]
    f["andes_qoe95_share"] = andes["qoe"]["share_at_least_0.95"]
    f["fcfs_avg_qoe"] = fcfs["qoe"]["mean"]
    f["fcfs_qoe95_share"] = fcfs["qoe"]["share_at_least_0.95"]
    mf, ms = r["mixed fcfs"]["slo_attainment"], r["mixed slice"]["slo_attainment"]
    f["slice_attainment"], f["fcfs_attainment"] = ms, mf
    f["slice_attainment_ratio"] = ms / mf if mf else None
    f["stream_requests"] = args.stream_requests
    f["stream_peak_rss_mb"] = r["stream"]["peak_rss_mb"]
    f["million_peak_rss_mb"] = r["million"]["peak_rss_mb"] if "million" in r else None
    rows += [
        ("P/D TTFT mean cloud-only / pd-device", f"{pd_base['ttft_s']['mean'] * 1e3:.0f} / {pd['ttft_s']['mean'] * 1e3:.0f} ms (paper cut {PAPER['paper_pd_ttft_cut']})"),
        ("P/D max TBT; cloud tokens per answer", f"{f['pd_max_tpot_ms']:.0f} ms; {pd['cloud_tokens_per_answer']:.0f} vs {pd_base['cloud_tokens_per_answer']:.0f}"),
        ("QoE mean fcfs / andes", f"{fcfs['qoe']['mean']:.3f} / {andes['qoe']['mean']:.3f} (paper {PAPER['paper_andes_avg_qoe']})"),
        ("QoE>=0.95 share fcfs / andes", f"{fcfs['qoe']['share_at_least_0.95']:.2f} / {andes['qoe']['share_at_least_0.95']:.2f} (paper {PAPER['paper_andes_qoe95_share']})"),
        ("SLO attainment fcfs / slice", f"{mf:.2f} / {ms:.2f} (paper {PAPER['paper_slice_attainment_ratio']})"),
        ("stream peak RSS", f"{f['stream_peak_rss_mb']:.0f} MB for {args.stream_requests} requests"),
    ]
    return f, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--full", action="store_true", help="also the whole Azure hour and a 1,000,000-request stream")
    parser.add_argument("--azure-requests", type=int, default=200)
    parser.add_argument("--pd-requests", type=int, default=20)
    parser.add_argument("--scheduler-requests", type=int, default=120)
    parser.add_argument("--stream-requests", type=int, default=5000)
    parser.add_argument("--server", default="groq_70b")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    figures, rows = bench(args)
    emit(rows, figures, args.json)


if __name__ == "__main__":
    main()


