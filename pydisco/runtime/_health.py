"""Endpoint health: an endpoint that refused, timed out or dropped is *down* for a while.

After a failure that says the endpoint is unavailable (not a refusal of the request itself), the
runtime stops offering it to the dispatch policy for an exponentially growing, jittered time —
``initial_s·2^(k−1)`` after the k-th failure in a row, capped at ``max_s``, times a factor drawn
in ``[1 − jitter, 1 + jitter]`` so many devices that lost one cloud do not come back in step. The
next request after that tries it again; its first token makes it healthy. Time is Trio's clock,
so this runs in virtual time too.
"""

from __future__ import annotations

import dataclasses
import math
import random

import trio


@dataclasses.dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s and 0 <= self.jitter < 1):
            raise ValueError("backoff needs 0 < initial_s <= max_s and 0 <= jitter < 1")

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** (failures - 1))
        return base * (1.0 + self.jitter * rng.uniform(-1.0, 1.0))


class EndpointHealth:
    """One endpoint's availability as this runtime has seen it."""

    def __init__(self, backoff: Backoff, rng: random.Random) -> None:
        self._backoff = backoff
        self._rng = rng
        self.failures = 0  # availability failures in a row
        self.down_until = -math.inf  # Trio time

    def failed(self) -> None:
        self.failures += 1
        self.down_until = trio.current_time() + self._backoff.delay(self.failures, self._rng)

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = -math.inf

    @property
    def down(self) -> bool:
        return trio.current_time() < self.down_until


class Health:
    """The health of every endpoint of a runtime."""

    def __init__(self, names: list[str], backoff: Backoff, seed: int | None = None) -> None:
        rng = random.Random(seed)
        self._endpoints = {name: EndpointHealth(backoff, rng) for name in names}

    def __getitem__(self, name: str) -> EndpointHealth:
        return self._endpoints[name]

    def down(self, name: str) -> bool:
        health = self._endpoints.get(name)
        return health is not None and health.down

    def usable(self, names: list[str]) -> list[str]:
        """``names`` without the endpoints that are down — unless all are (then try them all:
        a guess beats refusing the answer)."""
        up = [n for n in names if not self.down(n)]
        return up or names
