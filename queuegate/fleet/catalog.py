"""The catalog: what each configured model is, under which names clients may ask for it, and its upstreams.

Built once from the config by the composition root; immutable afterwards, so every component may read it freely.
"""

from __future__ import annotations

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
        self.models = dict(models)
        self._by_name: dict[str, ModelSpec] = {}
        for spec in self.models.values():
            self._by_name[spec.name] = spec
            for alias in spec.aliases:
                self._by_name[alias] = spec
        self.upstreams: dict[str, Upstream] = {u.id: u for m in self.models.values() for u in m.upstreams}

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
        return cls({name: _model_spec(name, mc, env, pick) for name, mc in config.models.items()})

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


def _model_spec(name: str, mc: ModelConfig, env: Mapping[str, str], free_port: Callable[[], int]) -> ModelSpec:
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
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"user-agent", b"queuegate"),
    ]
    if mc.api_key_env:
        headers.append((b"authorization", b"Bearer " + env[mc.api_key_env].encode()))
    upstreams = tuple(
        Upstream(
            id=f"{name}#{i}",
            model=name,
            base_url=url.rstrip("/"),
            health_url=(server_root(url) + health_path) if health_path else None,
            capacity=mc.max_concurrency,
            headers=((b"host", urlsplit(url).netloc.rsplit("@", 1)[-1].encode()), *headers),
        )
        for i, url in enumerate(urls)
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
