"""``pydisco run "prompt"``: the main job on the embedded defaults.

The on-device SmolLM2 engine plus a cloud server on loopback (the same model behind real TLS
and the real protocol) reached through the link emulator's realistic last hop. The answer
streams live at the reader's pace; the report follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import trio

from .._errors import PydiscoError
from ..runtime._runtime import RuntimeConfig, open_runtime
from ..policies import dispatch_policy_names
from ..policies._base import Slo


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="stream one answer with the device and a loopback cloud working together",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="what to ask")
    parser.add_argument("--dispatch", default="race-both", choices=dispatch_policy_names(),
                        help="dispatch policy (default: race-both)")  # fmt: skip
    parser.add_argument("--migration", default="disco-migrate", help="migration policy (default: disco-migrate)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--reading-rate", type=float, default=12.0,
                        help="tokens/s released to the reader (default 12, a fast reader; 0: as generated)")  # fmt: skip
    parser.add_argument("--transport", default="wss", choices=["wss", "ws", "quic"], help="cloud transport")
    parser.add_argument("--cloud", metavar="URL", help="use this pydisco server instead of the loopback one")
    parser.add_argument("--token", default="", help="bearer token for --cloud")
    parser.add_argument("--no-cloud", action="store_true", help="device only")
    parser.add_argument("--no-device", action="store_true", help="cloud only")
    parser.add_argument("--model", help="GGUF model for the device and the loopback cloud (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads per engine")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.set_defaults(func=run)


async def _main(args: argparse.Namespace) -> int:
    pace = args.reading_rate > 0
    config = RuntimeConfig(
        device_model=None if args.no_device else (args.model or "default"),
        device_threads=args.threads,
        dispatch=args.dispatch,
        migration=args.migration,
        slo=Slo(ttft_target_s=1.0, reading_rate=args.reading_rate if pace else 1000.0),
        pace=pace,
    )
    messages = [{"role": "user", "content": args.prompt}]
    async with trio.open_nursery() as nursery:
        if not args.no_cloud and args.cloud is None:
            cloud = await nursery.start(_loopback, args)
            config = dataclasses.replace(config, cloud_url=cloud.url, cloud_token=cloud.token, cloud_ssl=cloud.ssl_context)
        elif args.cloud is not None and not args.no_cloud:
            config = dataclasses.replace(config, cloud_url=args.cloud, cloud_token=args.token)
        async with open_runtime(config) as rt:
            async with rt.stream(messages, max_tokens=args.max_tokens) as answer:
                async for piece in answer:
                    if not args.json:
                        sys.stdout.write(piece.text)
                        sys.stdout.flush()
            report = answer.report
        nursery.cancel_scope.cancel()
    if args.json:
        print(json.dumps(_jsonable(report), indent=2))
    else:
        print("\n\n" + report.summary())
    return 0


async def _loopback(args: argparse.Namespace, *, task_status: trio.TaskStatus[Any]) -> None:
    """The loopback cloud, kept up until the run's nursery is cancelled."""
    from ..cloud._loopback import open_loopback_cloud  # loads llama.cpp: only when it is used

    async with open_loopback_cloud(model_path=args.model, n_threads=args.threads, transport=args.transport) as cloud:
        task_status.started(cloud)
        await trio.sleep_forever()


def _jsonable(report: Any) -> Any:
    data = dataclasses.asdict(report)
    data["total_cost"] = report.total_cost
    return data


def run(args: argparse.Namespace) -> int:
    try:
        return trio.run(_main, args)
    except PydiscoError as e:
        print(f"pydisco run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
