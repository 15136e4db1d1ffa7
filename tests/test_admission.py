"""The trio layer of the scheduler with no network: cancellation at the moment of admission never leaks a slot."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from queuegate.scheduler import Admission, Policy, QueueTimeout, SchedulerCore, Ticket, UpstreamState


async def acquire(admission: Admission, **identity) -> Ticket:
    """Enqueue and wait for the slot, as the proxy does."""
    ticket = admission.enqueue("m", **identity)
    await admission.wait(ticket)
    return ticket


def one_slot_admission(**policy) -> Admission:
    core = SchedulerCore([("m#0", "m", 1)], Policy(**{"max_wait_s": 60, **policy}))
    core.set_upstream_state("m#0", UpstreamState.READY, "test", 0.0)
    return Admission(core)


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_cancel_racing_the_grant_hands_the_slot_on(cancel_first):
    """The waiter is cancelled in the same instant its slot is granted, in either order: the slot goes to the next
    waiter, nobody holds it."""
    admission = one_slot_admission()
    holder = await acquire(admission, klass="user", flow="a")
    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def doomed() -> None:
            with scope:
                ticket = await acquire(admission, klass="user", flow="b")
                try:
                    await trio.sleep_forever()  # where the request would start its upstream call
                finally:
                    admission.release(ticket)

        nursery.start_soon(doomed)
        await trio.testing.wait_all_tasks_blocked()
        following = admission.enqueue("m", klass="user", flow="c")
        if cancel_first:
            scope.cancel()
            admission.release(holder)
        else:
            admission.release(holder)
            scope.cancel()
    assert following.upstream_id == "m#0"
    stats = admission.statistics()
    assert (stats.waiting, stats.in_service) == (0, 1)


async def test_max_wait_withdraws_and_raises_503(autojump_clock):
    admission = one_slot_admission()
    await acquire(admission, klass="user", flow="a")
    with pytest.raises(QueueTimeout) as timeout:
        await acquire(admission, klass="user", flow="b")
    assert timeout.value.status == 503 and timeout.value.headers()["Retry-After"] == "5"
    assert admission.statistics().waiting == 0


async def test_sticky_wait_expiry_is_ticked_by_the_run_task(autojump_clock):
    core = SchedulerCore([("m#0", "m", 1), ("m#1", "m", 1)], Policy(affinity_wait_s=0.5, max_wait_s=60))
    for uid in ("m#0", "m#1"):
        core.set_upstream_state(uid, UpstreamState.READY, "test", 0.0)
    admission = Admission(core)
    async with trio.open_nursery() as nursery:
        await nursery.start(admission.run)
        first = await acquire(admission, klass="user", flow="a", affinity="chat")
        assert first.upstream_id == "m#0"
        started = trio.current_time()
        second = await acquire(admission, klass="user", flow="b", affinity="chat")  # m#0 busy, m#1 free
        assert second.upstream_id == "m#1" and trio.current_time() - started == pytest.approx(0.5)
        nursery.cancel_scope.cancel()
