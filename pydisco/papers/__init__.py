"""The four papers' tables from replays of the shipped runtime (``pydisco bench``;
docs/replay.md): DiSCo, P/D-Device, Andes and SLICE, each beside the paper's own figures.

::

    from pydisco.papers import BenchSetup, run_bench, write_report

    setup = BenchSetup.build(requests=60, data_dir=pathlib.Path("../shared/data"))
    result = run_bench(setup)
    write_report(result, pathlib.Path("bench-report"))   # report.md and PNG plots (matplotlib)
    print(result.headlines())
"""

import pathlib

from ._figures import PAPER_FIGURES as PAPER_FIGURES
from ._figures import PaperFigure as PaperFigure
from ._run import HEADLINE_KEYS as HEADLINE_KEYS
from ._run import TABLES as TABLES
from ._run import BenchResult as BenchResult
from ._run import plan as plan
from ._run import run_bench as run_bench
from ._setup import BenchSetup as BenchSetup
from ._setup import Run as Run
from ._setup import RunResult as RunResult
from ._setup import default_data_dir as default_data_dir
from ._table import PaperTable as PaperTable

__all__ = [
    "HEADLINE_KEYS",
    "PAPER_FIGURES",
    "TABLES",
    "BenchResult",
    "BenchSetup",
    "PaperFigure",
    "PaperTable",
    "Run",
    "RunResult",
    "default_data_dir",
    "plan",
    "run_bench",
    "write_report",
]


def write_report(result: BenchResult, out: pathlib.Path, *, command: str = "") -> list[pathlib.Path]:
    """Write ``out/report.md`` and the PNG plots (matplotlib: the ``bench`` extra, imported only
    here; ``MissingExtraError`` without it); the files written."""
    from ._report import write_report as write

    return write(result, out, command=command)
