"""Run the four papers' tables: every table's replays on one executor (a process pool by
default), their per-request tables written and read back, and the tables computed from them."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence

from ..replay._run import finite_json
from ..replay._sweep import read_rows, sweep_runs
from . import _andes, _disco, _pd, _slice
from ._figures import PAPER_FIGURES
from ._setup import BenchSetup, Run, RunResult
from ._table import PaperTable

__all__ = ["BenchResult", "HEADLINE_KEYS", "TABLES", "plan", "run_bench"]

TABLES = ("disco", "pd", "andes", "slice")
_MODULES = {"disco": _disco, "pd": _pd, "andes": _andes, "slice": _slice}
# The figures `pydisco bench --json` promises (issue 11), whatever else a table adds.
HEADLINE_KEYS = (
    "disco_p99_ttft_cut", "disco_mean_ttft_cut", "disco_cost_cut", "pd_ttft_cut", "pd_max_tpot_ms",
    "andes_avg_qoe", "andes_qoe95_share", "slice_attainment_ratio",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BenchResult:
    setup: BenchSetup
    tables: tuple[PaperTable, ...]
    results: tuple[RunResult, ...]

    def headlines(self) -> dict[str, object]:
        """Every table's measured figures by key (None for a table not run)."""
        out: dict[str, object] = {k: None for k in HEADLINE_KEYS}
        for t in self.tables:
            out.update(t.headlines)
        return out

    def of(self, table: str) -> list[RunResult]:
        return [r for r in self.results if r.run.table == table]

    def to_json(self) -> dict[str, object]:
        """Plain JSON values (NaN as None): the headlines, the quoted figures, the setup, the tables."""
        out: dict[str, object] = finite_json({
            **self.headlines(),
            "paper": {k: {"text": f.text, "paper": f.paper} for k, f in PAPER_FIGURES.items()},
            "setup": self.setup.describe(),
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "replays": len(self.results),
            "wall_s_of_replays": sum(r.wall_s for r in self.results),
        })
        return out


def plan(setup: BenchSetup, tables: Sequence[str] = TABLES) -> list[Run]:
    """Every replay the tables need, in a fixed order."""
    unknown = [t for t in tables if t not in _MODULES]
    if unknown:
        raise ValueError(f"unknown table {unknown[0]!r}; known: {', '.join(TABLES)}")
    return [run for t in tables for run in _MODULES[t].runs(setup)]


def run_bench(
    setup: BenchSetup,
    tables: Sequence[str] = TABLES,
    *,
    executor: concurrent.futures.Executor | None = None,
    rows_dir: pathlib.Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Replay what ``tables`` need on ``executor`` (default: a process pool, one worker per
    core), keep each replay's per-request table in ``rows_dir`` (default: a temporary folder,
    removed after), and compute the tables."""
    runs = plan(setup, tables)
    with tempfile.TemporaryDirectory(prefix="pydisco-bench-") as scratch:
        folder = rows_dir if rows_dir is not None else pathlib.Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [str(folder / f"{r.slug}.csv") for r in runs]
        own = executor is None
        pool = executor or concurrent.futures.ProcessPoolExecutor(max_workers=min(len(runs), os.cpu_count() or 1))
        try:
            summaries = sweep_runs([(r.workload, r.config) for r in runs], executor=pool, rows_paths=paths, progress=progress)
        finally:
            if own:
                pool.shutdown()
        results = tuple(RunResult(run, summary, tuple(read_rows(path))) for run, summary, path in zip(runs, summaries, paths))
    computed = []
    for name in tables:
        module = _MODULES[name]
        computed.append(module.table(setup, [r for r in results if r.run.table == name]))
    return BenchResult(setup, tuple(computed), results)
