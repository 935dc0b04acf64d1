"""`pydisco bench`: each paper's table computed from replays on a small workload, the same
tables for the same seed, the report and its plots written, the headline keys in the JSON, and
bad arguments stopped with one line."""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pydisco.papers import HEADLINE_KEYS, PAPER_FIGURES, BenchSetup, plan, run_bench, write_report
from pydisco.papers._slice import meets_slo
from pydisco.replay import DeviceModel, RequestRow
from pydisco.replay._sweep import RowWriter, read_rows

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "traces" / "AzureLLMInferenceTrace_conv.csv"
# The quiet machine's SmolLM2 figures: a test must not depend on how busy the machine was when
# `pydisco profile` last ran.
DEVICE = DeviceModel(prefill_a_s=0.02, prefill_c_s_per_token=0.00075, decode_s_per_token=0.008)


class InlineExecutor(concurrent.futures.Executor):
    """Runs each job at submit: any Executor will do for the bench, and this one needs no process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller through the future, as a pool does
            future.set_exception(e)
        return future


def small_setup(seed: int = 0, **kw: Any) -> BenchSetup:
    args: dict[str, Any] = dict(requests=4, budgets=(0.5,), loads=(2.0,), seed=seed, data_dir=None, device=DEVICE)
    args.update(kw)
    return BenchSetup.build(**args)


@pytest.fixture(scope="module")
def small_result() -> Any:
    return run_bench(small_setup(), executor=InlineExecutor())


def test_each_paper_table_is_computed_from_its_replays(small_result: Any) -> None:
    tables = {t.key: t for t in small_result.tables}
    assert list(tables) == ["disco", "pd", "andes", "slice"]
    assert len(small_result.results) == len(plan(small_result.setup))
    for t in tables.values():
        assert t.rows and all(len(row) == len(t.columns) for row in t.rows), t.key
        assert t.notes, f"{t.key}: a table says how its setup differs from the paper's"
    # DiSCo: one row per budgeted endpoint and budget; the cost compares migration to none.
    assert [row[2] for row in tables["disco"].rows] == ["disco-d", "disco-s"]
    # P/D-Device: its three policies, and the device-only TTFT (long prompts prefilled on the
    # device) is what pd-device cuts.
    assert [row[0] for row in tables["pd"].rows] == ["device-only", "cloud-only", "pd-device"]
    pd = tables["pd"].headlines
    assert pd["pd_ttft_cut"] is not None and pd["pd_ttft_cut"] > 0
    assert pd["pd_max_tpot_ms"] is not None and pd["pd_max_tpot_ms"] >= 50 * 0.99  # never faster than the display
    # Andes: both schedulers replayed 4x the requests under bursts; QoE is a share.
    andes = tables["andes"].headlines
    assert all(0 <= float(andes[k]) <= 1 for k in ("andes_avg_qoe", "andes_qoe95_share", "fcfs_avg_qoe"))
    assert all(r.summary["requests"] == 16 for r in small_result.of("andes"))
    # The headline figures are the tables' own, and every promised key is there.
    heads = small_result.headlines()
    assert set(HEADLINE_KEYS) <= set(heads)
    assert heads["andes_avg_qoe"] == andes["andes_avg_qoe"]
    assert not small_result.setup.servers and small_result.setup.azure is None  # no data given: said, not hidden


def test_slice_attainment_counts_only_answers_within_both_bounds(small_result: Any) -> None:
    rows = [r for res in small_result.of("slice") for r in res.rows]
    assert rows and {r.realtime for r in rows} <= {True, False}
    for r in rows:
        within = r.outcome == "completed" and r.ttft_s <= r.ttft_target_s and r.tbt_mean_s <= r.tpot_target_s * (1 + 1e-9)
        assert meets_slo(r) == within
    ratio = small_result.headlines()["slice_attainment_ratio"]
    assert ratio is None or ratio >= 0


def test_the_same_seed_gives_the_same_tables_and_another_seed_other_ones() -> None:
    def tables(seed: int) -> list[Any]:
        result = run_bench(small_setup(seed), ["andes", "slice"], executor=InlineExecutor())
        return [(t.rows, t.headlines) for t in result.tables]

    first = tables(3)
    assert tables(3) == first
    assert tables(4) != first


def test_the_report_and_its_plots_are_written(small_result: Any, tmp_path: pathlib.Path) -> None:
    written = write_report(small_result, tmp_path, command="pydisco bench --requests 4")
    names = {p.name for p in written}
    assert names == {"report.md", "ttft_cdf.png", "qoe_cdf.png", "cost_ttft.png", "slo_attainment.png"}
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000, p
    report = (tmp_path / "report.md").read_text()
    for t in small_result.tables:
        assert f"## {t.title}" in report
    for figure in PAPER_FIGURES.values():
        assert figure.text in report  # beside ours ...
    assert report.count("the paper's (quoted)") == 4  # ... and labelled as the paper's
    assert "assumed" in report and "synthetic" in report  # the missing data is said


def test_rows_read_back_as_written(small_result: Any, tmp_path: pathlib.Path) -> None:
    rows = list(small_result.results[0].rows)
    with RowWriter(tmp_path / "rows.csv") as write:
        for r in rows:
            write(r)
    again = list(read_rows(tmp_path / "rows.csv"))
    def same(a: RequestRow, b: RequestRow) -> bool:
        return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
                   for x, y in zip(a.values(), b.values()))
    assert len(again) == len(rows) and all(same(a, b) for a, b in zip(rows, again))


@pytest.mark.shared_data
def test_disco_replays_the_azure_trace_against_the_measured_apis() -> None:
    if not AZURE.exists():
        pytest.skip(f"{AZURE} is not here")
    setup = BenchSetup.build(requests=6, budgets=(0.5,), providers=("groq_70b",), data_dir=DATA, device=DEVICE)
    result = run_bench(setup, ["disco"], executor=InlineExecutor())
    assert setup.azure == AZURE and list(setup.servers) == ["groq_70b"]
    assert all(r.summary["requests"] == 6 for r in result.results)
    assert "first 6 requests of the Azure conversation trace" in result.tables[0].compares


@pytest.mark.shared_data
def test_andes_keeps_nearly_every_answer_good_through_bursts_that_overload_fcfs() -> None:
    # The Andes table on the Azure lengths against groq_70b's measured records: a server sized
    # so that each burst overloads it. fcfs lets the queue's answers wait; andes preempts streams
    # whose readers hold seconds of tokens and starts the newcomers. (Before a preemption needed
    # that much slack, andes spent each stream's one preemption on a buffer of half a second:
    # 85 % of answers >= 0.95 here.)
    if not AZURE.exists():
        pytest.skip(f"{AZURE} is not here")
    setup = BenchSetup.build(requests=20, providers=("groq_70b",), data_dir=DATA, device=DEVICE)
    heads = run_bench(setup, ["andes"], executor=InlineExecutor()).tables[0].headlines
    assert heads["fcfs_qoe95_share"] < 0.8  # the bursts do overload the server
    assert heads["andes_qoe95_share"] >= 0.95 and heads["andes_avg_qoe"] >= 0.98


def bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydisco.cli", "bench", *args], capture_output=True, text=True, timeout=600)


def test_cli_writes_the_report_and_prints_the_headline_keys(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "report"
    done = bench_cli("--requests", "3", "--tables", "slice,andes", "--loads", "2", "--device-profile", "quiet",
                     "--data", str(tmp_path), "--workers", "2", "--out", str(out), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(HEADLINE_KEYS) <= set(figures)
    assert figures["disco_p99_ttft_cut"] is None  # not run: null, not a made-up figure
    assert 0 <= figures["andes_avg_qoe"] <= 1
    assert {p.name for p in out.iterdir()} == {"report.md", "qoe_cdf.png", "slo_attainment.png", "rows"}
    assert len(list((out / "rows").glob("*.csv"))) == 5


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--budgets", "0.5,2"], "between 0 and 1"),
        (["--tables", "disco,nope"], "unknown table 'nope'"),
        (["--loads", "-1"], "arrival rate > 0"),
        (["--requests", "0"], ">= 1"),
        (["--device-profile", "/no/such/profile.json"], "no such file"),
        (["--data", "/no/such/folder"], "no such folder"),
        (["--providers", "nope", "--data", str(DATA)], "no server records"),
        (["--providers", "groq_70b", "--data", "/"], "no server records folder"),
    ],
)
def test_cli_bad_arguments_get_one_line_and_status_2(args: list[str], words: str) -> None:
    if "--data" in args and args[-1] == str(DATA) and not (DATA / "server_ttft").is_dir():
        pytest.skip(f"{DATA / 'server_ttft'} is not here")
    done = bench_cli(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert words in lines[-1] and "Traceback" not in done.stderr
    assert len(lines) <= 2  # argparse's usage line, then the error


def test_cli_out_that_is_a_file_is_refused_before_any_replay(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = bench_cli("--out", str(blocker), "--requests", "1")
    assert done.returncode == 2 and "not a folder" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_without_out_prints_the_tables_as_markdown(tmp_path: pathlib.Path) -> None:
    done = bench_cli("--tables", "slice", "--loads", "2", "--requests", "2", "--device-profile", "quiet",
                     "--data", str(tmp_path), "--workers", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "## SLICE" in done.stdout and "the paper's (quoted)" in done.stdout and "up to 35x" in done.stdout


def test_the_bench_imports_matplotlib_only_to_draw() -> None:
    code = "import sys, pydisco.papers, pydisco.cli; pydisco.cli.build_parser(); print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_tables_do_not_depend_on_the_executor() -> None:
    setup = small_setup(seed=2, loads=(4.0,))
    inline = run_bench(setup, ["slice"], executor=InlineExecutor())
    with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
        pooled = run_bench(setup, ["slice"], executor=pool)
    assert [(t.rows, t.headlines) for t in pooled.tables] == [(t.rows, t.headlines) for t in inline.tables]
