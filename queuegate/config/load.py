"""Loading a config: TOML, `${ENV}` interpolation, conversion into the typed structs, and errors that name the key.

A bad config fails at start with the file, the key path (`models.coder.max_concurrency`) and what was expected.
Secret values (keys read from the environment) never appear in an error message or a repr.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from queuegate.config.checks import check_config
from queuegate.config.schema import (
    Config,
    ConfigError,
    DeviceConfig,
    KeyConfig,
    ModelConfig,
    PolledNodeConfig,
    ToolServerConfig,
)

_T = TypeVar("_T")
_INTERNAL = frozenset({"base_dir", "polled"})  # fields the loader sets, not keys a user writes

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Inside a model's table these stay literal for the launcher: ${PORT} (its port), ${MODEL} (its name) and
# ${PYTHON} (the interpreter QueueGate runs on, for servers installed beside it: `${PYTHON} -m vllm...`).
LAUNCH_MACROS = frozenset({"PORT", "MODEL", "PYTHON"})


def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    return parse_config(text, source=str(path), base_dir=str(path.resolve().parent), environ=environ)


def parse_config(
    text: str, *, source: str = "<config>", base_dir: str = ".", environ: dict[str, str] | None = None
) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return build_config(raw, source=source, base_dir=base_dir, environ=environ)


def build_config(
    raw: dict[str, Any],
    *,
    source: str = "<config>",
    base_dir: str = ".",
    environ: dict[str, str] | None = None,
) -> Config:
    """Validate an already-parsed mapping (from TOML, or built in code for the demo)."""
    env = os.environ if environ is None else environ
    data = _interpolate(raw, env, source, path="")
    # Named tables (one per model or device) are converted one by one, so an error names the table, not `[...]`.
    models = _convert_named(data.pop("models", {}), ModelConfig, source, "models")
    devices = _convert_named(data.pop("devices", {}), DeviceConfig, source, "devices")
    keys = _convert_named(data.pop("keys", {}), KeyConfig, source, "keys")
    tools = data.get("tools")
    named = tools.pop("servers", {}) if isinstance(tools, dict) else {}
    servers = _convert_named(named, ToolServerConfig, source, "tools.servers")
    nodes = data.get("nodes")
    tables = {k: nodes.pop(k) for k, v in list(nodes.items()) if isinstance(v, dict)} if isinstance(nodes, dict) else {}
    polled = _convert_named(tables, PolledNodeConfig, source, "nodes")  # ([nodes.NAME]: a table among the settings)
    config = _convert({**data, "base_dir": base_dir}, Config, source, "")
    tools_config = msgspec.structs.replace(config.tools, servers=servers)
    nodes_config = msgspec.structs.replace(config.nodes, polled=polled)
    config = msgspec.structs.replace(
        config, models=models, devices=devices, keys=keys, tools=tools_config, nodes=nodes_config
    )
    check_config(config, source, env)
    return config


def _convert_named(tables: Any, type_: type[_T], source: str, key: str) -> dict[str, _T]:
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: at `{key}`: Expected `table`, got `{type(tables).__name__}`")
    for name, table in tables.items():
        dotted = _dotted_name(name, table, type_)
        if dotted is not None:
            raise ConfigError(
                f'{source}: at `{key}.{name}`: a name with dots needs quotes in TOML: [{key}."{dotted}"]'
                f" (unquoted, it reads as a table {name!r} inside {key})"
            )
    return {name: _convert(table, type_, source, f"{key}.{name}") for name, table in tables.items()}


def _dotted_name(name: str, table: Any, type_: type) -> str | None:
    """The whole name if `[models.llama-3.3-70b]` was written unquoted (TOML reads it as table `llama-3` holding a
    table `3-70b`), else None."""
    known = {f.encode_name for f in msgspec.structs.fields(type_)}
    parts = [name]
    while isinstance(table, dict) and len(table) == 1:
        ((inner, table),) = table.items()
        if inner in known or not isinstance(table, dict):
            break
        parts.append(inner)
    return ".".join(parts) if len(parts) > 1 else None


def _convert(data: Any, type_: type[_T], source: str, path: str) -> _T:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        allowed = _allowed_values(type_, message)
        if allowed:
            message = message.replace(" - at `$", f"; expected one of {', '.join(allowed)} - at `$", 1)
        unknown = _unknown_key(type_, message, path)
        if unknown is not None:
            raise ConfigError(f"{source}: {unknown}") from None
        raise ConfigError(f"{source}: {_readable(message, path)}") from None


def _unknown_key(type_: Any, message: str, path: str) -> str | None:
    """For msgspec's 'Object contains unknown field `x`': which key or section is unknown, and the closest known one
    (a typo's likely meaning). None for any other message."""
    found = re.match(r"Object contains unknown field `([^`]*)`(?: - at `\$(.*)`)?$", message)
    if found is None:
        return None
    name, where = found.group(1), found.group(2) or ""
    for part in re.findall(r"\.(\w+)", where):
        hints = typing.get_type_hints(type_) if isinstance(type_, type) else {}
        type_ = _unwrapped(hints.get(part))
    is_struct = isinstance(type_, type) and issubclass(type_, msgspec.Struct)
    known = [f.encode_name for f in msgspec.structs.fields(type_) if f.name not in _INTERNAL] if is_struct else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    table = ".".join(p for p in (path, where.lstrip(".")) if p)
    if not table:
        hint = f"; did you mean [{close[0]}]?" if close else f"; the sections are {', '.join(f'[{k}]' for k in known)}"
        return f"unknown section [{name}]{hint}"
    hint = f"; did you mean `{close[0]}`?" if close else f"; the keys of [{table}] are {', '.join(known)}"
    return f"at `{table}`: unknown key `{name}`{hint}"


def _allowed_values(type_: Any, message: str) -> tuple[str, ...]:
    """For msgspec's 'Invalid enum value' at `$.a.b[0]`: the values the key takes (its Literal's), else ()."""
    if not message.startswith("Invalid enum value") or " - at `$" not in message:
        return ()
    where = message.rpartition(" - at `$")[2].rstrip("`")
    for name in re.findall(r"\.(\w+)", where):
        hints = typing.get_type_hints(type_) if isinstance(type_, type) else {}
        type_ = _unwrapped(hints.get(name))
    return tuple(str(v) for v in typing.get_args(type_)) if typing.get_origin(type_) is typing.Literal else ()


def _unwrapped(hint: Any) -> Any:
    """A field's type without Optional, list[...] or Annotated around it."""
    while typing.get_origin(hint) in (list, typing.Union, types.UnionType, typing.Annotated):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _interpolate(value: Any, env: Any, source: str, path: str) -> Any:
    """Replace `${NAME}` with the environment variable NAME in every string; `$$` is a literal `$`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "$"
            if name in LAUNCH_MACROS and path.startswith("models."):
                return match.group(0)
            if name not in env:
                raise ConfigError(f"{source}: at `{path}`: environment variable {name} is not set")
            return str(env[name])

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, source, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, source, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _readable(message: str, prefix: str) -> str:
    """msgspec says 'Expected `int` >= 1 - at `$.max_concurrency`'; say 'at `models.x.max_concurrency`: ...'."""
    text, sep, where = message.rpartition(" - at `$")
    key = where.rstrip("`").lstrip(".") if sep else ""
    full = ".".join(p for p in (prefix, key) if p)
    if not sep:
        text = message
    return f"at `{full}`: {text}" if full else text
