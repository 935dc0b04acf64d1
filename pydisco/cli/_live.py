"""How ``pydisco run`` shows an answer: live on a terminal, plain text through a pipe.

The live view (rich) colours each token by the endpoint that produced it, marks each handover
where it happened, and keeps a status line under the answer: TTFT, tokens/s, the unread
buffer, the endpoint generating now, and the budget-constrained endpoint's share of the work.
The report follows as a table. Everything is drawn from the Trio thread (no refresh thread),
so it reads the answer's state where that state lives.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TextIO

import trio
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from ..policies._base import Budget
from ..runtime._report import AnswerReport, AnswerStatus, EndpointUsage, Piece

# One colour per endpoint; an endpoint not named here (a user's own) gets the next spare one.
ENDPOINT_STYLES = {"device": "green", "cloud": "cyan"}
SPARE_STYLES = ("yellow", "blue", "red")
HANDOVER_STYLE = "bold magenta"
REFRESH_S = 0.1  # the status line's clock ticks this often when no token arrives


class AnswerView(Protocol):
    """Where the pieces of one answer and then its report go."""

    def piece(self, piece: Piece) -> None: ...

    def finish(self, report: AnswerReport | None) -> None:
        """The answer is over (``report`` None: it failed and its error follows)."""

    async def run_clock(self) -> None:
        """Keep the view's clock going until :meth:`finish` (run it in a task)."""


class QuietView:
    """Shows nothing (--json prints the report once the answer is over)."""

    def piece(self, piece: Piece) -> None:
        pass

    def finish(self, report: AnswerReport | None) -> None:
        pass

    async def run_clock(self) -> None:
        pass


class PlainView:
    """The answer's text as it comes, then the report's summary (pipes, --plain)."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out
        self._wrote = False

    def piece(self, piece: Piece) -> None:
        self._out.write(piece.text)
        self._out.flush()
        self._wrote = True

    def finish(self, report: AnswerReport | None) -> None:
        if self._wrote:
            print(file=self._out, flush=True)  # end the answer's line, also one that failed part-way
        if report is not None:
            print("\n" + report.summary(), file=self._out, flush=True)

    async def run_clock(self) -> None:
        pass  # plain text has no status line


def endpoint_style(name: str, seen: dict[str, str]) -> str:
    if name not in seen:
        spare = [s for s in SPARE_STYLES if s not in seen.values()]
        seen[name] = ENDPOINT_STYLES.get(name) or (spare[0] if spare else "white")
    return seen[name]


class _Tail:
    """The last lines of a text that fit the terminal above ``reserve`` lines (rich's Live
    crops a long renderable at the bottom; a streaming answer grows there)."""

    def __init__(self, text: Text, reserve: int) -> None:
        self._text, self._reserve = text, reserve

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self._text, options.update(height=None), pad=False)
        keep = max(1, (options.height or console.height) - self._reserve)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()


class LiveView:
    """The answer live on a terminal; call :meth:`run_clock` in a task for the status line."""

    def __init__(
        self,
        console: Console,
        *,
        status: Callable[[], AnswerStatus],
        usage: Callable[[], Mapping[str, EndpointUsage]],
        budget: Budget,
    ) -> None:
        self._console = console
        self._status = status
        self._usage = usage
        self._budget = budget
        self._text = Text()
        self._styles: dict[str, str] = {}
        self._last_endpoint: str | None = None
        self._first_s: float | None = None
        self._last_s = 0.0
        self._pieces = 0
        self._done = False
        self._live = Live(self._frame(), console=console, auto_refresh=False, transient=True)
        self._live.start()

    def piece(self, piece: Piece) -> None:
        if self._last_endpoint is not None and piece.endpoint != self._last_endpoint:
            self._text.append(f"[→{piece.endpoint}]", style=HANDOVER_STYLE)
        self._last_endpoint = piece.endpoint
        self._text.append(piece.text, style=endpoint_style(piece.endpoint, self._styles))
        self._first_s = piece.released_s if self._first_s is None else self._first_s
        self._last_s, self._pieces = piece.released_s, self._pieces + 1
        self.refresh()

    async def run_clock(self) -> None:
        """Redraw the status line every REFRESH_S until :meth:`finish`."""
        while not self._done:
            await trio.sleep(REFRESH_S)
            self.refresh()

    def refresh(self) -> None:
        if not self._done:
            self._live.update(self._frame(), refresh=True)

    def finish(self, report: AnswerReport | None) -> None:
        if self._done:
            return
        self._done = True
        self._live.stop()  # transient: the frame goes, the whole answer is printed once
        self._console.print(self._text)
        self._console.print(self._status_line(final=True))
        if report is not None:
            self._console.print(report_table(report, self._styles))

    def _frame(self) -> Group:
        return Group(_Tail(self._text, reserve=2), Text(), self._status_line(final=False))

    def _status_line(self, *, final: bool) -> Text:
        line = Text(style="dim")
        status = self._status()
        ttft = f"{self._first_s * 1e3:.0f} ms" if self._first_s is not None else "…"
        line.append(f"TTFT {ttft}")
        spread = self._last_s - (self._first_s or 0.0)
        rate = f"{(self._pieces - 1) / spread:.1f}" if self._pieces > 1 and spread > 0 else "–"
        line.append(f" · {rate} tokens/s · unread {status.unread} · ")
        generating = status.generating
        if final:
            line.append("done")
        elif generating is None:
            line.append(status.state)
        else:
            line.append("generating ")
            line.append(generating, style=f"bold {endpoint_style(generating, self._styles)}")
        line.append(f" · {self._budget.constrained} share {budget_share(self._usage(), self._budget):.0%}"
                    f" (budget {self._budget.share:.0%})")  # fmt: skip
        return line


def budget_share(usage: Mapping[str, EndpointUsage], budget: Budget) -> float:
    """The constrained endpoint's share of this answer's tokens (prefilled + produced), the
    quantity DiSCo's budget bounds: its tokens over the answer's size, the largest count any
    endpoint processed (the one that finished it computed the whole answer)."""
    work = {name: u.prefilled_tokens + u.offered_tokens for name, u in usage.items()}
    size = max(work.values(), default=0)
    return work.get(budget.constrained, 0) / size if size else 0.0


def report_table(report: AnswerReport, styles: dict[str, str]) -> Table:
    table = Table(title="report", show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()

    def row(name: str, value: str | Text) -> None:
        table.add_row(name, value)

    ttft = f"{report.ttft_s * 1e3:.1f} ms" if report.ttft_s is not None else "-"
    tbt = f"{statistics.median(report.tbt_s) * 1e3:.1f} ms" if report.tbt_s else "-"
    row("tokens", f"{report.tokens} ({report.finish_reason})")
    row("TTFT", ttft)
    row("TBT p50", tbt)
    row("QoE", f"{report.qoe:.3f}")
    row("dispatch", report.dispatch)
    row("endpoints", _names(report.endpoints_used, styles))
    for m in report.migrations:
        row(m.kind, Text.assemble(_names((m.source, m.target), styles, " → "),
                                  f" at token {m.handover_position}, gap {m.gap_s * 1e3:.1f} ms"))  # fmt: skip
    for name, u in sorted(report.usage.items()):
        row(name, f"{u.generated_tokens} tokens committed, {u.prefilled_tokens} prefilled, cost {u.cost:.4f}")
    row("late tokens", f"{report.late_tokens}, max lateness {report.max_lateness_s * 1e3:.2f} ms")
    return table


def _names(names: Iterable[str], styles: dict[str, str], sep: str = ", ") -> Text:
    text = Text()
    for i, name in enumerate(names):
        text.append(sep if i else "")
        text.append(name, style=endpoint_style(name, styles))
    return text if text.plain else Text("-")
