"""``pydisco run "prompt"``: the main job on the embedded defaults.

The on-device SmolLM2 engine plus a cloud server on loopback (the same model behind real TLS
and the real protocol) reached through the link emulator's realistic last hop. The answer
streams live at the reader's pace; the report follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import trio
from rich.console import Console

from .._errors import ConfigurationError, MissingExtraError
from ..policies import dispatch_policy_names, migration_policy_names
from ..policies._base import Slo
from ..policies._base import Budget
from ..runtime._runtime import AnswerStream, RuntimeConfig, open_runtime
from ..runtime._zenoh import publish_to_zenoh
from ._live import AnswerView, LiveView, PlainView, QuietView
from ._config import add_config_option
from ._args import dispatch_policy, gguf_model, migration_policy, non_empty, non_negative_float, positive_int
from ._args import shell_schemes, transport_url, zenoh_endpoint, zenoh_key_prefix
from ._args import add_logging_options, configure_logging_from

LOOPBACK_TRANSPORTS = ("wss", "ws", "quic", "zenoh")  # zenoh needs pydisco[zenoh]


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        usage="%(prog)s [options] PROMPT",
        help="Stream one answer with the device and a loopback cloud working together.",
        description="Stream one answer on the embedded defaults: the on-device SmolLM2 model plus a cloud "
        "server on loopback (the same model behind real TLS and the real protocol), reached through an "
        "emulated Wi-Fi/LTE last hop. The answer streams at the reader's pace; the report follows.",
    )
    parser.add_argument("prompt", type=non_empty, metavar="PROMPT", help="What to ask.")
    parser.add_argument("--dispatch", default="race-both", type=dispatch_policy, metavar="NAME",
                        help=f"The dispatch policy: {', '.join(dispatch_policy_names())} (default: race-both).")  # fmt: skip
    parser.add_argument("--migration", default="disco-migrate", type=migration_policy, metavar="NAME",
                        help=f"The migration policy: {', '.join(migration_policy_names())} (default: disco-migrate).")  # fmt: skip
    parser.add_argument("--max-tokens", type=positive_int, default=96, metavar="N",
                        help="The longest answer, in tokens (default: 96).")  # fmt: skip
    parser.add_argument("--reading-rate", type=non_negative_float, default=12.0, metavar="TOKENS_PER_S",
                        help="Tokens per second released to the reader (default: 12, a fast reader; 0: as generated).")  # fmt: skip
    parser.add_argument("--transport", choices=LOOPBACK_TRANSPORTS,
                        help="The loopback cloud's transport (default: wss).")  # fmt: skip
    parser.add_argument("--cloud", metavar="URL", type=transport_url,
                        help=f"Use this pydisco server ({', '.join(s + '://' for s in shell_schemes())}) "
                        "instead of the loopback one.")  # fmt: skip
    parser.add_argument("--token", default="", help="The bearer token for --cloud.")
    parser.add_argument("--no-cloud", action="store_true", help="Answer with the device only.")
    parser.add_argument("--no-device", action="store_true", help="Answer with the cloud only.")
    parser.add_argument("--model", type=gguf_model, metavar="PATH",
                        help="The GGUF model for the device and the loopback cloud (default: SmolLM2-135M).")  # fmt: skip
    parser.add_argument("--threads", type=positive_int, metavar="N", help="llama.cpp threads per engine (default: half the CPUs).")
    parser.add_argument("--zenoh", type=zenoh_key_prefix, metavar="KEY_PREFIX",
                        help="Also publish the answer on Zenoh: tokens on KEY_PREFIX/answers/<id>/tokens, the report "
                        "on .../report, as JSON (needs pydisco[zenoh]; docs/embedding.md).")  # fmt: skip
    parser.add_argument("--zenoh-connect", type=zenoh_endpoint, action="append", metavar="ENDPOINT",
                        help="A Zenoh router or peer to connect to, e.g. rmw_zenohd's tcp/127.0.0.1:7447 "
                        "(repeatable; default: Zenoh's own configuration, ZENOH_CONFIG if set).")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="Print the report as JSON instead of text.")
    parser.add_argument("--plain", action="store_true",
                        help="Print plain text even on a terminal, instead of the live coloured view.")  # fmt: skip
    add_config_option(parser)
    parser.add_argument("--trace", type=pathlib.Path, metavar="FILE",
                        help="Write the answer's timeline to FILE as a Chrome/Perfetto trace (open it in ui.perfetto.dev).")  # fmt: skip
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
    if args.zenoh_connect and args.zenoh is None:
        raise ConfigurationError("--zenoh-connect says where --zenoh KEY_PREFIX publishes: give --zenoh too")
    if args.transport is not None and (args.cloud is not None or args.no_cloud):
        raise ConfigurationError("--transport picks the loopback cloud's transport; --cloud URL names its own")


async def _main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    messages = [{"role": "user", "content": args.prompt}]
    zenoh_session = None if args.zenoh is None else await _open_zenoh(args.zenoh_connect or ())
    try:
        return await _answer(args, config, messages, zenoh_session)
    finally:
        if zenoh_session is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(zenoh_session.close)


async def _open_zenoh(connect: Sequence[str]) -> Any:
    """A Zenoh session on Zenoh's own configuration (ZENOH_CONFIG if set), connected to
    ``connect`` as well; opened in a thread (it may wait for the network)."""
    try:
        import zenoh
    except ImportError as e:
        raise MissingExtraError("--zenoh needs eclipse-zenoh", "zenoh") from e
    config = zenoh.Config.from_env() if os.environ.get("ZENOH_CONFIG") else zenoh.Config()
    if connect:
        config.insert_json5("connect/endpoints", json.dumps(list(connect)))
    try:
        return await trio.to_thread.run_sync(zenoh.open, config)
    except zenoh.ZError as e:
        raise ConfigurationError(f"cannot open a Zenoh session: {e}") from None


async def _answer(args: argparse.Namespace, config: RuntimeConfig, messages: list[dict[str, str]], zenoh_session: Any) -> int:
    async with trio.open_nursery() as nursery:
        if args.cloud is not None:
            config = dataclasses.replace(config, cloud_url=args.cloud, cloud_token=args.token)
        elif not args.no_cloud:
            cloud = await nursery.start(_loopback, args)
            config = dataclasses.replace(config, cloud_url=cloud.url, cloud_token=cloud.token, cloud_ssl=cloud.ssl_context)
        async with open_runtime(config) as rt:
            async with rt.stream(messages, max_tokens=args.max_tokens) as answer:
                view = _view(args, answer, config.budget)
                nursery.start_soon(view.run_clock)
                try:
                    if zenoh_session is not None:
                        await publish_to_zenoh(answer, zenoh_session, args.zenoh, on_piece=view.piece)
                    else:
                        async for piece in answer:
                            view.piece(piece)
                except BaseException:
                    view.finish(None)  # what was shown stays; the error follows
                    raise
                view.finish(answer.report)
            report = answer.report
        nursery.cancel_scope.cancel()
    if args.trace is not None:
        args.trace.write_text(json.dumps(report.timeline.to_chrome_trace()))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    return 0


def _view(args: argparse.Namespace, answer: AnswerStream, budget: Budget) -> AnswerView:
    """Live on a terminal; plain text through a pipe or with --plain; nothing but the JSON
    report with --json."""
    if args.json:
        return QuietView()
    console = Console(file=sys.stdout)
    if args.plain or not console.is_terminal or console.is_dumb_terminal:
        return PlainView(sys.stdout)
    return LiveView(console, status=answer.status, usage=lambda: answer.report.usage, budget=budget)


async def _loopback(args: argparse.Namespace, *, task_status: trio.TaskStatus[Any]) -> None:
    """The loopback cloud, kept up until the run's nursery is cancelled."""
    from ..cloud._loopback import open_loopback_cloud  # loads llama.cpp: only when it is used

    async with open_loopback_cloud(
        model_path=args.model, n_threads=args.threads, transport=args.transport or "wss"
    ) as cloud:
        task_status.started(cloud)
        await trio.sleep_forever()


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
