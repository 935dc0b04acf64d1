"""Benchmark of embedding pydisco beside a control loop in another process.

    python bench/embedding.py            # a table
    python bench/embedding.py --json     # the figures as JSON
    python bench/embedding.py --quick    # shorter runs (a smoke run)

- ``shm_received_p99_us``: from the pacer's release in this process to a C++ thread in another
  process (examples/shm_control_loop/token_listener, blocked in ShmRingReader::wait), p99, with
  both cores busy (one CPU-bound process per core). Path: pacer (SCHED_FIFO 50, redirected by
  ShmForwarder: it pushes into the shm ring itself) -> listener (SCHED_FIFO 40 when granted).
  The same pacer into an in-process C++ consumer (NativeCollector) is measured beside it.
- ``control_jitter_ratio``: the 100 Hz C++ control loop (examples/shm_control_loop/control_loop)
  reading a shm ring: its tick lateness p99 while a real runtime streams answers into that ring
  back to back (SmolLM2 on the device, one llama.cpp thread), over its p99 with the ring idle.
  Measured with the loop at SCHED_FIFO when granted (how a robot runs its controller) and at
  normal priority.
- ``zenoh_p50_vs_ws``: the zenoh:// transport's per-token p50 (server emit -> client receive,
  the whole stack) over the ws:// transport's, measured in the same run by bench/transport.py
  (alternating rounds, so the shared machine's load falls on both alike); null with the reason
  in ``zenoh_missing`` when the zenoh extra is not installed.

The C++ programs are built with CMake into build/bench-embedding (once; reused after).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from _load import busy_cores, paced_pacer, start_paced  # the script's own folder is on sys.path
from _stats import emit, summary_us

import pydisco
from pydisco import NativeCollector, ShmForwarder, ShmRingProducer

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "shm_control_loop"
BUILD = ROOT / "build" / "bench-embedding"
LISTENER_PRIORITY, LOOP_PRIORITY = 40, 30


def build_examples() -> pathlib.Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        sys.exit("bench/embedding.py: cmake is needed to build the C++ examples")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [cmake, "-S", str(EXAMPLE), "-B", str(BUILD), *generator, "-DCMAKE_BUILD_TYPE=Release", f"-DPYDISCO_SOURCE_DIR={ROOT}"],
        check=True,
        capture_output=True,
    )
    subprocess.run([cmake, "--build", str(BUILD)], check=True, capture_output=True)
    return BUILD


@contextlib.contextmanager
def ring_name(what: str) -> Iterator[str]:
    name = f"pydisco-bench-{what}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        yield name
    finally:
        pydisco.unlink_shm_ring(name)


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def shm_latency(build: pathlib.Path, answers: int, count: int, interval_ns: int, handoff_lead_ns: int | None = None) -> dict[str, Any]:
    """Release -> token_listener in another process, `answers` answers of `count` tokens.
    ``handoff_lead_ns``: the pacer's announcement lead (None: its default; 0: none)."""
    with ring_name("latency") as name, ShmRingProducer(name, capacity=4096) as producer:
        listener = subprocess.Popen(
            [str(build / "token_listener"), name, "--answers", str(answers), "--seconds", "120", "--realtime", str(LISTENER_PRIORITY)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: producer.consumer_attached, 10, "the listener to attach")
            pacer_realtime = False
            for _ in range(answers):
                pacer = paced_pacer(interval_ns, count, handoff_lead_ns)
                forwarder = ShmForwarder(pacer, producer)  # redirected before the first release
                start_paced(pacer, count)
                wait_for(lambda: forwarder.forwarded >= count, 60, "the forwarder")
                pacer_realtime = pacer.statistics().realtime
                pacer.stop()
                forwarder.stop()  # a bare pacer run has no end record: the forwarder adds one
            out, _ = listener.communicate(timeout=60)
        finally:
            listener.kill()
            listener.wait()
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    result["pacer_realtime"] = pacer_realtime
    return result


def inprocess_latency(count: int, interval_ns: int, handoff_lead_ns: int | None = None) -> dict[str, float]:
    """The same pacer into a C++ consumer thread in this process (the in-process reference)."""
    pacer = paced_pacer(interval_ns, count, handoff_lead_ns)
    assert pacer.output is not None
    collector = NativeCollector(pacer.output)  # waiting before the first release
    start_paced(pacer, count)
    wait_for(lambda: collector.consumed >= count, 60, "the collector")
    pacer.stop()
    collector.stop()
    tokens, received = collector.tokens(), collector.received_ns()
    return summary_us([r - t.released_ns for t, r in zip(tokens, received) if not t.is_end])


def control_loop(build: pathlib.Path, ring: str, seconds: float, realtime: bool) -> dict[str, Any]:
    cmd = [str(build / "control_loop"), ring, "--seconds", str(seconds), "--quiet"]
    if realtime:
        cmd += ["--realtime", str(LOOP_PRIORITY)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    summary: dict[str, Any] = lines[-1]["summary"]
    summary["realtime_granted"] = any(e.get("event") == "realtime" and e.get("granted") for e in lines)
    return summary


def control_jitter(build: pathlib.Path, seconds: float, realtime: bool, rounds: int) -> dict[str, Any]:
    """The loop's tick lateness with the ring idle and with a real runtime streaming into it,
    in alternating rounds (which goes first swaps each round); medians over rounds."""
    idle_p99: list[float] = []
    streaming_p99: list[float] = []
    ratios: list[float] = []
    streaming: dict[str, Any] = {}
    for i in range(rounds):
        pair: dict[str, float] = {}
        for which in (("idle", "streaming") if i % 2 == 0 else ("streaming", "idle")):
            if which == "idle":
                pair["idle"] = _idle_loop(build, seconds, realtime)["tick_lateness_p99_us"]
            else:
                streaming = _streaming_loop(build, seconds, realtime)
                pair["streaming"] = streaming["tick_lateness_p99_us"]
        idle_p99.append(pair["idle"])
        streaming_p99.append(pair["streaming"])
        ratios.append(pair["streaming"] / max(pair["idle"], 1e-3))
    return {
        "idle_p99_us": statistics.median(idle_p99),
        "streaming_p99_us": statistics.median(streaming_p99),
        "ratio": statistics.median(ratios),
        "ratio_rounds": ratios,
        "answers_during": streaming["answers"],
        "realtime_granted": streaming["realtime_granted"],
        "missed_ticks": streaming["missed_ticks"],
    }


def _idle_loop(build: pathlib.Path, seconds: float, realtime: bool) -> dict[str, Any]:
    with ring_name("idle") as name, ShmRingProducer(name):
        return control_loop(build, name, seconds, realtime)


def _streaming_loop(build: pathlib.Path, seconds: float, realtime: bool) -> dict[str, Any]:
    with ring_name("streaming") as name:
        publisher = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "answer_publisher.py"), "--ring", name, "--repeat", "0", "--max-tokens", "64", "Tell a story about a robot."],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert publisher.stdout is not None and json.loads(publisher.stdout.readline())["ready"]
            streaming = control_loop(build, name, seconds, realtime)
        finally:
            publisher.kill()
            publisher.wait()
    return streaming


def zenoh_vs_ws(quick: bool) -> dict[str, Any]:
    """bench/transport.py's per-token overhead for ws and zenoh only, in one run of its own."""
    tokens = "300" if quick else "2000"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "transport.py"), "--json", "--no-streams", "--schemes", "ws", "zenoh",
         "--tokens", tokens],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout  # fmt: skip
    figures: dict[str, Any] = json.loads(out)
    ws, zenoh = figures["ws_p50_us"], figures["zenoh_p50_us"]
    return {
        "ws_p50_us": ws,
        "zenoh_p50_us": zenoh,
        "ratio": round(zenoh / ws, 2) if ws and zenoh else None,
        "missing": figures["missing"].get("zenoh"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    build = build_examples()
    answers, count, interval_ns = (1, 100, 2_000_000) if args.quick else (3, 300, 2_000_000)
    seconds = 3.0 if args.quick else 10.0

    with busy_cores(os.cpu_count() or 2):
        # With the pacer's hand-off (its default) and without it, alternating.
        shm = shm_latency(build, answers, count, interval_ns)
        shm_plain = shm_latency(build, answers, count, interval_ns, handoff_lead_ns=0)
        inproc = inprocess_latency(count, interval_ns)
        inproc_plain = inprocess_latency(count, interval_ns, handoff_lead_ns=0)
    rounds = 2 if args.quick else 3
    jitter_rt = control_jitter(build, seconds, realtime=True, rounds=rounds)
    jitter_normal = control_jitter(build, seconds, realtime=False, rounds=rounds)
    zenoh = zenoh_vs_ws(args.quick)

    figures: dict[str, Any] = {
        "shm_received_p50_us": shm["latency_p50_us"],
        "shm_received_p99_us": shm["latency_p99_us"],
        "shm_received_max_us": shm["latency_max_us"],
        "shm_tokens": shm["tokens"],
        "shm_listener_realtime": shm["realtime"],
        "shm_pacer_realtime": shm["pacer_realtime"],
        "shm_received_no_handoff_p99_us": shm_plain["latency_p99_us"],
        "inprocess_received_p99_us": inproc["p99"],
        "inprocess_received_no_handoff_p99_us": inproc_plain["p99"],
        "control_jitter_ratio": jitter_rt["ratio"],
        "control_jitter": {"realtime_loop": jitter_rt, "normal_priority_loop": jitter_normal},
        "control_jitter_ratio_normal_priority": jitter_normal["ratio"],
        "zenoh_p50_vs_ws": zenoh["ratio"],
        "zenoh_p50_us": zenoh["zenoh_p50_us"],
        "ws_p50_us": zenoh["ws_p50_us"],
        "zenoh_missing": zenoh["missing"],
        "load": f"{os.cpu_count()} busy processes (latency); the runtime itself (jitter)",
    }
    rows = [
        ("shm: release -> other process, p50 / p99 / max", f"{shm['latency_p50_us']:.1f} / {shm['latency_p99_us']:.1f} / {shm['latency_max_us']:.1f} µs ({shm['tokens']} tokens, listener SCHED_FIFO {shm['realtime']}, pacer {shm['pacer_realtime']})"),
        ("  without the pacer's hand-off", f"{shm_plain['latency_p50_us']:.1f} / {shm_plain['latency_p99_us']:.1f} / {shm_plain['latency_max_us']:.1f} µs"),
        ("in-process C++ consumer, p99 (without the hand-off)", f"{inproc['p99']:.1f} µs ({inproc_plain['p99']:.1f} µs)"),
        ("100 Hz loop (SCHED_FIFO) tick lateness p99, idle / streaming", f"{jitter_rt['idle_p99_us']:.1f} / {jitter_rt['streaming_p99_us']:.1f} µs -> ratio {jitter_rt['ratio']:.2f} (granted {jitter_rt['realtime_granted']}, {jitter_rt['answers_during']} answers)"),
        ("100 Hz loop (normal) tick lateness p99, idle / streaming", f"{jitter_normal['idle_p99_us']:.1f} / {jitter_normal['streaming_p99_us']:.1f} µs -> ratio {jitter_normal['ratio']:.2f}"),
        ("zenoh transport p50 vs websocket", f"{zenoh['zenoh_p50_us']} / {zenoh['ws_p50_us']} µs -> ratio {zenoh['ratio']}"
         if zenoh["ratio"] is not None else f"not measured: {zenoh['missing']}"),
    ]
    emit(rows, figures, args.json)


if __name__ == "__main__":
    main()
