"""`python -m queuegate.sim`: one simulated upstream; prints `QUEUEGATE_SIM_READY <base_url>` once listening."""

from __future__ import annotations

import argparse
import signal

import trio

from queuegate.sim import SimConfig, Simulator

READY = "QUEUEGATE_SIM_READY"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m queuegate.sim", description=__doc__)
    defaults = SimConfig()
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 = any free port")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--tokens-per-s", type=float, default=defaults.tokens_per_s, help="<= 0: no delay")
    parser.add_argument("--load-time", type=float, default=defaults.load_time_s, help="seconds of 503 'Loading model'")
    parser.add_argument("--health-ok-while-loading", action="store_true", help="/health answers 200 even while loading")
    parser.add_argument("--first-token-delay", type=float, default=defaults.first_token_delay_s)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--tool-server", action="store_true", help="also serve the demo tool server (OpenAPI)")
    args = parser.parse_args()
    config = SimConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        tokens_per_s=args.tokens_per_s,
        load_time_s=args.load_time,
        health_ok_while_loading=args.health_ok_while_loading,
        first_token_delay_s=args.first_token_delay,
        embedding_dim=args.embedding_dim,
        tool_server=args.tool_server,
    )
    trio.run(serve, Simulator(config))


async def serve(sim: Simulator) -> None:
    # A background shell starts us with SIGINT ignored; trio's receiver handles both signals regardless.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(sim.run)
            print(READY, url, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    main()
