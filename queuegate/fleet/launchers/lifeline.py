"""The lifeline: child processes live as long as QueueGate, and not longer, however QueueGate ends.

Linux's parent-death signal (PR_SET_PDEATHSIG) cannot do this job here: it fires when the *thread* that forked the
child exits, and trio forks from worker threads that it retires after 10 s idle, so every child would die 10 s after
the daemon went quiet. Instead a tiny reaper process (`_reaper.py`) holds the read end of a pipe whose write end only
QueueGate holds. Each child registers its process group on the pipe before it execs (so even a `kill -9` right
after the fork leaves nothing behind) and is struck off once it has been reaped. When QueueGate exits, by any means,
the kernel closes the write end; the reaper stops every group still registered (SIGTERM, then SIGKILL after that
child's grace period) and exits. Which thread forked no longer matters.

A registration carries the leader's start time, and the reaper signals a group only if the process with that id is
still the one registered: a child whose exec failed (never struck off: its parent never learned its pid) or one
whose pid was reused cannot make the reaper stop somebody else's processes. The "pipe" is a socket pair written
with MSG_NOSIGNAL: a child registering while the reaper is dead gets an error, not a SIGPIPE (which the child,
between fork and exec, would die of).

One `Lifeline` per process that starts children; it must outlive them (start it first, stop it last). If the reaper
itself dies, `run` starts a new one and registers the live groups again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from queuegate.fleet.launchers._reaper import start_time

log = logging.getLogger("queuegate.fleet")

REAPER = Path(__file__).with_name("_reaper.py")
RESPAWN_DELAY_S = 1.0
STOP_WAIT_S = 2.0


class LifelineStatistics(msgspec.Struct, frozen=True):
    reaper_pid: int | None
    respawns: int  # reapers that died and were replaced
    groups: list[int]  # the child process groups registered now


class Lifeline:
    def __init__(self) -> None:
        self._channel: socket.socket | None = None  # our end; the reaper's stdin is the other one
        self._groups: dict[int, str] = {}  # process group -> its registration line, as the reaper should know it
        self.reaper_pid: int | None = None
        self.respawns = 0

    async def run(self, *, task_status: trio.TaskStatus[Lifeline] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a reaper running until cancelled; report started once the first one holds the pipe."""
        reaper: trio.Process | None = None
        try:
            while True:
                reaper = await self._spawn_reaper()
                if not self.respawns:
                    task_status.started(self)
                code = await reaper.wait()
                self._close_pipe()  # at once: a child registering meanwhile gets an error, never a dead end
                self.respawns += 1
                log.warning(
                    "the lifeline's reaper exited; starting another one",
                    extra={"fields": {"exit_code": code, "groups": len(self._groups)}},
                )
                await trio.sleep(RESPAWN_DELAY_S)
        finally:
            # A clean stop: children were stopped by their owners; closing the pipe lets the reaper exit (after
            # stopping anything somebody left registered).
            self._close_pipe()
            if reaper is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_WAIT_S):
                    await reaper.wait()

    def statistics(self) -> LifelineStatistics:
        return LifelineStatistics(self.reaper_pid, self.respawns, sorted(self._groups))

    def child_preexec(self, grace_s: float) -> Callable[[], None]:
        """A `preexec_fn` for a child started with `start_new_session=True` (its group id is its pid): it
        registers the group from inside the child, before exec, so no window exists in which the child runs
        unregistered."""

        def register() -> None:
            channel = self._channel
            # Without a reaper right now (OSError) the parent registers the child again once it runs.
            with contextlib.suppress(OSError):
                if channel is not None:
                    channel.send(_registration(os.getpid(), grace_s), socket.MSG_NOSIGNAL)

        return register

    def registered(self, pgid: int, grace_s: float) -> None:
        """The parent's side of a registration: remember the group (a new reaper learns it) and say it again."""
        line = self._groups[pgid] = _registration(pgid, grace_s)
        self._send(line)

    def forget(self, pgid: int) -> None:
        """The group has been stopped and reaped: the reaper must never signal that id again."""
        if self._groups.pop(pgid, None) is not None:
            self._send(f"-{pgid}\n".encode())

    async def _spawn_reaper(self) -> trio.Process:
        self._close_pipe()
        ours, theirs = socket.socketpair()  # both ends close-on-exec: no other child inherits them
        try:
            reaper = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-S", str(REAPER)],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach it
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.shutdown(socket.SHUT_RD)
        ours.setblocking(False)  # never stall the event loop on a full buffer
        self._channel = ours
        self.reaper_pid = reaper.pid
        for line in self._groups.values():
            self._send(line)
        return reaper

    def _send(self, line: bytes) -> None:
        channel = self._channel
        if channel is None:
            return
        try:
            channel.send(line, socket.MSG_NOSIGNAL)
        except OSError as exc:  # the reaper is gone (run starts another) or not keeping up
            log.warning("lifeline write failed", extra={"fields": {"error": str(exc)}})

    def _close_pipe(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


def _registration(pgid: int, grace_s: float) -> bytes:
    """'+PGID GRACE START': the group, its grace period, and its leader's start time (see the module)."""
    return f"+{pgid} {grace_s:g} {start_time(pgid)}\n".encode()
