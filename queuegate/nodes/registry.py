"""The gateway's registry of nodes: hosts that register the upstreams they serve, and keep them with heartbeats.

A registration (`POST /v1/nodes/register`, with a node key) names the node and the models it serves, each with the
base URL QueueGate should use. Sending it again is the heartbeat; what it lists replaces what the node had. The
registry adds the node's upstreams to the catalog (to the configured model of that name, or as a model of its own),
the scheduler and the health monitor, and removes those the node stopped listing: requests in flight on them finish.

A node that sends no heartbeat for its `ttl_s` (else `[nodes].stale_after_s`) is stale: its upstreams take no
requests (down, the reason naming the node) and are not polled; its next heartbeat brings them back (checked first).
Stale for `[nodes].forget_after_s`, it is forgotten: its upstreams are removed, and the models only it served.

Trust: a node key may register any node name, but a name belongs to the key that registered it until it is
forgotten. A base URL must be http(s) and its host must resolve only to addresses in `[nodes].allow_networks`, so a
stolen node key cannot point traffic at arbitrary hosts. What a node registers is all or nothing: a registration
with one bad model changes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec
import trio

from queuegate.config import Kind, NodesConfig
from queuegate.errors import BadRequest, Forbidden
from queuegate.fleet.catalog import Catalog, ModelSpec, Upstream, make_upstream
from queuegate.fleet.kinds import PROFILES
from queuegate.scheduler import UpstreamState
from queuegate.statistics import NodeModelStatistics, NodeStatistics

log = logging.getLogger("queuegate.nodes")

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_MODELS = 256  # per node


class RegisteredModel(msgspec.Struct, forbid_unknown_fields=True):
    """One model a node serves, as it registers it."""

    name: str
    base_url: str  # e.g. http://10.0.0.5:8081/v1
    kind: Kind = "openai"  # (and `aliases`, `upstream_model`): used when the registration creates the model
    aliases: list[str] = []
    upstream_model: str | None = None
    max_concurrency: int = 4


class Registration(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    models: list[RegisteredModel] = []
    ttl_s: float | None = None  # how long it stays live without a heartbeat (None: [nodes].stale_after_s)


def _check_shape(registration: Registration) -> None:
    """What a registration must look like, whatever the gateway holds."""
    if not _NODE_NAME.match(registration.node):
        raise BadRequest("a node name may use letters, digits and . _ - (at most 64)", param="node")
    if len(registration.models) > MAX_MODELS:
        raise BadRequest(f"a node may register at most {MAX_MODELS} models", param="models")
    if registration.ttl_s is not None and not 0 < registration.ttl_s <= 3600:
        raise BadRequest("ttl_s must be more than 0 and at most 3600", param="ttl_s")
    seen: set[str] = set()
    for i, model in enumerate(registration.models):
        where = f"models[{i}]"
        for name in (model.name, *model.aliases):
            if not _MODEL_NAME.match(name):
                raise BadRequest(f"{name!r}: a model name may use letters, digits and . _ : / @ + -", param=where)
        if model.name in seen:
            raise BadRequest(f"model {model.name!r} is listed twice", param=where)
        seen.add(model.name)
        if not 1 <= model.max_concurrency <= 1024:
            raise BadRequest("max_concurrency must be from 1 to 1024", param=f"{where}.max_concurrency")


class UpstreamPool(Protocol):
    """What the registry tells the scheduler (`scheduler.Admission`)."""

    def add_upstream(self, upstream_id: str, model: str, capacity: int) -> None: ...

    def remove_upstream(self, upstream_id: str) -> None: ...

    def set_upstream_state(self, upstream_id: str, state: UpstreamState, reason: str) -> None: ...


class HealthWatch(Protocol):
    """Who polls the registered upstreams' health (`fleet.health.HealthMonitor`)."""

    def watch(self, upstream: Upstream) -> None: ...

    def unwatch(self, upstream_id: str) -> None: ...


Resolve = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> its addresses


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses a host name resolves to (an IP address: itself)."""
    found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(address[4][0]) for address in found]


@dataclass(slots=True)
class _Node:
    name: str
    key: str  # the node key that registered it
    address: str  # where its last registration came from
    ttl_s: float
    last_seen: float
    upstreams: dict[str, Upstream] = field(default_factory=dict)  # by model
    stale: bool = False


class NodeRegistry:
    def __init__(
        self,
        config: NodesConfig,
        catalog: Catalog,
        pool: UpstreamPool,
        health: HealthWatch,
        resolve: Resolve = resolve_host,
    ) -> None:
        self.config = config
        self._catalog = catalog
        self._pool = pool
        self._health = health
        self._resolve = resolve
        self._nodes: dict[str, _Node] = {}
        self._networks = [ipaddress.ip_network(n) for n in config.allow_networks]
        self._wake = trio.Event()  # a node's deadline changed
        self._changed = trio.Event()  # a node registered (models may be back)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mark nodes stale, and forget them, as their heartbeats stop."""
        task_status.started()
        while True:
            now = trio.current_time()
            for node in list(self._nodes.values()):
                if node.stale and now - node.last_seen >= node.ttl_s + self.config.forget_after_s:
                    self._forget(node)
                elif not node.stale and now - node.last_seen >= node.ttl_s:
                    self._go_stale(node, now)
            with trio.move_on_at(self._next_deadline()):
                await self._wake.wait()
            self._wake = trio.Event()

    def set_config(self, config: NodesConfig) -> None:
        """New `[nodes]` settings (a reload): they apply from the next heartbeat or deadline."""
        self.config = config
        self._networks = [ipaddress.ip_network(n) for n in config.allow_networks]
        self._wake.set()

    async def register(self, key: str, address: str, registration: Registration) -> dict[str, Any]:
        """Apply a registration (or heartbeat) from node key `key` at `address`; the answer for the node.
        BadRequest or Forbidden: nothing changed."""
        _check_shape(registration)
        for model in registration.models:
            await self._check_base_url(model.base_url)
        # From here on no await: what is checked is what is applied (another registration cannot come between).
        node = self._nodes.get(registration.node)
        self._check_against_catalog(registration)
        if node is not None and node.key != key:
            raise Forbidden(f"node {registration.node!r} was registered with another node key")
        new_models = {m.name: self._new_model(m) for m in registration.models if self._catalog.owner(m.name) is None}
        now = trio.current_time()
        ttl_s = registration.ttl_s or self.config.stale_after_s
        if node is None:
            node = self._nodes[registration.node] = _Node(registration.node, key, address, ttl_s, now)
            log.info("node registered", extra={"fields": {"node": node.name, "address": address}})
        node.address, node.ttl_s, node.last_seen = address, ttl_s, now
        self._apply(node, registration.models, new_models)
        self._wake.set()
        self._changed.set()
        self._changed = trio.Event()
        return {
            "node": node.name,
            "heartbeat_s": round(ttl_s / 3, 3),
            "stale_after_s": ttl_s,
            "models": [{"name": m, "upstream": u.id} for m, u in node.upstreams.items()],
        }

    def deregister(self, key: str, name: str) -> None:
        """A node leaves (shutting down): forget it now. KeyError: unknown; Forbidden: another key's."""
        node = self._nodes[name]
        if node.key != key:
            raise Forbidden(f"node {name!r} was registered with another node key")
        self._forget(node)

    @property
    def wait_s(self) -> float:
        return self.config.wait_s

    def stale_nodes(self, model: str) -> list[str]:
        """The stale nodes that served `model` (a request for it may wait for them: `[nodes].wait_s`)."""
        return [n.name for n in self._nodes.values() if n.stale and model in n.upstreams]

    async def wait_for_node(self, model: str, until: float) -> bool:
        """Wait until a node that serves `model` is live again (True), or `until` passes (False)."""
        with trio.move_on_at(until):
            while self.stale_nodes(model) and not self._live(model):
                await self._changed.wait()
            return self._live(model)
        return False

    def statistics(self) -> list[NodeStatistics]:
        now = trio.current_time()
        return [
            NodeStatistics(
                name=node.name,
                address=node.address,
                stale=node.stale,
                last_heartbeat_s=round(now - node.last_seen, 1),
                ttl_s=node.ttl_s,
                models=[NodeModelStatistics(m, u.id, u.display_url) for m, u in node.upstreams.items()],
            )
            for node in self._nodes.values()
        ]

    # -- checks (nothing changes until every one passed) -----------------------------------------------------------

    def _check_against_catalog(self, registration: Registration) -> None:
        for i, model in enumerate(registration.models):
            where = f"models[{i}]"
            owner = self._catalog.owner(model.name)
            if owner is not None and owner != model.name:
                raise BadRequest(f"{model.name!r} is an alias of model {owner!r}", param=where)
            spec = self._catalog.models.get(model.name)
            if spec is not None and spec.launch is not None:
                message = f"model {model.name!r} is started by this gateway: a node cannot add to it"
                raise BadRequest(message, param=where)

    def _new_model(self, model: RegisteredModel) -> ModelSpec:
        """The spec of a model a registration creates (its aliases must be free)."""
        taken = [alias for alias in model.aliases if self._catalog.owner(alias) is not None]
        if taken:
            raise BadRequest(f"{', '.join(taken)}: already the name or alias of another model", param="aliases")
        profile = PROFILES[model.kind]
        return ModelSpec(
            name=model.name,
            upstream_model=model.upstream_model or model.name,
            kind=profile,
            endpoints=profile.endpoints,
            aliases=tuple(model.aliases),
            defaults={},
            upstreams=(),
        )

    async def _check_base_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"expected an http(s) base URL such as http://10.0.0.5:8081/v1, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self._resolve(parts.hostname, port)
        except OSError as exc:
            raise BadRequest(f"cannot resolve the host of {url!r}: {exc}") from None
        outside = [a for a in addresses if not any(ipaddress.ip_address(a) in n for n in self._networks)]
        if outside or not addresses:
            raise Forbidden(
                f"{url!r} resolves to {', '.join(outside) or 'nothing'}, outside [nodes].allow_networks "
                f"({', '.join(self.config.allow_networks)})"
            )

    # -- effects --------------------------------------------------------------------------------------------------

    def _apply(self, node: _Node, models: list[RegisteredModel], new_models: dict[str, ModelSpec]) -> None:
        """Make the node's upstreams what it registered (those unchanged stay, with their requests)."""
        wanted = {m.name: m for m in models}
        for name in [n for n in node.upstreams if n not in wanted]:
            self._remove(node, name)
        for name, model in wanted.items():
            spec = self._catalog.models.get(name) or new_models[name]
            upstream = make_upstream(
                f"{name}@{node.name}", name, model.base_url, spec.kind.health_path, model.max_concurrency
            )
            if node.upstreams.get(name) == upstream:
                continue
            if name in node.upstreams:
                self._remove(node, name)
            self._pool.add_upstream(upstream.id, name, upstream.capacity)  # (the scheduler first: then it resolves)
            self._catalog.add_upstream(upstream, spec)
            node.upstreams[name] = upstream
            self._health.watch(upstream)
        if node.stale:
            node.stale = False
            log.info("node back", extra={"fields": {"node": node.name}})
            for upstream in node.upstreams.values():
                self._pool.set_upstream_state(upstream.id, UpstreamState.LOADING, f"node {node.name} is back")
                self._health.watch(upstream)

    def _remove(self, node: _Node, model: str) -> None:
        upstream = node.upstreams.pop(model)
        self._health.unwatch(upstream.id)
        self._catalog.remove_upstream(upstream.id)  # (the catalog first: no new request resolves to it)
        self._pool.remove_upstream(upstream.id)

    def _go_stale(self, node: _Node, now: float) -> None:
        node.stale = True
        reason = f"node {node.name}: no heartbeat for {now - node.last_seen:.0f} s"
        log.warning("node stale", extra={"fields": {"node": node.name, "reason": reason}})
        for upstream in node.upstreams.values():
            self._health.unwatch(upstream.id)
            self._pool.set_upstream_state(upstream.id, UpstreamState.DOWN, reason)

    def _forget(self, node: _Node) -> None:
        for model in list(node.upstreams):
            self._remove(node, model)
        del self._nodes[node.name]
        log.info("node forgotten", extra={"fields": {"node": node.name}})

    def _live(self, model: str) -> bool:
        return any(not n.stale and model in n.upstreams for n in self._nodes.values())

    def _next_deadline(self) -> float:
        deadlines = [
            n.last_seen + n.ttl_s + (self.config.forget_after_s if n.stale else 0.0) for n in self._nodes.values()
        ]
        return min(deadlines, default=math.inf)
