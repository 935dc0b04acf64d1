"""The four papers' tables from replays: pydisco bench [--quick] [--out DIR] [--json].

DiSCo (TTFT and cost of device-cloud dispatch and migration over budgets and API providers),
P/D-Device (cloud prefill, device decode on long prompts), Andes (QoE under bursts) and SLICE
(SLO attainment of mixed real-time and chat tasks), each computed by replaying a workload
through the shipped runtime in virtual time, beside the paper's own figures (quoted, never
measured here). The Azure conversation trace and the hosted APIs' TTFT records are read from
--data (default ../shared/data); without them, the synthetic workload of the trace's shape and an
assumed server stand in, and the report says so.

--out DIR writes report.md and PNG plots (needs matplotlib: pip install 'pydisco[bench]') and
each replay's per-request table under DIR/rows/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time
from typing import Any

from .._errors import ConfigurationError
from ..papers._setup import DEFAULT, QUICK
from ._args import existing_file, non_negative_float, positive_int



def _joined(values: tuple[object, ...]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _list(kind: Any, what: str) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return tuple(kind(t) for t in items)

    return parse


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a budget is a share strictly between 0 and 1, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"a load is an arrival rate > 0 per second, got {text!r}")
    return value


def _table(text: str) -> str:
    from ..papers import TABLES

    if text not in TABLES:
        raise argparse.ArgumentTypeError(f"unknown table {text!r}; known: {', '.join(TABLES)}")
    return text


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None


def _providers(text: str) -> tuple[str, ...] | str:
    return "all" if text.strip() == "all" else _list(str, "providers")(text)


def _device_profile(text: str) -> str | pathlib.Path:
    return text if text in ("cached", "quiet") else existing_file(text)


def _data_dir(text: str) -> pathlib.Path:
    path = pathlib.Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return path


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", usage="%(prog)s [options]", help="The four papers' tables (DiSCo, P/D-Device, Andes, SLICE) from replays, beside the papers' figures.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = parser.add_argument
    add("--quick", action="store_true", help=f"A small run (a minute or two): {QUICK.requests} requests per replay, "
        f"budgets {_joined(QUICK.budgets)}, loads {_joined(QUICK.loads)}, servers {_joined(QUICK.providers)}; "
        "any option given overrides it.")
    add("--requests", type=positive_int, metavar="N", help=f"Requests per replay (default {DEFAULT.requests}; Andes replays 4x as many).")
    add("--tables", type=_list(_table, "tables"), metavar="NAME[,NAME]", help="Which tables: disco, pd, andes, slice (default all).")
    add("--budgets", type=_list(_budget, "budgets"), metavar="B[,B]", help=f"DiSCo's budgets (default {_joined(DEFAULT.budgets)}).")
    add("--providers", type=_providers, metavar="NAME[,NAME]|all",
        help=f"The measured APIs (server_ttft/<NAME>.json) DiSCo runs against (default {_joined(DEFAULT.providers)}; "
             "the first also serves the other tables).")  # fmt: skip
    add("--loads", type=_list(_rate, "loads"), metavar="RATE[,RATE]", help=f"SLICE's arrival rates per second (default {_joined(DEFAULT.loads)}).")
    add("--seed", type=_seed, default=0, help="Seed of every replay (default 0).")
    add("--data", type=_data_dir, metavar="DIR", help="Where the trace and server records are (default ../shared/data).")
    add("--device-profile", type=_device_profile, default="cached", metavar="FILE|cached|quiet",
        help="The device's profile: a `pydisco profile` JSON file; cached: SmolLM2's cached profile, else the quiet "
             "machine's figures (default); quiet: the quiet machine's figures of measurements.md.")  # fmt: skip
    add("--device-cost", type=non_negative_float, default=0.2, metavar="C",
        help="What a device token costs against a cloud token of 1 (default 0.2, the replay's).")
    add("--out", type=pathlib.Path, metavar="DIR", help="Write DIR/report.md, PNG plots and DIR/rows/*.csv.")
    add("--json", action="store_true", help="Print the headline figures and the tables as one JSON object.")
    add("--workers", type=positive_int, metavar="N", help="Replay processes (default: one per core).")
    parser.set_defaults(func=run)


def _device(choice: str | pathlib.Path) -> Any:
    from ..replay import DeviceModel
    from ..replay._models import SMOLLM2_FALLBACK

    if choice == "quiet":
        return DeviceModel(**SMOLLM2_FALLBACK, source="quiet machine (measurements.md)")  # type: ignore[arg-type]
    if choice == "cached":
        return DeviceModel.smollm2()
    return DeviceModel.from_file(choice)


def _setup(args: argparse.Namespace) -> Any:
    from ..papers import BenchSetup, default_data_dir

    sizes = QUICK if args.quick else DEFAULT  # what an option given does not override
    providers: tuple[str, ...] | None
    if args.providers is None:
        providers = sizes.providers
    else:
        providers = None if args.providers == "all" else args.providers
    return BenchSetup.build(
        requests=args.requests or sizes.requests, budgets=args.budgets or sizes.budgets,
        loads=args.loads or sizes.loads, providers=providers, seed=args.seed,
        data_dir=args.data or default_data_dir(), device=_device(args.device_profile), device_cost=args.device_cost,
        require_servers=args.providers is not None,
    )  # fmt: skip


class _Progress:
    """``bench: 12/80 replays`` on stderr, on a terminal only."""

    def __init__(self) -> None:
        self.active = sys.stderr.isatty()
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.active:
            print(f"\rbench: {done}/{total} replays, {time.monotonic() - self.started:.0f} s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active:
            print(file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import concurrent.futures
    import os

    from ..papers import TABLES, plan, run_bench
    from ..papers._report import render_markdown, require_matplotlib, write_report

    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise ConfigurationError(f"--out {args.out}: exists and is not a folder")
        require_matplotlib()  # a missing matplotlib stops here, before minutes of replays
    setup = _setup(args)
    tables = args.tables or TABLES
    runs = len(plan(setup, tables))
    progress = _Progress()
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=args.workers or min(runs, os.cpu_count() or 1))
    try:
        result = run_bench(setup, tables, executor=pool, progress=progress,
                           rows_dir=args.out / "rows" if args.out is not None else None)  # fmt: skip
    finally:
        progress.close()
        pool.shutdown(cancel_futures=True)
    command = "pydisco bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
    if args.out is not None:
        written = write_report(result, args.out, command=command)
        if not args.json:
            print(f"wrote {', '.join(str(p) for p in written)}")
    if args.json:
        print(json.dumps(result.to_json()))
    elif args.out is None:
        print(render_markdown(result, command=command, plots=set()))
    return 0

