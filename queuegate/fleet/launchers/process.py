"""Child processes QueueGate starts itself: own process group, output kept in a ring buffer, stopped on cancel,
and tied to QueueGate's life by the lifeline (see `lifeline.py`)."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from queuegate.fleet.launchers import LaunchFailed
from queuegate.fleet.launchers.lifeline import Lifeline


class ChildProcess:
    """One child process: the process launcher's model server, or one of the demo's simulators.

    `history` is the launcher's own timeline: ("spawning", t) just before the process is created and
    ("exited", t) once it has been reaped, in trio time. Tests check device exclusivity on it. With a `lifeline`,
    the child also dies when QueueGate does, even by SIGKILL; without one it is stopped only on cancel.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stop_grace_s: float = 3.0,
        ring_lines: int = 200,
        lifeline: Lifeline | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = None if env is None else {**os.environ, **env}
        self.stop_grace_s = stop_grace_s
        self.output: collections.deque[str] = collections.deque(maxlen=ring_lines)
        self.history: collections.deque[tuple[str, float]] = collections.deque(maxlen=100)
        self.process: trio.Process | None = None
        self.lifeline = lifeline

    async def run(
        self,
        *,
        ready_prefix: str | None = None,
        ready_timeout_s: float = 30.0,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the child and report started: at once, or (with `ready_prefix`) once it prints a line starting
        with it, reporting the rest of that line. Raises LaunchFailed when the child exits.

        Runs until cancelled; then the whole process group gets SIGTERM, and SIGKILL after `stop_grace_s`.
        """
        self.history.append(("spawning", trio.current_time()))
        self.output.clear()  # the tail a failure reports is this run's
        try:
            process = await trio.lowlevel.open_process(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops its children too
                preexec_fn=None if self.lifeline is None else self.lifeline.child_preexec(self.stop_grace_s),
                env=self.env,
            )
        except OSError as exc:
            self.history.append(("exited", trio.current_time()))
            raise LaunchFailed(f"{self.name}: cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None
        self.process = process
        if self.lifeline is not None:
            self.lifeline.registered(process.pid, self.stop_grace_s)
        try:
            assert process.stdout is not None
            lines = _lines(process.stdout)
            if ready_prefix is None:
                task_status.started("")
            else:
                await self._wait_ready(process, lines, ready_prefix, ready_timeout_s, task_status)
            async for line in lines:
                self.output.append(line)
            await process.wait()
            raise LaunchFailed(f"{self.name} exited with {process.returncode}:\n{self.tail()}")
        finally:
            with trio.CancelScope(shield=True):
                await _stop_group(process, self.stop_grace_s)
            if self.lifeline is not None:
                self.lifeline.forget(process.pid)
            self.history.append(("exited", trio.current_time()))

    async def find_leftover(self) -> bool:
        """Never: the lifeline stops every child when the daemon that started it dies."""
        return False

    async def stop_leftover(self) -> None:
        return None

    async def _wait_ready(
        self,
        process: trio.Process,
        lines: AsyncIterator[str],
        ready_prefix: str,
        timeout_s: float,
        task_status: trio.TaskStatus[str],
    ) -> None:
        with trio.move_on_after(timeout_s) as waiting:
            async for line in lines:
                self.output.append(line)
                if line.startswith(ready_prefix):
                    task_status.started(line[len(ready_prefix) :].strip())
                    return
        if waiting.cancelled_caught:
            raise LaunchFailed(f"{self.name} was not ready within {timeout_s:g} s:\n{self.tail()}")
        await process.wait()
        raise LaunchFailed(f"{self.name} exited with {process.returncode} before it was ready:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.output)[-lines:])


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    while chunk := await stream.receive_some():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


async def _stop_group(process: trio.Process, grace_s: float) -> None:
    """SIGTERM the child's whole process group, SIGKILL after `grace_s`; then sweep up what is left of the group
    (a crashed leader may leave helpers behind)."""
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await process.wait()
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
