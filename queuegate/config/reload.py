"""`reload`: which config changes a running daemon can take, and which need a restart.

Queue, sticky-chat, fleet, tools and nodes policy knobs (polled nodes too) and the log level apply at once, and so
do models that QueueGate does not launch (external: added, removed or changed; requests in flight on a removed
upstream finish).
Anything else that changes what exists (models QueueGate launches, devices, classes, keys, the listen address,
timeouts baked into connections) needs a restart; a reload says which keys those are rather than half-applying
them. An invalid file changes nothing: the error says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from queuegate.config import Config

# Dotted keys a running daemon applies at once.
LIVE_KEYS = frozenset(
    {
        "queue.max_size",
        "queue.max_wait_s",
        "queue.aging_s",
        "queue.notify",
        "queue.notify_min_ms",
        "queue.keepalive_s",
        "affinity.ttl_s",
        "affinity.max_wait_ms",
        "fleet.swap_after_ms",
        "fleet.idle_grace_ms",
        "fleet.restart_attempts",
        "fleet.restart_backoff_s",
        "fleet.failure_hold_s",
        "fleet.abandoned_load",
        "server.log_level",
        "tools.mode",
        "tools.max_rounds",
        "tools.max_calls",
        "tools.call_timeout_s",
        "tools.loop_timeout_s",
        "tools.max_result_chars",
        "tools.text_tool_calls",
        "nodes.stale_after_s",
        "nodes.forget_after_s",
        "nodes.wait_s",
        "nodes.allow_networks",
    }
)
POLLED_NODES = "nodes.polled."  # the [nodes.NAME] tables: added, removed or changed, they apply at once


@dataclass(frozen=True)
class ReloadPlan:
    live: Config  # the running config with every live change applied (and nothing else)
    applied: list[str]
    needs_restart: list[str]
    models: frozenset[str] = frozenset()  # the external models added, removed or changed (applied)

    def summary(self) -> str:
        if not self.applied and not self.needs_restart:
            return "reloaded: no changes"
        parts = []
        if self.applied:
            parts.append("applied " + ", ".join(self.applied))
        if self.needs_restart:
            parts.append("not applied, needs a restart: " + ", ".join(self.needs_restart))
        return "reloaded: " + "; ".join(parts)


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    old_data, new_data = msgspec.to_builtins(running), msgspec.to_builtins(new)
    changed = sorted(_changed_keys(old_data, new_data, ""))
    models = {key.split(".")[1] for key in changed if key.startswith("models.")}
    live_models = frozenset(m for m in models if _external(running, m) and _external(new, m))
    applied = [key for key in changed if _live(key) or _model_of(key) in live_models]
    for key in applied:
        if key.startswith("models."):
            continue
        if key.startswith(POLLED_NODES):
            old_data["nodes"]["polled"] = new_data["nodes"]["polled"]
            continue
        section, name = key.split(".")
        old_data[section][name] = new_data[section][name]
    for name in live_models:
        if name in new_data["models"]:
            old_data["models"][name] = new_data["models"][name]
        else:
            del old_data["models"][name]
    live = msgspec.convert(old_data, Config)
    return ReloadPlan(live, applied, [key for key in changed if key not in applied], live_models)


def _live(key: str) -> bool:
    return key in LIVE_KEYS or key.startswith(POLLED_NODES)


def _external(config: Config, model: str) -> bool:
    """A model QueueGate does not launch (or none of that name)."""
    found = config.models.get(model)
    return found is None or found.launcher == "external"


def _model_of(key: str) -> str | None:
    return key.split(".")[1] if key.startswith("models.") else None


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for name in old.keys() | new.keys():
            path = f"{prefix}.{name}" if prefix else name
            if name not in old or name not in new:
                keys.append(path)
            else:
                keys += _changed_keys(old[name], new[name], path)
        return keys
    return [] if old == new else [prefix]
