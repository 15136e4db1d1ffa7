"""The trio side of the scheduler: a request task waits here, inside its own cancel scope, for a slot.

If the task is cancelled (client gone) or times out while queued, its ticket is withdrawn in the same step, so the
slot it would have taken goes to the next request. A granted slot is handed back exactly once via `release`.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from queuegate.errors import ServiceUnavailable
from queuegate.scheduler._core import SchedulerCore, SchedulerStatistics, Ticket, UpstreamState


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class Admission:
    def __init__(self, core: SchedulerCore, *, max_wait_s: float) -> None:
        self._core = core
        self._max_wait_s = max_wait_s
        self._wakeups: dict[Ticket, trio.Event] = {}

    async def acquire(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Ticket:
        """Wait for a slot on one of `model`'s upstreams (not in `exclude`); returns the granted ticket.

        Raises the ticket's rejection (model unavailable, queue full, waited too long).
        """
        ticket = Ticket(model, trio.current_time(), exclude)
        self._wake(self._core.submit(ticket))
        if not ticket.decided:
            wakeup = self._wakeups[ticket] = trio.Event()
            try:
                with trio.move_on_after(self._max_wait_s):
                    await wakeup.wait()
            except BaseException:
                self._wake(self._core.withdraw(ticket))
                raise
            finally:
                del self._wakeups[ticket]
            if not ticket.decided:
                self._wake(self._core.withdraw(ticket))
                raise QueueTimeout(f"waited {self._max_wait_s:g} s in the queue for model {model!r}", retry_after_s=5)
        if ticket.rejection is not None:
            raise ticket.rejection
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give the slot back (idempotent); the next waiting request may get it at once."""
        self._wake(self._core.release(ticket))

    def set_upstream_state(self, upstream_id: str, state: UpstreamState, reason: str) -> None:
        self._wake(self._core.set_upstream_state(upstream_id, state, reason))

    def is_servable(self, model: str) -> bool:
        return self._core.is_servable(model)

    def statistics(self) -> SchedulerStatistics:
        return self._core.statistics(trio.current_time())

    def _wake(self, decided: Iterable[Ticket]) -> None:
        for ticket in decided:
            wakeup = self._wakeups.get(ticket)
            if wakeup is not None:
                wakeup.set()
