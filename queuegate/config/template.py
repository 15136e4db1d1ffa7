"""The commented config template written by `queuegate init` (and shipped as `queuegate.toml.example`).

Values are rendered by tomli-w (`tomltext.py`), so they are always valid TOML; the defaults shown are read from the
config structs, so the documentation cannot drift from what QueueGate really does. Keys marked optional are written
commented out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from queuegate.config import (
    AffinityConfig,
    BatchesConfig,
    FleetConfig,
    MemoryConfig,
    NodesConfig,
    QueueConfig,
    ServerConfig,
    ToolsConfig,
    UpstreamDefaults,
    UsageConfig,
)
from queuegate.config.tomltext import comment, key_line


@dataclass(frozen=True)
class Key:
    name: str
    value: Any
    doc: str
    optional: bool = False  # written commented out: shown, not set


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    keys: list[Key]
    optional: bool = False  # written commented out, header included


def _defaults(struct: Any, docs: dict[str, str]) -> list[Key]:
    return [Key(name, getattr(struct, name), doc) for name, doc in docs.items()]


def template_tables() -> list[Table]:
    return [
        Table(
            "server",
            "How clients reach QueueGate.",
            _defaults(
                ServerConfig(),
                {
                    "listen": "host:port to listen on. Loopback by default; 0.0.0.0:8080 exposes it to the network.",
                    "state_dir": "Folder for state (usage DB, admin socket), relative to this file.",
                    "admin_socket": "Unix socket for `queuegate admin` and `queuegate top` (mode 0600, in a folder\n"
                    'only you may enter); "" = <state_dir>/admin.sock.',
                    "owned_by": "`owned_by` reported for every model in GET /v1/models.",
                    "max_body_mb": "Largest request body accepted; larger ones get 413.",
                    "body_timeout_s": "How long a client may take to send its request body (then 408).",
                    "write_timeout_s": "A client that reads nothing of its answer for this long is cut off, and its\n"
                    "request ends (upstream closed, GPU slot freed), e.g. a laptop suspended mid-stream.",
                    "keepalive_s": "An idle keep-alive connection is closed after this long.",
                    "backlog": "Connections the kernel queues before QueueGate accepts them (a burst of new clients);\n"
                    "capped by the kernel's net.core.somaxconn.",
                    "http2": "Serve HTTP/2 (h2c upgrade or prior knowledge) too. Off: such requests get 505 and\n"
                    "clients use HTTP/1.1, which every OpenAI client speaks.",
                    "cors_origins": "Origins whose web pages may call QueueGate (browser-side clients such as Open\n"
                    'WebUI direct connections), e.g. ["http://localhost:3000"]; "*" = any. Empty: no CORS.',
                    "shutdown_grace_s": "On SIGINT/SIGTERM: stop accepting, finish running requests this long; then\n"
                    "streams end with an error event saying the server is shutting down. A second signal: at once.",
                    "log_format": '"text" (key=value) or "json": one line per request with its id, model, timings.',
                    "log_level": '"debug", "info", "warning" or "error".',
                },
            ),
        ),
        Table(
            "upstream",
            "How QueueGate talks to upstream servers (all models).",
            _defaults(
                UpstreamDefaults(),
                {
                    "connect_timeout_s": "Connecting to an upstream; a failure is retried on another upstream.",
                    "first_byte_timeout_s": "From sending a request to its first byte (prompt processing can be slow).",
                    "idle_timeout_s": "Longest silence between two chunks of a response before it is cut (504).",
                    "total_timeout_s": "Longest one upstream response may take, first to last byte; 0 = no limit\n"
                    "(a stream of a long answer may rightly take a long time: idle_timeout_s guards it).",
                    "answer_timeout_s": "The same for a non-streamed answer, so a server that drips a byte now and\n"
                    "then cannot hold a slot for ever; 0 = no limit.",
                    "max_answer_mb": "Largest non-streamed answer QueueGate holds in memory; a larger one is a 502.",
                    "keepalive_connections": "Idle keep-alive connections kept open per upstream for reuse.",
                    "health_interval_s": "Health check period of a ready upstream (1 s while it is down or loading).",
                    "health_timeout_s": "A health check slower than this counts as failed (it is asked again if the "
                    "gateway itself was too busy to hear the answer).",
                },
            ),
        ),
        Table(
            "queue",
            "Requests wait here for a free upstream slot.",
            _defaults(
                QueueConfig(),
                {
                    "max_size": "Waiting requests; beyond it new requests get 429 with Retry-After.",
                    "max_wait_s": "A request that waited this long gets 503 with Retry-After.",
                    "classes": "Priority classes, highest first. /v1/chat/completions is user,\n"
                    "/v1/agent/chat/completions is agent; an X-Priority header may lower (never raise) it.",
                    "aging_s": "Starvation bound: a lower-class request waiting this long goes before\n"
                    "higher-class requests that arrived after it.",
                    "notify": "Queue notices for streamed chats that wait: auto (user class only) | always | never.\n"
                    "A notice is a reasoning_content delta with the position and expected wait.",
                    "notify_min_ms": "Notices start once a streamed request has waited this long.",
                    "keepalive_s": "While a notified request waits, an SSE comment this often keeps proxies from\n"
                    "cutting the idle stream.",
                    "user_header": "A header naming the end user behind a shared client (e.g. X-User-Id): each user\n"
                    "is a flow of its own, under its API key, so one user's many chats cannot crowd out another's.\n"
                    "Open WebUI's X-OpenWebUI-User-Id is always read.",
                },
            ),
        ),
        Table(
            "affinity",
            "Sticky chats: a chat's requests prefer the upstream that served it before (its prompt cache is warm).\n"
            "The chat is the header below, else X-OpenWebUI-Chat-Id, else the body's chat_id, conversation_id or\n"
            "metadata.chat_id, else a hash of the model, system prompt and first user message.",
            _defaults(
                AffinityConfig(),
                {
                    "header": "Header naming the chat.",
                    "ttl_s": "A chat sticks to its upstream for this long after its last request.",
                    "max_wait_ms": "How long a request waits for its busy sticky upstream before taking any free one.",
                },
            ),
        ),
        Table(
            "models.qwen3-coder",
            "A model: the table name is the name clients send as `model`.",
            [
                Key(
                    "upstreams",
                    ["http://127.0.0.1:8081/v1"],
                    "One or more OpenAI-compatible base URLs (ending in /v1).",
                ),
                Key("upstream_model", "qwen3-coder-30b", "Name sent upstream (default: the table name)."),
                Key(
                    "kind",
                    "llamacpp",
                    "vllm | ollama | llamacpp | tgi | sglang | localai | lmstudio | openai: sets the health path\n"
                    "and which endpoints exist (e.g. tgi has no embeddings: QueueGate answers 501 itself).",
                ),
                Key("max_concurrency", 2, "Requests in flight per upstream; more wait in the queue."),
                Key("max_queue", 64, "Waiting requests for this model (then 429); [queue].max_size still holds.", True),
                Key(
                    "rpm",
                    500,
                    "The upstream's own requests-per-minute limit (a cloud API's), per upstream: QueueGate\n"
                    "holds requests in the queue to stay under it instead of collecting 429s.",
                    True,
                ),
                Key("tpm", 30000, "The same for tokens (prompt + completion) per minute.", True),
                Key("aliases", ["coder"], "Other names for this model, e.g. roles such as planner or coder."),
                Key("memory", False, "false: [memory] leaves this model's chats alone (default true).", True),
                Key(
                    "tools",
                    "passthrough",
                    'How its tool calls are handled, overriding [tools].mode: "execute", "passthrough" or\n'
                    '"suppress" (a pure chat backend: tools are not sent, tool calls are dropped).',
                    True,
                ),
                Key(
                    "defaults",
                    {"temperature": 0.2},
                    "Request fields used when the client does not send them.",
                ),
                Key(
                    "api_key_env",
                    "BACKEND_KEY",
                    "Env var holding the upstream's API key (never logged).",
                    True,
                ),
                Key(
                    "health_path",
                    "/health",
                    'Health endpoint relative to the server root; "" disables checks.',
                    True,
                ),
                Key(
                    "endpoints",
                    ["chat", "completions"],
                    "Override the kind's endpoints (chat, completions,\n"
                    "embeddings, responses, messages): what this model's server serves.",
                    True,
                ),
            ],
        ),
        Table(
            "keys.alice",
            "Client API keys. With none the gateway is open (keep it on loopback); with any, every API request\n"
            "needs one (`Authorization: Bearer <key>` or `X-Api-Key`): 401 without, 403 for a model it may not use.",
            [
                Key("key_env", "ALICE_KEY", 'Environment variable holding the secret (or `key = "..."` inline).'),
                Key("class", "user", "Its requests' class at most (a route or X-Priority may only lower it)."),
                Key("models", ["qwen3-coder", "coder"], "Models (or aliases) it may use; empty or absent: all."),
                Key(
                    "rpm",
                    30,
                    "Requests per minute. Over it, requests wait in the queue for the window (cancellable) instead\n"
                    "of failing; only a wait longer than [queue].max_wait_s is refused: 429 with Retry-After.",
                ),
                Key(
                    "tpm",
                    200000,
                    "Tokens (prompt + completion) per minute, the same way. A request is charged its prompt\n"
                    "estimate plus its max_tokens when it starts, corrected to its real usage when it ends.",
                ),
                Key(
                    "usage_admin",
                    False,
                    "true: it may read every key's usage (GET /v1/usage, /sessions/status), not only its own.",
                ),
            ],
            optional=True,
        ),
        Table(
            "nodes",
            "Nodes: hosts that register the models they serve at runtime with POST /v1/nodes/register and a node\n"
            "key, then send the same registration as their heartbeat. Their upstreams join the models of that name\n"
            "(or models of their own) until the node goes stale.",
            _defaults(
                NodesConfig(),
                {
                    "stale_after_s": "A node without a heartbeat this long (or its registration's ttl_s) is stale:\n"
                    "its upstreams take no requests (the error names the node) until its next heartbeat.",
                    "forget_after_s": "Stale this long, a node is forgotten: its upstreams are removed, with the\n"
                    "models only it served, and its name is free again.",
                    "wait_s": "After a node turns stale, requests for its models wait this long for it to come back\n"
                    "(queued); then, and with 0 at once, they get 503 with Retry-After and the node's name.",
                    "allow_networks": "Where a registered base URL may point (its host must resolve only to these):\n"
                    "a stolen node key cannot send traffic elsewhere. Default: loopback and private ranges.",
                },
            ),
        ),
        Table(
            "nodes.box3",
            "A node the gateway polls (any OpenAI-compatible server: vLLM, llama-server, Ollama, another\n"
            "QueueGate) rather than one that registers itself: every poll_s it is asked GET <url>/models, and what\n"
            "it lists is registered as node box3 would register it (allow_networks holds; 3 failed polls: stale).",
            [
                Key("url", "http://10.0.0.5:8000/v1", "Required. Its OpenAI-compatible base URL."),
                Key("kind", "vllm", "What its models are (endpoints, health check, quirks); default openai."),
                Key("models", ["llama3"], "Take only these of what it lists (default: all).", True),
                Key("key_env", "BOX3_KEY", "Env var holding the API key it takes, sent as a Bearer token.", True),
                Key("max_concurrency", 4, "Requests in flight at once, per model."),
                Key("poll_s", 10.0, "How often it is asked what it serves."),
            ],
            optional=True,
        ),
        Table(
            "node",
            "Only in a node's own config (`queuegate node`): this host serves its [models] (launched and swapped on\n"
            "its [devices] as usual) as a node of the gateway named here, and registers them there every heartbeat.\n"
            "Its API then takes the gateway's requests (with a key made for each run) and those of its own [keys].",
            [
                Key("name", "box1", "Required. How the gateway names this node (letters, digits, . _ -)."),
                Key("gateway", "http://10.0.0.2:8080", "Required. The gateway's base URL."),
                Key("key_env", "BOX1_NODE_KEY", "Required. Environment variable holding this node's key."),
                Key("advertise", "http://10.0.0.5:8090", 'Where the gateway reaches it; "" = its listen address.'),
                Key("heartbeat_s", 10.0, "How often it registers again (stale at the gateway after 3 missed)."),
            ],
            optional=True,
        ),
        Table(
            "node_keys.box1",
            "Node keys: what a node presents to register (`Authorization: Bearer <node key>`). Separate from\n"
            "client keys (a node key calls no API; a client key registers no node). With none, registration is off.",
            [Key("key_env", "BOX1_NODE_KEY", 'Environment variable holding the secret (or `key = "..."` inline).')],
            optional=True,
        ),
        Table(
            "usage",
            "Token accounting: a row per request (key, session, model, tokens, outcome) in SQLite,\n"
            "read with GET /v1/usage and GET /sessions/status.",
            _defaults(
                UsageConfig(),
                {
                    "enabled": "false: record nothing (the usage routes answer 404).",
                    "path": '"" = <state_dir>/usage.sqlite3; relative to this file.',
                    "flush_ms": "Rows are committed in a batch this often, off the request path: the most a\n"
                    "crash or kill -9 can lose. A graceful stop commits everything.",
                    "retention_days": "Rows older than this are deleted (hourly); 0 = keep forever.",
                    "timezone": 'Where usage days start and end: "UTC" or an IANA name such as "Europe/Berlin"\n'
                    "(also for dates in GET /v1/usage?since=...).",
                    "durable": "true: each request's row is committed before its answer's last byte is sent, so a\n"
                    "crash or kill -9 loses no row of an answer a client received whole (rows of requests\n"
                    "finishing together share one commit; scripts/bench_usage.py measures the cost).",
                },
            ),
        ),
        Table(
            "tools",
            "Tool calling. With a tool server configured, QueueGate offers its tools to the model beside the\n"
            "client's own, runs the calls the model makes, feeds the results back and asks again until the model\n"
            "answers (execute); the client sees one answer (streamed: one message, progress as reasoning).",
            _defaults(
                ToolsConfig(),
                {
                    "mode": '"auto" (execute when a tool server is configured, else passthrough), "execute",\n'
                    '"passthrough" (tool calls go back to the client) or "suppress" (no tools upstream, tool calls\n'
                    "dropped). POST /v1/chat/completions_passthrough always passes through; POST\n"
                    "/v1/agent/chat/completions always executes. A model's `tools` overrides this.",
                    "max_rounds": "Rounds of tool calls per request; then one last round without tools lets the\n"
                    "model answer with what it has (the answer's `queuegate.bound` says which bound).",
                    "max_calls": "Tool calls per request, all rounds together (the same when reached).",
                    "call_timeout_s": "One call's bound; a call past it becomes an error result for the model.",
                    "loop_timeout_s": "Rounds and calls together: calls are cut at it, and no round after it\n"
                    "calls tools.",
                    "max_result_chars": "A result longer than this is cut, with a note saying so.",
                    "text_tool_calls": "Read tool calls a model writes as text ([TOOL_CALLS]..., <tool_call>...)\n"
                    "into OpenAI tool_calls, for requests that offer tools.",
                    "refresh_s": "How often the tool servers' OpenAPI documents are read again (a server that is\n"
                    "down is retried within seconds; a call answered 404 triggers a read at once).",
                },
            ),
        ),
        Table(
            "tools.servers.time",
            "An OpenAPI tool server (mcpo in front of MCP servers, or any FastAPI app): each operation is a\n"
            "tool, named after its path (mcpo's POST /get_current_time is get_current_time). One that is down\n"
            "at start is a warning; it is picked up when it comes back.",
            [
                Key("url", "http://127.0.0.1:8000", "Required. The server's base URL."),
                Key("prefix", "", 'Where its operations and /openapi.json live under url ("" = the root, as mcpo).'),
                Key("api_key_env", "TOOLS_KEY", "Env var holding its API key, sent as a Bearer token.", True),
                Key("allow", ["get_current_time"], "The tools it may offer (default: all).", True),
                Key("rename", {"convert_time": "time_convert"}, "A tool's name -> the name the model sees.", True),
                Key("timeout_s", 10.0, "One call's bound for this server (default: [tools].call_timeout_s).", True),
            ],
            optional=True,
        ),
        Table(
            "batches",
            'Batch jobs: OpenAI\'s Files and Batches APIs (client.files.create(purpose="batch"),\n'
            "client.batches.create). Lines run in the lowest class, one model at a time, and survive restarts\n"
            "(at least once upstream, exactly once in the output file). State under <state_dir>/batches.",
            _defaults(
                BatchesConfig(),
                {
                    "enabled": "false: no /v1/files or /v1/batches (404).",
                    "max_file_mb": "Largest input file accepted (POST /v1/files); larger ones get 413.",
                    "max_lines": "Most lines in one batch; a file with more fails its batch.",
                    "max_concurrency": "Lines of one batch in flight at once (each takes a queue slot like any\n"
                    "request, in the lowest class: users are served first).",
                    "max_attempts": "Tries per line for what waiting may fix (no connection, timeouts, 5xx, 429);\n"
                    "then it goes to the batch's error file with its last answer. Other 4xx are not retried.",
                    "retry_base_s": "The first retry waits about this long (jittered), each next one twice as long.",
                    "retention_days": "Finished batches and their files are deleted after this; 0 = keep them.",
                },
            ),
        ),
        Table(
            "memory",
            "Chat memory: for each chat turn QueueGate recalls what matters from earlier in the chat, forwards\n"
            "only the system prompt and the last few messages plus what it recalled, and remembers the answered\n"
            "turn afterwards (off the request path). A chat is its sticky-chat id (the [affinity] header, Open\n"
            "WebUI's chat id, body chat_id, else the hash of its start), scoped by API key and session.",
            _defaults(
                MemoryConfig(),
                {
                    "enabled": "true: recall and remember for every chat model (a model's `memory = false` opts out).",
                    "backend": '"builtin": a SQLite file with full-text ranking (FTS5, BM25); "toolserver": the\n'
                    "memory operations of a [tools.servers] entry (see `server`).",
                    "server": "backend toolserver: the [tools.servers] entry whose operations hold the memory.",
                    "query_tool": 'Its recall operation: gets {"namespace", "query", "k"}, answers a list of snippets\n'
                    '(strings, or objects with a "text", "document" or "content" field).',
                    "upsert_tool": 'Its remember operation: gets {"namespace", "text"}.',
                    "path": '"" = <state_dir>/memory.sqlite3 (created 0600: it holds what users said).',
                    "truncate_history": "Forward only the system messages and the last turns (from a user message,\n"
                    "so roles alternate; never turns the store does not hold).",
                    "keep_last": "User/assistant messages forwarded as they are.",
                    "query_k": "Snippets recalled per turn, the most relevant first.",
                    "embed_model": "builtin: one of [models] with the embeddings endpoint; turns are then ranked by\n"
                    "meaning too (sqlite-vec), fused with the words' ranking. Turns are embedded in the lowest class\n"
                    "while the model is loaded (at most every 5 minutes one may load it); a question only while it\n"
                    'is loaded (a recall never waits for a load: give it `preload = true`). "" = by words alone.',
                    "inject_role": '"system": the recalled context (labelled as data, not instructions) is added to\n'
                    'the end of the system prompt; "user": before the text of the first forwarded user message.',
                    "hint": "In execute mode (QueueGate runs the tools): offer a chat that remembers something a\n"
                    "`memory_query` tool that searches its memory, and add one line saying more can be recalled\n"
                    "with it (not when the client or a tool server offers a tool of that name).",
                    "upsert": "Remember each answered turn (a streamed one only when it ended whole).",
                    "max_upsert_chars": "A remembered turn is cut to this many characters.",
                    "for_agents": "Also for the agent class (by default agents manage their own context).",
                    "timeout_ms": "A recall slower than this is skipped: the turn goes on untouched (never cut\n"
                    "without recall), the outage is logged once and counted in /metrics.",
                    "retention_days": "Remembered turns older than this are deleted (hourly); 0 = keep for ever.",
                },
            ),
        ),
        Table(
            "fleet",
            "Models QueueGate starts itself (launcher = process or docker): loading, swapping, unloading.",
            _defaults(
                FleetConfig(),
                {
                    "swap_after_ms": "While a loaded model still has work, requests for another model on its device\n"
                    "wait at most this long (from their arrival or the loaded model's load, whichever is later)\n"
                    "before it is drained and swapped out. Stops A/B/A/B thrashing without starving B. A request\n"
                    "of a higher class than all of the loaded model's work swaps at once.",
                    "idle_grace_ms": "A model whose last request ended less than this ago still counts as busy, so\n"
                    "a client sending requests one after another keeps its model loaded.",
                    "health_poll_ms": "Health polling while a model loads: its first request goes out this soon\n"
                    "after the server answers healthy.",
                    "restart_attempts": "A server that exits unasked is restarted this many times in a row (its\n"
                    "requests wait), then the model is failed and its requests get 503 with the reason.",
                    "restart_backoff_s": "Wait before the first restart; doubles with each further one.",
                    "failure_hold_s": "A failed model refuses requests this long, then loads again on demand.",
                    "abandoned_load": 'When every client waiting for a loading model has left: "finish" the load\n'
                    '(it stays for ttl_s) or "abort" it.',
                    "docker_url": 'Docker Engine API for launcher = "docker"; "" = $DOCKER_HOST, else\n'
                    "unix:///var/run/docker.sock. podman's `podman system service` works too.",
                    "docker_timeout_s": "Longest a Docker API call may take (an unreachable daemon is an error).",
                },
            ),
        ),
        Table(
            "devices.gpu0",
            "A GPU (or any memory pool) shared by the models QueueGate starts. Models name it with `device`;\n"
            "QueueGate never loads more than memory_gb on it: it evicts idle models (least recently used first)\n"
            "or drains busy ones (see [fleet]).",
            [
                Key("memory_gb", 24, "Required. Memory the models on this device may use together."),
                Key("exclusive", False, "true: one model at a time, whatever their memory (single-GPU safety)."),
            ],
        ),
        Table(
            "models.gemma3-12b",
            "A model QueueGate starts on demand and stops when idle or when another needs its device.\n"
            "In a model's table ${PORT} is its port, ${MODEL} its name and ${PYTHON} the Python QueueGate runs on.",
            [
                Key(
                    "launcher",
                    "process",
                    '"external" (default: always on, you run it), "process" (QueueGate runs `cmd`) or\n'
                    '"docker" (QueueGate starts and stops the container named `container`).',
                ),
                Key(
                    "cmd",
                    [
                        *("llama-server", "-m", "/models/gemma-3-12b-it-Q4_K_M.gguf"),
                        *("--port", "${PORT}", "--alias", "${MODEL}"),
                    ],
                    "The server's command line (own process group; output kept for error messages).",
                ),
                Key("kind", "llamacpp", "As for external models: health path and endpoints."),
                Key("device", "gpu0", "The [devices] entry it runs on (none: no memory accounting)."),
                Key("memory_gb", 9.5, "What it uses on its device (weights + KV cache)."),
                Key("ttl_s", 600, "Stop it after this long without requests (default 0: never)."),
                Key("preload", False, "Load it at start-up (into free room only; it evicts nothing)."),
                Key("startup_timeout_s", 120.0, "From launch to healthy; longer counts as a failed start."),
                Key("stop_timeout_s", 10.0, "SIGTERM (or docker stop) grace before it is killed."),
                Key("port", 8090, "Port for ${PORT}; by default a free one is picked at start-up.", True),
                Key("env", {"CUDA_VISIBLE_DEVICES": "0"}, "Extra environment for `cmd`.", True),
                Key(
                    "upstreams",
                    ["http://127.0.0.1:${PORT}/v1"],
                    "Where it serves (the default shown). Required for docker.",
                    True,
                ),
            ],
        ),
        Table(
            "models.mistral-small",
            "A model in a container QueueGate starts and stops (it creates it from `create` if missing).",
            [
                Key("launcher", "docker", ""),
                Key("container", "vllm-mistral-small", "The container's name."),
                Key("upstreams", ["http://127.0.0.1:8000/v1"], "Where the container serves."),
                Key("kind", "vllm", ""),
                Key("device", "gpu0", ""),
                Key("memory_gb", 20.0, ""),
                Key(
                    "create",
                    {
                        "image": "vllm/vllm-openai:latest",
                        "command": ["--model", "mistralai/Mistral-Small-3.2-24B-Instruct-2506"],
                        "mounts": ["/srv/hf:/root/.cache/huggingface"],
                        "network_mode": "host",
                        "gpus": "all",
                    },
                    "How to create the container when it does not exist (image, command, environment,\n"
                    'mounts "host:container[:ro]", network_mode, gpus = "all" or "0,1").',
                    True,
                ),
            ],
        ),
    ]


HEADER = """\
# QueueGate configuration. Every key is optional unless noted; the values shown are the defaults.
# `${NAME}` in any string is replaced by the environment variable NAME (`$$` is a literal `$`).
# Check it with `queuegate check --config queuegate.toml`; run with `queuegate run --config queuegate.toml`.
"""


def render_template() -> str:
    parts = [HEADER]
    for table in template_tables():
        parts.append("\n" + comment(table.doc) + ("# " if table.optional else "") + f"[{table.name}]\n")
        for key in table.keys:
            if key.doc:
                parts.append(comment(key.doc))
            commented = key.optional or table.optional
            parts.append(("# " if commented else "") + key_line(key.name, key.value) + "\n")
    return "".join(parts)
