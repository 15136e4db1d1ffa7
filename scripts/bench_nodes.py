"""What do nodes cost? Two figures, against baselines measured in the same run.

1. Routing overhead: 2 nodes x 10 models registered at runtime (POST /v1/nodes/register) vs the same upstreams
   configured statically, under the same load (streamed chats spread over the 10 models). Printed: requests/s of
   each and their ratio (target >= 0.95), with an A/A round of the static gateway for the noise.
2. From a node's first heartbeat to its first served request: a node registers a new model, and a client asks for
   it at once and again until it is answered. Printed: the median over several nodes.

The model servers are two `queuegate.sim` processes (one per node) that answer at once, so what is measured is
QueueGate.

    python scripts/bench_nodes.py [--rounds 3] [--seconds 3] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import httpx
import msgspec
import trio
from benchlib import drive, running

MODELS = [f"m{i}" for i in range(10)]
NODE_KEY = "bench-node-key"


def body(model: str) -> bytes:
    return msgspec.json.encode(
        {"model": model, "stream": True, "max_tokens": 16, "messages": [{"role": "user", "content": "benchmark"}]}
    )


@contextlib.contextmanager
def servers() -> Iterator[tuple[list[str], str, str]]:
    """Two instant model servers (the nodes'), a gateway with every model configured on both, and a gateway with
    no model and a node key (base URLs)."""
    with running() as started:
        sims = [started.sim("--tokens-per-s", "0") for _ in range(2)]
        upstreams = ", ".join(f'"{url}/v1"' for url in sims)
        queue = "[queue]\nmax_size = 4096\n"
        static = queue + "".join(
            f'[models.{m}]\nupstreams = [{upstreams}]\nkind = "llamacpp"\nmax_concurrency = 64\n' for m in MODELS
        )
        nodes = queue + f'[node_keys.bench]\nkey = "{NODE_KEY}"\n[nodes]\nstale_after_s = 600\n'
        yield sims, started.gateway("static", static), started.gateway("nodes", nodes)


def register(client: httpx.Client, gateway: str, node: str, url: str, models: list[str]) -> None:
    served = [{"name": m, "base_url": f"{url}/v1", "kind": "llamacpp", "max_concurrency": 64} for m in models]
    answer = client.post(
        f"{gateway}/v1/nodes/register",
        json={"node": node, "models": served},
        headers={"authorization": f"Bearer {NODE_KEY}"},
    )
    answer.raise_for_status()


async def load(url: str, concurrency: int, seconds: float) -> float:
    """Requests/s of streamed chats spread over every model (`concurrency` clients per model)."""
    results = []

    async def one(model: str) -> None:
        results.append(await drive(url, "/v1/chat/completions", body(model), concurrency, seconds))

    async with trio.open_nursery() as nursery:
        for model in MODELS:
            nursery.start_soon(one, model)
    assert all(r.errors == 0 for r in results), [r.errors for r in results]
    return sum(r.requests for r in results) / seconds


async def overhead(static: str, nodes: str, rounds: int, seconds: float, concurrency: int) -> None:
    for url in (static, nodes):
        await load(url, concurrency, 0.5)  # warm up
    rps: dict[str, list[float]] = {"static": [], "nodes": [], "again": []}
    for _ in range(rounds):
        for name, url in (("static", static), ("nodes", nodes), ("again", static)):
            rps[name].append(await load(url, concurrency, seconds))
    base = statistics.median(rps["static"])
    print(f"streamed chats over 10 models, {concurrency * len(MODELS)} clients, median of {rounds} rounds")
    print(f"  configured statically (2 upstreams each):   {base:8.1f} req/s  = 1.00")
    print(f"  registered by 2 nodes (10 models each):     {statistics.median(rps['nodes']):8.1f} req/s"
          f"  = {statistics.median(rps['nodes']) / base:.2f}  (target >= 0.95)")  # fmt: skip
    print(f"  configured statically again (A/A):                        "
          f"= {statistics.median(rps['again']) / base:.2f}  (the noise)")  # fmt: skip


def first_request(gateway: str, sim: str, nodes: int) -> None:
    times = []
    with httpx.Client(timeout=30) as client:
        for i in range(nodes):
            model = f"fresh{i}"
            started = time.perf_counter()
            register(client, gateway, f"fresh-node-{i}", sim, [model])
            while True:
                answer = client.post(
                    f"{gateway}/v1/chat/completions",
                    json={"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                )
                if answer.status_code == 200:
                    break
            times.append(time.perf_counter() - started)
    print(f"first heartbeat to first served request, median of {nodes} new nodes: "
          f"{statistics.median(times) * 1000:.1f} ms (max {max(times) * 1000:.1f} ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=2, help="clients per model")
    args = parser.parse_args()
    with servers() as (sims, static, nodes):
        with httpx.Client(timeout=30) as client:
            for i, url in enumerate(sims):
                register(client, nodes, f"node{i}", url, MODELS)
        trio.run(overhead, static, nodes, args.rounds, args.seconds, args.concurrency)
        first_request(nodes, sims[0], 10)


if __name__ == "__main__":
    main()
