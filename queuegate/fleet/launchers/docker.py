"""The docker launcher: start and stop a model's container through the Docker Engine API (the docker SDK).

The SDK blocks, so every call runs in a worker thread under a timeout; an unreachable daemon is a clear
`LaunchFailed`, never a hang. Works with Docker and with podman's Docker-compatible service.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests
import trio

from queuegate.config import ContainerSpec
from queuegate.fleet.catalog import LaunchSpec
from queuegate.fleet.launchers import LaunchFailed

log = logging.getLogger("queuegate.fleet")

_T = TypeVar("_T")
_DEFAULT_URL = "unix:///var/run/docker.sock"
_WAIT_POLL_S = 60.0  # a blocked wait for a container's exit is renewed this often (and the daemon re-checked)


class DockerEngine:
    """The Docker Engine API: one client, made on first use in a worker thread, shared by all docker launchers."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or _DEFAULT_URL
        self.timeout_s = timeout_s
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    async def call(self, what: str, fn: Callable[[docker.DockerClient], _T], *, timeout_s: float | None = None) -> _T:
        """Run `fn(client)` in a worker thread; a timeout or an API error becomes LaunchFailed naming `what`."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            with trio.fail_after(limit):
                return await trio.to_thread.run_sync(partial(self._run, what, fn), abandon_on_cancel=True)
        except trio.TooSlowError:
            raise LaunchFailed(f"docker: {what}: no answer within {limit:g} s from {self.base_url}") from None

    async def wait_exit(self, container: Any) -> int:
        """Block (in a worker thread, without a deadline) until the container exits; its exit code."""
        wait = partial(self._run, "wait", lambda _: _wait(container))
        return await trio.to_thread.run_sync(wait, abandon_on_cancel=True)

    def _run(self, what: str, fn: Callable[[docker.DockerClient], _T]) -> _T:
        try:
            return fn(self._connect())
        except LaunchFailed:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise LaunchFailed(f"docker: {what}: {_explain(exc)}") from None

    def _connect(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.DockerClient(base_url=self.base_url, timeout=int(self.timeout_s))
                except docker.errors.DockerException as exc:
                    raise LaunchFailed(f"the docker daemon at {self.base_url} is unreachable: {exc}") from None
            return self._client


class DockerLauncher:
    """Starts an existing container by name (creating it from `create` when missing), stops it when cancelled.

    `history` is its timeline, as for the process launcher: ("spawning", t) before the start call, ("exited", t)
    once the container is known to be stopped.
    """

    def __init__(self, name: str, spec: LaunchSpec, engine: DockerEngine) -> None:
        assert spec.container is not None
        self.name = name
        self.container_name = spec.container
        self.create = spec.create
        self.stop_timeout_s = spec.stop_timeout_s
        self.engine = engine
        self.history: collections.deque[tuple[str, float]] = collections.deque(maxlen=100)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the container and report started; raise LaunchFailed when it exits. Stop it when cancelled."""
        self.history.append(("spawning", trio.current_time()))
        container = None
        try:
            container = await self.engine.call(f"start {self.container_name}", self._start)
            task_status.started("")
            code = await self.engine.wait_exit(container)
            tail = await self._logs(container)
            raise LaunchFailed(f"container {self.container_name} exited with {code}:\n{tail}")
        finally:
            with trio.CancelScope(shield=True):
                if container is not None:
                    await self._stop(container)
                self.history.append(("exited", trio.current_time()))

    async def find_leftover(self) -> bool:
        """Whether the container is running already (left by a daemon that could not stop it)."""
        return await self.engine.call(f"inspect {self.container_name}", self._is_running)

    async def stop_leftover(self) -> None:
        container = await self.engine.call(f"inspect {self.container_name}", self._existing)
        if container is not None:
            await self._stop(container)

    def _is_running(self, client: docker.DockerClient) -> bool:
        container = self._existing(client)
        return container is not None and container.status == "running"

    def _existing(self, client: docker.DockerClient) -> Any:
        try:
            return client.containers.get(self.container_name)
        except docker.errors.NotFound:
            return None

    def _start(self, client: docker.DockerClient) -> Any:
        container = self._existing(client)
        if container is None:
            if self.create is None:
                raise LaunchFailed(
                    f"no container named {self.container_name!r} (create it, or set models.{self.name}.create)"
                ) from None
            container = client.containers.create(name=self.container_name, **_create_arguments(self.create))
            log.info("container created", extra={"fields": {"model": self.name, "container": self.container_name}})
        container.start()  # a running container (one being adopted) stays as it is
        return container

    async def _stop(self, container: Any) -> None:
        try:
            await self.engine.call(
                f"stop {self.container_name}",
                lambda _: container.stop(timeout=int(self.stop_timeout_s)),
                timeout_s=self.stop_timeout_s + self.engine.timeout_s,
            )
        except LaunchFailed as exc:
            log.error("container did not stop", extra={"fields": {"model": self.name, "error": str(exc)}})

    async def _logs(self, container: Any) -> str:
        try:
            raw = await self.engine.call("logs", lambda _: container.logs(tail=20))
        except LaunchFailed as exc:
            return str(exc)
        return bytes(raw).decode("utf-8", "replace").rstrip()


def _create_arguments(spec: ContainerSpec) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "image": spec.image,
        "command": spec.command or None,
        "environment": dict(spec.environment),
        "volumes": list(spec.mounts),
        "network_mode": spec.network_mode,
    }
    if spec.gpus:
        ids = None if spec.gpus == "all" else [g.strip() for g in spec.gpus.split(",")]
        arguments["device_requests"] = [
            docker.types.DeviceRequest(count=-1 if ids is None else None, device_ids=ids, capabilities=[["gpu"]])
        ]
    return arguments


def _wait(container: Any) -> int:
    while True:
        try:
            return int(container.wait(timeout=_WAIT_POLL_S)["StatusCode"])
        except requests.exceptions.RequestException:
            container.reload()  # raises when the daemon is gone
            if container.status not in ("created", "running", "restarting", "paused"):
                return int(container.attrs["State"]["ExitCode"])


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return f"{type(exc).__name__}: {exc}"
