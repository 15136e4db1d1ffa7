"""The tables of `queuegate top`. Rows are keyed (model, class, upstream), so the cursor stays put on updates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from textual.widgets import DataTable

from queuegate.admin.protocol import DaemonStatus
from queuegate.statistics import model_views, node_devices_text, node_model_text
from queuegate.tui.widgets.progress import bar, progress_text


class _KeyedTable(DataTable[str]):
    """A DataTable refreshed from rows of (key, cells): cells change in place, rows come and go by key."""

    COLUMNS: Sequence[str] = ()

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for column in self.COLUMNS:
            self.add_column(column, key=column)

    def replace_rows(self, rows: Iterable[tuple[str, Sequence[str]]]) -> None:
        wanted = dict(rows)
        for gone in [k for k in self.rows if k.value not in wanted]:
            self.remove_row(gone)
        for key, cells in wanted.items():
            if key in self.rows:
                for column, value in zip(self.COLUMNS, cells, strict=True):
                    self.update_cell(key, column, value, update_width=True)
            else:
                self.add_row(*cells, key=key)

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value


class ModelsTable(_KeyedTable):
    COLUMNS = ("MODEL", "STATE", "DEVICE", "GB", "IN FLIGHT", "WAITING", "IDLE", "LOAD / SWAP")
    _launched: frozenset[str] = frozenset()  # models QueueGate starts and stops, as of the last status shown

    def is_launched(self, model: str) -> bool:
        return model in self._launched

    def show(self, status: DaemonStatus) -> None:
        rows = []
        views = model_views(status.scheduler, status.fleet, status.nodes)
        self._launched = frozenset(view.name for view in views if view.managed)
        for view in views:
            idle = "-" if view.idle_s is None else f"{view.idle_s:.0f} s"
            progress = progress_text(view.progress) if view.progress else (view.reason if view.managed else "")
            cells = (view.name, view.state, view.device or "-", f"{view.memory_gb:g}",
                     str(view.in_service), str(view.waiting), idle, progress)  # fmt: skip
            rows.append((view.name, cells))
        self.replace_rows(rows)


class QueuesTable(_KeyedTable):
    """Per model and class: only the ones with work, so thousands of waiting requests stay a few rows."""

    COLUMNS = ("MODEL", "CLASS", "WAITING", "OLDEST", "IN SERVICE")

    def show(self, status: DaemonStatus) -> None:
        rows = [
            (
                f"{model.name}/{c.name}",
                (model.name, c.name, str(c.waiting), f"{c.oldest_wait_s:.1f} s", str(c.in_service)),
            )
            for model in status.scheduler.models
            for c in model.classes
            if c.waiting or c.in_service
        ]
        self.replace_rows(rows)


class UpstreamsTable(_KeyedTable):
    COLUMNS = ("UPSTREAM", "STATE", "IN FLIGHT", "REASON")
    _drained: frozenset[str] = frozenset()  # as of the last status shown

    def show(self, status: DaemonStatus) -> None:
        upstreams = [u for model in status.scheduler.models for u in model.upstreams]
        self._drained = frozenset(u.id for u in upstreams if u.drained)
        # A launched model not loaded: its server is its fleet state (stopped, starting), not a health check's.
        launched = {m.name: m for m in status.fleet.models if m.managed and m.state != "ready"}
        rows = []
        for model in status.scheduler.models:
            plan = launched.get(model.name)
            for u in model.upstreams:
                state, reason = (plan.state, plan.reason) if plan is not None else (u.state, u.reason)
                state = f"{state} (drained)" if u.drained else state
                rows.append((u.id, (u.id, state, f"{u.in_flight}/{u.capacity}", reason)))
        self.replace_rows(rows)

    def is_drained(self, upstream: str) -> bool:
        return upstream in self._drained


class LimitsTable(_KeyedTable):
    """Each key's and upstream's rate limits: what the last minute used, and how long until there is room."""

    COLUMNS = ("LIMIT", "REQUESTS / MIN", "TOKENS / MIN", "ROOM IN")

    def show(self, status: DaemonStatus) -> None:
        def used(spent: int, allowed: int | None) -> str:
            return "-" if allowed is None else f"{spent}/{allowed}"

        rows = []
        for lim in status.scheduler.limits:
            room = f"{lim.free_in_s:.0f} s" if lim.free_in_s > 0 else "now"
            rows.append((lim.name, (lim.name, used(lim.requests_used, lim.rpm), used(lim.tokens_used, lim.tpm), room)))
        self.replace_rows(rows)


class RequestsTable(_KeyedTable):
    """Requests in progress, oldest first (the daemon caps the list; the title shows the total)."""

    COLUMNS = ("REQUEST", "MODEL", "CLASS", "FLOW", "UPSTREAM", "ELAPSED", "CHUNKS", "TOOLS")

    def show(self, status: DaemonStatus) -> None:
        rows = [
            (
                r.id,
                (
                    r.id,
                    r.model or "-",
                    r.klass,
                    r.flow,
                    r.upstream or "queued",
                    f"{r.elapsed_s:.1f} s",
                    str(r.chunks),
                    r.step or "",
                ),
            )
            for r in status.requests
        ]
        self.replace_rows(rows)


class NodesTable(_KeyedTable):
    """The nodes that registered with the gateway: live or stale, their last heartbeat, what they serve and hold."""

    COLUMNS = ("NODE", "ADDRESS", "STATE", "HEARTBEAT", "MODELS", "DEVICES")

    def show(self, status: DaemonStatus) -> None:
        rows = [
            (
                node.name,
                (
                    node.name,
                    node.address,
                    "stale (last report)" if node.stale else "live",
                    f"{node.last_heartbeat_s:.0f} s ago",
                    ", ".join(node_model_text(m) for m in node.models) or "-",
                    node_devices_text(node) or "-",
                ),
            )
            for node in status.nodes
        ]
        self.replace_rows(rows)


class BatchesTable(_KeyedTable):
    """The batch jobs being run: progress, failures, rate and time left."""

    COLUMNS = ("BATCH", "KEY", "STATUS", "PROGRESS", "FAILED", "IN FLIGHT", "RATE", "LEFT")
    _paused: frozenset[str] = frozenset()  # as of the last status shown

    def show(self, status: DaemonStatus) -> None:
        self._paused = frozenset(b.id for b in status.batches if b.paused)
        rows = []
        for b in status.batches:
            done = b.completed + b.failed
            progress = f"{bar(done / b.total if b.total else 1.0)} {done}/{b.total}"
            left = "-" if b.eta_s is None or b.paused else f"~{b.eta_s:.0f} s"
            state = f"{b.status} (paused)" if b.paused else b.status
            rows.append((b.id, (b.id, b.key or "-", state, progress, str(b.failed), str(b.in_flight),
                                f"{b.rate_per_s:g}/s", left)))  # fmt: skip
        self.replace_rows(rows)

    def is_paused(self, batch: str) -> bool:
        return batch in self._paused
