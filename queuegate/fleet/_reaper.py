"""The lifeline's reaper: a tiny process that stops QueueGate's children once QueueGate is gone, however it died.

Its stdin is the read end of a pipe whose only write end QueueGate holds. QueueGate writes one line per change:
"+PGID GRACE" when a child process group starts (written by the child itself, before it execs), "-PGID" once that
group has been stopped and reaped. End of file on stdin means QueueGate has exited (a clean exit, a crash or
`kill -9`: the kernel closes the write end in every case): each group still listed gets SIGTERM, and SIGKILL when
it outlives its grace period. Standard library only, started with `python -I -S`, so it costs milliseconds and a few
megabytes. It ignores SIGINT, SIGHUP and SIGTERM: only the pipe decides when it acts.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.05


def read_groups(fd: int) -> dict[int, float]:
    """Follow the pipe until end of file; the groups still registered then, each with its grace period."""
    groups: dict[int, float] = {}
    pending = b""
    while chunk := os.read(fd, 4096):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            apply(groups, line)
    apply(groups, pending)
    return groups


def apply(groups: dict[int, float], line: bytes) -> None:
    """One registration line: '+PGID GRACE' or '-PGID'; anything else is ignored."""
    fields = line.decode("ascii", "replace").split()
    try:
        if fields and fields[0].startswith("+"):
            groups[int(fields[0][1:])] = float(fields[1]) if len(fields) > 1 else 3.0
        elif fields and fields[0].startswith("-"):
            groups.pop(int(fields[0][1:]), None)
    except ValueError:
        pass


def stop_groups(groups: dict[int, float]) -> None:
    """SIGTERM every group; SIGKILL each one still there after its grace period."""
    started = time.monotonic()
    alive = {pgid: grace for pgid, grace in groups.items() if signal_group(pgid, signal.SIGTERM)}
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
