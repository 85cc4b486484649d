"""One config dataclass per command, and everything derived from it.

Each command (`build`, `distill`) has one frozen dataclass. Its fields are declared with
`option(default, help, ...)`: the default, a one-line reason, and whether the field changes
the command's result (`fingerprint`; on by default, so a new field is covered unless it
says otherwise). From the dataclass come, in one place each:

  * the command-line flags (`click_options`): `--top-k` for `top_k`, help text and default;
  * YAML/TOML config files (`from_sources`): defaults < file < flags; unknown keys and
    wrong types fail with the key's name and what it takes;
  * the fingerprint (`fingerprint_values`): what a resumed run must agree on, and the
    names of the fields that may differ (`changed`).

Validation of values lives in the dataclass's `__post_init__`, so a config built from
Python, a file or flags is checked the same way.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

_MISSING = dataclasses.MISSING


def option(default: Any, help: str, *, fingerprint: bool = True, choices: tuple[str, ...] | None = None,
           flag: str | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A config field: `default`, its `help` line, and whether it changes the result.

    `fingerprint=False` marks a field that may differ between a run and its resume (batch
    size, device, worker count...). `flag` overrides the generated flag name; `cli=False`
    keeps a field out of the command line (set from Python or a config file only)."""
    meta = {"help": help, "fingerprint": fingerprint, "choices": choices, "flag": flag, "metavar": metavar, "cli": cli}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def inherit(cls: type, name: str, default: Any = _MISSING, *, help: str | None = None, flag: str | None = None) -> Any:
    """A field that another command's config already declares (`cls.name`): its help,
    choices and fingerprint role, with this command's own default where given. A command
    that drives others (`minillm` runs generate, build and distill) declares each option
    once, here, instead of restating it."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    if default is _MISSING:
        default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
    m = f.metadata
    return option(default, help or m["help"], fingerprint=m["fingerprint"], choices=m["choices"], flag=flag or m["flag"],
                  metavar=m["metavar"], cli=m["cli"])


def _type_of(f: dataclasses.Field) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool' | 'dict', optional) from a field's annotation string."""
    text = str(f.type).replace(" ", "")
    optional = text.endswith("|None")
    base = text[: -len("|None")] if optional else text
    if base.startswith("dict"):
        base = "dict"
    if base not in ("int", "float", "str", "bool", "dict"):
        raise TypeError(f"config field {f.name}: unsupported type {f.type}")
    return base, optional


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _check_type(cls: type, name: str, value: Any, source: str) -> Any:
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    base, optional = _type_of(f)
    if value is None and optional:
        return None
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
    }[base]
    if not ok:
        raise ConfigError(f"{source}: {name} must be {f.type}, got {value!r}")
    return float(value) if base == "float" else value


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML (or .toml) mapping of option: value, keys as flags (`top-k`) or fields (`top_k`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.endswith(".toml") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


class CommandConfig:
    """Base of each command's config dataclass: `Config.from_sources(file, flags)`."""

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> Any:
        """Defaults < a YAML/TOML config file < command-line flags (see the module function)."""
        return from_sources(cls, config_file, overrides)


def from_sources(cls: type, config_file: str | None, overrides: dict[str, Any]) -> Any:
    """An instance of `cls` from its defaults < a config file < `overrides` (flags; None = unset).

    Unknown config keys and values of the wrong type raise ConfigError naming the key."""
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        for name, value in read_config_file(config_file).items():
            if name not in known:
                raise ConfigError(f"{config_file}: unknown key {name!r}; valid keys: {', '.join(sorted(known))}")
            values[name] = _check_type(cls, name, value, config_file)
    for name, value in overrides.items():
        if value is None or (isinstance(value, dict) and not value):
            continue
        values[name] = _check_type(cls, name, value, flag_name({f.name: f for f in dataclasses.fields(cls)}[name]))
    return cls(**values)


def _key_value(ctx: Any, param: Any, values: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE flags into a dict; values parsed as YAML (1 -> int, true -> bool)."""
    import click

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        out[key.replace("-", "_")] = yaml.safe_load(raw)
    return out


def click_options(cls: type) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of `cls` (flags default to None, so a
    config file can fill what the command line leaves out)."""
    import click

    def decorate(func: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            if not f.metadata.get("cli", True):
                continue
            base, _ = _type_of(f)
            default = f.default if f.default is not _MISSING else None
            shown = "" if default in (None, "", False) else f" [default: {default}]"
            help_text = f.metadata.get("help", "") + shown
            flag = flag_name(f)
            if base == "bool":
                func = click.option(flag, f.name, is_flag=True, default=None, help=help_text)(func)
            elif base == "dict":
                func = click.option(flag, f.name, multiple=True, callback=_key_value, metavar="KEY=VALUE", help=help_text)(func)
            else:
                kind = click.Choice(list(f.metadata["choices"])) if f.metadata.get("choices") else {"int": int, "float": float, "str": str}[base]
                func = click.option(flag, f.name, type=kind, default=None, metavar=f.metadata.get("metavar"), help=help_text)(func)
        return func

    return decorate


def fingerprint_values(config: Any) -> dict[str, Any]:
    """The fields that change the result (everything not marked `fingerprint=False`)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("fingerprint", True)}


def free_fields(cls: type) -> list[str]:
    """Names (as flags) of the fields that may change between a run and its resume."""
    return [flag_name(f) for f in dataclasses.fields(cls) if not f.metadata.get("fingerprint", True)]


def changed(old: dict[str, Any], config: Any) -> list[str]:
    """'--flag: old -> new' for every fingerprinted field whose value differs from `old`."""
    out = []
    for f in dataclasses.fields(config):
        if not f.metadata.get("fingerprint", True):
            continue
        # A field the old run did not know had its default there.
        before = old[f.name] if f.name in old else (f.default if f.default is not _MISSING else f.default_factory())
        if before != getattr(config, f.name):
            out.append(f"{flag_name(f)}: {before!r} before, {getattr(config, f.name)!r} now")
    return out


def validate(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the first failed check's message (each names the allowed range)."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
