"""The `queuegate top` application: panels fed by a subscription, keys that act on the selected row.

A worker follows the daemon's updates and reconnects by itself (with a short backoff) when the daemon restarts; the
banner says plainly when it is disconnected. Keys: p preload and e evict (asks first) the model selected in the
models table; c cancels the request selected in the requests table; d drains or undrains the upstream selected
in the upstreams table; b pauses or resumes and x cancels (asks first) the batch selected in the batches table
(tab moves between tables);
? help, q quit.
"""

from __future__ import annotations

import asyncio

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, Label, Static

from queuegate.admin.protocol import (
    AdminError,
    AdminUnavailable,
    Batch,
    Cancel,
    Drain,
    Evict,
    Preload,
    Request,
    Undrain,
)
from queuegate.tui.messages import Disconnected, StatusUpdated
from queuegate.tui.source import StatusSource
from queuegate.tui.widgets import (
    BatchesTable,
    DevicesPanel,
    LimitsTable,
    ModelsTable,
    NodesTable,
    QueuesTable,
    RequestsTable,
    ThroughputPanel,
    UpstreamsTable,
)

_RECONNECT_S = (0.2, 0.5, 1.0, 2.0)  # backoff steps; the last one repeats


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            yield Label("[b]y[/b] yes   [b]n[/b] no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(
                "[b]queuegate top[/b]\n\n"
                "p  preload the selected model (draining what is in its way)\n"
                "e  evict the selected model (a busy one is drained first)\n"
                "c  cancel the selected request (a queued one gets an error, a stream is cut)\n"
                "d  drain the selected upstream (none new; those in flight finish), or undrain it\n"
                "b  pause the selected batch (its lines in flight finish), or resume it\n"
                "x  cancel the selected batch (what ran stays in its output file)\n"
                "?  this help      q  quit\n\n"
                "Tab moves between tables; arrow keys move the selection."
            )


class TopApp(App[None]):
    TITLE = "QueueGate"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("p", "preload", "Preload"),
        Binding("e", "evict", "Evict"),
        Binding("c", "cancel", "Cancel request"),
        Binding("d", "drain", "Drain/undrain"),
        Binding("b", "pause_batch", "Pause/resume batch"),
        Binding("x", "cancel_batch", "Cancel batch"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: StatusSource) -> None:
        super().__init__()
        self.source = source
        self.connected = False
        self.disconnections = 0  # times the daemon went away while attached

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting…", id="banner")
        yield ThroughputPanel(id="throughput")
        yield Static("Models", classes="title")
        yield ModelsTable(id="models")
        yield Static("Devices", classes="title")
        yield DevicesPanel(id="devices")
        yield Static("Queues", classes="title")
        yield QueuesTable(id="queues")
        yield Static("Requests", classes="title", id="requests-title")
        yield RequestsTable(id="requests")
        yield Static("Upstreams", classes="title")
        yield UpstreamsTable(id="upstreams")
        yield Static("Rate limits", classes="title limits")
        yield LimitsTable(id="limits", classes="limits")
        yield Static("Nodes", classes="title nodes")
        yield NodesTable(id="nodes", classes="nodes")
        yield Static("Batches", classes="title batches")
        yield BatchesTable(id="batches", classes="batches")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ModelsTable).focus()
        self.follow()

    @work(exclusive=True)
    async def follow(self) -> None:
        attempt = 0
        while True:
            try:
                async for status in self.source.updates():
                    attempt = 0
                    self.post_message(StatusUpdated(status))
            except AdminUnavailable as exc:
                self.post_message(Disconnected(str(exc)))
            await asyncio.sleep(_RECONNECT_S[min(attempt, len(_RECONNECT_S) - 1)])
            attempt += 1

    def on_status_updated(self, message: StatusUpdated) -> None:
        status = message.status
        self.connected = True
        banner = self.query_one("#banner", Static)
        banner.remove_class("disconnected")
        scheduler = status.scheduler
        banner.update(
            f"{status.listen}   up {status.uptime_s:.0f} s   "
            f"{scheduler.in_service} in service   {scheduler.waiting} waiting (max {scheduler.max_queue})"
        )
        self.query_one(ModelsTable).show(status)
        self.query_one(DevicesPanel).show(status)
        self.query_one(QueuesTable).show(status)
        self.query_one(UpstreamsTable).show(status)
        self.query_one(RequestsTable).show(status)
        self.query_one(LimitsTable).show(status)
        self.query(".limits").set(display=bool(status.scheduler.limits))  # only when some are configured
        self.query_one(NodesTable).show(status)
        self.query(".nodes").set(display=bool(status.nodes))  # only when some registered
        self.query_one(BatchesTable).show(status)
        self.query(".batches").set(display=bool(status.batches))  # only while some run
        self.query_one(ThroughputPanel).show(status)
        shown = len(status.requests)
        more = f" (oldest {shown} of {status.requests_total})" if status.requests_total > shown else ""
        self.query_one("#requests-title", Static).update(f"Requests: {status.requests_total}{more}")

    def on_disconnected(self, message: Disconnected) -> None:
        if self.connected:
            self.disconnections += 1
        self.connected = False
        banner = self.query_one("#banner", Static)
        banner.add_class("disconnected")
        banner.update(f"DISCONNECTED: {message.reason} (retrying)")

    async def action_preload(self) -> None:
        model = self.query_one(ModelsTable).selected_key
        if model is not None:
            await self._command(Preload(model=model))

    def action_evict(self) -> None:
        table = self.query_one(ModelsTable)
        model = table.selected_key
        if model is None:
            return
        if not table.is_launched(model):  # (nothing to ask: there is nothing QueueGate could stop)
            self.notify(f"{model} is not started by QueueGate: nothing to evict", severity="warning")
            return

        async def confirmed(answer: bool | None) -> None:
            if answer:
                await self._command(Evict(model=model))

        self.push_screen(ConfirmScreen(f"Evict {model}? Requests in flight finish first."), confirmed)

    async def action_cancel(self) -> None:
        """Cancel the request selected in the requests table."""
        request_id = self.query_one(RequestsTable).selected_key
        if request_id is not None:
            await self._command(Cancel(request_id=request_id))

    async def action_drain(self) -> None:
        """Drain the upstream selected in the upstreams table, or put a drained one back."""
        table = self.query_one(UpstreamsTable)
        upstream = table.selected_key
        if upstream is not None:
            request = Undrain(upstream=upstream) if table.is_drained(upstream) else Drain(upstream=upstream)
            await self._command(request)

    async def action_pause_batch(self) -> None:
        """Pause the batch selected in the batches table, or resume a paused one."""
        table = self.query_one(BatchesTable)
        batch = table.selected_key
        if batch is not None:
            await self._command(Batch(action="resume" if table.is_paused(batch) else "pause", batch_id=batch))

    def action_cancel_batch(self) -> None:
        batch = self.query_one(BatchesTable).selected_key
        if batch is None:
            return

        async def confirmed(answer: bool | None) -> None:
            if answer:
                await self._command(Batch(action="cancel", batch_id=batch))

        self.push_screen(ConfirmScreen(f"Cancel batch {batch}? Its lines not run go to its error file."), confirmed)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def _command(self, request: Request) -> None:
        try:
            self.notify(await self.source.command(request))
        except (AdminError, AdminUnavailable) as exc:
            self.notify(str(exc), severity="error")
