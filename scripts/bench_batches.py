"""What do batch jobs cost, and what do they cost the users? Two figures, against baselines measured in the same run.

1. Throughput: the same N lines run as a batch (`[batches].max_concurrency` C) and sent by a client with C requests
   at once, on the same gateway. Printed: lines/s of each and their ratio (target >= 0.9), for lines that take
   about 50 ms (a small model's short answer) and for instant ones (QueueGate's own cost only: each line's result
   is committed to SQLite with a sync before it counts).
2. Users during a batch: the p95 of a user's chats, one after another, while a batch keeps the model busy, vs the
   same chats with no batch. The model has C slots and the batch C lines in flight, so every user request waits for
   a slot: at most one line's time.

The model servers are `queuegate.sim` processes; the gateway is `queuegate run`, each its own process.

    python scripts/bench_batches.py [--lines 800] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import httpx
import openai
import trio
from benchlib import running

MODEL_TOML = '[models.m]\nupstreams = ["{url}/v1"]\nkind = "llamacpp"\nmax_concurrency = {slots}\n'


def lines(count: int, max_tokens: int) -> list[dict]:
    return [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"line {i}"}]}}
        for i in range(count)
    ]  # fmt: skip


def run_batch(gateway: str, jobs: list[dict]) -> float:
    """Seconds from the batch's creation to its end (every line completed)."""
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=60)
    content = "\n".join(json.dumps(job) for job in jobs).encode()
    upload = client.files.create(file=("jobs.jsonl", io.BytesIO(content)), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
    elapsed = time.perf_counter() - started
    assert batch.status == "completed" and batch.request_counts.completed == len(jobs), batch
    return elapsed


async def send_all(gateway: str, jobs: list[dict], concurrency: int) -> float:
    """Seconds for a client to send the same requests, `concurrency` at once."""
    queue = list(reversed(jobs))
    started = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            answer = await client.post(gateway + "/v1/chat/completions", json=queue.pop()["body"])
            assert answer.status_code == 200, answer.text

    async with httpx.AsyncClient(timeout=60) as client, trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, client)
    return time.perf_counter() - started


def user_chats(gateway: str, count: int) -> list[float]:
    """Seconds of each of `count` user chats, one after another."""
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(count):
            started = time.perf_counter()
            body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": f"user {i}"}]}
            answer = client.post(gateway + "/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            times.append(time.perf_counter() - started)
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    c = args.concurrency
    batches = f"[batches]\nmax_concurrency = {c}\n[queue]\nmax_size = 4096\n"
    with running() as started:
        paced = started.sim("--tokens-per-s", "80")  # (4 tokens: about 50 ms a line)
        instant = started.sim("--tokens-per-s", "0")
        paced_gw = started.gateway("paced", batches + MODEL_TOML.format(url=paced, slots=c))
        instant_gw = started.gateway("instant", batches + MODEL_TOML.format(url=instant, slots=c))
        print(f"{args.lines} lines, {c} at once (batch max_concurrency and client concurrency)")
        for name, gateway, max_tokens in (("~50 ms lines", paced_gw, 4), ("instant lines", instant_gw, 1)):
            jobs = lines(args.lines, max_tokens)
            trio.run(send_all, gateway, jobs[:50], c)  # warm up
            client_s = trio.run(send_all, gateway, jobs, c)
            batch_s = run_batch(gateway, jobs)
            print(f"  {name}: client {args.lines / client_s:7.1f} lines/s = 1.00   "
                  f"batch {args.lines / batch_s:7.1f} lines/s = {client_s / batch_s:.2f}  (target >= 0.9)")  # fmt: skip
        alone = user_chats(paced_gw, 60)
        client = openai.OpenAI(base_url=paced_gw + "/v1", api_key="unused", max_retries=0, timeout=60)
        content = "\n".join(json.dumps(job) for job in lines(5000, 4)).encode()
        upload = client.files.create(file=("jobs.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h")
        time.sleep(1.0)  # (the batch fills its slots)
        during = user_chats(paced_gw, 60)
        client.batches.cancel(batch.id)
        print(f"user chats (~50 ms each), one after another, p95: alone {p95(alone) * 1000:.0f} ms = 1.00   "
              f"during a batch {p95(during) * 1000:.0f} ms = {p95(during) / p95(alone):.2f}  "
              f"(at most one line's time more: a slot)")  # fmt: skip


if __name__ == "__main__":
    main()
