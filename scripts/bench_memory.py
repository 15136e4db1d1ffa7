"""What does chat memory cost, and what does it save? Figures as ratios against baselines measured in the same run.

1. Added latency per chat turn: the same 50-message chat sent to `queuegate run` with memory off, and with memory on
   over a built-in store already holding 10,000 and then 100,000 remembered turns (of other chats, plus this chat's
   own). The model is an instant simulator, so what is measured is QueueGate. Printed: p50/p90 per turn, as ratios
   against memory off.
2. Forwarded prompt size of a 50-turn chat with truncation on vs off (the point of the feature), measured on what
   memory forwards for its last turn.

    python scripts/bench_memory.py [--turns 200]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import trio
from benchlib import running

from queuegate.config import MemoryConfig
from queuegate.memory.backends import BuiltinBackend
from queuegate.memory.context import turn_text
from queuegate.memory.outcomes import Outcomes
from queuegate.memory.service import Memory
from queuegate.memory.store import MemoryStore

# A vocabulary shaped like speech: a few words everywhere, most words rare (Zipf's law), plus the usual small words.
VOCABULARY = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in ("n", "r", "st", "ll", "ck")]
SMALL = ["the", "a", "is", "my", "what", "to", "of", "and", "in", "you", "it"]


def sentence(rng: random.Random, words: int) -> str:
    picks = [VOCABULARY[min(len(VOCABULARY) - 1, int(rng.paretovariate(1.1))) - 1] for _ in range(words)]
    return " ".join(rng.choice(SMALL) + " " + word for word in picks)


def chat(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        topic = sentence(random.Random(i), 6)
        messages.append({"role": "user", "content": f"Turn {i}: tell me about {topic}."})
        messages.append({"role": "assistant", "content": f"About {topic}: " + "details " * 40})
    return messages


def fill(path: Path, rows: int, namespace: str) -> None:
    """`rows` remembered turns: most of other chats, 200 of this one."""
    path.parent.mkdir(mode=0o700, parents=True)
    store = MemoryStore(path)
    store.open()
    rng = random.Random(1)
    turns = []
    for i in range(rows):
        ns = namespace if i % (rows // 200) == 0 else f"key=- session=- id:other-{i % 5000}"
        turns.append((ns, turn_text(sentence(rng, 8), sentence(rng, 20), 12000)))
    store.remember(turns)
    store.close()


@contextlib.contextmanager
def gateways(rows: list[int]) -> Iterator[dict[str, str]]:
    """A gateway with memory off, and one with memory on over a store of each size (base URLs by name)."""
    with running() as started:
        sim_url = started.sim("--tokens-per-s", "0")
        urls = {}
        for name, filled in [("off", None), *((f"on, {n:,} turns stored", n) for n in rows)]:
            folder = name.replace(" ", "_").replace(",", "")
            memory = "[memory]\nenabled = true\nupsert = false\ntimeout_ms = 2000\n" if filled is not None else ""
            if filled is not None:
                fill(started.folder / folder / "memory.sqlite3", filled, "key=- session=- id:bench")
            model = f'[models.bench]\nupstreams = ["{sim_url}/v1"]\nkind = "llamacpp"\n'
            urls[name] = started.gateway(folder, model + memory)
        yield urls


def turn_latency(urls: dict[str, str], turns: int) -> None:
    body = {"model": "bench", "max_tokens": 8, "messages": chat(25)}
    times: dict[str, list[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=30, headers={"x-chat-id": "bench"}) as client:
        for i in range(turns + 20):
            for name, url in urls.items():
                started = time.perf_counter()
                assert client.post(url + "/v1/chat/completions", json=body).status_code == 200
                if i >= 20:
                    times[name].append(time.perf_counter() - started)
    base50, base90 = statistics.median(times["off"]), statistics.quantiles(times["off"], n=10)[-1]
    print(f"added latency per chat turn (50 messages), {turns} turns each, interleaved")
    for name, runs in times.items():
        p50, p90 = statistics.median(runs), statistics.quantiles(runs, n=10)[-1]
        print(f"  memory {name:<26} p50 {p50 * 1000:6.2f} ms  p90 {p90 * 1000:6.2f} ms  = {p50 / base50:.2f}x p50,"
              f" {p90 / base90:.2f}x p90")  # fmt: skip


async def prompt_size() -> None:
    messages = chat(50)[:-1]  # 50 turns, the last question open
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore(Path(tmp) / "memory.sqlite3")
        outcomes = Outcomes()
        memory = Memory(MemoryConfig(enabled=True), BuiltinBackend(store, outcomes), outcomes)
        await trio.to_thread.run_sync(store.open)
        for i in range(0, len(messages) - 2, 2):
            store.remember([("ns", turn_text(messages[i + 1]["content"], messages[i + 2]["content"], 12000))])
        kept = await memory.prepare("ns", messages, "user")
        store.close()
    full, forwarded = len(msgspec.json.encode(messages)), len(msgspec.json.encode(kept.messages))
    print("forwarded prompt of a 50-turn chat (its last turn)")
    print(f"  truncation off (everything):        {full:8,} bytes  = 1.00")
    print(f"  memory on (keep_last 4 + recalled):  {forwarded:8,} bytes  = {forwarded / full:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rows", default="10000,100000", help="stored turns of each memory-on gateway")
    args = parser.parse_args()
    with gateways([int(n) for n in args.rows.split(",")]) as urls:
        turn_latency(urls, args.turns)
    trio.run(prompt_size)


if __name__ == "__main__":
    main()
