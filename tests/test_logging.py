"""Log records: under pydisco.* names, each with the id of the answer it is about, for the
decisions and events of an answer (here a failover, in virtual time with scripted endpoints),
and the CLI's JSON lines."""

from __future__ import annotations

import io
import json
import logging

import pytest
import trio
import trio.testing

from pydisco import RuntimeConfig, open_runtime
from pydisco._types import TokenPiece
from pydisco.observability import JsonLinesFormatter, answer_context, configure_logging, get_logger
from pydisco.policies._base import Slo
from pydisco.testing import ScriptedEndpoint


def script(name: str, n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=(1000 if name == "cloud" else 0) + i, text=f"{name[0]}{i} ") for i in range(n)]


def failover_runtime_config() -> RuntimeConfig:
    return RuntimeConfig(
        device_model=None, virtual_time=True, slo=Slo(ttft_target_s=1.0, reading_rate=50.0),
        silence_timeout_s=0.5, first_token_timeout_s=2.0, dispatch="cloud-only", migration="never",
        device_standby=False,
    )  # fmt: skip


async def two_answers_with_a_failover() -> list[str]:
    """Two answers on one runtime; the cloud dies after 4 tokens of the first one only."""
    endpoints = {
        "device": ScriptedEndpoint("device", script("device", 8), prefill_s=0.1),
        "cloud": ScriptedEndpoint("cloud", script("cloud", 8), prefill_s=0.05, fails_after=4, fails_on_answer=0),
    }
    ids = []
    async with open_runtime(failover_runtime_config(), endpoints=endpoints) as rt:
        for request_id in ("first", ""):
            async with rt.stream(prompt="hi", max_tokens=8, request_id=request_id) as answer:
                async for _ in answer:
                    pass
            assert answer.report.finish_reason == "length"
            ids.append(request_id)
            await trio.sleep(60)  # past the cloud's health backoff: the second answer uses it again
    return ids


def test_a_failover_is_logged_with_the_answer_id_on_every_record(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pydisco"):
        trio.run(two_answers_with_a_failover, clock=trio.testing.MockClock(autojump_threshold=0))
    records = [r for r in caplog.records if r.name.startswith("pydisco.")]
    assert records
    # Every record has an answer id: the runtime's tasks inherit it, nothing passes it along.
    assert all(getattr(r, "answer_id", None) for r in records), [(r.name, r.getMessage()) for r in records]
    first = [r for r in records if r.answer_id == "first"]  # type: ignore[attr-defined]
    second = [r for r in records if r.answer_id != "first"]  # type: ignore[attr-defined]
    assert first and second
    assert len({r.answer_id for r in second}) == 1  # type: ignore[attr-defined]  # a fresh id

    def said(rs: list[logging.LogRecord], *words: str) -> list[logging.LogRecord]:
        return [r for r in rs if all(w in r.getMessage() for w in words)]

    # The first answer's story, in order: dispatch, cloud starts, cloud fails, failover to the
    # device at position 4, the device takes over, the answer ends.
    story = [
        said(first, "dispatch"),
        said(first, "cloud starts at position 0"),
        said(first, "cloud failed"),
        said(first, "failover cloud -> device at position 4"),
        said(first, "device starts at position 4"),
        said(first, "device took over at position 4"),
        said(first, "answer ended (length)", "device"),
    ]
    assert all(len(s) == 1 for s in story), [[r.getMessage() for r in s] for s in story]
    order = [first.index(s[0]) for s in story]
    assert order == sorted(order)
    (failover,) = said(first, "failover")
    assert failover.levelno == logging.WARNING
    # The second answer had no failover.
    assert not said(second, "failover") and said(second, "answer ended (length)", "cloud")


def test_json_lines_carry_the_answer_id_and_extra_fields() -> None:
    out = io.StringIO()
    handler = configure_logging(logging.INFO, json_lines=True, stream=out)
    try:
        log = get_logger("pydisco.test")
        with answer_context("a-1"):
            log.info("hello %s", "world", extra={"tokens": 3})
        logging.getLogger("pydisco.plain").warning("outside")  # not an adapter: the handler's filter
        log.debug("not shown")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger("pydisco").setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["answer_id"], x["message"], x["level"], x["logger"]) for x in lines] == [
        ("a-1", "hello world", "info", "pydisco.test"),
        (None, "outside", "warning", "pydisco.plain"),
    ]
    assert lines[0]["tokens"] == 3 and "time" in lines[0]


def test_json_formatter_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("pydisco.x").makeRecord("pydisco.x", logging.ERROR, "f", 1, "failed", None, __import__("sys").exc_info())
    data = json.loads(JsonLinesFormatter().format(record))
    assert "ValueError: boom" in data["exception"] and data["answer_id"] is None


def test_a_lost_link_and_the_reconnect_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    from cloud_support import TOKEN, StubBackend, start_server, trio_test, wait_until
    from pydisco._errors import EndpointUnavailable
    from pydisco._types import GenerationRequest
    from pydisco.cloud import open_cloud_endpoint

    url = "memory://logged-link:7"

    @trio_test(30, mock_clock=True)
    async def main() -> None:
        got: list[TokenPiece] = []
        async with trio.open_nursery() as nursery:
            _, life = await start_server(nursery, StubBackend(period=0.1), ["memory"], url=url)
            async with open_cloud_endpoint(url, token=TOKEN) as cloud:

                async def stop_after_three() -> None:
                    await wait_until(lambda: len(got) == 3)
                    life.cancel()

                nursery.start_soon(stop_after_three)
                with answer_context("a1"), pytest.raises(EndpointUnavailable):
                    await cloud.generate(GenerationRequest(prompt="x", max_tokens=50, request_id="a1"), got.append)
                await life.stopped.wait()
                await start_server(nursery, StubBackend(period=0.01), ["memory"], url=url)
                with answer_context("a2"):
                    await cloud.generate(GenerationRequest(prompt="x", max_tokens=3, request_id="a2"), got.append)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="pydisco"):
        main()
    client = [r for r in caplog.records if r.name == "pydisco.cloud.client"]
    connected, lost, reconnected = (
        [r for r in client if r.getMessage().startswith(start)]
        for start in ("connected to", f"link to {url} lost", "reconnected to")
    )
    assert len(connected) == 1 and connected[0].answer_id == "a1"  # type: ignore[attr-defined]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert lost[0].answers == ["a1"] and lost[0].answer_id is None  # type: ignore[attr-defined]  # the link's own task
    assert len(reconnected) == 1 and reconnected[0].answer_id == "a2"  # type: ignore[attr-defined]
    # The server logs the answers it admitted under the client's answer ids.
    admitted = [r for r in caplog.records if r.name == "pydisco.server" and r.getMessage().startswith("admitted")]
    assert [r.answer_id for r in admitted] == ["a1", "a2"]  # type: ignore[attr-defined]
