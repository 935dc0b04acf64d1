"""``pydisco serve`` end to end (a real process with the real model). Its bad command lines:
test_cli_errors.py."""

from __future__ import annotations

import pathlib
import re
import signal
import sys

import pytest
import trio

from cloud_support import text_of, trio_test
from process_support import Child
from pydisco.cloud import open_cloud_endpoint
from pydisco._errors import EndpointUnavailable
from pydisco.cloud import Credentials, client_ssl_context
from pydisco._types import GenerationRequest, TokenPiece


@pytest.mark.model
def test_pydisco_serve_answers_over_ws_and_a_self_signed_wss_then_stops_on_sigint(tmp_path: pathlib.Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# clients\ncli-token\n\n")
    server = Child([sys.executable, "-m", "pydisco.cli", "serve", "--listen", "ws://127.0.0.1:0", "--listen",
                    "wss://127.0.0.1:0", "--token-file", str(tokens), "--self-signed", "--threads", "1"])  # fmt: skip
    try:
        lines = server.read_until(r"^listening on ", 2)
        cert = pathlib.Path(re.search(r"certificate for .*: (\S+)", "".join(lines)).group(1))  # type: ignore[union-attr]
        urls = [line.split()[-1] for line in lines if line.startswith("listening on ")]
        trust = client_ssl_context(Credentials(cert.read_bytes(), b""))

        @trio_test(60)
        async def ask() -> None:
            request = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            answers = []
            for url in urls:
                got: list[TokenPiece] = []
                async with open_cloud_endpoint(url, token="cli-token", ssl_context=trust) as cloud:
                    await cloud.generate(request, got.append)
                answers.append(text_of(got))
            assert answers[0] == answers[1] and len(answers[0]) > 0
            # Without the printed certificate the TLS listener cannot be trusted.
            async with open_cloud_endpoint(urls[1], token="cli-token") as untrusting:
                with pytest.raises(EndpointUnavailable):
                    await untrusting.generate(request, lambda p: None)

        ask()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 130  # stopped by Ctrl-C, as a shell reports it
    finally:
        server.stop()


@pytest.mark.model
def test_pydisco_serve_with_a_step_scheduler_answers_several_clients_at_once_from_one_engine() -> None:
    server = Child([sys.executable, "-m", "pydisco.cli", "serve", "--listen", "ws://127.0.0.1:0", "--token", "t",
                    "--scheduler", "fcfs", "--max-batch", "4", "--threads", "1"])  # fmt: skip
    try:
        url = server.read_until(r"^listening on ", 1)[-1].split()[-1]
        questions = ["Name a color.", "Name a fruit.", "Name an animal."]

        @trio_test(120)
        async def ask() -> None:
            texts: dict[str, str] = {}

            async def one(question: str) -> None:
                got: list[TokenPiece] = []
                async with open_cloud_endpoint(url, token="t") as cloud:
                    await cloud.generate(GenerationRequest(messages=[{"role": "user", "content": question}], max_tokens=6), got.append)
                texts[question] = text_of(got)

            async with trio.open_nursery() as nursery:
                for question in questions:
                    nursery.start_soon(one, question)
            assert sorted(texts) == sorted(questions) and all(texts.values()), texts

        ask()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 130
    finally:
        server.stop()


def test_a_server_whose_port_is_taken_fails_with_os_error() -> None:
    import socket

    from cloud_support import StubBackend, server_config
    from pydisco.cloud import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def run() -> None:
            with trio.fail_after(10):
                await serve(server_config(StubBackend(), ["ws"], url=f"ws://127.0.0.1:{port}"))

        with pytest.raises(OSError):
            trio.run(run)
