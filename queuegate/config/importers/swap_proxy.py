"""The original Docker swap proxy's `config.yml` -> QueueGate: each model a container QueueGate starts and stops
(launcher = "docker"), all on one exclusive device, as the proxy ran one container at a time.

Its format, as its users know it: `models:` maps a model's name (or lists entries with a `name`) to
`container_name`, `backend_url` (where the container serves), `health_url` and `startup_timeout` (seconds).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from queuegate.config.importers._draft import (
    Draft,
    ImportFailed,
    base_url,
    escaped,
    mapping,
    number,
    one_at_a_time_device,
)

TOOL = "swap-proxy"
DEVICE = "gpu"


def looks_like(data: dict[str, Any]) -> bool:
    models = data.get("models")
    entries = models.values() if isinstance(models, dict) else models if isinstance(models, list) else []
    return any(isinstance(entry, dict) and "container_name" in entry for entry in entries)


def convert(data: dict[str, Any]) -> Draft:
    draft = Draft(TOOL)
    one_at_a_time_device(draft, DEVICE, "The swap proxy's GPU: one container runs at a time.")
    for name, entry in _models(data.get("models")).items():
        _model(draft, name, entry)
    for key in data.keys() - {"models"}:
        draft.drop(key, "unknown to this importer")
    return draft


def _models(models: Any) -> dict[str, dict[str, Any]]:
    if isinstance(models, list):
        named = [mapping(entry, f"models[{i}]") for i, entry in enumerate(models)]
        if not all("name" in entry for entry in named):
            raise ImportFailed("`models`: each entry of the list needs a name")
        return {str(entry["name"]): {k: v for k, v in entry.items() if k != "name"} for entry in named}
    return {str(name): mapping(entry, f"models.{name}") for name, entry in mapping(models, "models").items()}


def _model(draft: Draft, name: str, entry: dict[str, Any]) -> None:
    where = f"models.{name}"
    for required in ("container_name", "backend_url"):
        if not entry.get(required):
            raise ImportFailed(f"`{where}`: no {required}")
    table = draft.table(
        "models", name, doc="A container QueueGate starts when a request needs it (and stops to make room)."
    )
    table.set("launcher", "docker")
    table.set("container", escaped(str(entry["container_name"])))
    upstream = base_url(escaped(str(entry["backend_url"])))
    table.set("upstreams", [upstream])
    if entry.get("health_url"):
        health = urlsplit(str(entry["health_url"]))
        if (health.scheme, health.netloc) == urlsplit(upstream)[:2]:
            table.set("health_path", escaped(health.path), "Its health_url, on the server the upstream is on.")
        else:
            draft.drop(
                f"{where}.health_url",
                "QueueGate checks health on the upstream's own server (health_path); it asks /v1/models there",
                table,
            )
    if "startup_timeout" in entry:
        table.set("startup_timeout_s", number(entry["startup_timeout"], f"{where}.startup_timeout"))
    table.set("device", DEVICE)
    for key in entry.keys() - {"container_name", "backend_url", "health_url", "startup_timeout"}:
        draft.drop(f"{where}.{key}", "unknown to this importer", table)
