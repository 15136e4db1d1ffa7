"""llama-swap's `config.yaml` -> QueueGate: each model a process QueueGate launches (its `cmd`, `${PORT}` and macros
filled in as llama-swap would), its swap groups as devices, its peers as external models.

llama-swap runs one model at a time unless groups say otherwise; QueueGate runs one model at a time per exclusive
device. So a group whose members swap (`swap: true`, and llama-swap's implicit group of ungrouped models) becomes an
exclusive device; a group whose members run together (`swap: false`) puts them on no device.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from queuegate.config.importers._draft import (
    Draft,
    ImportFailed,
    Table,
    base_url,
    env_reference,
    escaped,
    mapping,
    number,
    one_at_a_time_device,
    secret_key,
)

TOOL = "llama-swap"
_DEFAULT_PROXY = "http://localhost:${PORT}"
_QUEUEGATE_DEFAULT_PROXIES = {_DEFAULT_PROXY, "http://127.0.0.1:${PORT}"}  # QueueGate's own default upstream
_REF = re.compile(r"\$\{(env\.[A-Za-z_][A-Za-z0-9_]*|[A-Za-z0-9_-]+)\}")
_KIND_WORDS = (("llama-server", "llamacpp"), ("llama.cpp", "llamacpp"), ("vllm", "vllm"), ("sglang", "sglang"))
_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}
_STATS = "QueueGate keeps its own statistics: usage in SQLite, /metrics, `queuegate top`"

# Settings with no QueueGate counterpart, and why (the top level's, then a model's).
_NOT_CARRIED = {
    "startPort": "QueueGate picks a free port for each model's ${PORT}",
    "logTimeFormat": "QueueGate's log lines are text (key=value) or JSON ([server].log_format)",
    "logToStdout": "QueueGate logs to stderr and keeps a launched server's output for its error messages",
    "metricsMaxInMemory": _STATS,
    "captureBuffer": _STATS,
    "store": _STATS,
    "performance": _STATS,
    "ui": "QueueGate has no web UI; `queuegate top` is its live view",
    "includeAliasesInList": "QueueGate's /v1/models always lists aliases",
    "upstream": "QueueGate has no /upstream passthrough",
    "profiles": "QueueGate routes by a model's name or alias only",
    "selectors": "QueueGate routes by a model's name or alias only; several upstreams of one model share its load",
}
_TOP_KEYS = {"models", "macros", "groups", "routing", "matrix", "hooks", "peers", "apiKeys", "logLevel"}
_TOP_KEYS |= {"healthCheckTimeout", "globalTTL", "unloadTimeout", "sendLoadingState"}  # (what the top level carries)
_MODEL_KEYS = {"cmd", "proxy", "checkEndpoint", "env", "useModelName", "aliases", "concurrencyLimit", "ttl"}
_MODEL_KEYS |= {"unloadTimeout", "macros", "filters"}  # (what a model's table carries over)
_MODEL_NOT_CARRIED = {
    "cmdStop": "QueueGate stops the command's process group with SIGTERM (then SIGKILL); `docker run` passes the "
    'signal on to its container. For a container QueueGate should start and stop, use launcher = "docker"',
    "unlisted": "QueueGate's /v1/models lists every model",
    "name": "shown in llama-swap's /v1/models only",
    "description": "shown in llama-swap's /v1/models only",
    "metadata": "shown in llama-swap's /v1/models only",
    "capabilities": "QueueGate knows a model's endpoints from its kind ([models].endpoints to narrow them)",
    "sendLoadingState": "queue notices are set for all models ([queue].notify)",
    "timeouts": "QueueGate's timeouts hold for every upstream: [upstream] connect_timeout_s, first_byte_timeout_s, "
    "idle_timeout_s",
    "compat": "QueueGate proxies no websockets",
}


def looks_like(data: dict[str, Any]) -> bool:
    models = data.get("models")
    launched = isinstance(models, dict) and any(isinstance(m, dict) and "cmd" in m for m in models.values())
    return launched or any(key in data for key in ("healthCheckTimeout", "globalTTL", "startPort", "macros", "peers"))


def convert(data: dict[str, Any]) -> Draft:
    draft = Draft(TOOL)
    macros = _Macros(mapping(data.get("macros"), "macros"))
    models = mapping(data.get("models"), "models")
    devices = _devices(draft, data, models)
    preload = _preloaded(draft, data, models)
    startup = data.get("healthCheckTimeout")  # (llama-swap waits at least 15 s)
    defaults = _ModelDefaults(
        ttl=number(data.get("globalTTL", 0), "globalTTL"),
        startup=None if startup is None else max(15, number(startup, "healthCheckTimeout")),
        unload=number(data.get("unloadTimeout", 0), "unloadTimeout"),
    )
    for model_id, spec in models.items():
        where = f"models.{model_id}"
        spec = mapping(spec, where)
        scope = macros.scoped(mapping(spec.get("macros"), f"{where}.macros"), model_id)
        _model(draft, model_id, spec, scope, defaults, devices.get(model_id), model_id in preload)
    _peers(draft, mapping(data.get("peers"), "peers"), macros, models)
    _globals(draft, data, macros)
    return draft


@dataclass(frozen=True)
class _ModelDefaults:
    """The top level's settings that are each model's default."""

    ttl: float
    startup: float | None
    unload: float


class _Macros:
    """llama-swap's macros, turned into QueueGate's spelling: `${PORT}` stays (QueueGate fills it in the same way),
    `${env.NAME}` becomes `${NAME}` (read when QueueGate loads the config), `${MODEL_ID}` the model's name, and every
    macro of the config (a model's own before the top level's) is written out in full."""

    def __init__(self, declared: dict[str, Any], model_id: str | None = None) -> None:
        self.declared = declared
        self.model_id = model_id

    def scoped(self, declared: dict[str, Any], model_id: str) -> _Macros:
        """A model's macros: its own, then the top level's; `${MODEL_ID}` is its name."""
        return _Macros({**self.declared, **declared}, model_id)

    def value(self, value: Any, where: str) -> Any:
        """Any value with its strings converted; a string that is one macro of a number or bool is that value."""
        if isinstance(value, dict):
            return {k: self.value(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            whole = _REF.fullmatch(value)
            if whole and not isinstance(self.declared.get(whole.group(1), ""), str):
                return self.declared[whole.group(1)]
            return self.text(value, where)
        return value

    def text(self, text: str, where: str, depth: int = 0) -> str:
        if depth > 32:
            raise ImportFailed(f"`{where}`: macros refer to each other in a circle")
        parts, end = [], 0
        for match in _REF.finditer(text):
            parts += [escaped(text[end : match.start()]), self._expand(match.group(1), where, depth)]
            end = match.end()
        return "".join([*parts, escaped(text[end:])])

    def _expand(self, name: str, where: str, depth: int) -> str:
        if name == "PORT":
            return "${PORT}"
        if name.startswith("env."):
            return "${" + name.removeprefix("env.") + "}"
        if name == "MODEL_ID" and self.model_id is not None:
            return escaped(self.model_id)
        if name not in self.declared:
            raise ImportFailed(f"`{where}`: no macro ${{{name}}} (llama-swap would not load it either)")
        value = self.declared[name]
        if isinstance(value, bool):
            return str(value).lower()
        return self.text(value, where, depth + 1) if isinstance(value, str) else str(value)


def _model(
    draft: Draft,
    model_id: str,
    spec: dict[str, Any],
    macros: _Macros,
    defaults: _ModelDefaults,
    device: tuple[str, str] | None,
    preload: bool,
) -> None:
    where = f"models.{model_id}"
    table = draft.table("models", model_id)
    if "cmd" not in spec:
        raise ImportFailed(f"`{where}`: no cmd (llama-swap needs one too)")
    argv = _command(macros.text(_without_comments(str(spec["cmd"])), f"{where}.cmd"), where)
    table.doc = "Started by QueueGate when a request needs it (llama-swap's cmd, its macros filled in)."
    table.set("launcher", "process")
    table.set("cmd", argv)
    table.set("kind", _kind(argv), "Guessed from the command: what its health check and endpoints are.")
    proxy = macros.text(str(spec.get("proxy") or _DEFAULT_PROXY), f"{where}.proxy")
    if proxy not in _QUEUEGATE_DEFAULT_PROXIES:
        table.set("upstreams", [base_url(proxy)], "llama-swap's proxy, where the server answers.")
    check = str(spec.get("checkEndpoint", "/health"))
    table.set("health_path", "" if check == "none" else macros.text(check, f"{where}.checkEndpoint"))
    if spec.get("env"):
        table.set("env", _environment(macros.value(spec["env"], f"{where}.env"), where))
    if spec.get("useModelName"):
        table.set("upstream_model", macros.text(str(spec["useModelName"]), f"{where}.useModelName"))
    if spec.get("aliases"):
        table.set("aliases", [macros.text(str(a), f"{where}.aliases") for a in spec["aliases"]])
    if number(spec.get("concurrencyLimit", 0), f"{where}.concurrencyLimit") > 0:
        table.set("max_concurrency", spec["concurrencyLimit"], "Requests in flight at once; more wait in the queue.")
    ttl = number(spec.get("ttl", -1), f"{where}.ttl")
    ttl = defaults.ttl if ttl < 0 else ttl
    if ttl > 0:
        table.set("ttl_s", ttl, "Stopped after this long without requests.")
    if defaults.startup is not None:
        table.set("startup_timeout_s", defaults.startup, "llama-swap's healthCheckTimeout.")
    unload = number(spec.get("unloadTimeout", 0), f"{where}.unloadTimeout") or defaults.unload
    if unload > 0:
        table.set("stop_timeout_s", unload)
    if device is not None:
        table.set("device", *device)
    if preload:
        table.set("preload", True, "llama-swap's hooks.on_startup.preload.")
    _filters(draft, table, macros.value(mapping(spec.get("filters"), f"{where}.filters"), f"{where}.filters"))
    for key in spec.keys() - _MODEL_KEYS:
        draft.drop(f"{where}.{key}", _MODEL_NOT_CARRIED.get(key, "unknown to this importer"), table)


def _without_comments(cmd: str) -> str:
    """llama-swap's cmd as a command line: comment lines dropped, a line ending in \\ joined to the next."""
    lines = (line for line in cmd.splitlines() if not line.strip().startswith("#"))
    return "\n".join(line.rstrip().removesuffix("\\") for line in lines)


def _command(cmd: str, where: str) -> list[str]:
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise ImportFailed(f"`{where}.cmd`: cannot split it into arguments: {exc}") from None
    if not argv:
        raise ImportFailed(f"`{where}.cmd`: empty command")
    return argv


def _kind(argv: list[str]) -> str:
    for word in argv:
        for text, kind in _KIND_WORDS:
            if text in word.lower():
                return kind
    return "openai"


def _environment(entries: Any, where: str) -> dict[str, str]:
    """llama-swap's env list (`NAME=value`) as QueueGate's table."""
    if not isinstance(entries, list) or not all(isinstance(e, str) and "=" in e for e in entries):
        raise ImportFailed(f"`{where}.env`: expected a list of NAME=value strings")
    return dict(entry.split("=", 1) for entry in entries)


def _filters(draft: Draft, table: Table, filters: dict[str, Any]) -> None:
    where = ".".join(table.path) + ".filters"
    forced = mapping(filters.get("setParams"), f"{where}.setParams")
    for key in forced.keys() & {"model", "stream"}:
        draft.drop(f"{where}.setParams.{key}", "the client chooses it", table)
    if forced.keys() - {"model", "stream"}:
        table.set(
            "defaults",
            {k: v for k, v in forced.items() if k not in ("model", "stream")},
            "llama-swap's filters.setParams: QueueGate fills them in when a request leaves them out,\n"
            "but keeps what the client sends (llama-swap overrode it).",
        )
    for key in filters.keys() - {"setParams"}:
        why = {
            "stripParams": "QueueGate forwards what the client sends",
            "strip_params": "QueueGate forwards what the client sends",
            "setParamsByID": "QueueGate's defaults are per model; make a model (same cmd) per variant instead",
        }.get(key, "unknown to this importer")
        draft.drop(f"{where}.{key}", why, table)


def _devices(draft: Draft, data: dict[str, Any], models: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each model's device (name, comment) from llama-swap's groups; the devices' tables."""
    routing = mapping(data.get("routing"), "routing")
    router = mapping(routing.get("router"), "routing.router")
    settings = mapping(router.get("settings"), "routing.router.settings")
    for key in routing.keys() - {"router"}:
        draft.drop(f"routing.{key}", "QueueGate orders requests by class (user > agent > batch) and key, not model")
    declared = mapping(data.get("groups") or settings.get("groups"), "groups")
    groups = {group_id: mapping(group, f"groups.{group_id}") for group_id, group in declared.items()}
    if "matrix" in data or router.get("use") == "matrix":
        draft.drop(
            "matrix",
            "QueueGate knows what runs together from memory: here every model shares one exclusive device (one at a "
            "time); give the device and each model memory_gb, and exclusive = false, to let several run at once",
        )
        groups = {}
    grouped = {member for group in groups.values() for member in group.get("members") or []}
    ungrouped = [name for name in models if name not in grouped]
    implicit = "gpu" if "gpu" not in groups else "(default)"
    if ungrouped:
        groups = {**groups, implicit: {"members": ungrouped}}
    filled = [group_id for group_id, group in groups.items() if group.get("members")]
    placed: dict[str, tuple[str, str]] = {}
    for group_id, group in groups.items():
        members = [m for m in group.get("members") or [] if m in models]
        for member in set(group.get("members") or []) - set(members):
            draft.drop(f"groups.{group_id}.members", f"{member!r} is no model of the file")
        which = f"group {group_id}"
        if group_id == implicit:
            which = "models outside any group" if len(groups) > 1 else "models"
        if group.get("swap", True) and members:
            one_at_a_time_device(draft, group_id, f"llama-swap's {which}: one of them runs at a time.")
            placed.update((m, (group_id, f"llama-swap's {which}: swapped in and out.")) for m in members)
        if len(filled) > 1 and group.get("exclusive", True) and members:
            setting, one = f"groups.{group_id}.exclusive", f"a model of group {group_id}"
            if group_id == implicit:
                setting, one = "groups", "a model outside any group"
            draft.drop(
                setting,
                f"llama-swap stops the other groups' models when it starts {one}; QueueGate swaps models within a "
                "device only",
            )
    return placed


def _preloaded(draft: Draft, data: dict[str, Any], models: dict[str, Any]) -> set[str]:
    hooks = mapping(data.get("hooks"), "hooks")
    startup = mapping(hooks.get("on_startup"), "hooks.on_startup")
    for key in hooks.keys() - {"on_startup"}:
        draft.drop(f"hooks.{key}", "QueueGate has no hooks")
    for key in startup.keys() - {"preload"}:
        draft.drop(f"hooks.on_startup.{key}", "QueueGate has no startup hooks; it can only preload models")
    preload = set(startup.get("preload") or [])
    for name in preload - set(models):
        draft.drop("hooks.on_startup.preload", f"{name!r} is no model of the file")
    return preload & set(models)


def _peers(draft: Draft, peers: dict[str, Any], macros: _Macros, models: dict[str, Any]) -> None:
    """Each peer's models as external models (named `peer/model` where the bare name is taken)."""
    taken = set(models) | {a for m in models.values() if isinstance(m, dict) for a in m.get("aliases") or []}
    for peer_id, peer in peers.items():
        where = f"peers.{peer_id}"
        peer = mapping(peer, where)
        if "proxy" not in peer:
            raise ImportFailed(f"`{where}`: no proxy")
        url = base_url(macros.text(str(peer["proxy"]), f"{where}.proxy"))
        key = macros.text(str(peer.get("apiKey") or ""), f"{where}.apiKey")
        key_env = env_reference(key)
        for model_id in peer.get("models") or []:
            qualified = f"{peer_id}/{model_id}"
            name = model_id if model_id not in taken else qualified
            taken |= {name, qualified}
            table = draft.table("models", name, doc=f"Served by llama-swap's peer {peer_id}.")
            table.set("upstreams", [url])
            if name != model_id:
                table.set("upstream_model", escaped(model_id))
            else:
                table.set("aliases", [escaped(qualified)])
            if key_env:
                table.set("api_key_env", key_env)
        if key and not key_env:
            draft.drop(
                f"{where}.apiKey",
                "QueueGate reads upstream keys from the environment: put it in a variable and name that in each "
                "of its models' api_key_env",
            )
        for setting in peer.keys() - {"proxy", "apiKey", "models"}:
            why = _MODEL_NOT_CARRIED.get(setting, "QueueGate forwards what the client sends")
            draft.drop(f"{where}.{setting}", why)


def _globals(draft: Draft, data: dict[str, Any], macros: _Macros) -> None:
    if "logLevel" in data:
        level = _LOG_LEVELS.get(str(data["logLevel"]))
        if level is None:
            draft.drop("logLevel", f"{data['logLevel']!r} is none of debug, info, warn, error")
        else:
            draft.table("server").set("log_level", level)
    if "sendLoadingState" in data:
        notify = "always" if data["sendLoadingState"] else "never"
        draft.table("queue").set(
            "notify", notify, "llama-swap's sendLoadingState: a waiting stream is told its place and wait."
        )
    for i, key in enumerate(data.get("apiKeys") or []):
        where = f"apiKeys[{i}]"
        doc = "One of llama-swap's apiKeys: every model, class user."
        secret_key(draft, ("keys", f"key{i + 1}"), where, macros.text(str(key), where), doc)
    for key in data.keys() - _TOP_KEYS:
        draft.drop(key, _NOT_CARRIED.get(key, "unknown to this importer"))
