"""Small things a new user ran into (issue 12's "property-testing users"), each with a test that
failed before its fix."""

from __future__ import annotations

import trio
import trio.testing

from pydisco import RuntimeConfig, Slo, TokenPiece, open_runtime
from pydisco.runtime import AnswerStatus
from pydisco.testing import ScriptedEndpoint


def pieces(name: str, n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=i, text=f"{name[0]}{i} ") for i in range(n)]


def virtual_config(**kw: object) -> RuntimeConfig:
    settings: dict[str, object] = dict(device_model=None, virtual_time=True, slo=Slo(ttft_target_s=1.0, reading_rate=50.0))
    settings.update(kw)
    return RuntimeConfig(**settings)  # type: ignore[arg-type]


def test_status_after_the_whole_answer_was_read_counts_no_end_record() -> None:
    async def main() -> AnswerStatus:
        endpoints = {"device": ScriptedEndpoint("device", pieces("device", 6))}
        async with open_runtime(virtual_config(dispatch="device-only"), endpoints=endpoints) as rt:
            async with rt.stream(prompt="hi", max_tokens=6) as answer:
                async for _ in answer:
                    pass
                return answer.status()

    after = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert (after.committed, after.consumed, after.unread) == (6, 6, 0)  # was consumed 7, unread -1
