"""`pydisco run`, the main job, as a user runs it: a subprocess on the embedded defaults."""

from __future__ import annotations

import json
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

