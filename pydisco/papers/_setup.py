"""What `pydisco bench` replays: the data it finds, the sizes it runs at, and one replay as a
plain record (:class:`Run`) that a process pool can carry."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import random
from collections.abc import Sequence

from .._errors import ConfigurationError
from ..linkemu import SERVER_TTFT_ENV
from ..policies._base import Slo
from ..replay import DeviceModel, ReplayConfig, RequestRow, ServerModel
from ..replay._sweep import WorkloadSpec
from ..workloads import AZURE_CONV_PROMPT_TOKENS, AZURE_CONV_RATE_PER_S, iter_azure_trace, load_server_ttft

__all__ = ["DEFAULT", "QUICK", "BenchSetup", "FixedSlo", "MixedTasks", "Run", "RunResult", "Sizes", "default_data_dir"]

AZURE_FILE = "traces/AzureLLMInferenceTrace_conv.csv"
SERVER_TTFT_DIR = "server_ttft"
DATA_ENV = "PYDISCO_DATA_DIR"
# SmolLM2's trained context. The device engine's default n_ctx is 2048, too short for half the
# Azure conversation prompts and their answers; the papers' devices hold their prompts.
DEVICE_CONTEXT = 8192
DEVICE_TOKEN_COST = 0.2  # a device token against a cloud token of 1 (the replay's default)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big a bench is: ``requests`` per replay, DiSCo's ``budgets`` and ``providers`` (the
    first also serves the other tables), SLICE's ``loads`` (tasks per second)."""

    requests: int = 60
    budgets: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    loads: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    # A fast, a middling and a heavy-tailed API of the llmperf records (TTFT p99 0.34 / 0.95 / 60 s).
    providers: tuple[str, ...] = ("groq_70b", "fireworks_70b", "replicate_70b")


DEFAULT = Sizes()
# `pydisco bench --quick` and bench/replay.py: a minute or two on two cores. A fast API, and one
# whose median TTFT (0.52 s) the device beats on short prompts, so that DiSCo has something to decide.
QUICK = Sizes(requests=20, budgets=(0.1, 0.5, 0.9), loads=(1.0, 4.0), providers=("groq_70b", "fireworks_70b"))


def default_data_dir() -> pathlib.Path | None:
    """``$PYDISCO_DATA_DIR``, else ``../shared/data`` from the working directory or from this
    checkout; None when neither exists (the bench then says what it skipped)."""
    if os.environ.get(DATA_ENV):
        return pathlib.Path(os.environ[DATA_ENV])
    for base in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


@dataclasses.dataclass(frozen=True)
class FixedSlo:
    """Every synthetic request gets ``slo`` (picklable, unlike a lambda)."""

    slo: Slo

    def __call__(self, prompt_tokens: int, rng: random.Random) -> Slo:
        return self.slo


@dataclasses.dataclass(frozen=True)
class MixedTasks:
    """SLICE's mix: a ``realtime_share`` of tasks are real-time (``realtime``), the rest chat."""

    realtime_share: float
    realtime: Slo
    chat: Slo

    def __call__(self, prompt_tokens: int, rng: random.Random) -> Slo:
        return self.realtime if rng.random() < self.realtime_share else self.chat


@dataclasses.dataclass(frozen=True)
class Run:
    """One replay of a table: ``label`` names it within its ``table`` (e.g. provider, policy,
    budget), ``workload`` and ``config`` are what `replay` gets."""

    table: str
    label: tuple[object, ...]
    workload: WorkloadSpec
    config: ReplayConfig

    @property
    def slug(self) -> str:
        """A file-name-safe name for its per-request table."""
        parts = [self.table, *(f"{p:g}" if isinstance(p, float) else str(p) for p in self.label)]
        return "-".join("".join(c if c.isalnum() or c in "._" else "_" for c in p) for p in parts)


@dataclasses.dataclass(frozen=True)
class RunResult:
    run: Run
    summary: dict[str, object]
    rows: tuple[RequestRow, ...]

    @property
    def wall_s(self) -> float:
        """Wall seconds the replay took (in its worker)."""
        value = self.summary.get("wall_s")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def completed(self) -> list[RequestRow]:
        return [r for r in self.rows if r.outcome == "completed"]

    def values(self, field: str) -> list[float]:
        """One field of every row where it is a number (NaN left out)."""
        out = [float(getattr(r, field)) for r in self.rows]
        return [v for v in out if not math.isnan(v)]


@dataclasses.dataclass(frozen=True)
class BenchSetup:
    """Sizes and data of a bench. ``requests``: requests per replay (the Andes table replays
    ``4 × requests`` so that its bursts repeat). ``azure``: the Azure conversation trace, or None
    (the shipped synthetic workload of the same shape stands in, said in the report).
    ``servers``: the measured APIs by name; an empty map means none were found (an assumed
    server, said in the report). ``device``: the device's profile (its context is set per table).
    ``device_cost``: what a device token costs against a cloud token of 1."""

    requests: int
    budgets: tuple[float, ...]
    loads: tuple[float, ...]
    seed: int
    device: DeviceModel
    servers: dict[str, ServerModel]
    azure: pathlib.Path | None
    device_cost: float = DEVICE_TOKEN_COST

    def __post_init__(self) -> None:
        if not (self.device_cost >= 0 and math.isfinite(self.device_cost)):
            raise ConfigurationError(f"a device token's cost is a number >= 0, got {self.device_cost}")
        if self.requests < 1:
            raise ConfigurationError(f"a bench needs at least 1 request per replay, got {self.requests}")
        if not self.budgets or any(not 0.0 < b < 1.0 for b in self.budgets):
            raise ConfigurationError(f"budgets are shares in (0, 1), got {self.budgets}")
        if not self.loads or any(not (x > 0 and math.isfinite(x)) for x in self.loads):
            raise ConfigurationError(f"loads are arrival rates > 0, got {self.loads}")

    @classmethod
    def build(
        cls,
        *,
        requests: int,
        budgets: Sequence[float] = DEFAULT.budgets,
        loads: Sequence[float] = DEFAULT.loads,
        providers: Sequence[str] | None = DEFAULT.providers,
        seed: int = 0,
        data_dir: pathlib.Path | None = None,
        device: DeviceModel | None = None,
        device_cost: float = DEVICE_TOKEN_COST,
        require_servers: bool = False,
    ) -> BenchSetup:
        """Find the data: the Azure trace under ``data_dir`` and the named providers' records
        (``$PYDISCO_SERVER_TTFT_DIR`` or ``data_dir/server_ttft``; ``providers=None``: every one
        there). A provider named but absent is an error; absent data is not (it is skipped), unless
        ``require_servers``: then a missing records folder is an error too."""
        azure = data_dir / AZURE_FILE if data_dir is not None else None
        ttft_dir = pathlib.Path(os.environ[SERVER_TTFT_ENV]) if os.environ.get(SERVER_TTFT_ENV) else (
            data_dir / SERVER_TTFT_DIR if data_dir is not None else None)
        servers: dict[str, ServerModel] = {}
        if ttft_dir is not None and ttft_dir.is_dir():
            names = list(providers) if providers is not None else sorted(p.stem for p in ttft_dir.glob("*.json"))
            for name in names:
                path = ttft_dir / f"{name}.json"
                if not path.is_file():
                    known = ", ".join(sorted(p.stem for p in ttft_dir.glob("*.json")))
                    raise ConfigurationError(f"no server records for provider {name!r} in {ttft_dir}; known: {known}")
                servers[name] = ServerModel.from_samples(load_server_ttft(path))
        elif require_servers:
            raise ConfigurationError(f"no server records folder (looked for {ttft_dir or 'DATA/server_ttft'}; --data names DATA)")
        return cls(requests, tuple(budgets), tuple(loads), seed, device or DeviceModel.smollm2(), servers,
                   azure if azure is not None and azure.is_file() else None, device_cost)  # fmt: skip

    @property
    def cost_per_token(self) -> dict[str, float]:
        return {"device": self.device_cost, "cloud": 1.0}

    @property
    def prefill_cost_per_token(self) -> dict[str, float]:
        """A device token prefilled costs what one decoded costs, scaled by their times in the
        device's profile (energy per token at the same power); the cloud prices both alike."""
        d = self.device
        ratio = d.prefill_c_s_per_token / d.decode_s_per_token if d.decode_s_per_token > 0 else 1.0
        return {"device": self.device_cost * ratio}

    def device_with_context(self, tokens: int = DEVICE_CONTEXT) -> DeviceModel:
        return dataclasses.replace(self.device, context_tokens=tokens)

    def server_models(self) -> dict[str, ServerModel]:
        """The measured servers, or one assumed server when none was found."""
        return dict(self.servers) if self.servers else {"assumed": ServerModel.assumed()}

    def first_server(self) -> tuple[str, ServerModel]:
        return next(iter(self.server_models().items()))

    def azure_workload(self, n: int) -> WorkloadSpec:
        """The first ``n`` requests of the Azure trace, else the synthetic stand-in of its shape."""
        if self.azure is not None:
            return WorkloadSpec(path=str(self.azure), format="azure", limit=n, seed=self.seed)
        return WorkloadSpec(synthetic=n, seed=self.seed, slo=None)

    @functools.cached_property
    def azure_lengths(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The trace's (prompt, output) lengths, for tables whose arrivals are synthetic."""
        if self.azure is None:
            return None
        prompts, outputs = [], []
        for r in iter_azure_trace(self.azure):
            prompts.append(r.prompt_tokens)
            outputs.append(r.output_tokens)
        return tuple(prompts), tuple(outputs)

    def prompt_length_prior(self, n: int = 10_000) -> tuple[int, ...]:
        """The prompt lengths DiSCo's policies start from: the trace's own, else ``n`` draws of
        the shipped synthetic shape."""
        lengths = self.azure_lengths
        if lengths is not None:
            return lengths[0]
        rng = random.Random(self.seed)
        return tuple(AZURE_CONV_PROMPT_TOKENS.sample(rng) for _ in range(n))

    @property
    def azure_rate_per_s(self) -> float:
        return AZURE_CONV_RATE_PER_S

    def describe(self) -> dict[str, object]:
        return {
            "requests": self.requests, "budgets": list(self.budgets), "loads": list(self.loads), "seed": self.seed,
            "device": self.device.source, "device_cost": self.device_cost, "servers": list(self.server_models()),
            "servers_measured": bool(self.servers),
            "azure": str(self.azure) if self.azure is not None else None,
        }  # fmt: skip
