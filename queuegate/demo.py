"""`queuegate run --demo`: a fleet of simulated OpenAI-compatible servers, so QueueGate works on any machine.

The fleet is a normal config file, `config/demo.toml` (shipped inside the package as `queuegate/demo.toml`). The
simulators are real HTTP servers in child processes (`python -m queuegate.sim`), with llama-server-like health and
load times and realistic token rates. Each external upstream the file writes with port 0 is a simulator this module
starts on a free port, and so is a tool server written with port 0 (the demo tool server: the time, a calculator).
The models with a launcher are started by QueueGate itself and share one exclusive demo "GPU", so asking for one and
then the other shows a swap.
"""

from __future__ import annotations

import logging
import sys
import tomllib
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import trio

from queuegate.config import Config, ConfigError, build_config
from queuegate.fleet.launchers import LaunchFailed
from queuegate.fleet.launchers.lifeline import Lifeline
from queuegate.fleet.launchers.process import ChildProcess

READY_PREFIX = "QUEUEGATE_SIM_READY "
DEMO_CONFIG = "demo.toml"  # in the package; the repository's config/demo.toml
log = logging.getLogger("queuegate.demo")


def demo_config_text() -> str:
    return resources.files("queuegate").joinpath(DEMO_CONFIG).read_text(encoding="utf-8")


def simulated_upstreams(raw: dict[str, Any]) -> list[tuple[str, int]]:
    """(model, index) of every upstream in the demo file that is a simulator for the demo to start (port 0)."""
    return [
        (name, i)
        for name, model in raw.get("models", {}).items()
        for i, url in enumerate(model.get("upstreams", []))
        if model.get("launcher", "external") == "external" and urlsplit(url).port == 0
    ]


async def start_demo_fleet(nursery: trio.Nursery, *, listen: str, lifeline: Lifeline | None = None) -> Config:
    """Start the demo file's simulators in `nursery` (they stop with it, and with this process through `lifeline`)
    and return the demo config pointing at them, listening on `listen`."""
    try:
        raw = tomllib.loads(demo_config_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{DEMO_CONFIG}: {exc}") from exc
    for name, i in simulated_upstreams(raw):
        argv = [sys.executable, "-m", "queuegate.sim", "--port", "0", "--model", name]
        child = ChildProcess(f"{name}#{i}", argv, lifeline=lifeline)
        raw["models"][name]["upstreams"][i] = await nursery.start(_run_demo_upstream, child)
    for name, server in raw.get("tools", {}).get("servers", {}).items():
        if urlsplit(server["url"]).port == 0:  # the demo tool server (the time, a calculator)
            argv = [sys.executable, "-m", "queuegate.sim", "--port", "0", "--model", name, "--tool-server"]
            child = ChildProcess(f"tools:{name}", argv, lifeline=lifeline)
            server["url"] = (await nursery.start(_run_demo_upstream, child)).removesuffix("/v1")
    raw.setdefault("server", {})["listen"] = listen
    # The state folder is where the user started the demo (as `queuegate top` expects), not the package's folder.
    return build_config(raw, source=DEMO_CONFIG, base_dir=".")


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
