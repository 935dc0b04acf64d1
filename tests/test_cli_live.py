"""``pydisco run`` on a real terminal (tmux): the live view colours each token by the endpoint
that produced it, marks the handover, keeps a status line while streaming, then prints the
report as a table. ``--plain`` on the same terminal prints no colour at all."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"),
]

CYAN, GREEN = "\x1b[36m", "\x1b[32m"  # the styles of cloud and device (ENDPOINT_STYLES)
ESCAPE = "\x1b["
# P/D-Device: the cloud prefills and sends the first tokens, then the device takes over, so
# both endpoints produce tokens and there is one handover. Paced at reading speed, the answer
# streams for seconds, long enough to see the status line while it runs.
RUN = ["run", "Explain why the sky is blue.", "--dispatch", "pd-device", "--max-tokens", "30", "--threads", "1"]


class Terminal:
    """A tmux server of our own (its own socket), one session of a fixed size."""

    def __init__(self, name: str) -> None:
        self.socket = f"pydisco-test-{os.getpid()}-{name}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout  # fmt: skip

    def start(self, argv: list[str]) -> None:
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "pydisco.cli", *argv])
        # The exit status is printed, then the pane stays for capture-pane.
        self.tmux("new-session", "-d", "-x", "120", "-y", "50", f"{command}; echo EXIT=$?; sleep 600")

    def screen(self, *, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-J")

    def wait_for(self, text: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while text not in (screen := self.screen()):
            assert time.monotonic() < deadline, f"{text!r} never appeared:\n{screen}"
            time.sleep(0.1)
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal(request: pytest.FixtureRequest) -> Iterator[Terminal]:
    term = Terminal(request.node.name[:20])
    try:
        yield term
    finally:
        term.close()


def test_live_view_colours_both_endpoints_marks_the_handover_and_shows_a_table(terminal: Terminal) -> None:
    terminal.start(RUN)
    streaming = terminal.wait_for("tokens/s")  # the status line, under the answer while it streams
    assert "EXIT=" not in streaming and "unread" in streaming and "share" in streaming
    final = terminal.wait_for("EXIT=")
    assert "EXIT=0" in final, final
    coloured = terminal.screen(escapes=True)
    answer = coloured[: coloured.index("report")]
    assert CYAN in answer and GREEN in answer, coloured  # tokens of both endpoints, each its colour
    assert "[→device]" in final  # where the device took over
    # The report, as a table: one row per field, the migration with both endpoints in colour.
    rows = {line.split()[0] for line in final[final.index("report"):].splitlines() if line.strip()}
    assert {"tokens", "TTFT", "QoE", "dispatch", "endpoints", "migration", "cloud", "device"} <= rows
    migration = next(line for line in coloured.splitlines() if "migration" in line and "at token" in line)
    assert CYAN in migration and GREEN in migration


def test_plain_on_a_terminal_prints_todays_text_without_colour(terminal: Terminal) -> None:
    terminal.start([*RUN, "--plain"])
    final = terminal.wait_for("EXIT=")
    assert "EXIT=0" in final, final
    assert ESCAPE not in terminal.screen(escapes=True).replace("\x1b[39m", "").replace("\x1b[49m", "")
    assert "\ntokens " in final and "endpoints: cloud, device" in final
