"""Device profile (TTFT fit, decode speed, per-machine cache), cost rates, `pydisco profile`."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
from device_support import shared_engine

from pydisco import cli
from pydisco.cli import _profile as _cmd_profile
from pydisco.device import (
    CostRates,
    DeviceProfile,
    fit_line,
    load_or_measure_profile,
    load_profile,
    machine_id,
    measure_profile,
    profile_cache_dir,
    profile_cache_path,
    save_profile,
)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def measured() -> DeviceProfile:
    # Small lengths and few rounds keep this to a few seconds; the fit still spans 16x.
    return measure_profile(shared_engine(), lengths=(8, 48, 128), repeats=2, decode_tokens=8)


def test_prefill_time_grows_with_prompt_length(measured: DeviceProfile) -> None:
    engine = shared_engine()
    assert measured.model_id == engine.model_id and measured.n_threads == engine.n_threads
    assert measured.machine_id == machine_id()
    assert measured.prefill_c_s_per_token > 0
    assert measured.ttft(128) > measured.ttft(8) > 0
    assert measured.decode_s_per_token > 0 and measured.decode_tokens_per_s > 1


def test_fit_line_is_least_squares() -> None:
    a, c = fit_line([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert a == pytest.approx(1.0) and c == pytest.approx(2.0)
    a, c = fit_line([0, 0, 2, 2], [0.0, 2.0, 4.0, 6.0])  # noisy: the line through the means
    assert a == pytest.approx(1.0) and c == pytest.approx(2.0)
    a, c = fit_line([1, 2, 3], [0.0, 2.0, 4.0])  # would cross below zero: through the origin
    assert a == 0 and c == pytest.approx(16 / 14)
    assert fit_line([1, 2], [3.0, 1.0]) == (2.0, 0.0)  # falling times: flat
    with pytest.raises(ValueError):
        fit_line([5, 5], [1.0, 2.0])


def test_the_cache_is_per_model_and_machine_and_survives_garbage(
    measured: DeviceProfile, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert load_profile(measured.model_id, measured.n_threads) is None
    path = save_profile(measured)
    assert path == profile_cache_path(measured.model_id, measured.n_threads)
    assert path.parent == tmp_path / "pydisco" / "profiles"
    assert load_or_measure_profile(shared_engine()) == measured  # from the cache: no new measurement
    assert load_profile(measured.model_id, measured.n_threads + 1) is None
    path.write_text("{not json")
    assert load_profile(measured.model_id, measured.n_threads) is None


def test_cost_rates_turn_tokens_into_units(measured: DeviceProfile) -> None:
    assert CostRates().cost(10, 5) == 15
    joules = CostRates.energy(measured, watts=4.0)
    assert joules.unit == "J"
    assert joules.cost(100, 0) == pytest.approx(100 * measured.prefill_c_s_per_token * 4.0)
    assert joules.cost(0, 10) == pytest.approx(10 * measured.decode_s_per_token * 4.0)
    with pytest.raises(ValueError):
        CostRates(prefill_per_token=-1)


def test_the_profile_command_prints_the_cached_profile(
    measured: DeviceProfile, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "pydisco.cli._profile" in cli.SUBCOMMAND_MODULES
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    save_profile(measured)
    parser = argparse.ArgumentParser()
    _cmd_profile.add_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", "--json", "--threads", str(measured.n_threads)])
    assert args.func(args) == 0
    assert DeviceProfile.from_json(json.loads(capsys.readouterr().out)) == measured


def test_profiles_live_in_the_user_cache_folder(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """platformdirs' user cache folder: $XDG_CACHE_HOME when set, else ~/.cache, on Linux."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert profile_cache_dir() == tmp_path / "home" / ".cache" / "pydisco" / "profiles"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert profile_cache_dir() == tmp_path / "xdg" / "pydisco" / "profiles"


def test_a_profile_measured_on_a_busy_machine_is_measured_again_once_it_is_quieter(
    measured: DeviceProfile, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profile taken while other work filled the cores (a build, say) would make every later
    start think the device slower than it is: it is replaced once the machine is at most half
    as busy, and kept while it is as busy as then (measuring again would say the same)."""
    import dataclasses

    from pydisco.device import _profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    busy = dataclasses.replace(measured, decode_s_per_token=measured.decode_s_per_token * 5, load_per_cpu=2.5)
    fresh = dataclasses.replace(measured, load_per_cpu=0.4)
    save_profile(busy)
    monkeypatch.setattr(_profile, "measure_profile", lambda engine: fresh)
    monkeypatch.setattr(_profile, "load_per_cpu", lambda: 2.0)  # still busy: the cached one stands
    assert load_or_measure_profile(shared_engine()) == busy
    monkeypatch.setattr(_profile, "load_per_cpu", lambda: 0.5)  # quieter: measured again, cached
    assert load_or_measure_profile(shared_engine()) == fresh
    assert load_profile(measured.model_id, measured.n_threads) == fresh
    # A profile from before the load was recorded is taken as it is.
    legacy = {k: v for k, v in busy.to_json().items() if k != "load_per_cpu"}
    profile_cache_path(measured.model_id, measured.n_threads).write_text(json.dumps(legacy))
    assert load_or_measure_profile(shared_engine()).load_per_cpu is None
    assert measured.load_per_cpu is not None and measured.load_per_cpu >= 0  # what a measurement records
