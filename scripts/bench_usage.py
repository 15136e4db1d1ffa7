"""What do usage accounting and rate limits cost? The same gateway four ways, in the same run.

Four `queuegate run` processes, each in front of its own instant simulated upstream: usage accounting off (the
baseline), on (the default: a SQLite row per request, committed every second), durable (each request waits for its
row's commit, shared with the requests finishing alongside, before its last byte), and on with a key whose rpm/tpm
limits are checked on every request but never bind (its windows fill with every request of the last minute). A
lean keep-alive client drives each for a fixed time, interleaved over several rounds (median throughput), then
checks that the usage store holds exactly one row per answered request.

Printed: requests/s and p50 latency of each, as ratios against the baseline. Targets: accounting costs at most 10%
of throughput at concurrency 16, and limits at most 10% more; rows written == requests answered. Durable usage
has no target: it trades throughput for losing nothing a client saw, and its ratio is what that costs.

    python scripts/bench_usage.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import urllib.request

import trio
from benchlib import Result, drive, instant_sim_behind_gateway

SECRET = "sk-bench-0123456789"
PATH = "/v1/chat/completions"
BODY = b'{"model": "bench", "max_tokens": 1, "messages": [{"role": "user", "content": "benchmark"}]}'
SETUPS = {
    "usage off": ("[usage]\nenabled = false\n", None),
    "usage on": ("", None),
    "usage durable": ("[usage]\ndurable = true\n", None),
    "usage on + key limits": (
        f'[keys.bench]\nkey = "{SECRET}"\nrpm = 100000000\ntpm = 1000000000\n',
        {"authorization": f"Bearer {SECRET}"},
    ),
}


def usage_rows(url: str, headers: dict[str, str] | None) -> int:
    request = urllib.request.Request(url + "/v1/usage", headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.load(response)["totals"]["requests"])


async def measure(
    urls: dict[str, str], seconds: float, rounds: int, concurrency: int
) -> tuple[dict[str, list[Result]], dict[str, int]]:
    """Per setup: the measured rounds, and how many requests were answered in all (warm-up included)."""
    results: dict[str, list[Result]] = {name: [] for name in urls}
    warm_up = {name: (await drive(url, PATH, BODY, concurrency, 0.5, SETUPS[name][1])).requests
               for name, url in urls.items()}  # fmt: skip
    for _ in range(rounds):
        for name, url in urls.items():
            results[name].append(await drive(url, PATH, BODY, concurrency, seconds, SETUPS[name][1]))
    return results, {name: warm_up[name] + sum(r.requests for r in runs) for name, runs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(instant_sim_behind_gateway(max_concurrency=64, extra_toml=toml))[1]
            for name, (toml, _) in SETUPS.items()
        }
        results, answered = trio.run(measure, urls, args.seconds, args.rounds, args.concurrency)
        rows = {name: usage_rows(url, SETUPS[name][1]) for name, url in urls.items() if name != "usage off"}

    base = results["usage off"]
    base_rps = statistics.median(r.rps for r in base)
    base_p50 = Result(latencies=[x for r in base for x in r.latencies]).pct(0.5)
    print(f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s (median req/s)")
    print(f"{'setup':<24}{'req/s':>9}{'ratio':>8}{'p50 ms':>9}{'ratio':>8}{'errors':>8}")
    ratios = {}
    for name, runs in results.items():
        rps = statistics.median(r.rps for r in runs)
        p50 = Result(latencies=[x for r in runs for x in r.latencies]).pct(0.5)
        ratios[name] = rps / base_rps
        errors = sum(r.errors for r in runs)
        print(f"{name:<24}{rps:>9,.0f}{rps / base_rps:>8.2f}{p50 * 1000:>9.2f}{p50 / base_p50:>8.2f}{errors:>8}")
    print("\nusage rows vs requests answered (warm-up included):")
    for name, count in rows.items():
        print(f"  {name}: {count} rows, {answered[name]} answered  {'ok' if count == answered[name] else 'MISSED'}")
    accounting = ratios["usage on"]
    limits = ratios["usage on + key limits"] / ratios["usage on"]
    print("\ntargets:")
    print(f"  accounting keeps >= 0.90 of throughput: {accounting:.2f}  {'ok' if accounting >= 0.9 else 'MISSED'}")
    print(f"  limits keep >= 0.90 of that: {limits:.2f}  {'ok' if limits >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
