"""Workloads a worker can reopen, per-request tables, and sweeps over any
``concurrent.futures.Executor`` (a process pool by default; Dask's ``Client.get_executor()``
works unchanged)."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import importlib
import itertools
import math
import os
import pathlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._errors import ConfigurationError
from ..workloads import (
    AZURE_CONV_OUTPUT_TOKENS,
    AZURE_CONV_PROMPT_TOKENS,
    AZURE_CONV_RATE_PER_S,
    ArrivalProcess,
    LengthDistribution,
    PoissonArrivals,
    TraceFormat,
    TraceRequest,
    andes_slo,
    iter_synthetic,
    iter_trace,
)
from ..policies._base import Slo
from ._run import ReplayConfig, RequestRow, replay

__all__ = ["RowWriter", "WorkloadSpec", "read_rows", "run_one", "sweep", "sweep_runs"]

SloDraw = Callable[[int, random.Random], Slo]


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A workload described by value, so another process can open it again: a trace file
    (``path``, ``format`` or recognised), or ``synthetic`` requests from the generators.
    ``limit``: only the first that many requests. ``seed``: the synthetic draws (and the Andes
    trace's arrivals, at ``andes_rate_per_s``). ``slo``: each synthetic request's SLO from its
    prompt length (a picklable callable; default Andes' readers, None for none)."""

    path: str | None = None
    format: TraceFormat | None = None
    synthetic: int | None = None
    arrivals: ArrivalProcess = PoissonArrivals(AZURE_CONV_RATE_PER_S)
    prompt_lengths: LengthDistribution = AZURE_CONV_PROMPT_TOKENS
    output_lengths: LengthDistribution = AZURE_CONV_OUTPUT_TOKENS
    limit: int | None = None
    seed: int = 0
    andes_rate_per_s: float | None = 1.0
    slo: SloDraw | None = andes_slo

    def open(self) -> Iterator[TraceRequest]:
        if self.path is not None:
            stream: Iterator[TraceRequest] = iter_trace(
                self.path, format=self.format, seed=self.seed, andes_rate_per_s=self.andes_rate_per_s
            )
        else:
            stream = iter_synthetic(self.synthetic if self.synthetic is not None else 1000, seed=self.seed,
                                    arrivals=self.arrivals, prompt_len_dist=self.prompt_lengths,
                                    output_len_dist=self.output_lengths, slo=self.slo)  # fmt: skip
        return itertools.islice(stream, self.limit) if self.limit is not None else stream

    def describe(self) -> str:
        if self.path is not None:
            return f"{self.path}" + (f" (first {self.limit})" if self.limit is not None else "")
        return f"synthetic {self.synthetic if self.synthetic is not None else 1000} (seed {self.seed})"


class RowWriter:
    """Per-request rows to a CSV file as they come, or to Parquet (needs pyarrow) in batches.
    Use as a context manager; call it with each row."""

    BATCH = 10_000

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.parquet = self.path.suffix.lower() == ".parquet"
        if self.parquet:
            try:
                importlib.import_module("pyarrow")
            except ImportError:
                raise ConfigurationError(f"{self.path}: Parquet output needs pyarrow (pip install pyarrow); or name a .csv file") from None
        self._file: Any = None
        self._csv: Any = None
        self._batch: list[RequestRow] = []
        self._parquet_writer: Any = None
        self.rows = 0

    def __enter__(self) -> RowWriter:
        if not self.parquet:
            self._file = self.path.open("w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._file)
            self._csv.writerow(RequestRow.columns())
        return self

    def __call__(self, row: RequestRow) -> None:
        self.rows += 1
        if self._csv is not None:
            self._csv.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row.values()])
        else:
            self._batch.append(row)
            if len(self._batch) >= self.BATCH:
                self._flush()

    def _flush(self) -> None:
        pa = importlib.import_module("pyarrow")  # optional: no stubs needed
        pq = importlib.import_module("pyarrow.parquet")
        if not self._batch:
            return
        columns = RequestRow.columns()
        table = pa.table({c: [getattr(r, c) for r in self._batch] for c in columns})
        if self._parquet_writer is None:
            self._parquet_writer = pq.ParquetWriter(self.path, table.schema)
        self._parquet_writer.write_table(table)
        self._batch.clear()

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        if self.parquet:
            self._flush()
            if self._parquet_writer is not None:
                self._parquet_writer.close()


def read_rows(path: str | os.PathLike[str]) -> Iterator[RequestRow]:
    """The rows of a CSV table that :class:`RowWriter` wrote, typed again (an empty cell is NaN)."""
    kinds = {f.name: f.type for f in dataclasses.fields(RequestRow)}  # annotations as text

    def value(name: str, text: str) -> object:
        kind = kinds[name]
        if kind == "float":
            return math.nan if text == "" else float(text)
        if kind == "int":
            return int(text)
        if kind == "bool":
            return text == "True"
        return text

    with pathlib.Path(path).open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or set(reader.fieldnames) != set(kinds):
            raise ConfigurationError(f"{path}: not a replay's per-request table (columns {reader.fieldnames})")
        for record in reader:
            yield RequestRow(**{name: value(name, text) for name, text in record.items()})  # type: ignore[arg-type]


def run_one(workload: WorkloadSpec, config: ReplayConfig, rows_path: str | None = None) -> dict[str, object]:
    """One replay, as a sweep's worker runs it: the summary as JSON values (picklable)."""
    if rows_path is None:
        return replay(workload.open(), config).to_json()
    with RowWriter(rows_path) as writer:
        return replay(workload.open(), config, on_row=writer).to_json()


def sweep(
    workload: WorkloadSpec,
    configs: Sequence[ReplayConfig],
    *,
    executor: concurrent.futures.Executor | None = None,
    rows_paths: Sequence[str | None] | None = None,
) -> list[dict[str, object]]:
    """Replay ``workload`` under each config on ``executor`` (default: a process pool with one
    worker per core) and return the summaries in the configs' order. Each replay is
    deterministic, so the results do not depend on the executor or the order runs finish in."""
    return sweep_runs([(workload, c) for c in configs], executor=executor, rows_paths=rows_paths)


Progress = Callable[[int, int], None]  # (replays finished, replays in all)


def sweep_runs(
    runs: Sequence[tuple[WorkloadSpec, ReplayConfig]],
    *,
    executor: concurrent.futures.Executor | None = None,
    rows_paths: Sequence[str | None] | None = None,
    progress: Progress | None = None,
) -> list[dict[str, object]]:
    """As :func:`sweep`, for runs that each name their own workload; ``progress`` is called as
    each replay ends."""
    paths = list(rows_paths) if rows_paths is not None else [None] * len(runs)
    if len(paths) != len(runs):
        raise ValueError("rows_paths needs one entry per run")
    own = executor is None
    pool = executor if executor is not None else concurrent.futures.ProcessPoolExecutor(max_workers=min(len(runs), os.cpu_count() or 1) or 1)
    try:
        futures = [pool.submit(run_one, w, c, p) for (w, c), p in zip(runs, paths)]
        if progress is not None:
            for done, _ in enumerate(concurrent.futures.as_completed(futures), 1):
                progress(done, len(futures))
        return [f.result() for f in futures]
    finally:
        if own:
            pool.shutdown()
