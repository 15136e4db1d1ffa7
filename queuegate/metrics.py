"""Prometheus metrics for `GET /metrics`, in a registry of the daemon's own (no module-level state).

Per request (observed once, when its log line is written): requests by model, class and status; queue wait by class;
time to first token and generation speed by model; tokens; and QueueGate's own overhead, the time a request spent
in the gateway outside the queue and the upstream. Read at scrape time from the live components: queue length and
oldest wait by class, requests in flight by model, HTTP requests open, upstream health, model states, loads and
swaps, and the usage store's rows (pending, written, dropped, write errors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from queuegate.accounting import UsageStoreStatistics
from queuegate.fleet.planner import FleetStatistics, Transition
from queuegate.proxy import RequestRecord
from queuegate.scheduler import SchedulerStatistics
from queuegate.statistics import BatchStatistics, NodeStatistics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_RATE_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640)
_LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


UsageSource = Callable[[], UsageStoreStatistics] | None
BatchSource = Callable[[], tuple[Mapping[str, int], list[BatchStatistics]]] | None  # (line outcomes, running)


class Metrics:
    def __init__(
        self,
        scheduler: Callable[[], SchedulerStatistics],
        fleet: Callable[[], FleetStatistics],
        usage: UsageSource = None,
        memory: Callable[[], Mapping[str, int]] | None = None,
        nodes: Callable[[], list[NodeStatistics]] | None = None,
        batches: BatchSource = None,
        open_requests: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "queuegate_requests", "Requests answered, by model, class and HTTP status.", ["model", "class", "status"],
            registry=r,
        )  # fmt: skip
        self._queue_wait = Histogram(
            "queuegate_queue_wait_seconds", "Time requests waited in the queue.", ["class"], buckets=_WAIT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self._first_token = Histogram(
            "queuegate_time_to_first_token_seconds",
            "From arrival to the first streamed event (or the whole body when not streamed).",
            ["model"], buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self._rate = Histogram(
            "queuegate_tokens_per_second", "Completion tokens per second of generation, per streamed request.",
            ["model"], buckets=_RATE_BUCKETS, registry=r,
        )  # fmt: skip
        self._tokens = Counter("queuegate_tokens", "Tokens, by model and kind.", ["model", "kind"], registry=r)
        self._overhead = Histogram(
            "queuegate_gateway_overhead_seconds",
            "Time a request spent in QueueGate outside the queue and the upstream: what the gateway costs.",
            buckets=_OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self._load = Histogram(
            "queuegate_model_load_duration_seconds", "Model loads, from launch to healthy.", ["model"],
            buckets=_LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self._tool_calls = Counter(
            "queuegate_tool_calls", "Tool calls QueueGate ran, by tool and outcome.", ["tool", "outcome"], registry=r,
        )  # fmt: skip
        self._tool_duration = Histogram(
            "queuegate_tool_call_duration_seconds", "How long tool calls took, by tool.", ["tool"],
            buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_LiveState(scheduler, fleet, usage, memory, nodes, batches, open_requests))

    def observe(self, record: RequestRecord, status: int) -> None:
        """One finished request (RequestRecord's `on_finish`)."""
        model = record.model or "-"
        self._requests.labels(model, record.klass, str(status)).inc()
        if record.model is None:
            return  # refused before it had a model: nothing else to say
        self._queue_wait.labels(record.klass).observe(record.queue_s)
        now = trio.current_time()
        if record.first_token_at is not None:
            self._first_token.labels(model).observe(record.first_token_at - record.started_at)
            usage = record.usage
            completion = usage.completion_tokens if usage else record.chunks
            if record.stream and completion and now > record.first_token_at and not record.tool_calls:
                self._rate.labels(model).observe(completion / (now - record.first_token_at))
        if record.usage is not None:
            self._tokens.labels(model, "prompt").inc(record.usage.prompt_tokens)
            self._tokens.labels(model, "completion").inc(record.usage.completion_tokens)
        if record.upstream_started_at is not None and not record.tool_calls:  # (tool time is not the gateway's)
            in_upstream = now - record.upstream_started_at
            self._overhead.observe(max(0.0, (now - record.started_at) - record.queue_s - in_upstream))

    def observe_tool_call(self, tool: str, outcome: str, duration_s: float) -> None:
        """One tool call the execute loop ran."""
        self._tool_calls.labels(tool, outcome).inc()
        self._tool_duration.labels(tool).observe(duration_s)

    def observe_transition(self, transition: Transition) -> None:
        """A model state change (the fleet's listener): a finished load is timed."""
        if transition.load_s is not None:
            self._load.labels(transition.model).observe(transition.load_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges read from the scheduler and the fleet at scrape time, so nothing is counted twice."""

    def __init__(
        self,
        scheduler: Callable[[], SchedulerStatistics],
        fleet: Callable[[], FleetStatistics],
        usage: UsageSource,
        memory: Callable[[], Mapping[str, int]] | None,
        nodes: Callable[[], list[NodeStatistics]] | None,
        batches: BatchSource,
        open_requests: Callable[[], int] | None,
    ) -> None:
        self._scheduler = scheduler
        self._fleet = fleet
        self._usage = usage
        self._memory = memory
        self._nodes = nodes
        self._batches = batches
        self._open_requests = open_requests

    def collect(self) -> Iterator[Metric]:
        stats, fleet = self._scheduler(), self._fleet()
        waiting = GaugeMetricFamily("queuegate_queue_length", "Requests waiting, by model and class.",
                                    labels=["model", "class"])  # fmt: skip
        oldest = GaugeMetricFamily("queuegate_queue_oldest_wait_seconds", "Wait of the oldest waiting request.",
                                   labels=["model", "class"])  # fmt: skip
        in_flight = GaugeMetricFamily("queuegate_in_flight", "Requests being served, by model.", labels=["model"])
        healthy = GaugeMetricFamily("queuegate_upstream_up", "1 when the upstream takes requests.", labels=["upstream"])
        for model in stats.models:
            in_flight.add_metric([model.name], model.in_service)
            for c in model.classes:
                waiting.add_metric([model.name, c.name], c.waiting)
                oldest.add_metric([model.name, c.name], c.oldest_wait_s)
            for u in model.upstreams:
                healthy.add_metric([u.id], 1.0 if u.state == "ready" and not u.drained else 0.0)
        state = GaugeMetricFamily("queuegate_model_state", "1 for each model's current state.",
                                  labels=["model", "state"])  # fmt: skip
        load = GaugeMetricFamily("queuegate_model_load_seconds", "Learned load time of a model.", labels=["model"])
        for m in fleet.models:
            state.add_metric([m.name, m.state], 1.0)
            if m.load_s is not None:
                load.add_metric([m.name], m.load_s)
        limit = GaugeMetricFamily("queuegate_rate_limit", "A key's or upstream's per-minute limit.",
                                  labels=["limit", "unit"])  # fmt: skip
        used = GaugeMetricFamily("queuegate_rate_limit_used", "What the last 60 s used of the limit.",
                                 labels=["limit", "unit"])  # fmt: skip
        for lim in stats.limits:
            for unit, allowed, spent in (
                ("requests", lim.rpm, lim.requests_used),
                ("tokens", lim.tpm, lim.tokens_used),
            ):
                if allowed is not None:
                    limit.add_metric([lim.name, unit], allowed)
                    used.add_metric([lim.name, unit], spent)
        yield from (waiting, oldest, in_flight, healthy, state, load, limit, used)
        if self._open_requests is not None:
            yield GaugeMetricFamily("queuegate_http_requests_open", "HTTP requests the gateway holds: waiting, "
                                    "being served or ending.", self._open_requests())  # fmt: skip
        yield CounterMetricFamily("queuegate_model_loads", "Models loaded (turned healthy) since start.", fleet.loads)
        yield CounterMetricFamily("queuegate_swaps", "Models stopped to make room for another.", fleet.swaps)
        if self._usage is not None:
            usage = self._usage()
            yield GaugeMetricFamily("queuegate_usage_rows_pending", "Usage rows not committed yet.", usage.pending)
            yield CounterMetricFamily("queuegate_usage_rows_written", "Usage rows committed.", usage.committed)
            yield CounterMetricFamily("queuegate_usage_rows_dropped", "Usage rows lost to a failing disk.",
                                      usage.dropped)  # fmt: skip
            yield CounterMetricFamily("queuegate_usage_write_errors", "Failed usage writes (retried).",
                                      usage.write_errors)  # fmt: skip
            yield CounterMetricFamily("queuegate_usage_late_commits",
                                      "Durable usage: answers sent before their row could be committed in time.",
                                      usage.late_commits)  # fmt: skip
        if self._memory is not None:
            memory = CounterMetricFamily(
                "queuegate_memory_operations", "Chat memory recalls and remembers, by outcome.", labels=["outcome"]
            )
            for outcome, count in sorted(self._memory().items()):
                memory.add_metric([outcome], count)
            yield memory
        if self._nodes is not None:
            up = GaugeMetricFamily("queuegate_node_up", "1 while the node sends heartbeats.", labels=["node"])
            age = GaugeMetricFamily("queuegate_node_heartbeat_age_seconds", "Since the node's last heartbeat.",
                                    labels=["node"])  # fmt: skip
            memory = GaugeMetricFamily("queuegate_node_device_memory_bytes",
                                       "A node's device memory: declared (total, planned use) and measured (GPUs).",
                                       labels=["node", "device", "kind"])  # fmt: skip
            for node in self._nodes():
                up.add_metric([node.name], 0.0 if node.stale else 1.0)
                age.add_metric([node.name], node.last_heartbeat_s)
                for device in node.devices:
                    memory.add_metric([node.name, device.name, "declared_total"], device.memory_gb * 1e9)
                    memory.add_metric([node.name, device.name, "declared_used"], device.used_gb * 1e9)
                for gpu in node.gpus:
                    memory.add_metric([node.name, f"gpu{gpu.index}", "measured_total"], gpu.total_gb * 1e9)
                    memory.add_metric([node.name, f"gpu{gpu.index}", "measured_used"], gpu.used_gb * 1e9)
            yield from (up, age, memory)
        if self._batches is not None:
            outcomes, batches = self._batches()
            lines = CounterMetricFamily("queuegate_batch_lines", "Batch lines finished (ok, error) or tried again "
                                        "(retried), since start.", labels=["outcome"])  # fmt: skip
            for outcome, count in sorted(outcomes.items()):
                lines.add_metric([outcome], count)
            left = GaugeMetricFamily("queuegate_batch_lines_left", "Lines of running batches not finished yet.")
            left.add_metric([], sum(b.total - b.completed - b.failed for b in batches))
            running = GaugeMetricFamily("queuegate_batches_running", "Batch jobs being run (paused ones too).")
            running.add_metric([], len(batches))
            yield from (lines, left, running)
