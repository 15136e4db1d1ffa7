"""The scheduler state machine, step by step, with no I/O and no clock (and its invariants under random events)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queuegate.errors import QueueFull
from queuegate.scheduler import (
    ModelUnavailable,
    NoUpstreamLeft,
    Policy,
    QueuePosition,
    RateLimit,
    RateLimited,
    SchedulerCore,
    Ticket,
    UpstreamState,
)

READY, LOADING, DOWN = UpstreamState.READY, UpstreamState.LOADING, UpstreamState.DOWN


def core_with(*upstreams: tuple[str, str, int], state: UpstreamState = READY, **policy) -> SchedulerCore:
    core = SchedulerCore(list(upstreams), Policy(**{"max_queue": 10, **policy}))
    for uid, _, _ in upstreams:
        core.set_upstream_state(uid, state, "test", 0.0)
    return core


def ticket(at: float, klass: str = "user", flow: str = "f", model: str = "m", **kwargs) -> Ticket:
    return Ticket(model, at, klass, flow, **kwargs)


def serve_all(core: SchedulerCore, holder: Ticket, now: float) -> list[Ticket]:
    """Release slots one by one (one upstream slot) and return the order in which waiters got it."""
    order, current = [], holder
    while True:
        granted = core.release(current, now)
        if not granted:
            return order
        (current,) = granted
        order.append(current)


def test_grants_least_loaded_ready_upstream_then_queues_fifo():
    core = core_with(("m#0", "m", 2), ("m#1", "m", 2))
    a, b, c, d, e, f = (ticket(float(i)) for i in range(6))
    assert core.submit(a, 0) == [a] and a.upstream_id == "m#0"
    assert core.submit(b, 1) == [b] and b.upstream_id == "m#1"  # least loaded, not first
    core.submit(c, 2)
    core.submit(d, 3)
    assert {c.upstream_id, d.upstream_id} == {"m#0", "m#1"}
    assert core.submit(e, 4) == [] and not e.decided  # all four slots busy
    core.submit(f, 5)
    assert core.release(a, 6) == [e]  # FIFO inside a flow
    assert e.upstream_id == "m#0" and not f.decided
    assert core.statistics(10.0).waiting == 1


def test_a_warm_upstream_takes_requests_before_a_cold_one_and_a_cold_one_warms_with_its_first():
    # m@box2's node reports m stopped: a request there would wait for a load (and might swap another model out).
    core = core_with(("m@box1", "m", 2), ("m@box2", "m", 2))
    core.set_upstream_load_cost("m@box2", 1)
    a, b, c, d, e = (ticket(float(i), flow=f"f{i}") for i in range(5))
    assert core.submit(a, 0) == [a] and core.submit(b, 1) == [b]
    assert a.upstream_id == b.upstream_id == "m@box1"  # not least loaded first: warm first
    assert core.submit(c, 2) == [c] and c.upstream_id == "m@box2"  # box1 is full: box2 loads it
    assert core.submit(d, 3) == [d] and d.upstream_id == "m@box2"  # loading there for c, it counts as warm
    core.release(c, 4)
    core.release(d, 4)
    core.release(a, 4)
    assert core.submit(e, 5) == [e] and e.upstream_id == "m@box1"  # idle again, box2 is cold again until it says
    core.set_upstream_load_cost("m@box2", 0)  # its node reports m ready: least loaded again
    f = ticket(6.0, flow="f6")
    assert core.submit(f, 6) == [f] and f.upstream_id == "m@box2"
    # A model that failed on its node goes last: after one its node must load.
    core = core_with(("m@box1", "m", 1), ("m@box2", "m", 1), ("m@box3", "m", 1))
    core.set_upstream_load_cost("m@box1", 2)
    core.set_upstream_load_cost("m@box2", 1)
    core.set_upstream_load_cost("m@box3", 1)
    g, h, i = (ticket(7.0 + n, flow=f"g{n}") for n in range(3))
    for t in (g, h, i):
        core.submit(t, t.enqueued_at)
    assert {g.upstream_id, h.upstream_id} == {"m@box2", "m@box3"} and i.upstream_id == "m@box1"


def test_loading_upstream_holds_requests_until_ready():
    core = core_with(("m#0", "m", 1), state=LOADING)
    t = ticket(0.0)
    assert core.submit(t, 0) == []
    assert core.set_upstream_state("m#0", READY, "ok", 1) == [t]
    assert t.upstream_id == "m#0"


def test_all_upstreams_down_rejects_at_once_and_rejects_waiters():
    core = core_with(("m#0", "m", 1), state=DOWN)
    t = ticket(0.0)
    assert core.submit(t, 0) == [t]
    assert isinstance(t.rejection, ModelUnavailable) and "m#0" in t.rejection.message
    core.set_upstream_state("m#0", LOADING, "loading", 1)
    waiter = ticket(1.0)
    assert core.submit(waiter, 1) == []
    assert core.set_upstream_state("m#0", DOWN, "crashed", 2) == [waiter]
    assert isinstance(waiter.rejection, ModelUnavailable)
    assert core.statistics(2.0).waiting == 0


def test_excluded_upstreams_are_skipped_and_exhaustion_is_reported():
    core = core_with(("m#0", "m", 1), ("m#1", "m", 1))
    retry = ticket(0.0, exclude=frozenset({"m#0"}))
    assert core.submit(retry, 0) == [retry] and retry.upstream_id == "m#1"
    last = ticket(0.0, exclude=frozenset({"m#0", "m#1"}))
    assert core.submit(last, 0) == [last]
    assert isinstance(last.rejection, NoUpstreamLeft)


def test_withdraw_removes_waiter_or_returns_granted_slot():
    core = core_with(("m#0", "m", 1))
    holder, waiter, other = ticket(0.0), ticket(1.0), ticket(2.0)
    for t in (holder, waiter, other):
        core.submit(t, t.enqueued_at)
    assert core.withdraw(waiter, 3) == []
    assert core.statistics(3.0).waiting == 1
    assert core.withdraw(holder, 3) == [other]  # a withdrawn granted ticket frees its slot for the next in line
    assert core.release(holder, 3) == []  # idempotent


def test_queue_bound_counts_all_models_and_per_model_bound():
    core = core_with(("a#0", "a", 1), ("b#0", "b", 1), max_queue=3, model_max_queue={"a": 1})
    core.submit(ticket(0, model="a"), 0)
    core.submit(ticket(0, model="b"), 0)
    core.submit(ticket(0, model="a"), 0)  # a's one waiting place
    with pytest.raises(QueueFull) as info:
        core.submit(ticket(0, model="a"), 0)
    assert info.value.status == 429 and info.value.headers()["Retry-After"] == "1"
    assert "(1 requests waiting)" in info.value.message
    core.submit(ticket(0, model="b"), 0)
    core.submit(ticket(0, model="b"), 0)
    with pytest.raises(QueueFull):
        core.submit(ticket(0, model="b"), 0)  # 3 waiting overall


def test_strict_priority_between_classes():
    core = core_with(("m#0", "m", 1))
    holder = ticket(0)
    core.submit(holder, 0)
    batch, agent, user = ticket(1, "batch"), ticket(2, "agent"), ticket(3, "user")
    for t in (batch, agent, user):
        core.submit(t, t.enqueued_at)
    assert serve_all(core, holder, 4) == [user, agent, batch]


def test_aging_serves_a_starved_lower_class_request_before_newer_higher_class_work():
    core = core_with(("m#0", "m", 1), aging_s=30)
    holder = ticket(0)
    core.submit(holder, 0)
    old_batch = ticket(1, "batch", "b")
    early_user, late_user = ticket(0.5, "user", "u"), ticket(20, "user", "u2")
    for t in (early_user, old_batch, late_user):
        core.submit(t, t.enqueued_at)
    # At t=10 nothing is aged: strict priority.
    assert core.release(holder, 10) == [early_user]
    # At t=40 the batch request waited 39 s > 30 s and arrived before late_user: it goes first.
    assert core.release(early_user, 40) == [old_batch]
    assert core.release(old_batch, 41) == [late_user]


def test_aging_never_jumps_higher_class_work_that_arrived_earlier():
    core = core_with(("m#0", "m", 1), aging_s=30)
    holder = ticket(0)
    core.submit(holder, 0)
    early_user, old_batch = ticket(1, "user", "u"), ticket(2, "batch", "b")
    for t in (early_user, old_batch):
        core.submit(t, t.enqueued_at)
    assert core.release(holder, 100) == [early_user]


def test_flows_take_turns_inside_a_class():
    """One flow with 500 waiting requests delays another flow's single request by at most one slot."""
    core = core_with(("m#0", "m", 1), max_queue=1000)
    holder = ticket(0, flow="agent")
    core.submit(holder, 0)
    flood = [ticket(1 + i * 0.001, flow="agent") for i in range(500)]
    for t in flood:
        core.submit(t, t.enqueued_at)
    single = ticket(5, flow="alice")
    core.submit(single, 5)
    order = serve_all(core, holder, 6)
    assert order.index(single) <= 1
    assert [t for t in order if t.flow == "agent"] == flood  # FIFO inside the flow, nothing lost


def test_sticky_chat_prefers_its_upstream_waits_briefly_then_takes_any():
    core = core_with(("m#0", "m", 1), ("m#1", "m", 1), affinity_wait_s=0.5)
    first = ticket(0, affinity="chat-1")
    core.submit(first, 0)
    assert first.upstream_id == "m#0"
    core.release(first, 1)
    # The chat's next request goes back to m#0 even though round-robin would pick m#1.
    again = ticket(2, affinity="chat-1")
    core.submit(again, 2)
    assert again.upstream_id == "m#0"
    # While m#0 is busy, the chat's third request holds for it (m#1 is free) ...
    third = ticket(3, affinity="chat-1")
    assert core.submit(third, 3) == [] and core.next_wakeup() == 3.5
    # ... others are not held up by it ...
    other = ticket(3.1, flow="g", affinity="chat-2")  # another flow: FIFO holds only inside a flow
    assert core.submit(other, 3.1) == [other] and other.upstream_id == "m#1"
    core.release(other, 3.2)
    # ... and when the short wait runs out it takes any free upstream.
    assert core.tick(3.4) == []
    assert core.tick(3.5) == [third] and third.upstream_id == "m#1"
    assert core.next_wakeup() is None


def test_sticky_mapping_expires_after_ttl():
    core = core_with(("m#0", "m", 1), ("m#1", "m", 1), affinity_ttl_s=10)
    first = ticket(0, affinity="c")
    core.submit(first, 0)
    core.release(first, 1)
    nudge = ticket(1.5)  # takes m#1, so round-robin would next offer m#0
    core.submit(nudge, 1.5)
    core.release(nudge, 1.6)
    late = ticket(50, affinity="c")
    core.submit(late, 50)
    assert late.upstream_id == "m#0"  # round-robin, no hold: the mapping was stale
    assert core.next_wakeup() is None


def test_position_and_eta():
    core = core_with(("m#0", "m", 1))
    holder = ticket(0)
    core.submit(holder, 0)
    core.release(holder, 2)  # service time 2 s
    holder = ticket(2)
    core.submit(holder, 2)
    a1, a2, b1 = ticket(3, flow="a"), ticket(3, flow="a"), ticket(4, flow="b")
    agent = ticket(3, "agent", "z")
    for t in (a1, a2, b1, agent):
        core.submit(t, t.enqueued_at)
    assert core.position(a1, 5.0).position == 1
    assert core.position(b1, 5.0).position == 2  # a1 goes first, then b1 (flows alternate)
    assert core.position(a2, 5.0).position == 3
    assert core.position(agent, 5.0).position == 4
    assert core.position(b1, 5.0).eta_s == 4.0
    assert core.position(holder, 5.0) is None  # granted, not waiting


def test_statistics_snapshot_per_class_and_flow():
    core = core_with(("m#0", "m", 1))
    core.submit(ticket(0, flow="alice"), 0)
    core.submit(ticket(4, "agent", "bot"), 4)
    core.submit(ticket(5, "agent", "bot"), 5)
    stats = core.statistics(10.0)
    model = stats.models[0]
    assert (stats.waiting, stats.in_service) == (2, 1)
    assert model.oldest_wait_s == 6.0
    classes = {c.name: c for c in model.classes}
    assert (classes["user"].in_service, classes["agent"].waiting, classes["agent"].oldest_wait_s) == (1, 2, 6.0)
    flows = {f.flow: f for f in model.flows}
    assert (flows["bot"].waiting, flows["alice"].in_service) == (2, 1)
    assert model.upstreams[0].in_flight == 1 and model.upstreams[0].state == "ready"


CLASSES = ("user", "agent", "batch")
events = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.sampled_from(["a", "b"]),
            st.sampled_from(CLASSES),
            st.sampled_from(["f1", "f2", "f3"]),
            st.sampled_from([None, "c1", "c2"]),
        ),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("withdraw"), st.integers(0, 50)),
        st.tuples(st.just("state"), st.sampled_from(["a#0", "a#1", "b#0"]), st.sampled_from(list(UpstreamState))),
        st.tuples(st.just("tick")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_invariants_hold_for_any_event_sequence(sequence):
    """No slot overcommitted; every ticket waiting, granted, rejected or gone exactly once; counts agree; a grant
    never skips an older same-flow request or (unless aged) a waiting higher-class one."""
    capacity = {"a#0": 2, "a#1": 1, "b#0": 1}
    aging_s = 20.0
    core = SchedulerCore(
        [("a#0", "a", 2), ("a#1", "a", 1), ("b#0", "b", 1)], Policy(max_queue=5, aging_s=aging_s, affinity_wait_s=2)
    )
    tickets: list[Ticket] = []
    waiting: list[Ticket] = []
    for step, event in enumerate(sequence):
        now = float(step)
        decided: list[Ticket] = []
        if event[0] == "submit":
            new = Ticket(event[1], now, event[2], event[3], event[4])
            try:
                decided = core.submit(new, now)
            except QueueFull:
                assert len(waiting) == 5
                continue
            tickets.append(new)
            waiting.append(new)
        elif event[0] in ("release", "withdraw") and tickets:
            chosen = tickets[event[1] % len(tickets)]
            decided = core.release(chosen, now) if event[0] == "release" else core.withdraw(chosen, now)
            if event[0] == "withdraw" and chosen in waiting:
                waiting.remove(chosen)
        elif event[0] == "state":
            decided = core.set_upstream_state(event[1], event[2], "test", now)
        elif event[0] == "tick":
            decided = core.tick(now)
        for t in decided:
            assert t.decided and t in waiting  # decided once, and only while waiting
            rest = [w for w in waiting if w is not t and w.model == t.model and w not in decided]
            if t.upstream_id is not None:
                assert not any(w.flow == t.flow and w.klass == t.klass and w.enqueued_at < t.enqueued_at for w in rest)
                rank = CLASSES.index(t.klass)
                aged = now - t.enqueued_at >= aging_s
                for w in rest:
                    if CLASSES.index(w.klass) < rank and not aged:
                        # A higher-class waiter was passed over: only because it cannot use a free slot right now
                        # (it holds for its sticky upstream, or excludes it).
                        assert w.affinity is not None or w.exclude
            waiting.remove(t)
        granted: dict[str, int] = {}
        for t in tickets:
            if t.upstream_id is not None:
                granted[t.upstream_id] = granted.get(t.upstream_id, 0) + 1
        stats = core.statistics(now)
        for model in stats.models:
            for up in model.upstreams:
                assert up.in_flight == granted.get(up.id, 0) <= capacity[up.id]
            assert sum(c.waiting for c in model.classes) == model.waiting
        assert stats.waiting == len(waiting) <= 5
        assert stats.in_service == sum(granted.values())


def test_a_key_over_its_rpm_waits_for_its_window_while_others_go():
    core = core_with(("m#0", "m", 10), key_limits={"k": RateLimit(rpm=2)}, max_wait_s=600)
    keyed = [Ticket("m", 0.0, flow="key:k", key="k") for _ in range(4)]
    decided = [t for ticket in keyed for t in core.submit(ticket, 0.0)]
    assert decided == keyed[:2]  # two within the limit go at once
    assert core.next_wakeup() == pytest.approx(60.0)  # the others wait for the window
    assert core.position(keyed[3], 1.0) == QueuePosition(2, 59.0, rate_limited=True)
    other = Ticket("m", 1.0, flow="client:x")
    assert core.submit(other, 1.0) == [other]  # another flow is not held up
    assert core.tick(59.0) == []
    (limit,) = core.statistics(59.0).limits
    assert (limit.name, limit.rpm, limit.requests_used, limit.tpm, limit.free_in_s) == ("key:k", 2, 2, None, 1.0)
    assert core.tick(60.0) == keyed[2:]


def test_a_key_whose_limit_would_outlast_the_max_wait_is_refused_with_retry_after():
    core = core_with(("m#0", "m", 10), key_limits={"k": RateLimit(rpm=1)}, max_wait_s=30)
    first = Ticket("m", 0.0, flow="key:k", key="k")
    assert core.submit(first, 0.0) == [first]
    with pytest.raises(RateLimited) as info:
        core.submit(Ticket("m", 10.0, flow="key:k", key="k"), 10.0)  # its slot opens at 60: 50 s away
    assert info.value.status == 429 and info.value.retry_after_s == 50
    late = Ticket("m", 40.0, flow="key:k", key="k")
    assert core.submit(late, 40.0) == []  # 20 s away: it waits
    core.withdraw(late, 41.0)  # and a withdrawn one frees its place in the key's line
    assert core.submit(Ticket("m", 42.0, flow="key:k", key="k"), 42.0) == []


def test_a_key_over_its_tpm_waits_and_its_charge_is_corrected_to_the_real_usage():
    core = core_with(("m#0", "m", 10), key_limits={"k": RateLimit(tpm=1000)}, max_wait_s=600)
    big = Ticket("m", 0.0, flow="key:k", key="k", tokens=600)
    assert core.submit(big, 0.0) == [big]
    second = Ticket("m", 1.0, flow="key:k", key="k", tokens=600)
    assert core.submit(second, 1.0) == []  # 600 + 600 > 1000: it waits for the first charge to leave
    assert core.next_wakeup() == pytest.approx(60.0)
    # The first request really used 300 tokens: its charge shrinks, and 300 + 600 fits now.
    assert core.release(big, 2.0, tokens=300) == [second]
    core.release(second, 3.0, tokens=900)
    small = Ticket("m", 4.0, flow="key:k", key="k", tokens=50)
    assert core.submit(small, 4.0) == []  # 300 + 900 used: it waits until the 300 leave at 60
    assert core.tick(60.0) == [small]


def test_a_request_larger_than_the_whole_tpm_goes_once_the_window_is_empty():
    core = core_with(("m#0", "m", 10), key_limits={"k": RateLimit(tpm=100)}, max_wait_s=600)
    first = Ticket("m", 0.0, flow="key:k", key="k", tokens=10)
    assert core.submit(first, 0.0) == [first]
    huge = Ticket("m", 1.0, flow="key:k", key="k", tokens=5000)
    assert core.submit(huge, 1.0) == []
    assert core.tick(60.0) == [huge]  # alone in the window: it never waits forever


def test_an_upstream_at_its_own_rate_limit_takes_nothing_until_its_window_has_room():
    core = core_with(("m#0", "m", 10), upstream_limits={"m#0": RateLimit(rpm=2)}, max_wait_s=600)
    tickets = [ticket(float(i), flow=f"f{i}") for i in range(3)]
    decided = [t for t in tickets for t in core.submit(t, t.enqueued_at)]
    assert decided == tickets[:2]
    assert core.next_wakeup() == pytest.approx(60.0)  # the model is woken when the first grant leaves the window
    assert core.tick(59.9) == []
    assert core.tick(60.0) == [tickets[2]]
    assert core.next_wakeup() is None


def test_requests_spill_to_an_unlimited_upstream_while_the_limited_one_is_at_its_limit():
    core = core_with(("m#0", "m", 10), ("m#1", "m", 10), upstream_limits={"m#0": RateLimit(rpm=1)}, max_wait_s=600)
    tickets = [ticket(0.0, flow=f"f{i}") for i in range(4)]
    for t in tickets:
        core.submit(t, 0.0)
    assert [t.upstream_id for t in tickets].count("m#0") == 1
    assert all(t.upstream_id is not None for t in tickets)


def test_upstream_limits_that_would_outlast_the_max_wait_refuse_with_retry_after():
    core = core_with(("m#0", "m", 10), upstream_limits={"m#0": RateLimit(rpm=1)}, max_wait_s=90)
    first, second = ticket(0.0, flow="a"), ticket(0.0, flow="b")
    assert core.submit(first, 0.0) == [first]
    assert core.submit(second, 0.0) == []  # goes at 60
    with pytest.raises(RateLimited) as info:
        core.submit(ticket(0.0, flow="c"), 0.0)  # would go at 120, beyond the 90 s max wait
    assert info.value.status == 429 and info.value.retry_after_s == 120
    assert "model 'm'" in info.value.message


limit_events = st.lists(
    st.tuples(st.sampled_from(["submit", "release", "tick"]), st.sampled_from(["a", "b", None]), st.floats(0, 30)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(limit_events, st.integers(1, 4), st.integers(1, 4))
def test_no_key_or_upstream_is_ever_granted_more_than_its_rpm_in_any_minute(sequence, key_rpm, upstream_rpm):
    core = core_with(
        ("m#0", "m", 3),
        ("m#1", "m", 3),
        key_limits={"a": RateLimit(rpm=key_rpm)},
        upstream_limits={"m#0": RateLimit(rpm=upstream_rpm), "m#1": RateLimit(rpm=upstream_rpm)},
        max_queue=1000,
        max_wait_s=10_000,
    )
    now = 0.0
    grants: list[tuple[float, str | None, str]] = []  # (when, key, upstream) of every grant
    granted: list[Ticket] = []

    def note(decided: list[Ticket]) -> None:
        for t in decided:
            if t.upstream_id is not None:
                grants.append((now, t.key, t.upstream_id))
                granted.append(t)

    for action, key, step in sequence:
        now += step
        if action == "submit":
            note(core.submit(Ticket("m", now, flow=f"key:{key}", key=key), now))
        elif action == "release" and granted:
            note(core.release(granted.pop(0), now))
        wake = core.next_wakeup()
        if wake is not None and wake <= now:
            note(core.tick(now))
    for start, _, _ in grants:
        in_window = [(key, upstream) for at, key, upstream in grants if start <= at < start + 60]
        assert sum(1 for key, _ in in_window if key == "a") <= key_rpm
        for upstream in ("m#0", "m#1"):
            assert sum(1 for _, u in in_window if u == upstream) <= upstream_rpm


def test_a_next_round_keeps_its_place_ahead_of_requests_that_arrived_while_its_tools_ran():
    core = core_with(("m#0", "m", 1), max_queue=50)
    first = ticket(0.0, flow="agent-a")
    core.submit(first, 0.0)
    core.release(first, 1.0)  # round 1 done; its tools run now, holding no slot
    holder = ticket(1.5, flow="other")
    core.submit(holder, 1.5)
    flood = [ticket(2.0 + i / 100, flow=f"user-{i}") for i in range(20)]
    for t in flood:
        core.submit(t, t.enqueued_at)
    again = ticket(3.0, flow="agent-a", since=first.arrived_at, prefer="m#0")
    core.submit(again, 3.0)
    assert core.position(again, 3.0).position == 1
    assert serve_all(core, holder, 4.0)[0] is again  # not behind the 20 that arrived while its tools ran
    assert again.arrived_at == 0.0


def test_a_next_round_ages_from_when_its_request_arrived():
    core = core_with(("m#0", "m", 1), aging_s=30.0)
    holder = ticket(0.0, flow="x")
    core.submit(holder, 0.0)
    newer_users = [ticket(40.0 + i, flow=f"u{i}") for i in range(3)]
    for t in newer_users:
        core.submit(t, t.enqueued_at)
    agent_round = ticket(45.0, klass="agent", flow="a", since=1.0)  # its request arrived at 1.0: 44 s ago
    core.submit(agent_round, 45.0)
    assert serve_all(core, holder, 45.0)[0] is agent_round


def test_a_next_round_prefers_its_previous_upstream_for_a_moment_then_takes_any():
    core = core_with(("m#0", "m", 1), ("m#1", "m", 1), affinity_wait_s=0.5)
    busy = ticket(0.0, flow="x")
    core.submit(busy, 0.0)
    assert busy.upstream_id == "m#0"
    again = ticket(1.0, flow="a", since=0.5, prefer="m#0")
    assert core.submit(again, 1.0) == []  # m#1 is free, but it holds for m#0 (its KV cache) for a moment
    assert core.next_wakeup() == 1.5
    assert core.release(busy, 1.2) == [again] and again.upstream_id == "m#0"
    other = ticket(2.0, flow="x")
    assert core.submit(other, 2.0) == [other] and other.upstream_id == "m#1"
    late = ticket(2.0, flow="b", since=0.5, prefer="m#0")  # m#0 stays busy (`again` holds it)
    core.submit(late, 2.0)
    assert core.release(other, 2.1) == []  # m#1 is free now, but it still holds for m#0
    assert core.tick(2.6) == [late] and late.upstream_id == "m#1"  # its moment ran out: any free upstream


def test_a_full_queue_still_takes_a_next_round():
    core = core_with(("m#0", "m", 1), max_queue=2)
    holder = ticket(0.0)
    core.submit(holder, 0.0)
    core.submit(ticket(0.1, flow="u1"), 0.1)
    core.submit(ticket(0.2, flow="u2"), 0.2)
    with pytest.raises(QueueFull):
        core.submit(ticket(0.3, flow="u3"), 0.3)
    again = ticket(0.4, flow="a", since=0.0)
    core.submit(again, 0.4)
    assert serve_all(core, holder, 1.0)[0] is again


def test_a_next_round_does_not_hide_an_older_request_from_aging():
    core = core_with(("m#0", "m", 1), aging_s=30.0, max_queue=50)
    holder = ticket(0.0, flow="x")
    core.submit(holder, 0.0)
    old_agent = ticket(1.0, klass="agent", flow="a")
    core.submit(old_agent, 1.0)
    again = ticket(25.0, klass="agent", flow="b", since=20.0)  # a next round whose request arrived at 20
    core.submit(again, 25.0)
    users = [ticket(30.0 + i, flow=f"u{i}") for i in range(3)]
    for t in users:
        core.submit(t, t.enqueued_at)
    assert serve_all(core, holder, 40.0)[0] is old_agent  # aged 39 s: first, before the users and the next round


def test_a_next_round_counts_against_its_keys_tokens_but_is_not_a_new_request():
    limits = {"k": RateLimit(rpm=1, tpm=1000)}
    core = core_with(("m#0", "m", 4), key_limits=limits, max_wait_s=600)
    first = ticket(0.0, flow="k", key="k", tokens=600)
    assert core.submit(first, 0.0) == [first]
    core.release(first, 0.5, tokens=600)
    fresh = ticket(1.0, flow="k", key="k", tokens=10)
    assert core.submit(fresh, 1.0) == []  # the key's one request per minute is spent
    again = ticket(1.0, flow="k", key="k", tokens=300, since=0.0)
    assert core.submit(again, 1.0) == [again]  # not a new request: only its tokens count (900 of 1000)
    more = ticket(2.0, flow="k", key="k", tokens=300, since=0.0)
    assert core.submit(more, 2.0) == []  # 1200 > 1000 tokens: it waits for the window


def test_upstreams_join_and_leave_at_runtime_without_cutting_requests_in_flight():
    core = core_with(("m#0", "m", 1))
    assert core.add_upstream("n@box", "n", 1, 0.0) == []  # a new model, loading at first
    assert [m.name for m in core.statistics(0.0).models] == ["m", "n"]
    waiting = ticket(0.0, model="n")
    assert core.submit(waiting, 0.0) == [] and not waiting.decided  # it waits for the upstream to be ready
    assert core.set_upstream_state("n@box", READY, "ok", 1.0) == [waiting] and waiting.upstream_id == "n@box"
    queued = ticket(1.0, model="n")
    assert core.submit(queued, 1.0) == []  # (the one slot is busy)
    # The node leaves: the waiting request can go nowhere (told now); the one in flight keeps its slot.
    assert core.remove_upstream("n@box", 2.0) == [queued] and isinstance(queued.rejection, ModelUnavailable)
    assert "has no upstream now" in str(queued.rejection)
    [_, n] = core.statistics(2.0).models
    assert n.in_service == 1 and n.upstreams == []  # (known until its request in flight is done)
    assert core.release(waiting, 3.0) == [] and [m.name for m in core.statistics(3.0).models] == ["m"]
    late = ticket(4.0, model="n")
    assert core.submit(late, 4.0) == [late] and isinstance(late.rejection, ModelUnavailable)
    with pytest.raises(KeyError):
        core.remove_upstream("n@box", 5.0)


def test_an_upstream_that_comes_back_before_its_requests_finished_keeps_counting_them():
    core = core_with(("m#0", "m", 1))
    core.add_upstream("m@box", "m", 1, 0.0)
    core.set_upstream_state("m@box", READY, "ok", 0.0)
    a, b = ticket(0.0, flow="a"), ticket(0.0, flow="b")
    core.submit(a, 0.0)
    core.submit(b, 0.0)
    assert {a.upstream_id, b.upstream_id} == {"m#0", "m@box"}
    on_box = a if a.upstream_id == "m@box" else b
    core.remove_upstream("m@box", 1.0)
    core.add_upstream("m@box", "m", 1, 1.0)  # back (re-registered) while its request is still in flight
    core.set_upstream_state("m@box", READY, "ok", 1.0)
    c = ticket(1.0, flow="c")
    assert core.submit(c, 1.0) == []  # its one slot is still taken by the request in flight
    assert core.release(on_box, 2.0) == [c] and c.upstream_id == "m@box"
    with pytest.raises(ValueError, match="exists already"):
        core.add_upstream("m#0", "m", 1, 2.0)
