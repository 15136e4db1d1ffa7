"""Background health checks: take an upstream out when it fails, put it back when it recovers.

One loop per upstream polls its health URL: every `interval_s` while ready, every `retry_interval_s` while loading or
down. Requests report what they saw: `report_failure` (it cannot be reached) takes the upstream out at once and
re-checks it straight away instead of waiting for the next poll; `report_not_ready` (it answered 503) holds it out
until a check after the delay the request was told to wait. The node registry starts and stops watching the
upstreams nodes register (`watch`, `unwatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import trio

from queuegate.fleet.catalog import Catalog, Upstream
from queuegate.scheduler import UpstreamState

log = logging.getLogger("queuegate.health")

StateSink = Callable[[str, UpstreamState, str], None]


@dataclass(eq=False)
class _Watcher:
    """One upstream's watch: its task's scope, and what it knows. Replaced or removed, it reports nothing more."""

    upstream: Upstream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    recheck: trio.Event = field(default_factory=trio.Event)
    state: UpstreamState | None = None
    hold_until: float | None = None  # it answered 503: no check before then


class HealthMonitor:
    def __init__(
        self,
        catalog: Catalog,
        client: httpx.AsyncClient,
        on_state: StateSink,
        *,
        interval_s: float,
        timeout_s: float,
        retry_interval_s: float = 1.0,
    ) -> None:
        self._catalog = catalog
        # Upstreams of managed models (launcher = process or docker) are watched by the fleet instead.
        self._upstreams = [u for u in catalog.upstreams.values() if catalog.models[u.model].launch is None]
        self._client = client
        self._on_state = on_state
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._retry_interval_s = min(retry_interval_s, interval_s)
        self._nursery: trio.Nursery | None = None
        self._watching: dict[str, _Watcher] = {}  # by upstream id: the one watch that may report

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every upstream once (concurrently), report ready, then keep watching until cancelled."""
        async with trio.open_nursery() as nursery:
            first = [self._watching.setdefault(u.id, _Watcher(u)) for u in self._upstreams]
            async with trio.open_nursery() as first_round:
                for watcher in first:
                    first_round.start_soon(self._check, watcher)
            self._nursery = nursery
            for watcher in first:
                nursery.start_soon(self._watch, watcher, False)
            task_status.started()
            await trio.sleep_forever()  # (open for the upstreams nodes and reloads add, even when there is none yet)

    def watch(self, upstream: Upstream) -> None:
        """Start watching an upstream added at runtime (a node's, a reload's): checked at once, then as any other."""
        assert self._nursery is not None, "watch() after run() started"
        self.unwatch(upstream.id)
        self._watching[upstream.id] = watcher = _Watcher(upstream)
        self._nursery.start_soon(self._watch, watcher, True)

    def unwatch(self, upstream_id: str) -> None:
        """Stop watching an upstream (its node is stale or gone, a reload removed it); its state is the caller's."""
        watcher = self._watching.pop(upstream_id, None)
        if watcher is not None:
            watcher.scope.cancel()

    def report_failure(self, upstream: Upstream, reason: str) -> None:
        """A request could not reach `upstream`: take it out now and re-check it at once."""
        watcher = self._watching.get(upstream.id)
        if watcher is None:
            return  # (no longer watched: its node is stale or gone)
        self._set(watcher, UpstreamState.DOWN, reason)
        watcher.recheck.set()

    def report_not_ready(self, upstream: Upstream, reason: str, retry_in_s: float) -> None:
        """A request got a 503 from `upstream`: requests wait for it (not down) until a check in `retry_in_s`."""
        watcher = self._watching.get(upstream.id)
        if watcher is None:
            return
        self._set(watcher, UpstreamState.LOADING, reason)
        watcher.hold_until = trio.current_time() + retry_in_s
        watcher.recheck.set()

    async def _watch(self, watcher: _Watcher, check_first: bool) -> None:
        """Watch until unwatched (the scope is cancelled, and the watcher is not current any more)."""
        with watcher.scope:
            if check_first:
                await self._check(watcher)
            while self._watching.get(watcher.upstream.id) is watcher:
                ready = watcher.state is UpstreamState.READY
                if watcher.upstream.health_url is None and ready:
                    await watcher.recheck.wait()  # nothing to poll: only a report wakes it
                else:
                    with trio.move_on_after(self._interval_s if ready else self._retry_interval_s):
                        await watcher.recheck.wait()
                watcher.recheck = trio.Event()
                if watcher.hold_until is not None:
                    hold_until, watcher.hold_until = watcher.hold_until, None
                    await trio.sleep_until(hold_until)
                await self._check(watcher)

    async def _check(self, watcher: _Watcher) -> None:
        upstream = watcher.upstream
        if upstream.health_url is None:
            self._set(watcher, UpstreamState.READY, "no health check configured")
            return
        state, reason = await probe_health(self._client, upstream, self._timeout_s)
        self._set(watcher, state, reason)

    def _set(self, watcher: _Watcher, state: UpstreamState, reason: str) -> None:
        upstream = watcher.upstream
        if self._watching.get(upstream.id) is not watcher:
            return  # a check that ended just as its upstream was unwatched (or replaced): not news
        previous, watcher.state = watcher.state, state
        if previous is not state:
            level = logging.INFO if state is UpstreamState.READY else logging.WARNING
            fields = {"upstream": upstream.id, "url": upstream.display_url, "state": state.value, "reason": reason}
            log.log(level, "upstream state", extra={"fields": fields})
        self._on_state(upstream.id, state, reason)


STALL_TICK_S = 0.05
STALLED_RETRIES = 3  # a check that timed out while the gateway's own loop stalled is asked again, this many times


class _LoopLateness:
    """While it watches: how far behind this process's event loop ran, summed over short sleeps (each woken up late
    by as long as the loop was blocked, or busy with a round of other tasks), the sleep under way included."""

    def __init__(self) -> None:
        self._late_s = 0.0
        self._tick_started = trio.current_time()

    def late_s(self) -> float:
        return self._late_s + max(0.0, trio.current_time() - self._tick_started - STALL_TICK_S)

    async def watch(self) -> None:
        while True:
            await trio.sleep(STALL_TICK_S)
            self._late_s, self._tick_started = self.late_s(), trio.current_time()


async def probe_health(client: httpx.AsyncClient, upstream: Upstream, timeout_s: float) -> tuple[UpstreamState, str]:
    """One health check: READY on 200, LOADING on 503, else DOWN; with the reason.

    503 is "up, not ready yet", whatever the kind: llama-server answers 503 "Loading model" on every path until its
    model is loaded (TGI and LocalAI do the same), and a request may wait for that instead of failing at once.

    A timeout while the gateway itself was too busy to read the answer (its event loop ran behind for half the
    timeout or more: thousands of clients hanging up at once take seconds to clean up) says nothing of the upstream:
    the check is asked again, up to STALLED_RETRIES times, before the upstream is called down."""
    assert upstream.health_url is not None
    headers = [(k.decode(), v.decode()) for k, v in upstream.headers if k in (b"authorization", b"host")]
    stalled = 0
    while True:
        lateness = _LoopLateness()
        failure: str | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lateness.watch)
            try:
                with trio.fail_after(timeout_s):
                    response = await client.get(upstream.health_url, headers=headers)
            except (trio.TooSlowError, httpx.TimeoutException):
                response = None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                failure = f"health check failed: {type(exc).__name__}: {exc}"
            late_s = lateness.late_s()
            nursery.cancel_scope.cancel()
        if failure is not None:
            return UpstreamState.DOWN, failure
        if response is not None:
            break
        if late_s < timeout_s / 2:
            return UpstreamState.DOWN, f"health check timed out after {timeout_s:g} s"
        if stalled == STALLED_RETRIES:
            return UpstreamState.DOWN, (
                f"health check timed out after {timeout_s:g} s, {stalled + 1} times in a row, each time while this "
                f"gateway's event loop ran behind (last by {late_s:.1f} s)"
            )
        stalled += 1
        fields = {"upstream": upstream.id, "loop_late_s": round(late_s, 2), "asked": stalled}
        log.info("health check timed out while the gateway was busy; asking again", extra={"fields": fields})
    if response.status_code == 200:
        return UpstreamState.READY, "ok"
    if response.status_code == 503:
        return UpstreamState.LOADING, f"loading (health answered {response.status_code})"
    return UpstreamState.DOWN, f"health answered {response.status_code}"
