"""The scheduler's state machine: queues, flows, upstream slots and sticky chats. No I/O, no awaits, no clock.

Each method applies one event at time `now` (a request arrives, leaves, finishes; an upstream changes state; time
passes) and returns the tickets it decided (granted a slot or rejected). The trio layer (`_admission.py`) wakes their
owners. Reads that gate a mutation happen in the same call, so no other task can interleave.

Policy, per model, whenever a slot is free:
1. Classes in priority order (default user > agent > batch): the highest class with waiting work goes first...
2. ...except that a lower-class request that has waited `aging_s` or longer is served before every higher-class
   request that arrived after it (oldest such request first). This bounds starvation.
3. Inside a class, flows (API key, else session, else client address) take turns round-robin; FIFO inside a flow.
   A flow with 500 waiting requests delays another flow's single request by at most one slot per flow ahead of it.
4. A request of a sticky chat prefers the upstream its chat last used (while the mapping is younger than the
   affinity TTL). If that upstream is busy it waits for it at most `affinity_wait_s`, letting others go first,
   then takes any free upstream.
4b. A request's next round (the tool loop: its tools ran, the model is asked again) keeps its place: it goes to the
   front of its class, its aging counts from when the request first arrived, it prefers the upstream of its
   previous round (as a sticky chat does), and a full queue does not refuse it (it was admitted once).
5. Operators may drain an upstream (it takes no new requests; those in flight finish) or pause a class (its
   requests stay queued) through the admin socket.
6. Rate limits (`_limits.py`) hold requests rather than fail them: a key over its rpm/tpm lets the next flow go;
   an upstream over its own rpm/tpm takes nothing until its window has room, and the model is woken then.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from queuegate.errors import GatewayError, QueueFull, ServiceUnavailable, UpstreamError
from queuegate.scheduler._limits import Charge, RateLimit, RateLimiter
from queuegate.statistics import (
    ClassStatistics,
    FlowStatistics,
    ModelStatistics,
    SchedulerStatistics,
    UpstreamStatistics,
)
from queuegate.vocabulary import CLASSES

_K = TypeVar("_K")


class UpstreamState(enum.Enum):
    READY = "ready"  # serving: its slots may be granted
    LOADING = "loading"  # up but not ready (e.g. llama-server loading a model): requests wait for it
    DOWN = "down"  # unreachable or failing: requests do not wait for it


class ModelUnavailable(ServiceUnavailable):
    code = "model_unavailable"


class RateLimited(QueueFull):
    code = "rate_limit_exceeded"


class NoUpstreamLeft(UpstreamError):
    """Every upstream the request could still use was already tried; the caller reports the last failure."""


@dataclass(slots=True, eq=False)
class Ticket:
    """One request's place in the scheduler. Identity-compared: two requests are never equal."""

    model: str
    enqueued_at: float
    klass: str = CLASSES[0]
    flow: str = ""
    affinity: str | None = None  # sticky-chat key
    exclude: frozenset[str] = frozenset()  # upstreams already tried by this request
    key: str | None = None  # the API key's name, for its rate limits
    tokens: int = 0  # estimated tokens (prompt + max_tokens), for tokens-per-minute limits
    since: float | None = None  # a later round of one request (rule 4b): when the request first arrived
    prefer: str | None = None  # the upstream its previous round used (rule 4b)
    upstream_id: str | None = None  # set when granted
    rejection: GatewayError | None = None  # set when rejected
    granted_at: float = 0.0
    charges: list[Charge] = field(default_factory=list)  # its token charges, corrected to its usage on release

    @property
    def decided(self) -> bool:
        return self.upstream_id is not None or self.rejection is not None

    @property
    def arrived_at(self) -> float:
        """Where its place and its aging count from: when its request first arrived."""
        return self.enqueued_at if self.since is None else self.since


@dataclass(frozen=True, slots=True)
class Demand:
    """What one model's queue asks of the fleet: the planner loads, keeps and swaps models by it."""

    waiting: int = 0
    in_flight: int = 0
    top_rank: int | None = None  # the best class among waiting requests (0 = the first class)
    oldest_at: float | None = None  # when the oldest waiting request arrived
    serving_rank: int | None = None  # the best class among requests in flight


@dataclass(frozen=True, slots=True)
class Policy:
    classes: Sequence[str] = CLASSES
    aging_s: float = 30.0
    max_queue: int = 256
    model_max_queue: dict[str, int] = field(default_factory=dict)  # optional per-model bounds
    affinity_ttl_s: float = 600.0
    affinity_wait_s: float = 0.5
    affinity_max_entries: int = 10_000
    key_limits: dict[str, RateLimit] = field(default_factory=dict)  # per API key name (absent: no limit)
    upstream_limits: dict[str, RateLimit] = field(default_factory=dict)  # per upstream id (cloud APIs' own limits)
    max_wait_s: float = 600.0  # the longest a request waits (503), or its key's limit may hold it (else 429)


@dataclass(slots=True, eq=False)
class _Upstream:
    id: str
    model: str
    capacity: int
    state: UpstreamState = UpstreamState.LOADING
    reason: str = "not checked yet"
    in_flight: int = 0
    drained: bool = False  # an operator took it out: no new requests, those in flight finish
    left: bool = False  # removed at runtime (its node is gone): kept only until its requests in flight are done
    load_cost: int = 0  # as its node reports its model: 0 loaded (or not said), 1 needs a load, 2 failed there

    @property
    def cost(self) -> int:
        """Its load cost now: one being loaded for the requests it already has costs nothing more."""
        return 0 if self.load_cost == 1 and self.in_flight > 0 else self.load_cost

    @property
    def takes_requests(self) -> bool:
        return self.state is UpstreamState.READY and not self.drained and self.in_flight < self.capacity


@dataclass(slots=True)
class _ClassQueue:
    name: str
    flows: dict[str, dict[Ticket, None]] = field(default_factory=dict)  # rotation order; each flow FIFO
    arrivals: dict[Ticket, None] = field(default_factory=dict)  # every waiting ticket, oldest first


@dataclass(slots=True, eq=False)
class _Model:
    name: str
    upstreams: list[_Upstream]
    classes: list[_ClassQueue]
    max_queue: int | None
    waiting: int = 0
    next_turn: int = 0  # index of the upstream to consider first (round-robin between equally loaded ones)
    service_s: float | None = None  # moving average of how long a request holds a slot
    in_service_by_class: Counter[str] = field(default_factory=Counter)
    in_service_by_flow: Counter[str] = field(default_factory=Counter)


class QueuePosition(msgspec.Struct, frozen=True):
    position: int  # 1 = next to be served
    eta_s: float | None  # None until the model has served a request (and no rate limit holds it)
    rate_limited: bool = False  # its key's or its upstreams' rate limit holds it (eta_s says until about when)


FLOW_STATISTICS_LIMIT = 50
_SERVICE_SMOOTHING = 0.2  # weight of the newest sample in the moving average of service time


class SchedulerCore:
    def __init__(self, upstreams: list[tuple[str, str, int]], policy: Policy | None = None) -> None:
        """`upstreams`: (upstream id, model name, capacity) for every upstream, in config order."""
        self.policy = policy or Policy()
        self.max_queue = self.policy.max_queue
        self._rank = {name: i for i, name in enumerate(self.policy.classes)}
        self._upstreams: dict[str, _Upstream] = {}  # (one that left stays until its requests in flight are done)
        self._models: dict[str, _Model] = {}
        for uid, model, capacity in upstreams:
            self._join(uid, model, capacity)
        self._waiting = 0
        self._in_service = 0
        # Sticky chats: (model, key) -> (upstream id, last used), least recently used first.
        self._affinity: dict[tuple[str, str], tuple[str, float]] = {}
        self._holds: dict[Ticket, float] = {}  # tickets waiting for their sticky upstream or key limit -> until when
        self._model_wakeups: dict[str, float] = {}  # models whose upstreams are all at their rate limit -> until when
        self._paused: set[str] = set()  # classes an operator paused: their requests wait
        self._key_limits: dict[str | None, RateLimiter] = {
            name: RateLimiter(limit) for name, limit in self.policy.key_limits.items() if limit
        }
        self._upstream_limits = {uid: RateLimiter(lim) for uid, lim in self.policy.upstream_limits.items() if lim}
        self._waiting_by_key: Counter[str | None] = Counter()  # waiting requests per rate-limited key

    # -- events -------------------------------------------------------------------------------------------------

    def submit(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A request arrives: granted or rejected at once when possible, else queued (or refused: queue full)."""
        if ticket.klass not in self._rank:
            raise ValueError(f"unknown class {ticket.klass!r}")
        model = self._models.get(ticket.model)
        if model is None:  # (its last upstream left: a node's model, gone with its node)
            ticket.rejection = ModelUnavailable(f"model {ticket.model!r} has no upstream now", retry_after_s=5)
            return [ticket]
        if not self._usable(model, ticket):
            ticket.rejection = self._unavailable(model, ticket)
            return [ticket]
        model_full = model.max_queue is not None and model.waiting >= model.max_queue
        # When full, only a request that would be served at once (or a next round: rule 4b) may still come in.
        full = self._waiting >= self.max_queue or model_full
        if full and ticket.since is None and (model.waiting or not self._has_free_slot(model)):
            limit = model.max_queue if model_full else self.max_queue
            raise QueueFull(f"the queue is full ({limit} requests waiting); retry later", retry_after_s=1)
        if ticket.since is None:  # (a later round was admitted once: it waits for room, it is not refused)
            self._refuse_long_rate_wait(model, ticket, now)
        if ticket.key in self._key_limits:
            self._waiting_by_key[ticket.key] += 1
        queue = model.classes[self._rank[ticket.klass]]
        if ticket.since is None:
            queue.flows.setdefault(ticket.flow, {})[ticket] = None
            queue.arrivals[ticket] = None
        else:  # a next round: the front of its class (its flow's turn first, and it first in its flow)
            own = {ticket: None, **queue.flows.pop(ticket.flow, {})}
            queue.flows = {ticket.flow: own, **queue.flows}
            # Arrivals stay oldest first (aging reads the oldest): it goes where its request's arrival puts it.
            waiting = list(queue.arrivals)
            at = next((i for i, t in enumerate(waiting) if t.arrived_at > ticket.arrived_at), len(waiting))
            queue.arrivals = dict.fromkeys([*waiting[:at], ticket, *waiting[at:]])
        model.waiting += 1
        self._waiting += 1
        return self._dispatch(model, now)

    def withdraw(self, ticket: Ticket, now: float) -> list[Ticket]:
        """The request's owner is gone (disconnect, timeout): forget it, or give back the slot it was granted."""
        if ticket.upstream_id is not None:
            return self.release(ticket, now)
        model = self._models.get(ticket.model)
        if model is not None and ticket in model.classes[self._rank[ticket.klass]].arrivals:
            self._unqueue(model, ticket, rotate=False)
            return self._dispatch(model, now)  # if it held its flow for a sticky upstream, the next one may go
        return []

    def release(self, ticket: Ticket, now: float, tokens: int | None = None) -> list[Ticket]:
        """A granted request finished with its upstream slot (idempotent). `tokens`: what it really used, which
        replaces the estimate its tokens-per-minute limits were charged."""
        if tokens is not None:
            for charge in ticket.charges:
                charge.correct(tokens)
        uid = ticket.upstream_id
        if uid is None:
            return []
        ticket.upstream_id = None
        slot = self._upstreams[uid]
        model = self._models[slot.model]
        slot.in_flight -= 1
        if slot.left and not slot.in_flight:
            del self._upstreams[uid]
        self._in_service -= 1
        _decrement(model.in_service_by_class, ticket.klass)
        _decrement(model.in_service_by_flow, ticket.flow)
        held = now - ticket.granted_at
        model.service_s = (
            held if model.service_s is None else model.service_s + _SERVICE_SMOOTHING * (held - model.service_s)
        )
        if ticket.affinity is not None and len(model.upstreams) > 1 and not slot.left:
            self._remember(ticket.model, ticket.affinity, uid, now)
        decided = self._dispatch(model, now)
        self._forget_if_empty(model)
        return decided

    def add_upstream(self, upstream_id: str, model: str, capacity: int, now: float) -> list[Ticket]:
        """An upstream joins at runtime (a node registered it), loading until its health is known; a model new to
        the scheduler gets its queues; one that left and still has requests in flight comes back with them.
        ValueError: the id is taken."""
        slot = self._upstreams.get(upstream_id)
        if slot is None:
            return self._dispatch(self._join(upstream_id, model, capacity), now)
        if not slot.left or slot.model != model:
            raise ValueError(f"upstream {upstream_id!r} exists already")
        slot.left, slot.capacity = False, capacity
        slot.state, slot.reason = UpstreamState.LOADING, "not checked yet"
        self._models[model].upstreams.append(slot)
        return self._dispatch(self._models[model], now)

    def replace_upstream(self, upstream_id: str, capacity: int, now: float) -> list[Ticket]:
        """An upstream is the same slot at a new address, or with a new key (a node came back, a reload changed
        it): it keeps its requests, in flight and waiting, and takes new ones once checked. KeyError: unknown."""
        slot = self._upstreams[upstream_id]
        if slot.left:
            raise KeyError(upstream_id)
        slot.capacity = capacity
        slot.state, slot.reason = UpstreamState.LOADING, "changed: checking it"
        return self._dispatch(self._models[slot.model], now)

    def remove_upstream(self, upstream_id: str, now: float) -> list[Ticket]:
        """An upstream leaves (its node is gone). Requests in flight on it are not cut: their slots are given back
        as usual. Waiting requests no other upstream can serve are rejected; a model left with no upstream and no
        request is forgotten. KeyError: no such upstream."""
        slot = self._upstreams[upstream_id]
        if slot.left:
            raise KeyError(upstream_id)
        model = self._models[slot.model]
        model.upstreams.remove(slot)
        slot.left = True
        if not slot.in_flight:
            del self._upstreams[upstream_id]
        for key in [key for key, (uid, _) in self._affinity.items() if uid == upstream_id]:
            del self._affinity[key]
        decided = self._reject_unusable(model)
        self._forget_if_empty(model)
        return decided

    def _join(self, upstream_id: str, model: str, capacity: int) -> _Model:
        slot = _Upstream(upstream_id, model, capacity)
        self._upstreams[upstream_id] = slot
        if model not in self._models:
            queues = [_ClassQueue(name) for name in self.policy.classes]
            self._models[model] = _Model(model, [], queues, self.policy.model_max_queue.get(model))
        self._models[model].upstreams.append(slot)
        return self._models[model]

    def _forget_if_empty(self, model: _Model) -> None:
        if not model.upstreams and not model.waiting and not sum(model.in_service_by_class.values()):
            self._models.pop(model.name, None)

    def set_upstream_state(self, upstream_id: str, state: UpstreamState, reason: str, now: float) -> list[Ticket]:
        slot = self._upstreams[upstream_id]
        if slot.state is state and slot.reason == reason:
            return []
        slot.state, slot.reason = state, reason
        model = self._models[slot.model]
        decided = self._reject_unusable(model) if state is UpstreamState.DOWN else []
        return decided + self._dispatch(model, now)

    def key_limit_headers(self, key: str, now: float) -> dict[str, str]:
        """The rate-limit headers of a key with limits (none for a key without)."""
        limiter = self._key_limits.get(key)
        return limiter.headers(now) if limiter is not None else {}

    def set_upstream_load_cost(self, upstream_id: str, cost: int) -> None:
        """What a request costs its node, as it reports its model: 0 loaded, 1 it must load it (maybe swapping another
        out), 2 it failed there. Requests go to the cheapest free upstream first. KeyError: unknown."""
        self._upstreams[upstream_id].load_cost = cost

    def _reject_unusable(self, model: _Model) -> list[Ticket]:
        """Requests that can no longer be served anywhere are told now rather than at their deadline."""
        decided = []
        for queue in model.classes:
            for ticket in [t for t in queue.arrivals if not self._usable(model, t)]:
                self._unqueue(model, ticket, rotate=False)
                ticket.rejection = self._unavailable(model, ticket)
                decided.append(ticket)
        return decided

    def set_policy(self, policy: Policy, now: float) -> list[Ticket]:
        """Take new policy knobs (a config reload). The classes and the keys' rate limits must stay as they are;
        models' queue bounds and upstreams' limits may change (models come and go with a reload): a limit that
        changes starts a new window."""
        fixed = ("classes", "key_limits")
        if any(getattr(policy, name) != getattr(self.policy, name) for name in fixed):
            raise ValueError("classes and keys' rate limits change only with a restart")
        self.policy, self.max_queue = policy, policy.max_queue
        for model in self._models.values():
            model.max_queue = policy.model_max_queue.get(model.name)
        kept = self._upstream_limits
        self._upstream_limits = {
            uid: kept[uid] if uid in kept and kept[uid].limit == limit else RateLimiter(limit)
            for uid, limit in policy.upstream_limits.items()
            if limit
        }
        decided = []
        for model in self._models.values():
            decided += self._dispatch(model, now)  # a shorter sticky wait or aging may let someone go now
        return decided

    def set_drained(self, upstream_id: str, drained: bool, now: float) -> list[Ticket]:
        """An operator takes an upstream out (requests in flight finish; none new) or puts it back."""
        slot = self._upstreams.get(upstream_id)
        if slot is None:
            raise KeyError(
                f"no upstream {upstream_id!r}; upstreams are named <model>#<index> (coder#0) or <model>@<node>"
            )
        slot.drained = drained
        return self._dispatch(self._models[slot.model], now)

    def set_paused(self, klass: str, paused: bool, now: float) -> list[Ticket]:
        """An operator holds a class's waiting requests (they stay queued; max wait still applies) or lets them go."""
        if klass not in self._rank:
            raise ValueError(f"unknown class {klass!r}; the classes are {', '.join(self.policy.classes)}")
        if paused:
            self._paused.add(klass)
            return []
        self._paused.discard(klass)
        decided = []
        for model in self._models.values():
            decided += self._dispatch(model, now)
        return decided

    def tick(self, now: float) -> list[Ticket]:
        """Time passed: requests whose wait for their sticky upstream or a rate limit ran out may now go."""
        expired = {t.model for t, until in self._holds.items() if until <= now}
        expired |= {name for name, until in self._model_wakeups.items() if until <= now}
        decided = []
        for name in expired:
            decided += self._dispatch(self._models[name], now)
        return decided

    def next_wakeup(self) -> float | None:
        """When `tick` may next decide something (the earliest sticky or rate-limit wait expiry), or None."""
        return min((*self._holds.values(), *self._model_wakeups.values()), default=None)

    # -- decisions ----------------------------------------------------------------------------------------------

    def _dispatch(self, model: _Model, now: float) -> list[Ticket]:
        """Fill free slots with waiting requests in policy order."""
        for ticket in [t for t in self._holds if t.model == model.name]:
            del self._holds[ticket]  # decided afresh below
        self._model_wakeups.pop(model.name, None)
        decided = []
        while model.waiting and self._has_free_slot(model):
            placed = False  # stays False when only paused classes or held sticky chats wait
            for ticket in self._candidates(model, now):
                limiter = self._key_limits.get(ticket.key)
                if limiter is not None:
                    allowed_at = limiter.wait_until(ticket.tokens, now, request=ticket.since is None)
                    if allowed_at > now:
                        self._holds[ticket] = allowed_at  # its key's window: others go first
                        continue
                slot = self._choose(model, ticket, now)
                if slot is not None:
                    self._grant(model, ticket, slot, now)
                    decided.append(ticket)
                    placed = True
                    break
            if not placed:
                break
        return decided

    def _candidates(self, model: _Model, now: float) -> Iterator[Ticket]:
        """Waiting tickets in the order the policy serves them (each flow's head only: FIFO inside a flow)."""
        queues = [q for q in model.classes if q.arrivals and q.name not in self._paused]
        if not queues:
            return
        top = queues[0]
        first = next(iter(top.flows.values()))
        normal = next(iter(first))
        aged = sorted(
            (
                oldest
                for q in queues[1:]
                if now - (oldest := next(iter(q.arrivals))).arrived_at >= self.policy.aging_s
                and oldest.arrived_at < normal.arrived_at
            ),
            key=lambda t: t.arrived_at,
        )
        yield from aged
        for queue in queues:
            # The caller stops iterating before it changes any flow, so no copy is needed.
            for flow in queue.flows.values():
                yield next(iter(flow))

    def _choose(self, model: _Model, ticket: Ticket, now: float) -> _Upstream | None:
        """The upstream for this ticket now, or None (nothing free it may use, or it holds for its sticky one)."""
        free = [s for s in model.upstreams if s.takes_requests and s.id not in ticket.exclude]
        free = [s for s in free if self._within_upstream_limit(model, s, ticket, now)]
        if not free:
            return None
        if (ticket.affinity is not None or ticket.prefer is not None) and len(model.upstreams) > 1:
            if ticket.prefer is not None:
                preferred = self._upstreams.get(ticket.prefer)
            else:
                preferred = self._sticky_upstream(ticket.model, ticket.affinity, now)  # type: ignore[arg-type]
            usable = preferred is not None and preferred.id not in ticket.exclude
            if usable and preferred.state is not UpstreamState.DOWN:  # type: ignore[union-attr]
                if preferred in free:
                    return preferred
                until = ticket.enqueued_at + self.policy.affinity_wait_s
                if now < until:
                    self._holds[ticket] = until
                    return None
        # A loaded model before one its node must load (maybe swapping another out) or that failed there; then the
        # least loaded relative to capacity, starting after the last upstream granted, so ties take turns.
        count = len(model.upstreams)
        best: _Upstream | None = None
        for i in range(count):
            slot = model.upstreams[(model.next_turn + i) % count]
            if slot in free and (best is None or _less_busy(slot, best)):
                best = slot
        return best

    def _grant(self, model: _Model, ticket: Ticket, slot: _Upstream, now: float) -> None:
        self._unqueue(model, ticket, rotate=True)
        key_limiter = self._key_limits.get(ticket.key)
        # A later round (rule 4b) is not a new request of its key, but its tokens count; upstreams count every round.
        charges = [
            key_limiter.charge(ticket.tokens, now, request=ticket.since is None) if key_limiter is not None else None,
            limiter.charge(ticket.tokens, now) if (limiter := self._upstream_limits.get(slot.id)) is not None else None,
        ]
        ticket.charges += [charge for charge in charges if charge is not None]
        model.next_turn = (model.upstreams.index(slot) + 1) % len(model.upstreams)
        slot.in_flight += 1
        self._in_service += 1
        model.in_service_by_class[ticket.klass] += 1
        model.in_service_by_flow[ticket.flow] += 1
        ticket.upstream_id = slot.id
        ticket.granted_at = now
        if ticket.affinity is not None and len(model.upstreams) > 1:
            self._remember(ticket.model, ticket.affinity, slot.id, now)

    def _unqueue(self, model: _Model, ticket: Ticket, *, rotate: bool) -> None:
        """Take a ticket out of its class and flow. `rotate`: its flow was served, so it goes to the back."""
        queue = model.classes[self._rank[ticket.klass]]
        del queue.arrivals[ticket]
        flow = queue.flows[ticket.flow]
        del flow[ticket]
        if not flow:
            del queue.flows[ticket.flow]
        elif rotate:
            del queue.flows[ticket.flow]
            queue.flows[ticket.flow] = flow
        self._holds.pop(ticket, None)
        model.waiting -= 1
        self._waiting -= 1
        if ticket.key in self._key_limits:
            _decrement(self._waiting_by_key, ticket.key)

    def _within_upstream_limit(self, model: _Model, slot: _Upstream, ticket: Ticket, now: float) -> bool:
        """Whether the upstream's own rate limit lets this ticket go now; if not, wake the model when it will."""
        limiter = self._upstream_limits.get(slot.id)
        if limiter is None:
            return True
        allowed_at = limiter.wait_until(ticket.tokens, now)
        if allowed_at <= now:
            return True
        self._model_wakeups[model.name] = min(allowed_at, self._model_wakeups.get(model.name, allowed_at))
        return False

    def _refuse_long_rate_wait(self, model: _Model, ticket: Ticket, now: float) -> None:
        """RateLimited (429) when the key's or the model's upstreams' limits would hold this ticket, behind those
        already waiting, longer than the max wait."""
        waits = []
        key_limiter = self._key_limits.get(ticket.key)
        if key_limiter is not None:
            ahead = self._waiting_by_key[ticket.key]
            waits.append((key_limiter.wait_until(ticket.tokens, now, ahead), f"key {ticket.key!r}"))
        limiters = [self._upstream_limits.get(s.id) for s in model.upstreams if s.id not in ticket.exclude]
        if limiters and None not in limiters:  # every upstream it may use is limited
            ahead = model.waiting // len(limiters)
            at = min(lim.wait_until(ticket.tokens, now, ahead) for lim in limiters if lim is not None)
            waits.append((at, f"model {model.name!r}'s upstreams"))
        for at, whose in waits:
            if at - now > self.policy.max_wait_s:
                raise RateLimited(
                    f"{whose} rate limit (requests or tokens per minute) would hold this request longer than the "
                    f"queue's max wait of {self.policy.max_wait_s:g} s",
                    retry_after_s=max(1, round(at - now)),
                )

    def _has_free_slot(self, model: _Model) -> bool:
        return any(s.takes_requests for s in model.upstreams)

    def _usable(self, model: _Model, ticket: Ticket) -> bool:
        """Whether some upstream this ticket may use is up or coming up."""
        return any(s.state is not UpstreamState.DOWN and s.id not in ticket.exclude for s in model.upstreams)

    def _unavailable(self, model: _Model, ticket: Ticket) -> GatewayError:
        if any(slot.id in ticket.exclude for slot in model.upstreams):
            return NoUpstreamLeft(f"model {ticket.model!r}: every upstream failed")
        reasons = "; ".join(f"{slot.id}: {slot.reason}" for slot in model.upstreams) or "it has no upstream now"
        return ModelUnavailable(f"model {ticket.model!r} is unavailable: {reasons}", retry_after_s=5)

    # -- sticky chats -------------------------------------------------------------------------------------------

    def _sticky_upstream(self, model: str, key: str, now: float) -> _Upstream | None:
        entry = self._affinity.get((model, key))
        if entry is None:
            return None
        uid, last_used = entry
        if now - last_used > self.policy.affinity_ttl_s:
            del self._affinity[model, key]
            return None
        return self._upstreams[uid]  # (an upstream that leaves takes its sticky chats with it)

    def _remember(self, model: str, key: str, upstream_id: str, now: float) -> None:
        self._affinity.pop((model, key), None)  # re-insert at the end: most recently used
        self._affinity[model, key] = (upstream_id, now)
        while len(self._affinity) > self.policy.affinity_max_entries:
            del self._affinity[next(iter(self._affinity))]

    # -- observation --------------------------------------------------------------------------------------------

    def demand(self) -> dict[str, Demand]:
        """Every model's waiting and in-flight work, for the fleet planner."""
        result = {}
        for name, model in self._models.items():
            in_flight = sum(slot.in_flight for slot in model.upstreams)
            serving = min((self._rank[k] for k in model.in_service_by_class), default=None)
            heads = [next(iter(q.arrivals)) for q in model.classes if q.arrivals]
            if not heads:
                result[name] = Demand(0, in_flight, serving_rank=serving)
                continue
            rank = self._rank[heads[0].klass]
            result[name] = Demand(model.waiting, in_flight, rank, min(t.enqueued_at for t in heads), serving)
        return result

    def position(self, ticket: Ticket, now: float) -> QueuePosition | None:
        """Where a waiting ticket stands (approximately, under the round-robin) and when it may be served."""
        model = self._models.get(ticket.model)
        if model is None:
            return None
        rank = self._rank[ticket.klass]
        queue = model.classes[rank]
        flow = queue.flows.get(ticket.flow)
        if flow is None or ticket not in flow:
            return None
        ahead_in_flow = 0
        for other in flow:
            if other is ticket:
                break
            ahead_in_flow += 1
        ahead = sum(len(q.arrivals) for q in model.classes[:rank]) + ahead_in_flow
        # Flows before this one in the rotation serve one more request than it before its turn comes.
        before_own = True
        for key, other_flow in queue.flows.items():
            if key == ticket.flow:
                before_own = False
                continue
            ahead += min(len(other_flow), ahead_in_flow + before_own)
        capacity = sum(s.capacity for s in model.upstreams if s.state is not UpstreamState.DOWN) or 1
        eta = None if model.service_s is None else round((ahead + 1) * model.service_s / capacity, 1)
        limited_until = self._model_wakeups.get(model.name, now)
        key_limiter = self._key_limits.get(ticket.key)
        if key_limiter is not None:
            later = ticket.since is not None
            limited_until = max(
                limited_until, key_limiter.wait_until(ticket.tokens, now, ahead_in_flow, request=not later)
            )
        if limited_until > now:
            return QueuePosition(ahead + 1, round(max(eta or 0.0, limited_until - now), 1), rate_limited=True)
        return QueuePosition(ahead + 1, eta)

    def service_s(self, model: str) -> float | None:
        """How long a request of `model` holds its slot, on average (None: not known yet)."""
        found = self._models.get(model)
        return found.service_s if found is not None else None

    def serving(self, model: str) -> bool:
        """Whether one of the model's upstreams is ready and not drained (its queue aside)."""
        found = self._models.get(model)
        return found is not None and any(u.state is UpstreamState.READY and not u.drained for u in found.upstreams)

    def statistics(self, now: float) -> SchedulerStatistics:
        models = []
        for name, model in self._models.items():
            classes = [
                ClassStatistics(
                    q.name,
                    len(q.arrivals),
                    round(now - next(iter(q.arrivals)).enqueued_at, 3) if q.arrivals else 0.0,
                    model.in_service_by_class[q.name],
                    q.name in self._paused,
                )
                for q in model.classes
            ]
            flows = [
                FlowStatistics(key, q.name, len(f), model.in_service_by_flow[key])
                for q in model.classes
                for key, f in q.flows.items()
            ]
            flows.sort(key=lambda f: -f.waiting)
            waiting_flows = {f.flow for f in flows}
            flows += [
                FlowStatistics(key, "", 0, count)
                for key, count in model.in_service_by_flow.items()
                if key not in waiting_flows
            ]
            models.append(
                ModelStatistics(
                    name=name,
                    waiting=model.waiting,
                    oldest_wait_s=max((c.oldest_wait_s for c in classes), default=0.0),
                    in_service=sum(model.in_service_by_class.values()),  # (upstreams that left included)
                    classes=classes,
                    flows=flows[:FLOW_STATISTICS_LIMIT],
                    upstreams=[
                        UpstreamStatistics(s.id, s.state.value, s.reason, s.in_flight, s.capacity, s.drained)
                        for s in model.upstreams
                    ],
                )
            )
        limits = [lim.statistics(f"key:{name}", now) for name, lim in self._key_limits.items()]
        limits += [lim.statistics(f"upstream:{uid}", now) for uid, lim in self._upstream_limits.items()]
        return SchedulerStatistics(self._waiting, self._in_service, self.max_queue, models, limits)


def _less_busy(slot: _Upstream, than: _Upstream) -> bool:
    """Whether `slot` should take a request before `than`: the lower load cost, then the lower share of its
    capacity."""
    if slot.cost != than.cost:
        return slot.cost < than.cost
    return slot.in_flight * than.capacity < than.in_flight * slot.capacity


def _decrement(counter: Counter[_K], key: _K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
