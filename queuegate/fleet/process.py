"""Child processes QueueGate starts itself: own process group, output kept in a ring buffer, killed on cancel."""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import trio

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class ChildFailed(Exception):
    """The child exited or never said it was ready; the message carries the tail of its output."""


class ChildProcess:
    def __init__(self, name: str, argv: Sequence[str], *, ring_lines: int = 200) -> None:
        self.name = name
        self.argv = list(argv)
        self.output: collections.deque[str] = collections.deque(maxlen=ring_lines)
        self.process: trio.Process | None = None

    async def run(
        self,
        *,
        ready_prefix: str,
        ready_timeout_s: float = 30.0,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the child, wait for an output line starting with `ready_prefix`, report the rest of that line.

        Runs until cancelled; then the whole process group gets SIGTERM, and SIGKILL if it lingers.
        """
        process = await trio.lowlevel.open_process(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.process = process
        try:
            assert process.stdout is not None
            lines = _lines(process.stdout)
            ready = False
            with trio.move_on_after(ready_timeout_s) as waiting:
                async for line in lines:
                    self.output.append(line)
                    if line.startswith(ready_prefix):
                        ready = True
                        task_status.started(line[len(ready_prefix) :].strip())
                        break
            if not ready:
                if waiting.cancelled_caught:
                    raise ChildFailed(f"{self.name} was not ready within {ready_timeout_s:g} s:\n{self.tail()}")
                await process.wait()
                raise ChildFailed(f"{self.name} exited with {process.returncode} before it was ready:\n{self.tail()}")
            async for line in lines:
                self.output.append(line)
            await process.wait()
            raise ChildFailed(f"{self.name} exited with {process.returncode}:\n{self.tail()}")
        finally:
            with trio.CancelScope(shield=True):
                await _stop_group(process)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.output)[-lines:])


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us if QueueGate dies (even by SIGKILL), so no orphan
    model server keeps a GPU busy. Elsewhere this is a no-op; the cancel path still stops children."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _lines(stream: trio.abc.ReceiveStream):
    buffer = b""
    while chunk := await stream.receive_some():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


async def _stop_group(process: trio.Process, grace_s: float = 3.0) -> None:
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(grace_s):
        await process.wait()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    await process.wait()
