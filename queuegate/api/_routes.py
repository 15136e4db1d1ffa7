"""What the routes need from the daemon (`Routes`), built by the composition root."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from queuegate.accounting import UsageStore
from queuegate.accounting.keys import KeyRing, NodeKeyRing
from queuegate.api._lifetime import InFlight
from queuegate.batches.service import BatchService
from queuegate.config import ServerConfig
from queuegate.fleet.catalog import Catalog
from queuegate.fleet.manager import Fleet
from queuegate.metrics import Metrics
from queuegate.nodes.registry import NodeRegistry
from queuegate.proxy import ActiveRequests, Proxy, RequestRecord
from queuegate.scheduler import Admission


@dataclass(frozen=True, slots=True)
class Routes:
    """What the routes need from the daemon, built by the composition root. `on_finish` takes note of every
    finished request (metrics, usage); `commit` is durable usage's wait for a request's row (None: batched)."""

    server: ServerConfig
    catalog: Catalog
    admission: Admission
    fleet: Fleet
    proxy: Proxy
    active: ActiveRequests
    keyring: KeyRing
    node_keys: NodeKeyRing
    nodes: NodeRegistry
    metrics: Metrics
    in_flight: InFlight
    classes: Sequence[str]
    usage: UsageStore | None
    on_finish: Callable[[RequestRecord, int], None]
    commit: Callable[[], Awaitable[None]] | None
    batches: BatchService | None = None  # the Files and Batches APIs ([batches].enabled)
    user_header: str = ""  # [queue].user_header: the end user behind a shared client, a flow of its own
