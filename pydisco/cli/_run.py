"""``pydisco run "prompt"``: the main job on the embedded defaults.

The on-device SmolLM2 engine plus a cloud server on loopback (the same model behind real TLS
and the real protocol) reached through the link emulator's realistic last hop. The answer
streams live at the reader's pace; the report follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any

import trio

from .._errors import ConfigurationError
from ..policies import dispatch_policy_names, migration_policy_names
from ..policies._base import Slo
from ..runtime._runtime import RuntimeConfig, open_runtime
from ._args import dispatch_policy, gguf_model, migration_policy, non_empty, non_negative_float, positive_int
from ._args import shell_schemes, transport_url
from ._args import add_logging_options, configure_logging_from

LOOPBACK_TRANSPORTS = ("wss", "ws", "quic")


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        usage="%(prog)s [options] PROMPT",
        help="stream one answer with the device and a loopback cloud working together",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", type=non_empty, metavar="PROMPT", help="what to ask")
    parser.add_argument("--dispatch", default="race-both", type=dispatch_policy, metavar="NAME",
                        help=f"dispatch policy: {', '.join(dispatch_policy_names())} (default: race-both)")  # fmt: skip
    parser.add_argument("--migration", default="disco-migrate", type=migration_policy, metavar="NAME",
                        help=f"migration policy: {', '.join(migration_policy_names())} (default: disco-migrate)")  # fmt: skip
    parser.add_argument("--max-tokens", type=positive_int, default=96, metavar="N",
                        help="longest answer in tokens (default 96)")  # fmt: skip
    parser.add_argument("--reading-rate", type=non_negative_float, default=12.0, metavar="TOKENS_PER_S",
                        help="tokens/s released to the reader (default 12, a fast reader; 0: as generated)")  # fmt: skip
    parser.add_argument("--transport", choices=LOOPBACK_TRANSPORTS,
                        help="the loopback cloud's transport (default: wss)")  # fmt: skip
    parser.add_argument("--cloud", metavar="URL", type=transport_url,
                        help=f"use this pydisco server ({', '.join(s + '://' for s in shell_schemes())}) "
                        "instead of the loopback one")  # fmt: skip
    parser.add_argument("--token", default="", help="bearer token for --cloud")
    parser.add_argument("--no-cloud", action="store_true", help="device only")
    parser.add_argument("--no-device", action="store_true", help="cloud only")
    parser.add_argument("--model", type=gguf_model, metavar="PATH",
                        help="GGUF model for the device and the loopback cloud (default: SmolLM2)")  # fmt: skip
    parser.add_argument("--threads", type=positive_int, metavar="N", help="llama.cpp threads per engine")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--trace", type=pathlib.Path, metavar="FILE",
                        help="write the answer's timeline to FILE as a Chrome/Perfetto trace (open it in ui.perfetto.dev)")  # fmt: skip
    add_logging_options(parser)
    parser.set_defaults(func=run)


def _check_combination(args: argparse.Namespace) -> None:
    """Options that each parse but contradict one another."""
    if args.no_cloud and args.no_device:
        raise ConfigurationError("--no-cloud and --no-device leave nothing to answer: give at most one")
    if args.no_cloud and args.cloud is not None:
        raise ConfigurationError("give --cloud URL or --no-cloud, not both")
    if args.token and args.cloud is None:
        raise ConfigurationError("--token is the bearer token for --cloud URL; the loopback cloud needs none")
    if args.transport is not None and (args.cloud is not None or args.no_cloud):
        raise ConfigurationError("--transport picks the loopback cloud's transport; --cloud URL names its own")


async def _main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    messages = [{"role": "user", "content": args.prompt}]
    async with trio.open_nursery() as nursery:
        if args.cloud is not None:
            config = dataclasses.replace(config, cloud_url=args.cloud, cloud_token=args.token)
        elif not args.no_cloud:
            cloud = await nursery.start(_loopback, args)
            config = dataclasses.replace(config, cloud_url=cloud.url, cloud_token=cloud.token, cloud_ssl=cloud.ssl_context)
        async with open_runtime(config) as rt:
            async with rt.stream(messages, max_tokens=args.max_tokens) as answer:
                wrote = False
                try:
                    async for piece in answer:
                        if not args.json:
                            sys.stdout.write(piece.text)
                            sys.stdout.flush()
                            wrote = True
                finally:
                    if wrote:
                        print(flush=True)  # end the answer's line, also one that failed part-way
            report = answer.report
        nursery.cancel_scope.cancel()
    if args.trace is not None:
        args.trace.write_text(json.dumps(report.timeline.to_chrome_trace()))
    if args.json:
        print(json.dumps(_jsonable(report), indent=2))
    else:
        print("\n" + report.summary())
    return 0


async def _loopback(args: argparse.Namespace, *, task_status: trio.TaskStatus[Any]) -> None:
    """The loopback cloud, kept up until the run's nursery is cancelled."""
    from ..cloud._loopback import open_loopback_cloud  # loads llama.cpp: only when it is used

    async with open_loopback_cloud(
        model_path=args.model, n_threads=args.threads, transport=args.transport or "wss"
    ) as cloud:
        task_status.started(cloud)
        await trio.sleep_forever()


def _jsonable(report: Any) -> Any:
    data = dataclasses.asdict(report)
    del data["timeline"]  # --trace FILE exports it
    data["total_cost"] = report.total_cost
    return data


def run(args: argparse.Namespace) -> int:
    _check_combination(args)
    configure_logging_from(args, default=None)  # quiet unless asked: the answer is the output
    if args.trace is not None and not args.trace.parent.is_dir():
        raise ConfigurationError(f"--trace {args.trace}: no such directory {str(args.trace.parent)!r}")
    pace = args.reading_rate > 0
    config = RuntimeConfig(
        device_model=None if args.no_device else (args.model or "default"),
        device_threads=args.threads,
        dispatch=args.dispatch,
        migration=args.migration,
        slo=Slo(ttft_target_s=1.0, reading_rate=args.reading_rate if pace else 1000.0),
        pace=pace,
    )
    return trio.run(_main, args, config)
