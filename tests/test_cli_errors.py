"""Every bad command line gets one clear line on stderr and a meaningful exit status, never a
traceback (unless --debug asks for one)."""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pydisco.cli import _profile as _cmd_profile
from pydisco.cli import main

# Runs the command with llama.cpp's bindings unimportable: an input that must fail before any
# model loads then fails the test (an ImportError is a bug line, exit 1) if it gets that far.
WITHOUT_LLAMA = (
    "import runpy, sys; sys.modules['llama_cpp'] = None; "
    "runpy.run_module('pydisco.cli', run_name='__main__', alter_sys=True)"
)
UPSTREAM = ["--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "m"]  # a backend that loads no model
LONG_PROMPT = "word " * 3000  # ~3000 tokens: more than the 2048-token context
HUGE_PROMPT = "x" * 100_000


def pydisco(*argv: str, llama: bool, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = ["-m", "pydisco.cli"] if llama else ["-c", WITHOUT_LLAMA]
    return subprocess.run([sys.executable, *command, *argv], capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Bad:
    """A bad command line and the one line it must get. ``usage``: argparse refuses it, so its
    usage line comes first. ``llama``: it is allowed to import llama.cpp (it checks a model file
    or fails only once a model loads). Arguments may name {tmp}, {taken_port}, {closed_port}."""

    argv: tuple[str, ...]
    culprit: str  # what the error line must contain
    status: int = 2
    usage: bool = False
    llama: bool = False


def case(bad: Bad, id: str, *marks: pytest.MarkDecorator) -> object:
    model = [pytest.mark.model] if bad.llama else []
    return pytest.param(bad, id=id, marks=[*model, *marks])


ANSWER_FAILED = 1

BAD_COMMAND_LINES = [
    case(Bad(("run",), "the following arguments are required: PROMPT", usage=True), "run-no-prompt"),
    case(Bad(("run", ""), "argument PROMPT: must not be empty", usage=True), "run-empty-prompt"),
    case(Bad(("run", "hi", "--migration", "nope"), "unknown migration policy 'nope'; known: disco-migrate, never",
             usage=True), "run-unknown-migration"),  # fmt: skip
    case(Bad(("run", "hi", "--migration", "bogus"), "unknown migration policy 'bogus'; known: disco-migrate, never",
             usage=True), "run-bogus-migration"),  # fmt: skip
    case(Bad(("run", "hi", "--dispatch", "bogus"), "unknown dispatch policy 'bogus'; known: cloud-only, device-only",
             usage=True), "run-unknown-dispatch"),  # fmt: skip
    case(Bad(("run", "hi", "--threads", "0"), "--threads: expected a whole number >= 1, got '0'", usage=True),
         "run-threads-0"),  # fmt: skip
    case(Bad(("run", "hi", "--max-tokens", "0"), "--max-tokens: expected a whole number >= 1", usage=True),
         "run-max-tokens-0"),  # fmt: skip
    case(Bad(("run", "hi", "--reading-rate", "-1"), "--reading-rate: expected a number >= 0", usage=True),
         "run-negative-reading-rate"),  # fmt: skip
    case(Bad(("run", "hi", "--cloud", "notaurl"), "scheme://host:port", usage=True), "run-cloud-not-a-url"),
    case(Bad(("run", "hi", "--cloud", "wss://127.0.0.1:99999"), "bad port in 'wss://127.0.0.1:99999'", usage=True),
         "run-cloud-bad-port"),  # fmt: skip
    case(Bad(("run", "hi", "--cloud", "http://127.0.0.1:8000"), "unknown URL scheme 'http'", usage=True),
         "run-cloud-http"),  # fmt: skip
    case(Bad(("run", "hi", "--cloud", "memory://cloud:1"), "memory:// works only inside one process; use quic, ws, wss",
             usage=True), "run-cloud-in-process-scheme"),  # fmt: skip
    case(Bad(("run", "hi", "--no-cloud", "--no-device"), "leave nothing to answer"), "run-no-cloud-no-device"),
    case(Bad(("run", "hi", "--no-cloud", "--cloud", "ws://127.0.0.1:1"), "--cloud URL or --no-cloud"),
         "run-cloud-and-no-cloud"),  # fmt: skip
    case(Bad(("run", "hi", "--token", "t"), "--token is the bearer token for --cloud"), "run-token-without-cloud"),
    case(Bad(("run", "hi", "--cloud", "ws://127.0.0.1:1", "--transport", "quic"), "--transport picks the loopback"),
         "run-transport-with-cloud"),  # fmt: skip
    case(Bad(("run", "hi", "--zenoh", "robot/*"), "--zenoh: a Zenoh key prefix is chunks separated by '/'",
             usage=True), "run-zenoh-wildcard-prefix"),  # fmt: skip
    case(Bad(("run", "hi", "--zenoh", "robot", "--zenoh-connect", "127.0.0.1:7447"),
             "expected a Zenoh endpoint like tcp/127.0.0.1:7447", usage=True), "run-zenoh-endpoint-no-protocol"),  # fmt: skip
    case(Bad(("run", "hi", "--zenoh-connect", "tcp/127.0.0.1:7447"), "--zenoh-connect says where --zenoh KEY_PREFIX"),
         "run-zenoh-connect-alone"),  # fmt: skip
    case(Bad(("run", "hi", "--model", "{tmp}/missing.gguf"), "model file not found", usage=True, llama=True),
         "run-model-missing"),  # fmt: skip
    case(Bad(("run", "hi", "--model", "{tmp}/notes.gguf"), "not a GGUF model file", usage=True, llama=True),
         "run-model-not-gguf"),  # fmt: skip
    case(Bad(("run", "hi", "--model", "{tmp}/corrupt.gguf", "--threads", "1"), "could not load the model", llama=True),
         "run-model-corrupt"),  # fmt: skip
    case(Bad(("run", LONG_PROMPT, "--no-cloud", "--threads", "1"), "exceeds the context of 2048 tokens", llama=True),
         "run-prompt-longer-than-context-device-only"),  # fmt: skip
    case(Bad(("run", LONG_PROMPT, "--threads", "1"), "exceeds the context of 2048 tokens", llama=True),
         "run-prompt-longer-than-context"),  # fmt: skip
    case(Bad(("run", HUGE_PROMPT, "--no-cloud", "--threads", "1"), "exceeds the context of 2048 tokens", llama=True),
         "run-100k-character-prompt"),  # fmt: skip
    case(Bad(("run", "hi", "--no-device", "--cloud", "ws://127.0.0.1:{closed_port}"), "127.0.0.1:{closed_port}",
             status=ANSWER_FAILED), "run-cloud-unreachable"),  # fmt: skip
    case(Bad(("serve", "--token", "t"), "the following arguments are required: --listen", usage=True),
         "serve-no-listen"),  # fmt: skip
    case(Bad(("serve", "--listen", "notaurl", "--token", "t"), "scheme://host:port", usage=True),
         "serve-listen-not-a-url"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:70000", "--token", "t"), "bad port in 'ws://127.0.0.1:70000'",
             usage=True), "serve-listen-bad-port"),  # fmt: skip
    case(Bad(("serve", "--listen", "pigeon://coop:1", "--token", "t"), "unknown URL scheme 'pigeon'", usage=True),
         "serve-listen-unknown-scheme"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", ""), "--token: must not be empty", usage=True),
         "serve-empty-token"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token-file", "{tmp}/missing"), "no such file", usage=True),
         "serve-token-file-missing"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token-file", "{tmp}/no-tokens", *UPSTREAM),
             "holds no tokens"), "serve-token-file-without-tokens"),  # fmt: skip
    case(Bad(("serve", "--listen", "wss://127.0.0.1:0", "--token", "t", "--cert", "{tmp}/missing.pem", "--key",
              "{tmp}/missing.pem"), "--cert: no such file", usage=True), "serve-cert-missing"),  # fmt: skip
    case(Bad(("serve", "--listen", "wss://127.0.0.1:0", "--token", "t", "--cert", "{tmp}/notes.gguf", *UPSTREAM),
             "--cert and --key go together"), "serve-cert-without-key"),  # fmt: skip
    case(Bad(("serve", "--listen", "wss://127.0.0.1:0", "--token", "t", "--cert", "{tmp}/notes.gguf", "--key",
              "{tmp}/notes.gguf", *UPSTREAM), "do not load"), "serve-cert-not-pem"),  # fmt: skip
    case(Bad(("serve", "--listen", "wss://127.0.0.1:0", "--token", "t", *UPSTREAM),
             "wss://127.0.0.1:0 needs TLS: give --cert and --key, or --self-signed"), "serve-wss-without-tls"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--parallel", "0"),
             "--parallel: expected a whole number >= 1", usage=True), "serve-parallel-0"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--scheduler", "sjf"),
             "--scheduler: unknown step scheduler 'sjf'; known: andes, fastserve, fcfs, slice", usage=True),
         "serve-unknown-scheduler"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--scheduler", "andes", *UPSTREAM),
             "the --upstream API schedules its own answers"), "serve-scheduler-with-upstream"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--scheduler", "andes", "--parallel", "2"),
             "with --scheduler one engine serves --max-batch answers"), "serve-scheduler-with-parallel"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--max-batch", "4"),
             "--max-batch goes with --scheduler"), "serve-max-batch-without-scheduler"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--scheduler", "fcfs", "--max-batch", "0"),
             "--max-batch: expected a whole number >= 1", usage=True), "serve-max-batch-0"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--threads", "0"),
             "--threads: expected a whole number >= 1", usage=True), "serve-threads-0"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--max-streams", "0"),
             "--max-streams: expected a whole number >= 1", usage=True), "serve-max-streams-0"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--upstream", "ftp://host/v1",
              "--upstream-model", "m"), "expected an http:// or https:// URL", usage=True),
         "serve-upstream-not-http"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--upstream", "http://host/v1"),
             "--upstream needs --upstream-model"), "serve-upstream-without-model"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--upstream-key", "k"),
             "go with --upstream"), "serve-upstream-key-without-upstream"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--model", "{tmp}/corrupt.gguf", *UPSTREAM),
             "give --model or --upstream, not both", llama=True), "serve-model-and-upstream"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--model", "{tmp}/notes.gguf"),
             "not a GGUF model file", usage=True, llama=True), "serve-model-not-gguf"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:0", "--token", "t", "--model", "{tmp}/corrupt.gguf", "--threads",
              "1"), "could not load the model", llama=True), "serve-model-corrupt"),  # fmt: skip
    case(Bad(("serve", "--listen", "ws://127.0.0.1:{taken_port}", "--token", "t", *UPSTREAM),
             "cannot listen on ws://127.0.0.1:{taken_port}: Address already in use"), "serve-port-taken"),  # fmt: skip
    case(Bad(("profile", "--threads", "0"), "--threads: expected a whole number >= 1", usage=True),
         "profile-threads-0"),  # fmt: skip
    case(Bad(("profile", "--model", "{tmp}/missing.gguf"), "model file not found", usage=True, llama=True),
         "profile-model-missing"),  # fmt: skip
    case(Bad(("profile", "--model", "{tmp}/notes.gguf"), "not a GGUF model file", usage=True, llama=True),
         "profile-model-not-gguf"),  # fmt: skip
    case(Bad(("profile", "--model", "{tmp}/corrupt.gguf", "--threads", "1"), "could not load the model", llama=True),
         "profile-model-corrupt"),  # fmt: skip
]


@pytest.fixture
def places(tmp_path: pathlib.Path) -> Iterator[dict[str, str]]:
    """Files and ports the bad command lines name: a text file that is no model, a file that
    starts like a GGUF but is garbage, a token file with no tokens, a port something listens on,
    and a port where nothing does (bound, not listening: connections are refused)."""
    (tmp_path / "notes.gguf").write_text("not a model\n")
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage " * 8)
    (tmp_path / "no-tokens").write_text("# nobody yet\n\n")
    with socket.socket() as taken, socket.socket() as closed:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        closed.bind(("127.0.0.1", 0))
        yield {"tmp": str(tmp_path), "taken_port": str(taken.getsockname()[1]),
               "closed_port": str(closed.getsockname()[1])}  # fmt: skip


@pytest.mark.parametrize("bad", BAD_COMMAND_LINES)
def test_a_bad_command_line_gets_one_clear_line(bad: Bad, places: dict[str, str]) -> None:
    command = bad.argv[0]
    result = pydisco(*(arg.format(**places) for arg in bad.argv), llama=bad.llama)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    if bad.usage:  # argparse's own: its short usage line, then the error
        assert len(lines) == 2, result.stderr
        assert lines[0].startswith(f"usage: pydisco {command} ") and lines[1].startswith(f"pydisco {command}: error: ")
    else:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"pydisco {command}: ")
    assert bad.culprit.format(**places) in lines[-1]
    assert result.returncode == bad.status, result.stderr


def test_debug_adds_the_traceback_to_the_same_line_and_status(places: dict[str, str]) -> None:
    argv = ["serve", "--listen", f"ws://127.0.0.1:{places['taken_port']}", "--token", "t", *UPSTREAM]
    plain, debug = pydisco(*argv, llama=False), pydisco(*argv, "--debug", llama=False)
    assert debug.stderr.startswith("Traceback") and "OSError: [Errno" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()
    assert debug.returncode == plain.returncode == 2


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (RuntimeError("boom"), 1, "pydisco profile: unexpected RuntimeError: boom (a bug in pydisco; --debug shows where)"),
        (ExceptionGroup("tasks", [ValueError("bad")]), 1,
         "pydisco profile: unexpected ValueError: bad (a bug in pydisco; --debug shows where)"),  # fmt: skip
        (ExceptionGroup("tasks", [OSError(28, "No space left on device")]), 2,
         "pydisco profile: [Errno 28] No space left on device"),  # fmt: skip
        (BaseExceptionGroup("tasks", [KeyboardInterrupt()]), 130, ""),
        (KeyboardInterrupt(), 130, ""),
    ],
)
def test_errors_a_command_raises_become_one_line_and_a_status(
    error: BaseException, status: int, line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(_cmd_profile, "run", fail)
    assert main(["profile"]) == status
    assert capsys.readouterr().err == (line + "\n" if line else "")


def test_a_multi_line_message_still_gets_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydisco._errors import ModelError

    def fail(args: object) -> int:
        raise ModelError("llama.cpp could not load it; llama.cpp said: first\nsecond\n")

    monkeypatch.setattr(_cmd_profile, "run", fail)
    assert main(["profile"]) == 2
    assert capsys.readouterr().err == "pydisco profile: llama.cpp could not load it; llama.cpp said: first second\n"


def _interrupt_run(*extra: str) -> subprocess.CompletedProcess[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "pydisco.cli", "run", "Count from one to fifty.", "--threads", "1",
         "--reading-rate", "2", *extra],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stdout.read(1)  # the answer is streaming
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.model
def test_ctrl_c_during_a_device_answer_exits_130_quietly() -> None:
    result = _interrupt_run("--no-cloud")
    assert (result.returncode, result.stderr) == (130, b"")


@pytest.mark.model
def test_ctrl_c_during_an_answer_with_the_loopback_cloud_exits_130_quietly() -> None:
    result = _interrupt_run()
    assert (result.returncode, result.stderr) == (130, b"")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_serve_stops_on_a_signal_telling_how(signum: int, status: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_LLAMA, "serve", "--listen", "ws://127.0.0.1:0", "--token", "t", *UPSTREAM],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("listening on ")
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    said = "stopping\n" if signum == signal.SIGINT else "draining (up to 30 s; SIGTERM again stops at once)\n"
    assert (process.returncode, out, err) == (status, said, "")
