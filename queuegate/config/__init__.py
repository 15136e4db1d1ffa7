"""Configuration: typed msgspec structs, TOML loading, `${ENV}` interpolation and clear errors.

A bad config fails at start with the key path (`models.coder.max_concurrency`) and what was expected. Secret values
(keys read from the environment) never appear in an error message or a repr.
"""

from __future__ import annotations

import datetime
import os
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

Kind = Literal["vllm", "ollama", "llamacpp", "tgi", "sglang", "localai", "lmstudio", "openai"]
Endpoint = Literal["chat", "completions", "embeddings"]

_T = TypeVar("_T")
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
    classes: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["user", "agent", "batch"]
    )
    aging_s: PositiveFloat = 30.0
    notify: Literal["auto", "always", "never"] = "auto"
    notify_min_ms: NonNegativeFloat = 1000.0
    keepalive_s: PositiveFloat = 10.0


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


class UsageConfig(_Section):
    """Token accounting: one row per request in SQLite, written in batches."""

    enabled: bool = True
    path: str = ""  # "" = <state_dir>/usage.sqlite3; relative paths resolve against the config file's folder
    flush_ms: PositiveFloat = 1000.0  # how often recorded rows are committed (the most a crash can lose)
    retention_days: NonNegativeFloat = 0.0  # rows older than this are deleted; 0 = keep forever
    timezone: str = "UTC"  # where a day starts and ends, an IANA name such as "Europe/Berlin"
    durable: bool = False  # commit each request's row before its answer's last byte is sent


class KeyConfig(_Section):
    """A client API key: its secret (inline or, better, from the environment), its class and the models it may use."""

    key: str | None = msgspec.field(default=None)
    key_env: str | None = None
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
    devices: dict[str, DeviceConfig] = {}
    keys: dict[str, KeyConfig] = {}
    models: dict[str, ModelConfig] = {}
    # Where the config came from; relative paths (state_dir) resolve against its folder.
    base_dir: str = "."


# The classes QueueGate's routes assign: /v1/chat/completions is "user", /v1/agent/chat/completions is "agent".
ROUTE_CLASSES = ("user", "agent")

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Inside a model's table these stay literal for the launcher: ${PORT} (its port) and ${MODEL} (its name).
LAUNCH_MACROS = frozenset({"PORT", "MODEL"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    return parse_config(text, source=str(path), base_dir=str(path.resolve().parent), environ=environ)


def parse_config(
    text: str, *, source: str = "<config>", base_dir: str = ".", environ: dict[str, str] | None = None
) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return build_config(raw, source=source, base_dir=base_dir, environ=environ)


def build_config(
    raw: dict[str, Any],
    *,
    source: str = "<config>",
    base_dir: str = ".",
    environ: dict[str, str] | None = None,
) -> Config:
    """Validate an already-parsed mapping (from TOML, or built in code for the demo)."""
    env = os.environ if environ is None else environ
    data = _interpolate(raw, env, source, path="")
    # Named tables (one per model or device) are converted one by one, so an error names the table, not `[...]`.
    models = _convert_named(data.pop("models", {}), ModelConfig, source, "models")
    devices = _convert_named(data.pop("devices", {}), DeviceConfig, source, "devices")
    keys = _convert_named(data.pop("keys", {}), KeyConfig, source, "keys")
    config = _convert({**data, "base_dir": base_dir}, Config, source, "")
    config = msgspec.structs.replace(config, models=models, devices=devices, keys=keys)
    _check(config, source, env)
    return config


def _convert_named(tables: Any, type_: type[_T], source: str, key: str) -> dict[str, _T]:
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: at `{key}`: Expected `table`, got `{type(tables).__name__}`")
    return {name: _convert(table, type_, source, f"{key}.{name}") for name, table in tables.items()}


def _convert(data: Any, type_: type[_T], source: str, path: str) -> _T:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_readable(str(exc), path)}") from None


def _interpolate(value: Any, env: Any, source: str, path: str) -> Any:
    """Replace `${NAME}` with the environment variable NAME in every string; `$$` is a literal `$`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "$"
            if name in LAUNCH_MACROS and path.startswith("models."):
                return match.group(0)
            if name not in env:
                raise ConfigError(f"{source}: at `{path}`: environment variable {name} is not set")
            return str(env[name])

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, source, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, source, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _readable(message: str, prefix: str) -> str:
    """msgspec says 'Expected `int` >= 1 - at `$.max_concurrency`'; say 'at `models.x.max_concurrency`: ...'."""
    text, sep, where = message.rpartition(" - at `$")
    key = where.rstrip("`").lstrip(".") if sep else ""
    full = ".".join(p for p in (prefix, key) if p)
    if not sep:
        text = message
    return f"at `{full}`: {text}" if full else text


def _check(config: Config, source: str, env: Any) -> None:
    """Rules a type cannot express: names, URLs, unique aliases, listen address, env vars present."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: at `{key}`: {why}")

    parse_listen(config.server.listen, on_error=lambda why: fail("server.listen", why))
    classes = config.queue.classes
    for required in ROUTE_CLASSES:
        if required not in classes:
            fail("queue.classes", f"must include {required!r} (the class of its routes), got {classes}")
    if len(set(classes)) != len(classes):
        fail("queue.classes", f"each class may appear once, got {classes}")
    owners: dict[str, str] = {}
    for name in config.models:
        if not _NAME.match(name):
            fail(f"models.{name}", "a model name may use letters, digits and . _ : / @ + -")
        owners[name] = name
    for name, model in config.models.items():
        _check_launch(name, model, config, fail)
        for i, url in enumerate(model.upstreams):
            if not re.match(r"^https?://[^/\s]+", url):
                fail(
                    f"models.{name}.upstreams[{i}]",
                    f"expected an http(s) base URL such as http://host:8081/v1, got {url!r}",
                )
        for i, alias in enumerate(model.aliases):
            if not _NAME.match(alias):
                fail(f"models.{name}.aliases[{i}]", "an alias may use letters, digits and . _ : / @ + -")
            if alias in owners:
                fail(
                    f"models.{name}.aliases[{i}]",
                    f"{alias!r} is already the name or alias of model {owners[alias]!r}",
                )
            owners[alias] = name
        if model.api_key_env is not None and not env.get(model.api_key_env):
            fail(f"models.{name}.api_key_env", f"environment variable {model.api_key_env} is not set")
        if model.health_path is not None and model.health_path and not model.health_path.startswith("/"):
            fail(
                f"models.{name}.health_path",
                'expected a path starting with / (or "" to disable health checks)',
            )
        for key in ("model", "stream"):
            if key in model.defaults:
                fail(f"models.{name}.defaults.{key}", f"`{key}` cannot have a default; the client sets it")
    _check_keys(config, owners, env, fail)
    try:
        usage_timezone(config)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        fail("usage.timezone", f"no time zone {config.usage.timezone!r}; use an IANA name such as Europe/Berlin")


def _check_keys(config: Config, model_names: Any, env: Any, fail: Any) -> None:
    """Each key has one secret source that resolves, a known class, known models, and a secret of its own."""
    owners: dict[str, str] = {}
    for name, key in config.keys.items():
        where = f"keys.{name}"
        if (key.key is None) == (key.key_env is None):
            fail(where, "set exactly one of `key` (the secret) or `key_env` (the environment variable holding it)")
        if key.key_env is not None and not env.get(key.key_env):
            fail(f"{where}.key_env", f"environment variable {key.key_env} is not set")
        secret = key.key if key.key is not None else env.get(key.key_env, "")
        if len(secret) < 8:
            fail(where, "the secret must be at least 8 characters")
        if secret in owners:
            fail(where, f"the same secret as key {owners[secret]!r}: each key needs its own")
        owners[secret] = name
        if key.klass not in config.queue.classes:
            fail(f"{where}.class", f"expected one of the classes {config.queue.classes}, got {key.klass!r}")
        for i, model in enumerate(key.models):
            if model not in model_names:
                fail(f"{where}.models[{i}]", f"no model or alias {model!r}")


def _check_launch(name: str, model: ModelConfig, config: Config, fail: Any) -> None:
    """A model's launcher settings: what each launcher needs, and that its device can hold it."""
    key = f"models.{name}"
    if model.launcher == "external" and not model.upstreams:
        fail(f"{key}.upstreams", "expected at least one base URL such as http://host:8081/v1")
    if model.launcher == "process" and not model.cmd:
        fail(f"{key}.cmd", 'launcher = "process" needs the command that starts the server, e.g. ["llama-server", ...]')
    if model.launcher == "docker":
        if not model.container:
            fail(f"{key}.container", 'launcher = "docker" needs the name of the container to start and stop')
        if not model.upstreams:
            fail(f"{key}.upstreams", "expected the base URL the container serves on, e.g. http://127.0.0.1:8081/v1")
    if model.launcher != "external" and len(model.upstreams) > 1:
        fail(f"{key}.upstreams", f'launcher = "{model.launcher}" starts one server, so give at most one URL')
    for field_name in ("cmd", "env", "port", "container", "create"):
        if getattr(model, field_name) and not _launcher_uses(model.launcher, field_name):
            fail(f"{key}.{field_name}", f'not used with launcher = "{model.launcher}"')
    if model.device is None:
        return
    device = config.devices.get(model.device)
    if device is None:
        known = ", ".join(sorted(config.devices)) or "none configured"
        fail(f"{key}.device", f"no device {model.device!r} under [devices] ({known})")
    elif model.memory_gb > device.memory_gb:
        fail(
            f"{key}.memory_gb",
            f"{model.memory_gb:g} GB can never fit on device {model.device!r} ({device.memory_gb:g} GB)",
        )


def _launcher_uses(launcher: str, field_name: str) -> bool:
    if field_name in ("cmd", "env"):
        return launcher == "process"
    if field_name in ("container", "create"):
        return launcher == "docker"
    return launcher != "external"  # port


def admin_socket_path(config: Config) -> Path:
    """Where the daemon's admin socket is: `[server].admin_socket`, else <state_dir>/admin.sock; relative paths
    resolve against the config file's folder."""
    base = Path(config.base_dir)
    if config.server.admin_socket:
        return base / config.server.admin_socket
    return base / config.server.state_dir / "admin.sock"


def usage_timezone(config: Config) -> datetime.tzinfo:
    """The time zone usage days are counted in (`[usage].timezone`)."""
    name = config.usage.timezone
    return datetime.UTC if name == "UTC" else zoneinfo.ZoneInfo(name)


def usage_db_path(config: Config) -> Path:
    """Where the usage database is: `[usage].path`, else <state_dir>/usage.sqlite3 (relative to the config file)."""
    base = Path(config.base_dir)
    if config.usage.path:
        return base / config.usage.path
    return base / config.server.state_dir / "usage.sqlite3"


def parse_listen(listen: str, *, on_error: Any = None) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        why = f"expected host:port such as 127.0.0.1:8080, got {listen!r}"
        if on_error is not None:
            on_error(why)
        raise ValueError(why)
    return host, int(port_text)


def config_to_toml_data(config: Config) -> dict[str, Any]:
    """The config as plain data for tomli-w (used by `queuegate init` and the demo)."""
    data = msgspec.to_builtins(config)
    data.pop("base_dir", None)
    return data
