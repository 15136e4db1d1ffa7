"""Does watching QueueGate slow it down? Request throughput with no admin subscribers vs many, in the same run.

A simulated upstream (no token delay) and QueueGate (`queuegate run`) run as separate processes. A lean HTTP/1.1
client drives non-streamed chats at concurrency 16 for a fixed time, alternating rounds with 0 and with N attached
`subscribe` clients (interval 200 ms, the fastest the daemon allows; each reads every update), so background noise
hits both alike. Then, in process, the cost of one status snapshot with thousands of requests waiting.

Printed: requests/s with and without subscribers (median of rounds), their ratio, updates received, and the
snapshot's build+encode time and size at 5,000 waiting. Target: ratio >= 0.95 (no measurable slowdown).

    python scripts/bench_admin.py [--subscribers 20] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import msgspec
import trio
from benchlib import drive, instant_sim_behind_gateway

from queuegate.admin.client import AdminClient
from queuegate.scheduler import Policy, SchedulerCore, Ticket

BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


async def round_with(url: str, socket: Path, subscribers: int, seconds: float) -> tuple[float, int]:
    """Requests/s over `seconds` while `subscribers` clients follow the daemon; and the updates they got."""
    updates = 0

    async def follow() -> None:
        nonlocal updates
        async with AdminClient(socket) as client:
            async for _ in client.subscribe(interval_ms=200):
                updates += 1

    async with trio.open_nursery() as nursery:
        for _ in range(subscribers):
            nursery.start_soon(follow)
        await trio.sleep(0.3)  # attached and past their first snapshot
        result = await drive(url, "/v1/chat/completions", BODY, 16, seconds)
        nursery.cancel_scope.cancel()
    if result.errors:
        raise RuntimeError(f"{result.errors} errors while measuring")
    return result.rps, updates


def snapshot_cost(waiting: int) -> tuple[float, int]:
    """Build and encode scheduler statistics with `waiting` requests queued over 500 flows: (ms, bytes)."""
    core = SchedulerCore([("m#0", "m", 1)], Policy(max_queue=waiting + 10))
    for i in range(waiting):
        core.submit(Ticket("m", float(i), "user" if i % 3 else "agent", f"client:{i % 500}"), float(i))
    rounds = 50
    started = time.perf_counter()
    for _ in range(rounds):
        encoded = msgspec.json.encode(core.statistics(float(waiting)))
    return (time.perf_counter() - started) / rounds * 1000, len(encoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with instant_sim_behind_gateway(max_concurrency=64, log_level="warning") as (_, url, folder):
        socket = folder / ".queuegate" / "admin.sock"
        alone, watched, updates = [], [], 0
        for _ in range(args.rounds):
            alone.append(trio.run(round_with, url, socket, 0, args.seconds)[0])
            rps, got = trio.run(round_with, url, socket, args.subscribers, args.seconds)
            watched.append(rps)
            updates += got
    base, with_subscribers = statistics.median(alone), statistics.median(watched)
    print(f"requests/s, no subscribers:          {base:8.0f}   (rounds: {', '.join(f'{r:.0f}' for r in alone)})")
    print(f"requests/s, {args.subscribers} subscribers attached: {with_subscribers:8.0f}   "
          f"(rounds: {', '.join(f'{r:.0f}' for r in watched)}; {updates} updates received)")  # fmt: skip
    print(f"ratio with/without: {with_subscribers / base:.2f}   (target >= 0.95)")
    ms, size = snapshot_cost(5000)
    small_ms, small_size = snapshot_cost(10)
    print(f"scheduler snapshot at 5,000 waiting: {ms:.2f} ms, {size / 1024:.1f} KiB "
          f"(at 10 waiting: {small_ms:.2f} ms, {small_size / 1024:.1f} KiB; ratio {ms / small_ms:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
