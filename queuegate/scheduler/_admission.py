"""The trio side of the scheduler: a request task waits here, inside its own cancel scope, for a slot.

If the task is cancelled (client gone) or times out while queued, its ticket is withdrawn in the same step, so the
slot it would have taken goes to the next request. A granted slot is handed back exactly once via `release`.
`run` is the one background task: it wakes the core when a sticky-chat wait runs out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import trio

from queuegate.errors import ServiceUnavailable
from queuegate.scheduler._core import (
    Demand,
    Policy,
    QueuePosition,
    SchedulerCore,
    SchedulerStatistics,
    Ticket,
    UpstreamState,
)


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class Admission:
    def __init__(self, core: SchedulerCore) -> None:
        """The longest a request may wait is the core's `policy.max_wait_s`."""
        self._core = core
        self._wakeups: dict[Ticket, trio.Event] = {}
        self._timer_changed = trio.Event()
        self._armed_at: float | None = None  # the wake-up time `run` sleeps until
        self._listeners: list[Callable[[], None]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick the core when the earliest sticky-chat wait expires."""
        task_status.started()
        while True:
            wake_at = self._armed_at = self._core.next_wakeup()
            with trio.move_on_at(math.inf if wake_at is None else wake_at):
                await self._timer_changed.wait()
            self._timer_changed = trio.Event()
            self._wake(self._core.tick(trio.current_time()))

    def enqueue(
        self,
        model: str,
        *,
        klass: str,
        flow: str,
        affinity: str | None = None,
        exclude: frozenset[str] = frozenset(),
        key: str | None = None,
        tokens: int = 0,
        since: float | None = None,
        prefer: str | None = None,
    ) -> Ticket:
        """Submit a request; it may be decided at once. Raises QueueFull when there is no room, RateLimited when
        its key's or its upstreams' rate limits would hold it longer than the max wait. `tokens`: its estimated
        size, for tokens-per-minute limits. A request's next round (the tool loop) gives `since`, when the request
        first arrived, and `prefer`, its previous round's upstream: it keeps its place (the core's rule 4b)."""
        ticket = Ticket(model, trio.current_time(), klass, flow, affinity, exclude, key, tokens, since, prefer)
        self._wake(self._core.submit(ticket, ticket.enqueued_at))
        return ticket

    async def wait(self, ticket: Ticket, *, until: float | None = None) -> bool:
        """Wait until the ticket is granted (True), `until` passes (False), or the queue's max wait runs out.

        Raises the ticket's rejection, or QueueTimeout. Cancellation (client gone) withdraws the ticket.
        """
        max_wait_s = self._core.policy.max_wait_s
        deadline = ticket.enqueued_at + max_wait_s
        if not ticket.decided:
            wakeup = self._wakeups[ticket] = trio.Event()
            try:
                with trio.move_on_at(deadline if until is None else min(until, deadline)):
                    await wakeup.wait()
            except BaseException:
                self.withdraw(ticket)
                raise
            finally:
                del self._wakeups[ticket]
        if ticket.rejection is not None:
            raise ticket.rejection
        if ticket.decided:
            return True
        if trio.current_time() < deadline:
            return False
        self.withdraw(ticket)
        raise QueueTimeout(f"waited {max_wait_s:g} s in the queue for model {ticket.model!r}", retry_after_s=5)

    @property
    def max_wait_s(self) -> float:
        """The longest a request may wait in the queue (the policy's, as of now)."""
        return self._core.policy.max_wait_s

    def withdraw(self, ticket: Ticket) -> None:
        """Forget a waiting ticket or give back its slot (idempotent)."""
        self._wake(self._core.withdraw(ticket, trio.current_time()))

    def release(self, ticket: Ticket, tokens: int | None = None) -> None:
        """Give the slot back (idempotent); the next waiting request may get it at once. `tokens`: its real
        usage, when known."""
        self._wake(self._core.release(ticket, trio.current_time(), tokens))

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change to the queue (it must only take note: no awaits, no re-entry)."""
        self._listeners.append(listener)

    def demand(self) -> dict[str, Demand]:
        return self._core.demand()

    def position(self, ticket: Ticket) -> QueuePosition | None:
        return self._core.position(ticket, trio.current_time())

    def set_upstream_state(self, upstream_id: str, state: UpstreamState, reason: str) -> None:
        self._wake(self._core.set_upstream_state(upstream_id, state, reason, trio.current_time()))

    def set_policy(self, policy: Policy) -> None:
        """New policy knobs from a config reload; requests already waiting keep the max wait they started with."""
        self._wake(self._core.set_policy(policy, trio.current_time()))

    def set_drained(self, upstream_id: str, drained: bool) -> None:
        """KeyError: no such upstream."""
        self._wake(self._core.set_drained(upstream_id, drained, trio.current_time()))

    def set_paused(self, klass: str, paused: bool) -> None:
        """ValueError: no such class."""
        self._wake(self._core.set_paused(klass, paused, trio.current_time()))

    def add_upstream(self, upstream_id: str, model: str, capacity: int) -> None:
        """An upstream joins at runtime (see `SchedulerCore.add_upstream`)."""
        self._wake(self._core.add_upstream(upstream_id, model, capacity, trio.current_time()))

    def replace_upstream(self, upstream_id: str, capacity: int) -> None:
        """The same upstream, changed; its requests stay (see `SchedulerCore.replace_upstream`)."""
        self._wake(self._core.replace_upstream(upstream_id, capacity, trio.current_time()))

    def remove_upstream(self, upstream_id: str) -> None:
        """An upstream leaves at runtime; its requests in flight finish (see `SchedulerCore.remove_upstream`)."""
        self._wake(self._core.remove_upstream(upstream_id, trio.current_time()))

    def key_limit_headers(self, key: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for a key with rpm/tpm limits, as its windows stand now."""
        return self._core.key_limit_headers(key, trio.current_time())

    def set_upstream_load_cost(self, upstream_id: str, cost: int) -> None:
        """Its node reports whether its model is loaded (see SchedulerCore.set_upstream_load_cost)."""
        self._core.set_upstream_load_cost(upstream_id, cost)

    def service_s(self, model: str) -> float | None:
        """How long a request of `model` holds its slot, on average (None: not known yet)."""
        return self._core.service_s(model)

    def serving(self, model: str) -> bool:
        """Whether the model has an upstream taking requests now (no load to wait for)."""
        return self._core.serving(model)

    def statistics(self) -> SchedulerStatistics:
        return self._core.statistics(trio.current_time())

    def _wake(self, decided: Iterable[Ticket]) -> None:
        for ticket in decided:
            wakeup = self._wakeups.get(ticket)
            if wakeup is not None:
                wakeup.set()
        if self._core.next_wakeup() != self._armed_at:
            self._timer_changed.set()
        for listener in self._listeners:
            listener()
