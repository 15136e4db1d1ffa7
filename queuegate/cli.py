"""The command line: `queuegate run | node | check | init | import | admin | top`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import msgspec
import trio

from queuegate.accounting import UsageStoreError
from queuegate.admin import command as admin_command
from queuegate.admin.server import AdminSocketError
from queuegate.api.server import ListenError
from queuegate.batches.store import BatchStoreError
from queuegate.config import (
    Config,
    ConfigError,
    admin_socket_path,
    batches_path,
    build_config,
    load_config,
    memory_db_path,
    parse_config,
    usage_db_path,
)
from queuegate.config.importers import FORMATS, ImportFailed, config_from_environment, import_file
from queuegate.config.template import render_template
from queuegate.daemon import Daemon, Endpoints, claim_endpoints
from queuegate.errors import leaf_exceptions
from queuegate.fleet.launchers.lifeline import Lifeline
from queuegate.logs import configure_logging

DEFAULT_CONFIG = "queuegate.toml"
DEMO_LISTEN = "127.0.0.1:8080"
log = logging.getLogger("queuegate.cli")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # (`queuegate admin status --json | head`: the reader had enough; end quietly)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing left to flush at exit)
        return 0


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="queuegate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the daemon")
    _config_option(run)
    run.add_argument("--demo", action="store_true", help="start a simulated fleet (no GPU needed) and serve it")
    run.add_argument("--listen", help="host:port, overrides [server].listen")

    node = commands.add_parser(
        "node", help="serve this host's models as a node of a gateway (the config's [node] names the gateway)"
    )
    _config_option(node)
    node.add_argument("--listen", help="host:port, overrides [server].listen")

    check = commands.add_parser("check", help="validate a config and print the resolved models")
    _config_option(check)

    admin = admin_command.add_parser(commands)
    _config_option(admin)

    top = commands.add_parser("top", help="live view of a running daemon: queues, models, swaps (keys: p e ? q)")
    _config_option(top)
    top.add_argument("--socket", help="admin socket path (default: from the config's [server] section)")

    init = commands.add_parser("init", help="write a commented starter config")
    init.add_argument("path", nargs="?", default=DEFAULT_CONFIG)
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--stdout", action="store_true", help="print it instead of writing a file")

    imports = commands.add_parser(
        "import", help="write a commented queuegate.toml from a llama-swap, Docker swap proxy or RoleMesh config"
    )
    imports.add_argument("file", help="the other tool's YAML config")
    imports.add_argument(
        "-o", "--output", default=DEFAULT_CONFIG, help=f"where to write it (default: {DEFAULT_CONFIG})"
    )
    imports.add_argument(
        "--from", dest="tool", choices=list(FORMATS), help="its format (default: told from its content)"
    )
    imports.add_argument("--force", action="store_true", help="overwrite an existing file")
    imports.add_argument("--stdout", action="store_true", help="print it instead of writing a file")

    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "import":
            return _import(args)
        if args.command == "check":
            loaded = _config_or_environment(args.config)
            if loaded is None:
                print(_no_config(args.config), file=sys.stderr)
                return 2
            return _check(loaded[0])
        if args.command == "admin":
            return admin_command.run(args, _admin_socket(args))
        if args.command == "top":
            return _top(_admin_socket(args))
        return _run(args)
    except ConfigError as exc:
        print(f"queuegate: config error: {exc}", file=sys.stderr)
        return 2


def _admin_socket(args: argparse.Namespace) -> Path:
    """--socket, else the config's admin socket, else (no ./queuegate.toml) the default one (./.queuegate/admin.sock,
    as the demo's); an absolute path, so an error names exactly where it looked. A config named by --config or
    $QUEUEGATE_CONFIG must exist: guessing another daemon's socket would answer for the wrong one."""
    if args.socket:
        return Path(args.socket).absolute()
    if Path(args.config).exists():
        return admin_socket_path(load_config(args.config)).absolute()
    if args.config != DEFAULT_CONFIG:
        raise ConfigError(f"no config at {args.config} (it names the daemon's admin socket; or give --socket PATH)")
    return admin_socket_path(build_config({})).absolute()


def _top(socket_path: Path) -> int:
    """The live view; it needs a terminal (without one it would draw into a pipe and wait there for ever)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(
            "queuegate top needs a terminal; for a one-shot view use `queuegate admin status` (or --json)",
            file=sys.stderr,
        )
        return 2
    from queuegate.admin.aio_client import AsyncioAdminClient
    from queuegate.tui.app import TopApp

    TopApp(AsyncioAdminClient(socket_path)).run()
    return 0


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("QUEUEGATE_CONFIG", DEFAULT_CONFIG),
        help=f"config file (default: $QUEUEGATE_CONFIG or ./{DEFAULT_CONFIG})",
    )


def _init(args: argparse.Namespace) -> int:
    text = render_template()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"queuegate: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}; edit [models], then: queuegate check --config {path}")
    return 0


def _import(args: argparse.Namespace) -> int:
    """Write the config, name on stderr what it could not carry over, and say whether it loads as it is."""
    try:
        tool, draft = import_file(args.file, args.tool)
    except ImportFailed as exc:
        print(f"queuegate: cannot import {args.file}: {exc}", file=sys.stderr)
        return 2
    text = draft.render(Path(args.file).name)
    output = Path(args.output)
    if not args.stdout and output.exists() and not args.force:
        print(f"queuegate: {output} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    for note in draft.notes():
        print(f"queuegate import: {note}", file=sys.stderr)
    if args.stdout:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
    try:
        parse_config(text, source=str(output), base_dir=str(output.resolve().parent))
    except ConfigError as exc:
        print(f"queuegate: the imported config does not load yet: {exc}", file=sys.stderr)
        return 1
    if not args.stdout:
        print(f"wrote {output} from the {tool} config {args.file}; next: queuegate check --config {output}")
    return 0


def _config_or_environment(path: str) -> tuple[Config, list[str]] | None:
    """(config, []) from the file at `path`; without one, the config the original proxy's environment variables
    describe, with their names; None when there is neither."""
    if Path(path).exists():
        return load_config(path), []
    return config_from_environment(os.environ)


def _check(config: Config) -> int:
    from queuegate.fleet import Catalog

    catalog = Catalog.from_config(config)
    print(f"config ok: listen {config.server.listen}, {len(catalog.models)} model(s)")
    if (nothing := _serves_nothing(config)) is not None:
        print(f"  warning: {nothing}")
    for name, model in config.models.items():
        bare = [url for url in model.upstreams if not url.rstrip("/").endswith("/v1")]
        if bare:
            print(f"  warning: models.{name}: {', '.join(bare)} does not end in /v1 (an OpenAI base URL usually does)")
    for spec in catalog.models.values():
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        print(f"  {spec.name}{aliases}")
        endpoints = ", ".join(sorted(spec.endpoints))
        print(f"    kind {spec.kind.name}, sends model {spec.upstream_model!r}, endpoints {endpoints}")
        for upstream in spec.upstreams:
            health = upstream.health_url or "no health check"
            print(f"    upstream {upstream.display_url}  max_concurrency {upstream.capacity}  health {health}")
        if spec.defaults:
            print(f"    defaults {dict(spec.defaults)}")
        launch, mc = spec.launch, config.models[spec.name]
        if mc.rpm or mc.tpm:
            print(f"    each upstream's own limit: {_limits(mc.rpm, mc.tpm)} (requests wait to stay under it)")
        if launch is not None:
            what = " ".join(launch.argv) if launch.launcher == "process" else f"container {launch.container}"
            print(f"    launcher {launch.launcher}: {what}")
            if launch.launcher == "process" and shutil.which(launch.argv[0]) is None:
                print(f"    warning: {launch.argv[0]!r} is not an executable on PATH; starting this model will fail")
            place = f"device {mc.device} ({mc.memory_gb:g} GB)" if mc.device else "no device"
            ttl = f"unload after {mc.ttl_s:g} s idle" if mc.ttl_s else "never unloaded when idle"
            print(f"    {place}, {ttl}{', preloaded' if mc.preload else ''}")
    for name, device in config.devices.items():
        print(f"  device {name}: {device.memory_gb:g} GB{', exclusive' if device.exclusive else ''}")
    for name, key in config.keys.items():
        source = f"from ${key.key_env}" if key.key_env else "inline secret"
        limits = f", {_limits(key.rpm, key.tpm)}" if key.rpm or key.tpm else ""
        admin = ", reads all usage" if key.usage_admin else ""
        print(f"  key {name}: class {key.klass}, models {', '.join(key.models) or 'all'}{limits}{admin} ({source})")
    if config.node is not None:
        node = config.node
        print(f"  node {node.name} of {node.gateway} (node key from ${node.key_env}), reached at "
              f"{node.advertise or 'its listen address'}; its API takes the gateway's key (made each run)"
              f"{' and its [keys]' if config.keys else ''}")  # fmt: skip
    elif not config.keys:
        print("  no [keys]: the API is open to whoever can reach the listen address")
    if config.usage.enabled:
        usage = config.usage
        print(f"  usage: {usage_db_path(config)} (committed every {usage.flush_ms:g} ms, days in {usage.timezone})")
    else:
        print("  usage: not recorded ([usage] enabled = false)")
    memory = config.memory
    if memory.enabled:
        cut = f"forwards the last {memory.keep_last} messages" if memory.truncate_history else "forwards every message"
        print(f"  memory: {memory_db_path(config)} (recalls {memory.query_k} snippets, {cut})")
    tools = config.tools
    mode = tools.mode if tools.mode != "auto" else ("execute" if tools.servers else "passthrough")
    print(f"  tools: {mode} (at most {tools.max_rounds} rounds, {tools.max_calls} calls, {tools.loop_timeout_s:g} s)")
    for name, server in tools.servers.items():
        only = f", only {', '.join(server.allow)}" if server.allow else ""
        print(f"    tool server {name}: {server.url}{server.prefix}/openapi.json{only}")
    nodes = config.nodes
    if config.node_keys:
        print(f"  nodes register with node keys {', '.join(config.node_keys)} (stale after {nodes.stale_after_s:g} s "
              f"without a heartbeat; requests wait {nodes.wait_s:g} s for one; URLs inside "
              f"{', '.join(nodes.allow_networks)})")  # fmt: skip
    for name, polled in nodes.polled.items():
        only = f", only {', '.join(polled.models)}" if polled.models else ""
        print(f"  node {name} polled every {polled.poll_s:g} s: {polled.url}/models (kind {polled.kind}{only})")
    batches = config.batches
    if batches.enabled:
        print(f"  batches: {batches_path(config)} (files up to {batches.max_file_mb:g} MB, {batches.max_lines} lines; "
              f"{batches.max_concurrency} lines of a batch at once, {batches.max_attempts} attempts each)")  # fmt: skip
    return 0


def _limits(rpm: int | None, tpm: int | None) -> str:
    return ", ".join(f"{value} {unit}" for value, unit in ((rpm, "rpm"), (tpm, "tpm")) if value)


def _no_config(path: str) -> str:
    return (
        f"queuegate: no config at {path}. Write one with `queuegate init` (or `queuegate import` from another "
        "tool's), set LLM_UPSTREAMS and PROXY_MODELS, or try `queuegate run --demo` for a simulated fleet."
    )


def _serves_nothing(config: Config) -> str | None:
    """Why a config can serve nothing (no models, and no node may register or be polled), else None."""
    if config.models or config.node_keys or config.nodes.polled:
        return None
    return (
        "the config has no [models.*] (and no [node_keys] or [nodes.NAME] through which nodes would bring some): "
        "there is nothing to serve; add a model (see queuegate.toml.example)"
    )


def _run(args: argparse.Namespace) -> int:
    if args.command == "node":
        if not Path(args.config).exists():
            print(f"queuegate: no config at {args.config} (a node's config has a [node] section)", file=sys.stderr)
            return 2
        if load_config(args.config).node is None:
            print(
                f"queuegate: {args.config} has no [node] section: name the node, its gateway and the environment "
                "variable holding its node key (see README, Nodes)",
                file=sys.stderr,
            )
            return 2
        args.demo = False
    loaded = None if args.demo else _config_or_environment(args.config)
    if not args.demo and loaded is None:
        print(_no_config(args.config), file=sys.stderr)
        return 2
    config, variables = loaded or (None, [])
    if config is not None and (nothing := _serves_nothing(config)):
        print(f"queuegate: {nothing}", file=sys.stderr)
        return 2
    level = config.server.log_level if config else "info"
    configure_logging(config.server.log_format if config else "text", level)
    if variables:
        log.info("config from environment variables", extra={"fields": {"variables": ",".join(variables)}})
    listen = args.listen or (config.server.listen if config else DEMO_LISTEN)
    if config is not None:
        config = msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, listen=listen))
    cannot_start: list[str] = []
    try:
        trio.run(_serve, config, listen, None if args.demo or variables else Path(args.config))
    except* (ListenError, AdminSocketError, UsageStoreError, BatchStoreError, ConfigError) as group:
        cannot_start.append(str(leaf_exceptions(group)[0]))
    if cannot_start:
        print(f"queuegate: {cannot_start[0]}", file=sys.stderr)
        return 2
    return 0


async def _serve(config: Config | None, listen: str, config_path: Path | None) -> None:
    """Run the daemon (and the demo fleet) until SIGINT/SIGTERM (see `_on_signals`). Its ports are claimed first
    (a busy one is one line, before any child starts); the lifeline starts next and stops last: every child it
    registers dies with this process, even by SIGKILL."""
    endpoints = await claim_endpoints(config or build_config({"server": {"listen": listen}}))
    with contextlib.closing(endpoints):  # the daemon closes them too; this covers a demo that fails to start
        await _serve_on(endpoints, config, listen, config_path)


async def _serve_on(endpoints: Endpoints, config: Config | None, listen: str, config_path: Path | None) -> None:
    async with trio.open_nursery() as outer:
        lifeline = await outer.start(Lifeline().run)
        async with trio.open_nursery() as nursery:
            if config is None:
                from queuegate.demo import start_demo_fleet

                config = await start_demo_fleet(nursery, listen=listen, lifeline=lifeline)
            daemon = Daemon(config, config_path, endpoints=endpoints, lifeline=lifeline)
            nursery.start_soon(_on_signals, daemon, nursery.cancel_scope)
            started = await nursery.start(_run_then_stop_all, daemon, nursery.cancel_scope)
            print(
                f"QueueGate listening on {started.base_url}  (OpenAI base URL: {started.base_url}/v1)\n"
                f"  models: {', '.join(started.models) or 'none yet'}\n"
                f"  watch it: queuegate top (admin socket {started.admin})",
                flush=True,
            )
        outer.cancel_scope.cancel()


async def _run_then_stop_all(
    daemon: Daemon, everything: trio.CancelScope, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    """When the daemon has shut down, stop the rest too (demo fleet, signal watcher)."""
    try:
        await daemon.run(task_status=task_status)
    finally:
        everything.cancel()


async def _on_signals(daemon: Daemon, everything: trio.CancelScope) -> None:
    """First signal: a graceful shutdown. Second: stop every request and close every connection now. Third: cancel
    whatever is left."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        received = 0
        async for _ in signals:
            received += 1
            if received == 1:
                print(
                    "shutting down: finishing in-flight requests (signal again to stop now)",
                    file=sys.stderr,
                    flush=True,
                )
                daemon.request_shutdown()
            elif received == 2:
                print("stopping now", file=sys.stderr, flush=True)
                daemon.request_shutdown(now=True)
            else:
                everything.cancel()
                return


if __name__ == "__main__":
    sys.exit(main())
