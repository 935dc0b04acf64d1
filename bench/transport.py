"""Benchmark of the cloud transports on loopback, next to bare trio-websocket measured in the same run.

    python bench/transport.py            # a table
    python bench/transport.py --json     # the figures as one JSON object
    python bench/transport.py --quick    # fewer tokens and a lower stream cap (a smoke run)

Every network scheme the transport registry can load is measured (ws, wss, quic, third-party
ones); a registered scheme that does not load here is reported as missing (null), never guessed.

1. Per-token overhead, server emit -> client receive. A pydisco server runs in a child process
   with a stub backend that emits a token every ``--period-ms`` and writes the emit instant
   (``time.monotonic_ns``, one clock for both processes on one host) into the token's text; a
   ``CloudEndpoint`` in this process receives it. So the figure is the whole stack: server
   protocol and writer task, transport, client reader and dispatch, up to the sink. The baseline
   is the same pacing over bare trio-websocket: one small msgpack message per token, like with
   like — the plain schemes (``ws``, ``zenoh``) against bare WebSocket, the TLS ones (``wss``, ``quic``) against bare
   WebSocket over TLS.
2. Sustained concurrent streams at a reading pace. The stub emits ``--rate`` (20) tokens/s per
   stream on absolute deadlines, from one clock task for every stream (as a batched engine's
   step loop; at most 0.5 ms late, which the lag counts), each stream starting at a random phase within one period (as
   independent clients do; ``--aligned`` puts every stream on one shared step clock instead, as
   a batched engine's decode steps do). Each stream's reader is paced like the runtime's, at a
   rate drawn from ``--read-rate`` (5-15 tokens/s): the client announces it in ``generate`` and
   sends ``reader_report`` frames when its reader drifts, as a real device does. K streams (16
   per connection) run for ``--stream-tokens`` tokens; every token's lag (receive - scheduled
   emit, one clock on one host) is measured. K is held when the p99 lag is at most
   ``--max-lag-ms`` (100) and no token is missing; K doubles from 16 until it is not (or
   ``--max-cap``), then bisects. Each trial reports the CPU share (CPU seconds per wall second;
   1.0 is one core) of the server process and of this one, the load generator.
3. ``--soak``: runs ``bench/soak.py``'s ``main(["--json", ...])`` when that file exists (it
   prints one JSON object, or returns a dict) and copies ``soak_rss_slope_mb_per_min`` and
   ``soak_lost_answers`` from it; without it those keys are null and ``soak_missing`` says why.

``--quick`` (a smoke run, under two minutes): 300 overhead tokens, 30-token streams, a stream
cap of 256, and only ws, wss and quic unless ``--schemes`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import itertools
import json
import math
import os
import pathlib
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio
import trio_websocket

from pydisco import transports
from pydisco.cloud import open_cloud_endpoint
from pydisco.cloud import RunningServer, ServerConfig, serve
from pydisco.cloud import Credentials, client_ssl_context, self_signed, server_ssl_context
from pydisco._types import GenerationRequest, GenerationResult, ReaderState, TokenPiece, TokenSink

from _stats import percentile  # the script's own folder is on sys.path

TOKEN = "bench"
PLAIN = ("ws", "zenoh")  # schemes without TLS; every other network scheme gets the throwaway certificate
STREAMS_PER_CONNECTION = 16
BENCH_DIR = pathlib.Path(__file__).resolve().parent


# -- the child process: a server with a stub token source ----------------------------------------


class PacedStub:
    """Tokens on absolute deadlines; the request's prompt says the period. Each token's text is
    ``"<emit monotonic ns> <scheduled monotonic ns>"``.

    For the stream test (``shared_clock`` in the plan) one clock task (``run``) emits every
    stream's tokens, as a batched engine's step loop calls every answer's sink from one loop: a
    timer per stream would cost the token source more CPU than the server it is measuring. It
    wakes at the earliest deadline, at most once per ``MIN_TICK_S``, and emits every token then
    due, so a token leaves at most that much late (it is stamped with both instants: the lag
    counts it). The per-token overhead test keeps a timer in each answer's own task."""

    model_id = "bench-stub"
    MIN_TICK_S = 0.0005

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _StubStream]] = []  # a heap of (deadline, order, stream)
        self._order = itertools.count()
        self._added = trio.Event()

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        plan = json.loads(request.prompt or "{}")
        period = plan.get("period", 0.001)
        start = trio.current_time() + plan.get("phase", 0.0) * period
        if plan.get("aligned"):  # one step clock for every stream, as a batched engine's steps
            start = math.ceil(start / period) * period
        if not plan.get("shared_clock"):  # the per-token overhead: each token from its answer's own task
            for k in range(request.max_tokens):
                deadline = start + k * period
                await trio.sleep_until(deadline)
                sink(_stamped(k, deadline, trio.current_time(), time.monotonic_ns()))
            return GenerationResult("length", 0, 0, request.max_tokens)
        stream = _StubStream(sink, start, period, request.max_tokens)
        if stream.total:
            self._push(stream)
            try:
                await stream.finished.wait()
            finally:
                stream.cancelled = True  # the clock drops it at its next deadline
        return GenerationResult("length", 0, 0, request.max_tokens)

    def _push(self, stream: _StubStream) -> None:
        heapq.heappush(self._due, (stream.next_deadline(), next(self._order), stream))
        self._added.set()

    async def run(self) -> None:
        last = -math.inf
        while True:
            if not self._due:
                self._added = trio.Event()
                await self._added.wait()
            await trio.sleep_until(max(self._due[0][0], last + self.MIN_TICK_S))
            now = last = trio.current_time()
            now_ns = time.monotonic_ns()
            while self._due and self._due[0][0] <= now:
                deadline, _, stream = heapq.heappop(self._due)
                if stream.cancelled:
                    continue
                stream.sink(_stamped(stream.sent, deadline, now, now_ns))
                stream.sent += 1
                if stream.sent < stream.total:
                    heapq.heappush(self._due, (stream.next_deadline(), next(self._order), stream))
                else:
                    stream.finished.set()


def _stamped(position: int, deadline: float, now: float, now_ns: int) -> TokenPiece:
    """Token ``position`` emitted at ``now`` (Trio's clock; ``now_ns`` the monotonic one) for
    ``deadline``: its text is ``"<emit ns> <scheduled ns>"`` on the monotonic clock."""
    return TokenPiece(position, position, f"{now_ns} {now_ns - int((now - deadline) * 1e9)}")


@dataclasses.dataclass(eq=False)
class _StubStream:
    sink: TokenSink
    start: float
    period: float
    total: int
    sent: int = 0
    cancelled: bool = False
    finished: trio.Event = dataclasses.field(default_factory=trio.Event)

    def next_deadline(self) -> float:
        return self.start + self.sent * self.period


async def child_server(scheme: str, cert_dir: str) -> None:
    ssl_context = None
    if scheme not in PLAIN:
        credentials = self_signed()
        credentials.write(cert_dir)
        ssl_context = server_ssl_context(credentials)
    stub = PacedStub()
    config = ServerConfig(
        listen=[f"{scheme}://127.0.0.1:0"],
        tokens=[TOKEN],
        backend=stub,
        ssl_context=ssl_context,
        parallel=100_000,
        max_queue=0,
        max_streams_per_connection=STREAMS_PER_CONNECTION,
        freeze_gc=True,  # as a deployed server (one per process) runs
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub.run)
        server: RunningServer = await nursery.start(serve, config)
        print(json.dumps({"url": server.urls[0]}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)  # until the parent closes stdin
        nursery.cancel_scope.cancel()


async def child_baseline(period: float, tls: bool, cert_dir: str) -> None:
    """Bare trio-websocket (over TLS with ``tls``): for each request "<n>", n small msgpack
    messages, paced; "done" ends."""
    ssl_context = None
    if tls:
        credentials = self_signed()
        credentials.write(cert_dir)
        ssl_context = server_ssl_context(credentials)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        while (message := await ws.get_message()) != b"done":
            start = trio.current_time()
            for k in range(int(message)):
                await trio.sleep_until(start + k * period)
                await ws.send_message(msgpack.packb({"t": "token", "pos": k, "id": k, "text": "x" * 30,
                                                     "tg": time.monotonic_ns()}))  # fmt: skip

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context)
        print(json.dumps({"url": f"{'wss' if tls else 'ws'}://127.0.0.1:{server.port}/"}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


# -- the parent: clients and measurements ------------------------------------------------------


class Child:
    """A child process that prints one JSON line with its URL, and stops when stdin closes."""

    def __init__(self, *args: str) -> None:
        self.cert_dir = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"pydisco-bench-{os.getpid()}-{id(self)}"
        self.cert_dir.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, __file__, *args, "--cert-dir", str(self.cert_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark child {args} did not start")
        self.url: str = json.loads(line)["url"]

    def trust(self) -> Any:
        cert = self.cert_dir / "cert.pem"
        return client_ssl_context(Credentials(cert.read_bytes(), b"")) if cert.exists() else None

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for f in self.cert_dir.glob("*"):
            f.unlink()
        self.cert_dir.rmdir()


async def baseline_round(ws: trio_websocket.WebSocketConnection, count: int, delays: list[float]) -> None:
    await ws.send_message(str(count).encode())
    for _ in range(count):
        message = await ws.get_message()
        received = time.monotonic_ns()
        delays.append(received - msgpack.unpackb(message)["tg"])


def baseline_for(scheme: str) -> str:
    """Like with like: a scheme without TLS against bare ws, one with TLS against bare wss."""
    return "ws" if scheme in PLAIN else "wss"


def _request(tokens: int, period: float, phase: float = 0.0, aligned: bool = False, shared_clock: bool = False) -> GenerationRequest:
    plan = {"period": period, "phase": phase, "aligned": aligned, "shared_clock": shared_clock}
    return GenerationRequest(prompt=json.dumps(plan), max_tokens=tokens)


async def stack_round(cloud: Any, count: int, period: float, delays: list[float]) -> None:
    def sink(piece: TokenPiece) -> None:
        received = time.monotonic_ns()
        delays.append(received - int(piece.text.split()[0]))

    await cloud.generate(_request(count, period), sink)


class PacedReader:
    """A stream's sink as the runtime's paced reader looks to the client: it reads ``rate``
    tokens/s from when the first token arrived (``reader_state``, so the client announces the
    rate and reports drift), and records each token's lag behind its scheduled emit."""

    def __init__(self, rate: float, lags: list[float]) -> None:
        self.rate = rate
        self.lags = lags
        self.received = 0
        self.first = 0.0

    def __call__(self, piece: TokenPiece) -> None:
        now = time.monotonic_ns()
        if self.received == 0:
            self.first = now / 1e9
        self.received += 1
        self.lags.append((now - int(piece.text.split()[1])) / 1e9)

    def reader_state(self) -> ReaderState:
        read = int(self.rate * (time.monotonic() - self.first)) if self.received else 0
        return ReaderState(max(0, self.received - read), self.rate)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), or NaN."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def streams_keep_up(child: Child, k: int, rate: float, tokens: int, *, max_lag: float,
                          read_rates: tuple[float, float] = (5.0, 15.0), aligned: bool = False,
                          seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Run k concurrent streams; kept up (p99 lag <= max_lag, nothing missing), p99 lag in s,
    tokens missing, errors seen, and the CPU shares of server and load generator."""
    period = 1.0 / rate
    rng = random.Random(seed * 1_000_003 + k)
    lags: list[float] = []
    missing = 0
    errors: list[str] = []

    async def one(cloud: Any, phase: float) -> None:
        nonlocal missing
        reader = PacedReader(rng.uniform(*read_rates), lags)
        try:
            await cloud.generate(_request(tokens, period, phase, aligned, shared_clock=True), reader)
        except Exception as e:  # a refused or broken stream counts as falling behind
            missing += tokens - reader.received
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    connections = math.ceil(k / STREAMS_PER_CONNECTION)
    budget = tokens * period + 20.0
    cpu: dict[str, float] = {}
    with trio.move_on_after(budget):
        async with trio.open_nursery() as nursery:
            clouds = []
            for _ in range(connections):
                cloud = await nursery.start(_hold_endpoint, child)
                await cloud.generate(_request(1, period), lambda p: None)  # connected before timing
                clouds.append(cloud)
            server0, own0, wall0 = _cpu_seconds(child.process.pid), _own_cpu_seconds(), time.monotonic()
            async with trio.open_nursery() as streams:
                for i in range(k):
                    streams.start_soon(one, clouds[i // STREAMS_PER_CONNECTION], rng.random())
            wall = time.monotonic() - wall0
            cpu = {"server": (_cpu_seconds(child.process.pid) - server0) / wall, "client": (_own_cpu_seconds() - own0) / wall}
            nursery.cancel_scope.cancel()
    missing += max(0, k * tokens - len(lags) - missing)
    p99 = percentile(lags, 99) if lags else math.inf
    return {"streams": k, "kept_up": missing == 0 and p99 <= max_lag, "p99_lag_ms": round(p99 * 1e3, 2),
            "p50_lag_ms": round(percentile(lags, 50) * 1e3, 2) if lags else None, "missing": missing,
            "errors": sorted(set(errors)), "cpu_share_server": _round(cpu.get("server")),
            "cpu_share_client": _round(cpu.get("client"))}  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 3)


async def _hold_endpoint(child: Child, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_cloud_endpoint(child.url, token=TOKEN, ssl_context=child.trust()) as cloud:
        task_status.started(cloud)
        await trio.sleep_forever()


async def max_streams(child: Child, args: argparse.Namespace) -> tuple[int, list[dict[str, Any]]]:
    """The most streams held (see streams_keep_up), and every trial."""
    trials: list[dict[str, Any]] = []

    async def trial(k: int) -> bool:
        result = await streams_keep_up(child, k, args.rate, args.stream_tokens, max_lag=args.max_lag_ms / 1e3,
                                       read_rates=(args.read_rate[0], args.read_rate[1]), aligned=args.aligned)  # fmt: skip
        trials.append(result)
        return bool(result["kept_up"])

    good, bad = 0, None
    k = min(16, args.max_cap)
    while k <= args.max_cap:
        if await trial(k):
            good, k = k, k * 2
        else:
            bad = k
            break
    if bad is not None:
        for _ in range(3):  # bisect between the last pass and the first failure
            if bad - good <= max(1, good // 8):
                break
            mid = (good + bad) // 2
            if await trial(mid):
                good = mid
            else:
                bad = mid
    return good, trials


def network_schemes(requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """Schemes to measure, and the registered ones that do not load here (with why)."""
    usable, missing = [], {}
    for scheme in requested or transports.known_schemes():
        if scheme == "memory":
            continue  # in-process, not a wire
        try:
            transports.get_transport(scheme)
        except transports.UnknownTransportError as e:
            missing[scheme] = str(e)
            continue
        usable.append(scheme)
    return usable, missing


async def run(args: argparse.Namespace) -> dict[str, Any]:
    period = args.period_ms / 1e3
    figures: dict[str, Any] = {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "period_ms": args.period_ms,
        "stream_rate_tok_s": args.rate,
        "stream_tokens": args.stream_tokens,
        "max_streams_cap": args.max_cap,
        "max_lag_ms": args.max_lag_ms,
        "read_rate_tok_s": list(args.read_rate),
        "aligned_steps": args.aligned,
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
    }
    schemes, missing = network_schemes(args.schemes)
    figures["missing"] = missing
    for scheme in ("ws", "wss", "quic", *schemes):
        figures[f"{scheme}_p50_us"] = figures[f"{scheme}_p99_us"] = figures[f"max_streams_{scheme}"] = None
        figures[f"{scheme}_p50_vs_baseline"] = None
        figures[f"cpu_share_server_{scheme}"] = figures[f"cpu_share_client_{scheme}"] = None
    children = {scheme: Child("--child-server", scheme) for scheme in schemes}
    baselines = {name: Child("--child-baseline", str(period), *(["--tls"] if name == "wss" else [])) for name in ("ws", "wss")}
    try:
        # Overhead: rounds alternate between the baselines and every scheme, so a change in the
        # machine's load (it is shared) falls on all of them alike.
        delays: dict[str, list[float]] = {**{f"baseline_{b}": [] for b in baselines}, **{s: [] for s in schemes}}
        per_round = max(1, args.tokens // args.rounds)
        async with contextlib.AsyncExitStack() as stack:
            bare = {
                name: await stack.enter_async_context(trio_websocket.open_websocket_url(child.url, ssl_context=child.trust()))
                for name, child in baselines.items()
            }
            clouds = {}
            for scheme, child in children.items():
                clouds[scheme] = await stack.enter_async_context(
                    open_cloud_endpoint(child.url, token=TOKEN, ssl_context=child.trust())
                )
                await clouds[scheme].generate(_request(8, period), lambda p: None)  # connected, warm
            for ws in bare.values():
                await baseline_round(ws, 8, [])
            for _ in range(args.rounds):
                for name, ws in bare.items():
                    await baseline_round(ws, per_round, delays[f"baseline_{name}"])
                for scheme, cloud in clouds.items():
                    await stack_round(cloud, per_round, period, delays[scheme])
            for ws in bare.values():
                await ws.send_message(b"done")
        for key, values in delays.items():
            figures[f"{key}_p50_us"] = round(percentile(values, 50) / 1e3, 1)
            figures[f"{key}_p99_us"] = round(percentile(values, 99) / 1e3, 1)
            figures[f"{key}_max_us"] = round(max(values) / 1e3, 1)
        for scheme in schemes:
            base = baseline_for(scheme)
            figures[f"{scheme}_baseline"] = f"bare {base}"
            figures[f"{scheme}_p50_vs_baseline"] = round(figures[f"{scheme}_p50_us"] / figures[f"baseline_{base}_p50_us"], 2)
        figures["stream_trials"] = {}
        if not args.no_streams:
            for scheme, child in children.items():
                best, trials = await max_streams(child, args)
                figures[f"max_streams_{scheme}"] = best
                figures["stream_trials"][scheme] = trials
                held = [t for t in trials if t["streams"] == best]
                if held:  # the CPU it took to hold them
                    figures[f"cpu_share_server_{scheme}"] = held[-1]["cpu_share_server"]
                    figures[f"cpu_share_client_{scheme}"] = held[-1]["cpu_share_client"]
    finally:
        for child in (*baselines.values(), *children.values()):
            child.stop()
    figures["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return figures


def print_table(figures: dict[str, Any]) -> None:
    print(f"per-token overhead, server emit -> client receive ({figures['tokens']} tokens in {figures['rounds']} "
          f"alternating rounds, one per {figures['period_ms']} ms; {figures['cpus']} CPUs, load "
          f"{figures['load_avg_1min_before']} -> {figures['load_avg_1min_after']})")  # fmt: skip
    for base in ("ws", "wss"):
        print(f"  {'bare trio-websocket ' + base:<24} p50 {figures[f'baseline_{base}_p50_us']:>8} us"
              f"   p99 {figures[f'baseline_{base}_p99_us']:>8} us   max {figures[f'baseline_{base}_max_us']:>10} us")  # fmt: skip
    schemes = [k[: -len("_p50_us")] for k in figures if k.endswith("_p50_us") and not k.startswith("baseline")]
    for s in schemes:
        p50, p99 = figures[f"{s}_p50_us"], figures[f"{s}_p99_us"]
        if p50 is None and s not in figures["missing"]:
            continue  # not asked for (--schemes)
        if p50 is None:
            print(f"  {'pydisco ' + s:<24} missing: {figures['missing'][s]}")
        else:
            ratio = figures.get(f"{s}_p50_vs_baseline")
            print(f"  {'pydisco ' + s:<24} p50 {p50:>8} us   p99 {p99:>8} us   max {figures[f'{s}_max_us']:>10} us"
                  f"   (p50 {ratio}x {figures.get(f'{s}_baseline')})")  # fmt: skip
    print(f"sustained streams at {figures['stream_rate_tok_s']} tok/s each (readers at {figures['read_rate_tok_s']} "
          f"tok/s{', aligned steps' if figures['aligned_steps'] else ''}), {figures['stream_tokens']} tokens, "
          f"held while p99 lag <= {figures['max_lag_ms']} ms (cap {figures['max_streams_cap']}); "
          f"CPU share: 1.0 = one core")  # fmt: skip
    if figures.get("soak_missing"):
        print(f"soak: {figures['soak_missing']}")
    else:
        print(f"soak: RSS slope {figures.get('soak_rss_slope_mb_per_min')} MB/min, "
              f"answers lost {figures.get('soak_lost_answers')}")  # fmt: skip
    if not figures["stream_trials"]:
        print("  (sustained streams skipped)")
        return
    for s in schemes:
        best = figures[f"max_streams_{s}"]
        if best is None and s not in figures["stream_trials"]:
            continue
        print(f"  {s:<8} max streams held: {'not measured' if best is None else best}"
              f"   (CPU share there: server {figures.get(f'cpu_share_server_{s}')}, "
              f"load generator {figures.get(f'cpu_share_client_{s}')})")  # fmt: skip
        for t in figures["stream_trials"].get(s, []):
            print(f"           {t['streams']:>5} streams: p99 lag {t['p99_lag_ms']:>8} ms, missing {t['missing']}, "
                  f"CPU server {t['cpu_share_server']} client {t['cpu_share_client']}"
                  f"{'' if t['kept_up'] else '  <- behind'}{'  ' + '; '.join(t['errors']) if t['errors'] else ''}")  # fmt: skip


SOAK_KEYS = ("soak_rss_slope_mb_per_min", "soak_lost_answers")


def soak_figures(quick: bool) -> dict[str, Any]:
    """bench/soak.py's figures (its ``main(["--json", ...])`` prints one JSON object or returns
    a dict), or null ones saying why there are none."""
    figures: dict[str, Any] = dict.fromkeys(SOAK_KEYS)
    if not (BENCH_DIR / "soak.py").exists():
        figures["soak_missing"] = "bench/soak.py does not exist in this checkout"
        return figures
    import importlib
    import io

    captured = io.StringIO()
    try:
        soak = importlib.import_module("soak")
        with contextlib.redirect_stdout(captured):
            returned = soak.main(["--json", *(["--quick"] if quick else [])])
    except (Exception, SystemExit) as e:  # its failure is reported, not ours
        figures["soak_missing"] = f"bench/soak.py failed: {type(e).__name__}: {e}"
        return figures
    result = returned if isinstance(returned, dict) else _last_json_object(captured.getvalue())
    if result is None:
        figures["soak_missing"] = "bench/soak.py printed no JSON object"
        return figures
    figures.update({key: result.get(key) for key in SOAK_KEYS})
    figures["soak"] = result
    absent = [key for key in SOAK_KEYS if result.get(key) is None]
    if absent:
        figures["soak_missing"] = f"bench/soak.py did not report {', '.join(absent)}"
    return figures


def _last_json_object(text: str) -> dict[str, Any] | None:
    """The last JSON object printed in ``text`` (progress lines may come before it)."""
    decoder, found, start = json.JSONDecoder(), None, text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            found = value
        start = text.find("{", end)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--quick", action="store_true", help="a smoke run (under two minutes): fewer tokens, stream cap 256, ws/wss/quic")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per scheme for the overhead measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds the tokens are split into")
    parser.add_argument("--period-ms", type=float, default=1.0, help="token period for the overhead measurement")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream in the concurrency test")
    parser.add_argument("--read-rate", type=float, nargs=2, default=[5.0, 15.0], metavar=("LOW", "HIGH"),
                        help="each stream's reader reads at a rate drawn from [LOW, HIGH] tokens/s")
    parser.add_argument("--max-lag-ms", type=float, default=100.0, help="p99 token lag at which streams count as held")
    parser.add_argument("--aligned", action="store_true", help="every stream on one step clock (a batched engine)")
    parser.add_argument("--stream-tokens", type=int, default=60, help="tokens per stream in the concurrency test")
    parser.add_argument("--max-cap", type=int, default=2048, help="stop doubling streams here")
    parser.add_argument("--soak", action="store_true", help="also run bench/soak.py (when it exists)")
    parser.add_argument("--schemes", nargs="*", help="only these schemes (default: every loadable one)")
    parser.add_argument("--no-streams", action="store_true", help="skip the concurrency test")
    parser.add_argument("--child-server", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", help=argparse.SUPPRESS)
    parser.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cert-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_server:
        trio.run(child_server, args.child_server, args.cert_dir)
        return 0
    if args.child_baseline:
        trio.run(child_baseline, float(args.child_baseline), args.tls, args.cert_dir)
        return 0
    for name in ("tokens", "rounds", "stream_tokens", "max_cap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.rate > 0 and args.max_lag_ms > 0 and 0 < args.read_rate[0] <= args.read_rate[1]):
        parser.error("--rate and --max-lag-ms must be > 0, and --read-rate LOW HIGH with 0 < LOW <= HIGH")
    if args.quick:
        args.tokens, args.stream_tokens, args.max_cap = min(args.tokens, 300), min(args.stream_tokens, 30), min(args.max_cap, 256)
        if args.schemes is None:
            args.schemes = ["ws", "wss", "quic"]
    figures = trio.run(run, args)
    figures.update(soak_figures(args.quick) if args.soak else {"soak_rss_slope_mb_per_min": None, "soak_lost_answers": None,
                                                              "soak_missing": "not run (no --soak)"})  # fmt: skip
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
