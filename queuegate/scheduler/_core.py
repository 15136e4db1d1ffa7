"""The scheduler's state machine: queues, upstream slots and upstream availability. No I/O, no awaits.

Each method applies one event (a request arrives, leaves, finishes; an upstream changes state) and returns the
tickets it decided (granted a slot or rejected). The trio layer (`_admission.py`) wakes their owners. Reads that gate
a mutation happen in the same call, so no other task can interleave between the check and the change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from queuegate.errors import GatewayError, QueueFull, ServiceUnavailable, UpstreamError


class UpstreamState(enum.Enum):
    READY = "ready"  # serving: its slots may be granted
    LOADING = "loading"  # up but not ready (e.g. llama-server loading a model): requests wait for it
    DOWN = "down"  # unreachable or failing: requests do not wait for it


class ModelUnavailable(ServiceUnavailable):
    code = "model_unavailable"


class NoUpstreamLeft(UpstreamError):
    """Every upstream the request could still use was already tried; the caller reports the last failure."""


@dataclass(slots=True, eq=False)
class Ticket:
    """One request's place in the scheduler. Identity-compared: two requests are never equal."""

    model: str
    enqueued_at: float
    exclude: frozenset[str] = frozenset()
    upstream_id: str | None = None  # set when granted
    rejection: GatewayError | None = None  # set when rejected

    @property
    def decided(self) -> bool:
        return self.upstream_id is not None or self.rejection is not None


@dataclass(slots=True)
class _Upstream:
    id: str
    model: str
    capacity: int
    state: UpstreamState = UpstreamState.LOADING
    reason: str = "not checked yet"
    in_flight: int = 0


@dataclass(slots=True)
class _Model:
    upstreams: list[_Upstream]
    waiting: dict[Ticket, None] = field(default_factory=dict)  # insertion-ordered set: FIFO, O(1) removal
    next_turn: int = 0  # index of the upstream to consider first (round-robin between equally loaded ones)


class UpstreamStatistics(msgspec.Struct, frozen=True):
    id: str
    state: str
    reason: str
    in_flight: int
    capacity: int


class ModelStatistics(msgspec.Struct, frozen=True):
    name: str
    waiting: int
    oldest_wait_s: float
    in_service: int
    upstreams: list[UpstreamStatistics]


class SchedulerStatistics(msgspec.Struct, frozen=True):
    waiting: int
    in_service: int
    max_queue: int
    models: list[ModelStatistics]


class SchedulerCore:
    def __init__(self, upstreams: list[tuple[str, str, int]], *, max_queue: int) -> None:
        """`upstreams`: (upstream id, model name, capacity) for every upstream, in config order."""
        self.max_queue = max_queue
        self._upstreams: dict[str, _Upstream] = {}
        self._models: dict[str, _Model] = {}
        for uid, model, capacity in upstreams:
            slot = _Upstream(uid, model, capacity)
            self._upstreams[uid] = slot
            self._models.setdefault(model, _Model([])).upstreams.append(slot)
        self._waiting = 0
        self._in_service = 0

    # -- events -------------------------------------------------------------------------------------------------

    def submit(self, ticket: Ticket) -> list[Ticket]:
        """A request arrives. Granted or rejected at once when possible, else queued (or refused: queue full)."""
        model = self._models[ticket.model]
        if self._grant_or_reject(model, ticket):
            return [ticket]
        if self._waiting >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later", retry_after_s=1)
        model.waiting[ticket] = None
        self._waiting += 1
        return []

    def withdraw(self, ticket: Ticket) -> list[Ticket]:
        """The request's owner is gone (disconnect, timeout): forget it, or give back the slot it was granted."""
        if ticket.upstream_id is not None:
            return self.release(ticket)
        waiting = self._models[ticket.model].waiting
        if ticket in waiting:
            del waiting[ticket]
            self._waiting -= 1
        return []

    def release(self, ticket: Ticket) -> list[Ticket]:
        """A granted request finished with its upstream slot (idempotent)."""
        uid = ticket.upstream_id
        if uid is None:
            return []
        ticket.upstream_id = None
        slot = self._upstreams[uid]
        slot.in_flight -= 1
        self._in_service -= 1
        return self._dispatch(self._models[slot.model])

    def set_upstream_state(self, upstream_id: str, state: UpstreamState, reason: str) -> list[Ticket]:
        slot = self._upstreams[upstream_id]
        if slot.state is state and slot.reason == reason:
            return []
        slot.state, slot.reason = state, reason
        return self._dispatch(self._models[slot.model])

    # -- decisions ----------------------------------------------------------------------------------------------

    def _dispatch(self, model: _Model) -> list[Ticket]:
        decided = []
        for ticket in list(model.waiting):
            if self._grant_or_reject(model, ticket):
                del model.waiting[ticket]
                self._waiting -= 1
                decided.append(ticket)
        return decided

    def _grant_or_reject(self, model: _Model, ticket: Ticket) -> bool:
        """Give the ticket the least-loaded usable slot, or reject it if nothing it may use can come back."""
        best: _Upstream | None = None
        usable = False
        # Start after the last upstream granted, so equally loaded upstreams take turns.
        count = len(model.upstreams)
        for i in range(count):
            slot = model.upstreams[(model.next_turn + i) % count]
            if slot.id in ticket.exclude or slot.state is UpstreamState.DOWN:
                continue
            usable = True
            free = slot.state is UpstreamState.READY and slot.in_flight < slot.capacity
            # Least loaded relative to capacity: in_flight/capacity compared without division.
            if free and (best is None or slot.in_flight * best.capacity < best.in_flight * slot.capacity):
                best = slot
        if best is not None:
            model.next_turn = (model.upstreams.index(best) + 1) % count
            best.in_flight += 1
            self._in_service += 1
            ticket.upstream_id = best.id
            return True
        if usable:
            return False
        ticket.rejection = self._unavailable(model, ticket)
        return True

    def _unavailable(self, model: _Model, ticket: Ticket) -> GatewayError:
        if any(slot.id in ticket.exclude for slot in model.upstreams):
            return NoUpstreamLeft(f"model {ticket.model!r}: every upstream failed")
        reasons = "; ".join(f"{slot.id}: {slot.reason}" for slot in model.upstreams)
        return ModelUnavailable(f"model {ticket.model!r} is unavailable: {reasons}", retry_after_s=5)

    # -- observation --------------------------------------------------------------------------------------------

    def is_servable(self, model: str) -> bool:
        return any(slot.state is UpstreamState.READY for slot in self._models[model].upstreams)

    def statistics(self, now: float) -> SchedulerStatistics:
        models = []
        for name, model in self._models.items():
            oldest = next(iter(model.waiting), None)
            models.append(
                ModelStatistics(
                    name=name,
                    waiting=len(model.waiting),
                    oldest_wait_s=round(now - oldest.enqueued_at, 3) if oldest else 0.0,
                    in_service=sum(slot.in_flight for slot in model.upstreams),
                    upstreams=[
                        UpstreamStatistics(s.id, s.state.value, s.reason, s.in_flight, s.capacity)
                        for s in model.upstreams
                    ],
                )
            )
        return SchedulerStatistics(self._waiting, self._in_service, self.max_queue, models)
