"""What the runtime reports about one answer, derived from the native logs: the machine's
commit log and transition log, and the pacer's release log. Nothing here is recorded twice —
the report is a function of those logs and of what each endpoint prefilled. The timeline is
those logs in seconds and names; the released pieces are read from it."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .. import _core
from ..policies._base import prefill_rate
from ..qoe import qoe as andes_qoe
from ._timeline import Timeline, TokenTimes, TransitionTimes

LATE_THRESHOLD_NS = 1_000_000  # a token more than 1 ms past its pacing deadline counts as late


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """One token of the answer as the application receives it.

    ``released_s`` is when the pacer released it, in seconds since the request started.
    """

    position: int
    text: str
    token_id: int
    endpoint: str
    released_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class MigrationRecord:
    """One change of the endpoint that decodes the answer (seconds since the request).

    ``kind`` is "migration" (a policy moved the answer) or "failover" (the source failed).
    ``handover_position`` is the first position the target produced. ``gap_s`` is from the
    handover (source stopped, or failure noticed) to the target's first committed token.
    """

    kind: str
    source: str
    target: str
    decided_s: float
    handover_s: float
    taken_over_s: float
    handover_position: int

    @property
    def gap_s(self) -> float:
        return self.taken_over_s - self.handover_s


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointUsage:
    """What one endpoint did for this answer."""

    generated_tokens: int  # tokens it delivered that were committed
    offered_tokens: int  # tokens it produced (committed or dropped as duplicates)
    prefilled_tokens: int  # prompt + prefix tokens it computed
    cost: float  # prefilled × its prefill price + offered × the endpoint's cost per token


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerStatus:
    """An answer in flight, now (``AnswerStream.status()``): for a live view or a log line.

    Fields:
        state: the migration machine's state ("streaming", "preparing", ...).
        generating: the endpoint committing tokens now (None while racing or handing over).
        committed: tokens committed so far.
        consumed: tokens the reader has taken.
        unread: committed but not yet taken (DiSCo's buffer B).
        elapsed_s: seconds since the request started.
    """

    state: str
    generating: str | None
    committed: int
    consumed: int
    unread: int
    elapsed_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerReport:
    """The report of one answer: timing as the reader saw it, QoE, and who did what."""

    text: str
    tokens: int
    finish_reason: str  # "stop", "length", "cancelled", "failed"; "running" while it is not over
    dispatch: str  # the dispatch policy's decision, in words
    ttft_s: float | None  # request start to the first released token
    tbt_s: tuple[float, ...]  # gaps between consecutive released tokens
    qoe: float  # Andes' QoE for the answer's SLO
    endpoints_used: tuple[str, ...]  # endpoints that committed at least one token, in order
    migrations: tuple[MigrationRecord, ...]
    usage: Mapping[str, EndpointUsage]
    late_tokens: int  # tokens released later than their pacing deadline by more than 1 ms
    max_lateness_s: float
    # Every token's produced/arrived/committed/released times and every machine transition;
    # ``timeline.to_chrome_trace()`` for a trace viewer.
    timeline: Timeline

    @property
    def total_cost(self) -> float:
        return sum(u.cost for u in self.usage.values())

    def summary(self) -> str:
        """A few human-readable lines."""
        ttft = f"{self.ttft_s * 1e3:.1f} ms" if self.ttft_s is not None else "-"
        tbt_p50 = f"{statistics.median(self.tbt_s) * 1e3:.1f} ms" if self.tbt_s else "-"
        lines = [
            f"tokens {self.tokens} ({self.finish_reason}), TTFT {ttft}, TBT p50 {tbt_p50}, QoE {self.qoe:.3f}",
            f"dispatch: {self.dispatch}",
            "endpoints: " + (", ".join(self.endpoints_used) or "-"),
        ]
        for m in self.migrations:
            lines.append(
                f"{m.kind} {m.source} -> {m.target} at token {m.handover_position}: "
                f"gap {m.gap_s * 1e3:.1f} ms"
            )
        for name, u in sorted(self.usage.items()):
            lines.append(
                f"{name}: {u.generated_tokens} tokens committed, {u.prefilled_tokens} prefilled, cost {u.cost:.4f}"
            )
        lines.append(f"late tokens {self.late_tokens}, max lateness {self.max_lateness_s * 1e3:.2f} ms")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON values (what ``pydisco run --json`` prints and the Zenoh
        publisher sends): every field but the timeline (``timeline.to_json()`` or a trace has
        it, and it grows with the answer), plus ``total_cost``."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "timeline"}
        data["total_cost"] = self.total_cost
        return data


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# -- derivation ------------------------------------------------------------------------------

Event = _core.MigrationEvent

FINISH_REASON_NAMES: Mapping[_core.FinishReason, str] = {
    _core.FinishReason.NONE: "running",
    _core.FinishReason.STOP: "stop",
    _core.FinishReason.LENGTH: "length",
    _core.FinishReason.FAILED: "failed",
    _core.FinishReason.CANCELLED: "cancelled",
}


@dataclasses.dataclass
class _Episode:
    """A handover under way while walking the transition log."""

    kind: str
    decided_ns: int
    source: str
    target: str = "?"
    handover_ns: int | None = None
    position: int = 0


def migration_records(
    transitions: Sequence[_core.TransitionRecord], names: Mapping[int, str], started_ns: int
) -> tuple[MigrationRecord, ...]:
    """Every completed change of the committing endpoint, from the machine's transition log.

    A migration starts at ``prepare`` (decided) and hands over at ``target_ready``; a failover
    starts when the source (or the last racer, or a target that had the answer) failed. A
    failure while a target prepared turns that migration into a failover. Either ends at the
    target's first commit (``taken_over``); one still open when the answer ended is no record.
    """
    out: list[MigrationRecord] = []
    source = "?"
    episode: _Episode | None = None
    for t in transitions:
        name = names.get(t.endpoint, str(t.endpoint))
        if t.event in (Event.START, Event.WON):
            source = name
        elif t.event == Event.PREPARE:
            episode = _Episode("migration", t.at_ns, source, target=name)
        elif t.event == Event.TARGET_READY and episode is not None:
            episode.handover_ns, episode.position = t.at_ns, t.position
        elif t.event in (Event.SOURCE_FAILED, Event.LAST_RACER_FAILED):
            if episode is None:
                episode = _Episode("failover", t.at_ns, name)
            episode.kind, episode.source = "failover", name
            episode.handover_ns, episode.position = t.at_ns, t.position
        elif t.event == Event.TARGET_FAILED and episode is not None:
            if t.to_state == _core.MigrationState.STREAMING:
                episode = None  # a preparing target failed: the source goes on
            else:
                episode.kind = "failover"  # the target that had the answer failed
        elif t.event == Event.RESUME and episode is not None:
            episode.target = name
        elif t.event == Event.TAKEN_OVER and episode is not None:
            handover = episode.handover_ns if episode.handover_ns is not None else t.at_ns
            out.append(
                MigrationRecord(
                    kind=episode.kind,
                    source=episode.source,
                    target=name,
                    decided_s=(episode.decided_ns - started_ns) / 1e9,
                    handover_s=(handover - started_ns) / 1e9,
                    taken_over_s=(t.at_ns - started_ns) / 1e9,
                    handover_position=episode.position,
                )
            )
            source, episode = name, None
    return tuple(out)


def build_timeline(
    *,
    answer_id: str,
    commits: Sequence[_core.CommitRecord],
    committed_text: str,
    transitions: Sequence[_core.TransitionRecord],
    releases: Sequence[_core.ReleaseRecord],
    names: Mapping[int, str],
    started_ns: int,
) -> Timeline:
    """The three logs joined by position, in seconds since ``started_ns``."""

    def s(ns: int) -> float:
        return (ns - started_ns) / 1e9

    text = committed_text.encode("utf-8")
    first = commits[0].position if commits else 0
    released: dict[int, _core.ReleaseRecord] = {r.position: r for r in releases if not r.is_end}
    tokens = []
    for c in commits:
        r = released.get(c.position)
        tokens.append(
            TokenTimes(
                position=c.position,
                text=text[c.text_begin : c.text_begin + c.text_len].decode("utf-8"),
                token_id=c.token_id,
                endpoint=names.get(c.source, str(c.source)),
                produced_s=s(c.produced_ns),
                arrived_s=s(c.arrived_ns),
                deadline_s=s(r.deadline_ns) if r is not None else None,
                released_s=s(r.released_ns) if r is not None else None,
            )
        )
    assert all(t.position == first + i for i, t in enumerate(tokens))
    return Timeline(
        answer_id=answer_id,
        started_ns=started_ns,
        tokens=tuple(tokens),
        transitions=tuple(
            TransitionTimes(
                at_s=s(t.at_ns),
                event=t.event.name.lower(),
                from_state=t.from_state.name.lower(),
                to_state=t.to_state.name.lower(),
                endpoint=names.get(t.endpoint),
                position=t.position,
            )
            for t in transitions
        ),
    )


def released_pieces(timeline: Timeline) -> list[Piece]:
    """The tokens as the pacer released them to the reader, in order (the pacer releases in
    position order, so they are the timeline's tokens up to the first one still held)."""
    pieces = []
    for t in timeline.tokens:
        if t.released_s is None:
            break
        pieces.append(Piece(t.position, t.text, t.token_id, t.endpoint, t.released_s))
    return pieces


def build_report(
    *,
    answer_id: str,
    machine: _core.MigrationMachine,
    releases: Sequence[_core.ReleaseRecord],
    names: Mapping[int, str],
    started_ns: int,
    prefilled: Mapping[str, int],
    cost_per_token: Mapping[str, float],
    prefill_cost_per_token: Mapping[str, float],
    dispatch: str,
    ttft_target_s: float,
    reading_rate: float,
) -> AnswerReport:
    transitions = machine.transitions()
    timeline = build_timeline(
        answer_id=answer_id, commits=machine.commits(), committed_text=machine.committed_text,
        transitions=transitions, releases=releases, names=names, started_ns=started_ns,
    )  # fmt: skip
    pieces = released_pieces(timeline)
    times = [p.released_s for p in pieces]
    lateness = [r.released_ns - r.deadline_ns for r in releases if not r.is_end]
    usage: dict[str, EndpointUsage] = {}
    for ep, name in names.items():
        c = machine.counters(ep)
        if c.role == _core.EndpointRole.NONE and c.offered == 0:
            continue
        usage[name] = EndpointUsage(
            generated_tokens=c.accepted,
            offered_tokens=c.offered,
            prefilled_tokens=prefilled.get(name, 0),
            cost=prefill_rate(cost_per_token, prefill_cost_per_token, name) * prefilled.get(name, 0)
            + cost_per_token.get(name, 0.0) * c.offered,
        )
    used: list[str] = []
    for p in pieces:
        if p.endpoint not in used:
            used.append(p.endpoint)
    return AnswerReport(
        text="".join(p.text for p in pieces),
        tokens=len(pieces),
        finish_reason=FINISH_REASON_NAMES[machine.finish_reason],
        dispatch=dispatch,
        ttft_s=times[0] if times else None,
        tbt_s=tuple(b - a for a, b in zip(times, times[1:])),
        qoe=andes_qoe(times, ttft_target_s=ttft_target_s, reading_rate=reading_rate),
        endpoints_used=tuple(used),
        migrations=migration_records(transitions, names, started_ns),
        usage=usage,
        late_tokens=sum(1 for x in lateness if x > LATE_THRESHOLD_NS),
        max_lateness_s=max(lateness, default=0) / 1e9,
        timeline=timeline,
    )
