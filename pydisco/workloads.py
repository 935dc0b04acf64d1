"""Workloads: loaders for public trace formats, and the synthetic default.

pydisco ships no trace data. The loaders read files a user downloads:

- :func:`load_azure_trace`: the Azure LLM inference trace 2023 (Azure/AzurePublicDataset), a CSV
  ``TIMESTAMP,ContextTokens,GeneratedTokens``.
- :func:`load_andes_qoe_trace`: the Andes authors' ShareGPT QoE trace, a JSON list of requests
  with ``prompt``, ``output_len``, ``ttft``, ``max_ttft`` and ``latency`` (seconds per token).
- :func:`load_server_ttft`: llmperf per-request records (``ttft_s``, ``inter_token_latency_s``,
  ``error_code``), the server TTFT distribution DiSCo's policies learn from.

:func:`synthetic_workload` is the default when no trace is given. A malformed file raises
:class:`WorkloadFormatError` naming the file, the line or record, and what is wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import pathlib
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ._errors import PydiscoError
from .policies._base import Slo

__all__ = [
    "AZURE_CONV_OUTPUT_TOKENS",
    "AZURE_CONV_PROMPT_TOKENS",
    "AZURE_CONV_RATE_PER_S",
    "LengthDistribution",
    "LogNormalLengths",
    "ServerTtftSamples",
    "TraceRequest",
    "WorkloadFormatError",
    "andes_slo",
    "approx_token_count",
    "load_andes_qoe_trace",
    "load_azure_trace",
    "load_server_ttft",
    "prompt_lengths",
    "synthetic_workload",
]


class WorkloadFormatError(PydiscoError, ValueError):
    """A workload file is malformed. ``path`` is the file, ``line`` the 1-based line (CSV, or
    where a JSON syntax error is) or ``None``, ``record`` the 0-based JSON record or ``None``."""

    def __init__(
        self, path: str | pathlib.Path, message: str, *, line: int | None = None,
        record: int | None = None,
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if record is not None:
            where += f": record {record}"
        super().__init__(f"{where}: {message}")
        self.path = pathlib.Path(path)
        self.line = line
        self.record = record


@dataclasses.dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload.

    Fields:
        arrival_s: when it arrives, seconds from the workload's start.
        prompt_tokens: prompt length ``l`` in tokens.
        output_tokens: answer length in tokens.
        prompt_text: the prompt itself, when the trace has it.
        slo: TTFT target and reading rate, when the trace (or generator) gives them.
        max_ttft_s: the TTFT beyond which the user gives up (Andes' ``max_ttft``), if known.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prompt_text: str | None = None
    slo: Slo | None = None
    max_ttft_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError("token counts must be >= 0")


# ----- Azure LLM inference trace --------------------------------------------------------------

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


_EPOCH = datetime.datetime(1970, 1, 1)


def _parse_timestamp(text: str) -> tuple[int, float]:
    """"2023-11-16 18:15:46.6805900" as (whole seconds since 1970, fraction of a second).

    The trace has seven fractional digits, more than Python 3.10's ``fromisoformat`` takes,
    and whole seconds stay exact integers when the fraction is kept apart.
    """
    main, _, fraction = text.strip().partition(".")
    if fraction and not fraction.isdigit():
        raise ValueError(f"bad fractional seconds in TIMESTAMP {text!r}")
    try:
        stamp = datetime.datetime.fromisoformat(main)
    except ValueError:
        raise ValueError(f"TIMESTAMP is not 'YYYY-MM-DD HH:MM:SS[.fraction]': {text!r}") from None
    seconds = (stamp.replace(tzinfo=None) - _EPOCH) // datetime.timedelta(seconds=1)
    return seconds, (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _parse_count(text: str, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{column} is not an integer: {text!r}") from None
    if value < 0:
        raise ValueError(f"{column} is negative: {value}")
    return value


def load_azure_trace(path: str | pathlib.Path) -> list[TraceRequest]:
    """Requests of an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``),
    in arrival order, with ``arrival_s`` measured from the earliest timestamp."""
    path = pathlib.Path(path)
    rows: list[tuple[tuple[int, float], int, int]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise WorkloadFormatError(path, "empty file, expected a header", line=1)
        names = [h.strip() for h in header]
        missing = [c for c in _AZURE_COLUMNS if c not in names]
        if missing:
            raise WorkloadFormatError(
                path, f"header lacks column(s) {', '.join(missing)} (got {', '.join(names)})",
                line=1,
            )
        index = [names.index(c) for c in _AZURE_COLUMNS]
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise WorkloadFormatError(
                    path, f"expected {len(names)} fields, got {len(row)}", line=line
                )
            try:
                stamp = _parse_timestamp(row[index[0]])
                prompt = _parse_count(row[index[1]], "ContextTokens")
                output = _parse_count(row[index[2]], "GeneratedTokens")
            except ValueError as e:
                raise WorkloadFormatError(path, str(e), line=line) from None
            rows.append((stamp, prompt, output))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])  # stable: rows with one timestamp keep file order
    (start, start_fraction) = rows[0][0]
    return [
        TraceRequest(
            arrival_s=max(0.0, (seconds - start) + (fraction - start_fraction)),
            prompt_tokens=p,
            output_tokens=o,
        )
        for (seconds, fraction), p, o in rows
    ]


# ----- JSON helpers ------------------------------------------------------------------------


def _load_json_list(path: pathlib.Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WorkloadFormatError(path, f"invalid JSON (column {e.colno}): {e.msg}",
                                  line=e.lineno) from None
    if not isinstance(data, list):
        raise WorkloadFormatError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _number(path: pathlib.Path, i: int, record: dict[str, Any], key: str, *, positive: bool) -> float:
    if key not in record:
        raise WorkloadFormatError(path, f"missing field {key!r}", record=i)
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkloadFormatError(path, f"{key!r} must be a finite number, got {value!r}", record=i)
    if value < 0 or (positive and value == 0):
        raise WorkloadFormatError(
            path, f"{key!r} must be {'positive' if positive else '>= 0'}, got {value!r}", record=i
        )
    return float(value)


def _record(path: pathlib.Path, i: int, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise WorkloadFormatError(path, f"expected an object, got {type(record).__name__}", record=i)
    return record


# ----- Andes QoE trace -----------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """A rough token count: words and punctuation marks. English BPE vocabularies give about
    1.3 tokens per word, so this undercounts a little; pass the model's tokenizer for exact
    counts."""
    return len(_WORD.findall(text))


def load_andes_qoe_trace(
    path: str | pathlib.Path,
    *,
    count_tokens: Callable[[str], int] = approx_token_count,
    rate_per_s: float | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """Requests of the Andes authors' QoE trace: a JSON list of objects with ``prompt``,
    ``output_len``, ``ttft`` (TTFT target, s), ``max_ttft`` (s) and ``latency`` (the user's
    seconds per token, so ``reading_rate = 1/latency``).

    The trace has no prompt token counts and no arrival times: ``count_tokens`` counts the
    prompt (default :func:`approx_token_count`), and arrivals are Poisson at ``rate_per_s``
    (seeded) as in the authors' experiments, or all at 0 when ``rate_per_s`` is None.
    """
    path = pathlib.Path(path)
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
    rng = random.Random(seed)
    arrival = 0.0
    requests = []
    for i, raw in enumerate(_load_json_list(path)):
        record = _record(path, i, raw)
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise WorkloadFormatError(path, f"'prompt' must be a string, got {prompt!r:.40}", record=i)
        output = record.get("output_len")
        if isinstance(output, bool) or not isinstance(output, int) or output < 0:
            raise WorkloadFormatError(
                path, f"'output_len' must be an integer >= 0, got {output!r}", record=i
            )
        ttft = _number(path, i, record, "ttft", positive=True)
        max_ttft = _number(path, i, record, "max_ttft", positive=True)
        latency = _number(path, i, record, "latency", positive=True)
        if rate_per_s is not None:
            arrival += rng.expovariate(rate_per_s)
        requests.append(
            TraceRequest(
                arrival_s=arrival,
                prompt_tokens=count_tokens(prompt),
                output_tokens=output,
                prompt_text=prompt,
                slo=Slo(ttft_target_s=ttft, reading_rate=1.0 / latency),
                max_ttft_s=max_ttft,
            )
        )
    return requests


# ----- llmperf server records --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerTtftSamples:
    """Measured server behaviour, one value per successful request.

    Fields:
        ttft_s: time to first token, seconds (DiSCo's ``F_s`` sample).
        inter_token_latency_s: mean time between tokens of each request, seconds.
        skipped_errors: records left out because they carried an ``error_code``.
        sources: the files read.
    """

    ttft_s: tuple[float, ...]
    inter_token_latency_s: tuple[float, ...]
    skipped_errors: int
    sources: tuple[pathlib.Path, ...]


def load_server_ttft(path_or_dir: str | pathlib.Path) -> ServerTtftSamples:
    """Server TTFT and inter-token samples from llmperf per-request JSON records.

    A directory reads every ``*.json`` in it (sorted by name) except llmperf's
    ``*_summary.json`` files, and pools them. Records with a non-null ``error_code`` are
    skipped and counted.
    """
    path = pathlib.Path(path_or_dir)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if not p.name.endswith("_summary.json"))
        if not files:
            raise WorkloadFormatError(path, "no llmperf *.json files in this directory")
    else:
        files = [path]
    ttft: list[float] = []
    itl: list[float] = []
    skipped = 0
    for file in files:
        for i, raw in enumerate(_load_json_list(file)):
            record = _record(file, i, raw)
            if record.get("error_code") is not None:
                skipped += 1
                continue
            ttft.append(_number(file, i, record, "ttft_s", positive=False))
            itl.append(_number(file, i, record, "inter_token_latency_s", positive=False))
    return ServerTtftSamples(
        ttft_s=tuple(ttft), inter_token_latency_s=tuple(itl), skipped_errors=skipped,
        sources=tuple(files),
    )


# ----- synthetic workload ------------------------------------------------------------------


class LengthDistribution(Protocol):
    """A distribution of token counts."""

    def sample(self, rng: random.Random) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class LogNormalLengths:
    """A log-normal token count given by its median and mean (before truncation):
    ``μ = ln(median)``, ``σ = sqrt(2·ln(mean/median))``; draws are rounded and clipped to
    ``[minimum, maximum]``."""

    median: float
    mean: float
    minimum: int = 1
    maximum: int = 1 << 30

    def __post_init__(self) -> None:
        if not 0 < self.median <= self.mean:
            raise ValueError("a log-normal needs 0 < median <= mean")
        if not 0 <= self.minimum <= self.maximum:
            raise ValueError("need 0 <= minimum <= maximum")

    @property
    def sigma(self) -> float:
        return math.sqrt(2.0 * math.log(self.mean / self.median))

    def sample(self, rng: random.Random) -> int:
        value = round(rng.lognormvariate(math.log(self.median), self.sigma))
        return min(self.maximum, max(self.minimum, value))


# The Azure conversation trace (2023): context median 1020 / mean 1155 tokens, generated
# median 129 / mean 211, 19,366 requests in one hour. A log-normal with the same median and
# mean is close in the middle; the real context lengths have a heavier short end.
AZURE_CONV_PROMPT_TOKENS = LogNormalLengths(median=1020, mean=1155, maximum=16384)
AZURE_CONV_OUTPUT_TOKENS = LogNormalLengths(median=129, mean=211, maximum=4096)
AZURE_CONV_RATE_PER_S = 19366 / 3600


def andes_slo(prompt_tokens: int, rng: random.Random) -> Slo:
    """The Andes authors' per-request SLO: TTFT target ``max(l/5000, 1)`` s and a reading rate
    uniform over 3.8–5.1 tokens/s (seconds per token 0.196–0.264, as in their trace)."""
    return Slo(
        ttft_target_s=max(prompt_tokens / 5000.0, 1.0),
        reading_rate=1.0 / rng.uniform(0.196, 0.264),
    )


def synthetic_workload(
    n: int,
    *,
    seed: int,
    rate_per_s: float = AZURE_CONV_RATE_PER_S,
    prompt_len_dist: LengthDistribution = AZURE_CONV_PROMPT_TOKENS,
    output_len_dist: LengthDistribution = AZURE_CONV_OUTPUT_TOKENS,
    slo: Callable[[int, random.Random], Slo] | None = andes_slo,
) -> list[TraceRequest]:
    """``n`` requests with Poisson arrivals at ``rate_per_s`` and independent prompt and output
    lengths, deterministic for a ``seed``.

    Defaults follow the Azure conversation trace's shape (:data:`AZURE_CONV_PROMPT_TOKENS`,
    :data:`AZURE_CONV_OUTPUT_TOKENS`, :data:`AZURE_CONV_RATE_PER_S`) with Andes' SLOs
    (:func:`andes_slo`); ``slo=None`` leaves them out.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
    rng = random.Random(seed)
    arrival = 0.0
    requests = []
    for _ in range(n):
        arrival += rng.expovariate(rate_per_s)
        prompt = prompt_len_dist.sample(rng)
        output = output_len_dist.sample(rng)
        requests.append(
            TraceRequest(
                arrival_s=arrival,
                prompt_tokens=prompt,
                output_tokens=output,
                slo=slo(prompt, rng) if slo is not None else None,
            )
        )
    return requests


def prompt_lengths(requests: Sequence[TraceRequest]) -> list[int]:
    """The prompt lengths of a workload (a sample to seed DiSCo's policies with)."""
    return [r.prompt_tokens for r in requests]
