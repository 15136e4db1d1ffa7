"""`queuegate admin ACTION [TARGET] [--json]`: the admin socket from scripts and shells.

status | preload MODEL | evict MODEL | drain UPSTREAM | undrain UPSTREAM | pause CLASS | resume CLASS | cancel ID |
reload | memory list [TEXT] | memory show CHAT | memory forget CHAT
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from queuegate.admin.client import AdminClient
from queuegate.admin.protocol import (
    AdminError,
    AdminUnavailable,
    Batch,
    Cancel,
    DaemonStatus,
    Drain,
    Evict,
    Memory,
    Ok,
    Pause,
    Preload,
    Reload,
    Request,
    Resume,
    Undrain,
)
from queuegate.statistics import batch_text, model_views, node_devices_text, node_model_text

# action -> (request for a target, what the target is)
_COMMANDS: dict[str, tuple[Callable[[str], Request], str]] = {
    "preload": (lambda target: Preload(model=target), "model"),
    "evict": (lambda target: Evict(model=target), "model"),
    "drain": (lambda target: Drain(upstream=target), "upstream (model#index)"),
    "undrain": (lambda target: Undrain(upstream=target), "upstream (model#index)"),
    "cancel": (lambda target: Cancel(request_id=target), "request id"),
    "pause": (lambda target: Pause(klass=target), "class"),
    "resume": (lambda target: Resume(klass=target), "class"),
    "batch-pause": (lambda target: Batch(action="pause", batch_id=target), "batch id"),
    "batch-resume": (lambda target: Batch(action="resume", batch_id=target), "batch id"),
    "batch-cancel": (lambda target: Batch(action="cancel", batch_id=target), "batch id"),
}


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    admin = commands.add_parser("admin", help="talk to a running daemon over its admin socket")
    admin.add_argument("action", choices=["status", "batches", "reload", "memory", *_COMMANDS])
    admin.add_argument(
        "target",
        nargs="?",
        help="the model, upstream (model#index), class, request id or batch id; for memory: list|show|forget",
    )
    admin.add_argument("chat", nargs="?", default="", help="memory show|forget: the chat (as memory list shows it)")
    admin.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    admin.add_argument("--socket", help="admin socket path (default: from the config's [server] section)")
    return admin


def run(args: argparse.Namespace, socket_path: Path) -> int:
    if args.action == "memory" and args.target not in ("list", "show", "forget"):
        print("queuegate admin memory: say list, show CHAT or forget CHAT", file=sys.stderr)
        return 2
    if args.action not in ("status", "batches", "reload", "memory") and not args.target:
        print(f"queuegate admin {args.action}: name the {_COMMANDS[args.action][1]}", file=sys.stderr)
        return 2
    try:
        return trio.run(_run, args, socket_path)
    except AdminUnavailable as exc:
        print(f"queuegate admin: {exc}", file=sys.stderr)
        return 3
    except AdminError as exc:
        print(f"queuegate admin: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, socket_path: Path) -> int:
    async with AdminClient(socket_path) as client:
        if args.action in ("status", "batches"):
            status = await client.status()
            if args.action == "batches":
                shown = msgspec.json.encode(status.batches).decode() if args.json else render_batches(status)
            else:
                shown = msgspec.json.encode(status).decode() if args.json else render_status(status)
            print(shown)
            return 0
        if args.action == "reload":
            request: Request = Reload()
        elif args.action == "memory":
            request = Memory(action=args.target, namespace=args.chat)
        else:
            request = _COMMANDS[args.action][0](args.target)
        reply = await client.request(request)
        assert isinstance(reply, Ok)
        print(msgspec.json.encode(reply).decode() if args.json else reply.message)
        return 0


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters (its end an ellipsis), so the columns after it stay in place."""
    return text if len(text) <= width else text[: width - 1] + "…"


def render_batches(status: DaemonStatus) -> str:
    """One line per batch job being run: its progress, rate and what is left."""
    if not status.batches:
        return "no batch is running"
    return "\n".join(f"batch {batch_text(b)}" for b in status.batches)


def render_status(status: DaemonStatus) -> str:
    """A plain-text status for a terminal: models with their fleet state and queues, then devices and limits."""
    lines = [
        f"QueueGate at {status.listen}, up {status.uptime_s:.0f} s: "
        f"{status.scheduler.in_service} in service, {status.scheduler.waiting} waiting",
        f"{'MODEL':<24}{'STATE':<10}{'DEVICE':<12}{'IN FLIGHT':>10}{'WAITING':>9}{'OLDEST':>9}  REASON",
    ]
    for view in model_views(status.scheduler, status.fleet, status.nodes):
        reason = view.reason + (f" (drained: {', '.join(view.drained)})" if view.drained else "")
        lines.append(
            f"{view.name:<24}{view.state:<10}{_fit(view.device or '-', 11):<12}{view.in_service:>10}{view.waiting:>9}"
            f"{view.oldest_wait_s:>8.1f}s  {reason}"
        )
    paused = sorted({c.name for m in status.scheduler.models for c in m.classes if c.paused})
    if paused:
        lines.append(f"paused classes: {', '.join(paused)}")
    for device in status.fleet.devices:
        kind = "exclusive" if device.exclusive else f"{device.used_gb:g}/{device.memory_gb:g} GB"
        line = f"device {device.name} ({kind}): {', '.join(device.models) or 'empty'}"
        if device.swap is not None:
            eta = f", about {device.swap.eta_s:g} s left" if device.swap.eta_s is not None else ""
            line += f"; swapping to {device.swap.target}: {device.swap.phase} for {device.swap.elapsed_s:.1f} s{eta}"
        lines.append(line)
    for lim in status.scheduler.limits:
        windows = (("rpm", lim.rpm, lim.requests_used), ("tpm", lim.tpm, lim.tokens_used))
        used = [f"{spent}/{allowed} {unit}" for unit, allowed, spent in windows if allowed is not None]
        wait = f"full for {lim.free_in_s:g} s more" if lim.free_in_s > 0 else "has room"
        lines.append(f"limit {lim.name}: {', '.join(used)} in the last minute; {wait}")
    for server in status.tool_servers:
        state = f"up, {len(server.tools)} tools" if server.up else "down"
        why = f"; {server.error}" if server.error else ""
        lines.append(f"tool server {server.name} ({server.url}): {state}{why}")
    for node in status.nodes:
        state = "stale (as it last reported)" if node.stale else "live"
        served = ", ".join(f"{node_model_text(m)} ({m.url})" for m in node.models) or "nothing"
        devices = f"; devices {text}" if (text := node_devices_text(node)) else ""
        lines.append(
            f"node {node.name} at {node.address}: {state}, last heartbeat {node.last_heartbeat_s:g} s ago; "
            f"{served}{devices}"
        )
    lines += [f"batch {batch_text(b)}" for b in status.batches]
    for request in status.requests:
        if request.step is not None:
            lines.append(f"request {request.id} ({request.model}): tool loop {request.step}")
    return "\n".join(lines)
