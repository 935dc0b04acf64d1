"""``pydisco serve`` (or any command) as a child process that a test reads with deadlines: a
thread collects its stdout lines, so no read blocks past a timeout even when the child hangs
silently; its stderr goes to a file, since a pipe nobody reads can fill and stall the child."""

from __future__ import annotations

import queue
import re
import subprocess
import tempfile
import threading
import time


class Child:
    def __init__(self, args: list[str]) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.lines: list[str] = []  # stdout so far, as read by read_until and output
        self._pending: queue.Queue[str | None] = queue.Queue()  # None: stdout closed
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._pending.put(line)
        self._pending.put(None)

    def _next_line(self, deadline: float, waiting_for: str) -> str | None:
        """The next stdout line, or None once the child closed its stdout; fails at the deadline."""
        try:
            line = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"the child did not print {waiting_for} in time: {self.lines}; "
                                 f"stderr: {self.stderr()}") from None  # fmt: skip
        if line is None:
            self._pending.put(None)  # closed stays closed for the next call
        else:
            self.lines.append(line)
        return line

    def read_until(self, pattern: str, count: int, timeout: float = 60) -> list[str]:
        """stdout until ``count`` lines matched ``pattern``; fails at the deadline or when the
        child closed its stdout first."""
        deadline = time.monotonic() + timeout
        matched = sum(1 for line in self.lines if re.search(pattern, line))
        while matched < count:
            line = self._next_line(deadline, repr(pattern))
            if line is None:
                raise AssertionError(f"the child did not print {pattern!r} (exit status {self.process.poll()}): "
                                     f"{self.lines}; stderr: {self.stderr()}")  # fmt: skip
            matched += bool(re.search(pattern, line))
        return self.lines

    def output(self, timeout: float = 30) -> str:
        """All of stdout, once the child (and every process that shares its stdout) closed it."""
        deadline = time.monotonic() + timeout
        while self._next_line(deadline, "the end of its output") is not None:
            pass
        return "".join(self.lines)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self) -> None:
        """Kill it if it is still running."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._stderr.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

