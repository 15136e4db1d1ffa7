"""The fleet: carries out the planner's decisions for managed models and reports back what happened.

It is the only component that launches or stops model servers. Its loop re-plans whenever the queue changes (the
scheduler calls `notify`) or a planner deadline passes; each launched model gets its own task and cancel scope:
launch, poll health at a fine interval until it answers (so the first request goes out within one poll of the
server turning healthy), then watch it. Halting a model cancels that scope; the launcher stops the server.
Every planner state change is passed on: to the scheduler (may this model's upstream take requests?), to the log,
and to subscribers of `events`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import httpx
import trio

from queuegate.fleet.catalog import Catalog, Upstream
from queuegate.fleet.health import probe_health
from queuegate.fleet.launchers import Launcher, LaunchFailed
from queuegate.fleet.planner import (
    FleetPlanner,
    FleetStatistics,
    Halt,
    Launch,
    ModelState,
    PlannerPolicy,
    Transition,
)
from queuegate.scheduler import Admission, UpstreamState
from queuegate.statistics import LoadOutlook

log = logging.getLogger("queuegate.fleet")

# How a planner state shows to the scheduler: only a ready model takes requests; a failed one refuses them.
_UPSTREAM_STATE = {
    ModelState.READY: UpstreamState.READY,
    ModelState.FAILED: UpstreamState.DOWN,
}
_HEALTH_FAILURES_TO_RESTART = 2  # failed checks in a row that make a serving model count as crashed
RECHECK_S = 1.0  # how soon a server that failed a check, or answered a request 503, is checked again
_EVENT_BUFFER = 256


class Fleet:
    def __init__(
        self,
        catalog: Catalog,
        planner: FleetPlanner,
        launchers: Mapping[str, Launcher],
        admission: Admission,
        health_client: httpx.AsyncClient,
        *,
        poll_s: float,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._catalog = catalog
        self._planner = planner
        self._launchers = dict(launchers)
        self._admission = admission
        self._client = health_client
        self._poll_s = poll_s
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}  # the task of each model with a server (maybe) running
        self._recheck: dict[str, trio.Event] = {}
        self._hold_until: dict[str, float] = {}  # models whose server answered a request 503: no check before then
        self._subscribers: set[trio.MemorySendChannel[Transition]] = set()
        self._listeners: list[Callable[[Transition], None]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt servers left running by an earlier daemon, publish every model's initial state, launch the
        preloads, then follow the queue until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._adopt_leftovers()
            self._replan()
            task_status.started()
            while True:
                wake_at = self._planner.next_wakeup()
                with trio.move_on_at(math.inf if wake_at is None else wake_at):
                    await self._changed.wait()
                self._changed = trio.Event()
                self._replan()

    def notify(self) -> None:
        """The queue changed: re-plan soon (on the fleet's own task, never inside the caller)."""
        self._changed.set()

    def preload(self, model: str) -> None:
        """Load `model` now, draining what is in its way. KeyError: unknown; ValueError: not managed."""
        self._planner.preload(self._name(model), trio.current_time())
        self.notify()

    def evict(self, model: str) -> None:
        """Unload `model`; a busy one is drained first. KeyError: unknown; ValueError: not managed."""
        self._planner.evict(self._name(model), trio.current_time())
        self.notify()

    def set_policy(self, policy: PlannerPolicy) -> None:
        """New swap and restart knobs from a config reload; they count from the next decision."""
        self._planner.policy = policy
        self.notify()

    def report_failure(self, upstream: Upstream, reason: str) -> None:
        """A request could not reach a managed model's server: check its health now."""
        recheck = self._recheck.get(upstream.model)
        if recheck is not None:
            recheck.set()

    def report_not_ready(self, upstream: Upstream, reason: str, retry_in_s: float) -> None:
        """A request got a 503 from a managed model's server: it takes no request until a health check passes
        `retry_in_s` from now (its requests wait; the model stays loaded)."""
        recheck = self._recheck.get(upstream.model)
        if recheck is None:
            return  # not running any more: its state says so already
        self._admission.set_upstream_state(upstream.id, UpstreamState.LOADING, reason)
        self._hold_until[upstream.model] = trio.current_time() + retry_in_s
        recheck.set()

    def load_outlook(self, model: str) -> LoadOutlook | None:
        """What a queued request for `model` waits for besides the queue (None: nothing, it serves): the phase, the
        learned time left (a victim still draining counts one of its requests' time, `drain_s`), or on a first load
        its `startup_timeout_s` as an upper bound."""
        progress = self._planner.load_outlook(model, trio.current_time())
        if progress is None:
            return None
        eta = progress.eta_s
        draining = self._planner.draining_for(model)
        if eta is not None and draining is not None:
            eta += self._admission.service_s(draining) or 0.0
        spec = self._catalog.models.get(model)
        bound = spec.launch.startup_timeout_s if spec is not None and spec.launch is not None else None
        return LoadOutlook(progress.phase, eta, bound if eta is None else None)

    def statistics(self) -> FleetStatistics:
        return self._planner.statistics(trio.current_time())

    def launch_history(self, model: str) -> list[tuple[str, float]]:
        """The launcher's own timeline for `model`: ("spawning" | "exited", trio time)."""
        return list(self._launchers[model].history)

    def add_listener(self, listener: Callable[[Transition], None]) -> None:
        """Call `listener(transition)` on every model state change (it must only take note: no awaits)."""
        self._listeners.append(listener)

    @asynccontextmanager
    async def events(self) -> AsyncIterator[trio.MemoryReceiveChannel[Transition]]:
        """Every model state change from now on. A subscriber that falls behind loses the oldest events."""
        send, receive = trio.open_memory_channel[Transition](_EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    async def _adopt_leftovers(self) -> None:
        """Servers already running at start-up (a daemon that was killed could not stop its containers): take over
        those that fit on their devices, in config order; stop the rest, so no device is overcommitted."""
        found: dict[str, bool] = {}

        async def look(name: str, launcher: Launcher) -> None:
            try:
                found[name] = await launcher.find_leftover()
            except LaunchFailed as exc:
                log.warning("cannot check for a leftover server", extra={"fields": {"model": name, "error": str(exc)}})

        async with trio.open_nursery() as lookups:
            for name, launcher in self._launchers.items():
                lookups.start_soon(look, name, launcher)
        for name in self._launchers:
            if not found.get(name):
                continue
            fields = {"model": name}
            if self._planner.adopt(name, trio.current_time()):
                log.info("adopting a server left running by an earlier QueueGate", extra={"fields": fields})
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, name)
            else:
                log.warning("stopping a leftover server: it does not fit on its device", extra={"fields": fields})
                await self._launchers[name].stop_leftover()

    # -- planning -----------------------------------------------------------------------------------------------

    def _replan(self) -> None:
        assert self._nursery is not None
        effects = self._planner.plan(trio.current_time(), self._admission.demand())
        self._publish()
        for effect in effects:
            if isinstance(effect, Launch):
                self._nursery.start_soon(self._serve, effect.model)
            elif isinstance(effect, Halt):
                scope = self._scopes.get(effect.model)
                if scope is not None:
                    scope.cancel()

    def _publish(self) -> None:
        transitions = self._planner.take_transitions()
        # The scheduler takes each model's last state only: a model that turned ready and was stopped in the same
        # plan must not look ready for an instant (requests would be granted to a server being stopped).
        last = {t.model: t for t in transitions}
        for transition in last.values():
            model = self._catalog.models[transition.model]  # always a managed one: external models never move
            state = _UPSTREAM_STATE.get(transition.state, UpstreamState.LOADING)
            name = transition.state.value
            reason = name if transition.reason == name else f"{name}: {transition.reason}"
            for upstream in model.upstreams:
                self._admission.set_upstream_state(upstream.id, state, reason)
        for transition in transitions:
            level = logging.WARNING if transition.crashed else logging.INFO
            fields = {"model": transition.model, "state": transition.state.value, "reason": transition.reason}
            log.log(level, "model state", extra={"fields": fields})
            for listener in self._listeners:
                listener(transition)
            for subscriber in list(self._subscribers):
                try:
                    subscriber.send_nowait(transition)
                except trio.WouldBlock:
                    pass  # a slow subscriber misses events, never the fleet
                except trio.BrokenResourceError:
                    self._subscribers.discard(subscriber)

    def _report(self, method: str, model: str, *args: str) -> None:
        getattr(self._planner, method)(model, trio.current_time(), *args)
        self._replan()

    def _name(self, model: str) -> str:
        spec = self._catalog.resolve(model)
        if spec is None:
            raise KeyError(f"no model {model!r}")
        return spec.name

    # -- one model's server ---------------------------------------------------------------------------------------

    async def _serve(self, model: str) -> None:
        """Launch, wait for health, watch; until halted (scope cancelled) or the server fails."""
        failure: str | None = None
        upstream = self._catalog.models[model].upstreams[0]
        with trio.CancelScope() as scope:
            self._scopes[model] = scope
            self._recheck[model] = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._launchers[model].run)
                    self._report("launched", model)
                    await self._wait_healthy(model, upstream)
                    self._report("ready", model)
                    await self._watch(model, upstream)
            except* LaunchFailed as group:
                failure = str(group.exceptions[0])
        del self._scopes[model]
        self._recheck.pop(model, None)
        self._hold_until.pop(model, None)
        if failure is None:
            self._report("stopped", model)
        else:
            log.warning("model server failed", extra={"fields": {"model": model, "error": failure}})
            self._report("exited", model, failure)

    async def _wait_healthy(self, model: str, upstream: Upstream) -> None:
        spec = self._catalog.models[model]
        assert spec.launch is not None
        if upstream.health_url is None:
            return
        timeout_s = spec.launch.startup_timeout_s
        reason = "no answer yet"
        with trio.move_on_after(timeout_s):
            while True:
                state, reason = await probe_health(self._client, upstream, self._timeout_s)
                if state is UpstreamState.READY:
                    return
                await trio.sleep(self._poll_s)
        raise LaunchFailed(f"{model} was not healthy within {timeout_s:g} s (last check: {reason})")

    async def _watch(self, model: str, upstream: Upstream) -> None:
        """Check health every `interval_s` (or at once when a request failed to connect); raise when it is down
        twice in a row. After a request's 503, check only once its delay is over, and let requests in again when a
        check passes. A server that says it is loading (503) is alive: it is checked again soon, not restarted."""
        failures = 0
        held = False  # a 503 took it out of service: put it back at the next passing check
        while True:
            soon = held or failures
            with trio.move_on_after(min(self._interval_s, RECHECK_S) if soon else self._interval_s):
                await self._recheck[model].wait()
            self._recheck[model] = trio.Event()
            hold_until = self._hold_until.pop(model, None)
            if hold_until is not None:
                held = True
                await trio.sleep_until(hold_until)
            if upstream.health_url is None:
                state, reason = UpstreamState.READY, "no health check configured"
            else:
                state, reason = await probe_health(self._client, upstream, self._timeout_s)
            failures = failures + 1 if state is UpstreamState.DOWN else 0
            if failures >= _HEALTH_FAILURES_TO_RESTART:
                raise LaunchFailed(f"{model} failed its health check {failures} times in a row: {reason}")
            if held and state is UpstreamState.READY:
                held = False
                planned, why = self._planner.state(model)  # back to what the planner says (ready, or draining)
                serving = _UPSTREAM_STATE.get(planned, UpstreamState.LOADING)
                self._admission.set_upstream_state(upstream.id, serving, why)
