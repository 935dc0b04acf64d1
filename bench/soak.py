"""Soak: many streams for many minutes against a loopback server; does anything grow or get lost?

    python bench/soak.py                 # 1000 streams for 10 minutes over ws
    python bench/soak.py --quick         # 200 streams for 1 minute (a smoke run)
    python bench/soak.py --json          # the figures as one JSON object
    python bench/soak.py --scheme quic --streams 500 --minutes 5

The server is bench/transport.py's child process (a pydisco server with a stub backend pacing
tokens on absolute deadlines), so the server's memory and descriptors are its own, not the load
generator's. ``--streams`` streams (16 per connection) each ask for answer after answer of
``--tokens`` tokens at ``--rate`` tokens/s until ``--minutes`` have passed; answers already
started then finish. Every ``--sample-s`` the server's resident memory (``VmRSS`` in
/proc/PID/status) and open descriptors (/proc/PID/fd) are sampled. Reported:

- ``soak_rss_slope_mb_per_min`` and ``soak_fd_slope_per_min``: least-squares slopes
  (``statistics.linear_regression``) over the samples taken once every stream is running (ramp-up
  and wind-down are left out). Flat means near 0 against the level (``soak_rss_mb_*``).
- ``soak_lost_answers``: answers that did not end with every token, in order (errors included).

Loopback only and bounded (``--minutes``). No baseline: a slope is judged against zero, not
against another stack. Linux only (/proc). ``main(argv)`` returns the figures, so
bench/transport.py can run the soak too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from pydisco._types import GenerationRequest, TokenPiece
from pydisco.cloud import open_cloud_endpoint

from transport import STREAMS_PER_CONNECTION, TOKEN, Child  # the script's own folder is on sys.path


def sample(pid: int) -> tuple[float, int]:
    """(resident MB, open descriptors) of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_min(times_s: Sequence[float], values: Sequence[float]) -> float | None:
    if len(times_s) < 3 or len(set(times_s)) < 2:
        return None
    return statistics.linear_regression([t / 60 for t in times_s], list(values)).slope


class Tally:
    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.lost = 0
        self.errors: dict[str, int] = {}
        self.running_streams = 0


async def stream_loop(cloud: Any, tally: Tally, args: argparse.Namespace, stop_at: float) -> None:
    period = 1.0 / args.rate
    request = GenerationRequest(prompt=json.dumps({"period": period}), max_tokens=args.tokens)
    tally.running_streams += 1
    while trio.current_time() < stop_at:
        got: list[TokenPiece] = []
        tally.started += 1
        try:
            await cloud.generate(request, got.append)
        except Exception as e:  # counted, not raised: a soak reports what it lost
            tally.lost += 1
            key = f"{type(e).__name__}: {getattr(e, 'code', '')}"
            tally.errors[key] = tally.errors.get(key, 0) + 1
            await trio.sleep(period)  # no hot loop against a failing server
            continue
        if [p.position for p in got] == list(range(args.tokens)):
            tally.completed += 1
        else:
            tally.lost += 1
            tally.errors["incomplete"] = tally.errors.get("incomplete", 0) + 1
    tally.running_streams -= 1  # the wind-down is not steady state either


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    child = Child("--child-server", args.scheme)
    try:
        pid = child.process.pid
        tally = Tally()
        samples: list[tuple[float, float, int, bool]] = []  # (s since start, MB, fds, all streams running)
        start = trio.current_time()
        stop_at = start + args.minutes * 60
        connections = -(-args.streams // STREAMS_PER_CONNECTION)

        async def sampler() -> None:
            while True:
                mb, fds = sample(pid)
                samples.append((trio.current_time() - start, mb, fds, tally.running_streams == args.streams))
                await trio.sleep(args.sample_s)

        async def connection(streams: int) -> None:
            async with open_cloud_endpoint(child.url, token=TOKEN, ssl_context=child.trust(), connect_timeout=60) as cloud:
                async with trio.open_nursery() as nursery:
                    for _ in range(streams):
                        nursery.start_soon(stream_loop, cloud, tally, args, stop_at)
                        await trio.sleep(args.ramp_s / args.streams)  # spread the first requests

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler)
            async with trio.open_nursery() as load:
                left = args.streams
                for _ in range(connections):
                    n = min(STREAMS_PER_CONNECTION, left)
                    left -= n
                    load.start_soon(connection, n)
            nursery.cancel_scope.cancel()
    finally:
        child.stop()
    steady = [s for s in samples if s[3]] or samples
    times = [s[0] for s in steady]
    return {
        "scheme": args.scheme,
        "soak_streams": args.streams,
        "soak_minutes": args.minutes,
        "soak_rate_tps_per_stream": args.rate,
        "soak_answers": tally.started,
        "soak_completed_answers": tally.completed,
        "soak_lost_answers": tally.lost,
        "soak_errors": tally.errors,
        "soak_rss_slope_mb_per_min": _round(slope_per_min(times, [s[1] for s in steady])),
        "soak_fd_slope_per_min": _round(slope_per_min(times, [s[2] for s in steady])),
        "soak_rss_mb_start": round(steady[0][1], 1),
        "soak_rss_mb_end": round(steady[-1][1], 1),
        "soak_fd_start": steady[0][2],
        "soak_fd_end": steady[-1][2],
        "soak_samples": len(steady),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--quick", action="store_true", help="a smoke run: 200 streams for 1 minute")
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams (default: 1000)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long new answers are started (default: 10)")
    p.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (default: 20)")
    p.add_argument("--tokens", type=int, default=100, help="tokens per answer (default: 100)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples of the server (default: 5)")
    p.add_argument("--ramp-s", type=float, default=10.0, help="seconds over which the streams start (default: 10)")
    p.add_argument("--scheme", default="ws", help="ws, wss or quic (default: ws)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the soak; the figures (what ``--json`` prints)."""
    args = parser().parse_args(argv)
    if args.quick:
        args.streams, args.minutes, args.sample_s, args.ramp_s = min(args.streams, 200), min(args.minutes, 1.0), 2.0, 5.0
    for name in ("streams", "tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"soak: --{name} must be >= 1")
    if not (args.minutes > 0 and args.rate > 0 and args.sample_s > 0 and args.ramp_s >= 0):
        raise SystemExit("soak: --minutes, --rate and --sample-s must be > 0, --ramp-s >= 0")
    if not sys.platform.startswith("linux"):
        raise SystemExit("soak: needs Linux (/proc) to sample the server")
    return trio.run(soak, args)


def _print_table(f: dict[str, Any]) -> None:
    print(f"soak over {f['scheme']}: {f['soak_streams']} streams at {f['soak_rate_tps_per_stream']:g} tokens/s "
          f"for {f['soak_minutes']:g} min")  # fmt: skip
    print(f"  answers {f['soak_answers']}, complete {f['soak_completed_answers']}, lost {f['soak_lost_answers']}"
          + (f" ({f['soak_errors']})" if f["soak_errors"] else ""))  # fmt: skip
    print(f"  server RSS {f['soak_rss_mb_start']} -> {f['soak_rss_mb_end']} MB, slope {f['soak_rss_slope_mb_per_min']} MB/min")
    print(f"  server fds {f['soak_fd_start']} -> {f['soak_fd_end']}, slope {f['soak_fd_slope_per_min']} /min "
          f"({f['soak_samples']} samples)")  # fmt: skip


if __name__ == "__main__":
    argv = sys.argv[1:]
    figures = main(argv)
    if parser().parse_args(argv).json:
        print(json.dumps(figures, indent=2))
    else:
        _print_table(figures)
