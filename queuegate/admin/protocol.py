"""The admin protocol: newline-delimited JSON over a local Unix socket, one msgspec type per message.

Shared by the daemon, `queuegate admin` and `queuegate top`. The daemon greets every connection with `Hello`
(carrying the protocol version); each request carries an `id` that its reply repeats. `Subscribe` answers with a
snapshot, then sends `Snapshot` updates (id 0) at most every `interval_ms` (200 ms or more) while something changed,
and at least every second (durations tick). A malformed or unknown message gets an `Error`; the connection stays usable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from queuegate.statistics import (
    BatchStatistics,
    FleetStatistics,
    NodeStatistics,
    RequestStatistics,
    SchedulerStatistics,
    ToolServerStatistics,
)

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024


class _Message(msgspec.Struct, tag_field="op", kw_only=True, forbid_unknown_fields=True):
    id: int = 0


class Status(_Message, tag="status"):
    """One snapshot of the daemon."""


class Subscribe(_Message, tag="subscribe"):
    """A snapshot now, then updates while attached."""

    interval_ms: Annotated[int, msgspec.Meta(ge=200)] = 250  # at most five updates a second


class Preload(_Message, tag="preload"):
    model: str


class Evict(_Message, tag="evict"):
    model: str


class Drain(_Message, tag="drain"):
    """Take an upstream out: no new requests, those in flight finish."""

    upstream: str


class Undrain(_Message, tag="undrain"):
    upstream: str


class Cancel(_Message, tag="cancel"):
    """End a request: a queued one gets an error, a streaming one is cut."""

    request_id: str


class Pause(_Message, tag="pause"):
    """Hold a class's requests in the queue."""

    klass: str = msgspec.field(name="class")


class Resume(_Message, tag="resume"):
    klass: str = msgspec.field(name="class")


class Reload(_Message, tag="reload"):
    """Read the config file again; the reply says what was applied and what needs a restart."""


class Memory(_Message, tag="memory"):
    """Chat memory: list its chats (namespaces), show one's remembered turns, or forget one (a user's "delete my
    chat")."""

    action: Literal["list", "show", "forget"]
    namespace: str = ""


class Batch(_Message, tag="batch"):
    """A batch job: pause it (its lines in flight finish, no new one starts), resume it, or cancel it."""

    action: Literal["pause", "resume", "cancel"]
    batch_id: str


Request = Status | Subscribe | Preload | Evict | Drain | Undrain | Pause | Resume | Cancel | Reload | Memory | Batch


class DaemonStatus(msgspec.Struct, frozen=True):
    at: float  # Unix time of the snapshot
    uptime_s: float
    listen: str  # the OpenAI base URL
    scheduler: SchedulerStatistics
    fleet: FleetStatistics
    requests: list[RequestStatistics]  # in progress, oldest first, at most REQUEST_LIST_LIMIT
    requests_total: int
    finished_total: int  # requests that ended since start (rates come from two snapshots)
    tokens_total: int  # completion tokens they produced
    tool_servers: list[ToolServerStatistics] = []  # the OpenAPI tool servers, up or not, and their tools
    nodes: list[NodeStatistics] = []  # the registered nodes, live or stale
    batches: list[BatchStatistics] = []  # the batch jobs being run


class Hello(_Message, tag="hello"):
    version: int
    pid: int


class Ok(_Message, tag="ok"):
    message: str


class Error(_Message, tag="error"):
    message: str


class Snapshot(_Message, tag="snapshot"):
    status: DaemonStatus


Reply = Hello | Ok | Error | Snapshot

request_decoder = msgspec.json.Decoder(Request)
reply_decoder = msgspec.json.Decoder(Reply)
encoder = msgspec.json.Encoder()


def encode_line(message: Request | Reply) -> bytes:
    return encoder.encode(message) + b"\n"


# -- the clients' side (the trio client and the asyncio one share it) ---------------------------------------------


class AdminUnavailable(Exception):
    """No daemon answers on the socket, or it speaks another protocol version."""


def no_daemon(path: object, exc: OSError) -> str:
    """Why no daemon answered at `path`, and how to point the command at another one."""
    return (
        f"no QueueGate daemon at {path}: {exc.strerror or exc} (a daemon's socket is <state_dir>/admin.sock beside "
        "its config: run this where its queuegate.toml is, or pass --config FILE or --socket PATH)"
    )


class AdminError(Exception):
    """The daemon refused the request; the message says why."""


def parse_reply(line: bytes | None, path: Path) -> Reply:
    """A line read from the daemon (None or empty: the connection ended) as a reply."""
    if not line:
        raise AdminUnavailable(f"the daemon at {path} closed the connection")
    return reply_decoder.decode(line)


def check_hello(reply: Reply, path: Path) -> Hello:
    """The daemon's greeting, if it speaks this protocol version."""
    if not isinstance(reply, Hello) or reply.version != PROTOCOL_VERSION:
        raise AdminUnavailable(f"the daemon at {path} speaks another admin protocol ({reply!r})")
    return reply


def result(reply: Reply) -> Reply:
    """A request's reply, or AdminError with the reason the daemon gave."""
    if isinstance(reply, Error):
        raise AdminError(reply.message)
    return reply
