"""The public API as a user meets it: ``import pydisco``, ``dir``/``help``, a type checker, and
the command line's help."""

from __future__ import annotations

import argparse
import pathlib
import pydoc
import re
import subprocess
import sys
import textwrap

import pytest

import pydisco
from pydisco.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the users reached for and had to dig out of private modules.
WANTED = ("Slo", "Budget", "Endpoint", "TokenSink", "Message", "realtime_thread", "set_thread_realtime",
          "set_thread_normal", "RuntimeConfig", "open_runtime", "BlockingRuntime", "AnswerReport")  # fmt: skip


def test_every_name_in_all_resolves_and_the_wanted_ones_are_there() -> None:
    for name in pydisco.__all__:
        assert getattr(pydisco, name) is not None, name
    assert set(WANTED) <= set(pydisco.__all__)
    assert len(set(pydisco.__all__)) == len(pydisco.__all__)


def test_dir_holds_public_names_and_subpackages_only() -> None:
    names = dir(pydisco)
    for name in names:
        public = name in pydisco.__all__ or name == "__version__"
        subpackage = type(getattr(pydisco, name)) is type(pydisco) and not name.startswith("_")
        assert public or subpackage, name
    assert "annotations" not in names and "_LAZY" not in names
    assert set(pydisco.__all__) <= set(names)  # this install has every extra


def test_help_lists_the_public_classes_lazy_ones_included() -> None:
    text = pydoc.render_doc(pydisco, renderer=pydoc.plaintext)
    for name in ("Slo", "Budget", "RuntimeConfig", "BlockingRuntime", "DeviceEndpoint", "CloudEndpoint"):
        assert re.search(rf"^\s*class {name}\b", text, re.MULTILINE), name
    assert "_LAZY" not in text and "annotations =" not in text


def test_lazy_names_are_real_types_to_a_type_checker_and_a_typo_is_an_error(tmp_path: pathlib.Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent("""
        import pydisco
        reveal_type(pydisco.DeviceEndpoint)
        reveal_type(pydisco.open_cloud_endpoint)
        reveal_type(pydisco.Slo(reading_rate=5.0))
        pydisco.DeviceEndpiont
    """))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
         str(user)],  # fmt: skip
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    out = result.stdout
    assert "-> pydisco.device._endpoint.DeviceEndpoint\"" in out, out  # the class itself, not object
    assert "pydisco.cloud._client.CloudEndpoint" in out, out
    assert 'Revealed type is "pydisco.policies._base.Slo"' in out, out
    assert 'Module has no attribute "DeviceEndpiont"' in out, out
    assert "Any" not in out, out


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("pydisco", parser), *((f"pydisco {n}", p) for n, p in subparsers.choices.items())]


@pytest.mark.parametrize("prog, parser", _parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_cli_help_texts_are_plain_sentences(prog: str, parser: argparse.ArgumentParser) -> None:
    texts = [parser.description or ""]
    texts += [a.help for a in parser._actions if a.help and a.help != argparse.SUPPRESS and a.dest != "help"]
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    texts += [c.help for s in subparsers for c in s._choices_actions if c.help]
    for text in texts:
        assert not re.search(r"``|:class:|:meth:|\bTODO\b|add_parser", text), (prog, text)
        assert text[0].isupper() or text.startswith("llama.cpp"), (prog, text)
        assert text.rstrip().endswith("."), (prog, text)
