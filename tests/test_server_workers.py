"""``pydisco serve`` as an operator runs it: ``--workers`` sharing a port, SIGTERM drains, a second
SIGTERM stops at once. The backend is an OpenAI-compatible upstream faked in this process (a
paced token stream), so no model is loaded; the server's own behaviour is test_server_ops.py."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
import trio

from cloud_support import trio_test
from process_support import Child, alive, wait_gone
from pydisco._errors import EndpointUnavailable
from pydisco._types import GenerationRequest, TokenPiece
from pydisco.cli._serve import say
from pydisco.cloud import open_cloud_endpoint

# Each test here takes seconds; one that hangs should cost CI minutes, not the run's limit.
pytestmark = pytest.mark.timeout(180)

RUN_WITHOUT_LLAMA = (
    "import runpy, sys; sys.modules['llama_cpp'] = None; "
    "runpy.run_module('pydisco.cli', run_name='__main__', alter_sys=True)"
)
PERIOD = 0.05  # seconds between the fake upstream's tokens


class _Upstream(http.server.BaseHTTPRequestHandler):
    """``/v1/completions`` as a server-sent event stream: ``max_tokens`` pieces ``w<k> ``, paced."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        try:
            for k in range(body["max_tokens"]):
                event = {"choices": [{"index": 0, "text": f"w{k} ", "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(PERIOD)
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n')
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server cancelled the answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def free_port(count: int = 1) -> int:
    """A port p with p .. p+count-1 free for TCP now (a race with other processes, unlikely)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        try:
            for k in range(count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
        except OSError:
            continue
        return port
    raise AssertionError("no free ports")


def serve(upstream: str, *options: str) -> Child:
    return Child([sys.executable, "-c", RUN_WITHOUT_LLAMA, "serve", "--token", "t", "--upstream", upstream,
                  "--upstream-model", "m", *options])  # fmt: skip


def worker_pids(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"worker \d: pid (\d+)", line))]


def health(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            body: dict[str, object] = json.loads(response.read())
    except urllib.error.HTTPError as e:  # 503 while draining still has the body
        body = json.loads(e.read())
    return body


def ask(n: int) -> GenerationRequest:
    return GenerationRequest(prompt="x", max_tokens=n)


def words(pieces: list[TokenPiece]) -> str:
    return "".join(p.text for p in pieces)


def test_two_workers_on_one_port_both_serve_and_sigterm_stops_both(upstream: str) -> None:
    port, metrics = free_port(), free_port(2)
    server = serve(upstream, "--workers", "2", "--listen", f"ws://127.0.0.1:{port}",
                   "--metrics-listen", f"127.0.0.1:{metrics}")  # fmt: skip
    try:
        pids = sorted(worker_pids(server.read_until(r"^listening on ", 2)))
        assert len(pids) == 2
        url = f"ws://127.0.0.1:{port}"
        answers: list[str] = []

        @trio_test(60)
        async def many_clients() -> None:
            async def one() -> None:
                got: list[TokenPiece] = []
                async with open_cloud_endpoint(url, token="t") as cloud:
                    await cloud.generate(ask(3), got.append)
                answers.append(words(got))

            async with trio.open_nursery() as nursery:
                for _ in range(24):
                    nursery.start_soon(one)

        many_clients()
        seen = [health(metrics), health(metrics + 1)]
        assert answers == ["w0 w1 w2 "] * 24
        assert sorted(int(str(h["pid"])) for h in seen) == pids
        started = [int(str(h["streams_started"])) for h in seen]
        assert sum(started) == 24 and min(started) > 0  # the kernel spread the connections over both
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_a_dead_worker_takes_the_server_down_with_status_1(upstream: str) -> None:
    server = serve(upstream, "--workers", "2", "--listen", f"ws://127.0.0.1:{free_port()}")
    try:
        pids = worker_pids(server.read_until(r"^listening on ", 2))
        os.kill(pids[0], signal.SIGKILL)
        assert server.process.wait(30) == 1
        assert "worker 0" in server.stderr() and "stopping the others" in server.stderr()
        assert not alive(pids[1])
    finally:
        server.stop()


def test_a_killed_parent_takes_its_workers_with_it(upstream: str) -> None:
    """SIGKILL runs none of the parent's clean-up; its workers see their stdin close and stop,
    rather than serve the shared port on beside a restarted server's workers."""
    server = serve(upstream, "--workers", "2", "--listen", f"ws://127.0.0.1:{free_port()}")
    pids: list[int] = []
    try:
        pids = worker_pids(server.read_until(r"^listening on ", 2))
        server.process.kill()
        assert all(wait_gone(pid, 15) for pid in pids), [pid for pid in pids if alive(pid)]
    finally:
        server.stop()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_that_does_not_stop_is_killed_after_the_drain_deadline(upstream: str) -> None:
    """A stopped (SIGSTOP) worker cannot drain: the parent kills it once --drain-timeout and a
    grace have passed, says so, and exits with status 1, instead of waiting forever."""
    server = serve(upstream, "--workers", "2", "--listen", f"ws://127.0.0.1:{free_port()}", "--drain-timeout", "1")
    try:
        pids = worker_pids(server.read_until(r"^listening on ", 2))
        os.kill(pids[1], signal.SIGSTOP)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 1
        assert 1 <= time.monotonic() - sent < 20
        assert "worker 1" in server.stderr() and "did not stop in time" in server.stderr()
        assert not alive(pids[0]) and not alive(pids[1])
    finally:
        server.stop()


@pytest.mark.parametrize("listen", ["ws://127.0.0.1:0", "zenoh://127.0.0.1:7447"])
def test_workers_need_fixed_ports_on_shareable_transports(upstream: str, listen: str) -> None:
    server = serve(upstream, "--workers", "2", "--listen", listen)
    try:
        assert server.process.wait(60) == 2 and server.output() == ""
        err = server.stderr()
        assert len(err.strip().splitlines()) == 1 and "--workers" in err
    finally:
        server.stop()


def test_sigterm_lets_the_answer_in_flight_finish_then_exits(upstream: str) -> None:
    port = free_port()
    server = serve(upstream, "--listen", f"ws://127.0.0.1:{port}", "--drain-timeout", "60")
    try:
        server.read_until(r"^listening on ", 1)
        got: list[TokenPiece] = []

        @trio_test(60)
        async def drained_answer() -> None:
            async with open_cloud_endpoint(f"ws://127.0.0.1:{port}", token="t") as cloud:
                first = trio.Event()

                def sink(piece: TokenPiece) -> None:
                    got.append(piece)
                    first.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cloud.generate, ask(30), sink)
                    await first.wait()
                    server.process.send_signal(signal.SIGTERM)
            async with open_cloud_endpoint(f"ws://127.0.0.1:{port}", token="t", connect_timeout=5) as late:
                with pytest.raises(EndpointUnavailable):
                    await late.generate(ask(2), lambda p: None)  # drained and gone, or refusing

        drained_answer()
        assert words(got) == "".join(f"w{k} " for k in range(30))
        assert server.process.wait(30) == 0
        assert "draining" in server.output()
    finally:
        server.stop()


def test_a_second_sigterm_stops_at_once(upstream: str) -> None:
    port = free_port()
    server = serve(upstream, "--listen", f"ws://127.0.0.1:{port}", "--drain-timeout", "600")
    process = server.process
    try:
        server.read_until(r"^listening on ", 1)
        got: list[TokenPiece] = []
        failure: list[BaseException] = []
        exited_after: list[float] = []

        @trio_test(60)
        async def long_answer() -> None:
            async with open_cloud_endpoint(f"ws://127.0.0.1:{port}", token="t") as cloud:
                first = trio.Event()

                def sink(piece: TokenPiece) -> None:
                    got.append(piece)
                    first.set()

                async def answer() -> None:
                    try:
                        await cloud.generate(ask(2000), sink)  # 100 s of tokens
                    except EndpointUnavailable as e:
                        failure.append(e)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answer)
                    await first.wait()
                    process.send_signal(signal.SIGTERM)
                    await trio.sleep(0.5)
                    assert process.poll() is None and not failure  # draining: the answer goes on
                    process.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
                    await trio.to_thread.run_sync(process.wait, 30)
                    exited_after.append(time.monotonic() - sent)

        long_answer()
        assert process.returncode == 0 and exited_after[0] < 20  # not the 600 s drain, nor the 100 s answer
        assert failure and len(got) < 2000
    finally:
        server.stop()


@pytest.mark.model
def test_two_workers_with_the_real_model_each_load_it_and_answer_alike() -> None:
    port, metrics = free_port(), free_port(2)
    server = Child([sys.executable, "-m", "pydisco.cli", "serve", "--workers", "2", "--listen", f"ws://127.0.0.1:{port}",
                    "--metrics-listen", f"127.0.0.1:{metrics}", "--token", "t", "--threads", "1"])  # fmt: skip
    try:
        server.read_until(r"^listening on ", 2, timeout=120)
        texts: list[str] = []

        @trio_test(120)
        async def clients() -> None:
            async def one() -> None:
                got: list[TokenPiece] = []
                request = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
                async with open_cloud_endpoint(f"ws://127.0.0.1:{port}", token="t") as cloud:
                    await cloud.generate(request, got.append)
                texts.append(words(got))

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(one)

        clients()
        started = [int(str(health(m)["streams_started"])) for m in (metrics, metrics + 1)]
        assert len(set(texts)) == 1 and texts[0] and len(texts) == 16  # one model, greedy: one answer
        assert sum(started) == 16 and min(started) > 0
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    finally:
        server.stop()


class _Writes(io.StringIO):
    """A stream that records each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_line_a_worker_prints_is_one_write() -> None:
    """Workers share their parent's stdout. Under PYTHONUNBUFFERED (CI's environment) print
    wrote a line's text and its newline apart, and two workers' "listening on" lines came out
    as one line and a blank one (the two-worker test failed reading them). One write per line
    keeps each whole: a short write to a pipe is atomic."""
    out = _Writes()
    say("listening on ws://127.0.0.1:1", out)
    assert out.calls == ["listening on ws://127.0.0.1:1\n"]
    printed = _Writes()
    print("listening on ws://127.0.0.1:1", file=printed, flush=True)
    assert printed.calls == ["listening on ws://127.0.0.1:1", "\n"]  # what interleaved
