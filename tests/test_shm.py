"""The shared-memory ring seen from Python: answers cross to another process intact and ended,
another layout version is refused clearly, a killed runtime is reported within 100 ms and its
restart re-attached without restarting the consumer."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import trio

import pydisco
from pydisco import FinishReason, RuntimeConfig, ShmEvent, ShmForwarder, ShmRingProducer, ShmRingReader, open_runtime
from pydisco._core import SHM_LAYOUT_VERSION
from pydisco._types import TokenPiece
from pydisco.policies._base import Slo
from pydisco.runtime import forward_to_shm, forward_to_shm_blocking
from pydisco.testing import ScriptedEndpoint

PUBLISHER = pathlib.Path(__file__).parent.parent / "examples" / "shm_control_loop" / "answer_publisher.py"
ANSWER = [TokenPiece(position=i, token_id=i, text=f"t{i} ") for i in range(12)]
FAST = Slo(ttft_target_s=1.0, reading_rate=400.0)
SHM_MAGIC = 0x3172_6D68_7364_7970  # "pydshmr1": the header's first 8 bytes


@pytest.fixture
def ring_name() -> Iterator[str]:
    name = f"pydisco-pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    pydisco.unlink_shm_ring(name)


def read_answer(reader: ShmRingReader, timeout_s: float = 30.0) -> tuple[list[pydisco.Token], pydisco.Token]:
    """Tokens up to the end record (skipping ATTACHED); fails on anything else."""
    tokens: list[pydisco.Token] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reading = reader.wait(timeout=1.0)
        if reading.event == ShmEvent.RECORD:
            assert reading.token is not None
            if reading.token.is_end:
                return tokens, reading.token
            tokens.append(reading.token)
        else:
            assert reading.event in (ShmEvent.NONE, ShmEvent.ATTACHED), reading
    raise AssertionError(f"no end record within {timeout_s} s; got {len(tokens)} tokens")


def test_tokens_and_the_end_record_cross_in_order(ring_name: str) -> None:
    reader = ShmRingReader(ring_name)
    assert reader.poll().event == ShmEvent.NONE and not reader.attached
    with ShmRingProducer(ring_name, capacity=8) as producer:
        assert producer.generation == 1 and producer.capacity == 8
        assert reader.wait(timeout=5).event == ShmEvent.ATTACHED and producer.consumer_attached
        for i in range(5):
            assert producer.try_push(i, 100 + i, f"w{i}", source=2)
        assert producer.try_push_end(5, FinishReason.STOP, source=2)
        tokens, end = read_answer(reader)
    assert [(t.position, t.token_id, t.text, t.source) for t in tokens] == [(i, 100 + i, f"w{i}", 2) for i in range(5)]
    assert end.position == 5 and end.finish_reason == FinishReason.STOP
    assert reader.wait(timeout=5).event == ShmEvent.PRODUCER_LOST  # closed: seen at once


def test_another_layout_version_is_refused_with_a_clear_error(ring_name: str) -> None:
    segment = pathlib.Path("/dev/shm") / ring_name  # where glibc keeps shm_open names
    if not segment.parent.is_dir():
        pytest.skip("no /dev/shm on this system")
    segment.write_bytes(struct.pack("<QI", SHM_MAGIC, 7) + bytes(4096))
    reader = ShmRingReader(ring_name)
    reading = reader.poll()
    assert reading.event == ShmEvent.REFUSED
    assert "layout version 7" in reading.message and f"reads version {SHM_LAYOUT_VERSION}" in reading.message
    assert reader.error == reading.message
    # A producer replaces a stale segment whatever its version; then the reader attaches.
    with ShmRingProducer(ring_name) as producer:
        assert producer.generation == 1  # the old one's generation is not read across versions
        deadline = time.monotonic() + 5
        while (event := reader.poll().event) != ShmEvent.ATTACHED and time.monotonic() < deadline:
            time.sleep(0.005)
        assert event == ShmEvent.ATTACHED and reader.error == ""


def test_names_and_owners_are_checked_with_one_clear_error(ring_name: str) -> None:
    with pytest.raises(pydisco.ShmRingError, match="invalid"):
        ShmRingProducer("robot/answers")
    with ShmRingProducer(ring_name):
        with pytest.raises(pydisco.ShmRingError, match="in use by a live producer"):
            ShmRingProducer(ring_name)
        first, second = ShmRingReader(ring_name), ShmRingReader(ring_name)
        assert first.poll().event == ShmEvent.ATTACHED
        reading = second.poll()
        assert reading.event == ShmEvent.REFUSED and "already has a consumer" in reading.message


def test_a_forwarder_is_the_rings_only_writer(ring_name: str) -> None:
    pacer = pydisco.Pacer(pydisco.TokenRing(16), pydisco.TokenRing(16))
    with ShmRingProducer(ring_name) as producer:
        forwarder = ShmForwarder(pacer, producer)
        with pytest.raises(RuntimeError, match="being written by a forwarder"):
            producer.try_push(0, 0, "x")
        with pytest.raises(RuntimeError, match="already has a writer"):
            ShmForwarder(pacer, producer)
        forwarder.stop()  # no end record came: it ends the answer in the ring as cancelled
        assert forwarder.finished and forwarder.forwarded == 0
        assert producer.try_push(0, 0, "x")  # free again


def scripted() -> dict[str, ScriptedEndpoint]:
    return {"device": ScriptedEndpoint("device", ANSWER, prefill_s=0.01, gaps_s=[0.002])}


def test_forward_to_shm_delivers_an_answer_and_ends_an_abandoned_one(ring_name: str) -> None:
    config = RuntimeConfig(device_model=None, dispatch="device-only", migration="never", slo=FAST)
    reader = ShmRingReader(ring_name)

    async def main() -> tuple[int, str, int]:
        with trio.fail_after(30), ShmRingProducer(ring_name) as producer:
            # Attached while the producer lives: what it leaves behind is read after it closed.
            assert reader.poll().event == ShmEvent.ATTACHED
            async with open_runtime(config, endpoints=scripted()) as rt:
                async with rt.stream(prompt="hi", max_tokens=12) as answer:
                    forwarded = await forward_to_shm(answer, producer)
                text = answer.report.text
                async with rt.stream(prompt="again", max_tokens=12, slo=Slo(reading_rate=20)) as abandoned:
                    with trio.move_on_after(0.15):  # gives up mid-answer: the block is left
                        await forward_to_shm(abandoned, producer)
                return forwarded, text, abandoned.report.tokens

    forwarded, text, _ = trio.run(main)
    tokens, end = read_answer(reader)
    assert forwarded == len(tokens) == 12 and "".join(t.text for t in tokens) == text
    assert end.finish_reason == FinishReason.LENGTH
    cut, cut_end = read_answer(reader)
    assert [t.position for t in cut] == list(range(len(cut))) and len(cut) < 12
    assert cut_end.finish_reason == FinishReason.CANCELLED and cut_end.position == len(cut)


def start_publisher(ring: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(PUBLISHER), "--ring", ring, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line and json.loads(line)["ready"], proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.mark.model
def test_a_killed_runtime_is_reported_within_100ms_and_its_restart_reattached(ring_name: str) -> None:
    reader = ShmRingReader(ring_name)
    # A real runtime answering forever, paced slowly so it is surely killed mid-answer.
    first = start_publisher(ring_name, "--rate", "20", "--max-tokens", "200", "--repeat", "0", "Tell a long story.")
    try:
        assert reader.wait(timeout=30).event == ShmEvent.ATTACHED
        generation = reader.generation
        got = 0
        while got < 3:
            reading = reader.wait(timeout=30)
            assert reading.event == ShmEvent.RECORD and reading.token is not None and not reading.token.is_end
            got += 1
        first.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # Not reaped yet: a zombie, which a pid check would take for alive.
        while (reading := reader.wait(timeout=5)).event == ShmEvent.RECORD:
            assert reading.token is not None and not reading.token.is_end  # what it had published
        noticed_s = time.monotonic() - killed
        assert reading.event == ShmEvent.PRODUCER_LOST, reading
        print(f"producer death noticed after {noticed_s * 1000:.1f} ms")
        assert noticed_s < 0.1, f"producer death noticed after {noticed_s * 1000:.0f} ms"
    finally:
        first.kill()
        first.wait()

    second = start_publisher(ring_name, "--max-tokens", "16", "Name a planet.")
    try:
        assert reader.wait(timeout=30).event == ShmEvent.ATTACHED
        assert reader.generation == generation + 1 and reader.producer_pid == second.pid
        tokens, end = read_answer(reader, timeout_s=60)
        assert second.stdout is not None
        report = json.loads(second.stdout.readline())
        assert "".join(t.text for t in tokens) == report["text"] and len(tokens) == report["tokens"] > 0
        assert [t.position for t in tokens] == list(range(len(tokens)))
        assert end.finish_reason.name.lower() == report["finish"]
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()
        second.wait()
    assert reader.wait(timeout=5).event == ShmEvent.PRODUCER_LOST


@pytest.mark.model
def test_forward_to_shm_blocking_on_the_real_model(ring_name: str) -> None:
    config = RuntimeConfig(dispatch="device-only", migration="never", device_threads=1, pace=False)
    reader = ShmRingReader(ring_name)
    with ShmRingProducer(ring_name) as producer, pydisco.BlockingRuntime(config) as rt:
        with rt.stream([{"role": "user", "content": "Name a colour."}], max_tokens=12) as answer:
            forwarded = forward_to_shm_blocking(answer, producer, timeout=60)
        tokens, end = read_answer(reader)
    assert forwarded == len(tokens) == answer.report.tokens
    assert "".join(t.text for t in tokens) == answer.report.text
    assert end.is_end and end.position == len(tokens)


def test_the_runtime_counts_as_read_what_the_other_process_read(ring_name: str) -> None:
    # The migration policy's unread buffer is the control loop's: tokens the pacer pushed into
    # the shm ring but nobody took are unread, then read once the reader takes them.
    config = RuntimeConfig(device_model=None, dispatch="device-only", migration="never", slo=FAST)
    reader = ShmRingReader(ring_name)

    async def main() -> tuple[int, int, int, int]:
        with trio.fail_after(30), ShmRingProducer(ring_name) as producer:
            assert reader.poll().event == ShmEvent.ATTACHED
            async with open_runtime(config, endpoints=scripted()) as rt:
                async with rt.stream(prompt="hi", max_tokens=12) as answer:
                    forwarded = await forward_to_shm(answer, producer)
                    before = answer.status().consumed
                    for _ in range(5):
                        assert reader.poll().event == ShmEvent.RECORD
                    after = answer.status()
                    return forwarded, before, after.consumed, after.unread

    forwarded, before, after, unread = trio.run(main)
    assert forwarded == 12 and before == 0
    assert after == 5 and unread == 7
