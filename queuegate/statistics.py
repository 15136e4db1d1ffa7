"""What the daemon's components report (`statistics()`): the shapes the admin socket sends and `queuegate top` shows.

Plain msgspec structs with no behaviour and no imports of the daemon, so a client of the admin socket (the TUI)
loads this and the protocol, nothing else of QueueGate.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec


class LimitStatistics(msgspec.Struct, frozen=True):
    """One key's or upstream's limits and what the last minute used of them."""

    name: str  # "key:<name>" or "upstream:<id>"
    rpm: int | None
    requests_used: int  # in the last 60 s
    tpm: int | None
    tokens_used: int  # in the last 60 s (estimates of requests still running)
    free_in_s: float  # until a request of average size may go (0: now)


class UpstreamStatistics(msgspec.Struct, frozen=True):
    id: str
    state: str
    reason: str
    in_flight: int
    capacity: int
    drained: bool


class ClassStatistics(msgspec.Struct, frozen=True):
    name: str
    waiting: int
    oldest_wait_s: float
    in_service: int
    paused: bool


class FlowStatistics(msgspec.Struct, frozen=True):
    flow: str
    klass: str
    waiting: int
    in_service: int


class ModelStatistics(msgspec.Struct, frozen=True):
    name: str
    waiting: int
    oldest_wait_s: float
    in_service: int
    classes: list[ClassStatistics]
    flows: list[FlowStatistics]  # the busiest flows first, at most FLOW_STATISTICS_LIMIT
    upstreams: list[UpstreamStatistics]


class SchedulerStatistics(msgspec.Struct, frozen=True):
    waiting: int
    in_service: int
    max_queue: int
    models: list[ModelStatistics]
    limits: list[LimitStatistics] = []  # every rate-limited key and upstream


class SwapProgress(msgspec.Struct, frozen=True):
    target: str
    phase: str  # "draining A", "stopping A", "starting B", "waiting for health of B"
    elapsed_s: float
    eta_s: float | None  # None until this model has loaded once


class LoadOutlook(msgspec.Struct, frozen=True):
    """What a queued request waits for besides the queue: its model's swap or load (see `Fleet.load_outlook`)."""

    phase: str  # "draining coder", "starting writer", "waiting for health of writer", "waiting for device gpu0"
    eta_s: float | None  # about how long still, as learned from past loads (None: not known)
    bound_s: float | None = None  # a first load: at most this long (its startup_timeout_s)


class FleetModelStatistics(msgspec.Struct, frozen=True):
    name: str
    state: str
    reason: str
    managed: bool
    device: str | None
    memory_gb: float
    in_state_s: float
    idle_s: float | None  # None while requests wait or run, and for external models
    load_s: float | None  # learned load time
    progress: SwapProgress | None  # while it loads (also outside a swap)
    crashes: int = 0  # unexpected exits of its server since start-up


class DeviceStatistics(msgspec.Struct, frozen=True):
    name: str
    memory_gb: float
    used_gb: float
    exclusive: bool
    models: list[str]  # on the device now (starting, ready, draining or stopping)
    swap: SwapProgress | None


class FleetStatistics(msgspec.Struct, frozen=True):
    models: list[FleetModelStatistics]
    devices: list[DeviceStatistics]
    loads: int
    swaps: int  # models stopped to make room for another


class NodeModelStatistics(msgspec.Struct, frozen=True):
    model: str
    upstream: str  # its upstream's id (<model>@<node>)
    url: str  # (credentials redacted)
    state: str | None = None  # as its node reports it (stopped, starting, ready, ...); None: not reported
    load_eta_s: float | None = None  # while it loads: about how long still (None: not known)


class NodeDeviceStatistics(msgspec.Struct, frozen=True):
    """A device of a node as the node declares it (also how a node reports it in its registration)."""

    name: str
    memory_gb: float
    used_gb: float  # the declared memory of the models on it now
    models: list[str] = []


class GpuMemory(msgspec.Struct, frozen=True):
    """A GPU's memory as `nvidia-smi` or `rocm-smi` measures it (also how a node reports it)."""

    index: int
    name: str
    total_gb: float
    used_gb: float


class NodeStatistics(msgspec.Struct, frozen=True):
    name: str
    address: str  # where its last registration came from
    stale: bool  # no heartbeat within ttl_s: its upstreams take no requests
    last_heartbeat_s: float  # seconds ago
    ttl_s: float
    models: list[NodeModelStatistics]
    devices: list[NodeDeviceStatistics] = []
    gpus: list[GpuMemory] = []  # measured on the node (empty: it has no nvidia-smi or rocm-smi)


class BatchStatistics(msgspec.Struct, frozen=True):
    """A batch being run, as the status and `top` show it."""

    id: str
    key: str | None
    endpoint: str
    status: str
    paused: bool
    total: int
    completed: int
    failed: int
    in_flight: int
    rate_per_s: float  # lines finished per second since this run of it began
    eta_s: float | None  # at that rate (None: nothing finished yet)


class RequestStatistics(msgspec.Struct, frozen=True):
    id: str
    model: str | None
    klass: str
    flow: str
    upstream: str | None  # None while queued
    elapsed_s: float
    chunks: int  # stream events relayed so far (about one token each)
    step: str | None = None  # where a tool loop is: "round 2", "round 2: get_current_time"


class ToolServerStatistics(msgspec.Struct, frozen=True):
    """One OpenAPI tool server as the status shows it."""

    name: str
    url: str
    up: bool
    tools: list[str]
    error: str | None  # why it is down, or a tool it offers that another server already offers
    refreshed_at: float | None  # when its document was last read (unix time)
    left_out: list[str]  # operations that are not tools, and why


class ModelView(msgspec.Struct, frozen=True):
    """One model as every window on the daemon shows it (`/v1/models`, `/readyz`, `queuegate admin status` and
    `top`): the fleet's state merged with its queue and its upstreams' health."""

    name: str
    state: str  # launched models: the fleet's (stopped, starting, ready, ...); others: their upstreams' best
    available: bool  # it can take requests now, or once it has loaded on demand
    loaded: bool
    reason: str  # why it is in its state
    managed: bool  # QueueGate starts and stops it
    device: str | None
    memory_gb: float
    in_service: int
    waiting: int
    oldest_wait_s: float
    idle_s: float | None
    progress: SwapProgress | None  # while it loads
    drained: list[str]  # upstreams an operator took out


def batch_text(batch: BatchStatistics) -> str:
    """A batch job's progress, as the status and `top` show it."""
    done = batch.completed + batch.failed
    paused = ", paused" if batch.paused else ""
    eta = f", ~{batch.eta_s:.0f} s left" if batch.eta_s is not None and not batch.paused else ""
    return (
        f"{batch.id} ({batch.key or 'no key'}, {batch.endpoint}): {batch.status}{paused}, {done}/{batch.total} done, "
        f"{batch.failed} failed, {batch.in_flight} in flight, {batch.rate_per_s:g}/s{eta}"
    )


def node_model_text(model: NodeModelStatistics) -> str:
    """A node's model and its state there, as the status and `top` show it: "m ready", "m starting ~4 s"."""
    if model.state is None:
        return model.model
    eta = f" ~{model.load_eta_s:.0f} s" if model.load_eta_s is not None else ""
    return f"{model.model} {model.state}{eta}"


def node_devices_text(node: NodeStatistics) -> str:
    """A node's declared devices (the planned use of their memory), then its GPUs as measured ("" if neither)."""
    declared = [f"{d.name} {d.used_gb:g}/{d.memory_gb:g} GB" for d in node.devices]
    measured = [f"GPU{g.index} {g.used_gb:.1f}/{g.total_gb:.1f} GB used" for g in node.gpus]
    return "; ".join(declared + measured)


_NOT_PLANNED = FleetModelStatistics("", "", "", False, None, 0.0, 0.0, None, None, None)
_NODE_STATE_ORDER = ("ready", "starting", "draining", "stopping", "stopped", "failed")  # the best a node reports


def model_views(
    scheduler: SchedulerStatistics, fleet: FleetStatistics, nodes: Sequence[NodeStatistics] = ()
) -> list[ModelView]:
    """Every model's view, in config order (then the models nodes registered)."""
    planned = {m.name: m for m in fleet.models}
    reported = {m.upstream: m.state for node in nodes if not node.stale for m in node.models}  # by upstream id
    on_nodes: dict[str, list[str]] = {}  # model -> the live nodes serving it
    for node in nodes:
        for served in node.models if not node.stale else ():
            on_nodes.setdefault(served.model, []).append(node.name)
    views = []
    for model in scheduler.models:
        plan = planned.get(model.name, _NOT_PLANNED)  # (a node's model: external, like an unmanaged one)
        upstream_states = {u.state for u in model.upstreams}
        if plan.managed:
            state, reason, available = plan.state, plan.reason, plan.state != "failed"
        else:
            # Its upstreams that answer, each in the state its node reports (none reported: serving); the best.
            serving = [reported.get(u.id) or "ready" for u in model.upstreams if u.state == "ready"]
            if serving:
                state = min(serving, key=_NODE_STATE_ORDER.index)
            else:
                state = next((s for s in ("loading", "down") if s in upstream_states), "down")
            available = bool(serving) and state != "failed"
            reasons = [f"{u.id}: {u.state} ({u.reason})" for u in model.upstreams if u.state != "ready"]
            if state != "ready":  # (why it is not: what the nodes say; a ready model needs no reason)
                reasons += [
                    f"{u.id}: {reported[u.id]} on its node"
                    for u in model.upstreams
                    if u.state == "ready" and reported.get(u.id) not in (None, "ready")
                ]
            reason = "; ".join(reasons)
        device = "node " + ", ".join(on_nodes[model.name]) if model.name in on_nodes else plan.device
        views.append(
            ModelView(
                name=model.name,
                state=state,
                available=available,
                loaded=state == "ready",
                reason=reason or "ok",
                managed=plan.managed,
                device=device,
                memory_gb=plan.memory_gb,
                in_service=model.in_service,
                waiting=model.waiting,
                oldest_wait_s=model.oldest_wait_s,
                idle_s=plan.idle_s,
                progress=plan.progress,
                drained=[u.id for u in model.upstreams if u.drained],
            )
        )
    return views
