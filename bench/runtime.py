"""Benchmark of the collaborative runtime on the real model, over loopback with link emulation.

    python bench/runtime.py            # a table
    python bench/runtime.py --json     # the figures as JSON
    python bench/runtime.py --rounds 5

* Migration: the answer starts on the cloud (a pydisco server on loopback, the same SmolLM2,
  behind the link emulator's realistic last hop) and DiSCo's migration rule moves it to the
  device once the reader's buffer covers the catch-up. Tokens are paced at the reading rate;
  we count tokens released more than 1 ms after their pacing deadline (DiSCo reports 3-17
  delayed tokens per migration) and the largest gap between released tokens, next to the
  steady gap (1 / reading rate).
* Failover: the cloud link is reset mid-answer; the device continues from the last committed
  token. We report the handover gap (failure noticed -> device's first token) and the largest
  gap the reader saw.
* Overhead: device-only answers through the whole runtime (machine, pacer thread, reader) vs
  the bare device actor with a sink, alternating, same prompt, pacing off; the ratio of time
  per token (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import trio

from _stats import emit  # the script's own folder is on sys.path

from pydisco import RuntimeConfig, open_runtime
from pydisco.cloud import LoopbackCloud, open_loopback_cloud
from pydisco._types import GenerationRequest, TokenPiece
from pydisco.policies._base import Slo

QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the model keeps counting: no early end of text


def max_gap_s(released: list[float]) -> float:
    return max((b - a for a, b in zip(released, released[1:])), default=0.0)


def cloud_first(cloud: LoopbackCloud, migration: str, rate: float, threads: int | None) -> RuntimeConfig:
    """Answers start on the loopback cloud; the device is there to migrate or fail over to."""
    return RuntimeConfig(
        device_threads=threads,
        cloud_url=cloud.url,
        cloud_token=cloud.token,
        cloud_ssl=cloud.ssl_context,
        dispatch="cloud-only",
        migration=migration,
        slo=Slo(ttft_target_s=1.0, reading_rate=rate),
    )


async def migration_round(rate: float, max_tokens: int, threads: int | None) -> dict[str, Any]:
    async with open_loopback_cloud(n_threads=threads) as cloud:
        async with open_runtime(cloud_first(cloud, "disco-migrate", rate, threads)) as rt:
            async with rt.stream(QUESTION, max_tokens=max_tokens) as answer:
                released = [p.released_s async for p in answer]
            report = answer.report
    return {
        "migrated": bool(report.migrations),
        "late_tokens": report.late_tokens,
        "max_gap_s": max_gap_s(released),
        "handover_gap_s": report.migrations[0].gap_s if report.migrations else None,
        "tokens": report.tokens,
    }


async def failover_round(rate: float, max_tokens: int, threads: int | None, cut_at: int) -> dict[str, Any]:
    async with open_loopback_cloud(n_threads=threads) as cloud:
        async with open_runtime(cloud_first(cloud, "never", rate, threads)) as rt:
            async with rt.stream(QUESTION, max_tokens=max_tokens) as answer:
                released = []
                async for piece in answer:
                    released.append(piece.released_s)
                    if piece.position == cut_at:
                        cloud.link.cut(reset=True)
            report = answer.report
    failover = [m for m in report.migrations if m.kind == "failover"]
    return {
        "failed_over": bool(failover),
        "handover_gap_s": failover[0].gap_s if failover else None,
        "max_gap_s": max_gap_s(released),
        "late_tokens": report.late_tokens,
        "tokens": report.tokens,
    }


async def overhead(rounds: int, tokens: int, threads: int | None) -> dict[str, float]:
    """Seconds per token after the first, runtime vs bare actor, alternating."""
    request = GenerationRequest(prompt=COUNTING, max_tokens=tokens)
    runtime_s: list[float] = []
    bare_s: list[float] = []
    config = RuntimeConfig(device_threads=threads, dispatch="device-only", migration="never", pace=False)
    async with open_runtime(config) as rt:
        device = rt.endpoints["device"]
        for i in range(rounds):
            for which in (("runtime", "bare") if i % 2 == 0 else ("bare", "runtime")):
                if which == "runtime":
                    async with rt.stream(prompt=COUNTING, max_tokens=tokens) as answer:
                        stamps = [time.perf_counter() async for _ in answer]
                    runtime_s.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
                else:
                    marks: list[float] = []

                    def sink(_: TokenPiece) -> None:
                        marks.append(time.perf_counter())

                    await device.generate(request, sink)
                    bare_s.append((marks[-1] - marks[0]) / (len(marks) - 1))
    r, b = statistics.median(runtime_s), statistics.median(bare_s)
    return {"runtime_s_per_token": r, "bare_s_per_token": b, "overhead_ratio": r / b}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    migrations = [await migration_round(args.rate, args.tokens, args.threads) for _ in range(args.rounds)]
    failovers = [await failover_round(args.rate, args.tokens, args.threads, args.cut_at) for _ in range(args.rounds)]
    over = await overhead(args.overhead_rounds, 64, args.threads)
    migrated = [m for m in migrations if m["migrated"]]
    failed_over = [f for f in failovers if f["failed_over"]]
    figures: dict[str, Any] = {
        "reading_rate": args.rate,
        "steady_gap_ms": 1e3 / args.rate,
        "migration_rounds": len(migrations),
        "migrations_happened": len(migrated),
        "migration_late_tokens": statistics.mean(m["late_tokens"] for m in migrated) if migrated else None,
        "migration_max_gap_ms": max(m["max_gap_s"] for m in migrated) * 1e3 if migrated else None,
        "migration_handover_gap_ms": statistics.median(m["handover_gap_s"] for m in migrated) * 1e3 if migrated else None,
        "failover_rounds": len(failovers),
        "failovers_happened": len(failed_over),
        "failover_gap_ms": statistics.median(f["handover_gap_s"] for f in failed_over) * 1e3 if failed_over else None,
        "failover_max_gap_ms": max(f["max_gap_s"] for f in failed_over) * 1e3 if failed_over else None,
        "failover_late_tokens": statistics.mean(f["late_tokens"] for f in failed_over) if failed_over else None,
        **over,
    }
    return figures


def fmt(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else (f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="migration and failover answers each")
    parser.add_argument("--overhead-rounds", type=int, default=6)
    parser.add_argument("--rate", type=float, default=15.0, help="reading rate, tokens/s")
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per answer")
    parser.add_argument("--cut-at", type=int, default=8, help="failover: reset the link at this position")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per engine (two engines)")
    args = parser.parse_args()
    f = trio.run(bench, args)
    rows = [
        ("reading rate", f"{args.rate:.0f} tokens/s (steady gap {f['steady_gap_ms']:.1f} ms)"),
        ("migrations", f"{f['migrations_happened']} of {f['migration_rounds']} answers migrated cloud -> device"),
        ("  late tokens per migration", fmt(f["migration_late_tokens"]) + " (target 0; DiSCo 3-17)"),
        ("  largest released gap", fmt(f["migration_max_gap_ms"], " ms")),
        ("  handover gap (hidden by the buffer)", fmt(f["migration_handover_gap_ms"], " ms")),
        ("failovers", f"{f['failovers_happened']} of {f['failover_rounds']} answers failed over cloud -> device"),
        ("  handover gap", fmt(f["failover_gap_ms"], " ms")),
        ("  largest released gap", fmt(f["failover_max_gap_ms"], " ms")),
        ("  late tokens", fmt(f["failover_late_tokens"])),
        ("runtime vs bare device actor", f"{f['runtime_s_per_token'] * 1e3:.2f} vs {f['bare_s_per_token'] * 1e3:.2f} ms/token"),
        ("  overhead ratio", f"{f['overhead_ratio']:.3f} (1.0 = none)"),
    ]
    emit(rows, f, args.json)


if __name__ == "__main__":
    main()
