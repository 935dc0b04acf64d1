"""DiSCo's table: mean and p99 TTFT of disco-s and disco-d against device-only, cloud-only and
race-both at equal budget, over budgets and API providers; cost with and without migration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..replay import ReplayConfig
from ._setup import DEVICE_CONTEXT, BenchSetup, Run, RunResult
from ._table import PaperTable, cut, median_and_range, ms, pct, share

__all__ = ["runs", "table"]

TABLE = "disco"
# A baseline counts as "at equal budget" when it used no more of the budgeted endpoint's share
# than asked or than DiSCo itself used, with this much slack for a short replay's granularity.
BUDGET_SLACK = 0.02
SIDES = (("device", "disco-d"), ("cloud", "disco-s"))  # the budgeted endpoint and DiSCo's policy for it


def runs(setup: BenchSetup) -> list[Run]:
    work = setup.azure_workload(setup.requests)
    # DiSCo computes its policy from the prompt-length distribution (the paper: offline, over 100k
    # samples); without it a replay's first answers all decide at a cold start.
    prior = {"prompt_lengths": setup.prompt_length_prior()}
    device = setup.device_with_context()
    out: list[Run] = []
    for provider, server in setup.server_models().items():
        def run(policy: str, budget: float, on: str | None, migration: str = "disco-migrate") -> Run:
            config = ReplayConfig(dispatch=policy, migration=migration, budget=budget, budget_on=on,  # type: ignore[arg-type]
                                  seed=setup.seed, device=device, server=server, cost_per_token=setup.cost_per_token,
                                  prefill_cost_per_token=setup.prefill_cost_per_token,
                                  dispatch_options=prior if policy.startswith("disco-") else {})
            return Run(TABLE, (provider, policy, budget, on or "-", migration), work, config)

        out += [run("device-only", 1.0, None, "never"), run("cloud-only", 1.0, None, "never")]
        for b in setup.budgets:
            for on, disco in SIDES:
                out += [run(disco, b, on), run(disco, b, on, "never"), run("race-both", b, on)]
    return out


def _find(results: Sequence[RunResult], provider: str, policy: str, budget: float, on: str, migration: str) -> RunResult:
    for r in results:
        if r.run.label == (provider, policy, budget, on, migration):
            return r
    raise KeyError((provider, policy, budget, on, migration))


def _ttft(r: RunResult, q: str) -> float | None:
    value = r.summary["ttft_s"][q]  # type: ignore[index]
    return float(value) if value is not None else None


def _used(r: RunResult, on: str) -> float:
    tokens: Mapping[str, int] = r.summary["tokens_by_endpoint"]  # type: ignore[assignment]
    total = sum(tokens.values())
    return tokens.get(on, 0) / total if total else 0.0


def table(setup: BenchSetup, results: Sequence[RunResult]) -> PaperTable:
    rows: list[tuple[str, ...]] = []
    mean_cuts: list[float | None] = []
    p99_cuts: list[float | None] = []
    cost_cuts: list[float | None] = []
    for provider in setup.server_models():
        device_only = _find(results, provider, "device-only", 1.0, "-", "never")
        cloud_only = _find(results, provider, "cloud-only", 1.0, "-", "never")
        for b in setup.budgets:
            for on, disco in SIDES:
                ours = _find(results, provider, disco, b, on, "disco-migrate")
                never = _find(results, provider, disco, b, on, "never")
                race = _find(results, provider, "race-both", b, on, "disco-migrate")
                # Baselines within the same budget of the same endpoint.
                allowed = max(b, _used(ours, on)) + BUDGET_SLACK
                baselines = [x for x in (device_only, cloud_only, race) if _used(x, on) <= allowed]
                best_mean = min((m for x in baselines if (m := _ttft(x, "mean")) is not None), default=None)
                best_p99 = min((p for x in baselines if (p := _ttft(x, "p99")) is not None), default=None)
                c_mean, c_p99 = cut(best_mean, _ttft(ours, "mean")), cut(best_p99, _ttft(ours, "p99"))
                c_cost = cut(float(never.summary["cost"]), float(ours.summary["cost"]))  # type: ignore[arg-type]
                mean_cuts.append(c_mean)
                p99_cuts.append(c_p99)
                cost_cuts.append(c_cost)
                rows.append((
                    provider, f"{on} {b:g}", disco,
                    f"{ms(_ttft(ours, 'mean'))} / {ms(_ttft(ours, 'p99'))}",
                    f"{ms(_ttft(device_only, 'mean'))} / {ms(_ttft(device_only, 'p99'))}",
                    f"{ms(_ttft(cloud_only, 'mean'))} / {ms(_ttft(cloud_only, 'p99'))}",
                    f"{ms(_ttft(race, 'mean'))} / {ms(_ttft(race, 'p99'))}",
                    ", ".join(str(x.run.label[1]) for x in baselines) or "none",
                    f"{pct(None if c_mean is None else -c_mean)} / {pct(None if c_p99 is None else -c_p99)}",
                    f"{share(_used(ours, on))} (race {share(_used(race, on))})",
                    f"{float(never.summary['cost']):.0f} -> {float(ours.summary['cost']):.0f} ({pct(None if c_cost is None else -c_cost)})",  # type: ignore[arg-type]
                    f"{share(_qoe(never))} / {share(_qoe(ours))}",
                ))  # fmt: skip
    mean, mean_range = median_and_range(mean_cuts)
    p99, p99_range = median_and_range(p99_cuts)
    cost, cost_range = median_and_range(cost_cuts)
    workload = f"the first {setup.requests} requests of the Azure conversation trace" if setup.azure is not None \
        else f"{setup.requests} synthetic requests of the Azure conversation trace's shape (the trace is not here)"
    return PaperTable(
        key=TABLE,
        title="DiSCo: TTFT and cost of device-server cooperation",
        compares=(
            f"On {workload}, each API's measured TTFTs as the server and the device's profile: mean / p99 TTFT of "
            "DiSCo's policy for the budgeted endpoint (disco-d for a device budget, disco-s for a cloud budget, "
            "both with token-level migration) against device-only, cloud-only and race-both at that budget. "
            "A baseline enters the cut only if it used no more of the budgeted endpoint than asked or than "
            f"DiSCo used (+{BUDGET_SLACK:g}). Cost: DiSCo's policy with migration against the same without, with both "
            "QoE means beside it."
        ),
        columns=("server", "budget", "policy", "TTFT mean / p99", "device-only", "cloud-only", "race-both",
                 "baselines in budget", "TTFT change mean / p99", "budget used", "cost no-mig -> mig", "QoE no-mig / mig"),  # fmt: skip
        rows=tuple(rows),
        headlines={
            "disco_mean_ttft_cut": mean, "disco_mean_ttft_cut_range": mean_range,
            "disco_p99_ttft_cut": p99, "disco_p99_ttft_cut_range": p99_range,
            "disco_cost_cut": cost, "disco_cost_cut_range": cost_range,
        },
        notes=(
            "Headlines are the median over servers, budgets and budgeted endpoints of the cut against the best "
            "baseline in budget; the ranges are their minimum and maximum (the paper's figures are ranges too).",
            "Servers are hosted 70B APIs from the llmperf records (December 2023), not the paper's GPT-4o-mini, "
            "DeepSeek-V2.5, Cohere and LLaMA-3-70B; the device is SmolLM2-135M on this machine's CPU, not a phone "
            "running a 0.5-1.1B model. The cost scale is the replay's (device token 0.2, cloud token 1.0), not the "
            f"paper's dollars and joules: a device token costs {setup.device_cost:g} of a cloud token "
            "(--device-cost); a device token *prefilled* costs that times the profile's prefill time per token "
            f"over its decode time per token ({setup.prefill_cost_per_token['device']:.3g}: energy follows time at "
            "one power draw). Migrating to the device pays only when what it saves on the remaining answer tokens "
            "outweighs the device's prefill of the prompt and the tokens so far; the cloud keeps decoding during "
            "that prefill, so on the trace's short answers (~130 tokens) little is left to save.",
            f"The device runs at SmolLM2's trained {DEVICE_CONTEXT}-token context (the engine's default n_ctx is "
            "2048); a prompt and answer beyond it cannot run there and the runtime routes it to the cloud, so "
            "device-only spends cloud tokens too.",
            "The runtime's budget guard leaves the budgeted endpoint out of an answer that could push its share "
            "past the budget; early in a replay every answer can, so a short replay spends less than its budget "
            "(see 'budget used').",
        ),
    )


def _qoe(r: RunResult) -> Any:
    return r.summary["qoe"]["mean"]  # type: ignore[index]


def plot_series(setup: BenchSetup, results: Sequence[RunResult]) -> dict[str, Any]:
    """What the report plots: per server, TTFTs of each policy at the middle budget; and every
    run's (mean TTFT, cost per request)."""
    middle = sorted(setup.budgets)[len(setup.budgets) // 2]
    cdfs: dict[str, dict[str, list[float]]] = {}
    points: list[tuple[str, str, bool, float, float]] = []  # server, policy, migrates, mean TTFT, cost
    for r in results:
        provider, policy, budget, on, migration = r.run.label
        if policy in ("device-only", "cloud-only") or (budget == middle and migration == "disco-migrate"):
            name = str(policy) if on == "-" else f"{policy} ({on} {budget:g})"
            cdfs.setdefault(str(provider), {})[name] = r.values("ttft_s")
        mean = _ttft(r, "mean")
        requests = r.summary["requests"]
        cost = r.summary["cost"]
        if mean is not None and isinstance(requests, int) and requests and isinstance(cost, (int, float)):
            migrates = migration == "disco-migrate" or on == "-"  # the single-endpoint baselines: as they are
            points.append((str(provider), str(policy), migrates, mean, cost / requests))
    return {"middle_budget": middle, "ttft_cdfs": cdfs, "cost_points": points}
