"""The runtime's side of a control loop in another process: answer prompts and deliver each
answer into a named shared-memory ring, where ``control_loop`` (C++, this folder) reads it.

    python answer_publisher.py --ring robot-answers "Obstacle ahead: what now?"
    python answer_publisher.py --ring robot-answers --cloud wss://host:8443 --token T ...
    python answer_publisher.py --ring robot-answers --stdin        # one prompt per line

Without --cloud the device model answers alone. It prints one JSON line when it is ready
(runtime loaded, ring created) and one per answer (its text, token count, finish reason), so a
supervisor can check what the control loop received. Kill it and start it again: the loop
re-attaches to the new generation by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import pydisco
from pydisco.policies import Slo
from pydisco.runtime import forward_to_shm_blocking


def prompts(args: argparse.Namespace) -> Iterator[str]:
    if args.stdin:
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    round_ = 0
    while args.repeat == 0 or round_ < args.repeat:
        yield from args.prompt
        round_ += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="*", default=["Name three colours."])
    parser.add_argument("--ring", required=True, help="shared-memory ring name")
    parser.add_argument("--capacity", type=int, default=1024, help="ring capacity in records")
    parser.add_argument("--cloud", help="a pydisco server URL (default: device only)")
    parser.add_argument("--token", default="", help="the cloud's bearer token")
    parser.add_argument("--rate", type=float, default=0.0, help="pace at this many tokens/s (0: as generated)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the prompts (0: forever)")
    parser.add_argument("--stdin", action="store_true", help="read prompts from stdin instead")
    args = parser.parse_args()

    config = pydisco.RuntimeConfig(
        device_model="default",
        device_threads=1,
        cloud_url=args.cloud,
        cloud_token=args.token,
        dispatch="race-both" if args.cloud else "device-only",
        migration="disco-migrate" if args.cloud else "never",
        slo=Slo(reading_rate=args.rate if args.rate > 0 else 4.5),
        pace=args.rate > 0,
    )
    try:
        producer = pydisco.ShmRingProducer(args.ring, args.capacity)
    except pydisco.ShmRingError as e:
        print(f"answer_publisher: {e}", file=sys.stderr)
        return 2
    with producer, pydisco.BlockingRuntime(config) as rt:
        print(json.dumps({"ready": True, "ring": producer.name, "generation": producer.generation}), flush=True)
        for prompt in prompts(args):
            with rt.stream([{"role": "user", "content": prompt}], max_tokens=args.max_tokens) as answer:
                forward_to_shm_blocking(answer, producer)
            report = answer.report
            print(json.dumps({"text": report.text, "tokens": report.tokens, "finish": report.finish_reason}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
