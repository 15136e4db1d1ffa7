"""What does queueing cost, and is it fair? Two measurements, each against a baseline taken in the same run.

1. Memory and decision time at 10,000 waiting requests. QueueGate (`queuegate run`, a subprocess) holds 10,000
   requests against one upstream slot that never frees (a simulated upstream told to hang). Baseline: a bare
   quart-trio app whose route just waits, holding the same 10,000 requests (the framework's own cost per request);
   and hypercorn holding them for a bare ASGI app that only reads the body (the HTTP server's own floor).
   Printed: RSS per waiting request for each and the ratios, and how much of it each gives back once the clients
   hang up and the queue has drained (QueueGate's heap trimmer acts then: `queuegate/heap.py`). Then the time of
   one scheduling decision (a slot frees, the next request is chosen and granted) on the scheduler core with 10 and
   with 10,000 waiting requests spread over classes and flows, and the ratio (1.0 = the decision does not grow with
   the queue).
   Targets: < 20 KB RSS per waiting request; >= 80 % of it given back after the drain; < 50 us per decision at
   10,000 waiting.

2. Fairness on a mixed trace through the scheduler core: one agent flow sends 200 requests at once, five users send
   5 requests each, one after another as their previous answer arrives (people chatting); one slot. For each user
   request: how many of the agent's requests were served while it waited. Baseline: the same trace through a single
   FIFO (a naive proxy). Target: no user request waits behind more than 1 of the agent's requests.

    python scripts/bench_scheduler.py [--waiting 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque
from functools import partial

import httpx
import trio
from benchlib import bare_asgi_app, rss_kb, serve_app, start_server
from prometheus_client.parser import text_string_to_metric_families

from queuegate.heap import CHECK_EVERY_S
from queuegate.scheduler import Policy, SchedulerCore, Ticket, UpstreamState

# -- 1. memory and decision time ----------------------------------------------------------------------------------


def serve_hold() -> None:
    """The baseline: a quart-trio POST route that reads the body and waits forever."""
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio("hold")
    app.config.update(RESPONSE_TIMEOUT=None)

    @app.post("/v1/chat/completions")
    async def hold():
        await request.get_data()
        await trio.sleep_forever()

    serve_app(app, backlog=4096)


REQUEST = (
    b'{"model": "slow", "max_tokens": 1, "messages": [{"role": "user", "content": "waiting"}], "sim_fault": "hang"}'
)


async def settled_rss_kb(pid: int, at_least_s: float = 0.0) -> int:
    """The process's RSS once it stopped changing (sampled each second, for at least `at_least_s`)."""
    started = time.monotonic()
    last = -1
    while (now := rss_kb(pid)) != last or time.monotonic() - started < at_least_s:
        last = now
        await trio.sleep(1.0)
    return last


async def open_requests(url: str) -> float:
    """What QueueGate's /metrics says of the HTTP requests it holds (the scrape itself is one)."""
    async with httpx.AsyncClient(timeout=60) as client:
        text = (await client.get(url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "queuegate_http_requests_open":
            return family.samples[0].value
    raise RuntimeError("no queuegate_http_requests_open in /metrics")


async def hold_requests(url: str, count: int, pid: int, *, gateway: bool) -> tuple[int, int, int]:
    """Open `count` connections, send one request on each, keep them open, then hang up on all of them (the queue
    drains); returns (RSS growth in KB while they wait, growth left once drained, answers). The gateway is drained
    once its /metrics says no request is left (each one that ended still logs its line and records its usage),
    and its heap trimmer has had time to act; the baseline once its RSS stays put for 5 s."""
    host, port = url.removeprefix("http://").split(":")
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(REQUEST)}\r\n\r\n"
    ).encode() + REQUEST
    before = rss_kb(pid)
    answered = 0
    streams: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        limiter = trio.CapacityLimiter(200)

        async def one() -> None:
            nonlocal answered
            async with limiter:
                stream = await trio.open_tcp_stream(host, int(port))
                streams.append(stream)
                await stream.send_all(raw)
            if await stream.receive_some(1):
                answered += 1  # a waiting request gets nothing until we hang up

        for _ in range(count):
            nursery.start_soon(one)
        while len(streams) < count:
            await trio.sleep(0.2)
        grown = await settled_rss_kb(pid) - before  # every request read and waiting
        nursery.cancel_scope.cancel()
    for stream in streams:
        await stream.aclose()
    if gateway:
        with trio.fail_after(300):
            while await open_requests(url) > 1:
                await trio.sleep(1.0)
    left = await settled_rss_kb(pid, at_least_s=3 * CHECK_EVERY_S if gateway else 5.0) - before
    return grown, left, answered


def decision_time_us(waiting: int, rounds: int = 5000) -> float:
    """Mean time of release + next grant with `waiting` requests queued over 3 classes and 100 flows."""
    core = SchedulerCore([("m#0", "m", 1)], Policy(max_queue=waiting + rounds + 10))
    core.set_upstream_state("m#0", UpstreamState.READY, "bench", 0.0)
    rng = random.Random(7)
    classes = ("user", "agent", "batch")

    def new(now: float) -> Ticket:
        return Ticket("m", now, rng.choice(classes), f"flow-{rng.randrange(100)}")

    holder = new(0.0)
    core.submit(holder, 0.0)
    for i in range(waiting):
        core.submit(new(i * 1e-3), i * 1e-3)
    now = waiting * 1e-3
    started = time.perf_counter()
    for _ in range(rounds):
        (holder,) = core.release(holder, now)  # the decision: a slot frees, the next request is chosen
        core.submit(new(now), now)  # keep the queue at the same length
        now += 1e-3
    elapsed = time.perf_counter() - started
    return elapsed / rounds * 1e6


def measure_memory(count: int) -> None:
    py = sys.executable
    servers: list[subprocess.Popen[str]] = []
    try:
        hold_server, hold_url = start_server([py, __file__, "--serve-hold"])
        servers.append(hold_server)
        bare_server, bare_url = start_server([py, __file__, "--serve-bare"])
        servers.append(bare_server)
        sim, sim_url = start_server([py, "-m", "queuegate.sim", "--port", "0", "--tokens-per-s", "0"])
        servers.append(sim)
        with tempfile.TemporaryDirectory() as tmp:
            config = os.path.join(tmp, "queuegate.toml")
            with open(config, "w") as f:
                f.write(
                    f'[server]\nlisten = "127.0.0.1:0"\nlog_level = "warning"\n'
                    f"[queue]\nmax_size = {count + 100}\nmax_wait_s = 3600\n"
                    f'[models.slow]\nupstreams = ["{sim_url}/v1"]\nkind = "llamacpp"\nmax_concurrency = 1\n'
                )
            gateway, gateway_url = start_server([py, "-m", "queuegate.cli", "run", "--config", config])
            servers.append(gateway)
            base_grown, base_left, base_answered = trio.run(
                partial(hold_requests, gateway=False), hold_url, count, hold_server.pid
            )
            bare_grown, bare_left, bare_answered = trio.run(
                partial(hold_requests, gateway=False), bare_url, count, bare_server.pid
            )
            qg_grown, qg_left, qg_answered = trio.run(
                partial(hold_requests, gateway=True), gateway_url, count, gateway.pid
            )
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)
    base_kb, qg_kb = base_grown / count, qg_grown / count
    print(f"1. {count:,} waiting requests, one busy upstream slot")
    print(f"   RSS per waiting request: QueueGate {qg_kb:.1f} KB, bare quart-trio route {base_kb:.1f} KB")
    print(f"   ratio QueueGate / framework baseline: {qg_kb / base_kb:.2f}")
    qg_back, base_back = 1 - qg_left / qg_grown, 1 - base_left / base_grown
    print(f"   in total: QueueGate {qg_grown / 1024:.0f} MB, given back once they hung up {qg_back:.0%} ", end="")
    print(f"(baseline {base_grown / 1024:.0f} MB, {base_back:.0%} given back)")
    bare_kb, bare_back = bare_grown / count, 1 - bare_left / bare_grown
    print(f"   the HTTP server's floor (hypercorn holding them for a bare ASGI app): {bare_kb:.1f} KB each, ", end="")
    print(f"{bare_back:.0%} given back; QueueGate / floor: {qg_kb / bare_kb:.2f}")
    if qg_answered or base_answered or bare_answered:
        answered = f"{qg_answered} QueueGate, {base_answered} baseline and {bare_answered} floor requests"
        print(f"   WARNING: {answered} were answered, not held")
    small, large = decision_time_us(10), decision_time_us(count)
    print(f"   scheduling decision: {small:.1f} us at 10 waiting, {large:.1f} us at {count:,} waiting")
    print(f"   ratio {count:,} / 10 waiting: {large / small:.2f}")
    print(f"   targets: < 20 KB per waiting request: {qg_kb:.1f} KB {'ok' if qg_kb < 20 else 'MISSED'}; ", end="")
    print(f">= 80% given back: {qg_back:.0%} {'ok' if qg_back >= 0.8 else 'MISSED'}; ", end="")
    print(f"< 50 us per decision: {large:.1f} us {'ok' if large < 50 else 'MISSED'}")


# -- 2. fairness --------------------------------------------------------------------------------------------------


def replay(fifo: bool) -> tuple[dict[str, int], float, float]:
    """Replay the mixed trace with one slot and service time 1; returns (per user: worst number of agent requests
    given the slot while one of its requests waited, agent completion time, time the last user request finished)."""
    core = SchedulerCore([("m#0", "m", 1)], Policy(max_queue=1000))
    core.set_upstream_state("m#0", UpstreamState.READY, "bench", 0.0)
    queue: deque[Ticket] = deque()  # the FIFO baseline's own queue
    users = [f"user-{i}" for i in range(5)]
    remaining = dict.fromkeys(users, 5)
    worst = dict.fromkeys(users, 0)
    agent_grants_at_submit: dict[Ticket, int] = {}
    agent_grants = 0
    agent_done_at = users_done_at = 0.0
    now = 0.0
    in_service: Ticket | None = None

    def start(ticket: Ticket) -> None:
        nonlocal in_service, agent_grants
        in_service = ticket
        if ticket.flow == "agent":
            agent_grants += 1
        else:
            worst[ticket.flow] = max(worst[ticket.flow], agent_grants - agent_grants_at_submit.pop(ticket))

    def submit(ticket: Ticket) -> None:
        if ticket.flow != "agent":
            agent_grants_at_submit[ticket] = agent_grants
        if fifo:
            queue.append(ticket)
        else:
            for granted in core.submit(ticket, now):
                start(granted)

    for _ in range(200):
        submit(Ticket("m", now, "user", "agent"))
    for user in users:
        submit(Ticket("m", now, "user", user))
        remaining[user] -= 1
    while True:
        if fifo and in_service is None and queue:
            start(queue.popleft())
        if in_service is None:
            break
        done, in_service = in_service, None
        now += 1.0
        if done.flow == "agent":
            agent_done_at = now
        else:
            users_done_at = now
        if not fifo:
            for granted in core.release(done, now):
                start(granted)
        if done.flow != "agent" and remaining[done.flow]:  # the user reads the answer and asks again
            remaining[done.flow] -= 1
            submit(Ticket("m", now, "user", done.flow))
    return worst, agent_done_at, users_done_at


def measure_fairness() -> None:
    fair, fair_agent, fair_users = replay(fifo=False)
    naive, naive_agent, naive_users = replay(fifo=True)
    print("\n2. mixed trace: one agent flow with 200 requests, five users with 5 requests each, one slot")
    print("   worst number of agent requests given the slot while a user request waited (per user):")
    print(f"     QueueGate: {list(fair.values())}    FIFO baseline: {list(naive.values())}")
    print(f"   agent finished at slot {fair_agent:.0f} (FIFO {naive_agent:.0f}, ratio {fair_agent / naive_agent:.2f});")
    print(f"   users finished at slot {fair_users:.0f} (FIFO {naive_users:.0f}, ratio {fair_users / naive_users:.2f})")
    worst = max(fair.values())
    print(f"   target: a user waits behind <= 1 agent request: {worst} {'ok' if worst <= 1 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=10_000, help="waiting requests to hold")
    parser.add_argument("--serve-hold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hold:
        serve_hold()
        return
    if args.serve_bare:
        serve_app(bare_asgi_app(hold=True), backlog=4096)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.waiting * 2 + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))  # children inherit it
    measure_memory(args.waiting)
    measure_fairness()


if __name__ == "__main__":
    main()
