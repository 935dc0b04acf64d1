"""SLICE's experiment on the real batched engine: a control task class (TPOT <= 50 ms, real-time)
beside chat tasks (TPOT <= 120 ms), Poisson arrivals at each load, answered by
``open_batched_device_endpoint`` under each step scheduler; SLO attainment per scheduler and
load. The task mix, bounds and the attainment test are the ones ``pydisco bench``'s SLICE table
replays in virtual time (``pydisco.papers._slice``), here against the model itself.

A task attains its SLO when it completes with TTFT (arrival to first token) within its bound and
mean time per output token within its TPOT; a task the scheduler refuses does not attain it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

import trio

from pydisco._errors import EndpointError
from pydisco._types import GenerationRequest, TokenPiece
from pydisco.device import open_batched_device_endpoint
from pydisco.papers._slice import OUTPUTS, PROMPTS, SCHEDULERS, TASKS
from pydisco.policies._base import Slo

MAX_BATCH = 8
N_CTX = 8192


@dataclasses.dataclass
class Task:
    slo: Slo
    arrived: float
    stamps: list[float] = dataclasses.field(default_factory=list)
    outcome: str = "pending"

    def attained(self) -> bool:
        if self.outcome not in ("stop", "length") or not self.stamps:
            return False
        ttft = self.stamps[0] - self.arrived
        tpot = (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1) if len(self.stamps) > 1 else 0.0
        return ttft <= self.slo.ttft_target_s and tpot <= self.slo.tpot_s * (1 + 1e-9)


def counting_prompt(tokens: int, rng: random.Random) -> str:
    """About ``tokens`` tokens the model answers by counting on, with no early end ("123, " is
    ~5 tokens: SmolLM2 splits digits), from a number drawn from ``rng``."""
    start = rng.randrange(100, 900)
    return "Keep counting: " + ", ".join(str(start + i) for i in range(max(1, tokens // 5))) + ","


def workload(load: float, seconds: float, seed: int) -> list[tuple[float, Slo, str, int]]:
    """(arrival offset, SLO, prompt, max_tokens) for Poisson arrivals at ``load`` per second."""
    rng = random.Random(seed)
    out, t = [], rng.expovariate(load)
    while t < seconds:
        tokens = PROMPTS.sample(rng)
        prompt = counting_prompt(tokens, rng)
        out.append((t, TASKS(tokens, rng), prompt, OUTPUTS.sample(rng)))
        t += rng.expovariate(load)
    return out


async def run_mix(scheduler: str, plan: Sequence[tuple[float, Slo, str, int]], threads: int) -> list[Task]:
    tasks: list[Task] = []
    async with open_batched_device_endpoint(scheduler=scheduler, max_batch=MAX_BATCH, n_ctx=N_CTX, n_threads=threads) as device:
        start = time.perf_counter()

        async def one(task: Task, prompt: str, max_tokens: int) -> None:
            def sink(_: TokenPiece) -> None:
                task.stamps.append(time.perf_counter())

            try:
                result = await device.generate(GenerationRequest(prompt=prompt, max_tokens=max_tokens), sink, task.slo)
                task.outcome = result.finish_reason
            except EndpointError as e:
                task.outcome = e.code or "failed"

        async with trio.open_nursery() as nursery:
            for offset, slo, prompt, max_tokens in plan:
                await trio.sleep(max(0.0, start + offset - time.perf_counter()))
                task = Task(slo, time.perf_counter())
                tasks.append(task)
                nursery.start_soon(one, task, prompt, max_tokens)
    return tasks


def share(tasks: Sequence[Task], realtime: bool | None = None) -> float | None:
    chosen = [t for t in tasks if realtime is None or t.slo.realtime == realtime]
    return sum(t.attained() for t in chosen) / len(chosen) if chosen else None


def slo_attainment(loads: Sequence[float], seconds: float, threads: int, seed: int = 0) -> dict[str, Any]:
    """Per load, per scheduler (alternating their order from load to load): attainment overall,
    of the real-time tasks, of those among the real-time tasks admitted, and the refusals."""
    table: dict[str, dict[str, Any]] = {}
    for k, load in enumerate(loads):
        plan = workload(load, seconds, seed + k)
        order = SCHEDULERS if k % 2 == 0 else tuple(reversed(SCHEDULERS))
        row: dict[str, Any] = {"tasks": len(plan), "realtime_tasks": sum(s.realtime for _, s, _, _ in plan)}
        for name in order:
            tasks = trio.run(run_mix, name, plan, threads)
            admitted_rt = [t for t in tasks if t.slo.realtime and t.outcome != "rejected"]
            row[name] = {
                "attainment": share(tasks), "realtime_attainment": share(tasks, True),
                "realtime_attainment_admitted": share(admitted_rt, True), "chat_attainment": share(tasks, False),
                "rejected": sum(t.outcome == "rejected" for t in tasks),
            }  # fmt: skip
        table[f"{load:g}"] = row
    heaviest = table[f"{loads[-1]:g}"]
    slice_rt = [row["slice"]["realtime_attainment_admitted"] for row in table.values()]
    return {
        "slo_by_load": table,
        "slo_loads": list(loads),
        "slo_seconds_per_load": seconds,
        "slice_slo_attainment": heaviest["slice"]["attainment"],
        "fcfs_slo_attainment": heaviest["fcfs"]["attainment"],
        "fastserve_slo_attainment": heaviest["fastserve"]["attainment"],
        # The worst, over the loads, of slice's attainment for the real-time tasks it admitted.
        "slice_realtime_attainment": min((a for a in slice_rt if a is not None), default=None),
    }
