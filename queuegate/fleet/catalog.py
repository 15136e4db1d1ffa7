"""The catalog: what each model is, under which names clients may ask for it, and its upstreams.

Built from the config by the composition root. Only the node registry changes it afterwards, on the trio thread:
it adds the upstreams nodes register (to configured models, or as models of their own) and removes them when their
node is gone. A model's spec is never changed in place: it is replaced, so a request keeps the spec it resolved.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from queuegate.config import Config, ContainerSpec, ModelConfig
from queuegate.config.load import LAUNCH_MACROS
from queuegate.fleet.kinds import PROFILES, KindProfile


@dataclass(frozen=True, slots=True)
class Upstream:
    """One server that serves one model. `id` is stable and unique: '<model>#<index>'."""

    id: str
    model: str
    base_url: str  # no trailing slash, e.g. http://127.0.0.1:8081/v1
    health_url: str | None
    capacity: int
    # Precomputed request headers, including the upstream credential; excluded from repr so it never gets logged.
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)

    @property
    def display_url(self) -> str:
        return redact_url(self.base_url)


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """How QueueGate starts and stops a managed model's server, with the launch macros (${PORT}...) substituted."""

    launcher: str  # "process" or "docker"
    argv: tuple[str, ...]  # process
    env: Mapping[str, str]  # process: added to QueueGate's environment
    container: str | None  # docker
    create: ContainerSpec | None  # docker: how to create the container when it is missing
    port: int
    startup_timeout_s: float
    stop_timeout_s: float


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    upstream_model: str
    kind: KindProfile
    endpoints: frozenset[str]
    aliases: tuple[str, ...]
    defaults: Mapping[str, Any]
    upstreams: tuple[Upstream, ...]
    launch: LaunchSpec | None = None  # None: external, always on
    tools: str | None = None  # how its tool calls are handled (execute, passthrough, suppress); None: [tools].mode
    memory: bool = True  # [memory] applies to its chats


class Catalog:
    """Resolves a requested name (model or alias) to its `ModelSpec`."""

    def __init__(self, models: Mapping[str, ModelSpec]) -> None:
        self.models: dict[str, ModelSpec] = {}
        self._by_name: dict[str, ModelSpec] = {}
        self.upstreams: dict[str, Upstream] = {}
        for spec in models.values():
            self._put(spec)
        self.configured = frozenset(self.models)  # the models of the config (nodes add others, for a while)
        self.configured_upstreams = tuple(self.upstreams.values())  # the config's (nodes add others)

    def reconfigure(self, models: Mapping[str, ModelSpec]) -> tuple[list[Upstream], list[Upstream], list[Upstream]]:
        """A reload's models (every configured one: those unchanged as they are). Each becomes its new spec; the
        upstreams nodes added to a model stay with it, and a configured model takes over a node's model of its
        name. Returns the configured upstreams (removed, added, replaced: the same id, changed). ValueError,
        changing nothing: a new name or alias is a node's model's alias, or a node's model's name used as an
        alias."""
        configured_ids = {u.id for u in self.configured_upstreams}
        nodes_models = {name: spec for name, spec in self.models.items() if name not in self.configured}
        taken = {n: spec.name for spec in nodes_models.values() for n in (spec.name, *spec.aliases)}
        clashes = [
            n
            for spec in models.values()
            for n in (spec.name, *spec.aliases)
            if n in taken and not (n == spec.name and n in nodes_models)
        ]
        if clashes:
            raise ValueError(f"{', '.join(clashes)}: already the name or alias of a model a node registered")
        before = dict(self.models)
        changed = []
        for name in sorted(set(self.configured) | set(models)):
            current = self.models.get(name)
            if name in self.configured and models.get(name) == self.configured_spec(name):
                continue
            changed.append(name)
            if current is not None:  # (first every changed model goes, then each comes back: names may move)
                for upstream in current.upstreams:
                    if upstream.id in configured_ids:
                        del self.upstreams[upstream.id]
                del self.models[name]
                self._drop_names(current)
        for name in changed:
            kept = tuple(u for u in before[name].upstreams if u.id not in configured_ids) if name in before else ()
            if (new := models.get(name)) is not None:
                self._put(dataclasses.replace(new, upstreams=(*new.upstreams, *kept)))
            elif kept:  # no longer configured: its nodes' upstreams keep it, as a node's model (no aliases)
                self._put(dataclasses.replace(before[name], aliases=(), upstreams=kept))
        old = {u.id: u for u in self.configured_upstreams}
        new_upstreams = {u.id: u for spec in models.values() for u in spec.upstreams}
        self.configured = frozenset(models)
        self.configured_upstreams = tuple(new_upstreams.values())
        removed = [u for uid, u in old.items() if uid not in new_upstreams]
        added = [u for uid, u in new_upstreams.items() if uid not in old]
        replaced = [u for uid, u in new_upstreams.items() if uid in old and old[uid] != u]
        return removed, added, replaced

    def configured_spec(self, name: str) -> ModelSpec | None:
        """A configured model's spec as the config made it (without the upstreams nodes added); None: no such
        configured model."""
        spec = self.models.get(name)
        if spec is None or name not in self.configured:
            return None
        own = {u.id for u in self.configured_upstreams}
        return dataclasses.replace(spec, upstreams=tuple(u for u in spec.upstreams if u.id in own))

    def owner(self, name: str) -> str | None:
        """The model whose name or alias `name` is (None: neither)."""
        spec = self._by_name.get(name)
        return spec.name if spec is not None else None

    def add_upstream(self, upstream: Upstream, new_model: ModelSpec) -> None:
        """Add an upstream to its model; a model the catalog does not have is `new_model` (with the upstream).
        ValueError: a name or alias of the new model is another model's, or the upstream's id is taken."""
        if upstream.id in self.upstreams:
            raise ValueError(f"upstream {upstream.id!r} exists already")
        spec = self.models.get(upstream.model)
        if spec is None:
            taken = [n for n in (new_model.name, *new_model.aliases) if n in self._by_name]
            if taken:
                raise ValueError(f"{', '.join(taken)}: already the name or alias of another model")
            self._put(dataclasses.replace(new_model, upstreams=(upstream,)))
        else:
            self._put(dataclasses.replace(spec, upstreams=(*spec.upstreams, upstream)))

    def replace_upstream(self, upstream: Upstream) -> None:
        """An upstream of the same id, changed (address, key, capacity). KeyError: unknown."""
        old = self.upstreams[upstream.id]
        spec = self.models[old.model]
        self._put(
            dataclasses.replace(spec, upstreams=tuple(upstream if u.id == upstream.id else u for u in spec.upstreams))
        )

    def remove_upstream(self, upstream_id: str) -> None:
        """Remove an upstream; a model only nodes served goes when its last upstream does. KeyError: unknown."""
        upstream = self.upstreams.pop(upstream_id)
        spec = self.models[upstream.model]
        left = tuple(u for u in spec.upstreams if u.id != upstream_id)
        if left or spec.name in self.configured:
            self._put(dataclasses.replace(spec, upstreams=left))
            return
        del self.models[spec.name]
        self._drop_names(spec)

    def _drop_names(self, spec: ModelSpec) -> None:
        """Forget a model's name and aliases (those another model has taken since are not its own any more)."""
        for name in (spec.name, *spec.aliases):
            if (current := self._by_name.get(name)) is not None and current.name == spec.name:
                del self._by_name[name]

    def _put(self, spec: ModelSpec) -> None:
        self.models[spec.name] = spec
        for name in (spec.name, *spec.aliases):
            self._by_name[name] = spec
        for upstream in spec.upstreams:
            self.upstreams[upstream.id] = upstream

    @classmethod
    def from_config(
        cls,
        config: Config,
        environ: Mapping[str, str] | None = None,
        free_port: Callable[[], int] | None = None,
    ) -> Catalog:
        """`free_port` picks the port of a managed model that uses ${PORT} without setting `port`."""
        env = os.environ if environ is None else environ
        pick = free_port or pick_free_port
        return cls({name: model_spec(name, mc, env, pick) for name, mc in config.models.items()})

    def resolve(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def canonical(self, name: str) -> str:
        """The model's own name for a model name or alias (KeyError if neither)."""
        spec = self._by_name.get(name)
        if spec is None:
            raise KeyError(name)
        return spec.name

    def public_names(self) -> list[str]:
        """Every name a client may use: models first, then aliases, in config order."""
        names = list(self.models)
        names.extend(a for spec in self.models.values() for a in spec.aliases)
        return names


def model_spec(name: str, mc: ModelConfig, env: Mapping[str, str], free_port: Callable[[], int]) -> ModelSpec:
    """A configured model's spec (`free_port`: for a launched model's ${PORT} when it sets no `port`)."""
    profile = PROFILES[mc.kind]
    launch = None
    urls = mc.upstreams
    if mc.launcher != "external":
        port = mc.port or free_port()
        macros = {"PORT": str(port), "MODEL": name, "PYTHON": sys.executable}
        urls = [_expand(u, macros) for u in (mc.upstreams or ["http://127.0.0.1:${PORT}/v1"])]
        create = mc.create
        if create is not None:
            create = ContainerSpec(
                image=create.image,
                command=[_expand(a, macros) for a in create.command],
                environment={k: _expand(v, macros) for k, v in create.environment.items()},
                mounts=list(create.mounts),
                network_mode=create.network_mode,
                gpus=create.gpus,
            )
        launch = LaunchSpec(
            launcher=mc.launcher,
            argv=tuple(_expand(a, macros) for a in mc.cmd),
            env={k: _expand(v, macros) for k, v in mc.env.items()},
            container=mc.container,
            create=create,
            port=port,
            startup_timeout_s=mc.startup_timeout_s,
            stop_timeout_s=mc.stop_timeout_s,
        )
    health_path = profile.health_path if mc.health_path is None else mc.health_path
    api_key = env[mc.api_key_env] if mc.api_key_env else None
    upstreams = tuple(
        make_upstream(f"{name}#{i}", name, url, health_path, mc.max_concurrency, api_key) for i, url in enumerate(urls)
    )
    return ModelSpec(
        name=name,
        upstream_model=mc.upstream_model or name,
        kind=profile,
        endpoints=frozenset(mc.endpoints) if mc.endpoints is not None else profile.endpoints,
        aliases=tuple(mc.aliases),
        defaults=dict(mc.defaults),
        upstreams=upstreams,
        launch=launch,
        tools=mc.tools,
        memory=mc.memory,
    )


def make_upstream(
    upstream_id: str,
    model: str,
    url: str,
    health_path: str,
    capacity: int,
    api_key: str | None = None,
    host: str | None = None,
) -> Upstream:
    """An upstream at base URL `url` ("" health path: not checked), its request headers made once. `host`: the
    Host header, when `url` names the server by its address."""
    headers = [
        (b"host", (host or urlsplit(url).netloc.rsplit("@", 1)[-1]).encode()),
        (b"content-type", b"application/json"),
        (b"user-agent", b"queuegate"),
    ]
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    return Upstream(
        id=upstream_id,
        model=model,
        base_url=url.rstrip("/"),
        health_url=(server_root(url) + health_path) if health_path else None,
        capacity=capacity,
        headers=tuple(headers),
    )


_MACRO = re.compile(r"\$\{(" + "|".join(sorted(LAUNCH_MACROS)) + r")\}")


def _expand(text: str, macros: Mapping[str, str]) -> str:
    return _MACRO.sub(lambda m: macros[m.group(1)], text)


def pick_free_port() -> int:
    """A TCP port free on loopback now (the OS picks it); the model's server binds it when launched."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_root(base_url: str) -> str:
    """'http://h:8081/v1' -> 'http://h:8081': health paths are relative to the server, not the API base."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def redact_url(url: str) -> str:
    """Drop any user:password@ from a URL before it is shown or logged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
