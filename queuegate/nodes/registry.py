"""The gateway's registry of nodes: hosts that register the upstreams they serve, and keep them with heartbeats.

A registration (`POST /v1/nodes/register`, with a node key) names the node and the models it serves, each with the
base URL QueueGate should use. Sending it again is the heartbeat; what it lists replaces what the node had. The
registry adds the node's upstreams to the catalog (to the configured model of that name, or as a model of its own),
the scheduler and the health monitor, and removes those the node stopped listing: requests in flight on them finish.

A node that sends no heartbeat for its `ttl_s` (else `[nodes].stale_after_s`) is stale: its upstreams are not
polled, and take no requests. For `[nodes].wait_s` requests wait for it (queued, as for a server that is loading);
then they fail, the error naming the node. Its next heartbeat brings it back (checked first). Stale for
`[nodes].forget_after_s`, it is forgotten: its upstreams are removed, and the models only it served.

Trust: a node key may register any node name, but a name belongs to the key that registered it until it is
forgotten. A base URL must be http(s), without credentials, and its host must resolve only to addresses in
`[nodes].allow_networks` (loopback only for a node on this host), so a stolen node key cannot point traffic at
arbitrary hosts; an http URL's host is pinned to the address checked (the name can not resolve elsewhere later).
What a node registers is all or nothing: a registration with one bad model changes nothing.

A `queuegate node` also reports its inventory: each model's state on its devices (stopped, starting, ready, ...), its
devices with their declared memory, and its GPUs' memory as measured there. Requests go to a node that has their
model loaded before one that would have to load it (the scheduler's warm upstreams). An operator's preload or evict
of a model that nodes serve is passed on in a node's next heartbeat's answer (`load`, `stop`); the node's own
planner does it, with the same rules as any QueueGate's.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import msgspec
import trio

from queuegate.config import Kind, NodesConfig
from queuegate.errors import BadRequest, Forbidden
from queuegate.fleet.catalog import Catalog, ModelSpec, Upstream, make_upstream
from queuegate.fleet.kinds import PROFILES
from queuegate.scheduler import UpstreamState
from queuegate.statistics import GpuMemory, NodeDeviceStatistics, NodeModelStatistics, NodeStatistics

log = logging.getLogger("queuegate.nodes")

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_MODELS = 256  # per node
MAX_ALIASES = 16  # per model
MAX_NODES_PER_KEY = 64  # (the nodes the gateway polls, [nodes.NAME], are not counted)
CONFIG_OWNER = "[nodes] of the config"  # whose the polled nodes are: no node key may register their names
MAX_DEVICES = 64  # per node (and as many GPUs)
COLD_STATES = frozenset({"stopped", "draining", "stopping", "failed"})  # a request there waits for a load (or fails)
RESOLVE_TIMEOUT_S = 5.0


class RegisteredModel(msgspec.Struct, forbid_unknown_fields=True):
    """One model a node serves, as it registers it."""

    name: str
    base_url: str  # e.g. http://10.0.0.5:8081/v1
    kind: Kind = "openai"  # (and `aliases`, `upstream_model`): used when the registration creates the model
    aliases: list[str] = []
    upstream_model: str | None = None
    max_concurrency: int = 4
    health_path: str | None = None  # where its server says it is ready (None: its kind's; "": not checked)
    api_key: str | None = None  # sent to it as a Bearer token (a node's API needs one); never logged
    # Its state where it runs, as its node's planner has it (None: not reported: taken as serving).
    state: Literal["stopped", "starting", "ready", "draining", "stopping", "failed"] | None = None
    load_eta_s: float | None = None  # while it loads: about how long still

    def __repr__(self) -> str:  # the key never reaches a log
        return f"RegisteredModel(name={self.name!r}, base_url={self.base_url!r})"


class Registration(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    models: list[RegisteredModel] = []
    ttl_s: float | None = None  # how long it stays live without a heartbeat (None: [nodes].stale_after_s)
    devices: list[NodeDeviceStatistics] = []  # its devices as it declares them (shown, not planned on)
    gpus: list[GpuMemory] = []  # its GPUs' memory as measured there


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
            if not MODEL_NAME.match(name):
                raise BadRequest(f"{name!r}: a model name may use letters, digits and . _ : / @ + -", param=where)
        if model.name in seen:
            raise BadRequest(f"model {model.name!r} is listed twice", param=where)
        seen.add(model.name)
        if len(model.aliases) > MAX_ALIASES:
            raise BadRequest(f"a model may have at most {MAX_ALIASES} aliases", param=f"{where}.aliases")
        if not 1 <= model.max_concurrency <= 1024:
            raise BadRequest("max_concurrency must be from 1 to 1024", param=f"{where}.max_concurrency")
        if model.health_path and not model.health_path.startswith("/"):
            raise BadRequest('health_path must start with / (or be "": no check)', param=f"{where}.health_path")
        # (they go into request lines and headers: a space or line break would forge others)
        for part, value in (
            ("base_url", model.base_url),
            ("api_key", model.api_key or ""),
            ("health_path", model.health_path or ""),
        ):
            if not value.isprintable() or any(c.isspace() for c in value):
                raise BadRequest(f"{part} may not hold spaces or control characters", param=f"{where}.{part}")


def _inventory(registration: Registration) -> tuple[list[NodeDeviceStatistics], list[GpuMemory]]:
    """What of a node's reported devices and GPUs is kept: it is shown, never planned on, so an entry that is not
    sane (a name too long, an amount not finite) is left out rather than refusing the node's models with it."""
    devices = [
        NodeDeviceStatistics(d.name, d.memory_gb, d.used_gb, [m for m in d.models[:MAX_MODELS] if len(m) <= 128])
        for d in registration.devices[:MAX_DEVICES]
        if 0 < len(d.name) <= 128 and _sane(d.memory_gb, d.used_gb)
    ]
    gpus = [g for g in registration.gpus[:MAX_DEVICES] if len(g.name) <= 128 and _sane(g.total_gb, g.used_gb)]
    return devices, gpus


def _sane(*amounts: float) -> bool:
    return all(math.isfinite(a) and 0 <= a < 1e9 for a in amounts)


class UpstreamPool(Protocol):
    """What the registry tells the scheduler (`scheduler.Admission`)."""

    def add_upstream(self, upstream_id: str, model: str, capacity: int) -> None: ...

    def replace_upstream(self, upstream_id: str, capacity: int) -> None: ...

    def remove_upstream(self, upstream_id: str) -> None: ...

    def set_upstream_load_cost(self, upstream_id: str, cost: int) -> None: ...

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
    reported: dict[str, RegisteredModel] = field(default_factory=dict)  # by model: its last report (state, ...)
    devices: list[NodeDeviceStatistics] = field(default_factory=list)
    gpus: list[GpuMemory] = field(default_factory=list)
    asks: dict[str, bool] = field(default_factory=dict)  # model -> load it (True) or stop it, in the next answer
    stale: bool = False  # no heartbeat within ttl_s: requests wait for it ([nodes].wait_s)
    down: bool = False  # stale past [nodes].wait_s: requests for it fail


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
        self._reserved: frozenset[str] = frozenset(config.polled)  # the polled nodes' names

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mark nodes stale, and forget them, as their heartbeats stop."""
        task_status.started()
        while True:
            now = trio.current_time()
            for node in list(self._nodes.values()):
                silent_s = now - node.last_seen - node.ttl_s  # how long past its ttl
                if silent_s >= self.config.forget_after_s:
                    self._forget(node)
                elif silent_s >= self.config.wait_s and not node.down:
                    self._go_stale(node, now, down=True)
                elif silent_s >= 0 and not node.stale:
                    self._go_stale(node, now, down=False)
            with trio.move_on_at(self._next_deadline()):
                await self._wake.wait()
            self._wake = trio.Event()

    def set_config(self, config: NodesConfig) -> None:
        """New `[nodes]` settings (a reload): they apply from the next heartbeat or deadline; an upstream whose
        address the new `allow_networks` leave out goes at once (one named by a host name, at its next heartbeat:
        refused then, its node turns stale)."""
        self.config = config
        self._networks = [ipaddress.ip_network(n) for n in config.allow_networks]
        self._reserved = frozenset(config.polled)
        for node in self._nodes.values():
            for model, upstream in list(node.upstreams.items()):
                try:
                    address = _plain(ipaddress.ip_address(urlsplit(upstream.base_url).hostname or ""))
                except ValueError:
                    continue  # (an https URL keeps its name)
                if not any(address in network for network in self._networks):
                    log.warning(
                        "node upstream outside allow_networks removed", extra={"fields": {"upstream": upstream.id}}
                    )
                    self._remove(node, model)
        self._wake.set()

    async def register(self, key: str, address: str, registration: Registration) -> dict[str, Any]:
        """Apply a registration (or heartbeat) from node key `key` at `address`; the answer for the node.
        BadRequest or Forbidden: nothing changed."""
        _check_shape(registration)
        checked: dict[str, str] = {}  # (a node's models often share one base URL: it is checked once)
        for url in dict.fromkeys(m.base_url for m in registration.models):
            checked[url] = await self._checked_base_url(url, address)
        pinned = {m.name: checked[m.base_url] for m in registration.models}
        # From here on no await: what is checked is what is applied (another registration cannot come between).
        node = self._nodes.get(registration.node)
        if (registration.node in self._reserved) != (key == CONFIG_OWNER):
            raise Forbidden(f"node name {registration.node!r} is the gateway's own ([nodes.{registration.node}])")
        if node is not None and node.key != key:
            raise Forbidden(f"node {registration.node!r} was registered with another node key")
        full = sum(n.key == key for n in self._nodes.values()) >= MAX_NODES_PER_KEY and key != CONFIG_OWNER
        if node is None and full:
            raise Forbidden(f"a node key may register at most {MAX_NODES_PER_KEY} nodes")
        new_models = self._check_against_catalog(registration)
        now = trio.current_time()
        ttl_s = registration.ttl_s or self.config.stale_after_s
        if node is None:
            node = self._nodes[registration.node] = _Node(registration.node, key, address, ttl_s, now)
            log.info("node registered", extra={"fields": {"node": node.name, "address": address}})
        node.address, node.ttl_s, node.last_seen = address, ttl_s, now
        node.devices, node.gpus = _inventory(registration)
        self._apply(node, registration.models, new_models, pinned)
        self._wake.set()
        asks, node.asks = node.asks, {}
        return {
            "node": node.name,
            "heartbeat_s": round(ttl_s / 3, 3),
            "stale_after_s": ttl_s,
            "models": [{"name": m, "upstream": u.id} for m, u in node.upstreams.items()],
            "load": [m for m, load in asks.items() if load and m in node.upstreams],
            "stop": [m for m, load in asks.items() if not load and m in node.upstreams],
        }

    def serves(self, model: str) -> bool:
        """Whether a node (live or stale) serves the model named (or aliased) `model`."""
        name = self._catalog.owner(model) or model
        return any(name in node.upstreams for node in self._nodes.values())

    def ask(self, model: str, *, load: bool) -> str:
        """An operator's preload (`load`) or evict of a model nodes serve, passed on in the next heartbeat's answer:
        a preload to one live node that has it stopped (none if one has it loaded), an evict to every node that has
        it loaded. What was done, said; KeyError: no node serves the model."""
        name = self._catalog.owner(model) or model
        serving = [n for n in self._nodes.values() if name in n.upstreams and not n.stale]
        serving = [n for n in serving if _state(n, name) is not None]  # (one that says nothing loads nothing on ask)
        if not serving:
            raise KeyError(f"no live node that loads and stops models on request (queuegate node) serves {model!r}")
        cold = [n for n in serving if _state(n, name) in COLD_STATES]
        if load:
            if len(cold) < len(serving):
                warm = ", ".join(n.name for n in serving if n not in cold)
                return f"{name} is loaded (or loading) on node {warm} already"
            chosen = [min(cold, key=lambda n: len(n.asks))]
        else:
            chosen = [n for n in serving if n not in cold]
            if not chosen:
                return f"{name} is not loaded on any node"
        for node in chosen:
            node.asks[name] = load
        where = ", ".join(n.name for n in chosen)
        return f"asked node {where} to {'load' if load else 'stop'} {name} (at its next heartbeat)"

    def deregister(self, key: str, name: str) -> None:
        """A node leaves (shutting down): forget it now. KeyError: unknown; Forbidden: another key's."""
        node = self._nodes[name]
        if node.key != key:
            raise Forbidden(f"node {name!r} was registered with another node key")
        self._forget(node, "node left")

    def statistics(self) -> list[NodeStatistics]:
        now = trio.current_time()
        return [
            NodeStatistics(
                name=node.name,
                address=node.address,
                stale=node.stale,
                last_heartbeat_s=round(now - node.last_seen, 1),
                ttl_s=node.ttl_s,
                models=[
                    NodeModelStatistics(m, u.id, u.display_url, _state(node, m), _eta(node.reported[m]))
                    for m, u in node.upstreams.items()
                ],
                devices=node.devices,
                gpus=node.gpus,
            )
            for node in self._nodes.values()
        ]

    # -- checks (nothing changes until every one passed) -----------------------------------------------------------

    def _check_against_catalog(self, registration: Registration) -> dict[str, ModelSpec]:
        """Check the registration against the models the gateway has; the specs of the models it creates (whose
        names and aliases must be free, of each other's too)."""
        new_models: dict[str, ModelSpec] = {}
        claimed: dict[str, str] = {}  # names and aliases the new models take -> which
        for i, model in enumerate(registration.models):
            where = f"models[{i}]"
            refusal = self.refusal(model.name)
            if refusal is not None:
                raise BadRequest(refusal, param=where)
            spec = self._catalog.models.get(model.name)
            if spec is not None:
                if model.upstream_model is not None and model.upstream_model != spec.upstream_model:
                    asked = spec.upstream_model
                    message = f"model {model.name!r} is asked for as {asked!r} upstream, not {model.upstream_model!r}"
                    raise BadRequest(message, param=f"{where}.upstream_model")
                continue
            for name in (model.name, *model.aliases):
                taken = self._catalog.owner(name) or claimed.get(name)
                if taken is not None:
                    raise BadRequest(f"{name!r} is already the name or alias of model {taken!r}", param=where)
                claimed[name] = model.name
            new_models[model.name] = _new_model(model)
        return new_models

    def refusal(self, model: str) -> str | None:
        """Why no node may serve a model of this name here (None: one may)."""
        owner = self._catalog.owner(model)
        if owner is not None and owner != model:
            return f"{model!r} is an alias of model {owner!r}"
        spec = self._catalog.models.get(model)
        if spec is not None and spec.launch is not None:
            return f"model {model!r} is started by this gateway: a node cannot add to it"
        return None

    async def _checked_base_url(self, url: str, registered_from: str) -> str:
        """The base URL to use: `url` checked (see the module), an http one's host pinned to its address."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise BadRequest(f"not a base URL: {url!r} ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"expected an http(s) base URL such as http://10.0.0.5:8081/v1, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise BadRequest("a base URL may not carry credentials (a node's API key goes in `api_key`)")
        try:
            with trio.fail_after(RESOLVE_TIMEOUT_S):
                found = await self._resolve(parts.hostname, port)
            addresses = [_plain(ipaddress.ip_address(a)) for a in found]
        except (OSError, UnicodeError, ValueError, trio.TooSlowError) as exc:
            raise BadRequest(f"cannot resolve the host of {url!r}: {exc or 'no answer in time'}") from None
        if not addresses:
            raise BadRequest(f"the host of {url!r} resolves to no address")
        if any(a.is_unspecified for a in addresses):
            raise Forbidden(f"{url!r} names no host (an unspecified address reaches this gateway's own)")
        outside = [str(a) for a in addresses if not any(a in n for n in self._networks)]
        if outside:
            raise Forbidden(
                f"{url!r} resolves to {', '.join(outside)}, outside [nodes].allow_networks "
                f"({', '.join(self.config.allow_networks)})"
            )
        if any(a.is_loopback for a in addresses) and not _is_loopback(registered_from):
            raise Forbidden(f"{url!r} is this gateway's own loopback: only a node on this host may register it")
        if parts.scheme != "http":
            return url  # (https: the name stays, for the certificate)
        host = str(addresses[0]) if addresses[0].version == 4 else f"[{addresses[0]}]"
        return parts._replace(netloc=f"{host}:{port}").geturl()

    # -- effects --------------------------------------------------------------------------------------------------

    def _apply(
        self, node: _Node, models: list[RegisteredModel], new_models: dict[str, ModelSpec], urls: dict[str, str]
    ) -> None:
        """Make the node's upstreams what it registered (those unchanged stay, with their requests). `urls`: the
        checked base URLs."""
        back = node.stale
        node.stale = node.down = False
        wanted = node.reported = {m.name: m for m in models}
        for name in [n for n in node.upstreams if n not in wanted]:
            self._remove(node, name)
        for name, model in wanted.items():
            spec = self._catalog.models.get(name) or new_models[name]
            health_path = spec.kind.health_path if model.health_path is None else model.health_path
            host = urlsplit(model.base_url).netloc
            upstream = make_upstream(
                f"{name}@{node.name}", name, urls[name], health_path, model.max_concurrency, model.api_key, host
            )
            if node.upstreams.get(name) != upstream:
                if name in node.upstreams:  # the same upstream, changed (a new address, key): its requests stay
                    self._catalog.replace_upstream(upstream)
                    self._pool.replace_upstream(upstream.id, upstream.capacity)
                else:
                    self._catalog.add_upstream(upstream, spec)
                    self._pool.add_upstream(upstream.id, name, upstream.capacity)
                node.upstreams[name] = upstream
                self._health.watch(upstream)
            elif back:  # (unchanged, but not polled while its node was stale)
                self._pool.set_upstream_state(upstream.id, UpstreamState.LOADING, f"node {node.name} is back")
                self._health.watch(upstream)
            self._pool.set_upstream_load_cost(upstream.id, _load_cost(model.state))
        if back:
            log.info("node back", extra={"fields": {"node": node.name}})

    def _remove(self, node: _Node, model: str) -> None:
        upstream = node.upstreams.pop(model)
        self._health.unwatch(upstream.id)
        self._catalog.remove_upstream(upstream.id)  # (the catalog first: no new request resolves to it)
        self._pool.remove_upstream(upstream.id)

    def _go_stale(self, node: _Node, now: float, *, down: bool) -> None:
        """Its upstreams take no requests: those waiting for them wait (`down`: no more, they fail)."""
        node.stale, node.down = True, down
        silent = "no answer to its polls" if node.key == CONFIG_OWNER else "no heartbeat"
        reason = f"node {node.name}: {silent} for {now - node.last_seen:.0f} s"
        if not down:
            reason += f"; waiting up to {self.config.wait_s:g} s for it"
        log.warning("node stale", extra={"fields": {"node": node.name, "reason": reason}})
        state = UpstreamState.DOWN if down else UpstreamState.LOADING
        for upstream in node.upstreams.values():
            self._health.unwatch(upstream.id)
            self._pool.set_upstream_state(upstream.id, state, reason)

    def _forget(self, node: _Node, why: str = "node forgotten") -> None:
        for model in list(node.upstreams):
            self._remove(node, model)
        del self._nodes[node.name]
        log.info(why, extra={"fields": {"node": node.name}})

    def _next_deadline(self) -> float:
        """When a node next turns stale, down or forgotten."""
        wait_s, forget_after_s = self.config.wait_s, self.config.forget_after_s
        deadlines = [
            n.last_seen + n.ttl_s + (forget_after_s if n.down else wait_s if n.stale else 0.0)
            for n in self._nodes.values()
        ]
        return min(deadlines, default=math.inf)


def _eta(model: RegisteredModel) -> float | None:
    return model.load_eta_s if model.load_eta_s is not None and _sane(model.load_eta_s) else None


def _load_cost(state: str | None) -> int:
    """What a request costs a node whose model is in `state` (the scheduler's load cost)."""
    return 2 if state == "failed" else 1 if state in COLD_STATES else 0


def _state(node: _Node, model: str) -> str | None:
    return node.reported[model].state if model in node.reported else None


def _new_model(model: RegisteredModel) -> ModelSpec:
    """The spec of a model a registration creates."""
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


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 address written as IPv6 (::ffff:10.0.0.5) as the IPv4 address it is."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _is_loopback(address: str) -> bool:
    try:
        return _plain(ipaddress.ip_address(address)).is_loopback
    except ValueError:
        return False
