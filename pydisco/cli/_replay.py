"""Replay a workload through the shipped runtime in virtual time: pydisco replay [TRACE].

TRACE is an Azure (2023/2024), BurstGPT, Mooncake or Andes QoE file, recognised from its
header (or named with --format); without one, a seeded synthetic workload. The dispatch and
migration policies, the coordinator, the migration machine, the pacer and the server's step
scheduler are the ones `pydisco run` uses, against a device model (its measured profile), a
batched server model (calibrated from llmperf records) and the link emulator's last hop, all
under Trio's MockClock: an hour of traffic in a fraction of it, the same result for a seed.

Comma lists in --dispatch, --budget and --seed make a sweep (their product), run on a process
pool (--workers).
"""

from __future__ import annotations

import argparse

import itertools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

from .._errors import ConfigurationError
from ..policies import dispatch_policy_names, step_scheduler_names
from ..policies._base import Slo
from ._args import dispatch_policy, existing_file, migration_policy, non_negative_float, positive_int, step_scheduler

FORMATS = ("azure", "burstgpt", "mooncake", "andes")
ARRIVALS = ("poisson", "gamma", "bursts")


def _comma_list(kind: Any) -> Any:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [kind(t) for t in items]

    return parse


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is a share in [0, 1], got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None


def _lengths(text: str) -> Any:
    from ..workloads import length_distribution

    try:
        return length_distribution(text)
    except (ValueError, OSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "replay", usage="%(prog)s [options] [TRACE]",
        help="Replay a trace (or a synthetic workload) through the runtime in virtual time.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = parser.add_argument
    add("trace", nargs="?", type=existing_file, metavar="TRACE", help="Trace file (default: synthetic).")
    add("--format", choices=FORMATS, help="The trace's format (default: recognised from its header).")
    add("--limit", type=positive_int, metavar="N", help="Replay only the first N requests.")
    w = parser.add_argument_group("synthetic workload (without TRACE)")
    w.add_argument("--synthetic", type=positive_int, default=1000, metavar="N", help="Requests (default 1000).")
    w.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="Arrival process (default poisson).")
    w.add_argument("--rate", type=_positive_float, default=19366 / 3600, metavar="PER_S",
                   help="Mean arrival rate (default: the Azure conversation trace's 5.38/s).")
    w.add_argument("--cv", type=_positive_float, default=2.0, help="Gamma arrivals' coefficient of variation (default 2).")
    w.add_argument("--burst-rate", type=_positive_float, metavar="PER_S", help="Bursts: rate inside a burst (default 4x --rate).")
    w.add_argument("--period", type=_positive_float, default=60.0, metavar="S", help="Bursts: cycle length (default 60 s).")
    w.add_argument("--burst-s", type=_positive_float, default=10.0, metavar="S", help="Bursts: burst length (default 10 s).")
    w.add_argument("--prompt-lengths", type=_lengths, metavar="SPEC", help="Lengths: azure-conv-prompt (default), constant:N, "
                   "uniform:LO:HI, lognormal:MEDIAN:MEAN, empirical:FILE:prompt.")
    w.add_argument("--output-lengths", type=_lengths, metavar="SPEC", help="As --prompt-lengths (default azure-conv-output).")
    p = parser.add_argument_group("policies")
    p.add_argument("--dispatch", type=_comma_list(dispatch_policy), default=["disco-d"], metavar="NAME[,NAME]",
                   help=f"Dispatch policy: {', '.join(dispatch_policy_names())} (default disco-d).")
    p.add_argument("--migration", type=migration_policy, default="disco-migrate", metavar="NAME")
    p.add_argument("--budget", type=_comma_list(_share), default=[1.0], metavar="B[,B]",
                   help="Share of tokens the budgeted endpoint may process (default 1).")
    p.add_argument("--budget-on", choices=("device", "cloud"),
                   help="The budgeted endpoint (default: device for disco-d, cloud otherwise).")
    p.add_argument("--seed", type=_comma_list(_seed), default=[0], metavar="S[,S]")
    p.add_argument("--no-pace", action="store_true", help="Release tokens as committed, not at the reading rate.")
    p.add_argument("--no-standby", action="store_true", help="The device does not follow the cloud's answer.")
    p.add_argument("--reading-rate", type=_positive_float, metavar="TOKENS_PER_S",
                   help="For requests whose trace gives no SLO (default 4.5, Andes' reader).")
    p.add_argument("--ttft-target", type=_positive_float, metavar="S", help="Likewise, the TTFT target (default 1 s).")
    e = parser.add_argument_group("endpoint models")
    e.add_argument("--server-ttft", metavar="FILE|DIR", help="The llmperf records the server is calibrated from "
                   "(default: $PYDISCO_SERVER_TTFT_DIR/<--server>.json, else an assumed server).")
    e.add_argument("--server", default="groq_70b", metavar="NAME", help="Records by name (default groq_70b).")
    e.add_argument("--scheduler", type=step_scheduler, default="fcfs", help=f"Server step scheduler: {', '.join(step_scheduler_names())}.")
    e.add_argument("--max-batch", type=positive_int, default=64, metavar="N", help="Server batch limit (default 64).")
    e.add_argument("--device-profile", type=existing_file, metavar="FILE",
                   help="Device profile JSON (default: SmolLM2's cached profile, from `pydisco profile`).")
    e.add_argument("--device-mode", choices=("fleet", "shared"), default="fleet",
                   help="Fleet: each request its own device (default); shared: one batched device.")
    e.add_argument("--device-context", type=positive_int, default=2048, metavar="TOKENS")
    e.add_argument("--no-device", action="store_true", help="Cloud only.")
    e.add_argument("--no-cloud", action="store_true", help="Device only.")
    e.add_argument("--link", choices=("none", "realistic"), default="none",
                   help="Last hop: none (the measured TTFTs include the network) or the emulator's realistic Wi-Fi/LTE.")
    e.add_argument("--outages-per-hour", type=non_negative_float, default=0.0, metavar="N")
    e.add_argument("--outage-s", type=_positive_float, default=5.0, metavar="S", help="Mean outage length (default 5 s).")
    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="FILE", help="Per-request table: FILE.csv, or FILE.parquet with pyarrow "
                   "(a sweep adds -<dispatch>-b<budget>-s<seed> to the name).")
    o.add_argument("--json", action="store_true", help="Print the summary as one JSON object (a list for a sweep).")
    o.add_argument("--workers", type=positive_int, metavar="N", help="Sweep processes (default: one per core).")
    r = parser.add_argument_group("simulated against real")
    r.add_argument("--real", action="store_true", help="Also run the slice for real (the SmolLM2 device, a loopback server "
                   "behind the link emulator, in real time; prompts <= 200 and answers <= 64 tokens; --limit, default 24) "
                   "and print the simulation's relative error against it.")
    parser.set_defaults(func=run)


def _workload(args: argparse.Namespace) -> Any:
    from ..replay._sweep import WorkloadSpec
    from ..workloads import CyclicBurstArrivals, GammaArrivals, PoissonArrivals, detect_format

    seed = args.seed[0]
    if args.trace is not None:
        fmt = args.format or detect_format(args.trace)  # a file we cannot read stops here, in one line
        return WorkloadSpec(path=str(args.trace), format=fmt, limit=args.limit, seed=seed)
    if args.arrivals == "gamma":
        arrivals: Any = GammaArrivals(args.rate, args.cv)
    elif args.arrivals == "bursts":
        if args.burst_s > args.period:
            raise ConfigurationError("--burst-s must not exceed --period")
        burst = args.burst_rate or 4 * args.rate
        quiet_s = args.period - args.burst_s
        # The quiet rate that keeps the mean at --rate (0 when the bursts alone exceed it).
        base = max(0.0, (args.rate * args.period - burst * args.burst_s) / quiet_s) if quiet_s else 0.0
        arrivals = CyclicBurstArrivals(base, burst, args.period, args.burst_s)
    else:
        arrivals = PoissonArrivals(args.rate)
    extra = {k: v for k, v in (("prompt_lengths", args.prompt_lengths), ("output_lengths", args.output_lengths)) if v is not None}
    return WorkloadSpec(synthetic=args.synthetic, arrivals=arrivals, limit=args.limit, seed=seed, **extra)


def _server(args: argparse.Namespace) -> Any:
    from ..linkemu import SERVER_TTFT_ENV
    from ..replay import ServerModel
    from ..workloads import load_server_ttft

    if args.no_cloud:
        return None
    path = args.server_ttft
    if path is None and os.environ.get(SERVER_TTFT_ENV):
        path = str(pathlib.Path(os.environ[SERVER_TTFT_ENV]) / f"{args.server}.json")
    if path is None:
        return ServerModel.assumed(scheduler=args.scheduler, max_batch=args.max_batch)
    if not pathlib.Path(path).exists():
        raise ConfigurationError(f"no server records at {path}")
    return ServerModel.from_samples(load_server_ttft(path), scheduler=args.scheduler, max_batch=args.max_batch)


def _device(args: argparse.Namespace) -> Any:
    from ..replay import DeviceModel

    if args.no_device:
        return None
    if args.device_profile is not None:
        return DeviceModel.from_file(args.device_profile, context_tokens=args.device_context)
    return DeviceModel.smollm2(context_tokens=args.device_context)


def _configs(args: argparse.Namespace) -> list[Any]:
    from ..linkemu import REALISTIC_LAST_HOP
    from ..replay import LastHop, Outages, ReplayConfig

    if args.no_device and args.no_cloud:
        raise ConfigurationError("--no-device and --no-cloud leave nothing to replay against")
    device, server = _device(args), _server(args)
    link = None
    if args.link == "realistic" or args.outages_per_hour > 0:
        profile = REALISTIC_LAST_HOP if args.link == "realistic" else LastHop().up
        outages = Outages(args.outages_per_hour, args.outage_s, seed=args.seed[0]) if args.outages_per_hour > 0 else None
        link = LastHop(profile, profile, outages)
    slo = Slo(ttft_target_s=args.ttft_target or 1.0, reading_rate=args.reading_rate or 4.5)
    return [
        ReplayConfig(dispatch=d, migration=args.migration, budget=b, budget_on=args.budget_on, seed=s, device=device,
                     device_mode=args.device_mode, server=server, link=link, slo=slo, pace=not args.no_pace,
                     device_standby=not args.no_standby)
        for d, b, s in itertools.product(args.dispatch, args.budget, args.seed)
    ]  # fmt: skip


class _ProgressBar:
    """One line on stderr, redrawn at most 5 times a second, only on a terminal."""

    def __init__(self, total: int | None) -> None:
        self._total = total
        self._shown = 0.0
        self.active = sys.stderr.isatty()

    def __call__(self, done: int, virtual_s: float) -> None:
        now = time.monotonic()
        if not self.active or now - self._shown < 0.2:
            return
        self._shown = now
        if self._total:
            filled = int(30 * done / self._total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self._total}"
        else:
            bar = f"{done} requests"
        print(f"\rreplay {bar}, {virtual_s:,.0f} s of traffic", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active and self._shown:
            print(file=sys.stderr, flush=True)


def _rows_path(out: str | None, config: Any, sweep: bool) -> str | None:
    if out is None or not sweep:
        return out
    p = pathlib.Path(out)
    return str(p.with_name(f"{p.stem}-{config.dispatch}-b{config.budget:g}-s{config.seed}{p.suffix}"))


def run(args: argparse.Namespace) -> int:
    from ..workloads import WorkloadFormatError

    try:
        return _run(args)
    except WorkloadFormatError as e:  # the trace named on the command line cannot be read
        raise ConfigurationError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from ..replay._run import replay
    from ..replay._sweep import RowWriter, sweep

    workload = _workload(args)
    configs = _configs(args)
    is_sweep = len(configs) > 1
    if args.real:
        return _run_real(args, workload, configs)
    if args.out is not None:
        RowWriter(args.out)  # a Parquet file without pyarrow stops here, before any work
    if is_sweep:
        summaries = sweep(workload, configs, rows_paths=[_rows_path(args.out, c, True) for c in configs],
                          executor=_executor(args.workers, len(configs)))
    else:
        total = args.limit if args.trace is not None else min(args.synthetic, args.limit or args.synthetic)
        bar = _ProgressBar(total)
        try:
            if args.out is not None:
                with RowWriter(args.out) as writer:
                    summaries = [replay(workload.open(), configs[0], on_row=writer, progress=bar).to_json()]
            else:
                summaries = [replay(workload.open(), configs[0], progress=bar).to_json()]
        finally:
            bar.close()
    for s in summaries:
        s["workload"] = workload.describe()
    if args.json:
        print(json.dumps(summaries if is_sweep else summaries[0]))
    else:
        for s in summaries:
            print(_text(s))
    return 0


def _run_real(args: argparse.Namespace, workload: Any, configs: list[Any]) -> int:
    """The slice for real and simulated on the models calibrated just before (docs/replay.md)."""
    from ..replay._real import clip_slice, sim_vs_real

    if len(configs) > 1:
        raise ConfigurationError("--real runs one configuration, not a sweep")
    if args.out is not None:
        raise ConfigurationError("--real prints summaries only; --out is for a simulated replay")
    work = clip_slice(itertools.islice(workload.open(), args.limit or 24))
    try:
        result = sim_vs_real(work, configs[0])
    except ImportError as e:  # an install without the device extra has no llama.cpp
        raise ConfigurationError(f"--real needs the real model (llama-cpp-python): {e}") from None
    summaries = {"sim": result.sim.to_json(), "real": result.real.to_json()}
    for s in summaries.values():
        s["workload"] = workload.describe() + f", first {len(work)}, clipped (prompts <= 200, answers <= 64 tokens)"
    if args.json:
        print(json.dumps({**summaries, "agreement": {k: v if math.isfinite(v) else None for k, v in result.agreement.items()}}))
    else:
        for name, s in summaries.items():
            print(f"{name}:\n{_text(s)}")
        print("relative error of sim against real: " + ", ".join(f"{k} {v:.1%}" for k, v in result.agreement.items()))
    return 0


def _executor(workers: int | None, runs: int) -> Any:
    import concurrent.futures

    return concurrent.futures.ProcessPoolExecutor(max_workers=workers or min(runs, os.cpu_count() or 1))


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _text(s: dict[str, Any]) -> str:
    c = s["config"]
    o, ttft, tbt, qoe, budget = s["outcomes"], s["ttft_s"], s["tbt_s"], s["qoe"], s["budget"]
    used = budget["share_used"]
    return "\n".join([
        f"{c['dispatch']} budget {c['budget']:g} on {c['budget_on']}, seed {c['seed']}: {s['workload']}",
        f"  requests {s['requests']}: " + ", ".join(f"{k} {v}" for k, v in o.items())
        + f"; routed from the device {s['routed_from_device']}; migrations {s['migrations']}, failovers {s['failovers']}",
        f"  TTFT mean {_ms(ttft['mean'])}, p50 {_ms(ttft['p50'])}, p99 {_ms(ttft['p99'])}; TBT p50 {_ms(tbt['p50'])}, p99 {_ms(tbt['p99'])}",
        f"  QoE mean {qoe['mean'] if qoe['mean'] is not None else '-':.3}, share >= 0.95 {qoe['share_at_least_0.95'] or 0:.3f}; "
        f"cost {s['cost']:.0f}; {budget['on']} share {used if used is not None else float('nan'):.3f} of {budget['share_asked']:g}",
        f"  {s['virtual_s']:.0f} s of traffic in {s['wall_s']:.1f} s",
    ])  # fmt: skip



