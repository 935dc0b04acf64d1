"""The runtime on the real model, a real loopback server and real transports.

With greedy decoding and the same model on both endpoints, every dispatch, migration and
failover schedule must give exactly the text of an uninterrupted device-only run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest
import trio

import pydisco
from pydisco import RuntimeConfig, open_runtime
from pydisco.cloud import LlamaBackend
from pydisco.cloud import open_loopback_cloud
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from pydisco.policies import register_migration_policy
from pydisco.policies._base import MigrationView, Slo

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
MAX_TOKENS = 40
THREADS = 1  # two engines (device + server) share two cores with the test runner


class MigrateAt:
    """A test policy: migrate as soon as `position` tokens are committed."""

    name = "migrate-at"

    def __init__(self, position: int = 6) -> None:
        self.position = position

    def should_migrate(self, view: MigrationView) -> bool:
        return view.committed >= self.position


register_migration_policy("migrate-at", MigrateAt, replace=True)


class SlowBackend:
    """A real backend behind a busy server: each token leaves `per_token_s` later."""

    def __init__(self, inner: LlamaBackend, per_token_s: float) -> None:
        self._inner = inner
        self._per_token_s = per_token_s

    @property
    def model_id(self) -> str:
        return self._inner.model_id

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        send, receive = trio.open_memory_channel[TokenPiece](1000)

        async def forward() -> None:
            async for piece in receive:
                await trio.sleep(self._per_token_s)
                sink(piece)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                result = await self._inner.generate(request, send.send_nowait)
            finally:
                send.close()
        return result

    def close(self) -> None:
        self._inner.close()


Reader = Callable[[pydisco.AnswerStream, pydisco.Runtime], Awaitable[None]]


async def answer_with(
    config: RuntimeConfig,
    *,
    transport: str = "wss",
    slow_cloud_s: float = 0.0,
    during: Callable[[pydisco.Piece, object], None] | None = None,
    device_costs: list[object] | None = None,
) -> tuple[str, pydisco.AnswerReport]:
    backend = await trio.to_thread.run_sync(lambda: LlamaBackend(n_threads=THREADS))
    served = SlowBackend(backend, slow_cloud_s) if slow_cloud_s else backend
    with trio.fail_after(120):
        async with open_loopback_cloud(backend=served, transport=transport, profile=None) as cloud:  # type: ignore[arg-type]
            config = dataclasses.replace(
                config,
                device_threads=THREADS,
                cloud_url=cloud.url,
                cloud_token=cloud.token,
                cloud_ssl=cloud.ssl_context,
                pace=False,
                slo=Slo(ttft_target_s=2.0, reading_rate=20.0),
            )
            async with open_runtime(config) as rt:
                # One warm-up answer connects the cloud, so the runtime knows both share a vocabulary.
                async with rt.stream(QUESTION, max_tokens=1) as warm:
                    async for _ in warm:
                        pass
                async with rt.stream(QUESTION, max_tokens=MAX_TOKENS) as answer:
                    text = []
                    async for piece in answer:
                        text.append(piece.text)
                        if during is not None:
                            during(piece, cloud)
                if device_costs is not None:
                    device_costs.extend(rt.endpoints["device"].cost.recent)  # type: ignore[attr-defined]
        backend.close()
    return "".join(text), answer.report


@pytest.fixture(scope="module")
def reference() -> str:
    """The uninterrupted device-only answer."""

    async def main() -> str:
        config = RuntimeConfig(dispatch="device-only", migration="never", device_threads=THREADS, pace=False)
        async with open_runtime(config) as rt:
            async with rt.stream(QUESTION, max_tokens=MAX_TOKENS) as answer:
                return "".join([p.text async for p in answer])

    text = trio.run(main)
    assert len(text) > 20
    return text


@pytest.mark.parametrize("dispatch", ["cloud-only", "race-both", "pd-device"])
def test_dispatch_schedules_give_the_uninterrupted_text(reference: str, dispatch: str) -> None:
    text, report = trio.run(
        lambda: answer_with(RuntimeConfig(dispatch=dispatch, migration="never"))
    )
    assert text == reference
    assert report.finish_reason in ("stop", "length")
    if dispatch == "pd-device":
        assert report.endpoints_used[0] == "cloud"


@pytest.mark.parametrize("start", ["cloud-only", "device-only"])
def test_migration_in_either_direction_gives_the_uninterrupted_text(reference: str, start: str) -> None:
    # A busy cloud (30 ms a token) so the answer is still running when the device is ready:
    # otherwise a fast cloud may finish before the handover, which is correct but tests nothing.
    text, report = trio.run(
        lambda: answer_with(
            RuntimeConfig(dispatch=start, migration="migrate-at", migration_options={"position": 6}),
            slow_cloud_s=0.03,
        )
    )
    assert text == reference
    (migration,) = report.migrations
    assert migration.kind == "migration" and migration.handover_position >= 6
    assert migration.source == ("cloud" if start == "cloud-only" else "device")
    assert report.endpoints_used == (migration.source, migration.target)


@pytest.mark.parametrize("transport", ["wss", "quic", "zenoh"])
def test_failover_when_the_cloud_link_dies_mid_answer(reference: str, transport: str) -> None:
    def cut_at_token_4(piece: pydisco.Piece, cloud: object) -> None:
        if piece.position == 4:
            cloud.link.cut(reset=True)  # type: ignore[attr-defined]

    text, report = trio.run(
        lambda: answer_with(
            RuntimeConfig(dispatch="cloud-only", migration="never", silence_timeout_s=1.0),
            transport=transport,
            slow_cloud_s=0.03,
            during=cut_at_token_4,
        )
    )
    assert text == reference
    (failover,) = report.migrations
    assert (failover.kind, failover.source, failover.target) == ("failover", "cloud", "device")
    assert failover.handover_position >= 5


def test_wrong_cloud_credentials_fall_back_to_the_device(reference: str) -> None:
    async def main() -> tuple[str, pydisco.AnswerReport, int]:
        backend = await trio.to_thread.run_sync(lambda: LlamaBackend(n_threads=THREADS))
        with trio.fail_after(120):
            async with open_loopback_cloud(backend=backend, profile=None) as cloud:
                config = RuntimeConfig(
                    device_threads=THREADS,
                    cloud_url=cloud.url,
                    cloud_token="not-the-token",
                    cloud_ssl=cloud.ssl_context,
                    dispatch="cloud-only",
                    migration="never",
                    pace=False,
                )
                async with open_runtime(config) as rt:
                    async with rt.stream(QUESTION, max_tokens=MAX_TOKENS) as answer:
                        text = "".join([p.text async for p in answer])
                stats = cloud.server.statistics()
        backend.close()
        return text, answer.report, stats.auth_failures + 1000 * stats.tokens_generated

    text, report, auth = trio.run(main)
    assert text == reference
    assert report.endpoints_used == ("device",)
    assert [m.kind for m in report.migrations] == ["failover"]
    assert auth == 1  # refused once, nothing generated on the server


def test_after_standby_a_failover_computes_only_the_last_few_tokens(reference: str) -> None:
    """While the cloud decodes, the device's cache follows the committed prefix; when the link
    dies, the device's answer prefills only what was committed since its last sync."""
    cut_at = 10

    def cut(piece: pydisco.Piece, cloud: object) -> None:
        if piece.position == cut_at:
            cloud.link.cut(reset=True)  # type: ignore[attr-defined]

    costs: list[object] = []
    text, report = trio.run(
        lambda: answer_with(
            RuntimeConfig(dispatch="cloud-only", migration="never", silence_timeout_s=1.0, device_standby=True),
            slow_cloud_s=0.05,
            during=cut,
            device_costs=costs,
        )
    )
    assert text == reference
    (failover,) = report.migrations
    assert (failover.kind, failover.source, failover.target) == ("failover", "cloud", "device")
    generations = [c for c in costs if c.decoded_tokens > 0]  # type: ignore[attr-defined]
    prepares = [c for c in costs if c.finish_reason == "prepared"]  # type: ignore[attr-defined]
    assert prepares, "the device never stood by"
    # The device's answer resumed from a cache that held the prompt and the synced prefix: a few
    # tokens at most (those committed since the last sync, and the row whose logits it needs).
    assert generations[-1].prefilled_tokens <= 4, costs  # type: ignore[attr-defined]


def test_a_stop_string_ends_the_answer_where_its_text_ends(reference: str) -> None:
    """A stop string can cut sampled tokens that are never reported: the answer still ends."""
    words = reference.split()
    stop = " ".join(words[3:5])  # spans more than one token

    async def main() -> pydisco.AnswerReport:
        config = RuntimeConfig(dispatch="device-only", migration="never", device_threads=THREADS, pace=False)
        async with open_runtime(config) as rt:
            with trio.fail_after(60):
                async with rt.stream(QUESTION, max_tokens=MAX_TOKENS, stop=(stop,)) as answer:
                    async for _ in answer:
                        pass
        return answer.report

    report = trio.run(main)
    assert report.finish_reason == "stop"
    assert stop not in report.text and reference.startswith(report.text)
