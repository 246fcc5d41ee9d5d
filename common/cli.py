"""Command lines from typed dataclasses: one `--flag` per field, YAML files of the same keys, one-line errors.

    parser = argparse.ArgumentParser()
    add_arguments(parser, ChatConfig)                  # --max-new-tokens, --temperature, ...
    config = resolve(parser.parse_args(), ChatConfig, yaml_path=None)   # defaults < YAML < flags given
    return run(lambda: work(config), ModelNotFoundError)               # "error: ..." and exit status 2

Fields are read from their annotations (`int`, `float`, `str`, `bool`, `list[str]`, each optionally `| None`);
a field's `metadata` may hold `help` and `choices`. Flags default to None, so a flag not given never overrides
the YAML file or the field's own default. Every `python -m ...` entry point and app.py use these.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad setting or config file; the message is one line that says what and where."""


def _kind(field: dataclasses.Field) -> str:
    """The annotation without its `| None`: "int", "float", "str", "bool" or "list[str]"."""
    return str(field.type).replace(" | None", "").strip()


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field. Defaults stay None, so only flags actually given override the YAML and defaults."""
    for f in dataclasses.fields(cls):
        flag, kind, help = "--" + f.name.replace("_", "-"), _kind(f), f.metadata.get("help")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind.startswith("list"):
            parser.add_argument(flag, nargs="+", default=None, help=help)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None,
                                choices=f.metadata.get("choices"), help=help)


def read_yaml(path: str, cls: type) -> dict[str, Any]:
    """The settings in a YAML config file, checked against the fields of `cls`."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected `key: value` settings at the top level")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r} (known keys: {', '.join(fields)})")
        data[key] = _coerce(value, _kind(fields[key]), f"{path}: {key}")
    return data


def _coerce(value: Any, kind: str, where: str) -> Any:
    """YAML's types to the field's: YAML reads `2e-4` as a string and a list may be written `a, b`."""
    if value is None:
        return None
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind == "float":
            return float(value)
        if kind.startswith("list"):
            return [str(v) for v in value] if isinstance(value, list) else str(value).replace(",", " ").split()
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from err


def resolve(args: argparse.Namespace, cls: type, yaml_path: str | None = None) -> Any:
    """An instance of `cls`: field defaults, overridden by the YAML file, overridden by the flags given."""
    values = read_yaml(yaml_path, cls) if yaml_path else {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return cls(**values)


def save_yaml(config: Any, path: Path) -> None:
    """The resolved settings, readable again by `read_yaml` (saved next to what they produced)."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")


def run(action: Callable[[], object], *errors: type[BaseException]) -> int:
    """The exit status of a command: what `action` returns if it is an int, else 0; or 2 after printing one line
    `error: ...` on stderr, without a traceback, when it raises one of `errors` (bad input, a missing model)."""
    try:
        status = action()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
