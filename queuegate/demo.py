"""`queuegate run --demo`: a fleet of simulated OpenAI-compatible servers, so QueueGate works on any machine.

The simulators are real HTTP servers in child processes (`python -m queuegate.sim`), with llama-server-like health
and load times and realistic token rates; the gateway in front of them is the real daemon with a normal config.
Two of them (coder, writer) are started by QueueGate itself and share one exclusive demo "GPU", so asking for one
and then the other shows a swap.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import trio

from queuegate.config import Config, build_config
from queuegate.fleet.launchers import LaunchFailed
from queuegate.fleet.launchers.lifeline import Lifeline
from queuegate.fleet.launchers.process import ChildProcess

READY_PREFIX = "QUEUEGATE_SIM_READY "
log = logging.getLogger("queuegate.demo")


def _launched_sim(*args: str) -> list[str]:
    """A simulator QueueGate itself starts on demand (launcher = "process"), on the port it picks."""
    return [sys.executable, "-m", "queuegate.sim", "--port", "${PORT}", "--model", "${MODEL}", *args]


# name -> (simulator arguments per upstream the demo starts itself, model settings). Models with a launcher have
# no such upstreams: QueueGate starts and swaps them on the demo's one exclusive "GPU".
DEMO_FLEET: dict[str, tuple[list[list[str]], dict[str, Any]]] = {
    "demo-chat": (
        [["--tokens-per-s", "40"], ["--tokens-per-s", "40"]],
        {
            "kind": "llamacpp",
            "aliases": ["chat", "planner"],
            "max_concurrency": 2,
            "defaults": {"temperature": 0.7},
        },
    ),
    "demo-coder": (
        [],
        {
            "launcher": "process",
            "cmd": _launched_sim("--tokens-per-s", "80", "--load-time", "1.5"),
            "device": "demo-gpu",
            "memory_gb": 16,
            "preload": True,
            "ttl_s": 600,
            "kind": "llamacpp",
            "aliases": ["coder"],
            "max_concurrency": 2,
            "defaults": {"temperature": 0.2},
        },
    ),
    "demo-writer": (
        [],
        {
            "launcher": "process",
            "cmd": _launched_sim("--tokens-per-s", "30", "--load-time", "2.5"),
            "device": "demo-gpu",
            "memory_gb": 20,
            "ttl_s": 600,
            "kind": "llamacpp",
            "aliases": ["writer"],
            "max_concurrency": 2,
        },
    ),
    "demo-embed": (
        [["--embedding-dim", "16"]],
        {"kind": "llamacpp", "aliases": ["embed"], "max_concurrency": 4},
    ),
}
DEMO_DEVICES = {"demo-gpu": {"memory_gb": 24}}  # coder (16 GB) and writer (20 GB) never fit together: they swap


async def start_demo_fleet(
    nursery: trio.Nursery, *, listen: str, lifeline: Lifeline | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Start every simulator in `nursery` (they stop with it, and with this process through `lifeline`) and return
    a config pointing at them."""
    models: dict[str, Any] = {}
    for name, (upstream_args, settings) in DEMO_FLEET.items():
        urls = []
        for i, args in enumerate(upstream_args):
            argv = [sys.executable, "-m", "queuegate.sim", "--port", "0", "--model", name, *args]
            child = ChildProcess(f"{name}#{i}", argv, lifeline=lifeline)
            urls.append(await nursery.start(_run_demo_upstream, child))
        models[name] = {"upstreams": urls, **settings} if urls else dict(settings)
    raw: dict[str, Any] = {
        "server": {"listen": listen},
        "upstream": {"health_interval_s": 2.0},
        "devices": DEMO_DEVICES,
        "fleet": {"swap_after_ms": 5000},
        "models": models,
        **(overrides or {}),
    }
    return build_config(raw, source="<demo>")


async def _run_demo_upstream(child: ChildProcess, *, task_status: trio.TaskStatus[str]) -> None:
    """Run one demo simulator. If it dies after it started, the gateway goes on (its health check marks the
    upstream down, as for any external server); only a simulator that cannot start stops the demo."""
    status = _NotedStart(task_status)
    try:
        await child.run(ready_prefix=READY_PREFIX, task_status=status)  # type: ignore[arg-type]
    except LaunchFailed as exc:
        if not status.done:
            raise
        log.warning("demo upstream exited", extra={"fields": {"upstream": child.name, "why": str(exc).splitlines()[0]}})


class _NotedStart:
    """A task status that remembers whether `started` was called."""

    def __init__(self, task_status: trio.TaskStatus[str]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, value: str) -> None:
        self.done = True
        self._task_status.started(value)
