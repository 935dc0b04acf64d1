"""P/D-Device's table: TTFT, max TPOT and cloud tokens per answer of pd-device against
cloud-only and device-only on long prompts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ..policies._base import Slo
from ..replay import ReplayConfig
from .._percentiles import percentile
from ..replay._sweep import WorkloadSpec
from ..workloads import EmpiricalLengths, PoissonArrivals, UniformLengths
from ._setup import DEVICE_CONTEXT, BenchSetup, FixedSlo, Run, RunResult
from ._table import PaperTable, cut, ms

__all__ = ["runs", "table"]

TABLE = "pd"
POLICIES = ("device-only", "cloud-only", "pd-device")
LONG_PROMPT = 1024  # "long": the longer half of the Azure conversation prompts (median 1020)
# A display that shows a token every 50 ms: P/D-Device paces the cloud's tokens for a smooth
# screen ("max TPOT tens of ms"), faster than a reader's 4.5 tokens/s.
DISPLAY = Slo(ttft_target_s=1.0, reading_rate=20.0)


def workload(setup: BenchSetup) -> WorkloadSpec:
    lengths = setup.azure_lengths
    if lengths is not None:
        prompts, outputs = lengths
        half = DEVICE_CONTEXT // 2  # a prompt and its answer each up to half the context: both fit
        prompt_dist: Any = EmpiricalLengths(tuple(p for p in prompts if LONG_PROMPT <= p <= half))
        output_dist: Any = EmpiricalLengths(tuple(o for o in outputs if 0 < o <= half))
    else:
        prompt_dist, output_dist = UniformLengths(LONG_PROMPT, 4096), UniformLengths(32, 400)
    return WorkloadSpec(synthetic=setup.requests, arrivals=PoissonArrivals(setup.azure_rate_per_s), seed=setup.seed,
                        prompt_lengths=prompt_dist, output_lengths=output_dist, slo=FixedSlo(DISPLAY))  # fmt: skip


def runs(setup: BenchSetup) -> list[Run]:
    provider, server = setup.first_server()
    device = setup.device_with_context()
    work = workload(setup)
    return [
        Run(TABLE, (provider, policy), work,
            ReplayConfig(dispatch=policy, migration="never", seed=setup.seed, device=device, server=server, device_standby=False,
                         cost_per_token=setup.cost_per_token,
                         prefill_cost_per_token=setup.prefill_cost_per_token))
        for policy in POLICIES
    ]  # fmt: skip


def _stats(r: RunResult) -> dict[str, float]:
    done = r.completed()
    max_tbt = [x.tbt_max_s for x in done if x.tbt_max_s == x.tbt_max_s]
    return {
        "ttft_mean": statistics.fmean(r.values("ttft_s")) if r.values("ttft_s") else float("nan"),
        "ttft_p99": percentile(r.values("ttft_s"), 99),
        "max_tpot_p50": percentile(max_tbt, 50),
        "max_tpot_p99": percentile(max_tbt, 99),
        "cloud_decoded": statistics.fmean(x.cloud_decoded_tokens for x in done) if done else float("nan"),
        "cloud_tokens": statistics.fmean(x.cloud_tokens for x in done) if done else float("nan"),
        "completed": float(len(done)),
    }


def table(setup: BenchSetup, results: Sequence[RunResult]) -> PaperTable:
    by = {str(r.run.label[1]): _stats(r) for r in results if r.run.table == TABLE}
    provider = setup.first_server()[0]
    rows = tuple(
        (p, f"{ms(s['ttft_mean'])} / {ms(s['ttft_p99'])}", f"{ms(s['max_tpot_p50'])} / {ms(s['max_tpot_p99'])}",
         f"{s['cloud_decoded']:.1f}", f"{s['cloud_tokens']:.0f}", f"{s['completed']:.0f}")
        for p, s in by.items()
    )  # fmt: skip
    pd, device, cloud = by["pd-device"], by["device-only"], by["cloud-only"]
    gain = cloud["cloud_decoded"] / pd["cloud_decoded"] if pd["cloud_decoded"] > 0 else None
    return PaperTable(
        key=TABLE,
        title="P/D-Device: the cloud prefills, the device decodes",
        compares=(
            f"{setup.requests} long prompts (>= {LONG_PROMPT} tokens, lengths drawn from the Azure conversation trace "
            f"when it is here) at the trace's arrival rate, server {provider}: TTFT, the worst gap between two tokens "
            "of an answer (max TPOT; median and p99 over answers) and the answer tokens the cloud decodes per answer, "
            "for pd-device against device-only and cloud-only. Tokens are shown at a 50 ms display pace."
        ),
        columns=("policy", "TTFT mean / p99", "max TPOT p50 / p99", "cloud answer tokens / answer",
                 "cloud tokens (prompt + answer) / answer", "completed"),  # fmt: skip
        rows=rows,
        headlines={
            "pd_ttft_cut": cut(device["ttft_mean"], pd["ttft_mean"]),
            "pd_ttft_cut_vs_cloud_only": cut(cloud["ttft_mean"], pd["ttft_mean"]),
            "pd_max_tpot_ms": pd["max_tpot_p99"] * 1e3 if pd["max_tpot_p99"] == pd["max_tpot_p99"] else None,
            "pd_cloud_tokens_per_answer": pd["cloud_decoded"],
            "pd_cloud_throughput_gain": gain,
        },
        notes=(
            "pd_ttft_cut is against device-only (the device's own slow prefill is what P/D-Device removes); "
            "against cloud-only it is pd_ttft_cut_vs_cloud_only. pd_max_tpot_ms is the p99 over answers of each "
            "answer's largest gap, at a display pace of 50 ms a token (the pacer sets the floor).",
            "Cloud throughput gain is cloud-only's answer tokens decoded in the cloud per answer over pd-device's: "
            "a decode-bound server serves that many more answers. The prompt's prefill stays in the cloud for both.",
            f"The paper's prompts are ~8k tokens on a phone-class model; here they are the Azure trace's long "
            f"half (up to {DEVICE_CONTEXT // 2}) with the device at a {DEVICE_CONTEXT}-token context, and no prompt "
            "refinement (pydisco does not shorten prompts).",
        ),
    )


def plot_series(results: Sequence[RunResult]) -> dict[str, list[float]]:
    return {str(r.run.label[1]): r.values("ttft_s") for r in results if r.run.table == TABLE}
