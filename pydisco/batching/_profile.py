"""The step profile a loop learns as it runs: decode-step latency per batch size, and what a
prefill token adds to a step, as exponentially weighted averages of the steps it timed."""

from __future__ import annotations

import threading

from ..policies._step import StepProfile

_WEIGHT = 0.1  # of the newest sample


class LearnedStepProfile:
    """Starts from ``initial`` (a measured profile, or a rough guess) and follows what it sees.
    Safe to read from any thread (``current()``)."""

    def __init__(self, initial: StepProfile, max_batch: int) -> None:
        self._decode = [initial.decode(b) for b in range(1, max_batch + 1)]
        self._prefill = initial.prefill_s_per_token
        self._lock = threading.Lock()
        self._profile = initial
        self._rebuilt = False  # _profile is the table's, not ``initial`` as given

    def record(self, batch: int, prefill_tokens: int, seconds: float) -> None:
        """One step of ``batch`` decodes and ``prefill_tokens`` prefill tokens took ``seconds``."""
        if batch < 1 and prefill_tokens < 1:
            return
        with self._lock:
            if prefill_tokens == 0:
                if batch <= len(self._decode):
                    old = self._decode[batch - 1]
                    self._decode[batch - 1] += _WEIGHT * (seconds - old)
                    changed = self._decode[batch - 1] != old
                else:
                    changed = False
            else:
                decode = self._decode[min(batch, len(self._decode)) - 1] if batch else 0.0
                per_token = max(0.0, seconds - decode) / prefill_tokens
                old = self._prefill
                self._prefill += _WEIGHT * (per_token - old)
                changed = self._prefill != old
            # A step that took what the profile says changes nothing (every decode step of a
            # simulated engine): rebuilding the table, O(max_batch), would give the same profile.
            if not changed and self._rebuilt:
                return
            self._rebuilt = True
            # Larger batches never step faster than smaller ones: keep the table monotone.
            table = list(self._decode)
            for b in range(1, len(table)):
                table[b] = max(table[b], table[b - 1])
            self._profile = StepProfile(decode_s=tuple(max(1e-6, x) for x in table), prefill_s_per_token=self._prefill)

    def current(self) -> StepProfile:
        with self._lock:
            return self._profile
