"""Giving memory back to the system after a burst of requests.

A gateway that held 10,000 waiting requests would otherwise stay at that size once they are gone: requests that
ended by cancellation (their client hung up) leave their exceptions, tracebacks and frames in reference cycles that
only the cycle collector frees, and CPython never runs its oldest generation once allocations stop; glibc keeps the
pages it got back for later. So once a burst is over (the peak of open requests was a burst, and they have been
down to a tenth of it or less at two checks in a row), the trimmer collects the cycles and asks glibc to return its
free pages (`malloc_trim`, in a worker thread: it takes a while on a large heap). What CPython's own arenas keep
(a few live objects pin a 1 MiB arena) stays: `scripts/bench_scheduler.py` measures what is given back.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from queuegate.api import InFlight

log = logging.getLogger("queuegate.heap")

BURST_REQUESTS = 1000  # a peak of open requests at least this high is a burst
CHECK_EVERY_S = 5.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim` (None where the C library has none, e.g. musl or macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # (TypeError: Windows has no CDLL(None))
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def resident_mb() -> float | None:
    """This process's resident memory in MiB (None where /proc is not there)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class HeapTrimmer:
    """Watches the open requests; after a burst has ended, gives the memory it left behind back (once per burst)."""

    def __init__(self, in_flight: InFlight, *, burst: int = BURST_REQUESTS, every_s: float = CHECK_EVERY_S) -> None:
        self._in_flight = in_flight
        self._burst = burst
        self._every_s = every_s
        self.malloc_trim = _find_malloc_trim()
        self.trims = 0  # give-backs begun
        self._over_at_last_check = False

    def burst_is_over(self) -> bool:
        peak = self._in_flight.peak
        return peak >= self._burst and self._in_flight.count <= peak // 10

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._every_s)
            await self.check()

    async def check(self) -> None:
        """One check: give back when the burst was over at this check and at the one before."""
        over_before, self._over_at_last_check = self._over_at_last_check, self.burst_is_over()
        if over_before and self._over_at_last_check:
            peak = self._in_flight.peak
            self._in_flight.reset_peak()
            self._over_at_last_check = False
            await self.give_back(peak)

    async def give_back(self, peak: int) -> None:
        """Collect reference cycles (this blocks the loop: tens of ms on an idle heap, a few hundred after a burst
        of 10,000) and return glibc's free pages."""
        self.trims += 1
        before, started = resident_mb(), time.perf_counter()
        collected = gc.collect()
        if self.malloc_trim is not None:
            await trio.to_thread.run_sync(self.malloc_trim, 0)
        after = resident_mb()
        fields = {
            "peak_requests": peak,
            "collected": collected,
            "took_ms": round((time.perf_counter() - started) * 1000),
            "rss_mb_before": round(before) if before is not None else None,
            "rss_mb_after": round(after) if after is not None else None,
        }
        log.info("memory given back after a burst", extra={"fields": fields})
