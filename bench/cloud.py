"""Benchmark of the cloud path's time to first token against llama-cpp-python's own OpenAI
server: the same model, the same threads, chat prompts, both on loopback, in one run.

    python bench/cloud.py            # a table
    python bench/cloud.py --json     # the figures as one JSON object
    python bench/cloud.py --quick    # fewer rounds (a smoke run)

Each server runs in a child process of its own: ``pydisco serve`` (the built-in llama.cpp
backend, plain ``ws://``) and ``python -m llama_cpp.server`` (plain ``http://``), so like is
measured with like (no TLS on either). The client keeps one connection to each (pydisco's
client; httpx with keep-alive) and asks each round a fresh question, to each server in turn,
the order alternating by round; TTFT is from the call to the first piece of text, at the
client. Both servers reuse the cached prefix of the previous prompt (the chat template's system
prompt), as they would serving one user's chat. ``cloud_ttft_vs_llama_server`` is the median of
pydisco's TTFT over the median of llama-cpp-python's (target <= 1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import trio

from _stats import emit  # the script's own folder is on sys.path

from pydisco import GenerationRequest
from pydisco._types import TokenPiece
from pydisco.cloud import open_cloud_endpoint
from pydisco.device import default_model_path
from pydisco.device._llama import llama_cpp_server_command

TOPICS = [
    "volcanoes", "the moon", "bread", "rivers", "bees", "glass", "chess", "rain", "copper", "owls",
    "tides", "salt", "maps", "clocks", "ice", "wind", "paper", "bridges", "coffee", "stars",
    "sand", "whales", "honey", "trains", "snow", "cotton", "lightning", "caves", "tea", "ants",
]


def question(i: int) -> str:
    """A fresh chat question per round (none repeats within a run of len(TOPICS)**2 rounds)."""
    a, b = TOPICS[i % len(TOPICS)], TOPICS[(i // len(TOPICS) + i + 7) % len(TOPICS)]
    return f"In one sentence, how are {a} and {b} alike?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def child(args: list[str], ready: Any, what: str) -> Iterator[None]:
    """A child process, up once ``ready()`` is true; stopped on exit."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within 120 s")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _serves(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base}/models", timeout=1).status_code == 200
    return False


async def openai_ttft(client: httpx.AsyncClient, base: str, text: str, max_tokens: int) -> float:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        first = time.perf_counter()
    if first is None:
        raise RuntimeError("llama-cpp-python's server streamed no text")
    return first - started


async def pydisco_ttft(cloud: Any, text: str, max_tokens: int) -> float:
    first: list[float] = []

    def sink(piece: TokenPiece) -> None:
        if not first and piece.text:
            first.append(time.perf_counter())

    started = time.perf_counter()
    await cloud.generate(GenerationRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens), sink)
    if not first:
        raise RuntimeError("the pydisco server streamed no text")
    return first[0] - started


async def measure(pydisco_url: str, token: str, base: str, rounds: int, max_tokens: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"pydisco": [], "llama_server": []}
    async with open_cloud_endpoint(pydisco_url, token=token) as cloud, httpx.AsyncClient(timeout=60) as client:
        async def one(system: str, text: str) -> float:
            if system == "pydisco":
                return await pydisco_ttft(cloud, text, max_tokens)
            return await openai_ttft(client, base, text, max_tokens)

        for system in times:  # warm-up: load, first-prompt caches
            await one(system, question(10_000))
        for i in range(rounds):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for system in order:
                times[system].append(await one(system, question(i)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="questions per system (default 30; --quick 6)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for each server")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    args = parser.parse_args()
    rounds = args.rounds or (6 if args.quick else 30)
    model = str(default_model_path())
    token = secrets.token_urlsafe(12)
    pydisco_port, llama_port = _free_port(), _free_port()
    pydisco_bin = shutil.which("pydisco", path=os.path.dirname(sys.executable)) or "pydisco"
    base = f"http://127.0.0.1:{llama_port}/v1"
    serve_pydisco = [pydisco_bin, "serve", "--listen", f"ws://127.0.0.1:{pydisco_port}", "--token", token,
                     "--model", model, "--threads", str(args.threads)]  # fmt: skip
    serve_llama = llama_cpp_server_command(sys.executable, "--model", model, "--host", "127.0.0.1", "--port", str(llama_port),
                                           "--n_ctx", "2048", "--n_threads", str(args.threads), "--verbose", "False")  # fmt: skip
    with child(serve_pydisco, lambda: _accepts(pydisco_port), "pydisco serve"), \
         child(serve_llama, lambda: _serves(base), "llama-cpp-python's server"):  # fmt: skip
        times = trio.run(measure, f"ws://127.0.0.1:{pydisco_port}", token, base, rounds, args.max_tokens)
    ours, theirs = statistics.median(times["pydisco"]), statistics.median(times["llama_server"])
    figures: dict[str, Any] = {
        "cloud_ttft_ms": ours * 1e3,
        "llama_server_ttft_ms": theirs * 1e3,
        "cloud_ttft_vs_llama_server": ours / theirs,
        "rounds": rounds,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
    }
    rows = [
        (f"chat TTFT, median of {rounds} fresh questions each (alternating)", "ms"),
        ("  pydisco serve (ws, llama.cpp backend)", f"{ours * 1e3:.1f}"),
        ("  llama-cpp-python's OpenAI server (http)", f"{theirs * 1e3:.1f}"),
        ("  pydisco / llama-cpp-python", f"{ours / theirs:.3f} (target <= 1.0)"),
    ]
    emit(rows, figures, args.json)


if __name__ == "__main__":
    main()
