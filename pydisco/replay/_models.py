"""Endpoint models calibrated from measurements: what a simulated device, server and last hop
take, as plain frozen records (no clock, no Trio). The endpoints that act on them are in
``_endpoints.py``.

- :class:`DeviceModel`: the device's measured profile (``TTFT = a + c·l``, decode seconds per
  token), its context, and the power it draws (energy per token = seconds per token × watts).
- :class:`ServerModel`: a batched server: per-request API overhead from measured TTFT samples
  (llmperf records), a decode step whose latency grows with the batch (calibrated so the step at
  the measured concurrency equals the measured inter-token median), a prefill cost per token, a
  batch limit and a KV capacity, run by a step scheduler (``fcfs``, ``andes``, ...).
- :class:`LastHop`: the link emulator's profiles (latency, jitter, loss, bandwidth) for each
  direction, and :class:`Outages` (a seeded schedule of link cuts).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import pathlib
import random
import statistics

from .._errors import ConfigurationError
from ..linkemu import TCP_SEGMENT, LinkProfile
from ..policies._step import StepProfile
from ..workloads import ServerTtftSamples

__all__ = ["DeviceModel", "LastHop", "Outages", "ServerModel"]

# SmolLM2-135M Q4_1 on this project's 2-core machines, quiet (../shared/reference/measurements.md:
# TTFT of a short prompt ~20 ms, cold chat prompts ~95 ms for ~100 tokens, decode ~124 tokens/s).
# Used only when no measured profile is cached (`pydisco profile` measures one).
SMOLLM2_FALLBACK = dict(prefill_a_s=0.02, prefill_c_s_per_token=0.00075, decode_s_per_token=0.008)
SMOLLM2_CONTEXT = 2048  # the device engine's default n_ctx


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """A device: ``TTFT(l) = prefill_a_s + prefill_c_s_per_token·l`` from an empty cache,
    ``decode_s_per_token`` after the first token, ``context_tokens`` of KV (a request whose prompt
    and answer do not fit is refused, as the real engine refuses it), and ``watts`` drawn while
    it computes. ``source`` says where the figures come from (a profile file, or the fallback)."""

    prefill_a_s: float
    prefill_c_s_per_token: float
    decode_s_per_token: float
    context_tokens: int = SMOLLM2_CONTEXT
    watts: float = 3.0  # a phone SoC running a small model flat out (assumed, not measured here)
    source: str = "given"

    def __post_init__(self) -> None:
        if not (self.prefill_a_s >= 0 and self.prefill_c_s_per_token >= 0 and self.decode_s_per_token > 0):
            raise ConfigurationError("a device model needs a, c >= 0 and a decode time > 0")
        if self.context_tokens < 2 or not self.watts >= 0:
            raise ConfigurationError("a device model needs context_tokens >= 2 and watts >= 0")

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_a_s + self.prefill_c_s_per_token * tokens

    def energy_j(self, prefilled: int, decoded: int) -> float:
        """Joules for this much work: seconds per token × watts."""
        return self.watts * (self.prefill_c_s_per_token * prefilled + self.decode_s_per_token * decoded)

    def step_profile(self, max_batch: int) -> StepProfile:
        """Decode latency per batch size for a device serving several answers at once (the
        multi-stream engine's shape: ``pydisco.batching.rough_profile``)."""
        from ..batching import rough_profile

        return rough_profile(self.decode_s_per_token, self.prefill_c_s_per_token, max_batch)

    @classmethod
    def from_profile(cls, profile: object, *, context_tokens: int = SMOLLM2_CONTEXT, watts: float = 3.0,
                     source: str = "profile") -> DeviceModel:
        """From a ``pydisco.device.DeviceProfile`` (or anything with its three fields)."""
        return cls(
            float(getattr(profile, "prefill_a_s")), float(getattr(profile, "prefill_c_s_per_token")),
            float(getattr(profile, "decode_s_per_token")), context_tokens, watts, source,
        )  # fmt: skip

    @classmethod
    def from_file(cls, path: str | pathlib.Path, **kw: object) -> DeviceModel:
        """From a profile JSON file as ``pydisco profile --json`` prints and caches it."""
        import json

        from ..device._profile import DeviceProfile

        path = pathlib.Path(path)
        try:
            profile = DeviceProfile.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigurationError(f"{path}: not a device profile: {e}") from None
        load = f" (measured at load {profile.load_per_cpu:.2f} per CPU)" if profile.load_per_cpu is not None else ""
        return cls.from_profile(profile, source=f"{path}{load}", **kw)  # type: ignore[arg-type]

    @classmethod
    def smollm2(cls, **kw: object) -> DeviceModel:
        """The embedded default model's profile as cached on this machine (any thread count; the
        newest), else the documented figures of a quiet machine (also on an install without
        the device extra, which has no profiles)."""
        fallback = cls(**SMOLLM2_FALLBACK, source="fallback (measurements.md, quiet machine)", **kw)  # type: ignore[arg-type]
        try:
            from ..device._profile import profile_cache_dir
        except ImportError:
            return fallback
        files = sorted(profile_cache_dir().glob("SmolLM2-135M*.json"), key=lambda p: p.stat().st_mtime)
        for path in reversed(files):
            try:
                return cls.from_file(path, **kw)
            except ConfigurationError:
                continue
        return fallback


@dataclasses.dataclass(frozen=True)
class ServerModel:
    """A batched LLM server.

    A request first waits ``overhead_s`` (one of ``overhead_samples_s`` drawn per request: the
    API's front end and network as measured), then queues in a step loop: each step decodes one
    token for every running sequence and carries at most ``prefill_chunk`` prefill tokens;
    it takes ``step.decode(b) + step.prefill_s_per_token·p``. ``max_batch`` sequences run at
    once within ``kv_capacity`` KV tokens; the ``scheduler`` (a step scheduler's name) decides
    who runs. Under load, requests queue and steps slow down, like a server.
    """

    overhead_samples_s: tuple[float, ...]
    step: StepProfile
    max_batch: int = 64
    kv_capacity: int = 64 * 4096
    prefill_chunk: int = 512
    scheduler: str = "fcfs"
    source: str = "given"

    def __post_init__(self) -> None:
        if not self.overhead_samples_s or any(not (s >= 0 and math.isfinite(s)) for s in self.overhead_samples_s):
            raise ConfigurationError("a server model needs overhead samples >= 0")
        if self.max_batch < 1 or self.kv_capacity < 1 or self.prefill_chunk < 1:
            raise ConfigurationError("a server model needs max_batch, kv_capacity, prefill_chunk >= 1")

    @classmethod
    def from_samples(
        cls,
        samples: ServerTtftSamples,
        *,
        measured_input_tokens: int = 550,
        measured_concurrency: int = 5,
        batch_slope: float = 0.02,
        prefill_s_per_token: float = 3e-5,
        max_batch: int = 64,
        kv_capacity: int = 64 * 4096,
        prefill_chunk: int = 512,
        scheduler: str = "fcfs",
    ) -> ServerModel:
        """Calibrated from llmperf records (``../shared/data/server_ttft``: 550 input tokens at
        concurrency 5).

        Decode: ``lat(b) = lat(1)·(1 + batch_slope·(b − 1))`` with ``lat(concurrency)`` = the
        measured inter-token median (a GPU decode step is memory-bound: a few % per extra
        sequence). Overhead: each measured TTFT less what the model itself takes at that load
        (prefilling the measured prompt, one step), floored at 0 — so at light load the simulated
        TTFT distribution is the measured one, and queueing adds to it under load.
        ``prefill_s_per_token`` (30 µs: ~33k tokens/s, a multi-GPU 70B server) is assumed: the
        records do not separate prefill from the rest.
        """
        if not samples.ttft_s or not samples.inter_token_latency_s:
            raise ConfigurationError("server samples have no successful record")
        if not (batch_slope >= 0 and prefill_s_per_token >= 0 and measured_concurrency >= 1):
            raise ConfigurationError("batch_slope and prefill_s_per_token must be >= 0, concurrency >= 1")
        itl = statistics.median(samples.inter_token_latency_s)
        lat1 = itl / (1.0 + batch_slope * (measured_concurrency - 1))
        step = StepProfile(
            decode_s=tuple(lat1 * (1.0 + batch_slope * (b - 1)) for b in range(1, max_batch + 1)),
            prefill_s_per_token=prefill_s_per_token,
        )
        own = prefill_s_per_token * measured_input_tokens + step.decode(measured_concurrency)
        overhead = tuple(max(0.0, t - own) for t in samples.ttft_s)
        names = ", ".join(p.stem for p in samples.sources)
        return cls(overhead, step, max_batch, kv_capacity, prefill_chunk, scheduler, source=names or "samples")

    @classmethod
    def assumed(cls, **kw: object) -> ServerModel:
        """A server with no measurements given: 0.2 s of overhead and 15 ms decode steps at the
        measured concurrency (the middle of the llmperf leaderboard's figures)."""
        samples = ServerTtftSamples(ttft_s=(0.2 + 3e-5 * 550 + 0.015,), inter_token_latency_s=(0.015,),
                                    skipped_errors=0, sources=())
        model = cls.from_samples(samples, **kw)  # type: ignore[arg-type]
        return dataclasses.replace(model, source="assumed (no server measurements given)")

    def with_scheduler(self, name: str) -> ServerModel:
        return dataclasses.replace(self, scheduler=name)


@dataclasses.dataclass(frozen=True)
class Outages:
    """Link cuts: they start as a Poisson process at ``per_hour`` and last ``mean_s`` on average
    (exponential), drawn from ``seed`` — the same schedule for every policy of a sweep."""

    per_hour: float
    mean_s: float
    seed: int = 0
    horizon_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not (self.per_hour >= 0 and self.mean_s > 0):
            raise ConfigurationError("outages need per_hour >= 0 and mean_s > 0")

    def schedule(self) -> OutageSchedule:
        return OutageSchedule(self)


class OutageSchedule:
    """The outage intervals, generated as far as they are asked for."""

    def __init__(self, outages: Outages) -> None:
        self._rng = random.Random(outages.seed)
        self._rate = outages.per_hour / 3600.0
        self._mean = outages.mean_s
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._until = 0.0

    def _extend(self, t: float) -> None:
        if self._rate <= 0:
            return
        while self._until <= t:
            start = self._until + self._rng.expovariate(self._rate)
            end = start + self._rng.expovariate(1.0 / self._mean)
            self._starts.append(start)
            self._ends.append(end)
            self._until = end

    def cut_at(self, t: float) -> bool:
        """Is the link down at ``t``?"""
        self._extend(t)
        i = bisect.bisect_right(self._starts, t) - 1
        return i >= 0 and t < self._ends[i]

    def next_cut(self, t: float) -> float:
        """When the next outage after ``t`` starts (inf with none)."""
        if self._rate <= 0:
            return math.inf
        self._extend(t)
        i = bisect.bisect_right(self._starts, t)
        while i >= len(self._starts):
            self._extend(self._until + 1.0)
        return self._starts[i]


@dataclasses.dataclass(frozen=True)
class LastHop:
    """The device's link to the cloud: ``up`` carries the request, ``down`` the tokens (the
    link emulator's :class:`~pydisco.linkemu.LinkProfile`, e.g. ``REALISTIC_LAST_HOP``), and
    ``outages`` cut it (a request in flight then fails; a new one is refused until it is back).

    Delays as the emulator applies them: ``latency + jitter`` per message, plus serialisation
    at ``bandwidth``; a message that loses one of its 1460-byte segments waits ``rto`` more
    (TCP retransmits); the stream never reorders.
    """

    up: LinkProfile = LinkProfile()
    down: LinkProfile = LinkProfile()
    outages: Outages | None = None
    bytes_per_prompt_token: float = 4.0
    bytes_per_answer_token: float = 40.0  # a token frame with its text and header

    def delay_s(self, profile: LinkProfile, size_bytes: float, rng: random.Random) -> float:
        delay = profile.sample_delay(rng)
        if profile.bandwidth is not None:
            delay += size_bytes / profile.bandwidth
        if profile.loss > 0:
            segments = max(1, math.ceil(size_bytes / TCP_SEGMENT))
            if rng.random() < 1.0 - (1.0 - profile.loss) ** segments:
                delay += profile.rto
        return delay

    @property
    def is_ideal(self) -> bool:
        zero = LinkProfile()
        return self.up == zero and self.down == zero and self.outages is None
