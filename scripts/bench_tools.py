"""What do tools cost? Two figures, each against a baseline measured in the same run.

1. One tool round through QueueGate (execute): a client asks once; QueueGate asks the model, runs the model's call
   against the tool server, and asks the model again. Baseline: the same two model calls and the tool call made
   directly by a client (the same HTTP client, keep-alive connections). Printed: p50 and p90 of each, the ratio,
   and the milliseconds QueueGate adds.
2. Plain chat throughput (streamed requests that call no tool) with a tool server configured (execute: every
   request is offered its tools and read for tool calls) vs without. Target: at least 0.95.

The model and the tool server are `queuegate.sim` processes that answer at once, so what is measured is QueueGate.

    python scripts/bench_tools.py [--rounds 200] [--seconds 3] [--concurrency 16]
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

CALL = 'CALL 1 calculate {"expression": "6*7"}'
CALCULATE = {
    "type": "function",
    "function": {
        "name": "calculate",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
STREAM_BODY = msgspec.json.encode(
    {"model": "bench", "stream": True, "max_tokens": 32, "messages": [{"role": "user", "content": "benchmark"}]}
)


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str, str, str]]:
    """The instant model, the tool server, a gateway without tools and one with the tool server (base URLs)."""
    with running() as started:
        sim_url = started.sim("--tokens-per-s", "0")
        tools_url = started.sim("--tool-server")
        model = f'[queue]\nmax_size = 4096\n[models.bench]\nupstreams = ["{sim_url}/v1"]\nkind = "llamacpp"\n'
        model += "max_concurrency = 64\n"
        plain = started.gateway("plain", model)
        with_tools = started.gateway("tools", model + f'[tools.servers.bench]\nurl = "{tools_url}"\n')
        yield sim_url, tools_url, plain, with_tools


def direct_round(client: httpx.Client, sim: str, tools: str) -> str:
    """The client runs the loop itself: model, tool, model."""
    messages = [{"role": "user", "content": CALL}]
    first = client.post(
        f"{sim}/v1/chat/completions", json={"model": "bench", "messages": messages, "tools": [CALCULATE]}
    )
    message = first.json()["choices"][0]["message"]
    (call,) = message["tool_calls"]
    result = client.post(f"{tools}/calculate", json=msgspec.json.decode(call["function"]["arguments"])).text
    messages += [message, {"role": "tool", "tool_call_id": call["id"], "content": result}]
    second = client.post(
        f"{sim}/v1/chat/completions", json={"model": "bench", "messages": messages, "tools": [CALCULATE]}
    )
    return second.json()["choices"][0]["message"]["content"]


def gateway_round(client: httpx.Client, gateway: str) -> str:
    body = {"model": "bench", "messages": [{"role": "user", "content": CALL}]}
    return client.post(f"{gateway}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def tool_round_latency(sim: str, tools: str, gateway: str, rounds: int) -> None:
    direct: list[float] = []
    through: list[float] = []
    with httpx.Client(timeout=30) as client:
        for i in range(rounds + 20):  # the first 20 of each warm up
            for runs, run in (
                (direct, lambda: direct_round(client, sim, tools)),
                (through, lambda: gateway_round(client, gateway)),
            ):
                started = time.perf_counter()
                answer = run()
                if i >= 20:
                    runs.append(time.perf_counter() - started)
                assert '"result":42' in answer, answer
    d50, g50 = statistics.median(direct), statistics.median(through)
    d90, g90 = (statistics.quantiles(x, n=10)[-1] for x in (direct, through))
    print(f"one tool round, {rounds} each (interleaved)")
    print(f"  direct (client runs model, tool, model): p50 {d50 * 1000:.2f} ms  p90 {d90 * 1000:.2f} ms  = 1.00")
    print(f"  through QueueGate (execute):             p50 {g50 * 1000:.2f} ms  p90 {g90 * 1000:.2f} ms"
          f"  = {g50 / d50:.2f}x p50, {g90 / d90:.2f}x p90; adds {(g50 - d50) * 1000:.2f} ms at p50")  # fmt: skip


async def plain_throughput(plain: str, with_tools: str, seconds: float, concurrency: int, rounds: int) -> None:
    """Interleaved rounds; each round's ratio is against the plain gateway measured right before it, and an A/A
    round (the plain gateway again) shows how much of a difference is noise on this machine."""
    path = "/v1/chat/completions"
    for url in (plain, with_tools):
        await drive(url, path, STREAM_BODY, concurrency, 0.5)  # warm up
    ratios: dict[str, list[float]] = {"tools": [], "again": []}
    rps: dict[str, list[float]] = {"plain": [], "tools": []}
    for _ in range(rounds):
        base = await drive(plain, path, STREAM_BODY, concurrency, seconds)
        tools = await drive(with_tools, path, STREAM_BODY, concurrency, seconds)
        again = await drive(plain, path, STREAM_BODY, concurrency, seconds)
        assert base.errors == tools.errors == again.errors == 0
        rps["plain"].append(base.rps)
        rps["tools"].append(tools.rps)
        ratios["tools"].append(tools.rps / base.rps)
        ratios["again"].append(again.rps / base.rps)
    print(f"plain streamed chat (32 tokens, no tool called), concurrency {concurrency}, median of {rounds} rounds")
    print(f"  no [tools]:                 {statistics.median(rps['plain']):8.1f} req/s  = 1.00")
    print(f"  a tool server configured:   {statistics.median(rps['tools']):8.1f} req/s"
          f"  = {statistics.median(ratios['tools']):.2f}  (target >= 0.95)")  # fmt: skip
    print(f"  no [tools] again (A/A):                   = {statistics.median(ratios['again']):.2f}  (the noise)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--throughput-rounds", type=int, default=5)
    args = parser.parse_args()
    with servers() as (sim, tools, plain, with_tools):
        tool_round_latency(sim, tools, with_tools, args.rounds)
        trio.run(plain_throughput, plain, with_tools, args.seconds, args.concurrency, args.throughput_rounds)


if __name__ == "__main__":
    main()
