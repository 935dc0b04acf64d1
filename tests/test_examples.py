"""The programs in examples/ build the way their READMEs say and run against a real answer:
the C++ 100 Hz loop reading shared memory (against an installed pydisco, find_package), the
C++ program embedding the runtime (against the source tree, add_subdirectory, which must not
build pydisco's own tests), and the Python control loop on the blocking API."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

import pydisco

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja")

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(CMAKE is None, reason="cmake is not installed"),
]


def run(*cmd: str | pathlib.Path, timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


def configure(source: pathlib.Path, build: pathlib.Path, *defines: str) -> None:
    generator = ["-G", "Ninja"] if NINJA else []
    run(CMAKE or "cmake", "-S", source, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release", *defines)


@pytest.fixture(scope="module")
def installed_prefix(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """pydisco's C++ core installed into a fresh prefix, as `cmake --install` does."""
    tmp = tmp_path_factory.mktemp("pydisco-install")
    configure(ROOT, tmp / "build", "-DPYDISCO_BUILD_TESTS=OFF")
    run(CMAKE or "cmake", "--build", tmp / "build")
    run(CMAKE or "cmake", "--install", tmp / "build", "--prefix", tmp / "prefix")
    return tmp / "prefix"


@pytest.fixture
def ring_name() -> Iterator[str]:
    name = f"pydisco-example-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    pydisco.unlink_shm_ring(name)


def test_the_installed_package_holds_the_headers_and_its_config(installed_prefix: pathlib.Path) -> None:
    assert (installed_prefix / "include" / "pydisco" / "shm_ring.hpp").is_file()
    configs = list(installed_prefix.glob("lib*/cmake/pydisco/pydiscoConfig.cmake"))
    assert configs and (configs[0].parent / "pydiscoConfigVersion.cmake").is_file()


def test_cxx_control_loop_reads_a_real_answer_from_shared_memory(
    installed_prefix: pathlib.Path, tmp_path: pathlib.Path, ring_name: str
) -> None:
    build = tmp_path / "shm_control_loop"
    configure(EXAMPLES / "shm_control_loop", build, f"-DCMAKE_PREFIX_PATH={installed_prefix}")
    run(CMAKE or "cmake", "--build", build)
    # The loop starts first and waits for a producer, as a robot's controller would.
    loop = subprocess.Popen(
        [str(build / "control_loop"), ring_name, "--answers", "1", "--seconds", "120", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        publisher = run(
            sys.executable, EXAMPLES / "shm_control_loop" / "answer_publisher.py",
            "--ring", ring_name, "--max-tokens", "16", "Name a planet.",
        )  # fmt: skip
        out, err = loop.communicate(timeout=60)
    finally:
        loop.kill()
        loop.wait()
    assert loop.returncode == 0, err
    published = [json.loads(line) for line in publisher.stdout.splitlines()]
    events = [json.loads(line) for line in out.splitlines()]
    report = published[-1]
    answers = [e for e in events if "answer" in e]
    assert [e["event"] for e in events if "event" in e] == ["attached"]
    assert len(answers) == 1 and answers[0]["text"] == report["text"] and answers[0]["tokens"] == report["tokens"] > 0
    assert answers[0]["finish"] == report["finish"]
    summary = events[-1]["summary"]
    assert summary["answers"] == 1 and summary["ticks"] > 0


def test_cxx_program_embedding_the_runtime_consumes_in_process(tmp_path: pathlib.Path) -> None:
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 (the test extra) builds the embedding example")
    build = tmp_path / "embed_runtime"
    configure(
        EXAMPLES / "embed_runtime", build,
        f"-DPYDISCO_SOURCE_DIR={ROOT}", f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
    )  # fmt: skip
    run(CMAKE or "cmake", "--build", build)
    # add_subdirectory did not build (or even define) pydisco's own tests.
    assert not (build / "pydisco" / "csrc" / "tests").exists()
    result = run(build / "embed_runtime", "--python", sys.executable, "--max-tokens", "12", "Name a planet.", timeout=120)
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["tokens"] == answer["report_tokens"] > 0 and answer["text"] == answer["report_text"]
    assert answer["finish"] in ("stop", "length")


def test_python_control_loop_on_the_blocking_api() -> None:
    result = run(sys.executable, EXAMPLES / "python_control_loop" / "control_loop.py", "--max-tokens", "8", timeout=120)
    loop = json.loads(result.stdout.splitlines()[-1])
    assert loop["text"] == loop["report_text"] and loop["text"]
    assert loop["finish"] in ("stop", "length") and loop["ticks"] > 0
