"""The composition root: builds every component from the config, wires them, and runs them in one nursery.

Nothing else constructs long-lived objects. Start order: HTTP socket (bound, so a busy port fails before anything
starts) → lifeline → usage store (database open) → health monitor (first check done) → fleet → HTTP server → admin
socket. Shutdown: `request_shutdown()` stops accepting and lets in-flight requests finish for `shutdown_grace_s`;
then the rest are stopped with a "shutting down" error (their streams get it as a last event) and their connections
closed; the usage store stops last, after committing every row, and the lifeline after every child is gone.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from queuegate.accounting import UsageStore
from queuegate.accounting.keys import ApiKey, KeyRing, NodeKeyRing
from queuegate.admin.protocol import DaemonStatus
from queuegate.admin.server import AdminServer, claim_admin_socket
from queuegate.api import InFlight, Routes, create_app
from queuegate.api.server import HttpServer, bind_listener
from queuegate.batches.service import BatchService
from queuegate.batches.store import BatchStore
from queuegate.config import (
    Config,
    ConfigError,
    admin_socket_path,
    batches_path,
    load_config,
    memory_db_path,
    parse_listen,
    usage_db_path,
    usage_timezone,
)
from queuegate.config.reload import plan_reload
from queuegate.errors import ServiceUnavailable
from queuegate.fleet import Catalog, HealthMonitor
from queuegate.fleet.catalog import Upstream, model_spec, pick_free_port
from queuegate.fleet.launchers import Launcher
from queuegate.fleet.launchers.docker import DockerEngine, DockerLauncher
from queuegate.fleet.launchers.lifeline import Lifeline
from queuegate.fleet.launchers.process import ChildProcess
from queuegate.fleet.manager import Fleet
from queuegate.fleet.planner import DeviceSpec, FleetPlanner, PlannedModel, PlannerPolicy
from queuegate.heap import HeapTrimmer
from queuegate.memory.backends import Backend, BuiltinBackend, ToolServerBackend
from queuegate.memory.embedder import FleetEmbedder
from queuegate.memory.outcomes import Outcomes
from queuegate.memory.service import Memory
from queuegate.memory.store import MemoryStore
from queuegate.metrics import Metrics
from queuegate.nodes.agent import NodeAgent
from queuegate.nodes.poller import NodePoller
from queuegate.nodes.registry import NodeRegistry
from queuegate.proxy import (
    ActiveRequests,
    Forwarder,
    NoticePolicy,
    Proxy,
    RequestRecord,
    Timeouts,
    UpstreamConnections,
    usage_row,
)
from queuegate.scheduler import Admission, Policy, RateLimit, SchedulerCore
from queuegate.tools.loop import ToolPolicy
from queuegate.tools.servers import ToolServers

log = logging.getLogger("queuegate.daemon")

SHUTDOWN_LAST_WORDS_S = 1.0  # after the grace period: time for stopped streams to send their error event
# Idle connections to upstreams expire before the usual 5 s server keep-alive: a socket the server is closing is
# rarely reused (a request or a health check every 5 s would otherwise meet it).
KEEPALIVE_EXPIRY_S = 4.0


@dataclass(slots=True)
class Endpoints:
    """What a daemon listens on, claimed before anything else starts (so a busy port or a live admin socket is one
    clear error, with nothing launched): the HTTP socket and the admin socket."""

    http: socket.socket
    admin: trio.SocketListener
    admin_path: Path

    def close(self) -> None:
        self.http.close()
        self.admin.socket.close()


async def claim_endpoints(config: Config) -> Endpoints:
    """Bind `[server].listen` and claim the admin socket. ListenError or AdminSocketError when they are taken."""
    server = config.server
    http = bind_listener(server.listen, server.backlog)
    try:
        path = admin_socket_path(config).absolute()
        return Endpoints(http, await claim_admin_socket(path), path)
    except BaseException:
        http.close()
        raise


@dataclass(frozen=True, slots=True)
class Started:
    """What `Daemon.run` reports once it is really serving."""

    base_url: str  # e.g. http://127.0.0.1:8080 (the bound port, also when configured as 0)
    models: tuple[str, ...] = ()  # what it serves: each model, its aliases in parentheses
    admin: str = ""  # its admin socket (`queuegate top`, `queuegate admin`)


class Daemon:
    """Every long-lived component of one gateway, built here in one phase from the config and wired by constructor
    arguments; `run` starts them in order and stops them in reverse. Construct it inside trio (the fleet planner's
    clock starts with it)."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        endpoints: Endpoints | None = None,
        lifeline: Lifeline | None = None,
    ) -> None:
        """`config_path`: the file `reload` reads again (None: started from a built config, as the demo).
        `endpoints`: what it listens on, already claimed (else `run` claims them before starting anything).
        `lifeline`: the running lifeline its children register with (else `run` starts its own, first)."""
        cfg = self.config = config
        up = cfg.upstream
        self.config_path = config_path
        self._endpoints = endpoints
        self._own_lifeline = lifeline is None
        self.lifeline = lifeline or Lifeline()
        self.catalog = catalog = Catalog.from_config(config)
        self.admission = Admission(
            SchedulerCore([(u.id, u.model, u.capacity) for u in catalog.upstreams.values()], _policy(cfg, catalog))
        )
        self.usage = _usage_store(cfg)
        # Upstream I/O: the forwarding pool and the health checks' client (idle connections: see KEEPALIVE_EXPIRY_S).
        self._pool = UpstreamConnections(
            keepalive_expiry_s=KEEPALIVE_EXPIRY_S, max_idle_per_upstream=up.keepalive_connections
        )
        self._health_client = httpx.AsyncClient(
            timeout=up.health_timeout_s, limits=httpx.Limits(max_connections=64, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        )
        self.health = HealthMonitor(
            catalog,
            self._health_client,
            self.admission.set_upstream_state,
            interval_s=up.health_interval_s,
            timeout_s=up.health_timeout_s,
        )
        self.launchers = _launchers(cfg, catalog, self.lifeline)
        self.fleet = Fleet(
            catalog,
            _planner(cfg, trio.current_time()),
            self.launchers,
            self.admission,
            self._health_client,
            poll_s=cfg.fleet.health_poll_ms / 1000,
            interval_s=up.health_interval_s,
            timeout_s=up.health_timeout_s,
        )
        timeouts = Timeouts(
            up.connect_timeout_s, up.first_byte_timeout_s, up.idle_timeout_s, up.total_timeout_s, up.answer_timeout_s
        )
        self.tool_servers = ToolServers(cfg.tools, os.environ, _reserved_tools(cfg))
        # Nodes add and remove upstreams at runtime (in the catalog, the scheduler and the health checks).
        self.nodes = NodeRegistry(cfg.nodes, catalog, self.admission, self.health)
        self.node_poller = NodePoller(cfg.nodes.polled, self.nodes, self._health_client)
        self.node_keys = NodeKeyRing.from_config(cfg)
        self._in_flight = InFlight()
        self.heap = HeapTrimmer(self._in_flight)
        self.metrics = Metrics(
            self.admission.statistics,
            self.fleet.statistics,
            self.usage.statistics if self.usage else None,
            (lambda: self.memory.counts if self.memory is not None else {}) if cfg.memory.enabled else None,
            self.nodes.statistics,
            (lambda: (self.batches.outcomes, self.batches.statistics())) if cfg.batches.enabled else None,
            lambda: self._in_flight.count,
        )
        self.proxy = Proxy(
            catalog,
            self.admission,
            Forwarder(self._pool, timeouts),
            _HealthWatchers(catalog, self.fleet, self.health),
            _notice_policy(cfg),
            cfg.affinity.header,
            max_answer_bytes=int(up.max_answer_mb * 2**20),
            tools=ToolPolicy(cfg.tools, self.tool_servers, self.metrics),
            load_outlook=self.fleet.load_outlook,
        )
        # Chat memory goes through the proxy it serves (its embeddings are requests like any other).
        self.memory = self.proxy.memory = _memory(
            cfg, self.tool_servers, self.proxy, self.admission, catalog, self._request_finished
        )
        # Batch jobs run their lines through the proxy too, as the key that created them, in the lowest class.
        self.batches = _batches(
            cfg,
            self.proxy,
            self.admission,
            catalog,
            lambda name: self.keyring.named(name),
            lambda: self.keyring.open,
            self._request_finished,
        )
        self.fleet.add_listener(self.metrics.observe_transition)
        canonical = {name: catalog.canonical(name) for name in catalog.public_names()}
        self.keyring = KeyRing.from_config(cfg, canonical)
        self.node_agent: NodeAgent | None = None
        if cfg.node is not None:  # a node of another gateway: its requests come with a key made for this run
            gateway_key = secrets.token_urlsafe(32)
            self.keyring = self.keyring.with_key("gateway", gateway_key, cfg.queue.classes[0])
            self.node_agent = NodeAgent(cfg.node, catalog, self.fleet, gateway_key, self._health_client, os.environ)
        self._active = ActiveRequests()
        app = create_app(
            Routes(
                server=cfg.server,
                catalog=catalog,
                admission=self.admission,
                fleet=self.fleet,
                proxy=self.proxy,
                active=self._active,
                keyring=self.keyring,
                node_keys=self.node_keys,
                nodes=self.nodes,
                metrics=self.metrics,
                in_flight=self._in_flight,
                classes=cfg.queue.classes,
                usage=self.usage,
                batches=self.batches,
                user_header=cfg.queue.user_header,
                on_finish=self._request_finished,
                # Durable usage: a request's row is committed before its answer's last byte is sent.
                commit=self.usage.commit_within if self.usage is not None and self.usage.durable else None,
            )
        )
        self.http = HttpServer(
            app,
            # A backstop: `_stop_when_drained` ends the shutdown before (grace, then the last words).
            graceful_timeout_s=cfg.server.shutdown_grace_s + SHUTDOWN_LAST_WORDS_S + 1.0,
            write_timeout_s=cfg.server.write_timeout_s,
            keepalive_s=cfg.server.keepalive_s,
            http2=cfg.server.http2,
        )
        self._shutdown = trio.Event()
        self._stop_now = trio.Event()
        self._base_url = ""
        self._started_at = 0.0

    def _request_finished(self, record: RequestRecord, status: int) -> None:
        """Every finished request, however it ended: its metrics, and its usage row."""
        self.metrics.observe(record, status)
        if self.usage is not None and (row := usage_row(record, status, self.usage.timezone)) is not None:
            self.usage.record(row)

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def request_shutdown(self, *, now: bool = False) -> None:
        """Begin a graceful shutdown (safe to call more than once). `now`: skip the grace period (a second
        signal): requests are stopped and connections closed at once."""
        self._shutdown.set()
        if now:
            self._stop_now.set()

    async def run(self, *, task_status: trio.TaskStatus[Started] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until shut down. The HTTP socket is bound before anything starts (a busy port is a ListenError
        with nothing launched); the lifeline and the usage store outlive everything else, so no child outlives
        the daemon and the last requests are counted."""
        endpoints = self._endpoints or await claim_endpoints(self.config)
        try:
            async with trio.open_nursery() as outlived:
                if self._own_lifeline:
                    await outlived.start(self.lifeline.run)
                if self.usage is not None:
                    await outlived.start(self.usage.run)
                await self._run_components(endpoints, task_status=task_status)
                outlived.cancel_scope.cancel()
        finally:
            endpoints.close()

    async def _run_components(self, endpoints: Endpoints, *, task_status: trio.TaskStatus[Started]) -> None:
        cfg = self.config
        async with self._pool, self._health_client, trio.open_nursery() as nursery:
            await nursery.start(self.admission.run)
            await nursery.start(self.heap.run)
            await nursery.start(self.health.run)
            await nursery.start(self.nodes.run)
            await nursery.start(self.node_poller.run)
            if self.launchers:
                self.admission.add_listener(self.fleet.notify)
            await nursery.start(self.fleet.run)
            if self.tool_servers.configured:
                await nursery.start(self.tool_servers.run)
            if self.batches is not None:
                await nursery.start(self.batches.run)
            if self.memory is not None:
                await nursery.start(self.memory.run)  # a tool name two servers offer fails the start
            self._base_url = await nursery.start(self._serve, endpoints.http, nursery)
            if self.node_agent is not None:
                await nursery.start(self.node_agent.run, self._base_url, self._shutdown)
            self._started_at = time.time()
            admin = AdminServer(
                endpoints.admin,
                endpoints.admin_path,
                self.status,
                self.fleet,
                self.admission,
                self._active,
                self.reload,
                self.memory,
                self.nodes,
                self.batches,
            )
            self.admission.add_listener(admin.note_change)
            await nursery.start(admin.run)
            fields = {"url": self._base_url, "models": len(self.catalog.models), "admin": str(admin.path)}
            log.debug("listening", extra={"fields": fields})  # (the banner says it: `Started`)
            if self.keyring.open and not _is_loopback(parse_listen(cfg.server.listen)[0]):
                log.warning(
                    "no [keys] configured and listening beyond loopback: anyone who can reach it may use it",
                    extra={"fields": {"listen": cfg.server.listen}},
                )
            served = tuple(
                f"{spec.name} ({', '.join(spec.aliases)})" if spec.aliases else spec.name
                for spec in self.catalog.models.values()
            )
            task_status.started(Started(self._base_url, served, str(admin.path)))

    def status(self) -> DaemonStatus:
        """A snapshot of everything, for the admin socket."""
        active = self._active
        return DaemonStatus(
            at=time.time(),
            uptime_s=round(time.time() - self._started_at, 3),
            listen=self._base_url + "/v1",
            scheduler=self.admission.statistics(),
            fleet=self.fleet.statistics(),
            requests=active.statistics(trio.current_time()),
            requests_total=len(active),
            finished_total=active.finished,
            tokens_total=active.tokens,
            tool_servers=self.tool_servers.statistics(),
            nodes=self.nodes.statistics(),
            batches=self.batches.statistics() if self.batches is not None else [],
        )

    def reload(self) -> str:
        """Read the config file again and apply what can change live (see `queuegate.config.reload`); says what it did.

        ConfigError (the running config stays) or ValueError (no file to read).
        """
        if self.config_path is None:
            raise ValueError("this daemon was started without a config file (--demo): there is nothing to reload")
        plan = plan_reload(self.config, load_config(self.config_path))
        if plan.models:
            self._reload_models(plan.live, plan.models)  # (ConfigError: nothing applied)
        if plan.applied:
            live = self.config = plan.live
            self.admission.set_policy(_policy(live, self.catalog))
            self.proxy.notices = _notice_policy(live)
            self.proxy.tools.config = live.tools  # type: ignore[union-attr]
            self.tool_servers.set_limits(live.tools)
            self.fleet.set_policy(_planner_policy(live))
            self.nodes.set_config(live.nodes)
            self.node_poller.set_nodes(live.nodes.polled)
            logging.getLogger("queuegate").setLevel(live.server.log_level.upper())
        log.info("config reloaded", extra={"fields": {"applied": plan.applied, "needs_restart": plan.needs_restart}})
        return plan.summary()

    def _reload_models(self, live: Config, changed: frozenset[str]) -> None:
        """Apply a reload's external models: the catalog takes their new specs, the scheduler and the health
        checks their upstreams (requests in flight on one that leaves finish)."""
        catalog = self.catalog
        specs = {}
        for name, model in live.models.items():
            current = catalog.configured_spec(name)
            changed_now = name in changed or current is None
            specs[name] = model_spec(name, model, os.environ, pick_free_port) if changed_now else current
        try:
            removed, added, replaced = catalog.reconfigure(specs)
        except ValueError as exc:
            raise ConfigError(f"{self.config_path}: {exc}") from None
        for upstream in added:
            self.admission.add_upstream(upstream.id, upstream.model, upstream.capacity)
            self.health.watch(upstream)
        for upstream in replaced:  # (its requests, waiting and in flight, stay)
            self.admission.replace_upstream(upstream.id, upstream.capacity)
            self.health.watch(upstream)
        for upstream in removed:
            self.health.unwatch(upstream.id)
            self.admission.remove_upstream(upstream.id)
        # Keys allowed models by name: the names may have moved.
        canonical = {name: catalog.canonical(name) for name in catalog.public_names()}
        self.keyring.take_models(KeyRing.from_config(live, canonical))

    async def _serve(
        self,
        listener: socket.socket,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with trio.CancelScope() as server_scope:
                nursery.start_soon(self._stop_when_drained, self.http, server_scope)
                await self.http.run(listener, shutdown_trigger=self._shutdown, task_status=task_status)
        finally:
            # The server has drained (or failed): stop the health checks and everything else with it.
            nursery.cancel_scope.cancel()

    async def _stop_when_drained(self, http: HttpServer, server_scope: trio.CancelScope) -> None:
        """After a shutdown request, stop the server once no request is in flight, or when the grace period ends:
        then every request left is stopped with a "shutting down" error (a stream gets it as its last event) and,
        a moment later, every connection is closed, whether its client reads or not.

        hypercorn stops accepting at once but, with quart-trio, keeps idle keep-alive connections open until its
        graceful timeout; waiting for our own in-flight count ends the shutdown as soon as the work is done.
        """
        await self._shutdown.wait()
        with trio.move_on_after(self.config.server.shutdown_grace_s):
            async with trio.open_nursery() as waiting:
                waiting.start_soon(_cancel_when_set, self._stop_now, waiting.cancel_scope)
                await self._in_flight.wait_idle()
                waiting.cancel_scope.cancel()
        unfinished = self._in_flight.count
        if unfinished:
            stopped = self._active.stop_all(ServiceUnavailable("the server is shutting down", code="shutting_down"))
            last_words_s = 0.0 if self._stop_now.is_set() else SHUTDOWN_LAST_WORDS_S
            http.limit_writes(trio.current_time() + last_words_s)
            with trio.move_on_after(last_words_s):
                await self._in_flight.wait_idle()
            log.warning("stopped unfinished requests", extra={"fields": {"requests": stopped}})
        http.abort_all("the server is shutting down")
        log.info("stopped", extra={"fields": {"unfinished_requests": unfinished}})
        server_scope.cancel()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@dataclass(frozen=True, slots=True)
class _HealthWatchers:
    """Passes what a request saw of an upstream to whoever watches its health: the fleet for launched models,
    the health monitor for the others."""

    catalog: Catalog
    fleet: Fleet
    health: HealthMonitor

    def report_failure(self, upstream: Upstream, reason: str) -> None:
        self._watcher(upstream).report_failure(upstream, reason)

    def report_not_ready(self, upstream: Upstream, reason: str, retry_in_s: float) -> None:
        self._watcher(upstream).report_not_ready(upstream, reason, retry_in_s)

    def _watcher(self, upstream: Upstream) -> Fleet | HealthMonitor:
        spec = self.catalog.models.get(upstream.model)  # (a node's model may be gone by now)
        return self.fleet if spec is not None and spec.launch is not None else self.health


def _batches(
    cfg: Config,
    proxy: Proxy,
    admission: Admission,
    catalog: Catalog,
    key_named: Callable[[str], ApiKey | None],
    keys_open: Callable[[], bool],
    on_finish: Callable[[RequestRecord, int], None],
) -> BatchService | None:
    """The batch service ([batches].enabled), its store opened (BatchStoreError: it cannot be)."""
    if not cfg.batches.enabled:
        return None

    def resolve_model(model: str, key: ApiKey | None, endpoint: str) -> str:
        spec = catalog.resolve(model)
        if spec is None or (key is not None and not key.may_use(spec.name)):
            raise ValueError(f"the model {model!r} does not exist or you do not have access to it")
        if endpoint not in spec.endpoints:
            raise ValueError(f"model {spec.name!r} (kind {spec.kind.name}) does not serve the {endpoint} endpoint")
        return spec.name

    store = BatchStore(batches_path(cfg))
    return BatchService(
        cfg.batches,
        store,
        proxy,
        key_named,
        resolve_model,
        admission.serving,
        keys_open,
        cfg.queue.classes[-1],
        on_finish,
    )


def _usage_store(config: Config) -> UsageStore | None:
    usage = config.usage
    if not usage.enabled:
        return None
    return UsageStore(
        usage_db_path(config),
        flush_s=usage.flush_ms / 1000,
        retention_days=usage.retention_days,
        timezone=usage_timezone(config),
        durable=usage.durable,
    )


def _policy(config: Config, catalog: Catalog) -> Policy:
    queue, affinity = config.queue, config.affinity
    return Policy(
        classes=tuple(queue.classes),
        aging_s=queue.aging_s,
        max_queue=queue.max_size,
        model_max_queue={name: m.max_queue for name, m in config.models.items() if m.max_queue is not None},
        affinity_ttl_s=affinity.ttl_s,
        affinity_wait_s=affinity.max_wait_ms / 1000,
        key_limits={name: RateLimit(key.rpm, key.tpm) for name, key in config.keys.items()},
        upstream_limits={
            upstream.id: RateLimit(config.models[upstream.model].rpm, config.models[upstream.model].tpm)
            for upstream in catalog.configured_upstreams  # (a node's upstreams have no limits of their own)
        },
        max_wait_s=queue.max_wait_s,
    )


def _notice_policy(config: Config) -> NoticePolicy:
    queue = config.queue
    return NoticePolicy(mode=queue.notify, min_wait_s=queue.notify_min_ms / 1000, keepalive_s=queue.keepalive_s)


def _planner_policy(config: Config) -> PlannerPolicy:
    fleet = config.fleet
    return PlannerPolicy(
        swap_after_s=fleet.swap_after_ms / 1000,
        idle_grace_s=fleet.idle_grace_ms / 1000,
        restart_attempts=fleet.restart_attempts,
        restart_backoff_s=fleet.restart_backoff_s,
        failure_hold_s=fleet.failure_hold_s,
        abort_abandoned=fleet.abandoned_load == "abort",
        # The lowest class is background work (batch jobs): it uses idle capacity (see PlannerPolicy).
        background_rank=len(config.queue.classes) - 1 if len(config.queue.classes) > 1 else None,
    )


def _planner(config: Config, now: float) -> FleetPlanner:
    return FleetPlanner(
        [DeviceSpec(name, d.memory_gb, d.exclusive) for name, d in config.devices.items()],
        [
            PlannedModel(name, m.device, m.memory_gb, m.ttl_s, m.preload, managed=m.launcher != "external")
            for name, m in config.models.items()
        ],
        _planner_policy(config),
        now=now,
    )


def _launchers(config: Config, catalog: Catalog, lifeline: Lifeline) -> dict[str, Launcher]:
    """One launcher per managed model; docker ones share one Docker Engine client."""
    engine: DockerEngine | None = None
    launchers: dict[str, Launcher] = {}
    for name, spec in catalog.models.items():
        launch = spec.launch
        if launch is None:
            continue
        if launch.launcher == "process":
            launchers[name] = ChildProcess(
                name, launch.argv, env=launch.env, stop_grace_s=launch.stop_timeout_s, lifeline=lifeline
            )
        else:
            engine = engine or DockerEngine(config.fleet.docker_url, config.fleet.docker_timeout_s)
            launchers[name] = DockerLauncher(name, launch, engine)
    return launchers


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _reserved_tools(cfg: Config) -> dict[str, set[str]]:
    """The tool servers' operations for QueueGate only: chat memory's (a model must not read any chat's memory)."""
    memory = cfg.memory
    if memory.enabled and memory.backend == "toolserver":
        return {memory.server: {memory.query_tool, memory.upsert_tool}}
    return {}


def _memory(
    cfg: Config,
    tools: ToolServers,
    proxy: Proxy,
    admission: Admission,
    catalog: Catalog,
    on_finish: Callable[[RequestRecord, int], None],
) -> Memory | None:
    """Chat memory (None: off): its backend, and the fleet's embedding model for the built-in store."""
    memory = cfg.memory
    if not memory.enabled:
        return None
    outcomes = Outcomes()
    backend: Backend
    if memory.backend == "toolserver":
        timeout_s = memory.timeout_ms / 1000
        backend = ToolServerBackend(tools, memory.server, memory.query_tool, memory.upsert_tool, timeout_s)
    else:
        embedder = None
        if memory.embed_model:
            model = catalog.canonical(memory.embed_model)
            embedder = FleetEmbedder(proxy, model, admission.serving, on_finish)
        store = MemoryStore(memory_db_path(cfg), memory.retention_days, embedder.model if embedder else "")
        backend = BuiltinBackend(store, outcomes, embedder, fill_class=cfg.queue.classes[-1])
    return Memory(memory, backend, outcomes)
