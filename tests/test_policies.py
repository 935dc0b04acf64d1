"""Dispatch and migration policies: decisions on hand-made views, the budget constraints of
DiSCo-S's threshold and DiSCo-D's wait plan, P/D-Device's controller, the budget ledger over a
synthetic workload and over the real Azure trace, and the registry."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydisco.policies import (
    AnswerOutcome,
    Budget,
    BudgetLedger,
    DeviceSpeed,
    DiscoDPolicy,
    DiscoSPolicy,
    DispatchDecision,
    DispatchPolicy,
    DispatchView,
    MigrationView,
    PdDevicePolicy,
    Slo,
    create_dispatch_policy,
    create_migration_policy,
    disco_d_plan,
    disco_s_threshold,
    dispatch_policy_names,
    migration_policy_names,
    pd_device_plan,
    register_dispatch_policy,
)
from pydisco.policies._budget import LengthSample, SortedLengths, survival
from pydisco.workloads import TraceRequest, load_azure_trace, load_server_ttft, synthetic_workload

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "traces" / "AzureLLMInferenceTrace_conv.csv"
SERVER_TTFT = DATA / "server_ttft"

DEVICE = DeviceSpeed(prefill_a_s=0.05, prefill_c_s_per_token=0.0005, decode_s_per_token=0.008)


def view(**changes: object) -> DispatchView:
    base = DispatchView(
        prompt_tokens=500,
        max_tokens=256,
        slo=Slo(ttft_target_s=1.0, reading_rate=4.5),
        budget=Budget("cloud", 1.0),
        device=DEVICE,
        cloud_available=True,
        server_ttft_samples_s=(),
        server_tbt_s=None,
        tokens_spent={},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ----- simple policies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, device, cloud, start",
    [
        ("device-only", True, True, ("device",)),
        ("device-only", False, True, ()),
        ("cloud-only", True, True, ("cloud",)),
        ("cloud-only", True, False, ()),
        ("race-both", True, True, ("device", "cloud")),
        ("race-both", False, True, ("cloud",)),
        ("race-both", True, False, ("device",)),
        ("race-both", False, False, ()),
    ],
)
def test_simple_policies(name: str, device: bool, cloud: bool, start: tuple[str, ...]) -> None:
    policy = create_dispatch_policy(name)
    decision = policy.decide(view(device=DEVICE if device else None, cloud_available=cloud))
    assert decision.start == start
    assert decision.fallback is None and decision.handoff is None


# ----- DiSCo-S ---------------------------------------------------------------------------------


def test_disco_s_short_prompts_on_device_long_ones_race() -> None:
    sample = [100] * 10 + [1000] * 5 + [4000]
    # Server budget 0.5 of 10 000 prompt tokens: the 4000 fits, 4000 + 5·1000 does not.
    policy = DiscoSPolicy(prompt_lengths=sample)
    budget = Budget("cloud", 0.5)
    assert policy.threshold(view(budget=budget)) == 1001
    assert policy.decide(view(budget=budget, prompt_tokens=1000)).start == ("device",)
    # The worst case of a long prompt must fit the (empty) ledger's share, so give it room.
    for _ in range(20):
        policy.ledger.record(AnswerOutcome(100, {"device": 2000}, None))
    assert policy.decide(view(budget=budget, prompt_tokens=1001)).start == ("device", "cloud")
    assert policy.decide(view(budget=budget, prompt_tokens=1001, device=None)).start == ("cloud",)
    assert policy.decide(view(budget=budget, prompt_tokens=10, cloud_available=False)).start == ("device",)
    assert policy.decide(view(budget=budget, device=None, cloud_available=False)).start == ()


def test_disco_s_races_a_short_prompt_that_would_queue_on_a_busy_device() -> None:
    policy = DiscoSPolicy(prompt_lengths=[100] * 10 + [1000] * 5 + [4000])
    for _ in range(20):  # room in the ledger, so the guard lets a race through
        policy.ledger.record(AnswerOutcome(100, {"device": 2000}, None))
    short = dict(budget=Budget("cloud", 0.5), prompt_tokens=100)
    assert policy.decide(view(**short)).start == ("device",)
    busy = policy.decide(view(**short, device_answers_ahead=2))
    assert busy.start == ("device", "cloud") and "2 answer(s) ahead" in busy.reason
    patient = DiscoSPolicy(prompt_lengths=[100] * 10 + [1000] * 5 + [4000], race_when_device_busy=False)
    assert patient.decide(view(**short, device_answers_ahead=2)).start == ("device",)


def test_disco_s_learns_the_threshold_from_observed_prompts() -> None:
    requests = synthetic_workload(3000, seed=2)
    policy = DiscoSPolicy(window=None)
    budget = Budget("cloud", 0.3)
    for r in requests:
        policy.observe(AnswerOutcome(r.prompt_tokens, {"device": r.prompt_tokens + r.output_tokens}, None))
    # The sorted sample is refreshed whenever 1 % of it is new: it lags by less than that.
    seen = len(policy.prompt_lengths.sorted)
    assert len(requests) * 0.99 <= seen <= len(requests)
    expected = disco_s_threshold(SortedLengths.of(r.prompt_tokens for r in requests[:seen]), 0.3)
    assert policy.threshold(view(budget=budget)) == expected
    assert 0 < expected < math.inf


def test_disco_s_without_samples_keeps_a_lone_prompt_on_the_device() -> None:
    policy = DiscoSPolicy()
    assert policy.decide(view(budget=Budget("cloud", 0.9), prompt_tokens=3000)).start == ("device",)
    assert policy.decide(view(budget=Budget("cloud", 1.0), prompt_tokens=3000)).start == ("device", "cloud")


lengths_lists = st.lists(st.integers(0, 20000), min_size=1, max_size=300)
shares = st.floats(0.0, 1.0)


@settings(max_examples=150, deadline=None)
@given(lengths_lists, shares)
def test_disco_s_threshold_is_the_smallest_within_budget(lengths: list[int], share: float) -> None:
    threshold = disco_s_threshold(SortedLengths.of(lengths), share)
    total = sum(lengths)

    def server_tokens(t: float) -> int:
        return sum(l for l in lengths if l >= t)

    assert server_tokens(threshold) <= share * total + 1e-9 * total
    if 0 < threshold < math.inf:
        assert server_tokens(threshold - 1) > share * total  # one lower breaks the budget


# ----- DiSCo-D ---------------------------------------------------------------------------------

SERVER = tuple(sorted([0.2, 0.25, 0.3, 0.3, 0.35, 0.4, 0.5, 0.6, 0.9, 3.0] * 10))


def test_disco_d_short_prompts_race_at_once_long_ones_wait_for_the_tail() -> None:
    sample = [50] * 10 + [1000] * 80 + [20000] * 10  # 280 500 prompt tokens
    policy = DiscoDPolicy(prompt_lengths=sample, server_ttft_prior=SERVER, tail_quantile=0.9)
    for _ in range(100):
        policy.ledger.record(AnswerOutcome(100, {"cloud": 2000}, 0.3))
    budget = Budget("device", 0.035)  # 9817.5 device tokens
    plan = policy.plan(view(budget=budget))
    assert plan is not None
    # Tail: F_s⁻¹(0.9) = 0.9 s; the device (0.05 + 0.0005·l s) can beat a 3 s server for
    # l < (3 − 0.9 − 0.05)/0.0005 = 4100 tokens, not for 20 000. Phase 1 costs
    # 0.1·(500 + 80 000) = 8050; phase 2 moves the 50-token prompts to w = 0 (0.9·500 = 450)
    # and what is left (1317.5) is too little to lower the 1000-token prompts' wait.
    assert plan.tail_wait_s == 0.9
    assert plan.tail_below == pytest.approx(4100)
    short = policy.decide(view(budget=budget, prompt_tokens=50))
    assert short.start == ("cloud",) and short.fallback == ("device", 0.0)
    assert policy.decide(view(budget=budget, prompt_tokens=1000)).fallback == ("device", 0.9)
    long = policy.decide(view(budget=budget, prompt_tokens=20000))
    assert long.start == ("cloud",) and long.fallback is None
    # A 1050-token prompt with all but 50 tokens in the device's cache costs the device the
    # time of a 50-token prompt: w(l) follows TTFT_d of the tokens it must compute.
    cached = policy.decide(view(budget=budget, prompt_tokens=1050, device_cached_tokens=1000))
    assert cached.fallback == ("device", 0.0)
    assert plan.expected_share * 280_500 == pytest.approx(8050 + 450)

    # A larger budget (42 075) lowers the 1000-token prompts' wait: 34 025 − 450 left buys
    # P(TTFT_s > w) ≤ 0.1 + 33 575/80 000 = 0.52, and the smallest such sampled w is 0.35 s.
    wider = policy.decide(view(budget=Budget("device", 0.15), prompt_tokens=1000))
    assert wider.fallback == ("device", 0.35)


def test_disco_d_endpoints_and_cold_start() -> None:
    policy = DiscoDPolicy()
    # Cold start, no prompt seen yet: w(l) is planned for the prompt at hand alone.
    cold = policy.plan(view(budget=Budget("device", 0.5), server_ttft_samples_s=SERVER))
    assert cold is not None and cold.wait_for(500) is not None
    assert survival(SERVER, cold.wait_for(500)) <= 0.5
    # No server TTFT seen yet: the device starts once the server missed the TTFT target.
    assert policy.decide(view(budget=Budget("device", 1.0))).fallback == ("device", 1.0)
    assert policy.decide(view(device=None)).start == ("cloud",)
    assert policy.decide(view(cloud_available=False)).start == ("device",)
    # Later the view's recent samples are F_s, or failing that the observed cloud TTFTs.
    policy.observe(AnswerOutcome(500, {"cloud": 700}, 0.4))
    plan = policy.plan(view(budget=Budget("device", 1.0)))
    assert plan is not None and plan.zero_below > 500


@st.composite
def plan_inputs(draw: st.DrawFn) -> tuple[list[int], list[float], DeviceSpeed, float, float]:
    lengths = draw(st.lists(st.integers(0, 8000), min_size=1, max_size=60))
    server = draw(st.lists(st.floats(0.0, 30.0), min_size=1, max_size=40))
    device = DeviceSpeed(draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 0.005)), 0.01)
    return lengths, server, device, draw(shares), draw(st.floats(0.0, 1.0))


@settings(max_examples=150, deadline=None)
@given(plan_inputs())
def test_disco_d_plan_meets_the_device_budget(
    inputs: tuple[list[int], list[float], DeviceSpeed, float, float],
) -> None:
    lengths, server, device, share, q = inputs
    s = sorted(server)
    plan = disco_d_plan(SortedLengths.of(lengths), s, device, share, q)
    total = sum(lengths)
    cost = sum(survival(s, plan.wait_for(l)) * l for l in lengths)
    assert cost <= share * total + 1e-6 * (total + 1)
    assert plan.expected_share * total == pytest.approx(cost, abs=1e-6 * (total + 1))
    # w(l) never shrinks as prompts grow (None = never, the largest).
    waits = [plan.wait_for(l) for l in sorted(set(lengths))]
    keys = [math.inf if w is None else w for w in waits]
    assert keys == sorted(keys)
    # The device starts only where it can still win: w + TTFT_d(l) < max TTFT_s.
    for l, w in zip(sorted(set(lengths)), waits):
        if w is not None:
            assert w + device.ttft(l) < max(s)


@settings(max_examples=100, deadline=None)
@given(plan_inputs())
def test_disco_d_plan_spends_a_tight_budget(
    inputs: tuple[list[int], list[float], DeviceSpeed, float, float],
) -> None:
    """Budget is left over only when every prompt the device could help starts at w = 0, or
    when what is left cannot buy the next length (prompts of one length share one wait, and
    the empirical P(TTFT_s > w) moves in steps)."""
    lengths, server, device, share, q = inputs
    s = sorted(server)
    plan = disco_d_plan(SortedLengths.of(lengths), s, device, share, q)
    total = sum(lengths)
    cost = sum(survival(s, plan.wait_for(l)) * l for l in lengths)
    helpable = [l for l in lengths if device.ttft(l) < max(s)]
    largest_group = max((lengths.count(l) * l for l in helpable), default=0)
    if cost < share * total - largest_group - 1e-6:
        assert all(plan.wait_for(l) == 0.0 for l in helpable)


# ----- P/D-Device ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 16000), st.integers(1, 1024), st.floats(0.0, 2.0), st.floats(0.0, 0.01),
    st.floats(0.0, 5.0), st.floats(0.001, 1.0),
)
def test_pd_device_controller(
    l: int, max_tokens: int, a: float, c: float, ttft_c: float, tau_display: float
) -> None:
    handoff = pd_device_plan(l, max_tokens, a, c, ttft_c, tau_display)

    def catch_up(k: int) -> float:
        return a + c * (l + k) - ttft_c

    def enough(k: int) -> bool:
        return k * tau_display >= catch_up(k)

    if handoff is None:
        # No K up to max_tokens lets the device catch up at the display pace.
        assert not any(enough(k) for k in range(1, max_tokens + 1))
        return
    k, tau = handoff.cloud_tokens, handoff.interval_s
    assert 1 <= k <= max_tokens
    assert k * tau >= catch_up(k) - 1e-9  # the cloud's tokens last until the device is ready
    assert tau == pytest.approx(max(tau_display, catch_up(k) / k))
    assert tau == pytest.approx(tau_display)  # the smallest K keeps the display pace
    if k > 1:
        assert not enough(k - 1)  # ... and is the smallest


def test_pd_device_policy_decisions() -> None:
    policy = PdDevicePolicy(server_ttft_prior=[0.4, 0.5, 0.6])
    v = view(prompt_tokens=4000, max_tokens=512)
    decision = policy.decide(v)
    assert decision.start == ("cloud",) and decision.handoff is not None
    # τ_display = 1/4.5 s, TTFT_c = 0.5 s: K·(0.2222 − 0.0005) ≥ 0.05 + 2 − 0.5 → K = 7.
    assert decision.handoff.cloud_tokens == 7
    assert decision.handoff.interval_s == pytest.approx(1 / 4.5)
    # With 3000 of the prompt's tokens in the device's cache it computes only 1000:
    # K·0.2217 ≥ 0.05 + 0.5 − 0.5 → K = 1.
    cached = policy.decide(dataclasses.replace(v, device_cached_tokens=3000))
    assert cached.handoff is not None and cached.handoff.cloud_tokens == 1
    # A cloud slower than reading paces the tokens itself: τ = TBT.
    slow = policy.decide(dataclasses.replace(v, server_tbt_s=0.3))
    assert slow.handoff is not None and slow.handoff.interval_s == pytest.approx(0.3)
    assert policy.decide(dataclasses.replace(v, device=None)).start == ("cloud",)
    assert policy.decide(dataclasses.replace(v, cloud_available=False)).start == ("device",)
    # A device slower at prefill than the display pace never catches up: cloud serves it all.
    crawl = DeviceSpeed(0.05, 0.5, 0.01)
    assert policy.decide(dataclasses.replace(v, device=crawl)) == DispatchDecision(
        start=("cloud",), reason="pd-device: device cannot catch up within max_tokens"
    )


# ----- migration -----------------------------------------------------------------------------


def migration_view(**changes: object) -> MigrationView:
    # t_m = 0.5 + 0.002·500 = 1.5 s on the device; overhead 0.1·500 = 50; E[total] = 200.
    base = MigrationView(
        now_s=2.0, source="cloud", target="device", prompt_tokens=500, committed=40, unread=20,
        reading_rate=4.0, max_tokens=512, catch_up_tokens=500, answer_lengths=(200,),
        device=DeviceSpeed(prefill_a_s=0.5, prefill_c_s_per_token=0.002, decode_s_per_token=0.01),
        server_ttft_samples_s=(), cost_per_token={"cloud": 1.0, "device": 0.1},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_disco_migrate_needs_buffer_and_saving() -> None:
    policy = create_migration_policy("disco-migrate")
    # Buffer 20 ≥ 4·1.5 = 6, saving 0.9·160 − 50 = 94 > 0.
    assert policy.should_migrate(migration_view())
    assert not policy.should_migrate(migration_view(unread=5))  # 5 < 6: the reader would wait
    assert policy.should_migrate(migration_view(unread=6))
    # 1440 tokens to catch up: overhead 144 = the saving (and t_m = 3.38 s, still covered).
    assert not policy.should_migrate(migration_view(catch_up_tokens=1440))
    assert not policy.should_migrate(migration_view(answer_lengths=(30,)))  # nothing left
    assert not policy.should_migrate(migration_view(cost_per_token={"cloud": 0.1, "device": 1.0}))
    # E[l_remaining] is capped by max_tokens: 50 left at most → 0.9·50 = 45 < 50.
    assert not policy.should_migrate(migration_view(max_tokens=90, answer_lengths=(1000,)))
    margin = create_migration_policy("disco-migrate", buffer_margin=4.0)
    assert not margin.should_migrate(migration_view())  # 20 < 4·6
    assert not create_migration_policy("never").should_migrate(migration_view())


def test_migration_estimates_are_the_policies_own() -> None:
    from pydisco.policies import (
        DEFAULT_CLOUD_TTFT_S,
        UNPROFILED_DEVICE,
        catch_up_time,
        expected_answer_tokens,
        migration_overhead,
    )

    assert catch_up_time(migration_view()) == pytest.approx(1.5)
    # A device never profiled is assumed to be SmolLM2 on two cores.
    assert catch_up_time(migration_view(device=None)) == pytest.approx(UNPROFILED_DEVICE.prefill(500))
    # Towards the cloud, t_m is its usual TTFT: the median of the samples, or the default.
    to_cloud = migration_view(source="device", target="cloud")
    assert catch_up_time(to_cloud) == DEFAULT_CLOUD_TTFT_S
    assert catch_up_time(dataclasses.replace(to_cloud, server_ttft_samples_s=(0.1, 0.9, 0.2))) == 0.2
    assert migration_overhead(to_cloud) == pytest.approx(1.0 * 500)
    assert expected_answer_tokens((), max_tokens=128) == 64  # before any answer: half the limit
    assert expected_answer_tokens([10] * 50 + [30] * 100, max_tokens=128) == 30  # the last 100


# ----- the budget ledger over workloads -------------------------------------------------------


def simulate(
    policy: DispatchPolicy,
    requests: Sequence[TraceRequest],
    budget: Budget,
    server_ttft: Sequence[float],
    *,
    seed: int = 0,
    max_tokens: int = 1024,
) -> tuple[list[float], list[DispatchDecision]]:
    """Run a workload through a policy, one answer at a time, with a simple outcome model: the
    server's TTFT drawn from ``server_ttft``, the device's from DEVICE; the first token wins
    and the loser is counted as having prefilled the whole prompt. Returns the constrained
    endpoint's share after every answer (counted here, not by the policy) and the decisions."""
    rng = random.Random(seed)
    recent: list[float] = []
    spent = total = 0
    shares, decisions = [], []
    for r in requests:
        l, o = r.prompt_tokens, min(r.output_tokens, max_tokens)
        d = policy.decide(view(prompt_tokens=l, max_tokens=max_tokens, budget=budget,
                               server_ttft_samples_s=tuple(recent[-100:])))
        decisions.append(d)
        s, dev = rng.choice(server_ttft), DEVICE.ttft(l)
        tokens: dict[str, int]
        if d.handoff is not None:
            k = d.handoff.cloud_tokens
            tokens = {"cloud": l + o} if o <= k else {"cloud": l + k, "device": l + o}
        elif set(d.start) == {"device", "cloud"}:
            tokens = {"cloud": l + o, "device": l} if s < dev else {"device": l + o, "cloud": l}
        elif d.start == ("cloud",) and d.fallback is not None and s > d.fallback[1]:
            won = s < d.fallback[1] + dev
            tokens = {"cloud": l + o, "device": l} if won else {"device": l + o, "cloud": l}
        else:
            tokens = {d.start[0]: l + o}
        if "cloud" in tokens:
            recent.append(s)
        policy.observe(AnswerOutcome(l, tokens, s if "cloud" in tokens else None))
        spent += tokens.get(budget.constrained, 0)
        total += max(tokens.values())
        shares.append(spent / total)
    return shares, decisions


def uses(decision: DispatchDecision, endpoint: str) -> bool:
    return (endpoint in decision.start or decision.handoff is not None
            or (decision.fallback is not None and decision.fallback[0] == endpoint))


SYNTHETIC_SERVER = tuple(random.Random(9).lognormvariate(math.log(0.4), 0.8) for _ in range(300))


@pytest.mark.parametrize(
    "name, budget, options",
    [
        ("disco-s", Budget("cloud", 0.3), {}),
        ("disco-d", Budget("device", 0.1), {"server_ttft_prior": SYNTHETIC_SERVER}),
        ("race-both", Budget("cloud", 0.2), {}),
        ("race-both", Budget("device", 0.2), {}),
        ("pd-device", Budget("cloud", 0.1), {}),
    ],
)
def test_budget_holds_over_a_synthetic_workload(name: str, budget: Budget, options: dict[str, object]) -> None:
    requests = synthetic_workload(2000, seed=4)
    policy = create_dispatch_policy(name, **options)
    shares, decisions = simulate(policy, requests, budget, SYNTHETIC_SERVER)
    assert max(shares) <= budget.share
    assert any(uses(d, budget.constrained) for d in decisions)  # the budget was used, not shunned
    assert policy.ledger.share(budget.constrained) == pytest.approx(shares[-1])  # type: ignore[attr-defined]


def test_guard_prefers_the_runtime_count_when_it_is_ahead() -> None:
    ledger = BudgetLedger()
    ledger.record(AnswerOutcome(100, {"device": 10_000}, None))
    budget = Budget("cloud", 0.5)
    assert ledger.allows(budget, 1000)
    assert not ledger.allows(budget, 1000, {"cloud": 5_000})
    policy = create_dispatch_policy("race-both")
    policy.observe(AnswerOutcome(100, {"device": 10_000}, None))
    assert policy.decide(view(budget=budget, max_tokens=900)).start == ("device", "cloud")
    blocked = policy.decide(view(budget=budget, max_tokens=900, tokens_spent={"cloud": 5_000}))
    assert blocked.start == ("device",) and "budget" in blocked.reason


def test_length_sample_window_and_refresh() -> None:
    sample = LengthSample(seed=[5, 1], window=3)
    assert list(sample.sorted.values) == [1, 5]
    sample.add(9)
    sample.add(2)  # the window drops the oldest (5)
    assert list(sample.sorted.values) == [1, 2, 9] and list(sample.sorted.prefix) == [0, 1, 3, 12]
    with pytest.raises(ValueError):
        sample.add(-1)


# ----- the real Azure trace with measured server TTFTs ------------------------------------------

needs_azure = pytest.mark.skipif(
    not (AZURE.exists() and SERVER_TTFT.is_dir()),
    reason=f"the Azure trace or server TTFT records are not in {DATA}; they live outside the repo",
)


@pytest.mark.shared_data
@needs_azure
@pytest.mark.parametrize(
    "name, budget, provider",
    [("disco-s", Budget("cloud", 0.25), "together_70b"), ("disco-d", Budget("device", 0.1), "replicate_70b")],
)
def test_budget_holds_over_the_azure_trace(name: str, budget: Budget, provider: str) -> None:
    requests = load_azure_trace(AZURE)
    server = load_server_ttft(SERVER_TTFT / f"{provider}.json").ttft_s
    options: dict[str, object] = {"server_ttft_prior": server} if name == "disco-d" else {}
    policy = create_dispatch_policy(name, **options)
    shares, decisions = simulate(policy, requests, budget, server)
    assert max(shares) <= budget.share
    assert any(uses(d, budget.constrained) for d in decisions)
    if isinstance(policy, DiscoSPolicy):
        # Learned from the trace: short prompts stayed on the device once the threshold was known.
        l_th = policy.threshold(view(budget=budget))
        tail = decisions[len(decisions) // 2:]
        tail_requests = requests[len(requests) // 2:]
        assert all(d.start == ("device",) for d, r in zip(tail, tail_requests) if r.prompt_tokens < l_th)
    if isinstance(policy, DiscoDPolicy):
        plan = policy.plan(view(budget=budget, server_ttft_samples_s=()))
        assert plan is not None and plan.expected_share <= budget.share + 1e-9


# ----- registry --------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(dispatch_policy_names()) >= {
        "device-only", "cloud-only", "race-both", "disco-s", "disco-d", "pd-device"
    }
    assert set(migration_policy_names()) >= {"disco-migrate", "never"}
    for name in dispatch_policy_names():
        assert create_dispatch_policy(name).name == name
    with pytest.raises(ValueError, match="known: .*disco-d"):
        create_dispatch_policy("disco-x")
    with pytest.raises(ValueError, match="known: .*never"):
        create_migration_policy("sometimes")
    with pytest.raises(ValueError, match="tail_quantil"):
        create_dispatch_policy("disco-s", tail_quantil=0.9)


def test_register_your_own_policy() -> None:
    class Alternate:
        name = "test-alternate"

        def __init__(self, *, first: str = "device") -> None:
            self.next = first

        def decide(self, view: DispatchView) -> DispatchDecision:
            endpoint = self.next
            self.next = "cloud" if endpoint == "device" else "device"
            return DispatchDecision(start=(endpoint,))  # type: ignore[arg-type]

        def observe(self, outcome: AnswerOutcome) -> None:
            pass

    register_dispatch_policy("test-alternate", Alternate)
    try:
        policy = create_dispatch_policy("test-alternate", first="cloud")
        assert [policy.decide(view()).start for _ in range(3)] == [("cloud",), ("device",), ("cloud",)]
        with pytest.raises(ValueError, match="already registered"):
            register_dispatch_policy("test-alternate", Alternate)
        register_dispatch_policy("test-alternate", Alternate, replace=True)
    finally:
        from pydisco.policies import _DISPATCH

        _DISPATCH.pop("test-alternate", None)
