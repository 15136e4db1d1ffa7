"""Launchers: how QueueGate starts and stops a model's server, as a local process (`process.py`, tied to QueueGate's
life by `lifeline.py`) or a Docker container (`docker.py`). The fleet (`fleet/manager.py`) drives them through the
`Launcher` protocol and learns of failures through `LaunchFailed`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import trio


class LaunchFailed(Exception):
    """A model server could not start, or exited; the message says why, with the tail of its output."""


class Launcher(Protocol):
    """Starts one model's server: reports started once it runs, raises LaunchFailed when it exits, and stops it
    when cancelled. `history` is its own timeline of ("spawning" | "exited", trio time).

    `find_leftover` says whether the server is already running before QueueGate started it (a container left by
    a daemon that was killed); `run` then takes it over. `stop_leftover` stops such a server instead."""

    @property
    def history(self) -> Iterable[tuple[str, float]]: ...

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None: ...

    async def find_leftover(self) -> bool: ...

    async def stop_leftover(self) -> None: ...
