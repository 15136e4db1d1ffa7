"""What does QueueGate cost? Drive a fast upstream directly and through the gateway in the same run.

Four servers run as separate processes on loopback: a simulated upstream answering at once (`queuegate.sim`,
no token delay), QueueGate in front of it (`queuegate run`, default logging, every feature on the path: a client key
with rpm and tpm limits, usage recorded in SQLite, metrics), a bare quart-trio no-op route (the framework
ceiling), and hypercorn serving a bare ASGI no-op app (the HTTP server's own floor, at concurrency 1). A lean
keep-alive HTTP/1.1 client (raw trio sockets) drives each for a fixed time, the servers interleaved over several
rounds (median throughput) so background noise hits them alike.

Printed: requests/s, p50/p99 latency, the latency QueueGate adds (and the HTTP server's floor), throughput ratios
gateway/direct and gateway/framework-ceiling, streamed events/s, and errors. Machines here are noisy 2-core VMs:
read the ratios, not absolutes. Targets: added p50 at concurrency 1 <= 1 ms; non-stream throughput at concurrency
16 >= 0.6 of the ceiling; streamed events/s at concurrency 64 >= 0.7 of direct; no errors at concurrency 128.

    python scripts/bench_overhead.py [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys

import trio
from benchlib import Rounds, bare_asgi_app, drive, instant_sim_behind_gateway, serve_app, start_server


def serve_noop() -> None:
    """The framework ceiling: a quart-trio POST route that reads the body and returns a small JSON."""
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio("noop")

    @app.post("/v1/chat/completions")
    async def noop():
        await request.get_data()
        return {"ok": True}

    serve_app(app)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario (median is shown)")
    parser.add_argument("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop()
        return
    if args.serve_bare:
        serve_app(bare_asgi_app(hold=False))
        return

    noop, noop_url = start_server([sys.executable, __file__, "--serve-noop"])
    bare, bare_url = start_server([sys.executable, __file__, "--serve-bare"])
    try:
        with instant_sim_behind_gateway(max_concurrency=512, extra_toml=FEATURES) as (sim_url, gateway_url, _):
            trio.run(report, sim_url, gateway_url, noop_url, bare_url, args.seconds, args.rounds)
    finally:
        for baseline in (noop, bare):
            baseline.terminate()
            baseline.wait(10)


# Every feature on the path: requests carry a key with limits that never bind; usage is on by default.
KEY = "qg-bench-overhead"
FEATURES = f'[keys.bench]\nkey = "{KEY}"\nrpm = 100000000\ntpm = 100000000000\n'


def body(stream: bool, tokens: int) -> bytes:
    stream_json = "true" if stream else "false"
    return (
        f'{{"model": "bench", "stream": {stream_json}, "max_tokens": {tokens}, '
        '"messages": [{"role": "user", "content": "benchmark"}]}'
    ).encode()


async def report(sim_url: str, gateway_url: str, noop_url: str, bare_url: str, seconds: float, rounds: int) -> None:
    path = "/v1/chat/completions"
    short = body(False, 1)
    # Warm up every server and connection pool, then measure.
    auth = {"authorization": f"Bearer {KEY}"}
    for url in (sim_url, gateway_url, noop_url, bare_url):
        await drive(url, path, short, 16, 0.5, auth)
    scenarios = [
        ("non-stream c=1", short, 1),
        ("non-stream c=16", short, 16),
        ("non-stream c=128", short, 128),
        ("stream 50 tokens c=64", body(True, 50), 64),
    ]
    results: dict[str, tuple[Rounds, Rounds]] = {}
    ceiling, bare = Rounds(), Rounds()
    for name, payload, concurrency in scenarios:
        direct, through = Rounds(), Rounds()
        # Interleave the servers round by round, so a noisy neighbour hurts each of them alike.
        for _ in range(rounds):
            direct.runs.append(await drive(sim_url, path, payload, concurrency, seconds))
            through.runs.append(await drive(gateway_url, path, payload, concurrency, seconds, auth))
            if concurrency == 16:
                ceiling.runs.append(await drive(noop_url, path, short, 16, seconds))
            if concurrency == 1:
                bare.runs.append(await drive(bare_url, path, short, 1, seconds))
        results[name] = (direct, through)

    print(
        f"{'scenario':<26}{'direct/s':>10}{'gateway/s':>11}{'gw/direct':>11}{'gw/ceiling':>12}"
        f"{'p50 +ms':>9}{'p99 +ms':>9}{'errors':>8}"
    )
    for name, (direct, through) in results.items():
        added_p50 = (through.pct(0.5) - direct.pct(0.5)) * 1000
        added_p99 = (through.pct(0.99) - direct.pct(0.99)) * 1000
        print(
            f"{name:<26}{direct.rps:>10,.0f}{through.rps:>11,.0f}{through.rps / direct.rps:>11.2f}"
            f"{through.rps / ceiling.rps:>12.2f}{added_p50:>9.2f}{added_p99:>9.2f}{direct.errors + through.errors:>8}"
        )
        if name.startswith("stream"):
            print(
                f"{'':<26}events/s direct {direct.events_per_s:,.0f}, gateway {through.events_per_s:,.0f} "
                f"(ratio {through.events_per_s / direct.events_per_s:.2f})"
            )
    print(f"\nframework ceiling (bare quart-trio no-op route, concurrency 16): {ceiling.rps:,.0f} req/s")
    c1_direct, c1_gateway = results["non-stream c=1"]
    added = (c1_gateway.pct(0.5) - c1_direct.pct(0.5)) * 1000
    floor = (bare.pct(0.5) - c1_direct.pct(0.5)) * 1000
    print(
        f"the HTTP server's own floor (hypercorn serving a bare ASGI no-op app, concurrency 1): adds {floor:.2f} ms "
        f"p50 over the upstream directly; the gateway adds {added / floor:.1f}x that"
    )
    share = results["non-stream c=16"][1].rps / ceiling.rps
    errors = sum(r.errors for r in results["non-stream c=128"])
    stream_direct, stream_gateway = results["stream 50 tokens c=64"]
    events = stream_gateway.events_per_s / stream_direct.events_per_s
    print("\ntargets:")
    print(f"  added p50 at c=1 <= 1 ms: {added:.2f} ms  {'ok' if added <= 1 else 'MISSED'}")
    print(f"  non-stream c=16 >= 0.6 of ceiling: {share:.2f}  {'ok' if share >= 0.6 else 'MISSED'}")
    print(f"  streamed events/s at c=64 >= 0.7 of direct: {events:.2f}  {'ok' if events >= 0.7 else 'MISSED'}")
    print(f"  no errors at c=128: {errors}  {'ok' if errors == 0 else 'MISSED'}")


if __name__ == "__main__":
    main()
