"""docs/testing.md's recipe works as written: its Python blocks, in order, are one test file
that pytest runs (with Hypothesis) and passes. The doc is the source; nothing is copied here."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

RECIPE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def recipe_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", RECIPE.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_recipe_is_a_test_file_that_passes(tmp_path: pathlib.Path) -> None:
    blocks = recipe_blocks()
    assert len(blocks) >= 5  # policy, registration, endpoints, the runtime, the property
    module = tmp_path / "test_my_policy.py"
    module.write_text("\n\n".join(blocks))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
        cwd=tmp_path,  # as a user's own project: not this repository's conftest or settings
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^1 passed", result.stdout, flags=re.MULTILINE), result.stdout
