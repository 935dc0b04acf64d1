"""The bench's report: ``report.md`` with the four tables, each beside the paper's own figures
(quoted, never presented as measured), and PNG plots drawn with matplotlib (the ``bench`` extra,
imported only here)."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

from .._errors import MissingExtraError
from . import _andes, _disco, _pd, _slice
from ._figures import PAPER_FIGURES, PAPERS
from ._run import BenchResult
from ._table import PaperTable, pct

__all__ = ["PLOTS", "render_markdown", "require_matplotlib", "write_report"]

PLOTS = {
    "ttft_cdf.png": "TTFT CDFs per policy (DiSCo per server at the middle budget; P/D-Device)",
    "qoe_cdf.png": "QoE CDFs, andes against fcfs under bursts",
    "cost_ttft.png": "Cost per request against mean TTFT, every DiSCo replay",
    "slo_attainment.png": "SLO attainment against load, per step scheduler",
}
_PLOT_OF_TABLE = {"disco": ("ttft_cdf.png", "cost_ttft.png"), "pd": ("ttft_cdf.png",), "andes": ("qoe_cdf.png",),
                  "slice": ("slo_attainment.png",)}  # fmt: skip


def require_matplotlib() -> Any:
    """matplotlib's ``Figure``, or ``MissingExtraError`` naming the extra that brings it."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError:
        raise MissingExtraError("the bench's plots need matplotlib", "bench") from None
    return Figure


def write_report(result: BenchResult, out: pathlib.Path, *, command: str = "") -> list[pathlib.Path]:
    """Write ``out/report.md`` and the plots of the tables that ran; the files written."""
    figure = require_matplotlib()  # before any work: a missing extra stops here
    out.mkdir(parents=True, exist_ok=True)
    ran = {t.key for t in result.tables}
    written: list[pathlib.Path] = []
    if ran & {"disco", "pd"}:
        written.append(_ttft_cdfs(figure, result, out / "ttft_cdf.png"))
    if "disco" in ran:
        written.append(_cost_ttft(figure, result, out / "cost_ttft.png"))
    if "andes" in ran:
        written.append(_cdf_plot(figure, _andes.plot_series(result.of("andes")), "QoE", out / "qoe_cdf.png",
                                 "Andes: QoE under cyclic bursts"))  # fmt: skip
    if "slice" in ran:
        written.append(_slo_attainment(figure, result, out / "slo_attainment.png"))
    report = out / "report.md"
    report.write_text(render_markdown(result, command=command, plots={p.name for p in written}), encoding="utf-8")
    return [report, *written]


# ----- markdown ---------------------------------------------------------------------------------


def _value(key: str, value: object) -> str:
    if value is None:
        return "- (not computable here; see the notes)"
    if isinstance(value, list):  # a [min, max] range, shown in the order of what it shows
        if "_cut" in key:
            value = sorted(-v for v in value)
            return " to ".join(pct(v) for v in value)
        return " to ".join(_value(key, v) for v in value)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return str(value)
    if "_cut" in key:  # a cut is shown as the change it makes, as the papers write it
        return pct(-value)
    if key.endswith("_ms"):
        return f"{value:.0f} ms"
    if key.endswith(("_ratio", "_gain")):
        return f"{value:.2f}x"
    if key.endswith("_share") or key.endswith("_attainment"):
        return f"{value * 100:.0f} %"
    return f"{value:.3g}"


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(columns), line(["---"] * len(columns)), *(line(r) for r in rows)]


def _headline_rows(table: PaperTable) -> list[tuple[str, str, str]]:
    rows = []
    for key, value in table.headlines.items():
        if key.endswith("_range"):
            continue
        measured = _value(key, value)
        spread = table.headlines.get(f"{key}_range")
        if spread is not None:
            measured += f" (range {_value(key, spread)})"
        paper = PAPER_FIGURES.get(key)
        rows.append((f"`{key}`", measured, paper.text if paper is not None else ""))
    return rows


def render_markdown(result: BenchResult, *, command: str = "", plots: set[str] | None = None) -> str:
    setup = result.setup
    d = setup.device
    servers = ", ".join(setup.server_models()) + ("" if setup.servers else " (assumed: no measured records found)")
    lines = [
        "# pydisco bench: the four papers' tables, replayed",
        "",
        "Every figure under *measured here* comes from replaying the workload through pydisco's shipped runtime "
        "(dispatch and migration policies, coordinator, migration machine, pacer, step schedulers) in virtual time "
        "against endpoint models calibrated from measurements. Every figure under *the paper's* is quoted from that "
        "paper, for comparison: it was not measured here, and the setups differ (see each table's notes).",
        "",
        f"- command: `{command}`" if command else "- command: (library call)",
        f"- workload: {'the Azure conversation trace, ' + str(setup.azure) if setup.azure else 'synthetic, the Azure conversation trace shape (the trace was not found)'}; "
        f"{setup.requests} requests per replay, seed {setup.seed}",
        f"- device: TTFT = {d.prefill_a_s * 1e3:.0f} ms + {d.prefill_c_s_per_token * 1e3:.2f} ms per prompt token, "
        f"decode {d.decode_s_per_token * 1e3:.1f} ms per token ({d.source})",
        f"- servers: {servers} (llmperf records: per-request API overhead and inter-token time)",
        f"- {len(result.results)} replays, {sum(r.wall_s for r in result.results):.0f} s of CPU in replays",
        "",
    ]  # fmt: skip
    for table in result.tables:
        lines += [f"## {table.title}", "", f"*{PAPERS[table.key]}*", "", table.compares, ""]
        lines += _md_table(table.columns, table.rows) + [""]
        lines += ["Headlines, measured here beside the paper's own (quoted, not measured):", ""]
        lines += _md_table(("figure", "measured here", "the paper's (quoted)"), _headline_rows(table)) + [""]
        lines += ["How this setup differs from the paper's:", ""] + [f"- {n}" for n in table.notes] + [""]
        for name in _PLOT_OF_TABLE[table.key]:
            if plots is None or name in plots:
                lines += [f"![{PLOTS[name]}]({name})", ""]
    return "\n".join(lines)


# ----- plots ------------------------------------------------------------------------------------


def _log_x(ax: Any) -> None:
    """A log x axis labelled 0.1, 0.2, 0.5, 1, 2, 5 ... in plain numbers (no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# Policies that decide alike draw the same curve: dashes keep the one underneath visible.
_LINES = ("-", "--", "-.", ":")


def _ecdf(ax: Any, values: Sequence[float], label: str, index: int = 0) -> None:
    xs = sorted(values)
    if not xs:
        return
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label, linestyle=_LINES[index % len(_LINES)], linewidth=1.6)


def _ttft_cdfs(figure: Any, result: BenchResult, path: pathlib.Path) -> pathlib.Path:
    panels: list[tuple[str, dict[str, list[float]]]] = []
    if result.of("disco"):
        series = _disco.plot_series(result.setup, result.of("disco"))
        for provider, cdfs in series["ttft_cdfs"].items():
            panels.append((f"DiSCo, {provider}", cdfs))
    if result.of("pd"):
        panels.append(("P/D-Device, long prompts", _pd.plot_series(result.of("pd"))))
    fig = figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cdfs) in zip(axes, panels):
        for i, (name, values) in enumerate(cdfs.items()):
            _ecdf(ax, values, name, i)
        _log_x(ax)
        ax.set_title(title)
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _cdf_plot(figure: Any, series: dict[str, list[float]], what: str, path: pathlib.Path, title: str) -> pathlib.Path:
    fig = figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for i, (name, values) in enumerate(series.items()):
        _ecdf(ax, values, name, i)
    ax.set_title(title)
    ax.set_xlabel(what)
    ax.set_ylabel("share of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def _cost_ttft(figure: Any, result: BenchResult, path: pathlib.Path) -> pathlib.Path:
    points = _disco.plot_series(result.setup, result.of("disco"))["cost_points"]
    fig = figure(figsize=(7.0, 4.8), layout="constrained")
    ax = fig.subplots()
    markers = "osD^v<>px*"
    providers = sorted({p[0] for p in points})
    policies = sorted({p[1] for p in points})
    # Colour: the server; marker: the policy; hollow: the same policy without migration.
    for j, provider in enumerate(providers):
        for i, policy in enumerate(policies):
            for migrates in (True, False):
                pts = [(x, y) for p, n, m, x, y in points if p == provider and n == policy and m == migrates]
                if not pts:
                    continue
                colour = f"C{j}"
                ax.scatter([x for x, _ in pts], [y for _, y in pts], marker=markers[i % len(markers)], s=40, alpha=0.85,
                           facecolors=colour if migrates else "none", edgecolors=colour,
                           label=f"{policy}{'' if migrates else ' no-mig'}, {provider}")  # fmt: skip
    ax.set_xlabel("mean TTFT (s)")
    ax.set_ylabel("cost per request (replay units)")
    ax.set_title("DiSCo: cost against TTFT (every budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.savefig(path, dpi=110)
    return path


def _slo_attainment(figure: Any, result: BenchResult, path: pathlib.Path) -> pathlib.Path:
    fig = figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, curve in _slice.curves(result.of("slice")).items():
        ax.plot([x for x, _ in curve], [y for _, y in curve], marker="o", label=name)
    _log_x(ax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("load (tasks per second)")
    ax.set_ylabel("SLO attainment")
    ax.set_title("SLICE: mixed real-time and chat tasks on one device")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path
