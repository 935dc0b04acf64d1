"""What the device costs: its measured speed (for schedulers) and per-answer cost accounting.

A :class:`DeviceProfile` models time to first token as ``TTFT_d(l) = a + c·l`` for a prompt of
``l`` tokens (least-squares fit over several lengths, measured from an empty KV cache) plus a
per-token decode time. It depends on the model, the thread count and the machine, and is
cached as JSON in the platform's user cache folder (``$XDG_CACHE_HOME/pydisco/profiles/`` on
Linux, ``~/.cache`` by default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import platformdirs

from .._errors import ConfigurationError
from ._engine import LlamaEngine
from ._llama import usable_cpus
from .._types import GenerationRequest, TokenPiece

_PROFILE_VERSION = 1
# A text the model continues for a long time without stopping: a counting sequence.
_DECODE_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
_FILLER = (
    "The committee met on a grey morning to weigh the harbour plans, the budget for the bridge, "
    "and a letter from the fishermen about winter moorings. "
)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Measured speed of one model with one thread count on one machine.

    Fields:
        model_id: :attr:`LlamaEngine.model_id` of the model measured.
        n_threads: threads llama.cpp used.
        prefill_a_s: fixed part of time to first token, seconds.
        prefill_c_s_per_token: prefill time per prompt token, seconds.
        decode_s_per_token: time per generated token after the first, seconds.
        measured_at: when, as Unix time.
        machine_id: :func:`machine_id` of the machine measured.
        load_per_cpu: the machine's 1-minute load average per CPU this process may use, as the
            measurement ended (None in profiles cached before it was recorded). Above 1 the
            model shared the cores with other work and the figures are slower than the model.
    """

    model_id: str
    n_threads: int
    prefill_a_s: float
    prefill_c_s_per_token: float
    decode_s_per_token: float
    measured_at: float
    machine_id: str
    load_per_cpu: float | None = None

    def ttft(self, prompt_tokens: int) -> float:
        """Predicted seconds from request to first token for a prompt of this many tokens."""
        return self.prefill_a_s + self.prefill_c_s_per_token * prompt_tokens

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"version": _PROFILE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceProfile:
        if data.get("version") != _PROFILE_VERSION:
            raise ValueError(f"unknown profile version {data.get('version')!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(a, c)`` for ``y = a + c·x`` with ``a, c >= 0``.

    Times cannot be negative, but noise on a busy machine can tilt an unconstrained fit below
    zero; then the best fit on the boundary (through the origin, or flat) is returned.
    """
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("need points at two or more distinct x values")
    c, a = statistics.linear_regression(xs, ys)
    if c < 0:
        return max(statistics.fmean(ys), 0.0), 0.0
    if a < 0:
        return 0.0, max(_slope_through_origin(xs, ys), 0.0)
    return a, c


def _slope_through_origin(xs: Sequence[float], ys: Sequence[float]) -> float:
    if sys.version_info >= (3, 11):
        return statistics.linear_regression(xs, ys, proportional=True).slope
    return sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)  # proportional= is 3.11's


def machine_id() -> str:
    """A short stable id of this machine: host id, name, CPU model and count (hashed)."""
    parts = [platform.node(), platform.machine(), str(os.cpu_count())]
    for path, key in (("/etc/machine-id", None), ("/proc/cpuinfo", "model name")):
        try:
            text = pathlib.Path(path).read_text(errors="replace")
        except OSError:
            continue
        lines = [ln for ln in text.splitlines() if key is None or ln.startswith(key)]
        parts.append(lines[0].strip() if lines else "")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def measure_profile(
    engine: LlamaEngine,
    *,
    lengths: Sequence[int] = (32, 128, 256),
    repeats: int = 3,
    decode_tokens: int = 32,
) -> DeviceProfile:
    """Measure ``engine``: TTFT at each prompt length (from an empty cache) and decode speed.

    Takes each length's median over ``repeats`` rounds (rounds alternate lengths, so a noisy
    moment spreads over all of them), then fits ``a + c·l``. Clears the engine's KV cache.
    The defaults prefill about 1250 tokens: ~16 s on a busy 2-core VM (once per machine).
    """
    usable = sorted({n for n in lengths if 1 <= n <= engine.n_ctx - 2})
    if len(usable) < 2 or repeats < 1 or decode_tokens < 2:
        raise ConfigurationError(
            "profiling needs two prompt lengths that fit the context, repeats >= 1, decode_tokens >= 2"
        )
    filler = engine.tokenize(_FILLER * (1 + max(usable) // 20))
    prompts = [engine.detokenize(filler[:n]).decode("utf-8", "replace") for n in usable]
    samples: dict[int, list[float]] = {}
    for _ in range(repeats):
        for prompt in prompts:
            engine.clear_cache()
            n_prompt, seconds = _time_first_token(engine, prompt)
            samples.setdefault(n_prompt, []).append(seconds)
    xs = sorted(samples)
    a, c = fit_line(xs, [statistics.median(samples[x]) for x in xs])
    decode = statistics.median(_time_per_token(engine, decode_tokens) for _ in range(repeats))
    return DeviceProfile(engine.model_id, engine.n_threads, a, c, decode, time.time(), machine_id(), load_per_cpu())


def load_per_cpu() -> float | None:
    """The 1-minute load average over the CPUs this process may use (None where unknown)."""
    try:
        return os.getloadavg()[0] / max(1, usable_cpus())
    except (AttributeError, OSError):  # no load average here (not on Unix)
        return None


# A cached profile measured while the machine was this busy (load per CPU) is measured again
# once the machine is at most half as busy: a profile taken during a build, say, would
# otherwise make every later start think the device several times slower than it is.
BUSY_LOAD_PER_CPU = 1.0


def measured_while_busy(profile: DeviceProfile, now_load_per_cpu: float | None) -> bool:
    """Whether ``profile`` was measured on a busier machine than now (see BUSY_LOAD_PER_CPU)."""
    then = profile.load_per_cpu
    if then is None or now_load_per_cpu is None:
        return False
    return then > BUSY_LOAD_PER_CPU and now_load_per_cpu <= then / 2


def _time_first_token(engine: LlamaEngine, prompt: str) -> tuple[int, float]:
    first: list[float] = []
    start = time.perf_counter()
    request = GenerationRequest(prompt=prompt, max_tokens=1)
    result = engine.generate(request, lambda _: first.append(time.perf_counter()))
    end = first[0] if first else time.perf_counter()
    return result.prompt_tokens, end - start


def _time_per_token(engine: LlamaEngine, n: int) -> float:
    stamps: list[float] = []

    def on_token(_: TokenPiece) -> None:
        stamps.append(time.perf_counter())

    engine.generate(GenerationRequest(prompt=_DECODE_PROMPT, max_tokens=n), on_token)
    if len(stamps) < 2:
        raise RuntimeError("the model stopped before two tokens; cannot time decoding")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def profile_cache_dir() -> pathlib.Path:
    """Where profiles are cached: the platform's user cache folder for pydisco (platformdirs:
    ``$XDG_CACHE_HOME/pydisco``, else ``~/.cache/pydisco``, on Linux), then ``profiles``."""
    return platformdirs.user_cache_path("pydisco") / "profiles"


def profile_cache_path(model: str, n_threads: int, machine: str | None = None) -> pathlib.Path:
    return profile_cache_dir() / f"{model}--{machine or machine_id()}--t{n_threads}.json"


def load_profile(model: str, n_threads: int) -> DeviceProfile | None:
    """The cached profile for this model, thread count and machine, or None."""
    path = profile_cache_path(model, n_threads)
    try:
        return DeviceProfile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent, unreadable, or from another version
        return None


def save_profile(profile: DeviceProfile) -> pathlib.Path:
    path = profile_cache_path(profile.model_id, profile.n_threads, profile.machine_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    return path


def load_or_measure_profile(engine: LlamaEngine, *, refresh: bool = False) -> DeviceProfile:
    """The cached profile for ``engine`` on this machine, measured (and cached) if missing, or
    if it was measured while the machine was busy and it is quieter now (the new one replaces
    it)."""
    if not refresh:
        cached = load_profile(engine.model_id, engine.n_threads)
        if cached is not None and not measured_while_busy(cached, load_per_cpu()):
            return cached
    profile = measure_profile(engine)
    save_profile(profile)
    return profile


@dataclasses.dataclass(frozen=True, slots=True)
class CostRates:
    """What a device token costs, in ``unit``s. The default simply counts tokens.

    Use :meth:`energy` for joules from a profile and the device's power draw, or set any
    per-token figures (money, battery percent) directly.
    """

    prefill_per_token: float = 1.0
    decode_per_token: float = 1.0
    unit: str = "tokens"

    def __post_init__(self) -> None:
        if not (self.prefill_per_token >= 0 and self.decode_per_token >= 0):
            raise ConfigurationError("cost rates must be >= 0")

    @classmethod
    def energy(cls, profile: DeviceProfile, watts: float) -> CostRates:
        """Joules per token: the profile's seconds per token times the power drawn."""
        if not watts > 0:
            raise ConfigurationError(f"watts must be > 0, got {watts!r}")
        return cls(profile.prefill_c_s_per_token * watts, profile.decode_s_per_token * watts, "J")

    def cost(self, prefilled: int, decoded: int) -> float:
        return prefilled * self.prefill_per_token + decoded * self.decode_per_token


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerCost:
    """The device's cost of one answer (or of preparing one, when ``decoded_tokens`` is 0).

    Fields:
        request_id: the request's id.
        prefilled_tokens: tokens computed in prefill (cache hits are free).
        decoded_tokens: tokens generated.
        units: cost in ``unit`` by the rates in force.
        unit: what ``units`` counts.
        finish_reason: how it ended ("stop", "length", "cancelled", "prepared").
    """

    request_id: str
    prefilled_tokens: int
    decoded_tokens: int
    units: float
    unit: str
    finish_reason: str
