"""SLICE's table: SLO attainment of the slice step scheduler against fcfs and fastserve on one
device serving a mix of real-time and chat tasks, over the load."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..policies._base import Slo
from ..replay import ReplayConfig, RequestRow
from ..replay._sweep import WorkloadSpec
from ..workloads import PoissonArrivals, UniformLengths
from ._setup import BenchSetup, MixedTasks, Run, RunResult
from ._table import PaperTable, share

__all__ = ["meets_slo", "runs", "table"]

TABLE = "slice"
SCHEDULERS = ("fcfs", "fastserve", "slice")
BASELINES = ("fcfs", "fastserve")
# SLICE's classes: a control task needs TPOT <= 50 ms, a chat answer tolerates 120 ms.
TASKS = MixedTasks(
    realtime_share=0.3,
    realtime=Slo(ttft_target_s=1.0, reading_rate=20.0, realtime=True),
    chat=Slo(ttft_target_s=2.0, reading_rate=1 / 0.120),
)
MAX_BATCH = 16  # sequences the device's engine batches at once
KV_TOKENS = 16384  # the device's KV cache for all of them
PROMPTS, OUTPUTS = UniformLengths(32, 256), UniformLengths(16, 128)  # short commands and answers


def meets_slo(row: RequestRow) -> bool:
    """SLICE's test: completed, TTFT within its bound and mean time per token within its TPOT."""
    return (row.outcome == "completed" and row.ttft_s <= row.ttft_target_s
            and row.tbt_mean_s <= row.tpot_target_s * (1 + 1e-9))  # fmt: skip


def runs(setup: BenchSetup) -> list[Run]:
    device = dataclasses.replace(setup.device, context_tokens=KV_TOKENS)
    out = []
    for load in setup.loads:
        work = WorkloadSpec(synthetic=setup.requests, arrivals=PoissonArrivals(load), seed=setup.seed,
                            prompt_lengths=PROMPTS, output_lengths=OUTPUTS, slo=TASKS)  # fmt: skip
        for name in SCHEDULERS:
            # Tokens are taken as the engine makes them (no reading pace): SLICE's TPOT is the engine's.
            config = ReplayConfig(dispatch="device-only", migration="never", seed=setup.seed, device=device,
                                  device_mode="shared", device_max_batch=MAX_BATCH, device_scheduler=name, pace=False)
            out.append(Run(TABLE, (load, name), work, config))
    return out


def attainment(r: RunResult, realtime: bool | None = None) -> float:
    rows = [x for x in r.rows if realtime is None or x.realtime == realtime]
    return sum(meets_slo(x) for x in rows) / len(rows) if rows else float("nan")


def curves(results: Sequence[RunResult]) -> dict[str, list[tuple[float, float]]]:
    """Per scheduler, (load, SLO attainment) in load order."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in sorted((r for r in results if r.run.table == TABLE), key=lambda r: r.run.label):
        load, name = r.run.label
        out.setdefault(str(name), []).append((float(load), attainment(r)))  # type: ignore[arg-type]
    return out


def table(setup: BenchSetup, results: Sequence[RunResult]) -> PaperTable:
    mine = {r.run.label: r for r in results if r.run.table == TABLE}
    rows = []
    ratios: list[float] = []
    for load in setup.loads:
        got = {name: mine[(load, name)] for name in SCHEDULERS}
        best_baseline = max(attainment(got[b]) for b in BASELINES)
        ratio = attainment(got["slice"]) / best_baseline if best_baseline > 0 else None
        if ratio is not None:
            ratios.append(ratio)
        rows.append((
            f"{load:g}/s",
            *(f"{share(attainment(got[n]))} (rt {share(attainment(got[n], True))}, chat {share(attainment(got[n], False))})"
              for n in SCHEDULERS),
            "-" if ratio is None else f"{ratio:.2f}x",
        ))  # fmt: skip
    top = max(setup.loads)
    return PaperTable(
        key=TABLE,
        title="SLICE: SLO attainment of mixed real-time and chat tasks on one device",
        compares=(
            f"{setup.requests} tasks per load, Poisson arrivals, {TASKS.realtime_share:.0%} real-time "
            "(TTFT <= 1 s, TPOT <= 50 ms) and the rest chat (TTFT <= 2 s, TPOT <= 120 ms), on one device "
            f"(the SmolLM2 profile, batched up to {MAX_BATCH} with the multi-stream engine's step-time curve): the "
            "share of tasks that meet both bounds (rt: real-time, chat: chat), slice against fcfs (Orca-like) "
            "and fastserve as the device's step scheduler."
        ),
        columns=("load", *SCHEDULERS, "slice / best baseline"),
        rows=tuple(rows),
        headlines={
            "slice_attainment_ratio": max(ratios) if ratios else None,
            "slice_attainment": attainment(mine[(top, "slice")]),
            "fcfs_attainment": attainment(mine[(top, "fcfs")]),
            "fastserve_attainment": attainment(mine[(top, "fastserve")]),
        },
        notes=(
            "slice_attainment_ratio is the largest ratio over the loads of slice's attainment to the better "
            "baseline's (the paper's 'up to'); a load where both baselines attain nothing has no ratio. The "
            "attainments beside it are at the highest load.",
            "The paper runs ChatGLM2-6B-INT4 on an RTX 4060 Ti; here the device is SmolLM2-135M's measured CPU "
            "profile, whose batched step slows roughly linearly with the batch (the multi-stream engine's curve), "
            "with a 16k-token KV cache. A task's TPOT is its mean time per token as the engine makes it (no "
            "reading pace).",
        ),
    )
