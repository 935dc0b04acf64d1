"""Benchmark of the replay harness: its speed, its memory, and the four papers' headline
comparisons computed by replaying through the shipped runtime in virtual time.

    python bench/replay.py              # a table
    python bench/replay.py --json       # the figures as JSON
    python bench/replay.py --full       # also the whole Azure hour and the 1,000,000-request stream (long)

Workloads: the first ``--azure-requests`` requests of the Azure conversation trace
(``../shared/data``; the slice's timing is skipped without it), server calibrated from the
llmperf records of ``--server`` (``../shared/data/server_ttft``), the device from SmolLM2's
cached profile (``pydisco profile``). Every ``paper_*`` figure is the paper's own, printed
beside ours for comparison; it is never measured here.

* azure: wall seconds to replay the slice (``azure_slice_*``); the whole hour
  (``azure_hour_wall_s``) only with ``--full``, else ``null`` next to a linear extrapolation
  (``azure_hour_wall_s_extrapolated``, labelled as such).
* memory: peak RSS of a streamed synthetic workload (``stream_peak_rss_mb`` for
  ``--stream-requests``; ``million_peak_rss_mb`` only with ``--full``).
* the four papers' headlines (``disco_*``, ``pd_*``, ``andes_*``, ``slice_*``): the tables of
  ``pydisco bench`` (``pydisco.papers``, docs/replay.md) at its ``--quick`` sizes
  (``--paper-requests`` per replay); each is null with a reason when its table cannot be computed.
* sim_vs_real_*: the first ``--sim-vs-real-requests`` requests of the Azure trace (synthetic of
  its shape without it), clipped to prompts <= 200 and answers <= 64 tokens, run for real (the
  SmolLM2 device, a loopback server behind the link emulator, in real time) and replayed in
  virtual time on the models calibrated from this machine just before
  (``pydisco.replay._real.sim_vs_real``): the relative error of the simulated TTFT p50 / p99, TBT
  p50 and mean QoE against the real ones. Runs alone, before the other jobs (it is real time:
  they would slow it). ``--no-real`` skips it (the keys are then null).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import pathlib
import resource
import statistics
import time
from typing import Any

from _stats import emit  # the script's own folder is on sys.path

from pydisco.papers import PAPER_FIGURES, BenchSetup, run_bench
from pydisco.papers._setup import QUICK
from pydisco.replay import DeviceModel, ReplayConfig, RequestRow, ServerModel, replay
from pydisco.workloads import ConstantLengths, PoissonArrivals, iter_azure_trace, iter_synthetic, load_server_ttft

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "traces" / "AzureLLMInferenceTrace_conv.csv"
AZURE_REQUESTS = 19366

PAPER = {f"paper_{key}": figure.text for key, figure in PAPER_FIGURES.items()}


def _server(name: str, **kw: Any) -> ServerModel:
    path = DATA / "server_ttft" / f"{name}.json"
    return ServerModel.from_samples(load_server_ttft(path), **kw) if path.exists() else ServerModel.assumed(**kw)


def _azure(n: int) -> Any:
    return itertools.islice(iter_azure_trace(AZURE), n)


# Each job is a top-level function of plain arguments, so a process pool can run it.


def job_azure(n: int, dispatch: str, migration: str, server: str) -> dict[str, Any]:
    cfg = ReplayConfig(dispatch=dispatch, migration=migration, budget=0.3, device=DeviceModel.smollm2(), server=_server(server))
    return replay(_azure(n), cfg).to_json()


def job_stream(n: int) -> dict[str, Any]:
    work = iter_synthetic(n, seed=1, arrivals=PoissonArrivals(50.0), prompt_len_dist=ConstantLengths(10),
                          output_len_dist=ConstantLengths(2), slo=None)
    started = time.perf_counter()
    replay(work, ReplayConfig(dispatch="cloud-only", server=ServerModel.assumed(), pace=False))
    return {"wall_s": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _median_ttft_by_first_endpoint(rows: tuple[RequestRow, ...]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row in rows:
        if row.endpoints and row.ttft_s == row.ttft_s:
            groups.setdefault(row.endpoints.split("+")[0], []).append(row.ttft_s)
    return {name: statistics.median(values) for name, values in sorted(groups.items())}


def sim_vs_real_figures(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The same slice for real and simulated (see the module's docstring)."""
    from pydisco.replay._real import MAX_ANSWER_TOKENS, MAX_PROMPT_TOKENS, RealSetup, clip_slice, sim_vs_real

    n = args.sim_vs_real_requests
    if AZURE.exists():
        source, work = "azure trace", clip_slice(_azure(n), arrival_scale=args.sim_vs_real_arrival_scale)
    else:
        source = "synthetic (the Azure trace is not here)"
        work = clip_slice(iter_synthetic(n, seed=1, arrivals=PoissonArrivals(AZURE_REQUESTS / 3600)),
                          arrival_scale=args.sim_vs_real_arrival_scale)  # fmt: skip
    config = ReplayConfig(dispatch="disco-d", budget=0.5, device=DeviceModel.smollm2(), server=ServerModel.assumed(), seed=0)
    started = time.perf_counter()
    result = sim_vs_real(work, config, setup=RealSetup())
    wall = time.perf_counter() - started
    cal = result.calibration

    def figures(summary: Any) -> dict[str, Any]:
        return {"ttft_p50_s": summary.ttft.quantile(0.5), "ttft_p99_s": summary.ttft.quantile(0.99),
                "tbt_p50_s": summary.tbt.quantile(0.5), "qoe_mean": summary.qoe.mean,
                "outcomes": dict(summary.outcomes), "migrations": summary.migrations, "failovers": summary.failovers,
                "tokens_by_endpoint": dict(summary.tokens_by_endpoint)}  # fmt: skip

    err = result.agreement
    f: dict[str, Any] = {
        "sim_vs_real_ttft_p50_err": err["ttft_p50_err"], "sim_vs_real_ttft_p99_err": err["ttft_p99_err"],
        "sim_vs_real_tbt_p50_err": err["tbt_p50_err"], "sim_vs_real_qoe_err": err["qoe_err"],
        "sim_vs_real_requests": len(work), "sim_vs_real_workload": source,
        "sim_vs_real_caps": f"prompts clipped to {MAX_PROMPT_TOKENS}, answers to {MAX_ANSWER_TOKENS} tokens",
        "sim_vs_real_arrival_scale": args.sim_vs_real_arrival_scale,
        "sim_vs_real_sim": figures(result.sim), "sim_vs_real_real": figures(result.real),
        "sim_vs_real_ttft_p50_by_first_endpoint": {"sim": _median_ttft_by_first_endpoint(result.sim_rows),
                                                   "real": _median_ttft_by_first_endpoint(result.real_rows)},
        "sim_vs_real_answer_tokens": {"asked": sum(r.output_tokens for r in result.real_rows),
                                      "real": sum(r.tokens for r in result.real_rows),
                                      "sim": sum(r.tokens for r in result.sim_rows)},
        "sim_vs_real_calibration": {
            "device_prefill_a_s": cal.device.prefill_a_s, "device_prefill_c_s_per_token": cal.device.prefill_c_s_per_token,
            "device_decode_s_per_token": cal.device.decode_s_per_token,
            "server_ttft_samples_s": list(cal.server_samples.ttft_s),
            "server_inter_token_s": list(cal.server_samples.inter_token_latency_s),
        },
        "sim_vs_real_wall_s": wall,
    }  # fmt: skip
    s, r = f["sim_vs_real_sim"], f["sim_vs_real_real"]
    rows = [
        ("sim vs real", f"{len(work)} requests ({source}; {f['sim_vs_real_caps']}), {wall:.0f} s wall"),
        ("  TTFT p50 sim / real", f"{s['ttft_p50_s']:.3f} / {r['ttft_p50_s']:.3f} s: error {err['ttft_p50_err']:.1%}"),
        ("  TTFT p99 sim / real", f"{s['ttft_p99_s']:.3f} / {r['ttft_p99_s']:.3f} s: error {err['ttft_p99_err']:.1%}"),
        ("  TBT p50 sim / real", f"{s['tbt_p50_s'] * 1e3:.1f} / {r['tbt_p50_s'] * 1e3:.1f} ms: error {err['tbt_p50_err']:.1%}"),
        ("  QoE mean sim / real", f"{s['qoe_mean']:.3f} / {r['qoe_mean']:.3f}: error {err['qoe_err']:.1%}"),
    ]
    return f, rows


def papers(args: argparse.Namespace, pool: concurrent.futures.Executor) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The four papers' headlines as `pydisco bench --quick` computes them."""
    setup = BenchSetup.build(requests=args.paper_requests, budgets=QUICK.budgets, loads=QUICK.loads,
                             providers=QUICK.providers if (DATA / "server_ttft").is_dir() else None,
                             data_dir=DATA if DATA.is_dir() else None)  # fmt: skip
    result = run_bench(setup, executor=pool)
    f = {k: v for k, v in result.headlines().items()}
    f["papers_requests_per_replay"] = args.paper_requests
    f["papers_servers"] = list(setup.server_models())
    f["papers_workload"] = "azure trace" if setup.azure is not None else "synthetic (the Azure trace is not here)"
    rows = [(f"{k} (paper: {PAPER_FIGURES[k].text})" if k in PAPER_FIGURES else k, _show(v)) for k, v in f.items()
            if not k.startswith("papers_") and not k.endswith("_range")]  # fmt: skip
    return f, rows


def _show(value: Any) -> str:
    if value is None:
        return "not measured (its table could not be computed; see pydisco bench's report)"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    f: dict[str, Any] = dict(PAPER)
    rows: list[tuple[str, str]] = []
    if args.no_real:
        f.update(sim_vs_real_ttft_p50_err=None, sim_vs_real_ttft_p99_err=None, sim_vs_real_tbt_p50_err=None,
                 sim_vs_real_qoe_err=None, sim_vs_real_note="not measured: --no-real")  # fmt: skip
    else:
        real_figures, rows = sim_vs_real_figures(args)  # alone: real time, before the pool's jobs
        f.update(real_figures)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
        jobs: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        if AZURE.exists():
            n = args.azure_requests
            jobs["azure disco-d"] = pool.submit(job_azure, n, "disco-d", "disco-migrate", args.server)
        jobs["stream"] = pool.submit(job_stream, args.stream_requests)
        if args.full:
            jobs["million"] = pool.submit(job_stream, 1_000_000)
            if AZURE.exists():
                jobs["azure hour"] = pool.submit(job_azure, AZURE_REQUESTS, "disco-d", "disco-migrate", args.server)
        paper_figures, paper_rows = papers(args, pool)  # after the timed jobs: they start first
        r = {k: v.result() for k, v in jobs.items()}
    if AZURE.exists():
        disco = r["azure disco-d"]
        f["azure_slice_requests"] = args.azure_requests
        f["azure_slice_wall_s"] = disco["wall_s"]
        f["azure_slice_virtual_s"] = disco["virtual_s"]
        f["azure_hour_wall_s"] = r["azure hour"]["wall_s"] if "azure hour" in r else None
        f["azure_hour_wall_s_extrapolated"] = disco["wall_s"] * AZURE_REQUESTS / args.azure_requests
        rows += [
            ("azure slice", f"{args.azure_requests} requests ({disco['virtual_s']:.0f} s of traffic) in {disco['wall_s']:.1f} s wall"),
            ("azure hour (extrapolated)", f"{f['azure_hour_wall_s_extrapolated']:.0f} s wall"),
        ]
    else:
        rows.append(("azure", f"skipped: {AZURE} is not here"))
    f["stream_requests"] = args.stream_requests
    f["stream_peak_rss_mb"] = r["stream"]["peak_rss_mb"]
    f["million_peak_rss_mb"] = r["million"]["peak_rss_mb"] if "million" in r else None
    f.update(paper_figures)
    rows += paper_rows
    rows += [
        ("stream peak RSS", f"{f['stream_peak_rss_mb']:.0f} MB for {args.stream_requests} requests"),
    ]
    return f, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--full", action="store_true", help="also the whole Azure hour and a 1,000,000-request stream")
    parser.add_argument("--azure-requests", type=int, default=200)
    parser.add_argument("--paper-requests", type=int, default=QUICK.requests,
                        help="requests per replay of the papers' tables (pydisco bench --quick's)")
    parser.add_argument("--stream-requests", type=int, default=5000)
    parser.add_argument("--server", default="groq_70b")
    parser.add_argument("--sim-vs-real-requests", type=int, default=24, metavar="N",
                        help="requests of the slice run for real and simulated (default 24)")
    parser.add_argument("--sim-vs-real-arrival-scale", type=float, default=1.0, metavar="X",
                        help="stretch the slice's arrivals by X (default 1: the trace's own rate)")
    parser.add_argument("--no-real", action="store_true", help="skip the real run (sim_vs_real_* null)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    figures, rows = bench(args)
    emit(rows, figures, args.json)


if __name__ == "__main__":
    main()


