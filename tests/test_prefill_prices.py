"""Prefill priced apart from decode (``RuntimeConfig.prefill_cost_per_token``): it prices usage
and decides whether a migration pays, since a migration's overhead is the target's prefill."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from pydisco import ConfigurationError, RuntimeConfig
from pydisco.policies import create_migration_policy
from pydisco.policies._base import prefill_rate
from pydisco.testing import ScriptedEndpoint

from test_new_user_fixes import usage_after_a_cloud_failure, pieces
from test_policies import migration_view


def test_prefill_rate_falls_back_to_the_token_price_then_to_zero() -> None:
    prices = {"cloud": 1.0, "device": 0.2}
    assert prefill_rate(prices, {"device": 0.02}, "device") == 0.02
    assert prefill_rate(prices, {"device": 0.02}, "cloud") == 1.0
    assert prefill_rate(prices, {}, "elsewhere") == 0.0


def test_usage_prices_prefilled_tokens_at_the_prefill_price() -> None:
    cloud = ScriptedEndpoint("cloud", pieces("cloud", 4), prompt_tokens=100, fails_after=0)
    usage = trio.run(
        lambda: usage_after_a_cloud_failure(cloud, prefill_cost_per_token={"cloud": 0.25, "device": 0.02}),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    assert usage["cloud"] == (100, pytest.approx(25.0))  # 100 prefilled at 0.25, none decoded
    assert usage["device"] == (100, pytest.approx(0.02 * 100 + 0.2 * 4))


def test_a_cheap_prefill_makes_a_long_catch_up_worth_migrating() -> None:
    policy = create_migration_policy("disco-migrate")
    # 1440 tokens to catch up at the device's token price (0.1) cost 144, the whole saving.
    long_catch_up = migration_view(catch_up_tokens=1440)
    assert not policy.should_migrate(long_catch_up)
    # At a prefill price of 0.01 they cost 14.4: the move pays.
    assert policy.should_migrate(dataclasses.replace(long_catch_up, prefill_cost_per_token={"device": 0.01}))
    # The source's prefill price does not enter: only the target catches up.
    assert not policy.should_migrate(dataclasses.replace(long_catch_up, prefill_cost_per_token={"cloud": 0.0}))


@pytest.mark.parametrize("field", ["cost_per_token", "prefill_cost_per_token"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_a_price_that_is_not_a_finite_number_at_least_zero_is_refused(field: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=field):
        RuntimeConfig(device_model=None, **{field: {"device": value}})  # type: ignore[arg-type]
