"""Memory given back after a burst (`queuegate/heap.py`): when the trimmer acts (the open requests are counted by
the real `InFlight`; a short check period stands in for the daemon's), and what one give-back does in this very
process."""

from __future__ import annotations

import gc
import logging
import platform

from queuegate.api import InFlight
from queuegate.heap import HeapTrimmer, resident_mb
from tests.helpers import wait_until


def test_in_flight_remembers_its_peak_until_reset():
    in_flight = InFlight()
    for _ in range(5):
        in_flight.enter()
    for _ in range(4):
        in_flight.leave()
    assert (in_flight.count, in_flight.peak) == (1, 5)
    in_flight.reset_peak()
    assert in_flight.peak == 1


def test_a_burst_is_over_when_a_tenth_of_its_peak_is_left():
    in_flight = InFlight()
    trimmer = HeapTrimmer(in_flight, burst=100)
    for _ in range(99):
        in_flight.enter()
    for _ in range(99):
        in_flight.leave()
    assert not trimmer.burst_is_over()  # a peak of 99 is no burst
    for _ in range(100):
        in_flight.enter()
    assert not trimmer.burst_is_over()  # still at its peak
    for _ in range(89):
        in_flight.leave()
    assert not trimmer.burst_is_over()  # 11 left: more than a tenth
    in_flight.leave()
    assert trimmer.burst_is_over()


async def test_the_trimmer_gives_back_once_a_burst_was_over_at_two_checks_in_a_row():
    in_flight = InFlight()
    trimmer = HeapTrimmer(in_flight, burst=10)
    for _ in range(12):
        in_flight.enter()
    await trimmer.check()
    await trimmer.check()
    assert trimmer.trims == 0  # the burst is still there
    for _ in range(11):
        in_flight.leave()
    await trimmer.check()
    assert trimmer.trims == 0  # over at one check only
    await trimmer.check()
    assert (trimmer.trims, in_flight.peak) == (1, 1)
    for _ in range(3):
        await trimmer.check()
    assert trimmer.trims == 1  # once per burst
    for _ in range(9):
        in_flight.enter()  # 10 open: a burst again since the reset
    await trimmer.check()
    for _ in range(10):
        in_flight.leave()
    await trimmer.check()
    await trimmer.check()
    assert trimmer.trims == 2


async def test_the_trimmer_runs_its_checks_on_its_own(nursery):
    in_flight = InFlight()
    trimmer = HeapTrimmer(in_flight, burst=10, every_s=0.02)
    await nursery.start(trimmer.run)
    for _ in range(10):
        in_flight.enter()
    for _ in range(10):
        in_flight.leave()
    await wait_until(lambda: trimmer.trims == 1)


async def test_a_give_back_collects_cycles_and_says_what_it_did(caplog):
    """Real effect in this process: cycles like a cancelled request's (exception -> traceback -> frame) are freed,
    and glibc's malloc_trim is found where the C library is glibc."""

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    trimmer = HeapTrimmer(InFlight())
    if platform.libc_ver()[0] == "glibc":
        assert trimmer.malloc_trim is not None
    gc.collect()
    gc.disable()  # (so the automatic collector does not free them first)
    try:
        for _ in range(1000):
            Cycle()
        with caplog.at_level(logging.INFO, logger="queuegate.heap"):
            await trimmer.give_back(1234)
    finally:
        gc.enable()
    (line,) = [r.fields for r in caplog.records if r.getMessage() == "memory given back after a burst"]
    assert line["peak_requests"] == 1234
    assert line["collected"] >= 1000
    assert resident_mb() is not None and line["rss_mb_before"] > 0 and line["rss_mb_after"] > 0
