"""Shared test harness: real daemons on port 0, real simulated upstreams on loopback, the real `openai` client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import openai
import pytest
import trio

from queuegate.config import build_config
from queuegate.daemon import Daemon
from queuegate.sim import SimConfig, Simulator

T = TypeVar("T")


@dataclass
class Gateway:
    daemon: Daemon
    base_url: str  # http://127.0.0.1:PORT

    @property
    def api(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """The official client, no retries (tests look at the first answer), short timeout."""
        settings = {"base_url": self.api, "api_key": "unused", "max_retries": 0, "timeout": 20, **kwargs}
        return openai.OpenAI(**settings)

    def stats(self):
        return self.daemon.admission.statistics()


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call (the sync openai client) without blocking the trio loop that serves it."""
    return await trio.to_thread.run_sync(fn)


@pytest.fixture
def start_sim(nursery):
    """Start a simulated upstream (real HTTP server on a loopback port) in the test's nursery."""

    async def start(**settings: Any) -> tuple[Simulator, str]:
        sim = Simulator(SimConfig(**settings))
        url = await nursery.start(sim.run)
        return sim, url

    return start


@pytest.fixture
def start_gateway(nursery, tmp_path):
    """Start the real daemon on 127.0.0.1:0 with `models` (and optional config sections); its state (the admin
    socket) goes under the test's tmp_path."""

    gateways = 0

    async def start(models: dict[str, Any], **sections: Any) -> Gateway:
        nonlocal gateways
        gateways += 1
        sections.setdefault("server", {})
        sections["server"].setdefault("listen", "127.0.0.1:0")
        sections["server"].setdefault("state_dir", str(tmp_path / f"state-{gateways}"))
        sections.setdefault("upstream", {})
        sections["upstream"].setdefault("health_interval_s", 0.2)
        daemon = Daemon(build_config({"models": models, **sections}))
        started = await nursery.start(daemon.run)
        return Gateway(daemon, started.base_url)

    return start


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, interval: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


LISTENING = "QueueGate listening on "


class RunningDaemon:
    """`python -m queuegate.cli run ...` with stdout/stderr collected; `url` once it listens."""

    def __init__(self, process: trio.Process, cwd: str) -> None:
        self.process = process
        self.cwd = cwd  # its working folder (its default state_dir, .queuegate, is under it)
        self.stdout = ""
        self.stderr = ""
        self.url = ""

    async def collect(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        while data := await stream.receive_some():
            setattr(self, name, getattr(self, name) + data.decode(errors="replace"))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=20)


async def start_daemon(nursery: trio.Nursery, *args: str, env: dict[str, str] | None = None) -> RunningDaemon:
    """`queuegate run ARGS` in a fresh folder of its own (its default state, the admin socket, goes there: never
    the checkout's, where a user's demo may be running)."""
    cwd = tempfile.mkdtemp(prefix="queuegate-test-")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "queuegate.cli", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    daemon = RunningDaemon(process, cwd)
    nursery.start_soon(daemon.collect, process.stdout, "stdout")
    nursery.start_soon(daemon.collect, process.stderr, "stderr")
    with trio.fail_after(30):
        while LISTENING not in daemon.stdout:
            if process.returncode is not None:
                raise AssertionError(f"daemon exited {process.returncode}:\n{daemon.stderr}")
            await trio.sleep(0.02)
    daemon.url = daemon.stdout.split(LISTENING, 1)[1].split()[0]
    return daemon


async def stuck_stream(base_url: str, request_id: str = "stuck") -> trio.SocketStream:
    """A raw client that asks for a long, fast stream, reads the response's first bytes, then reads nothing more
    while keeping its connection open (a suspended laptop). The model must be named "m"."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    body = b'{"model": "m", "stream": true, "max_tokens": 400000, "messages": [{"role": "user", "content": "hi"}]}'
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"x-request-id: {request_id}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with trio.fail_after(5):
        assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 200")
    return stream


async def stream_signalling_at_first_event(url: str, body: dict, process: trio.Process) -> list[str]:
    """Stream `body` from `url`, send SIGTERM to `process` on the first event, and read on to the end; the events."""
    events: list[str] = []
    async with httpx.AsyncClient(timeout=20) as http, http.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 1:
                    process.send_signal(signal.SIGTERM)
    return events
