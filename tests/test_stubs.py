"""The hand-written _core.pyi matches the compiled module."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pydisco._core

HERE = pathlib.Path(__file__).parent
STUB = pathlib.Path(pydisco.__file__).parent / "_core.pyi"


def test_stub_names_every_public_name_of_the_module() -> None:
    # The allowlist below has to ignore class-level metaclass noise, so check names here.
    tree = ast.parse(STUB.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    stubbed |= {t.id for n in tree.body if isinstance(n, ast.AnnAssign) for t in [n.target] if isinstance(t, ast.Name)}
    runtime = {name for name in vars(pydisco._core) if not name.startswith("__")}
    assert runtime == stubbed


def test_stubtest_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "pydisco._core", "--allowlist", str(HERE / "stubtest_allowlist.txt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
