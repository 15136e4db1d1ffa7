"""The original proxy's environment variables as a config, for `queuegate run` (and `check`) without a config file.

LLM_UPSTREAMS (comma-separated base URLs) serve each of PROXY_MODELS (comma-separated model names); the other
variables set what the original proxy let them set. The config is built by `build_config`, so every check of a
config file applies, and an error names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from queuegate.config.importers._draft import base_url, escaped
from queuegate.config.load import build_config
from queuegate.config.schema import Config, ConfigError

_SOURCE = "<environment>"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


def _integer(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("expected a whole number")
    return int(text)


def _notify(text: str) -> str:
    """1/true: notices for the user class (QueueGate's auto); 0/false: none; or auto, always, never."""
    text = text.strip().lower()
    if text in ("auto", "always", "never"):
        return text
    if text in _TRUE | _FALSE:
        return "auto" if text in _TRUE else "never"
    raise ValueError("expected 1 or 0 (true or false), or auto, always, never")


# Each setting's variable -> (table, key, how its text is read); LLM_MAX_CONCURRENCY is each model's.
_SETTINGS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "PROXY_OWNED_BY": ("server", "owned_by", escaped),
    "STICKY_HEADER": ("affinity", "header", escaped),
    "AFFINITY_TTL_SEC": ("affinity", "ttl_s", _number),
    "QUEUE_NOTIFY_USER": ("queue", "notify", _notify),
    "QUEUE_NOTIFY_MIN_MS": ("queue", "notify_min_ms", _number),
}
VARIABLES = ("LLM_UPSTREAMS", "PROXY_MODELS", "LLM_MAX_CONCURRENCY", *_SETTINGS)


def config_from_environment(env: Mapping[str, str]) -> tuple[Config, list[str]] | None:
    """The config the variables describe and the names of those set; None without LLM_UPSTREAMS."""
    if "LLM_UPSTREAMS" not in env:
        return None
    used = [name for name in VARIABLES if name in env]
    upstreams = [base_url(escaped(url)) for url in _items(env["LLM_UPSTREAMS"])]
    if not upstreams:
        raise ConfigError("LLM_UPSTREAMS: expected comma-separated base URLs such as http://127.0.0.1:8081/v1")
    names = _items(env.get("PROXY_MODELS", ""))
    if not names:
        raise ConfigError(
            "PROXY_MODELS is not set: name the models LLM_UPSTREAMS serve, comma-separated (PROXY_MODELS=qwen3,llama3)"
        )
    model: dict[str, Any] = {"upstreams": upstreams}
    if "LLM_MAX_CONCURRENCY" in env:
        model["max_concurrency"] = _read("LLM_MAX_CONCURRENCY", env, _integer)
    raw: dict[str, Any] = {"models": {name: dict(model) for name in names}}
    for variable, (table, key, read) in _SETTINGS.items():
        if variable in env:
            raw.setdefault(table, {})[key] = _read(variable, env, read)
    try:
        return build_config(raw, source=_SOURCE, base_dir=os.getcwd(), environ=env), used
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{_SOURCE}: ")
        raise ConfigError(f"{_variable(message)}: {message}") from None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _read(variable: str, env: Mapping[str, str], read: Callable[[str], Any]) -> Any:
    try:
        return read(env[variable])
    except ValueError as exc:
        raise ConfigError(f"{variable}={env[variable]!r}: {exc}") from None


def _variable(message: str) -> str:
    """The variable behind the config key a check names (`at `models.m.upstreams[0]``)."""
    found = re.match(r"at `([^`]+)`", message)
    key = found.group(1) if found else ""
    if key.startswith("models."):
        if key.endswith(".max_concurrency"):
            return "LLM_MAX_CONCURRENCY"
        return "LLM_UPSTREAMS" if ".upstreams" in key else "PROXY_MODELS"
    by_key = {f"{table}.{name}": variable for variable, (table, name, _) in _SETTINGS.items()}
    return by_key.get(key, "the environment")
