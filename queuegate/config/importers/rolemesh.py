"""RoleMesh Gateway's `models.yaml` -> QueueGate: each role (a key of `models:`, the name clients send) of type proxy
becomes a model or an alias; roles with the same `proxy_url`, upstream model and defaults become one model whose
aliases are the other roles. `gateway` becomes [server].listen, `auth`'s keys client and node keys.
"""

from __future__ import annotations

import json
from typing import Any

from queuegate.config.importers._draft import Draft, ImportFailed, base_url, escaped, mapping, secret_key

TOOL = "RoleMesh"
_DEFAULT_HOST, _DEFAULT_PORT = "127.0.0.1", 8000  # where RoleMesh Gateway listens when `gateway` says nothing
_ROLE_KEYS = {"type", "openai_model_name", "proxy_url", "defaults", "role", "strategy"}


def looks_like(data: dict[str, Any]) -> bool:
    models = data.get("models")
    roles = models.values() if isinstance(models, dict) else []
    return any(isinstance(role, dict) and ("proxy_url" in role or "openai_model_name" in role) for role in roles)


def convert(data: dict[str, Any]) -> Draft:
    draft = Draft(TOOL)
    _gateway(draft, mapping(data.get("gateway"), "gateway"))
    _auth(draft, mapping(data.get("auth"), "auth"))
    served: dict[str, tuple[str, dict[str, Any], list[str]]] = {}  # one QueueGate model each: upstream, defaults, roles
    for role, spec in mapping(data.get("models"), "models").items():
        where = f"models.{role}"
        spec = mapping(spec, where)
        if spec.get("type", "proxy") != "proxy":
            draft.drop(
                where,
                f"a role of type {spec.get('type')!r}: QueueGate's nodes register models by name (`queuegate node`, "
                f"or POST /v1/nodes/register with their base URLs): register one named {role!r}",
            )
            continue
        if not spec.get("proxy_url"):
            raise ImportFailed(f"`{where}`: no proxy_url")
        defaults = escaped(mapping(spec.get("defaults"), f"{where}.defaults"))
        upstream = base_url(escaped(str(spec["proxy_url"])))
        same = json.dumps([upstream, defaults], sort_keys=True, default=str)
        served.setdefault(same, (upstream, defaults, []))[2].append(role)
        if spec.get("openai_model_name", role) != role:
            draft.drop(f"{where}.openai_model_name", f"QueueGate lists the model under the name clients send: {role}")
        for setting in spec.keys() - _ROLE_KEYS:
            draft.drop(f"{where}.{setting}", "unknown to this importer")
    for upstream, defaults, roles in served.values():
        table = draft.table("models", roles[0], doc=f"RoleMesh's role{'s' * (len(roles) > 1)} {', '.join(roles)}.")
        table.set("upstreams", [upstream])
        if "model" in defaults:
            table.set("upstream_model", str(defaults.pop("model")), "RoleMesh's defaults.model: the name sent on.")
        if defaults:
            table.set("defaults", defaults, "Used when the request leaves them out.")
        if roles[1:]:
            table.set("aliases", roles[1:], "The other roles served by the same upstream, model and defaults.")
    if "default_model" in data:
        draft.drop("default_model", "QueueGate serves the model each request names")
    for key in data.keys() - {"version", "gateway", "auth", "models", "default_model"}:
        draft.drop(key, "unknown to this importer")
    return draft


def _gateway(draft: Draft, gateway: dict[str, Any]) -> None:
    if not gateway.keys() & {"host", "port"}:
        return
    host, port = str(gateway.get("host", _DEFAULT_HOST)), gateway.get("port", _DEFAULT_PORT)
    draft.table("server").set("listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    for key in gateway.keys() - {"host", "port"}:
        draft.drop(f"gateway.{key}", "unknown to this importer")


def _auth(draft: Draft, auth: dict[str, Any]) -> None:
    for i, secret in enumerate(auth.get("client_api_keys") or []):
        doc = "One of RoleMesh's client_api_keys: every model, class user."
        secret_key(draft, ("keys", f"client{i + 1}"), f"auth.client_api_keys[{i}]", escaped(str(secret)), doc)
    for i, secret in enumerate(auth.get("node_api_keys") or []):
        doc = "One of RoleMesh's node_api_keys, for `queuegate node` on a GPU host (RoleMesh's node agent speaks\n"
        doc += "another protocol)."
        secret_key(draft, ("node_keys", f"node{i + 1}"), f"auth.node_api_keys[{i}]", escaped(str(secret)), doc)
    for key in auth.keys() - {"client_api_keys", "node_api_keys"}:
        draft.drop(f"auth.{key}", "unknown to this importer")
