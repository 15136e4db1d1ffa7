"""What an importer makes of another tool's config: QueueGate tables with comments, and every setting it could not
carry over, named with the reason. Rendered as a commented `queuegate.toml`; the raw tables are what it must load as."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from queuegate.config.tomltext import comment, key_line, table_header

# Where each top-level table goes in the file: the server first, the models last (as in queuegate.toml.example).
_ORDER = ("server", "queue", "upstream", "affinity", "devices", "keys", "node_keys", "models")


class ImportFailed(Exception):
    """The file cannot be imported (not YAML, not the format, a value that cannot be read); the message says where."""


@dataclass
class Table:
    path: tuple[str, ...]
    doc: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    docs: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # what of the source's table was not carried over, and why

    def set(self, key: str, value: Any, doc: str = "") -> None:
        self.values[key] = value
        if doc:
            self.docs[key] = doc


@dataclass
class Draft:
    tool: str  # "llama-swap": how notes name the source
    tables: dict[tuple[str, ...], Table] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # file-wide notes

    def table(self, *path: str, doc: str = "") -> Table:
        """The table at `path`, made on first use (with `doc` as its comment)."""
        if path not in self.tables:
            self.tables[path] = Table(path, doc)
        return self.tables[path]

    def drop(self, setting: str, why: str, table: Table | None = None) -> None:
        """Name a setting of the source that the written config does not carry (in the file, under `table` if given,
        and in `notes()`)."""
        notes = table.dropped if table is not None else self.dropped
        notes.append(f"{self.tool} `{setting}` not carried over: {why}")

    def notes(self) -> list[str]:
        return [*self.dropped, *(note for table in self._ordered() for note in table.dropped)]

    def raw(self) -> dict[str, Any]:
        """The tables as one mapping, as `build_config` takes it."""
        data: dict[str, Any] = {}
        for table in self._ordered():
            place = data
            for part in table.path:
                place = place.setdefault(part, {})
            place.update(table.values)
        return data

    def render(self, source: str) -> str:
        parts = [
            f"# QueueGate configuration imported from {self.tool}'s {source} by `queuegate import`.\n"
            "# Every key is documented in queuegate.toml.example; `queuegate check --config FILE` checks this file.\n"
        ]
        if self.dropped:
            parts.append("#\n# Not carried over:\n" + "".join(comment(_wrapped(f"- {note}")) for note in self.dropped))
        for table in self._ordered():
            parts.append("\n" + comment(table.doc) + table_header(*table.path) + "\n")
            parts.extend(comment(_wrapped(note)) for note in table.dropped)
            for key, value in table.values.items():
                parts.append(comment(table.docs.get(key, "")) + key_line(key, value) + "\n")
        return "".join(parts)

    def _ordered(self) -> list[Table]:
        return sorted(self.tables.values(), key=lambda t: _ORDER.index(t.path[0]))


def _wrapped(note: str) -> str:
    return textwrap.fill(note, width=116, subsequent_indent="  ", break_on_hyphens=False)


def base_url(url: str) -> str:
    """An upstream base URL (ending in /v1, where the OpenAI paths are) from the URL of a server or of its API:
    `http://host:8080` and `http://host:8080/v1/` -> `http://host:8080/v1`, `https://host/api` -> `https://host/api/v1`."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def mapping(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a mapping (None: empty), else ImportFailed naming `where`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ImportFailed(f"`{where}`: expected a mapping, got {type(value).__name__}")
    return value


def number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImportFailed(f"`{where}`: expected a number, got {value!r}")
    return value


def escaped(value: Any) -> Any:
    """A literal value as a QueueGate config value: `$` doubled in every string, so QueueGate reads no `${NAME}` in
    it as a variable."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {k: escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escaped(v) for v in value]
    return value


_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")  # a value that is one environment variable, whole


def env_reference(value: str) -> str | None:
    """NAME if `value` (in QueueGate's spelling) is `${NAME}` and nothing else."""
    match = _ENV_REF.match(value)
    return match.group(1) if match else None


def one_at_a_time_device(draft: Draft, name: str, doc: str) -> None:
    """An exclusive device: what a tool that runs one model at a time, and knows no memory sizes, becomes."""
    device = draft.table("devices", name, doc=doc)
    device.set(
        "memory_gb",
        1,
        f"{draft.tool} knows no sizes: exclusive = true runs one model at a time whatever they are. To let\n"
        "several run together, set the GPU's memory here, each model's memory_gb, and exclusive = false.",
    )
    device.set("exclusive", True)


def secret_key(draft: Draft, path: tuple[str, str], where: str, secret: str, doc: str) -> None:
    """A client or node key (`path` = ("keys", name)) from a secret in QueueGate's spelling: read from the environment
    when it is one `${NAME}`, else inline; one QueueGate would refuse (too short) is named instead."""
    name = env_reference(secret)
    if name is None and len(secret.replace("$$", "$")) < 8:
        draft.drop(where, "QueueGate takes keys of at least 8 characters")
        return
    draft.table(*path, doc=doc).set(*(("key_env", name) if name else ("key", secret)))
