"""The runtime's context managers raise one precise exception — never an ExceptionGroup, never a
replacement for the error that really happened."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pydisco import ConfigurationError, RuntimeConfig, open_runtime
from pydisco._types import TokenPiece
from pydisco.runtime import BlockingRuntime
from pydisco.testing import ScriptedEndpoint

ANSWER = [TokenPiece(i, i, f"t{i} ") for i in range(5)]


def scripted() -> dict[str, ScriptedEndpoint]:
    return {"device": ScriptedEndpoint("device", ANSWER)}


class Boom(Exception):
    pass


def test_an_error_inside_the_runtime_block_is_not_lost_when_a_cloud_is_configured() -> None:
    # The cloud endpoint connects on first use: nothing needs to listen at that address.
    config = RuntimeConfig(device_model=None, cloud_url="memory://nowhere:1", cloud_token="t")

    async def main() -> None:
        async with open_runtime(config):
            raise Boom("the application's own error")

    with pytest.raises(Boom, match="the application's own error"):
        trio.run(main)


def test_an_error_inside_a_stream_block_comes_out_as_is() -> None:
    async def main() -> None:
        async with open_runtime(RuntimeConfig(device_model=None, virtual_time=True), endpoints=scripted()) as rt:
            async with rt.stream(prompt="hi", max_tokens=5) as answer:
                async for _ in answer:
                    raise Boom("while reading")

    with pytest.raises(Boom, match="while reading"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("migration", "bogus", "unknown migration policy 'bogus'; known: disco-migrate"),
        ("dispatch", "bogus", "unknown dispatch policy 'bogus'"),
        ("migration_options", {"no_such_option": 1}, "bad options"),
    ],
)
def test_a_bad_policy_is_one_configuration_error_before_anything_opens(field: str, value: object, message: str) -> None:
    config = RuntimeConfig(device_model=None, cloud_url="memory://nowhere:1", **{field: value})  # type: ignore[arg-type]

    async def main() -> None:
        async with open_runtime(config):
            pytest.fail("the runtime opened with a bad policy")

    with pytest.raises(ConfigurationError, match=message) as info:
        trio.run(main)
    assert not isinstance(info.value, BaseExceptionGroup)


def test_bad_stream_arguments_are_configuration_errors() -> None:
    async def main() -> None:
        async with open_runtime(RuntimeConfig(device_model=None, virtual_time=True), endpoints=scripted()) as rt:
            with pytest.raises(ConfigurationError, match="max_tokens must be >= 1"):
                async with rt.stream(prompt="hi", max_tokens=0):
                    pass
            with pytest.raises(ConfigurationError, match="exactly one of messages= and prompt="):
                async with rt.stream():
                    pass

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_blocking_runtime_refuses_virtual_time() -> None:
    with pytest.raises(ConfigurationError, match="real time"):
        BlockingRuntime(RuntimeConfig(device_model=None, virtual_time=True), endpoints=scripted())
