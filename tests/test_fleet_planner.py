"""The fleet planner step by step (pure: no I/O, time is an argument), against a fake fleet that records effects.

The fake keeps its own timeline of which servers are running (launched and not yet stopped): the no-overcommit
invariant is checked on that timeline, not on the planner's own bookkeeping.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queuegate.fleet.planner import (
    DeviceSpec,
    FleetPlanner,
    Halt,
    Launch,
    ModelState,
    PlannedModel,
    PlannerPolicy,
)
from queuegate.scheduler import Demand


class FakeFleet:
    """Drives a planner like the real fleet does, with demand set by the test and servers that start on command."""

    def __init__(self, devices, models, policy=None):
        self.planner = FleetPlanner(devices, models, policy or PlannerPolicy(swap_after_s=10))
        self.devices = {d.name: d for d in devices}
        self.specs = {m.name: m for m in models}
        self.demand: dict[str, Demand] = {}
        self.running: set[str] = set()  # the servers' own timeline: launched, not yet stopped
        self.effects: list = []
        self.now = 0.0

    def plan(self, now=None):
        if now is not None:
            self.now = now
        effects = self.planner.plan(self.now, self.demand)
        self.effects += effects
        for effect in effects:
            if isinstance(effect, Launch):
                self.running.add(effect.model)
            self.check_no_overcommit()
        return effects

    def set(self, model, waiting=0, in_flight=0, rank=0, oldest_at=None):
        oldest = (self.now if oldest_at is None else oldest_at) if waiting else None
        self.demand[model] = Demand(waiting, in_flight, rank if waiting else None, oldest)
        return self.plan()

    def ready(self, model):
        self.planner.ready(model, self.now)
        return self.plan()

    def stopped(self, model):
        self.running.discard(model)
        self.planner.stopped(model, self.now)
        return self.plan()

    def crash(self, model, reason="exited with 1"):
        self.running.discard(model)
        self.planner.exited(model, self.now, reason)
        return self.plan()

    def state(self, model):
        return self.planner.state(model)[0]

    def check_no_overcommit(self):
        for name, device in self.devices.items():
            on = [m for m in self.running if self.specs[m].device == name]
            if device.exclusive:
                assert len(on) <= 1, f"{name} runs {on} at once"
            assert sum(self.specs[m].memory_gb for m in on) <= device.memory_gb + 1e-9, f"{name} overcommitted: {on}"


def load(fleet: FakeFleet, model: str) -> None:
    """A request for `model` arrives (it is launched) and its server turns healthy; the request still waits."""
    fleet.set(model, waiting=1)
    fleet.ready(model)


def exclusive_pair(**policy):
    return FakeFleet(
        [DeviceSpec("gpu", 24, exclusive=True)],
        [PlannedModel("a", "gpu", 8), PlannedModel("b", "gpu", 8)],
        PlannerPolicy(**{"swap_after_s": 10, **policy}),
    )


def test_requests_for_a_stopped_model_launch_it_once():
    fleet = exclusive_pair()
    assert fleet.set("a", waiting=1) == [Launch("a")]
    assert fleet.set("a", waiting=5) == []  # the later requests join the same load
    fleet.planner.launched("a", 0.5)
    assert fleet.ready("a") == []
    assert fleet.state("a") is ModelState.READY


def test_busy_model_keeps_the_device_until_the_swap_bound_then_drains():
    fleet = exclusive_pair()
    load(fleet, "a")
    fleet.set("a", waiting=3, in_flight=1)
    fleet.now = 2.0
    assert fleet.set("b", waiting=1) == []  # a still has work queued: b waits
    assert fleet.planner.next_wakeup() == pytest.approx(12.0)  # b's arrival + swap_after_s
    assert fleet.plan(11.9) == []
    assert fleet.plan(12.0) == []  # drains a: requests in flight finish first
    assert fleet.state("a") is ModelState.DRAINING
    assert fleet.set("a", waiting=3, in_flight=0) == [Halt("a")]
    assert fleet.stopped("a") == [Launch("b")]


def test_a_client_sending_requests_one_after_another_keeps_its_model():
    """Between two requests of a sequential client its model is idle for a moment; that does not start a swap."""
    fleet = exclusive_pair(idle_grace_s=0.5)
    load(fleet, "a")
    fleet.set("a", in_flight=1)
    assert fleet.set("b", waiting=1) == []  # a has only a request in flight: still busy
    fleet.now = 1.0
    assert fleet.set("a") == []  # a's request ended; its client's next one is on its way
    assert fleet.planner.next_wakeup() == pytest.approx(1.5)
    fleet.now = 1.1
    fleet.set("a", in_flight=1)
    fleet.now = 2.0
    fleet.set("a")
    assert fleet.plan(2.5) == [Halt("a")]  # its client stopped sending: the grace ran out


def test_a_higher_class_request_swaps_before_the_bound():
    fleet = exclusive_pair()
    fleet.set("a", waiting=1, rank=1)
    fleet.ready("a")
    fleet.set("a", waiting=4, in_flight=1, rank=1)  # agent work
    fleet.set("b", waiting=1, rank=0)  # a user request
    assert fleet.state("a") is ModelState.DRAINING


def test_the_swap_bound_counts_from_the_residents_load():
    """Requests that waited through a swap do not swap straight back: each model keeps the device a while."""
    fleet = exclusive_pair()
    fleet.set("a", waiting=2)
    fleet.set("b", waiting=2, oldest_at=0.0)
    fleet.ready("a")
    fleet.set("a", waiting=1, in_flight=1)
    fleet.plan(10.0)  # b waited 10 s: a drains
    fleet.set("a", waiting=1, in_flight=0)
    assert fleet.stopped("a") == [Launch("b")]
    fleet.now = 15.0
    fleet.ready("b")
    fleet.set("b", waiting=1, in_flight=1)
    assert fleet.plan(16.0) == []  # a's request is 16 s old, but b has held the device for 1 s only
    assert fleet.planner.next_wakeup() == pytest.approx(25.0)
    fleet.plan(25.0)
    assert fleet.state("b") is ModelState.DRAINING


def test_memory_device_evicts_the_least_recently_used_idle_model():
    fleet = FakeFleet(
        [DeviceSpec("gpu", 20)],
        [PlannedModel("a", "gpu", 8), PlannedModel("b", "gpu", 8), PlannedModel("c", "gpu", 8)],
    )
    assert fleet.set("a", waiting=1) == [Launch("a")]
    assert fleet.set("b", waiting=1) == [Launch("b")]  # both fit in 20 GB
    fleet.ready("a")
    fleet.ready("b")
    fleet.now = 1.0
    fleet.set("a")  # a idle since 1
    fleet.now = 2.0
    fleet.set("b")  # b idle since 2
    assert fleet.set("c", waiting=1) == [Halt("a")]
    assert fleet.stopped("a") == [Launch("c")]
    assert fleet.state("b") is ModelState.READY


def test_idle_models_unload_after_their_ttl():
    fleet = FakeFleet([], [PlannedModel("a", None, ttl_s=60)])
    load(fleet, "a")
    fleet.set("a", in_flight=1)
    fleet.now = 5.0
    fleet.set("a")  # the last request ends at 5
    assert fleet.planner.next_wakeup() == pytest.approx(65.0)
    assert fleet.plan(64.0) == []
    assert fleet.plan(65.0) == [Halt("a")]


@pytest.mark.parametrize("abort", [True, False])
def test_a_load_nobody_waits_for_finishes_or_aborts(abort):
    fleet = exclusive_pair(abort_abandoned=abort)
    fleet.set("a", waiting=1)
    effects = fleet.set("a", waiting=0)  # its only client left
    assert effects == ([Halt("a")] if abort else [])
    assert fleet.state("a") is (ModelState.STOPPING if abort else ModelState.STARTING)


def test_crashes_restart_with_backoff_then_fail_for_the_hold_time():
    fleet = exclusive_pair(restart_attempts=2, restart_backoff_s=1, failure_hold_s=30)
    fleet.set("a", waiting=1)
    assert fleet.crash("a") == []
    assert fleet.planner.next_wakeup() == pytest.approx(1.0)
    assert fleet.plan(1.0) == [Launch("a")]
    fleet.crash("a")
    assert fleet.planner.next_wakeup() == pytest.approx(3.0)  # the backoff doubles
    assert fleet.plan(3.0) == [Launch("a")]
    fleet.crash("a", "exited with 2: out of memory")
    state, reason = fleet.planner.state("a")
    assert state is ModelState.FAILED and reason.startswith("crashed 3 times in a row, not restarted for 30 s")
    assert reason.endswith(": exited with 2: out of memory")
    fleet.set("a")  # the scheduler refuses the waiting requests of a failed model
    assert fleet.plan(20.0) == []
    fleet.plan(33.0)
    assert fleet.state("a") is ModelState.STOPPED  # the hold is over: the next request may try again


def test_a_crash_while_serving_restarts_it_for_the_waiting_requests():
    fleet = exclusive_pair(restart_backoff_s=0.5)
    load(fleet, "a")
    fleet.set("a", waiting=2, in_flight=1)
    fleet.set("a", waiting=2, in_flight=0)
    assert fleet.crash("a") == []
    assert fleet.plan(0.5) == [Launch("a")]


def test_a_loaded_model_that_crashes_comes_back_with_nobody_asking_until_the_bound():
    fleet = exclusive_pair(restart_attempts=2, restart_backoff_s=2, failure_hold_s=30)
    load(fleet, "a")
    fleet.set("a")  # idle, loaded
    assert fleet.crash("a", "exited with 139") == []
    state, reason = fleet.planner.state("a")
    assert state is ModelState.STOPPED and reason == "crashed, restart 1 of 2 in 2 s: exited with 139"
    assert fleet.planner.next_wakeup() == pytest.approx(fleet.now + 2)
    assert fleet.plan(fleet.now + 2) == [Launch("a")]  # no request waits: it is restarted all the same
    fleet.ready("a")
    fleet.crash("a")
    assert fleet.plan(fleet.now + 4) == [Launch("a")]  # it crashed soon after its restart: the backoff doubles
    fleet.ready("a")
    fleet.crash("a")
    assert fleet.state("a") is ModelState.FAILED  # the bound: a crash loop stops being retried
    assert fleet.plan(fleet.now + 100) == []
    assert fleet.state("a") is ModelState.STOPPED  # the hold ran out; it stays down until asked for
    stats = next(m for m in fleet.planner.statistics(fleet.now).models if m.name == "a")
    assert stats.crashes == 3


def test_a_crash_after_a_long_stable_run_starts_a_new_count():
    fleet = exclusive_pair(restart_attempts=1, restart_backoff_s=1)
    load(fleet, "a")
    fleet.crash("a")
    fleet.plan(fleet.now + 1)
    fleet.ready("a")
    fleet.now += 61  # it served for more than a minute
    fleet.crash("a")
    assert fleet.state("a") is ModelState.STOPPED  # restart 1 of 1 again, not failed
    assert fleet.plan(fleet.now + 1) == [Launch("a")]


def test_a_crashed_model_whose_room_was_taken_is_not_restarted_by_force():
    fleet = exclusive_pair(restart_backoff_s=1)
    load(fleet, "a")
    fleet.set("a")
    fleet.crash("a")
    load(fleet, "b")  # b is asked for during a's backoff and takes the device
    assert fleet.plan(fleet.now + 1) == []
    state, reason = fleet.planner.state("a")
    assert state is ModelState.STOPPED and reason == "not restarted: its device is in use by other models"
    assert fleet.plan(fleet.now + 100) == []  # b stays; a comes back when a request asks for it


def test_servers_left_running_are_adopted_while_they_fit():
    fleet = exclusive_pair()
    assert fleet.planner.adopt("a", 0.0)
    fleet.running.add("a")
    assert not fleet.planner.adopt("b", 0.0)  # the exclusive device is taken: the caller stops b
    assert fleet.state("a") is ModelState.STARTING
    assert fleet.plan() == []  # nobody asks for it, but it is kept: it becomes ready when healthy
    fleet.ready("a")
    assert fleet.state("a") is ModelState.READY and fleet.state("b") is ModelState.STOPPED


def test_startup_preload_fills_free_room_only():
    fleet = FakeFleet(
        [DeviceSpec("gpu", 24, exclusive=True)],
        [PlannedModel("a", "gpu", 8, preload=True), PlannedModel("b", "gpu", 8, preload=True)],
    )
    assert fleet.plan() == [Launch("a")]
    fleet.ready("a")
    assert fleet.plan(100.0) == []  # b does not push a out
    assert fleet.state("b") is ModelState.STOPPED


def test_operator_preload_and_evict():
    fleet = exclusive_pair()
    load(fleet, "a")
    fleet.set("a", waiting=3, in_flight=1)
    fleet.planner.preload("b", fleet.now)
    assert fleet.plan() == []
    assert fleet.state("a") is ModelState.DRAINING  # an operator's preload does not wait for the bound
    fleet.set("a", waiting=3, in_flight=0)
    assert fleet.stopped("a") == [Launch("b")]
    fleet.ready("b")
    fleet.set("b", in_flight=1)
    fleet.planner.evict("b", fleet.now)
    assert fleet.plan() == []
    assert fleet.planner.state("b") == (ModelState.DRAINING, "evicted by operator")
    assert fleet.set("b") == [Halt("b")]
    with pytest.raises(KeyError):
        fleet.planner.preload("nope", 0)


def test_a_swap_nobody_needs_any_more_is_cancelled():
    fleet = exclusive_pair()
    load(fleet, "a")
    fleet.set("a", in_flight=1)
    fleet.set("b", waiting=1)
    fleet.plan(10.0)
    assert fleet.state("a") is ModelState.DRAINING
    fleet.set("b", waiting=0)  # b's client left before a finished
    assert fleet.state("a") is ModelState.READY


def test_external_models_hold_their_memory_and_never_move():
    fleet = FakeFleet(
        [DeviceSpec("gpu", 16)],
        [PlannedModel("embed", "gpu", 6, managed=False), PlannedModel("a", "gpu", 8), PlannedModel("b", "gpu", 8)],
    )
    fleet.running.add("embed")
    load(fleet, "a")
    fleet.set("a")
    fleet.now = 1.0
    assert fleet.set("b", waiting=1) == [Halt("a")]  # 6 + 8 + 8 > 16: a goes, embed stays
    with pytest.raises(ValueError):
        fleet.planner.evict("embed", 0)


def test_progress_reports_phase_and_learned_eta():
    fleet = exclusive_pair()
    fleet.set("b", waiting=1)
    fleet.planner.launched("b", 0.1)
    fleet.now = 2.0
    fleet.ready("b")  # b took 2 s to load
    fleet.set("b")
    fleet.now = 3.0
    assert fleet.set("a", waiting=1) == [Halt("b")]
    fleet.now = 3.5
    assert fleet.stopped("b") == [Launch("a")]
    fleet.now = 4.0
    fleet.ready("a")
    fleet.set("a")
    fleet.now = 5.0
    assert fleet.set("b", waiting=1) == [Halt("a")]
    assert fleet.planner.statistics(5.2).devices[0].swap.phase == "stopping a"
    fleet.now = 5.5
    assert fleet.stopped("a") == [Launch("b")]
    fleet.planner.launched("b", 5.6)
    stats = fleet.planner.statistics(6.0)
    swap = stats.devices[0].swap
    assert swap.target == "b" and swap.phase == "waiting for health of b"
    assert swap.elapsed_s == pytest.approx(1.0)
    assert swap.eta_s == pytest.approx(1.5)  # learned: 2 s to load, 0.5 s in
    assert stats.swaps == 2 and stats.loads == 2
    b = next(m for m in stats.models if m.name == "b")
    assert b.state == "starting" and b.load_s == pytest.approx(2.0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["demand", "ready", "stopped", "crash", "preload", "evict", "tick"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(0, 3),
            st.integers(0, 2),
        ),
        max_size=60,
    )
)
def test_no_device_is_ever_overcommitted(events):
    """Whatever happens, the servers running on a device (by the fake's own timeline) fit it."""
    fleet = FakeFleet(
        [DeviceSpec("x", 24, exclusive=True), DeviceSpec("m", 16)],
        [PlannedModel("a", "x", 10), PlannedModel("b", "x", 10), PlannedModel("c", "m", 10), PlannedModel("d", "m", 6)],
        PlannerPolicy(swap_after_s=5, restart_backoff_s=1, failure_hold_s=3),
    )
    for kind, model, waiting, in_flight in events:
        fleet.now += 1.0
        state = fleet.state(model)
        if kind == "demand":
            # Requests run only on a ready model (or one still finishing on it).
            running = in_flight if state in (ModelState.READY, ModelState.DRAINING) else 0
            fleet.set(model, waiting=waiting, in_flight=running)
        elif kind == "ready" and state is ModelState.STARTING:
            fleet.ready(model)
        elif kind == "stopped" and model in fleet.running and state is ModelState.STOPPING:
            fleet.stopped(model)
        elif kind == "crash" and model in fleet.running:
            fleet.crash(model)
        elif kind == "preload":
            fleet.planner.preload(model, fleet.now)
            fleet.plan()
        elif kind == "evict":
            fleet.planner.evict(model, fleet.now)
            fleet.plan()
        else:
            fleet.plan()
        for name in fleet.running:
            assert fleet.state(name) is not ModelState.STOPPED, f"{name} runs but the planner thinks it stopped"
