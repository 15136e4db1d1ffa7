"""Commented TOML written line by line: the template `queuegate init` writes and the configs `queuegate import` writes.

Values are rendered by tomli-w, so they are always valid TOML; arrays and tables are written inline, so each key stays
on one line under its comment. Names that are not bare TOML keys are quoted.
"""

from __future__ import annotations

import re
from typing import Any

import tomli_w

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def comment(text: str) -> str:
    """`# ` before each line of `text`."""
    return "".join(f"# {line}\n" if line else "#\n" for line in text.splitlines())


def key_name(name: str) -> str:
    """A key as TOML spells it: bare when it can be, else a quoted string (`"llama-3.3"`, `"a/b"`)."""
    return name if _BARE_KEY.match(name) else inline(name)


def table_header(*path: str) -> str:
    """`[models."llama-3.3-70b"]` for ("models", "llama-3.3-70b")."""
    return "[" + ".".join(key_name(part) for part in path) + "]"


def key_line(name: str, value: Any) -> str:
    return f"{key_name(name)} = {inline(value)}"


def inline(value: Any) -> str:
    """A value on one line: scalars via tomli-w, arrays and tables inline."""
    if isinstance(value, dict):
        return "{ " + ", ".join(key_line(k, v) for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")
