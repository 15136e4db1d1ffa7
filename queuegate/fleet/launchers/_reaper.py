"""The lifeline's reaper: a tiny process that stops QueueGate's children once QueueGate is gone, however it died.

Its stdin is one end of a socket pair whose other end only QueueGate holds. QueueGate writes one line per change:
"+PGID GRACE START" when a child process group starts (written by the child itself, before it execs; START is its
leader's start time), "-PGID" once that group has been stopped and reaped. End of file on stdin means QueueGate has
exited (a clean exit, a crash or `kill -9`: the kernel closes its end in every case): each group still listed gets
SIGTERM, and SIGKILL when it outlives its grace period. A group whose leader id now belongs to a process that
started at another time is somebody else's, and is left alone. Standard library only, started with `python -I -S`,
so it costs milliseconds and a few megabytes. It ignores SIGINT, SIGHUP and SIGTERM: only its stdin decides when it
acts.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.05


def read_groups(fd: int) -> dict[int, tuple[float, int]]:
    """Follow the pipe until end of file; the groups still registered then: (grace period, leader start time)."""
    groups: dict[int, tuple[float, int]] = {}
    pending = b""
    while chunk := os.read(fd, 4096):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            apply(groups, line)
    apply(groups, pending)
    return groups


def apply(groups: dict[int, tuple[float, int]], line: bytes) -> None:
    """One registration line: '+PGID GRACE START' or '-PGID'; anything else is ignored."""
    fields = line.decode("ascii", "replace").split()
    try:
        if len(fields) == 3 and fields[0].startswith("+"):
            groups[int(fields[0][1:])] = (float(fields[1]), int(fields[2]))
        elif len(fields) == 1 and fields[0].startswith("-"):
            groups.pop(int(fields[0][1:]), None)
    except ValueError:
        pass


def start_time(pid: int) -> int:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22); 0 when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def ours(pgid: int, started: int) -> bool:
    """Whether the group is still the one registered: its leader is gone (its members may remain, and while they
    do the id cannot be reused), or it is the very process that registered."""
    now = start_time(pgid)
    return now == 0 or started == 0 or now == started


def stop_groups(groups: dict[int, tuple[float, int]]) -> None:
    """SIGTERM every group that is still ours; SIGKILL each one still there after its grace period."""
    started = time.monotonic()
    mine = {pgid: grace for pgid, (grace, start) in groups.items() if ours(pgid, start)}
    alive = {pgid: grace for pgid, grace in mine.items() if signal_group(pgid, signal.SIGTERM)}
    while alive:
        time.sleep(POLL_S)
        elapsed = time.monotonic() - started
        for pgid, grace in list(alive.items()):
            if not signal_group(pgid, 0):
                del alive[pgid]
            elif elapsed >= grace:
                signal_group(pgid, signal.SIGKILL)
                del alive[pgid]


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to the group (0: only check it exists); False when the group is gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # the id now belongs to somebody else's processes: not ours to stop
    return True


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    stop_groups(read_groups(sys.stdin.fileno()))


if __name__ == "__main__":
    main()
