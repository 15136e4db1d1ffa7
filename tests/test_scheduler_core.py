"""The scheduler state machine, step by step, with no I/O (and its invariants under random event sequences)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queuegate.errors import QueueFull
from queuegate.scheduler import ModelUnavailable, NoUpstreamLeft, SchedulerCore, Ticket, UpstreamState

READY, LOADING, DOWN = UpstreamState.READY, UpstreamState.LOADING, UpstreamState.DOWN


def core_with(*upstreams: tuple[str, str, int], max_queue: int = 10, state: UpstreamState = READY) -> SchedulerCore:
    core = SchedulerCore(list(upstreams), max_queue=max_queue)
    for uid, _, _ in upstreams:
        core.set_upstream_state(uid, state, "test")
    return core


def test_grants_least_loaded_ready_upstream_then_queues_fifo():
    core = core_with(("m#0", "m", 2), ("m#1", "m", 2))
    a, b, c, d, e = (Ticket("m", float(i)) for i in range(5))
    assert core.submit(a) == [a] and a.upstream_id == "m#0"
    assert core.submit(b) == [b] and b.upstream_id == "m#1"  # least loaded, not first
    core.submit(c)
    core.submit(d)
    assert {c.upstream_id, d.upstream_id} == {"m#0", "m#1"}
    assert core.submit(e) == [] and not e.decided  # all four slots busy
    f = Ticket("m", 5.0)
    for ticket in (a, b, c, d):
        assert ticket.upstream_id is not None
    core.submit(f)
    # A release hands the slot to the oldest waiter, not the newest.
    assert core.release(a) == [e]
    assert e.upstream_id == "m#0" and not f.decided
    assert core.statistics(10.0).waiting == 1


def test_loading_upstream_holds_requests_until_ready():
    core = core_with(("m#0", "m", 1), state=LOADING)
    t = Ticket("m", 0.0)
    assert core.submit(t) == []
    assert core.set_upstream_state("m#0", READY, "ok") == [t]
    assert t.upstream_id == "m#0"


def test_all_upstreams_down_rejects_at_once_and_rejects_waiters():
    core = core_with(("m#0", "m", 1), state=DOWN)
    t = Ticket("m", 0.0)
    assert core.submit(t) == [t]
    assert isinstance(t.rejection, ModelUnavailable)
    assert "m#0" in t.rejection.message

    core.set_upstream_state("m#0", LOADING, "loading")
    waiter = Ticket("m", 1.0)
    assert core.submit(waiter) == []
    assert core.set_upstream_state("m#0", DOWN, "crashed") == [waiter]
    assert isinstance(waiter.rejection, ModelUnavailable)
    assert core.statistics(2.0).waiting == 0


def test_excluded_upstreams_are_skipped_and_exhaustion_is_reported():
    core = core_with(("m#0", "m", 1), ("m#1", "m", 1))
    retry = Ticket("m", 0.0, exclude=frozenset({"m#0"}))
    assert core.submit(retry) == [retry] and retry.upstream_id == "m#1"
    last = Ticket("m", 0.0, exclude=frozenset({"m#0", "m#1"}))
    assert core.submit(last) == [last]
    assert isinstance(last.rejection, NoUpstreamLeft)


def test_withdraw_removes_waiter_or_returns_granted_slot():
    core = core_with(("m#0", "m", 1))
    holder, waiter, other = Ticket("m", 0.0), Ticket("m", 1.0), Ticket("m", 2.0)
    core.submit(holder)
    core.submit(waiter)
    core.submit(other)
    assert core.withdraw(waiter) == []
    assert core.statistics(3.0).waiting == 1
    # Withdrawing a granted ticket frees its slot for the next in line.
    assert core.withdraw(holder) == [other]
    assert core.release(holder) == []  # idempotent


def test_queue_bound_counts_all_models():
    core = core_with(("a#0", "a", 1), ("b#0", "b", 1), max_queue=2)
    for model in "ab":
        core.submit(Ticket(model, 0.0))
    core.submit(Ticket("a", 0.0))
    core.submit(Ticket("b", 0.0))
    with pytest.raises(QueueFull) as info:
        core.submit(Ticket("a", 0.0))
    assert info.value.status == 429 and info.value.headers()["Retry-After"] == "1"


def test_statistics_snapshot():
    core = core_with(("m#0", "m", 1))
    core.submit(Ticket("m", 0.0))
    core.submit(Ticket("m", 4.0))
    stats = core.statistics(10.0)
    model = stats.models[0]
    assert (stats.waiting, stats.in_service) == (1, 1)
    assert model.oldest_wait_s == 6.0
    assert model.upstreams[0].in_flight == 1 and model.upstreams[0].state == "ready"


events = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("withdraw"), st.integers(0, 50)),
        st.tuples(st.just("state"), st.sampled_from(["a#0", "a#1", "b#0"]), st.sampled_from(list(UpstreamState))),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_invariants_hold_for_any_event_sequence(sequence):
    """No slot overcommitted; every ticket is waiting, granted, rejected or gone, exactly once; counts agree."""
    capacity = {"a#0": 2, "a#1": 1, "b#0": 1}
    core = SchedulerCore([("a#0", "a", 2), ("a#1", "a", 1), ("b#0", "b", 1)], max_queue=5)
    tickets: list[Ticket] = []
    waiting: set[int] = set()
    for step, event in enumerate(sequence):
        decided: list[Ticket] = []
        if event[0] == "submit":
            ticket = Ticket(event[1], float(step))
            try:
                decided = core.submit(ticket)
            except QueueFull:
                assert len(waiting) == 5
                continue
            tickets.append(ticket)
            if not ticket.decided:
                waiting.add(id(ticket))
        elif event[0] in ("release", "withdraw") and tickets:
            ticket = tickets[event[1] % len(tickets)]
            decided = core.release(ticket) if event[0] == "release" else core.withdraw(ticket)
            waiting.discard(id(ticket)) if event[0] == "withdraw" else None
        elif event[0] == "state":
            decided = core.set_upstream_state(event[1], event[2], "test")
        for ticket in decided:
            assert ticket.decided
            assert id(ticket) in waiting or event[0] == "submit"
            waiting.discard(id(ticket))
        granted: dict[str, int] = {}
        for ticket in tickets:
            if ticket.upstream_id is not None:
                granted[ticket.upstream_id] = granted.get(ticket.upstream_id, 0) + 1
        stats = core.statistics(float(step))
        for model in stats.models:
            for up in model.upstreams:
                assert up.in_flight == granted.get(up.id, 0) <= capacity[up.id]
        assert stats.waiting == len(waiting) <= 5
        assert stats.in_service == sum(granted.values())
