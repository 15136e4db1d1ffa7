"""A real third-party OpenAPI tool server for the tests: PyPI's mcpo in front of the MCP server mcp-server-time.

scripts/install_tool_servers.sh installs both (CI runs it and sets $QUEUEGATE_TOOL_SERVERS). mcpo serves
/openapi.json at its root and each MCP tool as `POST /<tool>` (get_current_time, convert_time).

mcpo starts mcp-server-time in a session (process group) of its own (the mcp SDK's stdio client does that), so
stopping mcpo's group alone would not reach it: the helper finds mcpo's descendants and stops every group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from queuegate.fleet.launchers.lifeline import Lifeline
from tests.helpers import KILL_GRACE_S, wait_until

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / "scripts" / "install_tool_servers.sh"
READY_TIMEOUT_S = 30
# mcpo is started on port 0; uvicorn then logs the port it was given (no window for another process to take it).
LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")
# mcp-server-time names the local timezone in its tool descriptions: fixed, so /openapi.json is the same everywhere.
LOCAL_TIMEZONE = "Etc/UTC"


def tool_servers_dir() -> Path:
    """The folder with the mcpo/ and time/ venvs: $QUEUEGATE_TOOL_SERVERS, else the install script's cache entry."""
    configured = os.environ.get("QUEUEGATE_TOOL_SERVERS")
    if configured:
        folder = Path(configured)
    else:
        script = INSTALL_SCRIPT.read_text()
        mcpo = re.search(r"^MCPO_VERSION=(\S+)$", script, re.M)
        time = re.search(r"^MCP_SERVER_TIME_VERSION=(\S+)$", script, re.M)
        assert mcpo and time, "the install script pins MCPO_VERSION and MCP_SERVER_TIME_VERSION"
        cache = Path(os.environ.get("QUEUEGATE_CACHE", Path.home() / ".cache" / "queuegate"))
        folder = cache / f"tool-servers-mcpo{mcpo.group(1)}-time{time.group(1)}"
    if not (os.access(folder / "mcpo/bin/mcpo", os.X_OK) and os.access(folder / "time/bin/mcp-server-time", os.X_OK)):
        pytest.fail("mcpo is not installed: run `bash scripts/install_tool_servers.sh` (CI does)")
    return folder


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that runs (zombies excluded)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                state, parent, group = stat.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state != "Z":
            found[int(entry.name)] = (int(parent), int(group))
    return found


@dataclass
class _Server:
    pid: int  # mcpo's; also its process group's id (start_new_session)
    groups: set[int] = field(default_factory=set)  # mcpo's group and each of its descendants'

    def pids(self) -> list[int]:
        """mcpo and every descendant, plus anything left in the groups seen (an orphaned mcp-server-time)."""
        processes = _processes()
        tree = {self.pid} if self.pid in processes else set()
        grown = True
        while grown:
            children = {pid for pid, (parent, _) in processes.items() if parent in tree} - tree
            tree |= children
            grown = bool(children)
        self.groups |= {processes[pid][1] for pid in tree}
        return sorted(tree | {pid for pid, (_, group) in processes.items() if group in self.groups})


_RUNNING: dict[str, _Server] = {}


def tool_server_pids(base_url: str) -> list[int]:
    """The processes of the mcpo server at `base_url` (started by `mcpo_time_server`): mcpo and mcp-server-time."""
    return _RUNNING[base_url].pids()


@asynccontextmanager
async def mcpo_time_server(*, api_key: str | None = None) -> AsyncIterator[str]:
    """mcpo with mcp-server-time on 127.0.0.1 (and `--api-key` if given); yields its base URL once /openapi.json
    answers. On exit every process of it is stopped (SIGTERM, SIGKILL after KILL_GRACE_S) and reaped; a lifeline
    stops them too if the test process dies first."""
    venvs = tool_servers_dir()
    auth = ["--api-key", api_key] if api_key is not None else []
    argv = [str(venvs / "mcpo/bin/mcpo"), "--host", "127.0.0.1", "--port", "0", *auth,
            "--", str(venvs / "time/bin/mcp-server-time"), "--local-timezone", LOCAL_TIMEZONE]  # fmt: skip
    output: list[str] = []
    async with trio.open_nursery() as nursery:
        lifeline: Lifeline = await nursery.start(Lifeline().run)
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lifeline.child_preexec(KILL_GRACE_S),
        )
        lifeline.registered(process.pid, KILL_GRACE_S)
        server = _Server(process.pid, {process.pid})
        try:
            nursery.start_soon(_collect, process.stdout, output)
            base_url = await _ready(process, output)
            server.pids()  # learns mcp-server-time's group (mcpo started it before it listened)
            for group in server.groups - {process.pid}:
                lifeline.registered(group, KILL_GRACE_S)
            _RUNNING[base_url] = server
            try:
                yield base_url
            finally:
                del _RUNNING[base_url]
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process, server)
            for group in server.groups:
                lifeline.forget(group)
            nursery.cancel_scope.cancel()  # the output reader and the lifeline


async def _collect(stream: trio.abc.ReceiveStream, output: list[str]) -> None:
    async for chunk in stream:
        output.append(chunk.decode(errors="replace"))


def _tail(output: list[str], lines: int = 30) -> str:
    return "\n".join("".join(output).splitlines()[-lines:])


async def _ready(process: trio.Process, output: list[str]) -> str:
    """The base URL, once mcpo has said where it listens and GET /openapi.json answers 200."""
    with trio.move_on_after(READY_TIMEOUT_S):
        await wait_until(
            lambda: LISTENING.search("".join(output)) is not None or process.poll() is not None,
            timeout=READY_TIMEOUT_S,
            interval=0.02,
        )
        found = LISTENING.search("".join(output))
        if found:
            base_url = found.group(1)
            async with httpx.AsyncClient(timeout=2) as http:
                while process.poll() is None:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(base_url + "/openapi.json")).status_code == 200:
                            return base_url
                    await trio.sleep(0.05)
    state = f"exited {process.returncode}" if process.poll() is not None else f"not ready after {READY_TIMEOUT_S} s"
    pytest.fail(f"mcpo {state}; its output ends:\n{_tail(output)}")


async def _stop(process: trio.Process, server: _Server) -> None:
    """SIGTERM to every group of the server, SIGKILL to what is left after KILL_GRACE_S; reap mcpo."""
    server.pids()  # learn the groups of descendants that started after _ready

    def gone() -> bool:
        return process.poll() is not None and not server.pids()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in server.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
        with contextlib.suppress(trio.TooSlowError):
            await wait_until(gone, timeout=KILL_GRACE_S, interval=0.05)
        if gone():
            break
    await process.wait()
    assert not server.pids(), f"mcpo's processes outlived SIGKILL: {server.pids()}"
