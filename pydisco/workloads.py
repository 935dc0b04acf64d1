"""Workloads: streaming loaders for public trace formats, and the synthetic default.

pydisco ships no trace data. The loaders read files a user downloads, one request at a time
(generators, so a trace larger than memory replays); each ``load_*`` is ``list(iter_*)``:

- :func:`iter_azure_trace`: the Azure LLM inference traces (Azure/AzurePublicDataset), a CSV
  ``TIMESTAMP,ContextTokens,GeneratedTokens`` — the 2023 files (``2023-11-16 18:15:46.6805900``)
  and the 2024 ones (``2024-05-10 00:00:00.009930+00:00``) alike.
- :func:`iter_burstgpt_trace`: BurstGPT (``Timestamp,Model,Request tokens,Response tokens,Total
  tokens,Log Type``; seconds from the trace's start).
- :func:`iter_mooncake_trace`: Mooncake's JSONL traces (``timestamp`` in ms, ``input_length``,
  ``output_length``, ``hash_ids``).
- :func:`iter_andes_qoe_trace`: the Andes authors' ShareGPT QoE trace, a JSON list of requests
  with ``prompt``, ``output_len``, ``ttft``, ``max_ttft`` and ``latency`` (seconds per token).
- :func:`load_server_ttft`: llmperf per-request records (``ttft_s``, ``inter_token_latency_s``,
  ``error_code``): not a trace but the server's measured behaviour (DiSCo's ``F_s``).

:func:`detect_format` tells these apart by the file's first bytes and :func:`iter_trace` opens
any of them. The synthetic generators (:func:`iter_synthetic`: Poisson, Gamma with a coefficient
of variation, Andes-style cyclic bursts; lengths from a named distribution or an empirical
sample, :func:`length_distribution`) are the default workload. A malformed file raises
:class:`WorkloadFormatError` naming the file, the line or record, and what is wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import heapq
import itertools
import json
import math
import pathlib
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

from ._errors import PydiscoError
from .policies._base import Slo

__all__ = [
    "AZURE_CONV_OUTPUT_TOKENS",
    "AZURE_CONV_PROMPT_TOKENS",
    "AZURE_CONV_RATE_PER_S",
    "TRACE_FORMATS",
    "ArrivalProcess",
    "ConstantLengths",
    "CyclicBurstArrivals",
    "EmpiricalLengths",
    "GammaArrivals",
    "LengthDistribution",
    "LogNormalLengths",
    "PoissonArrivals",
    "ServerTtftSamples",
    "TraceFormat",
    "TraceRequest",
    "UniformLengths",
    "WorkloadFormatError",
    "andes_slo",
    "approx_token_count",
    "detect_format",
    "iter_andes_qoe_trace",
    "iter_azure_trace",
    "iter_burstgpt_trace",
    "iter_mooncake_trace",
    "iter_synthetic",
    "iter_trace",
    "length_distribution",
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
_STAMP = re.compile(r"(?P<main>[^.+Z]+?)(?:\.(?P<fraction>[^+\-Z]*))?(?P<zone>Z|[+-]\d\d:?\d\d)?")

# Rows may be slightly out of order (the 2023 files are sorted, but nothing promises it): a
# streaming loader sorts within a window this many rows deep, and refuses a row older than one
# it already yielded.
AZURE_REORDER_WINDOW = 10_000


def _parse_timestamp(text: str) -> tuple[int, float]:
    """"2023-11-16 18:15:46.6805900" or "2024-05-10 00:00:00.009930+00:00" as (whole seconds
    since 1970 UTC, fraction of a second).

    The 2023 trace has seven fractional digits, more than Python 3.10's ``fromisoformat``
    takes, and whole seconds stay exact integers when the fraction is kept apart.
    """
    match = _STAMP.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"TIMESTAMP is not 'YYYY-MM-DD HH:MM:SS[.fraction][+HH:MM]': {text!r}")
    main, fraction, zone = match["main"], match["fraction"] or "", match["zone"]
    if match["fraction"] is not None and not fraction.isdigit():
        raise ValueError(f"bad fractional seconds in TIMESTAMP {text!r}")
    try:
        stamp = datetime.datetime.fromisoformat(main + ("+00:00" if zone == "Z" else zone or ""))
    except ValueError:
        raise ValueError(f"TIMESTAMP is not 'YYYY-MM-DD HH:MM:SS[.fraction][+HH:MM]': {text!r}") from None
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    seconds = (stamp - _EPOCH) // datetime.timedelta(seconds=1)
    return seconds, (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _parse_count(text: str, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{column} is not an integer: {text!r}") from None
    if value < 0:
        raise ValueError(f"{column} is negative: {value}")
    return value


def _csv_rows(path: pathlib.Path, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(line, the named columns' cells) for each non-blank row of a CSV with these columns."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise WorkloadFormatError(path, "empty file, expected a header", line=1)
        names = [h.strip() for h in header]
        missing = [c for c in columns if c not in names]
        if missing:
            raise WorkloadFormatError(
                path, f"header lacks column(s) {', '.join(missing)} (got {', '.join(names)})",
                line=1,
            )
        index = [names.index(c) for c in columns]
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise WorkloadFormatError(
                    path, f"expected {len(names)} fields, got {len(row)}", line=reader.line_num
                )
            yield reader.line_num, [row[i] for i in index]


def iter_azure_trace(
    path: str | pathlib.Path, *, reorder_window: int = AZURE_REORDER_WINDOW
) -> Iterator[TraceRequest]:
    """Requests of an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``,
    2023 or 2024), streamed in arrival order with ``arrival_s`` measured from the earliest
    timestamp. Rows out of order by less than ``reorder_window`` rows are sorted; a row older
    than one already yielded is a WorkloadFormatError."""
    path = pathlib.Path(path)
    heap: list[tuple[tuple[int, float], int, int, int, int]] = []  # (stamp, order, line, prompt, output)
    start: tuple[int, float] | None = None
    last: tuple[int, float] | None = None

    def pop() -> TraceRequest:
        nonlocal start, last
        stamp, _, line, prompt, output = heapq.heappop(heap)
        if last is not None and stamp < last:
            raise WorkloadFormatError(
                path, f"row is older than rows {reorder_window} before it; sort the file by TIMESTAMP",
                line=line,
            )
        if start is None:
            start = stamp
        last = stamp
        seconds, fraction = stamp
        return TraceRequest(max(0.0, (seconds - start[0]) + (fraction - start[1])), prompt, output)

    for order, (line, (stamp_text, prompt_text, output_text)) in enumerate(_csv_rows(path, _AZURE_COLUMNS)):
        try:
            stamp = _parse_timestamp(stamp_text)
            prompt = _parse_count(prompt_text, "ContextTokens")
            output = _parse_count(output_text, "GeneratedTokens")
        except ValueError as e:
            raise WorkloadFormatError(path, str(e), line=line) from None
        heapq.heappush(heap, (stamp, order, line, prompt, output))  # order: ties keep file order
        if len(heap) > reorder_window:
            yield pop()
    while heap:
        yield pop()


def load_azure_trace(path: str | pathlib.Path) -> list[TraceRequest]:
    """Every request of an Azure trace CSV (see :func:`iter_azure_trace`)."""
    return list(iter_azure_trace(path))


# ----- BurstGPT ---------------------------------------------------------------------------------

_BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def iter_burstgpt_trace(path: str | pathlib.Path, *, log_type: str | None = None) -> Iterator[TraceRequest]:
    """Requests of a BurstGPT CSV (``Timestamp,Model,Request tokens,Response tokens,Total
    tokens,Log Type``, timestamps in seconds), in file order (the files are sorted; a row
    earlier than the one before is an error), ``arrival_s`` from the first row.

    ``log_type``: only rows whose ``Log Type`` is this (``"Conversation log"`` or ``"API
    log"``); rows left out are not requests of the workload asked for. Rows whose response has
    0 tokens (BurstGPT's failed requests) are kept: they are requests, with nothing to answer.
    """
    path = pathlib.Path(path)
    columns = _BURSTGPT_COLUMNS + (("Log Type",) if log_type is not None else ())
    start: float | None = None
    previous = -math.inf
    for line, cells in _csv_rows(path, columns):
        if log_type is not None and cells[3].strip() != log_type:
            continue
        try:
            stamp = float(cells[0])
        except ValueError:
            raise WorkloadFormatError(path, f"Timestamp is not a number: {cells[0]!r}", line=line) from None
        if not math.isfinite(stamp):
            raise WorkloadFormatError(path, f"Timestamp is not finite: {cells[0]!r}", line=line)
        if stamp < previous:
            raise WorkloadFormatError(path, "Timestamp earlier than the row before; sort the file", line=line)
        previous = stamp
        try:
            prompt = _parse_count(cells[1], "Request tokens")
            output = _parse_count(cells[2], "Response tokens")
        except ValueError as e:
            raise WorkloadFormatError(path, str(e), line=line) from None
        if start is None:
            start = stamp
        yield TraceRequest(stamp - start, prompt, output)


# ----- Mooncake ---------------------------------------------------------------------------------


def iter_mooncake_trace(path: str | pathlib.Path) -> Iterator[TraceRequest]:
    """Requests of a Mooncake JSONL trace: one object a line with ``timestamp`` (ms from the
    trace's start), ``input_length`` and ``output_length`` (``hash_ids``, the prompt's prefix
    blocks, is read past: pydisco's server model has no prefix cache). In file order (a
    timestamp earlier than the line before is an error), ``arrival_s`` from the first line."""
    path = pathlib.Path(path)
    start: float | None = None
    previous = -math.inf
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise WorkloadFormatError(path, f"invalid JSON (column {e.colno}): {e.msg}", line=line) from None
            if not isinstance(record, dict):
                raise WorkloadFormatError(path, f"expected an object, got {type(record).__name__}", line=line)
            values = []
            for key in ("timestamp", "input_length", "output_length"):
                value = record.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                        or not math.isfinite(value) or (key != "timestamp" and value != int(value)):
                    what = "a number >= 0" if key == "timestamp" else "an integer >= 0"
                    raise WorkloadFormatError(path, f"{key!r} must be {what}, got {value!r}", line=line)
                values.append(value)
            stamp = float(values[0])
            if stamp < previous:
                raise WorkloadFormatError(path, "timestamp earlier than the line before; sort the file", line=line)
            previous = stamp
            if start is None:
                start = stamp
            yield TraceRequest((stamp - start) / 1000.0, int(values[1]), int(values[2]))


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


_JSON_CHUNK = 1 << 16
_DECODER = json.JSONDecoder()


def _iter_json_list(path: pathlib.Path) -> Iterator[Any]:
    """The records of a file holding one JSON list, parsed one record at a time (memory: the
    largest record, not the file). Errors as :func:`_load_json_list`'s."""
    with path.open(encoding="utf-8") as f:
        buffer, lines_before, eof = "", 0, False  # lines_before: newlines dropped from the buffer

        def more() -> bool:
            nonlocal buffer, eof
            chunk = f.read(_JSON_CHUNK)
            eof = not chunk
            buffer += chunk
            return bool(chunk)

        def skip_space(pos: int) -> int:
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buffer) or not more():
                    return pos

        def fail(pos: int, message: str) -> WorkloadFormatError:
            line = lines_before + buffer.count("\n", 0, pos) + 1
            column = pos - (buffer.rfind("\n", 0, pos) + 1) + 1
            return WorkloadFormatError(path, f"invalid JSON (column {column}): {message}", line=line)

        pos = skip_space(0)
        if pos >= len(buffer):
            raise fail(pos, "Expecting value")
        if buffer[pos] != "[":
            try:
                kind = type(json.loads(buffer + f.read())).__name__
            except json.JSONDecodeError as e:
                raise WorkloadFormatError(path, f"invalid JSON (column {e.colno}): {e.msg}", line=e.lineno) from None
            raise WorkloadFormatError(path, f"expected a JSON list of records, got {kind}")
        pos = skip_space(pos + 1)
        first = True
        while True:
            if pos < len(buffer) and buffer[pos] == "]":
                pos = skip_space(pos + 1)
                if pos < len(buffer):
                    raise fail(pos, "Extra data")
                return
            if not first:
                if pos >= len(buffer) or buffer[pos] != ",":
                    raise fail(pos, "Expecting ',' delimiter")
                pos = skip_space(pos + 1)
            while True:
                try:
                    record, end = _DECODER.raw_decode(buffer, pos)
                except json.JSONDecodeError as e:
                    if not eof and more():
                        continue  # the record may just be cut by the chunk
                    raise fail(e.pos, e.msg) from None
                if end == len(buffer) and not eof and more():
                    continue  # a number cut by the chunk ("12" of "123") decodes too early
                break
            yield record
            first = False
            # Drop what was parsed, so memory stays one record deep.
            lines_before += buffer.count("\n", 0, end)
            buffer = buffer[end:]
            pos = skip_space(0)


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


def iter_andes_qoe_trace(
    path: str | pathlib.Path,
    *,
    count_tokens: Callable[[str], int] = approx_token_count,
    rate_per_s: float | None = None,
    seed: int = 0,
) -> Iterator[TraceRequest]:
    """Requests of the Andes authors' QoE trace, streamed: a JSON list of objects with
    ``prompt``, ``output_len``, ``ttft`` (TTFT target, s), ``max_ttft`` (s) and ``latency`` (the
    user's seconds per token, so ``reading_rate = 1/latency``).

    The trace has no prompt token counts and no arrival times: ``count_tokens`` counts the
    prompt (default :func:`approx_token_count`), and arrivals are Poisson at ``rate_per_s``
    (seeded) as in the authors' experiments, or all at 0 when ``rate_per_s`` is None.
    """
    path = pathlib.Path(path)
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
    rng = random.Random(seed)
    arrival = 0.0
    for i, raw in enumerate(_iter_json_list(path)):
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
        yield TraceRequest(
            arrival_s=arrival,
            prompt_tokens=count_tokens(prompt),
            output_tokens=output,
            prompt_text=prompt,
            slo=Slo(ttft_target_s=ttft, reading_rate=1.0 / latency),
            max_ttft_s=max_ttft,
        )


def load_andes_qoe_trace(
    path: str | pathlib.Path,
    *,
    count_tokens: Callable[[str], int] = approx_token_count,
    rate_per_s: float | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """Every request of the Andes QoE trace (see :func:`iter_andes_qoe_trace`)."""
    return list(iter_andes_qoe_trace(path, count_tokens=count_tokens, rate_per_s=rate_per_s, seed=seed))


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


# ----- more length distributions ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ConstantLengths:
    """Always ``tokens`` tokens."""

    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"a length must be >= 0, got {self.tokens}")

    def sample(self, rng: random.Random) -> int:
        return self.tokens


@dataclasses.dataclass(frozen=True, slots=True)
class UniformLengths:
    """Uniform over ``[low, high]`` tokens (both included)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError("uniform lengths need 0 <= low <= high")

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclasses.dataclass(frozen=True, slots=True)
class EmpiricalLengths:
    """Measured lengths, drawn uniformly with replacement (a bootstrap of the sample)."""

    samples: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.samples or any(s < 0 for s in self.samples):
            raise ValueError("an empirical length sample needs at least one length, all >= 0")

    def sample(self, rng: random.Random) -> int:
        return self.samples[rng.randrange(len(self.samples))]


_NAMED_LENGTHS: dict[str, LengthDistribution] = {
    "azure-conv-prompt": AZURE_CONV_PROMPT_TOKENS,
    "azure-conv-output": AZURE_CONV_OUTPUT_TOKENS,
}


def length_distribution(spec: str) -> LengthDistribution:
    """A length distribution from a short text (what ``pydisco replay --prompt-lengths`` takes):

    - a name: ``azure-conv-prompt``, ``azure-conv-output`` (the Azure conversation trace's shape);
    - ``constant:N``, ``uniform:LOW:HIGH``, ``lognormal:MEDIAN:MEAN``;
    - ``empirical:PATH:prompt`` / ``empirical:PATH:output``: the prompt or output lengths of a
      trace file (any format :func:`iter_trace` reads), drawn with replacement.

    ValueError with one line naming what is accepted for anything else.
    """
    accepted = ("a name (" + ", ".join(sorted(_NAMED_LENGTHS)) + "), constant:N, uniform:LOW:HIGH, "
                "lognormal:MEDIAN:MEAN or empirical:PATH:prompt|output")
    if spec in _NAMED_LENGTHS:
        return _NAMED_LENGTHS[spec]
    kind, _, rest = spec.partition(":")
    try:
        if kind == "constant":
            return ConstantLengths(int(rest))
        if kind == "uniform":
            low, high = rest.split(":")
            return UniformLengths(int(low), int(high))
        if kind == "lognormal":
            median, mean = rest.split(":")
            return LogNormalLengths(float(median), float(mean))
        if kind == "empirical":
            file, _, which = rest.rpartition(":")
            if which not in ("prompt", "output") or not file:
                raise ValueError("empirical lengths need PATH:prompt or PATH:output")
            attr = "prompt_tokens" if which == "prompt" else "output_tokens"
            return EmpiricalLengths(tuple(getattr(r, attr) for r in iter_trace(file)))
    except WorkloadFormatError:
        raise
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad length distribution {spec!r}: {e}; expected {accepted}") from None
    raise ValueError(f"unknown length distribution {spec!r}; expected {accepted}")


# ----- arrival processes ----------------------------------------------------------------------


class ArrivalProcess(Protocol):
    """When requests arrive: ``next_arrival(now_s, rng)`` is the arrival after ``now_s``."""

    def next_arrival(self, now_s: float, rng: random.Random) -> float: ...


@dataclasses.dataclass(frozen=True, slots=True)
class PoissonArrivals:
    """Exponential gaps at ``rate_per_s``."""

    rate_per_s: float

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"rate_per_s must be positive, got {self.rate_per_s!r}")

    def next_arrival(self, now_s: float, rng: random.Random) -> float:
        return now_s + rng.expovariate(self.rate_per_s)


@dataclasses.dataclass(frozen=True, slots=True)
class GammaArrivals:
    """Gamma-distributed gaps with mean ``1/rate_per_s`` and coefficient of variation ``cv``
    (shape ``1/cv²``): ``cv = 1`` is Poisson, larger is burstier (BurstGPT fits cv ≈ 2–4)."""

    rate_per_s: float
    cv: float

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"rate_per_s must be positive, got {self.rate_per_s!r}")
        if not (self.cv > 0 and math.isfinite(self.cv)):
            raise ValueError(f"cv must be positive, got {self.cv!r}")

    def next_arrival(self, now_s: float, rng: random.Random) -> float:
        shape = 1.0 / (self.cv * self.cv)
        return now_s + rng.gammavariate(shape, 1.0 / (self.rate_per_s * shape))


@dataclasses.dataclass(frozen=True, slots=True)
class CyclicBurstArrivals:
    """Andes-style cyclic bursts: Poisson at ``burst_rate_per_s`` for the first ``burst_s`` of
    every ``period_s``, at ``base_rate_per_s`` for the rest (a non-homogeneous Poisson process,
    drawn by thinning). The mean rate is ``(burst·burst_s + base·(period_s − burst_s))/period_s``."""

    base_rate_per_s: float
    burst_rate_per_s: float
    period_s: float
    burst_s: float

    def __post_init__(self) -> None:
        if not (self.base_rate_per_s >= 0 and self.burst_rate_per_s > 0):
            raise ValueError("cyclic bursts need base_rate_per_s >= 0 and burst_rate_per_s > 0")
        if not 0 < self.burst_s <= self.period_s < math.inf:
            raise ValueError("cyclic bursts need 0 < burst_s <= period_s")

    @property
    def mean_rate_per_s(self) -> float:
        quiet = self.period_s - self.burst_s
        return (self.burst_rate_per_s * self.burst_s + self.base_rate_per_s * quiet) / self.period_s

    def rate_at(self, t: float) -> float:
        return self.burst_rate_per_s if t % self.period_s < self.burst_s else self.base_rate_per_s

    def next_arrival(self, now_s: float, rng: random.Random) -> float:
        peak = max(self.burst_rate_per_s, self.base_rate_per_s)
        t = now_s
        while True:
            t += rng.expovariate(peak)
            if rng.random() * peak < self.rate_at(t):
                return t


# ----- the synthetic workload ------------------------------------------------------------------


def iter_synthetic(
    n: int | None,
    *,
    seed: int,
    arrivals: ArrivalProcess | None = None,
    prompt_len_dist: LengthDistribution = AZURE_CONV_PROMPT_TOKENS,
    output_len_dist: LengthDistribution = AZURE_CONV_OUTPUT_TOKENS,
    slo: Callable[[int, random.Random], Slo] | None = andes_slo,
) -> Iterator[TraceRequest]:
    """``n`` requests (endless with None), generated one at a time: arrivals from ``arrivals``
    (default Poisson at :data:`AZURE_CONV_RATE_PER_S`), independent prompt and output lengths,
    and an SLO per request (``slo=None`` leaves them out); deterministic for a ``seed``."""
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    process = arrivals if arrivals is not None else PoissonArrivals(AZURE_CONV_RATE_PER_S)
    rng = random.Random(seed)
    arrival = 0.0
    for _ in range(n) if n is not None else itertools.count():
        arrival = process.next_arrival(arrival, rng)
        prompt = prompt_len_dist.sample(rng)
        output = output_len_dist.sample(rng)
        yield TraceRequest(
            arrival_s=arrival,
            prompt_tokens=prompt,
            output_tokens=output,
            slo=slo(prompt, rng) if slo is not None else None,
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
    lengths, deterministic for a ``seed`` (:func:`iter_synthetic` as a list).

    Defaults follow the Azure conversation trace's shape (:data:`AZURE_CONV_PROMPT_TOKENS`,
    :data:`AZURE_CONV_OUTPUT_TOKENS`, :data:`AZURE_CONV_RATE_PER_S`) with Andes' SLOs
    (:func:`andes_slo`); ``slo=None`` leaves them out.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
    return list(iter_synthetic(n, seed=seed, arrivals=PoissonArrivals(rate_per_s),
                               prompt_len_dist=prompt_len_dist, output_len_dist=output_len_dist, slo=slo))


def prompt_lengths(requests: Iterable[TraceRequest]) -> list[int]:
    """The prompt lengths of a workload (a sample to seed DiSCo's policies with)."""
    return [r.prompt_tokens for r in requests]


# ----- any trace file ---------------------------------------------------------------------------

TraceFormat = Literal["azure", "burstgpt", "mooncake", "andes"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("azure", "burstgpt", "mooncake", "andes")
_SNIFF_BYTES = 4096


def detect_format(path: str | pathlib.Path) -> TraceFormat:
    """Which trace format ``path`` holds, from its first bytes: an Azure or BurstGPT CSV header,
    a Mooncake JSON line, or a JSON list of Andes records. WorkloadFormatError naming the file
    otherwise (an llmperf record file is named as such: it measures a server, it is not a
    trace)."""
    path = pathlib.Path(path)
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise WorkloadFormatError(path, f"cannot read: {e.strerror or e}") from None
    text = head.lstrip()
    first_line = text.split("\n", 1)[0]
    columns = {c.strip() for c in first_line.split(",")}
    if set(_AZURE_COLUMNS) <= columns:
        return "azure"
    if set(_BURSTGPT_COLUMNS) <= columns:
        return "burstgpt"
    if text.startswith("{") and '"input_length"' in first_line:
        return "mooncake"
    if text.startswith("["):
        if '"output_len"' in text and '"latency"' in text:
            return "andes"
        if '"ttft_s"' in text:
            raise WorkloadFormatError(
                path, "llmperf per-request records measure a server, they are not a trace "
                "(use them as the server's TTFT samples)", line=1)
    raise WorkloadFormatError(
        path, f"not a known trace format ({', '.join(TRACE_FORMATS)}): first line {first_line[:60]!r}",
        line=1,
    )


def iter_trace(
    path: str | pathlib.Path, *, format: TraceFormat | None = None, seed: int = 0,
    andes_rate_per_s: float | None = None,
) -> Iterator[TraceRequest]:
    """The requests of a trace file in any known format (``format``, or recognised by
    :func:`detect_format`), streamed. ``andes_rate_per_s`` / ``seed``: the Andes trace's
    Poisson arrivals (it has none of its own; None puts them all at 0)."""
    kind = format if format is not None else detect_format(path)
    if kind == "azure":
        return iter_azure_trace(path)
    if kind == "burstgpt":
        return iter_burstgpt_trace(path)
    if kind == "mooncake":
        return iter_mooncake_trace(path)
    if kind == "andes":
        return iter_andes_qoe_trace(path, rate_per_s=andes_rate_per_s, seed=seed)
    raise ValueError(f"unknown trace format {kind!r}; known: {', '.join(TRACE_FORMATS)}")
