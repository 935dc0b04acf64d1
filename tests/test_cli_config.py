"""``--config FILE`` for ``pydisco run`` and ``pydisco serve``: the file gives what the command
line would, the command line overrides it, and a bad file gets one line naming the key."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

import pytest

from pydisco.cli import build_parser, main
from pydisco.cli._config import ConfigSpec, add_config_option, enable_config, resolve_options


def parsed(*argv: str) -> dict[str, Any]:
    args = resolve_options(build_parser().parse_args(argv))
    return {k: v for k, v in vars(args).items() if k not in ("func", "config")}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def as_toml(options: dict[str, object], *, dashes: bool) -> str:
    return "".join(f"{k.replace('_', '-') if dashes else k} = {toml_value(v)}\n" for k, v in options.items())


def as_argv(options: dict[str, object]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


RUN_OPTIONS: dict[str, object] = {
    "dispatch": "cloud-only", "migration": "never", "max_tokens": 17, "reading_rate": 4.5,
    "cloud": "wss://127.0.0.1:8443", "token": "secret", "no_device": True, "threads": 2, "json": True,
}  # fmt: skip


@pytest.fixture
def serve_options(tmp_path: pathlib.Path) -> dict[str, object]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    return {
        "listen": ["wss://0.0.0.0:8443", "quic://0.0.0.0:8443"], "token": ["a", "b"], "upstream": "http://h:8000/v1",
        "upstream_key": "k", "upstream_model": "m", "cert": str(cert), "key": str(key), "parallel": 3, "threads": 2,
        "max_streams": 4,
    }  # fmt: skip


@pytest.mark.parametrize("dashes", [False, True], ids=["underscores", "dashes"])
def test_run_round_trip_a_file_gives_what_the_command_line_gives(tmp_path: pathlib.Path, dashes: bool) -> None:
    config = write(tmp_path / "run.toml", as_toml(RUN_OPTIONS, dashes=dashes))
    assert parsed("run", "hi", "--config", config) == parsed("run", "hi", *as_argv(RUN_OPTIONS))
    assert parsed("run", "hi", "--config", config)["max_tokens"] == 17  # and not the default


def test_serve_round_trip_required_options_may_come_from_the_file(
    tmp_path: pathlib.Path, serve_options: dict[str, object]
) -> None:
    config = write(tmp_path / "serve.toml", as_toml(serve_options, dashes=False))
    from_file = parsed("serve", "--config", config)  # --listen and --token are required; the file has them
    assert from_file == parsed("serve", *as_argv(serve_options))
    assert from_file["listen"] == serve_options["listen"] and from_file["parallel"] == 3


def test_without_a_file_the_defaults_are_the_parsers() -> None:
    args = parsed("run", "hi")
    assert (args["dispatch"], args["max_tokens"], args["reading_rate"], args["json"]) == ("race-both", 96, 12.0, False)
    assert args["cloud"] is None and args["token"] == ""


def test_the_command_line_overrides_the_file(tmp_path: pathlib.Path, serve_options: dict[str, object]) -> None:
    config = write(tmp_path / "c.toml", as_toml(RUN_OPTIONS, dashes=False))
    args = parsed("run", "hi", "--config", config, "--max-tokens", "5", "--dispatch", "race-both")
    assert (args["max_tokens"], args["dispatch"], args["migration"]) == (5, "race-both", "never")
    # A repeatable option on the command line replaces the file's whole list, and one member of
    # a mutually exclusive group replaces the file's other member.
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    config = write(tmp_path / "s.toml", as_toml(serve_options, dashes=False))
    args = parsed("serve", "--config", config, "--listen", "ws://127.0.0.1:1", "--token-file", str(tokens))
    assert args["listen"] == ["ws://127.0.0.1:1"]
    assert args["token"] is None and args["token_file"] == tokens
    assert args["upstream_model"] == "m"  # the rest still comes from the file


def test_a_command_reads_the_top_level_and_its_own_section_only(tmp_path: pathlib.Path) -> None:
    config = write(tmp_path / "both.toml", 'threads = 3\n[run]\nmax_tokens = 9\n[serve]\nlisten = ["ws://127.0.0.1:1"]\n'
                   'token = ["t"]\nthreads = 1\n')  # fmt: skip
    run = parsed("run", "hi", "--config", config)
    assert (run["max_tokens"], run["threads"]) == (9, 3)
    serve = parsed("serve", "--config", config)
    assert (serve["listen"], serve["token"], serve["threads"]) == (["ws://127.0.0.1:1"], ["t"], 1)


def fails(capsys: pytest.CaptureFixture[str], argv: Sequence[str]) -> str:
    """The one line ``pydisco`` prints for ``argv``, which must exit with status 2."""
    try:
        status = main(list(argv))
    except SystemExit as stop:  # argparse's own usage errors
        status = int(stop.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


BAD_FILES = [
    ("max_token = 5\n", "unknown key 'max_token' for pydisco run; did you mean 'max_tokens'?"),
    ("nonsense = 5\n", "unknown key 'nonsense' for pydisco run; known: cloud, debug, dispatch"),
    ("[run]\nlisten = ['ws://h:1']\n", "unknown key '[run] listen' for pydisco run"),
    ("max_tokens = 'many'\n", "max_tokens: expected a whole number >= 1, got 'many'"),
    ("max_tokens = 0\n", "max_tokens: expected a whole number >= 1, got '0'"),
    ("max_tokens = [1, 2]\n", "max_tokens: expected a single value, got a list"),
    ("no_cloud = 1\n", "no_cloud: expected true or false, got 1"),
    ("token = 12\n", "token: expected a string, got 12"),
    ("transport = 'tcp'\n", "transport: expected one of wss, ws, quic, zenoh, got 'tcp'"),
    ("dispatch = 'nope'\n", "dispatch: unknown dispatch policy 'nope'; known: cloud-only"),
    ("cloud = 'http://h:1'\n", "cloud: unknown URL scheme 'http'"),
    ("max_tokens = 5\nmax-tokens = 6\n", "'max-tokens' is given twice"),
    ("max_tokens = \n", "not valid TOML"),
]


@pytest.mark.parametrize("text, culprit", BAD_FILES, ids=[c.split(":")[0] for _, c in BAD_FILES])
def test_a_bad_file_gets_one_line_naming_the_key(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], text: str, culprit: str
) -> None:
    config = write(tmp_path / "bad.toml", text)
    line = fails(capsys, ["run", "hi", "--config", config])
    assert line.startswith(f"pydisco run: {config}: ") and culprit in line, line


def test_a_missing_file_and_exclusive_keys_in_one_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--config: no such file" in fails(capsys, ["serve", "--config", str(tmp_path / "none.toml")])
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    both = write(tmp_path / "both.toml", f'listen = ["ws://127.0.0.1:1"]\ntoken = ["t"]\ntoken_file = "{tokens}"\n')
    assert "token and token_file exclude each other" in fails(capsys, ["serve", "--config", both])


def test_required_options_missing_from_both_are_a_usage_error(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "s.toml", 'token = ["t"]\n')
    line = fails(capsys, ["serve", "--config", config])
    assert "the following arguments are required: --listen" in line
    line = fails(capsys, ["serve", "--listen", "ws://127.0.0.1:1"])
    assert "one of the arguments --token --token-file is required" in line


def test_an_option_added_later_is_configurable_without_more_code(tmp_path: pathlib.Path) -> None:
    parser = argparse.ArgumentParser(prog="pydisco demo")
    parser.add_argument("--brand-new", type=int, default=1)
    parser.add_argument("--louder", action="count", default=0)
    parser.add_argument("--colour", action=argparse.BooleanOptionalAction, default=True)
    add_config_option(parser)
    enable_config(parser, "demo", frozenset({"demo"}))
    config = write(tmp_path / "d.toml", "brand-new = 7\nlouder = 2\ncolour = false\n")
    args = resolve_options(parser.parse_args(["--config", config]))
    assert (args.brand_new, args.louder, args.colour) == (7, 2, False)
    args = resolve_options(parser.parse_args(["--config", config, "--louder", "--colour"]))
    assert (args.brand_new, args.louder, args.colour) == (7, 1, True)
    spec = parser.get_default("config_spec")
    assert isinstance(spec, ConfigSpec) and set(spec.options) == {"brand_new", "louder", "colour"}


def test_the_documented_example_names_only_real_options() -> None:
    import re
    import tomllib

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    example = tomllib.loads(re.search(r"```toml\n(.*?)```", doc, re.DOTALL).group(1))  # type: ignore[union-attr]
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = {k for k, v in example.items() if not isinstance(v, dict)}
    for command in ("run", "serve"):
        spec = subparsers.choices[command].get_default("config_spec")
        keys = {k.replace("-", "_") for k in top | set(example[command])}
        assert keys <= set(spec.options), keys - set(spec.options)
