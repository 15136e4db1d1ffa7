"""How much swapping does QueueGate save? Replay request traces against models sharing one exclusive device.

Each model is a real child process (`python -m queuegate.sim` with a simulated load time, like llama-server's
503 "Loading model"), started and stopped on demand. The same traces run, in the same run, under:
  (a) QueueGate: the real daemon (in this process) with its swap-aware planner, default [fleet] settings;
  (b) a per-request FIFO swapper (what a naive proxy does): requests in arrival order, and a request for a model
      that is not loaded waits for those in flight, stops the loaded model and starts its own.
Both launch servers the same way and poll health every 50 ms, so the difference is the policy.

Traces (open loop: each request is sent at its scheduled time, streaming, 16 tokens):
  alternating: A B A B ... every 0.25 s;  mixed: 4 clients, 3 models, each client mostly on its own model.

Printed per trace and policy: swaps, makespan, p50/p95 wait (scheduled send -> first token); the ratios
FIFO/QueueGate; and the gap between a fresh server turning healthy and its first forwarded request.
Targets: >= 5x fewer swaps than FIFO on the alternating trace, with p95 wait no worse; gap <= 150 ms.

    python scripts/bench_swaps.py [--requests 24] [--load-time 1.0]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import trio

from queuegate.config import build_config
from queuegate.daemon import Daemon
from queuegate.fleet.catalog import pick_free_port
from queuegate.fleet.launchers.process import ChildProcess

POLL_S = 0.05
TOKENS = 16


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the trace starts
    model: str


@dataclass
class Outcome:
    waits: list[float] = field(default_factory=list)
    makespan: float = 0.0
    swaps: int = 0
    gaps: list[float] = field(default_factory=list)  # healthy -> first request, per fresh server
    errors: int = 0

    def p(self, q: float) -> float:
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def alternating(n: int) -> list[Arrival]:
    return [Arrival(i * 0.25, "ab"[i % 2]) for i in range(n)]


def mixed(n: int, seed: int = 7) -> list[Arrival]:
    """4 clients; clients 0-1 mostly on a, 2 on b, 3 on c; exponential gaps (mean 1 s per client)."""
    rng = random.Random(seed)
    home = ["a", "a", "b", "c"]
    arrivals = []
    for client in range(4):
        at = rng.uniform(0, 0.5)
        for _ in range(n // 4):
            model = home[client] if rng.random() < 0.75 else rng.choice("abc")
            arrivals.append(Arrival(at, model))
            at += rng.expovariate(1.0)
    return sorted(arrivals, key=lambda a: a.at)


def sim_argv(load_time: float, port: int, model: str) -> list[str]:
    return [sys.executable, "-m", "queuegate.sim", "--port", str(port), "--model", model,
            "--tokens-per-s", "100", "--load-time", str(load_time)]  # fmt: skip


def body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": TOKENS, "stream": True}


async def replay(trace: list[Arrival], send: Callable[[str], Awaitable[None]], outcome: Outcome) -> None:
    """Send each request at its time; a request's wait is from its scheduled time to its first token."""
    start = trio.current_time()

    async def one(arrival: Arrival) -> None:
        await trio.sleep_until(start + arrival.at)
        try:
            await send(arrival.model)
        except (httpx.HTTPError, RuntimeError):
            outcome.errors += 1

    async with trio.open_nursery() as nursery:
        for arrival in trace:
            nursery.start_soon(one, arrival)
    outcome.makespan = trio.current_time() - start


async def stream_once(http: httpx.AsyncClient, url: str, model: str, scheduled: float, outcome: Outcome) -> None:
    async with http.stream("POST", url, json=body(model)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}")
        waiting = True
        async for chunk in response.aiter_raw():
            # The first generated token; QueueGate's queue notices (reasoning_content) and keep-alives do not count.
            if waiting and b'"content":' in chunk:
                outcome.waits.append(trio.current_time() - scheduled)
                waiting = False


async def record_gap(http: httpx.AsyncClient, root: str, seen: set[float], outcome: Outcome) -> None:
    """The sim knows when it turned healthy and when its first request came (time.monotonic, one clock)."""
    try:
        stats = (await http.get(root + "/sim/stats")).json()
    except httpx.HTTPError:
        return  # stopped meanwhile
    healthy, first = stats["healthy_at"], stats["first_request_at"]
    if first is not None and healthy not in seen:
        seen.add(healthy)
        outcome.gaps.append(first - healthy)


async def run_queuegate(trace: list[Arrival], load_time: float) -> Outcome:
    ports = {m: pick_free_port() for m in "abc"}
    models = {
        m: {
            "launcher": "process",
            "kind": "llamacpp",
            "cmd": sim_argv(load_time, port, m),
            "upstreams": [f"http://127.0.0.1:{port}/v1"],
            "device": "gpu",
            "memory_gb": 8,
            "max_concurrency": 4,
        }
        for m, port in ports.items()
    }
    config = build_config(
        {
            "server": {"listen": "127.0.0.1:0", "log_level": "warning"},
            "queue": {"max_wait_s": 600},
            "fleet": {"health_poll_ms": POLL_S * 1000},
            "devices": {"gpu": {"memory_gb": 24, "exclusive": True}},
            "models": models,
        }
    )
    outcome, seen = Outcome(), set()
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=600) as http:
        started = await nursery.start(daemon.run)
        url = started.base_url + "/v1/chat/completions"

        async def send(model: str) -> None:
            await stream_once(http, url, model, trio.current_time(), outcome)
            await record_gap(http, f"http://127.0.0.1:{ports[model]}", seen, outcome)

        await replay(trace, send, outcome)
        assert daemon.fleet is not None
        outcome.swaps = daemon.fleet.statistics().swaps
        daemon.request_shutdown()
    return outcome


class FifoSwapper:
    """The naive baseline: one turn at a time in arrival order (trio.Lock is FIFO); a request for a model that is
    not loaded waits for the requests in flight, stops the loaded model, starts its own and waits for health."""

    def __init__(self, nursery: trio.Nursery, http: httpx.AsyncClient, load_time: float) -> None:
        self.nursery, self.http, self.load_time = nursery, http, load_time
        self.ports = {m: pick_free_port() for m in "abc"}
        self.turn = trio.Lock()
        self.loaded: str | None = None
        self.scope: trio.CancelScope | None = None
        self.stopped = trio.Event()
        self.in_flight = 0
        self.idle = trio.Event()
        self.idle.set()
        self.swaps = 0

    async def request(self, model: str, outcome: Outcome, seen: set[float]) -> None:
        scheduled = trio.current_time()
        async with self.turn:
            if self.loaded != model:
                await self.idle.wait()
                await self._switch(model)
            self.in_flight += 1
            self.idle = trio.Event() if self.in_flight == 1 else self.idle
        try:
            url = f"http://127.0.0.1:{self.ports[model]}/v1/chat/completions"
            await stream_once(self.http, url, model, scheduled, outcome)
            await record_gap(self.http, f"http://127.0.0.1:{self.ports[model]}", seen, outcome)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _switch(self, model: str) -> None:
        if self.scope is not None:
            self.scope.cancel()
            await self.stopped.wait()
            self.swaps += 1
        self.loaded = model
        self.stopped = trio.Event()
        child = ChildProcess(model, sim_argv(self.load_time, self.ports[model], model))
        await self.nursery.start(self._serve, child)
        health = f"http://127.0.0.1:{self.ports[model]}/health"
        while True:
            try:
                if (await self.http.get(health)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(POLL_S)

    async def _serve(self, child: ChildProcess, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self.scope = scope
            try:
                await child.run(task_status=task_status)
            finally:
                self.stopped.set()

    def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


async def run_fifo(trace: list[Arrival], load_time: float) -> Outcome:
    outcome, seen = Outcome(), set()
    async with httpx.AsyncClient(timeout=600) as http, trio.open_nursery() as nursery:
        swapper = FifoSwapper(nursery, http, load_time)
        await replay(trace, lambda model: swapper.request(model, outcome, seen), outcome)
        outcome.swaps = swapper.swaps
        swapper.stop()
    return outcome


def report(name: str, queuegate: Outcome, fifo: Outcome) -> None:
    print(f"\n== trace: {name}")
    print(f"{'policy':<12}{'swaps':>7}{'makespan s':>12}{'p50 wait s':>12}{'p95 wait s':>12}{'errors':>8}")
    for label, o in (("queuegate", queuegate), ("fifo", fifo)):
        print(f"{label:<12}{o.swaps:>7}{o.makespan:>12.2f}{o.p(0.5):>12.2f}{o.p(0.95):>12.2f}{o.errors:>8}")
    fewer = fifo.swaps / queuegate.swaps if queuegate.swaps else math.inf
    print(
        f"fifo/queuegate: swaps {fewer:.1f}x, makespan {fifo.makespan / queuegate.makespan:.2f}, "
        f"p50 wait {fifo.p(0.5) / queuegate.p(0.5):.2f}, p95 wait {fifo.p(0.95) / queuegate.p(0.95):.2f} "
        "(> 1: QueueGate better)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per trace")
    parser.add_argument("--load-time", type=float, default=1.0, help="simulated model load time, seconds")
    args = parser.parse_args()
    gaps: list[float] = []
    fifo_gaps: list[float] = []
    for name, trace in (("alternating", alternating(args.requests)), ("mixed", mixed(args.requests))):
        began = time.monotonic()
        queuegate = trio.run(run_queuegate, trace, args.load_time)
        fifo = trio.run(run_fifo, trace, args.load_time)
        report(name, queuegate, fifo)
        print(f"(trace took {time.monotonic() - began:.0f} s)")
        gaps += queuegate.gaps
        fifo_gaps += fifo.gaps
    print("\n== healthy -> first forwarded request, per fresh server")
    for label, values in (("queuegate", gaps), ("fifo (direct)", fifo_gaps)):
        ms = [v * 1000 for v in values]
        print(f"{label:<14} n={len(ms):<3} median {statistics.median(ms):6.1f} ms   max {max(ms):6.1f} ms")
    print(f"queuegate/direct median gap: {statistics.median(gaps) / statistics.median(fifo_gaps):.2f}")


if __name__ == "__main__":
    main()
