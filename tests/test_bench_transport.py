"""bench/transport.py's own plumbing: the soak figures it takes from bench/soak.py (or says why
there are none), and the JSON it finds in another script's output."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import transport as bench  # type: ignore[import-not-found]  # noqa: E402  (bench/ holds scripts, not a package)


def test_without_soak_py_the_soak_keys_are_null_with_a_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    figures = bench.soak_figures(quick=True)
    assert figures["soak_rss_slope_mb_per_min"] is None and figures["soak_lost_answers"] is None
    assert "does not exist" in figures["soak_missing"]


@pytest.mark.parametrize("body, expected", [
    ('import json; print("warming up"); '
     'print(json.dumps({"soak_rss_slope_mb_per_min": 0.25, "soak_lost_answers": 0, "argv": argv}))',
     {"soak_rss_slope_mb_per_min": 0.25, "soak_lost_answers": 0}),
    ('return {"soak_rss_slope_mb_per_min": -0.1, "soak_lost_answers": 2}',
     {"soak_rss_slope_mb_per_min": -0.1, "soak_lost_answers": 2}),
    ('print("{}")', {"soak_rss_slope_mb_per_min": None, "soak_lost_answers": None}),
    ('raise RuntimeError("no luck")', {"soak_rss_slope_mb_per_min": None, "soak_lost_answers": None}),
])  # fmt: skip
def test_soak_py_main_is_run_and_its_keys_copied(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path,
                                                 body: str, expected: dict[str, Any]) -> None:  # fmt: skip
    (tmp_path / "soak.py").write_text(f"def main(argv):\n    {body}\n")
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "soak", raising=False)
    figures = bench.soak_figures(quick=True)
    for key, value in expected.items():
        assert figures[key] == value
    if None in expected.values():
        assert figures["soak_missing"]
    else:
        assert "soak_missing" not in figures
    if "argv" in body:
        assert figures["soak"]["argv"] == ["--json", "--quick"]


def test_the_last_json_object_after_progress_lines_is_found() -> None:
    assert bench._last_json_object('step 1 {not json\n{"a": 1}\nthen {"b": {"c": 2}}\n') == {"b": {"c": 2}}
    assert bench._last_json_object("nothing here") is None


def test_bad_arguments_stop_with_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--read-rate", "15", "5"])
    assert "--read-rate" in capsys.readouterr().err


def test_the_stub_clock_emits_every_stream_in_order_on_its_deadlines() -> None:
    """One clock task serves every stream (bench/transport.py's PacedStub): each stream gets its
    tokens in order, none before its deadline and none later than one tick after it, and a
    cancelled stream gets nothing more."""
    import json

    import trio
    import trio.testing

    from pydisco._types import GenerationRequest

    got: dict[str, list[tuple[int, float]]] = {"a": [], "b": [], "cut": [], "own timer": []}

    async def main() -> None:
        stub = bench.PacedStub()

        def request(period: float, phase: float, n: int) -> GenerationRequest:
            return GenerationRequest(prompt=json.dumps({"period": period, "phase": phase, "shared_clock": True}), max_tokens=n)

        async def one(name: str, period: float, phase: float, n: int) -> None:
            await stub.generate(request(period, phase, n), lambda piece: got[name].append((piece.position, trio.current_time())))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stub.run)
            async with trio.open_nursery() as streams:
                streams.start_soon(one, "a", 0.05, 0.0, 5)
                streams.start_soon(one, "b", 0.03, 0.5, 7)
                streams.start_soon(lambda: stub.generate(  # the per-token overhead's way: its own timer
                    GenerationRequest(prompt=json.dumps({"period": 0.02}), max_tokens=3),
                    lambda piece: got["own timer"].append((piece.position, trio.current_time()))))
                with trio.move_on_after(0.101):
                    await one("cut", 0.05, 0.0, 100)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for name, period, phase, n in (("a", 0.05, 0.0, 5), ("b", 0.03, 0.5, 7)):
        assert [p for p, _ in got[name]] == list(range(n))
        for position, at in got[name]:
            deadline = (phase + position) * period
            assert deadline - 1e-9 <= at <= deadline + bench.PacedStub.MIN_TICK_S + 1e-9
    assert [p for p, _ in got["cut"]] == [0, 1, 2]  # due at 0, 0.05 and 0.1; cancelled at 0.101
    assert got["own timer"] == [(0, 0.0), (1, 0.02), (2, 0.04)]
