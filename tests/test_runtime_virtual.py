"""The runtime in virtual time (MockClock) with scripted endpoints: whatever the timings, the
dispatch, the migrations and the failures, the reader gets the answer with no gap and no repeat,
each token from the endpoint the report says produced it — or, only when every endpoint fails, a
clear AnswerFailed after an intact prefix."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pydisco
from pydisco import RuntimeConfig, open_runtime
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from pydisco.policies import DispatchDecision, DispatchView, register_dispatch_policy, register_migration_policy
from pydisco.policies._base import MigrationView, Slo
from pydisco.runtime import AnswerFailed
from pydisco.testing import ScriptedEndpoint


def script(name: str, n: int) -> list[TokenPiece]:
    """Each endpoint its own tokens, so a token committed from the wrong endpoint or at the wrong
    position cannot pass for the right one."""
    return [TokenPiece(position=i, token_id=(1000 if name == "cloud" else 0) + i, text=f"{name[0]}{i} ") for i in range(n)]


def run_virtual(fn):  # type: ignore[no-untyped-def]
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def config(**kw: object) -> RuntimeConfig:
    base: dict[str, object] = dict(
        device_model=None,
        virtual_time=True,
        slo=Slo(ttft_target_s=1.0, reading_rate=50.0),
        silence_timeout_s=0.5,
        first_token_timeout_s=2.0,
    )
    base.update(kw)
    return RuntimeConfig(**base)  # type: ignore[arg-type]


async def read_all(
    rt: pydisco.Runtime, max_tokens: int, prompt: str = "hello"
) -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
    pieces: list[pydisco.Piece] = []
    error: BaseException | None = None
    async with rt.stream(prompt=prompt, max_tokens=max_tokens) as answer:
        try:
            async for piece in answer:
                pieces.append(piece)
        except AnswerFailed as e:
            error = e
    return pieces, answer.report, error


class MigrateAt:
    """A test policy: migrate as soon as ``position`` tokens are committed."""

    name = "migrate-at"

    def __init__(self, position: int = 3) -> None:
        self.position = position

    def should_migrate(self, view: MigrationView) -> bool:
        return view.committed >= self.position


register_migration_policy("migrate-at", MigrateAt, replace=True)


def check_attribution(pieces: Sequence[pydisco.Piece], report: pydisco.AnswerReport, scripts: dict[str, list[TokenPiece]]) -> None:
    """Every piece is its endpoint's token at its position, and the endpoints change exactly
    where the report's handovers say."""
    assert [p.position for p in pieces] == list(range(len(pieces)))  # no gap, no repeat
    for p in pieces:
        assert p.text == scripts[p.endpoint][p.position].text, p
    if not pieces:
        return
    expected: str | None = None  # before the first token, whoever started it
    changes = {m.handover_position: m for m in report.migrations}
    for p in pieces:
        if p.position in changes:
            assert expected in (None, changes[p.position].source), (p, report.migrations)
            expected = changes[p.position].target
        expected = expected or p.endpoint
        assert p.endpoint == expected, (p, report.migrations)


timings = st.fixed_dictionaries(
    {
        "prefill_s": st.floats(0.001, 0.5),
        "prefill_s_per_token": st.sampled_from([0.0, 0.001]),
        "gaps_s": st.lists(st.floats(0.001, 0.08), min_size=1, max_size=4),
        "fails_after": st.none() | st.integers(0, 12),
        "kv_cache": st.booleans(),
    }
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 24),
    device=timings,
    cloud=timings,
    dispatch=st.sampled_from(["race-both", "cloud-only", "device-only", "disco-s", "disco-d", "pd-device"]),
    migration=st.sampled_from(["disco-migrate", "never", "migrate-at"]),
    standby=st.booleans(),
)
def test_no_gap_no_repeat_whatever_the_timing_and_failures(
    n: int, device: dict, cloud: dict, dispatch: str, migration: str, standby: bool  # type: ignore[type-arg]
) -> None:
    scripts = {"device": script("device", n), "cloud": script("cloud", n)}
    endpoints = {name: ScriptedEndpoint(name, scripts[name], **timing) for name, timing in (("device", device), ("cloud", cloud))}

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        cfg = config(dispatch=dispatch, migration=migration, device_standby=standby)
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            with trio.fail_after(600):  # virtual seconds
                return await read_all(rt, max_tokens=n)

    pieces, report, error = run_virtual(main)
    event(f"{dispatch}, {migration}: " + (", ".join(m.kind for m in report.migrations) or "no handover"))
    event("failed" if error else "finished")
    check_attribution(pieces, report, scripts)
    assert report.text == "".join(p.text for p in pieces)
    if error is None:
        assert len(pieces) == n and report.finish_reason in ("stop", "length")
    else:
        # Only when both endpoints were scripted to fail can the answer fail.
        assert device["fails_after"] is not None and cloud["fails_after"] is not None
        assert report.finish_reason == "failed"


def test_failover_when_the_cloud_dies_mid_answer() -> None:
    scripts = {"device": script("device", 20), "cloud": script("cloud", 20)}
    endpoints = {
        "device": ScriptedEndpoint("device", scripts["device"], prefill_s=0.3, gaps_s=[0.01]),
        "cloud": ScriptedEndpoint("cloud", scripts["cloud"], prefill_s=0.05, gaps_s=[0.01], fails_after=6),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never", device_standby=False), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=20)

    pieces, report, error = run_virtual(main)
    assert error is None
    check_attribution(pieces, report, scripts)
    assert [p.endpoint for p in pieces[:6]] == ["cloud"] * 6
    assert {p.endpoint for p in pieces[6:]} == {"device"}
    assert [(m.kind, m.source, m.target, m.handover_position) for m in report.migrations] == [
        ("failover", "cloud", "device", 6)
    ]
    # the device's catch-up prefill (0.3 s) is the gap the reader sees
    assert report.migrations[0].gap_s == pytest.approx(0.3, abs=0.02)


def test_a_silent_cloud_fails_over_exactly_at_its_silence_deadline() -> None:
    scripts = {"device": script("device", 12), "cloud": script("cloud", 12)}
    endpoints = {
        "device": ScriptedEndpoint("device", scripts["device"], prefill_s=0.05, gaps_s=[0.01]),
        # a 5 s stall after 4 tokens: longer than the 0.5 s silence timeout
        "cloud": ScriptedEndpoint("cloud", scripts["cloud"], prefill_s=0.02, gaps_s=[0.01, 0.01, 0.01, 5.0]),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        cfg = config(dispatch="cloud-only", migration="never", pace=False, device_standby=False)
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=12)

    pieces, report, error = run_virtual(main)
    assert error is None and len(pieces) == 12
    check_attribution(pieces, report, scripts)
    (failover,) = report.migrations
    assert (failover.kind, failover.handover_position) == ("failover", 4)
    # The deadline is the run's own cancel scope, not a watchdog's polling tick: the failure is
    # noticed exactly silence_timeout_s after the last token (released at once: no pacing).
    assert failover.handover_s == pytest.approx(pieces[3].released_s + 0.5, abs=1e-6)


def test_a_cloud_that_never_starts_fails_over_at_the_first_token_deadline() -> None:
    scripts = {"device": script("device", 5), "cloud": script("cloud", 5)}
    endpoints = {
        "device": ScriptedEndpoint("device", scripts["device"], prefill_s=0.05),
        "cloud": ScriptedEndpoint("cloud", scripts["cloud"], prefill_s=100.0),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=5)

    pieces, report, error = run_virtual(main)
    assert error is None and [p.endpoint for p in pieces] == ["device"] * 5
    assert report.migrations[0].handover_s == pytest.approx(2.0, abs=1e-6)  # first_token_timeout_s


def test_the_answer_fails_clearly_when_every_endpoint_fails() -> None:
    scripts = {"device": script("device", 10), "cloud": script("cloud", 10)}
    endpoints = {
        "device": ScriptedEndpoint("device", scripts["device"], fails_after=2),
        "cloud": ScriptedEndpoint("cloud", scripts["cloud"], fails_after=3),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=10)

    pieces, report, error = run_virtual(main)
    assert isinstance(error, AnswerFailed)
    # 3 from the cloud, then 2 from the device resuming at 3: intact, each its own.
    assert [p.text for p in pieces] == ["c0 ", "c1 ", "c2 ", "d3 ", "d4 "]
    assert report.finish_reason == "failed"


def test_pacing_releases_at_the_reading_rate_in_virtual_time() -> None:
    endpoints = {"device": ScriptedEndpoint("device", script("device", 10), prefill_s=0.1, gaps_s=[0.001])}

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        cfg = config(dispatch="device-only", migration="never", slo=Slo(ttft_target_s=1.0, reading_rate=5.0))
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=10)

    pieces, report, _ = run_virtual(main)
    times = [p.released_s for p in pieces]
    assert times[0] == pytest.approx(0.1, abs=1e-3)  # TTFT is not paced
    assert all(b - a == pytest.approx(0.2, abs=1e-3) for a, b in zip(times, times[1:]))  # 5 tok/s
    assert report.late_tokens == 0
    assert report.qoe == pytest.approx(1.0)


# ----- device standby -----------------------------------------------------------------------


def standby_failover(standby: bool) -> pydisco.AnswerReport:
    """The cloud decodes (50 ms a token) and dies after 60 tokens; the device (a KV cache, 10 ms
    a prefilled token, a 200-token prompt) takes over."""
    scripts = {"device": script("device", 80), "cloud": script("cloud", 80)}
    endpoints = {
        "device": ScriptedEndpoint("device", scripts["device"], prefill_s=0.01, prefill_s_per_token=0.01,
                                   prompt_tokens=200, kv_cache=True),  # fmt: skip
        "cloud": ScriptedEndpoint("cloud", scripts["cloud"], prefill_s=0.05, gaps_s=[0.05], fails_after=60),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        cfg = config(dispatch="cloud-only", migration="never", device_standby=standby, first_token_timeout_s=5.0)
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=80)

    pieces, report, error = run_virtual(main)
    assert error is None
    check_attribution(pieces, report, scripts)
    return report


def test_device_standby_leaves_only_the_last_tokens_to_compute_at_a_failover() -> None:
    cold, warm = standby_failover(standby=False), standby_failover(standby=True)
    assert [m.kind for m in cold.migrations] == [m.kind for m in warm.migrations] == ["failover"]
    # Cold: the device prefills the prompt and all 60 tokens: 0.01 + 260·0.01 s.
    assert cold.migrations[0].gap_s == pytest.approx(0.01 + 260 * 0.01, abs=1e-3)
    # On standby it followed the prefix (after the prompt, each sync of a token or two takes
    # less than one 50 ms gap of the cloud), so a sync in flight and a token or two remain.
    assert warm.migrations[0].gap_s <= 2 * (0.01 + 2 * 0.01) + 1e-9
    # The standby prefills are the device's work, and they are counted.
    assert warm.usage["device"].prefilled_tokens >= 260


def test_no_standby_under_a_device_budget() -> None:
    from pydisco.policies._base import Budget

    scripts = {"device": script("device", 10), "cloud": script("cloud", 10)}
    device = ScriptedEndpoint("device", scripts["device"], prompt_tokens=50, kv_cache=True)
    endpoints = {"device": device, "cloud": ScriptedEndpoint("cloud", scripts["cloud"])}

    async def main() -> pydisco.AnswerReport:
        cfg = config(dispatch="cloud-only", migration="never", budget=Budget(constrained="device", share=0.3))
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            return (await read_all(rt, max_tokens=10))[1]

    report = run_virtual(main)
    assert "device" not in report.usage  # it never prefilled anything speculatively
    assert device.cached_tokens(GenerationRequest(prompt="hello")) == 0


# ----- the machine's rules, through the runtime ---------------------------------------------


class Overrunning:
    """An endpoint that ignores max_tokens, and says it sampled a token it never reported (as a
    stop string cut in two does)."""

    name = "device"

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        for position in range(request.start_position, request.start_position + 50):
            await trio.sleep(0.01)
            sink(TokenPiece(position, position, f"t{position} ", age_ns=3_000_000))
        return GenerationResult("stop", 4, 4, 51)


def test_the_machine_enforces_max_tokens() -> None:
    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="device-only"), endpoints={"device": Overrunning()}) as rt:
            with trio.fail_after(60):
                return await read_all(rt, max_tokens=7)

    pieces, report, error = run_virtual(main)
    assert error is None and [p.position for p in pieces] == list(range(7))
    assert report.finish_reason == "length"


class CutByStop(Overrunning):
    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        for position in range(3):
            sink(TokenPiece(position, position, f"t{position} "))
        return GenerationResult("stop", 4, 4, generated_tokens=4)  # the 4th was cut by the stop string


def test_an_answer_ends_where_its_reported_tokens_end() -> None:
    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="device-only"), endpoints={"device": CutByStop()}) as rt:
            with trio.fail_after(60):  # virtual: a hang would take them all
                return await read_all(rt, max_tokens=10)

    pieces, report, error = run_virtual(main)
    assert error is None and len(pieces) == 3 and report.finish_reason == "stop"


def test_token_records_carry_when_the_endpoint_produced_them() -> None:
    async def main() -> list[pydisco.Token]:
        async with open_runtime(config(dispatch="device-only", pace=False), endpoints={"device": Overrunning()}) as rt:
            async with rt.stream(prompt="hi", max_tokens=5) as answer:
                with trio.fail_after(60):
                    while answer.final_count is None:
                        await trio.sleep(0.01)
                    await trio.sleep(0.01)  # the virtual pacer releases the rest
                return list(answer.released_ring.pop_many())

    records = run_virtual(main)
    tokens, end = records[:-1], records[-1]
    assert [t.position for t in tokens] == list(range(5))
    assert all(t.arrived_ns - t.produced_ns == 3_000_000 for t in tokens)  # age_ns, on the answer's clock
    assert end.is_end and end.position == 5 and end.finish_reason == pydisco.FinishReason.LENGTH


class Buggy:
    """A custom endpoint with a bug: it raises a plain RuntimeError mid-answer."""

    name = "cloud"

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        for position in range(request.start_position, 3):
            await trio.sleep(0.01)
            sink(TokenPiece(position, 1000 + position, f"c{position} "))
        raise RuntimeError("a bug in a custom endpoint")


def test_any_endpoint_exception_fails_over_and_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    scripts = {"device": script("device", 8), "cloud": script("cloud", 8)}
    endpoints = {"device": ScriptedEndpoint("device", scripts["device"]), "cloud": Buggy()}

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:  # type: ignore[arg-type]
            return await read_all(rt, max_tokens=8)

    with caplog.at_level(logging.ERROR, logger="pydisco"):
        pieces, report, error = run_virtual(main)
    assert error is None
    check_attribution(pieces, report, scripts)
    assert [p.endpoint for p in pieces] == ["cloud"] * 3 + ["device"] * 5
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "a bug in a custom endpoint" in str(record.exc_info[1])


def test_disco_d_starts_the_device_at_once_when_the_cloud_fails_to_start() -> None:
    scripts = {"device": script("device", 4), "cloud": script("cloud", 4)}
    endpoints = {
        "device": ScriptedEndpoint("device", scripts["device"], prefill_s=0.05),
        "cloud": ScriptedEndpoint("cloud", scripts["cloud"], prefill_s=0.01, fails_after=0),
    }

    async def main() -> tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]:
        # No server TTFT sample yet: DiSCo-D waits w = the TTFT target (1 s) before the device.
        async with open_runtime(config(dispatch="disco-d", migration="never"), endpoints=endpoints) as rt:
            return await read_all(rt, max_tokens=4)

    pieces, report, error = run_virtual(main)
    assert error is None and [p.endpoint for p in pieces] == ["device"] * 4
    assert report.ttft_s == pytest.approx(0.01 + 0.05, abs=1e-6)  # not 1 s + 0.05


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    share=st.sampled_from([0.2, 0.4, 0.7]),
    dispatch=st.sampled_from(["disco-s", "disco-d"]),
    seed=st.integers(0, 1000),
)
def test_budget_holds_over_a_workload_through_the_runtime(share: float, dispatch: str, seed: int) -> None:
    """A workload through one runtime: the constrained endpoint's share of processed tokens,
    as the runtime reports it (prompt prefill + tokens produced), stays within the budget."""
    import random

    from pydisco.policies._base import Budget

    rng = random.Random(seed)
    constrained = "cloud" if dispatch == "disco-s" else "device"
    def words(request: GenerationRequest) -> int:
        return len((request.prompt or "").split())

    endpoints = {
        "device": ScriptedEndpoint("device", script("device", 30), prefill_s=0.05, prefill_s_per_token=0.0005,
                                   gaps_s=[0.01], prompt_tokens=words),  # fmt: skip
        "cloud": ScriptedEndpoint("cloud", script("cloud", 30), prefill_s=0.2, gaps_s=[0.005, 0.02], prompt_tokens=words),
    }
    cfg = config(dispatch=dispatch, migration="never", budget=Budget(constrained=constrained, share=share))
    constrained_tokens = 0
    answer_sizes = 0

    async def main() -> None:
        nonlocal constrained_tokens, answer_sizes
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            for _ in range(25):
                async with rt.stream(prompt="word " * rng.randint(5, 400), max_tokens=rng.randint(5, 30)) as answer:
                    async for _piece in answer:
                        pass
                processed = {n: u.prefilled_tokens + u.offered_tokens for n, u in answer.report.usage.items()}
                constrained_tokens += processed.get(constrained, 0)
                answer_sizes += max(processed.values(), default=0)  # DiSCo's l for this answer

    run_virtual(main)
    assert answer_sizes > 0
    event(f"{dispatch} b={share}: constrained endpoint used" if constrained_tokens else f"{dispatch} b={share}: unused")
    assert constrained_tokens <= share * answer_sizes + 1e-9, (constrained_tokens, answer_sizes)


def test_status_says_who_generates_and_what_is_unread() -> None:
    endpoints = {"device": ScriptedEndpoint("device", script("device", 10), prefill_s=0.1, gaps_s=[0.01])}

    async def main() -> list[pydisco.runtime.AnswerStatus]:
        cfg = config(dispatch="device-only", slo=Slo(ttft_target_s=1.0, reading_rate=10.0))
        seen = []
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            async with rt.stream(prompt="hi", max_tokens=10) as answer:
                async for _ in answer:
                    seen.append(answer.status())
        return seen

    seen = run_virtual(main)
    # The device decodes at 100 tok/s, the reader takes 10 tok/s: the buffer grows, then drains.
    assert (seen[0].state, seen[0].generating, seen[0].consumed) == ("streaming", "device", 1)
    middle = seen[4]  # at 0.5 s the device (done at 0.19 s) committed all ten, the reader took five
    assert (middle.state, middle.generating, middle.committed, middle.consumed, middle.unread) == ("finished", None, 10, 5, 5)
    assert seen[-1].unread == 0


# ----- cloud health -------------------------------------------------------------------------


def test_a_cloud_that_dropped_sits_out_with_exponential_backoff() -> None:
    from pydisco.runtime import Backoff

    scripts = {"device": script("device", 3), "cloud": script("cloud", 3)}
    cloud = ScriptedEndpoint("cloud", scripts["cloud"], prefill_s=0.01, fails_after=0, fails_on_run=None)
    endpoints = {"device": ScriptedEndpoint("device", scripts["device"], prefill_s=0.05), "cloud": cloud}

    async def main() -> list[tuple[int, float | None, str]]:
        cfg = config(dispatch="disco-d", migration="never", health_backoff=Backoff(initial_s=1.0, max_s=8.0, jitter=0.0))
        seen = []
        async with open_runtime(cfg, endpoints=endpoints) as rt:
            for pause in (0.0, 0.5, 1.0, 0.5, 2.0):
                await trio.sleep(pause)
                start = trio.current_time()
                pieces, report, error = await read_all(rt, max_tokens=3)
                assert error is None and [p.endpoint for p in pieces] == ["device"] * 3
                seen.append((cloud.runs, report.ttft_s, report.dispatch))
        return seen

    seen = run_virtual(main)
    runs = [s[0] for s in seen]
    # 1st: the cloud is tried and drops (the fallback starts at once). 2nd, 0.5 s later: it is
    # down for 1 s, so the device alone starts, without waiting w(l). 3rd, past the 1 s: tried
    # again, drops again: down for 2 s. 4th: down. 5th, 2 s later: tried once more.
    assert runs == [1, 1, 2, 2, 3]
    assert "only endpoint" in seen[1][2] and "only endpoint" in seen[3][2]
    assert seen[1][1] == pytest.approx(0.05, abs=1e-6)  # no w(l) wait for a cloud known down


def test_a_request_the_cloud_refuses_does_not_mark_it_down() -> None:
    from pydisco._errors import EndpointError

    class Refusing:
        name = "cloud"
        runs = 0

        async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
            self.runs += 1
            raise EndpointError("prompt too long for the cloud", code="prompt_too_long")

    refusing = Refusing()
    endpoints = {"device": ScriptedEndpoint("device", script("device", 3)), "cloud": refusing}

    async def main() -> None:
        async with open_runtime(config(dispatch="cloud-only", migration="never"), endpoints=endpoints) as rt:  # type: ignore[arg-type]
            for _ in range(2):
                pieces, _, error = await read_all(rt, max_tokens=3)
                assert error is None and len(pieces) == 3

    run_virtual(main)
    assert refusing.runs == 2  # asked again: refusing one request says nothing of its health


def test_backoff_grows_exponentially_within_its_jitter() -> None:
    import random

    from pydisco.runtime import Backoff

    backoff = Backoff(initial_s=0.5, max_s=4.0, jitter=0.2)
    rng = random.Random(1)
    for failures, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert base * 0.8 <= min(delays) < max(delays) <= base * 1.2


def test_waiting_for_a_busy_device_is_not_silence() -> None:
    """Two answers at once on one device: the second waits behind the first (3 s of decoding,
    longer than the 2 s first-token deadline) and must not be failed for it."""
    device = ScriptedEndpoint("device", script("device", 30), prefill_s=0.05, gaps_s=[0.1])

    async def main() -> list[tuple[list[pydisco.Piece], pydisco.AnswerReport, BaseException | None]]:
        results = []
        async with open_runtime(config(dispatch="device-only", migration="never"), endpoints={"device": device}) as rt:

            async def one(n: int) -> None:
                results.append(await read_all(rt, max_tokens=n))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 30)
                await trio.sleep(0.01)
                nursery.start_soon(one, 5)
        return results

    results = run_virtual(main)
    assert [len(pieces) for pieces, _, _ in results] == [30, 5]
    assert all(error is None and report.migrations == () for _, report, error in results)
    # The first ends at 0.05 + 29·0.1 = 2.95 s; the second then prefills (0.05 s): TTFT 3.0 − 0.01.
    assert results[1][1].ttft_s == pytest.approx(3.0 - 0.01, abs=1e-6)  # it waited its turn


def test_dispatch_sees_the_answers_queued_on_the_device() -> None:
    """While one answer holds the device, a second one's view counts it (and DiSCo-S, which
    would keep a short prompt on the device, races it instead); a third counts both."""
    seen: list[int] = []

    class Recorder:
        name = "test-recorder"  # as registered: the registry test checks every name

        def decide(self, view: DispatchView) -> DispatchDecision:
            seen.append(view.device_answers_ahead)
            return DispatchDecision(start=("device",), reason="recorder")

        def observe(self, outcome: object) -> None:
            pass

    register_dispatch_policy("test-recorder", lambda **_: Recorder(), replace=True)
    device = ScriptedEndpoint("device", script("device", 20), prefill_s=0.05, gaps_s=[0.1])

    async def main() -> None:
        async with open_runtime(config(dispatch="test-recorder", migration="never"), endpoints={"device": device}) as rt:
            async with trio.open_nursery() as nursery:
                for n in (20, 3, 3):
                    nursery.start_soon(read_all, rt, n)
                    await trio.sleep(0.01)

    run_virtual(main)
    assert seen == [0, 1, 2]
