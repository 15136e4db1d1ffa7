"""A node's side (`queuegate node`): this daemon serves its own models, launching and swapping them on its own
devices as any QueueGate does, and registers them with the gateway named in `[node]`.

Each of its models is registered as one upstream at this daemon's API (`advertise`, else the address it listens
on), with the daemon's health (`/healthz`) and a key made for this run: the gateway sends it with every request, and
this daemon's API takes no other request without a key of its own `[keys]`. The registration is sent again every
`heartbeat_s` (the gateway's answer may ask for more often); a gateway that cannot be reached is retried, its outage
logged once. Each registration carries the node's inventory: its models' states and load progress, its devices, and
its GPUs' measured memory. The gateway's answer may ask it to load or stop models (an operator's preload or evict
there); this daemon's planner does that as it would for its own operator. At shutdown the node leaves
(`DELETE /v1/nodes/<name>`), so the gateway stops sending it requests before its stale timer would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from queuegate.config import NodeConfig
from queuegate.fleet.catalog import Catalog
from queuegate.nodes.gpus import GpuMeter
from queuegate.statistics import FleetModelStatistics, FleetStatistics, GpuMemory, NodeDeviceStatistics

log = logging.getLogger("queuegate.nodes")

HEALTH_PATH = "/healthz"
LEAVE_TIMEOUT_S = 3.0
MISSED_HEARTBEATS = 3  # the gateway takes the node for stale after this many heartbeats did not come


class NodeFleet(Protocol):
    """What the agent reports and asks of this daemon's fleet (`fleet.manager.Fleet`)."""

    def statistics(self) -> FleetStatistics: ...

    def preload(self, model: str) -> None: ...

    def evict(self, model: str) -> None: ...


class NodeAgent:
    def __init__(
        self,
        config: NodeConfig,
        catalog: Catalog,
        fleet: NodeFleet,
        api_key: str,
        client: httpx.AsyncClient,
        environ: Mapping[str, str],
    ) -> None:
        """`api_key`: the key this run's API takes from the gateway; `environ` holds the node key (`key_env`)."""
        self.config = config
        self._catalog = catalog
        self._fleet = fleet
        self._gpus = GpuMeter()
        self._gpus_now: list[GpuMemory] = []  # the last measure
        self._api_key = api_key
        self._client = client
        self._headers = {"authorization": f"Bearer {environ[config.key_env]}"}
        self._gateway = config.gateway.rstrip("/")
        self.registered = False  # the gateway took the last registration
        self._failing = False

    async def run(
        self, listening_at: str, stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register, and again every heartbeat, until `stop` is set; then leave. `listening_at`: this daemon's URL."""
        base_url = (self.config.advertise or listening_at).rstrip("/") + "/v1"
        if not self.config.advertise and urlsplit(listening_at).hostname in ("0.0.0.0", "::"):
            log.warning(
                "node listens on every address but has no [node].advertise: the gateway cannot reach it",
                extra={"fields": {"listen": listening_at}},
            )
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._measure_gpus)
            interval = self.config.heartbeat_s
            while not stop.is_set():
                interval = await self._register(base_url) or interval
                with trio.move_on_after(interval if self.registered else min(interval, 2.0)):
                    await stop.wait()
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT_S):
            await self._leave()

    async def _measure_gpus(self) -> None:
        """Measure the GPUs every heartbeat, on a task of its own: a slow or stuck tool never delays a heartbeat,
        which sends the last measure."""
        while True:
            self._gpus_now = await self._gpus.measure()
            await trio.sleep(self.config.heartbeat_s)

    def registration(self, base_url: str, gpus: list[GpuMemory]) -> dict[str, Any]:
        """What this node serves and holds, as the gateway takes it (POST /v1/nodes/register)."""
        fleet = self._fleet.statistics()
        planned = {m.name: m for m in fleet.models if m.managed}  # (an external model's state is not the planner's)
        models = [
            {
                "name": spec.name,
                "base_url": base_url,
                "kind": "openai",  # (this daemon speaks OpenAI's API, whatever kind its own upstreams are)
                "aliases": list(spec.aliases),
                "max_concurrency": max(1, min(1024, sum(u.capacity for u in spec.upstreams))),
                "health_path": HEALTH_PATH,
                "api_key": self._api_key,
                "state": planned[spec.name].state if spec.name in planned else None,
                "load_eta_s": _load_eta_s(planned.get(spec.name)),
            }
            for spec in self._catalog.models.values()
        ]
        devices = [NodeDeviceStatistics(d.name, d.memory_gb, d.used_gb, d.models) for d in fleet.devices]
        ttl_s = self.config.heartbeat_s * MISSED_HEARTBEATS
        return {
            "node": self.config.name,
            "models": models,
            "ttl_s": min(ttl_s, 3600.0),
            "devices": msgspec.to_builtins(devices),
            "gpus": msgspec.to_builtins(gpus),
        }

    async def _register(self, base_url: str) -> float | None:
        """Send the registration; how soon the gateway wants the next (None: not answered)."""
        registration = self.registration(base_url, self._gpus_now)
        try:
            answer = await self._client.post(
                self._gateway + "/v1/nodes/register", json=registration, headers=self._headers
            )
            if answer.status_code != 200:
                raise RegistrationRefused(f"the gateway answered {answer.status_code}: {_message(answer)}")
            heartbeat_s = _heartbeat_s(answer)
        except (httpx.HTTPError, RegistrationRefused) as exc:
            self.registered = False
            if not self._failing:
                self._failing = True
                fields = {"gateway": self._gateway, "node": self.config.name, "error": str(exc)}
                log.warning("node cannot register with its gateway; trying again", extra={"fields": fields})
            return None
        if self._failing or not self.registered:
            fields = {"gateway": self._gateway, "node": self.config.name, "models": len(self._catalog.models)}
            log.info("node registered with its gateway", extra={"fields": fields})
        self._failing, self.registered = False, True
        self._do_asks(answer.json())
        return min(heartbeat_s, self.config.heartbeat_s)

    def _do_asks(self, answer: dict[str, Any]) -> None:
        """Load and stop what the gateway's answer asks for (its operator's preload and evict)."""
        for action, models in (("load", answer.get("load")), ("stop", answer.get("stop"))):
            for model in models if isinstance(models, list) else []:
                fields = {"model": model, "gateway": self._gateway}
                try:
                    (self._fleet.preload if action == "load" else self._fleet.evict)(str(model))
                except (KeyError, ValueError) as exc:  # (unknown, or not one this node starts)
                    fields["error"] = str(exc)
                    log.warning(f"the gateway asked to {action} a model this node cannot", extra={"fields": fields})
                    continue
                log.info(f"the gateway asked this node to {action} a model", extra={"fields": fields})

    async def _leave(self) -> None:
        try:
            answer = await self._client.delete(f"{self._gateway}/v1/nodes/{self.config.name}", headers=self._headers)
        except httpx.HTTPError:
            return  # (the gateway finds it stale instead)
        if answer.status_code == 200:
            log.info("node left its gateway", extra={"fields": {"gateway": self._gateway, "node": self.config.name}})


class RegistrationRefused(Exception):
    """The gateway answered the registration with an error."""


def _heartbeat_s(answer: httpx.Response) -> float:
    """The heartbeat the gateway's answer asks for. RegistrationRefused: that was no gateway's answer."""
    try:
        heartbeat_s = float(answer.json()["heartbeat_s"])
    except (ValueError, KeyError, TypeError) as exc:  # (JSON that is not a registration's answer, or no JSON)
        raise RegistrationRefused(f"the gateway's answer is not a registration's ({type(exc).__name__})") from None
    if not math.isfinite(heartbeat_s) or heartbeat_s <= 0:
        raise RegistrationRefused(f"the gateway asked for a heartbeat every {heartbeat_s} s")
    return heartbeat_s


def _load_eta_s(model: FleetModelStatistics | None) -> float | None:
    return None if model is None or model.progress is None else model.progress.eta_s


def _message(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:200]
