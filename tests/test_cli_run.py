"""`pydisco run`, the main job, as a user runs it: a subprocess on the embedded defaults."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model


def pydisco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pydisco.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_run_streams_with_the_device_and_the_loopback_cloud_and_reports() -> None:
    result = pydisco("run", "Say hello.", "--max-tokens", "12", "--reading-rate", "0", "--threads", "1")
    assert result.returncode == 0, result.stderr
    text, _, report = result.stdout.partition("\n\ntokens ")
    assert text.strip()
    assert "QoE" in report and "endpoints:" in report and "dispatch:" in report


def test_run_json_report_over_quic_cloud_only() -> None:
    result = pydisco(
        "run", "Say hello.", "--max-tokens", "8", "--reading-rate", "0", "--threads", "1",
        "--dispatch", "cloud-only", "--migration", "never", "--transport", "quic", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["endpoints_used"] == ["cloud"]
    assert 0 < report["tokens"] <= 8 and report["text"]
    assert report["usage"]["cloud"]["generated_tokens"] == report["tokens"]



def test_run_writes_a_trace_and_logs_json_lines_with_the_answer_id(tmp_path: pathlib.Path) -> None:
    from test_timeline import check_trace_event_format, thread_names

    trace_file = tmp_path / "answer.trace.json"
    result = pydisco(
        "run", "Say hello.", "--max-tokens", "6", "--reading-rate", "0", "--threads", "1", "--no-cloud",
        "--trace", str(trace_file), "--log-json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = check_trace_event_format(json.loads(trace_file.read_text()))
    assert "device" in thread_names(events).values()
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    ours = [r for r in records if r["logger"].startswith("pydisco.")]
    assert ours and len({r["answer_id"] for r in ours}) == 1 and ours[0]["answer_id"]
    assert any(r["message"].startswith("answer ended") for r in ours)


def test_run_refuses_a_trace_file_in_a_missing_folder(tmp_path: pathlib.Path) -> None:
    result = pydisco("run", "Hi", "--no-cloud", "--trace", str(tmp_path / "nowhere" / "t.json"))
    assert result.returncode == 2 and "--trace" in result.stderr and "Traceback" not in result.stderr


def test_run_publishes_the_answer_on_zenoh(tmp_path: pathlib.Path) -> None:
    zenoh = pytest.importorskip("zenoh")
    from zenoh_support import free_port, loopback_config

    endpoint = f"tcp/127.0.0.1:{free_port()}"
    config_file = tmp_path / "zenoh.json5"  # the command's session: no multicast scouting either
    config_file.write_text(json.dumps({"scouting": {"multicast": {"enabled": False}}, "listen": {"endpoints": []}}))
    got: list[tuple[str, dict[str, object]]] = []
    with zenoh.open(loopback_config(listen=[endpoint])) as session:
        session.declare_subscriber("pydisco/cli-test/**", lambda s: got.append((str(s.key_expr), json.loads(s.payload.to_bytes()))))
        result = subprocess.run(
            [sys.executable, "-m", "pydisco.cli", "run", "Say hello.", "--max-tokens", "6", "--reading-rate", "0",
             "--threads", "1", "--no-cloud", "--json", "--zenoh", "pydisco/cli-test", "--zenoh-connect", endpoint],
            capture_output=True, text=True, timeout=600, env={**os.environ, "ZENOH_CONFIG": str(config_file)},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tokens = [m for key, m in got if key.endswith("/tokens") and not m["end"]]
    reports = [m for key, m in got if key.endswith("/report")]
    assert "".join(str(t["text"]) for t in tokens) == report["text"] and len(tokens) == report["tokens"] > 0
    assert len(reports) == 1 and reports[0]["text"] == report["text"]
