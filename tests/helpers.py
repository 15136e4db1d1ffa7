"""Helpers the tests share: clients, daemons in subprocesses, simulated fleets, waiting, timelines.

Fixtures (which start things inside a test's nursery) are in conftest.py; everything else a test module needs from
another lives here, so no test module imports another.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import trio

from queuegate.daemon import Daemon
from queuegate.fleet.catalog import server_root
from queuegate.fleet.launchers.lifeline import Lifeline

T = TypeVar("T")
HI = [{"role": "user", "content": "hi"}]
# API keys the `key_env` fixture puts in the environment (name of the variable -> secret).
SECRETS = {
    "ALICE_KEY": "sk-alice-0123456789",
    "BATCH_KEY": "sk-batch-9876543210",
    "QG_ALICE": "sk-alice-qg-0123456789",
    "QG_BOB": "sk-bob-0123456789",
    "QG_OPS": "sk-ops-0123456789",
}


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


def request_lines(caplog) -> list[dict]:
    """The fields of every request's log line captured so far."""
    return [r.fields for r in caplog.records if r.getMessage() == "request"]


def children(pid: int) -> list[str]:
    """The pids of a process's children."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return found.stdout.split()


def pids_named(pids: list[str], text: bytes) -> list[str]:
    """Those of `pids` whose command line has `text` (a process gone meanwhile has none)."""
    named = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            if text in Path(f"/proc/{pid}/cmdline").read_bytes():
                named.append(pid)
    return named


def running(pid: int | str) -> bool:
    """Whether the process runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, interval: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


LISTENING = "QueueGate listening on "
IDLE_PAST_EVERY_TIMER_S = 12  # trio retires idle worker threads after 10 s: children must not care
KILL_GRACE_S = 5.0


async def _stopped_at_the_end(process: trio.Process) -> None:
    """Wait for the daemon; if the test ends first (failed, or done with it running), stop it and its fleet."""
    try:
        await process.wait()
    finally:
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                process.send_signal(signal.SIGTERM)  # its own shutdown stops its children
                with trio.move_on_after(KILL_GRACE_S):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


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


async def start_daemon(
    nursery: trio.Nursery, *args: str, env: dict[str, str] | None = None, command: str = "run", cwd: str | None = None
) -> RunningDaemon:
    """`queuegate run ARGS` (or another `command`) in a fresh folder of its own, or `cwd` (its default state, the
    admin socket, goes there: never the checkout's, where a user's demo may be running). It is stopped when the
    test ends however it ends, and dies with the test process even if that is killed (a lifeline of its own)."""
    cwd = cwd or tempfile.mkdtemp(prefix="queuegate-test-")
    lifeline = await nursery.start(Lifeline().run)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "queuegate.cli", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
        preexec_fn=lifeline.child_preexec(KILL_GRACE_S),
    )
    lifeline.registered(process.pid, KILL_GRACE_S)
    nursery.start_soon(_stopped_at_the_end, process)
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


def chat(client: openai.OpenAI, model: str = "m", content: str = "hello", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kwargs)


# -- fleets of simulated servers that QueueGate launches itself (see test_fleet.py) --------------------------------

SIM = [sys.executable, "-m", "queuegate.sim", "--port", "${PORT}", "--model", "${MODEL}", "--tokens-per-s", "200"]
EXCLUSIVE = {"gpu": {"memory_gb": 24, "exclusive": True}}


def sim_model(load_time: float = 0.2, *extra_args: str, **settings) -> dict:
    return {
        "launcher": "process",
        "kind": "llamacpp",
        "cmd": [*SIM, "--load-time", str(load_time), *extra_args],
        "device": "gpu",
        "memory_gb": 8,
        **settings,
    }


def ask(gw, model: str, path: str = "/chat/completions", **settings):
    """One chat request through the gateway from a worker thread; returns the parsed answer."""
    client = gw.client(**settings)
    if path == "/chat/completions":
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return client.post(path, cast_to=dict, body=payload)


def fingerprint(answer) -> str:
    return answer["system_fingerprint"] if isinstance(answer, dict) else answer.system_fingerprint


def model_stats(gw, model: str):
    """The fleet's statistics of one model (its state, reason, crashes...)."""
    return next(m for m in gw.daemon.fleet.statistics().models if m.name == model)


def state(gw, model: str) -> str:
    return model_stats(gw, model).state


def spans(gw, model: str) -> list[tuple[float, float]]:
    """(spawning, exited) intervals from the launcher's own timeline; a running server ends at +inf."""
    out, start = [], None
    for event, at in gw.daemon.fleet.launch_history(model):
        if event == "spawning":
            start = at
        else:
            out.append((start, at))
            start = None
    if start is not None:
        out.append((start, float("inf")))
    return out


def assert_never_together(gw, *models: str) -> None:
    intervals = sorted((s, e, m) for m in models for s, e in spans(gw, m))
    for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
        assert end <= start, f"{first} still ran when {second} was launched"


async def gather(*calls) -> list:
    """Run blocking calls concurrently, each in a worker thread; their results in order."""
    results: list = [None] * len(calls)

    async def run(i: int) -> None:
        results[i] = await in_thread(calls[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(run, i)
    return results


async def sim_stats(gw, model: str) -> dict:
    root = server_root(gw.daemon.catalog.models[model].upstreams[0].base_url)
    async with httpx.AsyncClient() as http:
        return (await http.get(root + "/sim/stats")).json()


async def hang_the_only_slot(
    nursery: trio.Nursery, gw: Gateway, headers: dict[str, str] | None = None
) -> trio.CancelScope:
    """Take model "m"'s only slot with a request its simulated upstream never answers (its own fault: no race with
    what comes after it), so the queue fills at the test's pace; cancel the returned scope to hang up on it."""
    holder = trio.CancelScope()

    async def hold() -> None:
        with holder:
            async with httpx.AsyncClient(timeout=30) as http:
                chat = {"model": "m", "sim_fault": "hang", "messages": [{"role": "user", "content": "holder"}]}
                await http.post(gw.api + "/chat/completions", json=chat, headers=headers or {})

    nursery.start_soon(hold)
    await wait_until(lambda: gw.stats().in_service == 1)
    return holder
