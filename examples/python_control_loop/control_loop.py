"""A fixed-rate Python control loop taking an answer on pydisco's blocking API.

    python control_loop.py [--hz 100] [--max-tokens 32] [--cloud URL --token T] "Obstacle ahead?"

The runtime runs on its own thread (BlockingRuntime). The loop never waits for the model: each
tick sleeps to an absolute deadline (start + k·period), takes whatever the answer's released
ring holds (``pop_many``: no blocking, one call per tick), and does its control work. The
answer's end record says when and how it ended. One JSON line at the end: the text, the finish
reason, and the loop's tick lateness percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import pydisco


def percentile_us(values_ns: list[int], q: float) -> float:
    if not values_ns:
        return 0.0
    ordered = sorted(values_ns)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))] / 1e3


class Controller:
    """Stand-in for the robot's own work: a PID step on a simulated plant."""

    def __init__(self) -> None:
        self.position = self.integral = self.previous_error = 0.0

    def step(self, dt: float, target: float = 1.0) -> None:
        error = target - self.position
        self.integral += error * dt
        derivative = (error - self.previous_error) / dt
        self.previous_error = error
        self.position += (2.0 * error + 0.5 * self.integral + 0.05 * derivative) * dt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Obstacle ahead: stop or steer?")
    parser.add_argument("--hz", type=float, default=100.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0, help="give up after this long")
    parser.add_argument("--cloud", help="a pydisco server URL (default: device only)")
    parser.add_argument("--token", default="")
    args = parser.parse_args()

    config = pydisco.RuntimeConfig(
        device_threads=1,
        cloud_url=args.cloud,
        cloud_token=args.token,
        dispatch="race-both" if args.cloud else "device-only",
        migration="disco-migrate" if args.cloud else "never",
    )
    period_ns = int(1e9 / args.hz)
    controller = Controller()
    lateness: list[int] = []
    text: list[str] = []
    finish = "none"
    with pydisco.BlockingRuntime(config) as rt:
        with rt.stream([{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens) as answer:
            ring = answer.released_ring  # this loop is the answer's reader
            deadline = time.monotonic_ns() + period_ns
            give_up = deadline + int(args.seconds * 1e9)
            while finish == "none" and deadline < give_up:
                time.sleep(max(0, deadline - time.monotonic_ns()) / 1e9)
                lateness.append(time.monotonic_ns() - deadline)
                for token in ring.pop_many(64):  # whatever is there; never blocks
                    if token.is_end:
                        finish = token.finish_reason.name.lower()
                        break
                    text.append(token.text)
                controller.step(period_ns / 1e9)
                deadline += period_ns
                now = time.monotonic_ns()
                if now > deadline:  # overran: skip the missed ticks, keep the grid
                    deadline += ((now - deadline) // period_ns + 1) * period_ns
        report = answer.report
    print(
        json.dumps(
            {
                "text": "".join(text),
                "finish": finish,
                "report_text": report.text,
                "ticks": len(lateness),
                "tick_lateness_p50_us": percentile_us(lateness, 0.5),
                "tick_lateness_p99_us": percentile_us(lateness, 0.99),
            }
        )
    )
    return 0 if finish != "none" else 1


if __name__ == "__main__":
    sys.exit(main())
