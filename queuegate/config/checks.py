"""The rules of a config that a type cannot express: names, URLs, unique aliases, the listen address, launchers and
devices, keys, environment variables that must be set. Each failure names the key and says what was expected."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from typing import Any
from urllib.parse import urlsplit

from queuegate.config.paths import usage_timezone
from queuegate.config.schema import Config, ConfigError, ModelConfig
from queuegate.vocabulary import ROUTE_CLASSES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function name


def check_config(config: Config, source: str, env: Any) -> None:
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
    _check_tools(config, env, fail)
    _check_memory(config, owners, fail)
    _check_nodes(config, env, fail)
    _check_keys(config, owners, env, fail)
    try:
        usage_timezone(config)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        fail("usage.timezone", f"no time zone {config.usage.timezone!r}; use an IANA name such as Europe/Berlin")


def _check_keys(config: Config, model_names: Any, env: Any, fail: Any) -> None:
    """Each key (client or node key) has one secret source that resolves, and a secret of its own; a client key a
    known class and known models."""
    owners: dict[str, str] = {}
    for where, secret_config in [
        *((f"keys.{name}", key) for name, key in config.keys.items()),
        *((f"node_keys.{name}", key) for name, key in config.node_keys.items()),
    ]:
        if (secret_config.key is None) == (secret_config.key_env is None):
            fail(where, "set exactly one of `key` (the secret) or `key_env` (the environment variable holding it)")
        if secret_config.key_env is not None and not env.get(secret_config.key_env):
            fail(f"{where}.key_env", f"environment variable {secret_config.key_env} is not set")
        secret = secret_config.key if secret_config.key is not None else env.get(secret_config.key_env, "")
        if len(secret) < 8:
            fail(where, "the secret must be at least 8 characters")
        if secret in owners:
            fail(where, f"the same secret as {owners[secret]!r}: each key needs its own")
        owners[secret] = where
    for name, key in config.keys.items():
        where = f"keys.{name}"
        if key.klass not in config.queue.classes:
            fail(f"{where}.class", f"expected one of the classes {config.queue.classes}, got {key.klass!r}")
        for i, model in enumerate(key.models):
            if model not in model_names:
                fail(f"{where}.models[{i}]", f"no model or alias {model!r}")


def _check_memory(config: Config, model_names: Any, fail: Any) -> None:
    memory = config.memory
    if memory.backend == "toolserver" and memory.server not in config.tools.servers:
        known = ", ".join(config.tools.servers) or "none configured"
        fail(
            "memory.server", f"backend toolserver needs a [tools.servers] entry's name, got {memory.server!r} ({known})"
        )
    if not memory.embed_model:
        return
    embedding = [name for name in config.models if "embeddings" in _endpoints(config.models[name])]
    model = model_names.get(memory.embed_model)
    if memory.backend != "builtin":
        fail("memory.embed_model", "is for the builtin backend (a tool server ranks its memory itself)")
    elif model not in embedding:
        what = "is a model that serves no embeddings" if model else "is no model or alias"
        fail(
            "memory.embed_model",
            f"{memory.embed_model!r} {what}; expected one of the models with the embeddings endpoint: "
            f"{', '.join(embedding) or 'none configured'}",
        )


def _check_nodes(config: Config, env: Any, fail: Any) -> None:
    node = config.node
    if node is not None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", node.name):
            fail("node.name", f"a node name may use letters, digits and . _ - (at most 64), got {node.name!r}")
        for key in ("gateway", "advertise"):
            url = getattr(node, key)
            if (url or key == "gateway") and not re.match(r"^https?://[^/\s]+/?$", url):
                fail(f"node.{key}", f"expected a base URL such as http://10.0.0.2:8080 (no path), got {url!r}")
        if not env.get(node.key_env):
            fail("node.key_env", f"environment variable {node.key_env} is not set (it holds this node's key)")
        if len(env.get(node.key_env, "")) < 8:
            fail("node.key_env", f"the node key in {node.key_env} must be at least 8 characters (as the gateway's)")
        host = parse_listen(config.server.listen)[0]
        if not node.advertise and host in ("0.0.0.0", "::", ""):
            fail("node.advertise", "set it to where the gateway reaches this node: it listens on every address")
    for name, polled in config.nodes.polled.items():
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
            fail(f"nodes.{name}", "a node name may use letters, digits and . _ - (at most 64)")
        if not _is_base_url(polled.url):
            fail(f"nodes.{name}.url", f"expected an OpenAI-compatible base URL such as http://10.0.0.5:8000/v1, got "
                 f"{polled.url!r}")  # fmt: skip
        if polled.poll_s > 600:
            fail(f"nodes.{name}.poll_s", f"at most 600 s (it is stale after 3 polls), got {polled.poll_s:g}")
        if polled.key_env is not None and not env.get(polled.key_env):
            fail(f"nodes.{name}.key_env", f"environment variable {polled.key_env} is not set")
    for i, network in enumerate(config.nodes.allow_networks):
        try:
            ipaddress.ip_network(network)
        except ValueError:
            fail(f"nodes.allow_networks[{i}]", f"expected a network such as 10.0.0.0/8 or ::1/128, got {network!r}")


def _is_base_url(url: str) -> bool:
    """An http(s) URL with a host (and a port, if any, that is one), without credentials."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok and "@" not in parts.netloc


def _endpoints(model: ModelConfig) -> frozenset[str]:
    from queuegate.fleet.kinds import PROFILES  # (here, not at the top: the fleet's modules import the config)

    return frozenset(model.endpoints) if model.endpoints is not None else PROFILES[model.kind].endpoints


def _check_tools(config: Config, env: Any, fail: Any) -> None:
    for name, server in config.tools.servers.items():
        where = f"tools.servers.{name}"
        if not re.match(r"^https?://[^/\s]+", server.url):
            fail(f"{where}.url", f"expected an http(s) base URL such as http://127.0.0.1:8000, got {server.url!r}")
        if server.prefix and (not server.prefix.startswith("/") or server.prefix.endswith("/")):
            fail(f"{where}.prefix", f'expected "" or a path such as /openapi (no trailing /), got {server.prefix!r}')
        if server.api_key_env is not None and not env.get(server.api_key_env):
            fail(f"{where}.api_key_env", f"environment variable {server.api_key_env} is not set")
        for old, new in server.rename.items():
            if not _TOOL_NAME.match(new):
                fail(f"{where}.rename.{old}", f"a tool name may use letters, digits, _ and - (1-64), got {new!r}")


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
