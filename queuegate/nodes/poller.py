"""Nodes named in the gateway's config (`[nodes.NAME] url = ...`): hosts the gateway polls rather than ones that
register themselves, such as a vLLM or Ollama box that runs no QueueGate.

Every `poll_s` the poller asks the host what it serves (`GET <url>/models`, with its key) and registers that as node
NAME would register itself: the registry's checks (`allow_networks`), upstreams, staleness and forgetting all apply.
A poll that fails is a missed heartbeat: three in a row make the node stale. A reload that changes these tables
restarts the polls; a node no longer named is removed (its requests in flight finish).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping

import httpx
import msgspec
import trio

from queuegate.config import PolledNodeConfig
from queuegate.errors import Forbidden, GatewayError
from queuegate.nodes.registry import (
    CONFIG_OWNER,
    MAX_MODELS,
    MODEL_NAME,
    NodeRegistry,
    RegisteredModel,
    Registration,
)

log = logging.getLogger("queuegate.nodes")

POLLED_FROM = "127.0.0.1"  # the operator named it: trusted as a node on this host is (allow_networks still holds)
POLL_TIMEOUT_S = 5.0  # the whole poll
MAX_ANSWER_BYTES = 2**20  # a model list larger than this is not one
MISSED_POLLS = 3


class _ModelList(msgspec.Struct):
    data: list[_Listed]


class _Listed(msgspec.Struct):
    id: str
    alias_for: str | None = None  # (another QueueGate lists its aliases too: they are not models of their own)


class NodePoller:
    def __init__(
        self,
        polled: dict[str, PolledNodeConfig],
        registry: NodeRegistry,
        client: httpx.AsyncClient,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._polled = polled
        self._registry = registry
        self._client = client
        self._environ = os.environ if environ is None else environ
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every named node until cancelled; start again when `set_nodes` changes them."""
        task_status.started()
        while True:
            polled = self._polled
            async with trio.open_nursery() as nursery:
                for name, node in polled.items():
                    nursery.start_soon(self._poll, name, node)
                await self._changed.wait()
                nursery.cancel_scope.cancel()
            self._changed = trio.Event()
            for name in polled.keys() - self._polled.keys():  # (once no poll of theirs can register them again)
                with contextlib.suppress(KeyError, Forbidden):  # (never reached)
                    self._registry.deregister(CONFIG_OWNER, name)

    def set_nodes(self, polled: dict[str, PolledNodeConfig]) -> None:
        """A reload's `[nodes.NAME]` tables: those no longer named leave, the rest are polled again."""
        self._polled = polled
        self._changed.set()

    async def _poll(self, name: str, node: PolledNodeConfig) -> None:
        key = self._environ.get(node.key_env, "") if node.key_env else ""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        failing: str | None = None  # the last failure logged (each new one is, once)
        skipped: list[str] = []  # the names it lists that cannot be model names here (logged when they change)
        while True:
            try:
                registration, unusable = await self._registration(name, node, key, headers)
                if unusable != skipped:
                    fields = {"node": name, "models": unusable[:20]}
                    log.warning("polled node lists models whose names cannot be used", extra={"fields": fields})
                skipped = unusable
                await self._registry.register(CONFIG_OWNER, POLLED_FROM, registration)
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, trio.TooSlowError, GatewayError) as exc:
                # (ValueError: msgspec's, an answer too large, a URL httpx cannot use)
                error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                if error != failing:
                    fields = {"node": name, "url": node.url, "error": error}
                    log.warning("polled node did not answer with what it serves", extra={"fields": fields})
                failing = error
            else:
                if failing is not None:
                    log.info("polled node answers again", extra={"fields": {"node": name}})
                failing = None
            await trio.sleep(node.poll_s)

    async def _registration(
        self, name: str, node: PolledNodeConfig, key: str, headers: dict[str, str]
    ) -> tuple[Registration, list[str]]:
        """What the node serves now, as a registration of node `name`; the names it lists that cannot be used (not
        model names, or past the most a node may register)."""
        content = bytearray()
        with trio.fail_after(POLL_TIMEOUT_S):
            async with self._client.stream("GET", node.url.rstrip("/") + "/models", headers=headers) as answer:
                answer.raise_for_status()
                async for chunk in answer.aiter_bytes():
                    content += chunk
                    if len(content) > MAX_ANSWER_BYTES:
                        raise ValueError(f"its model list is larger than {MAX_ANSWER_BYTES} bytes")
        listed = [m.id for m in msgspec.json.decode(content, type=_ModelList).data if m.alias_for is None]
        wanted = [m for m in dict.fromkeys(listed) if not node.models or m in node.models]
        # A name that is no model name here, or that a node may not serve (an alias, a model this gateway starts).
        named = [m for m in wanted if MODEL_NAME.match(m) and self._registry.refusal(m) is None]
        unusable = [m for m in wanted if m not in named] + named[MAX_MODELS:]
        taken = named[:MAX_MODELS]
        models = [
            RegisteredModel(
                name=model,
                base_url=node.url,
                kind=node.kind,
                max_concurrency=node.max_concurrency,
                api_key=key or None,
            )
            for model in taken
        ]
        ttl_s = min(node.poll_s * MISSED_POLLS + POLL_TIMEOUT_S, 3600.0)
        return Registration(node=name, models=models, ttl_s=ttl_s), unusable
