"""``--config FILE``: a subcommand's options read from a TOML file (docs/configuration.md).

The keys a file may hold are derived from the subcommand's own argparse options (their dest
names, written with dashes or underscores), so an option added later is configurable at once.
Each value is checked by the option's own ``type=`` function and ``choices``, as on the command
line. The command line overrides the file: an option given there replaces the file's value (a
repeatable one, its whole list; one of a mutually exclusive group, the file's other members).

How: the subcommand's option defaults are replaced by a marker when the parser is built, so
after parsing the marker says "not on the command line"; ``resolve_options`` then fills each
such option from the file or the original default, and checks required options last (argparse
cannot: a required option may come from the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import pathlib
import tomllib
from collections.abc import Callable
from typing import Any

from .._errors import ConfigurationError


class _NotGiven:
    """The default of every configurable option: "not on the command line"."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()
# Dests that are not options of the work: argparse's own, and the file itself.
_NOT_CONFIGURABLE = frozenset({"help", "config", "version"})
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


@dataclasses.dataclass
class _Option:
    action: argparse.Action
    default: Any  # the option's real default
    required: bool
    not_given: Any  # the default that stands for "not on the command line"


def _not_given_marker(action: argparse.Action) -> Any:
    # Repeatable and counting options build on their default (None: start from nothing);
    # any other option just replaces it.
    return None if isinstance(action, (argparse._AppendAction, argparse._CountAction)) else NOT_GIVEN


@dataclasses.dataclass
class ConfigSpec:
    """What ``--config`` may set on one subcommand, and what resolving needs to finish."""

    parser: argparse.ArgumentParser
    command: str
    commands: frozenset[str]
    options: dict[str, _Option]  # by dest
    exclusive: list[tuple[list[str], bool]]  # (dests of a mutually exclusive group, required)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=pathlib.Path,
                        help="Read options from this TOML file (docs/configuration.md); the command line "
                        "overrides it.")  # fmt: skip


def enable_config(parser: argparse.ArgumentParser, command: str, commands: frozenset[str]) -> None:
    """Make every option of ``parser`` (the subcommand ``command``, which has ``--config``)
    settable from the file. ``commands``: every subcommand's name (a file's sections). Call it
    once the parser has all its options."""
    options: dict[str, _Option] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_CONFIGURABLE or action.dest == argparse.SUPPRESS:
            continue
        marker = _not_given_marker(action)
        options[action.dest] = _Option(action, action.default, action.required, marker)
        action.default, action.required = marker, False
    exclusive = []
    for group in parser._mutually_exclusive_groups:
        exclusive.append(([a.dest for a in group._group_actions], group.required))
        group.required = False
    parser.set_defaults(config_spec=ConfigSpec(parser, command, commands, options, exclusive))


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options the command line left out from ``args.config`` (if given), else their
    defaults; then check what is required. Bad files raise ConfigurationError (one line);
    a missing required option is a usage error, as argparse reports it."""
    spec: ConfigSpec | None = getattr(args, "config_spec", None)
    if spec is None:
        return args
    del args.config_spec
    given = {dest for dest, option in spec.options.items() if getattr(args, dest) is not option.not_given}
    from_file = _read(args.config, spec) if args.config is not None else {}
    for dests, _ in spec.exclusive:  # one member on the command line replaces the file's others
        if given & set(dests):
            for dest in dests:
                from_file.pop(dest, None)
    for dest, option in spec.options.items():
        if dest not in given:
            setattr(args, dest, from_file[dest] if dest in from_file else _default(option))
    _check_required(spec, given | set(from_file))
    return args


def _default(option: _Option) -> Any:
    # As argparse does: a string default goes through the option's type.
    if isinstance(option.default, str) and option.action.type is not None:
        return _convert(option.action, option.default)
    return option.default


def _check_required(spec: ConfigSpec, present: set[str]) -> None:
    missing = [o.action.option_strings[-1] for d, o in spec.options.items() if o.required and d not in present]
    if missing:
        spec.parser.error(f"the following arguments are required: {', '.join(missing)} (or set them in --config)")
    for dests, required in spec.exclusive:
        if required and not present & set(dests):
            names = " ".join(spec.options[d].action.option_strings[-1] for d in dests)
            spec.parser.error(f"one of the arguments {names} is required (or set it in --config)")


def _read(path: pathlib.Path, spec: ConfigSpec) -> dict[str, Any]:
    """The file's values for ``spec``'s command, converted and checked, by dest."""
    try:
        document = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"--config: no such file: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"--config: cannot read {str(path)!r}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path}: not valid TOML: {e}") from e
    # Top-level keys are this command's; a table named after a command is that command's
    # section (this one's overrides the top level; the others are left to their commands).
    keys = {k: v for k, v in document.items() if not (k in spec.commands and isinstance(v, dict))}
    section = document.get(spec.command, {})
    keys.update(section if isinstance(section, dict) else {})
    where = {k: f"[{spec.command}] {k}" if isinstance(section, dict) and k in section else k for k in keys}
    values: dict[str, Any] = {}
    for key, value in keys.items():
        dest = key.replace("-", "_")
        option = spec.options.get(dest)
        if option is None:
            raise ConfigurationError(f"{path}: unknown key {where[key]!r} for pydisco {spec.command}{_suggest(dest, spec)}")
        if dest in values:
            raise ConfigurationError(f"{path}: {where[key]!r} is given twice (with dashes and with underscores)")
        try:
            values[dest] = _value(option, value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigurationError(f"{path}: {where[key]}: {e}") from None
    for dests, _ in spec.exclusive:
        both = [d for d in dests if d in values]
        if len(both) > 1:
            raise ConfigurationError(f"{path}: {' and '.join(both)} exclude each other: give one")
    return values


def _suggest(dest: str, spec: ConfigSpec) -> str:
    close = difflib.get_close_matches(dest, spec.options, n=1, cutoff=0.75)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(sorted(spec.options))}"


def _value(option: _Option, value: Any) -> Any:
    """One TOML value as the option would hold it after parsing its command-line form."""
    action = option.action
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, _FLAG_ACTIONS):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {_shown(value)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else option.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"expected a whole number >= 0, got {_shown(value)}")
        return value
    if isinstance(action, argparse._AppendAction):  # repeatable: a list (or one value)
        items = value if isinstance(value, list) else [value]
        return [_convert(action, _scalar(action, item)) for item in items]
    if isinstance(action, argparse._StoreAction):
        if action.nargs not in (None, "?"):
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {_shown(value)}")
            return [_convert(action, _scalar(action, item)) for item in value]
        return _convert(action, _scalar(action, value))
    raise TypeError(f"option {action.option_strings[-1]} cannot be set from a file")


def _scalar(action: argparse.Action, value: Any) -> str:
    """A TOML scalar as its command-line text, which the option's type function then checks
    (a number for a numeric option; a string where the option takes any text)."""
    if isinstance(value, str):
        return value
    if action.type is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {'a string' if action.type is None else 'a single value'}, got {_shown(value)}")
    return str(value)


def _convert(action: argparse.Action, text: str) -> Any:
    convert: Callable[[str], Any] = action.type if callable(action.type) else str
    value = convert(text)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {text!r}")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return repr(value)
