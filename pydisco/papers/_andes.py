"""Andes' table: average QoE and the share of answers with QoE >= 0.95, the andes step
scheduler against fcfs on one server under cyclic bursts."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from ..replay import ReplayConfig, ServerModel
from ..replay._sweep import WorkloadSpec
from ..workloads import AZURE_CONV_OUTPUT_TOKENS, AZURE_CONV_PROMPT_TOKENS, CyclicBurstArrivals, EmpiricalLengths
from ._setup import BenchSetup, Run, RunResult
from ._table import PaperTable, share

__all__ = ["cyclic_bursts", "runs", "table"]

TABLE = "andes"
SCHEDULERS = ("fcfs", "andes")
REQUESTS_FACTOR = 4  # the bursts must repeat: this many times --requests
CYCLES = 2  # the replay covers this many burst cycles
BURST_FACTOR = 2.5  # Andes' bursts: 1.5-2.5x the mean rate ...
BURST_SHARE = 0.35  # ... for 35 % of each cycle
# The server is sized so that a burst overloads it and the queue it builds drains before the next:
# the smallest batch whose decode capacity is this many times the mean arrival rate.
HEADROOM = 1.3


def server_batch(server: ServerModel, rate_per_s: float, answer_tokens: float) -> tuple[int, float]:
    """The smallest batch limit whose decode capacity, ``b / (answer_tokens · lat(b))`` answers a
    second, is ``HEADROOM`` times ``rate_per_s`` (the server's own limit when none is), and
    that capacity."""
    def capacity(b: int) -> float:
        return b / (answer_tokens * server.step.decode(b))

    for b in range(1, server.max_batch + 1):
        if capacity(b) >= HEADROOM * rate_per_s:
            return b, capacity(b)
    return server.max_batch, capacity(server.max_batch)


def cyclic_bursts(mean_rate_per_s: float, period_s: float) -> CyclicBurstArrivals:
    """Andes' burst shape around a mean rate: ``BURST_FACTOR`` times it for ``BURST_SHARE`` of
    each ``period_s``, less between bursts so that the mean stays ``mean_rate_per_s``. Shared by
    this table and bench/multistream.py's server part (the same workload, real and virtual)."""
    burst = BURST_FACTOR * mean_rate_per_s
    base = (mean_rate_per_s - burst * BURST_SHARE) / (1.0 - BURST_SHARE)
    return CyclicBurstArrivals(base_rate_per_s=max(0.0, base), burst_rate_per_s=burst, period_s=period_s,
                               burst_s=BURST_SHARE * period_s)  # fmt: skip


def arrivals(setup: BenchSetup) -> CyclicBurstArrivals:
    mean = setup.azure_rate_per_s  # the trace's rate
    n = setup.requests * REQUESTS_FACTOR
    return cyclic_bursts(mean, n / mean / CYCLES)


def workload(setup: BenchSetup) -> WorkloadSpec:
    lengths = setup.azure_lengths
    prompt: Any = AZURE_CONV_PROMPT_TOKENS
    output: Any = AZURE_CONV_OUTPUT_TOKENS
    if lengths is not None:
        prompt, output = EmpiricalLengths(lengths[0]), EmpiricalLengths(lengths[1])
    # Per-request SLOs: Andes' own (TTFT target max(l/5000, 1) s, readers at 3.8-5.1 tokens/s).
    return WorkloadSpec(synthetic=setup.requests * REQUESTS_FACTOR, arrivals=arrivals(setup), seed=setup.seed,
                        prompt_lengths=prompt, output_lengths=output)  # fmt: skip


def _mean_answer(setup: BenchSetup) -> float:
    lengths = setup.azure_lengths
    return statistics.fmean(lengths[1]) if lengths is not None else AZURE_CONV_OUTPUT_TOKENS.mean


def sized_server(setup: BenchSetup) -> tuple[str, ServerModel, float]:
    """The table's server (name, model with its batch limit, decode capacity in answers/s)."""
    provider, server = setup.first_server()
    batch, capacity = server_batch(server, setup.azure_rate_per_s, _mean_answer(setup))
    return provider, dataclasses.replace(server, max_batch=batch), capacity


def runs(setup: BenchSetup) -> list[Run]:
    provider, server, _ = sized_server(setup)
    work = workload(setup)
    return [
        Run(TABLE, (provider, name), work,
            ReplayConfig(dispatch="cloud-only", migration="never", seed=setup.seed,
                         server=dataclasses.replace(server, scheduler=name)))
        for name in SCHEDULERS
    ]  # fmt: skip


def _qoe(r: RunResult) -> dict[str, Any]:
    return r.summary["qoe"]  # type: ignore[return-value]


def table(setup: BenchSetup, results: Sequence[RunResult]) -> PaperTable:
    mine = {str(r.run.label[1]): r for r in results if r.run.table == TABLE}
    a = arrivals(setup)
    provider, server, capacity = sized_server(setup)
    keeps_up = capacity >= HEADROOM * setup.azure_rate_per_s
    rows = tuple(
        (name, share(_qoe(r)["mean"]), share(_qoe(r)["share_at_least_0.95"]),
         f"{r.summary['ttft_s']['mean']:.2f} s" if r.summary["ttft_s"]["mean"] is not None else "-",  # type: ignore[index]
         f"{r.summary['ttft_s']['p99']:.2f} s" if r.summary["ttft_s"]["p99"] is not None else "-")  # type: ignore[index]
        for name, r in mine.items()
    )  # fmt: skip
    andes = mine["andes"]
    return PaperTable(
        key=TABLE,
        title="Andes: QoE of streamed answers under bursts",
        compares=(
            f"{setup.requests * REQUESTS_FACTOR} requests (Azure conversation lengths when the trace is here), "
            f"cyclic bursts of {BURST_FACTOR:g}x the trace's mean rate for {BURST_SHARE:.0%} of each "
            f"{a.period_s:.0f} s cycle ({a.base_rate_per_s:.2f}/s between bursts, {a.burst_rate_per_s:.2f}/s in them), "
            f"one {provider} server of {server.max_batch} slots (decode capacity {capacity:.1f} answers/s), cloud "
            "only; Andes' per-request SLOs. Average QoE, share with QoE >= 0.95 and TTFT, andes against fcfs as "
            "the server's step scheduler."
        ),
        columns=("scheduler", "QoE mean", "share QoE >= 0.95", "TTFT mean", "TTFT p99"),
        rows=rows,
        headlines={
            "andes_avg_qoe": _qoe(andes)["mean"], "andes_qoe95_share": _qoe(andes)["share_at_least_0.95"],
            "fcfs_avg_qoe": _qoe(mine["fcfs"])["mean"], "fcfs_qoe95_share": _qoe(mine["fcfs"])["share_at_least_0.95"],
        },  # fmt: skip
        notes=(
            "The paper replays a one-hour BurstGPT slice with about three bursts an hour on a GPU server; here the "
            f"cycle is shortened to {a.period_s:.0f} s so that a short replay holds {CYCLES} bursts, and the server's "
            f"batch is the smallest whose decode capacity is {HEADROOM:g}x the mean rate, so that a burst overloads "
            "it and its queue drains before the next (the load relative to capacity, not the absolute rate, is "
            "what the comparison is about)."
            + ("" if keeps_up else f" This server stays below that even at {server.max_batch} sequences: its queue "
               "grows from cycle to cycle."),
        ),
    )


def plot_series(results: Sequence[RunResult]) -> dict[str, list[float]]:
    return {str(r.run.label[1]): r.values("qoe") for r in results if r.run.table == TABLE}
