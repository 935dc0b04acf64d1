"""An answer published on Zenoh reaches a plain Zenoh subscriber (no pydisco code on that side):
every token in order, then the end message, then the report; a failed answer is published to its
end too. Loopback only, multicast scouting off."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

zenoh = pytest.importorskip("zenoh")

from pydisco import RuntimeConfig, open_runtime  # noqa: E402
from pydisco._types import TokenPiece  # noqa: E402
from pydisco.policies._base import Slo  # noqa: E402
from pydisco.runtime import AnswerFailed, publish_to_zenoh  # noqa: E402
from pydisco.runtime._zenoh import answer_keys  # noqa: E402
from pydisco.testing import ScriptedEndpoint  # noqa: E402

from zenoh_support import open_pair  # noqa: E402

ANSWER = [TokenPiece(position=i, token_id=100 + i, text=f"t{i} ") for i in range(12)]
FAST = Slo(ttft_target_s=1.0, reading_rate=400.0)
CONFIG = RuntimeConfig(device_model=None, dispatch="device-only", migration="never", slo=FAST)
PREFIX = "pydisco/test-robot"


class Received:
    """What a plain subscriber on ``PREFIX/answers/**`` got, per key, in arrival order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.encodings: set[str] = set()

    def __call__(self, sample: Any) -> None:  # a Zenoh thread
        with self.lock:
            self.messages.setdefault(str(sample.key_expr), []).append(json.loads(sample.payload.to_bytes()))
            self.encodings.add(str(sample.encoding))

    def on(self, key: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.messages.get(key, ()))


@pytest.fixture
def sessions() -> Iterator[tuple[Any, Any, Received]]:
    subscriber_side, runtime_side = open_pair()
    received = Received()
    subscriber = subscriber_side.declare_subscriber(f"{PREFIX}/answers/**", received)
    try:
        yield subscriber_side, runtime_side, received
    finally:
        subscriber.undeclare()
        runtime_side.close()
        subscriber_side.close()


async def until_subscribed(session: Any, key: str) -> None:
    """Zenoh drops a put nobody is subscribed to: wait until the subscriber's declaration has
    reached the publishing session."""
    probe = session.declare_publisher(key)
    try:
        while not probe.matching_status.matching:
            await trio.sleep(0.01)
    finally:
        probe.undeclare()


async def until_report(received: Received, report_key: str) -> dict[str, Any]:
    while not received.on(report_key):
        await trio.sleep(0.01)
    (report,) = received.on(report_key)
    return report


def test_a_plain_subscriber_gets_every_token_in_order_then_the_end_and_the_report(
    sessions: tuple[Any, Any, Received],
) -> None:
    _, runtime_side, received = sessions
    endpoints = {"device": ScriptedEndpoint("device", ANSWER, prefill_s=0.01, gaps_s=[0.002])}

    async def main() -> tuple[int, str, str]:
        with trio.fail_after(30):
            async with open_runtime(CONFIG, endpoints=endpoints) as rt:
                async with rt.stream(prompt="hi", max_tokens=12) as answer:
                    await until_subscribed(runtime_side, answer_keys(PREFIX, answer.answer_id)[0])
                    published = await publish_to_zenoh(answer, runtime_side, PREFIX)
                await until_report(received, answer_keys(PREFIX, answer.answer_id)[1])
                return published, answer.answer_id, answer.report.text

    published, answer_id, text = trio.run(main)
    tokens_key, report_key = answer_keys(PREFIX, answer_id)
    assert tokens_key == f"{PREFIX}/answers/{answer_id}/tokens"
    *tokens, end = received.on(tokens_key)
    assert published == len(tokens) == len(ANSWER)
    assert [(t["position"], t["token_id"], t["text"]) for t in tokens] == [(p.position, p.token_id, p.text) for p in ANSWER]
    assert all(t["answer_id"] == answer_id and t["endpoint"] == "device" and not t["end"] for t in tokens)
    assert [t["released_s"] for t in tokens] == sorted(t["released_s"] for t in tokens)
    assert end == {"answer_id": answer_id, "end": True, "finish_reason": "length", "tokens": len(ANSWER)}
    (report,) = received.on(report_key)
    assert report["answer_id"] == answer_id and report["text"] == text == "".join(p.text for p in ANSWER)
    assert report["tokens"] == len(ANSWER) and report["endpoints_used"] == ["device"] and "timeline" not in report
    assert received.encodings == {"application/json"}


def test_a_failed_answer_is_published_to_its_end_and_then_raises(sessions: tuple[Any, Any, Received]) -> None:
    _, runtime_side, received = sessions
    endpoints = {"device": ScriptedEndpoint("device", ANSWER, prefill_s=0.01, gaps_s=[0.002], fails_after=5)}

    async def main() -> str:
        with trio.fail_after(30):
            async with open_runtime(CONFIG, endpoints=endpoints) as rt:
                async with rt.stream(prompt="hi", max_tokens=12) as answer:
                    await until_subscribed(runtime_side, answer_keys(PREFIX, answer.answer_id)[0])
                    with pytest.raises(AnswerFailed):
                        await publish_to_zenoh(answer, runtime_side, PREFIX)
                await until_report(received, answer_keys(PREFIX, answer.answer_id)[1])
                return answer.answer_id

    answer_id = trio.run(main)
    tokens_key, report_key = answer_keys(PREFIX, answer_id)
    *tokens, end = received.on(tokens_key)
    assert [t["position"] for t in tokens] == list(range(5))
    assert end == {"answer_id": answer_id, "end": True, "finish_reason": "failed", "tokens": 5}
    assert received.on(report_key)[0]["finish_reason"] == "failed"


@pytest.mark.parametrize("prefix", ["", "/", "robot/*", "a//b", "what?"])
def test_a_key_prefix_zenoh_cannot_carry_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="key prefix"):
        answer_keys(prefix, "a1")


@pytest.mark.parametrize("answer_id", ["", "a/b", "a*", "$x"])
def test_an_answer_id_that_is_not_one_key_chunk_is_refused(answer_id: str) -> None:
    with pytest.raises(ValueError, match="one key chunk"):
        answer_keys("robot", answer_id)


def test_a_blocking_answer_is_published_from_the_calling_thread(sessions: tuple[Any, Any, Received]) -> None:
    from pydisco import BlockingRuntime
    from pydisco.runtime import publish_to_zenoh_blocking

    _, runtime_side, received = sessions
    endpoints = {"device": ScriptedEndpoint("device", ANSWER, prefill_s=0.01, gaps_s=[0.002])}
    shown: list[int] = []
    with BlockingRuntime(CONFIG, endpoints=endpoints) as rt:
        answer = rt.stream(prompt="hi", max_tokens=12)
        tokens_key, report_key = answer_keys(PREFIX, answer.answer_id)
        trio.run(until_subscribed, runtime_side, tokens_key)
        published = publish_to_zenoh_blocking(answer, runtime_side, PREFIX, on_piece=lambda p: shown.append(p.position))
        trio.run(until_report, received, report_key)
    *tokens, end = received.on(tokens_key)
    assert published == len(ANSWER) and shown == [t["position"] for t in tokens] == list(range(len(ANSWER)))
    assert end["end"] and end["finish_reason"] == "length" and end["tokens"] == len(ANSWER)


def test_a_publisher_cancelled_mid_answer_puts_what_it_read_and_no_end(sessions: tuple[Any, Any, Received]) -> None:
    _, runtime_side, received = sessions
    slow = Slo(ttft_target_s=1.0, reading_rate=20.0)  # 50 ms a token: the cut lands mid-answer
    endpoints = {"device": ScriptedEndpoint("device", ANSWER, prefill_s=0.01, gaps_s=[0.002])}

    async def main() -> tuple[str, int]:
        with trio.fail_after(30):
            async with open_runtime(CONFIG, endpoints=endpoints) as rt:
                async with rt.stream(prompt="hi", max_tokens=12, slo=slow) as answer:
                    await until_subscribed(runtime_side, answer_keys(PREFIX, answer.answer_id)[0])
                    read: list[int] = []
                    with trio.move_on_after(0.2) as scope:
                        await publish_to_zenoh(answer, runtime_side, PREFIX, on_piece=lambda p: read.append(p.position))
                    assert scope.cancelled_caught
                tokens_key = answer_keys(PREFIX, answer.answer_id)[0]
                while len(received.on(tokens_key)) < len(read):
                    await trio.sleep(0.01)
                await trio.sleep(0.1)  # an end message, had one been sent, would be here by now
                return answer.answer_id, len(read)

    answer_id, read = trio.run(main)
    tokens_key, report_key = answer_keys(PREFIX, answer_id)
    messages = received.on(tokens_key)
    assert 0 < read < len(ANSWER) and [m["position"] for m in messages] == list(range(read))
    assert not any(m["end"] for m in messages) and received.on(report_key) == []
