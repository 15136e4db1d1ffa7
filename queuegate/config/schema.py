"""The config's shape: one typed msgspec struct per table, with the defaults QueueGate uses.

Unknown keys are errors (a typo never silently does nothing); types and bounds are checked by msgspec when a config is
loaded (`load.py`), the rules a type cannot express by `checks.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from queuegate.vocabulary import CLASSES, ENDPOINTS, KINDS

Kind = Literal[KINDS]  # type: ignore[valid-type]  # the names, from the one list
Endpoint = Literal[tuple(ENDPOINTS)]  # type: ignore[valid-type]

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ConfigError(Exception):
    """The config cannot be used; the message names the file, the key path and what was expected."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base for config tables: unknown keys are errors, so a typo never silently does nothing."""


class ServerConfig(_Section):
    listen: str = "127.0.0.1:8080"
    state_dir: str = ".queuegate"
    admin_socket: str = ""  # "" = <state_dir>/admin.sock
    owned_by: str = "queuegate"
    max_body_mb: PositiveFloat = 16.0
    body_timeout_s: PositiveFloat = 60.0
    write_timeout_s: PositiveFloat = 30.0
    keepalive_s: PositiveFloat = 5.0
    backlog: PositiveInt = 4096
    http2: bool = False
    cors_origins: list[str] = []  # origins whose pages may call QueueGate ("*": any); empty: no CORS
    shutdown_grace_s: NonNegativeFloat = 30.0
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class UpstreamDefaults(_Section):
    """How QueueGate talks to every upstream: timeouts, connection pool, health checks."""

    connect_timeout_s: PositiveFloat = 10.0
    first_byte_timeout_s: PositiveFloat = 300.0
    idle_timeout_s: PositiveFloat = 120.0
    total_timeout_s: NonNegativeFloat = 0.0
    answer_timeout_s: NonNegativeFloat = 600.0
    max_answer_mb: PositiveFloat = 64.0
    keepalive_connections: PositiveInt = 64
    health_interval_s: PositiveFloat = 5.0
    health_timeout_s: PositiveFloat = 3.0


class QueueConfig(_Section):
    max_size: PositiveInt = 256
    max_wait_s: PositiveFloat = 600.0
    classes: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=lambda: list(CLASSES))
    aging_s: PositiveFloat = 30.0
    notify: Literal["auto", "always", "never"] = "auto"
    notify_min_ms: NonNegativeFloat = 1000.0
    keepalive_s: PositiveFloat = 10.0
    user_header: str = ""  # a header naming the end user behind a shared client (X-OpenWebUI-User-Id is always read)


class AffinityConfig(_Section):
    header: str = "X-Chat-Id"
    ttl_s: PositiveFloat = 600.0
    max_wait_ms: NonNegativeFloat = 500.0


class DeviceConfig(_Section):
    """A GPU (or any memory pool) that managed models share."""

    memory_gb: PositiveFloat
    exclusive: bool = False  # at most one model at a time, whatever the memory says


class FleetConfig(_Section):
    """How QueueGate starts, swaps and stops the models it manages (launcher = process or docker)."""

    swap_after_ms: NonNegativeFloat = 10000.0
    idle_grace_ms: NonNegativeFloat = 500.0
    health_poll_ms: PositiveFloat = 50.0
    restart_attempts: Annotated[int, msgspec.Meta(ge=0)] = 2
    restart_backoff_s: PositiveFloat = 2.0
    failure_hold_s: NonNegativeFloat = 30.0
    abandoned_load: Literal["finish", "abort"] = "finish"
    docker_url: str = ""
    docker_timeout_s: PositiveFloat = 30.0


class ContainerSpec(_Section):
    """How to create a model's container when it does not exist yet (launcher = docker)."""

    image: str
    command: list[str] = []
    environment: dict[str, str] = {}
    mounts: list[str] = []  # "host_path:container_path[:ro]"
    network_mode: str = "host"
    gpus: str = ""  # "" = none, "all", or device ids such as "0,1"


ToolMode = Literal["execute", "passthrough", "suppress"]


class ToolServerConfig(_Section):
    """An OpenAPI tool server (mcpo in front of MCP servers, or any FastAPI app) whose operations the model may call."""

    url: str
    prefix: str = ""  # where its operations (and /openapi.json) live under `url`; mcpo serves at the root
    api_key_env: str | None = None  # environment variable holding its API key (sent as a Bearer token)
    allow: list[str] = []  # the tools it exposes (by their names here); empty = every operation
    rename: dict[str, str] = {}  # tool name -> the name the model sees (two servers offering one name)
    timeout_s: NonNegativeFloat = 0.0  # one call's bound; 0 = [tools].call_timeout_s


class ToolsConfig(_Section):
    """Tool calling: QueueGate runs the calls to its tool servers (execute), hands them back (passthrough) or drops
    them (suppress)."""

    mode: Literal["auto", "execute", "passthrough", "suppress"] = "auto"  # auto: execute with a tool server
    max_rounds: PositiveInt = 8
    max_calls: PositiveInt = 16
    call_timeout_s: PositiveFloat = 30.0
    loop_timeout_s: PositiveFloat = 120.0
    max_result_chars: PositiveInt = 16000
    text_tool_calls: bool = True
    refresh_s: PositiveFloat = 300.0
    servers: dict[str, ToolServerConfig] = {}


class BatchesConfig(_Section):
    """The OpenAI Batch API (/v1/files, /v1/batches) on the local fleet: lines run in the lowest class, durably."""

    enabled: bool = True
    max_file_mb: PositiveFloat = 100.0  # largest input file accepted (POST /v1/files)
    max_lines: PositiveInt = 50_000  # lines in one batch
    max_concurrency: PositiveInt = 4  # lines of one batch in flight at once
    max_attempts: PositiveInt = 5  # per line: connect errors, 5xx, 429 and timeouts are tried again up to this
    retry_base_s: PositiveFloat = 2.0  # the first retry's wait; doubled each time, with jitter
    retention_days: NonNegativeFloat = 30.0  # finished batches and their files are deleted after this; 0 = kept


class MemoryConfig(_Section):
    """Chat memory: recall earlier turns for each chat turn, forward only the last few, remember the new one."""

    enabled: bool = False
    backend: Literal["builtin", "toolserver"] = "builtin"  # builtin: SQLite with full-text ranking, under state_dir
    server: str = ""  # backend toolserver: the [tools.servers] entry with the memory operations
    query_tool: str = "memory_query"
    upsert_tool: str = "memory_upsert"
    path: str = ""  # "" = <state_dir>/memory.sqlite3
    truncate_history: bool = True
    keep_last: Annotated[int, msgspec.Meta(ge=0)] = 4
    query_k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8
    embed_model: str = ""  # builtin: one of the fleet's embedding models, for ranking by meaning too ("": words only)
    inject_role: Literal["system", "user"] = "system"
    hint: bool = True  # execute mode: offer the model a memory_query tool for its chat, and say so in one line
    upsert: bool = True
    max_upsert_chars: PositiveInt = 12000
    for_agents: bool = False
    timeout_ms: PositiveFloat = 200.0
    retention_days: NonNegativeFloat = 0.0


class ModelConfig(_Section):
    upstreams: list[str] = []
    launcher: Literal["external", "process", "docker"] = "external"
    cmd: list[str] = []
    env: dict[str, str] = {}
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    container: str | None = None
    create: ContainerSpec | None = None
    device: str | None = None
    memory_gb: NonNegativeFloat = 0.0
    startup_timeout_s: PositiveFloat = 120.0
    stop_timeout_s: PositiveFloat = 10.0
    ttl_s: NonNegativeFloat = 0.0
    preload: bool = False
    upstream_model: str | None = None
    kind: Kind = "openai"
    api_key_env: str | None = None
    max_concurrency: PositiveInt = 4
    max_queue: PositiveInt | None = None
    rpm: PositiveInt | None = None  # each upstream's own requests-per-minute limit (cloud APIs); requests wait
    tpm: PositiveInt | None = None  # each upstream's own tokens-per-minute limit
    health_path: str | None = None
    endpoints: list[Endpoint] | None = None
    aliases: list[str] = []
    defaults: dict[str, Any] = {}
    tools: ToolMode | None = None  # how its tool calls are handled; None = [tools].mode
    memory: bool = True  # false: [memory] leaves this model's chats alone


class UsageConfig(_Section):
    """Token accounting: one row per request in SQLite, written in batches."""

    enabled: bool = True
    path: str = ""  # "" = <state_dir>/usage.sqlite3; relative paths resolve against the config file's folder
    flush_ms: PositiveFloat = 1000.0  # how often recorded rows are committed (the most a crash can lose)
    retention_days: NonNegativeFloat = 0.0  # rows older than this are deleted; 0 = keep forever
    timezone: str = "UTC"  # where a day starts and ends, an IANA name such as "Europe/Berlin"
    durable: bool = False  # commit each request's row before its answer's last byte is sent


class _SecretConfig(_Section):
    """A secret, inline or (better) from the environment; exactly one of the two."""

    key: str | None = msgspec.field(default=None)
    key_env: str | None = None

    def __repr__(self) -> str:  # the secret never reaches a log or an error
        return f"{type(self).__name__}(key_env={self.key_env!r})"


class NodeKeyConfig(_SecretConfig):
    """A node key: what a GPU host (or anything registering upstreams) presents to POST /v1/nodes/register. Never a
    client key: it opens registration, not the API."""


class PolledNodeConfig(_Section):
    """A host the gateway polls for what it serves (`[nodes.NAME]`), rather than one that registers itself: any
    OpenAI-compatible server (vLLM, llama-server, Ollama, another QueueGate)."""

    url: str  # its OpenAI-compatible base URL, e.g. http://10.0.0.5:8000/v1 (inside allow_networks)
    kind: Kind = "openai"  # what its models are (their endpoints, health check, quirks)
    models: list[str] = []  # take only these of the models it lists (empty: every one)
    key_env: str | None = None  # the environment variable with the API key it takes (none: it takes no key)
    max_concurrency: PositiveInt = 4  # per model: requests in flight at once
    poll_s: PositiveFloat = 10.0  # how often it is asked what it serves; 3 failed polls make it stale


class NodesConfig(_Section):
    """Hosts that register their models at runtime (`queuegate node`, or anything speaking POST /v1/nodes/register),
    and hosts the gateway polls (`[nodes.NAME]`)."""

    stale_after_s: PositiveFloat = 30.0  # no heartbeat this long: the node's upstreams take no requests
    forget_after_s: PositiveFloat = 3600.0  # stale this long: its upstreams (and models only it served) are removed
    wait_s: NonNegativeFloat = 0.0  # a request whose model only stale nodes serve waits this long for one (0: fails)
    # Where registered upstreams may point (a stolen node key cannot send traffic elsewhere): loopback, private.
    allow_networks: list[str] = msgspec.field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
    )
    polled: dict[str, PolledNodeConfig] = {}  # (from the [nodes.NAME] tables)


class NodeConfig(_Section):
    """This QueueGate is a node of another gateway (`queuegate node`): it serves its own models (launching and
    swapping them on its own devices) and registers them with the gateway, heartbeat after heartbeat."""

    name: str  # how the gateway names this node (letters, digits, . _ -)
    gateway: str  # the gateway's base URL, e.g. http://10.0.0.2:8080
    key_env: str  # the environment variable holding this node's key (a [node_keys] entry of the gateway)
    advertise: str = ""  # the URL the gateway reaches this node at; "" = http://<[server].listen>
    heartbeat_s: PositiveFloat = 10.0  # how often the registration is sent again (stale after 3 missed)


class KeyConfig(_SecretConfig):
    """A client API key: its secret (inline or, better, from the environment), its class and the models it may use."""

    klass: str = msgspec.field(default="user", name="class")
    models: list[str] = []  # names or aliases; empty = every model
    rpm: PositiveInt | None = None  # requests per minute; over it, requests wait for the window
    tpm: PositiveInt | None = None  # tokens (prompt + completion) per minute; the same
    usage_admin: bool = False  # may read every key's usage (GET /v1/usage, /sessions/status), not only its own

    def __repr__(self) -> str:  # the secret never reaches a log or an error
        return f"KeyConfig(class={self.klass!r}, models={self.models!r})"


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    upstream: UpstreamDefaults = msgspec.field(default_factory=UpstreamDefaults)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    affinity: AffinityConfig = msgspec.field(default_factory=AffinityConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    tools: ToolsConfig = msgspec.field(default_factory=ToolsConfig)
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    batches: BatchesConfig = msgspec.field(default_factory=BatchesConfig)
    nodes: NodesConfig = msgspec.field(default_factory=NodesConfig)
    node: NodeConfig | None = None  # set: this daemon is a node of another gateway
    devices: dict[str, DeviceConfig] = {}
    keys: dict[str, KeyConfig] = {}
    node_keys: dict[str, NodeKeyConfig] = {}
    models: dict[str, ModelConfig] = {}
    # Where the config came from; relative paths (state_dir) resolve against its folder.
    base_dir: str = "."
