"""How does QueueGate compare with LiteLLM's proxy? The same load against both, side by side, in the same run.

One simulated upstream answering at once (`queuegate.sim`, no token delay) serves both gateways, each its own
process on loopback, with the features a deployment would have on:

- QueueGate (`queuegate run`, one process): a client key (every request carries it; rpm/tpm limits checked on
  every request but set never to bind), usage recorded per request in SQLite (the default, committed every
  second), Prometheus metrics (always on), default logging.
- LiteLLM's proxy (`litellm --config`, pinned below, its default of 1 uvicorn worker): a master key (every request
  carries it), its Prometheus callback, default logging (uvicorn's access log: a line per request, to a file here;
  QueueGate writes none per request). Its virtual keys, rate limits and spend logs need Postgres,
  which is not run here, so LiteLLM records no usage and limits nothing. Its telemetry is gone (`--telemetry` is a
  no-op in this version); LITELLM_LOCAL_MODEL_COST_MAP keeps it from fetching its cost map from the internet.

LiteLLM is installed once into a venv of its own outside the repo ($QUEUEGATE_CACHE or ~/.cache/queuegate, keyed
by version): a few minutes and about 750 MB the first time, nothing after. Before measuring, every server answers
one plain and one streamed request read in full (the stream must hold all its tokens), and both gateways must
refuse a request without a key and count the answered ones in their /metrics. A lean keep-alive HTTP/1.1 client
(benchlib.drive) then drives the upstream directly (the ceiling), QueueGate and LiteLLM for a fixed time each,
interleaved round by round (median throughput) so background noise hits them alike.

Printed per scenario: requests/s of each (for streams: completed streams/s, and the tokens/s they carry), the
ratio QueueGate/LiteLLM, each gateway as a fraction of direct, p50 latencies and errors; then the usage rows
QueueGate recorded and each gateway's resident memory. Machines here are noisy 2-core VMs where the client, the
upstream and the gateway share the cores: read the ratios, not absolutes. A default run takes about 3 minutes
after the install.

    python scripts/bench_vs_peers.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import trio
from benchlib import Result, Rounds, drive, rss_kb, start_server

LITELLM_VERSION = "1.108.7"  # the newest whose [proxy] extra resolves on PyPI here (later ones pin unreleased deps)
SECRET = "sk-bench-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}
PATH = "/v1/chat/completions"
TOKENS = 50
SCENARIOS = [
    ("non-stream c=1", False, 1),
    ("non-stream c=16", False, 16),
    ("non-stream c=64", False, 64),
    (f"stream {TOKENS} tok c=16", True, 16),
    (f"stream {TOKENS} tok c=64", True, 64),
]


def body(stream: bool) -> bytes:
    """A chat request for model `bench`: one token, or TOKENS streamed."""
    request = {"model": "bench", "stream": stream, "max_tokens": TOKENS if stream else 1}
    return json.dumps({**request, "messages": [{"role": "user", "content": "benchmark"}]}).encode()


def litellm_venv() -> Path:
    """The venv holding LiteLLM's proxy, installed on first use (a marker written last makes a half install be
    redone). prometheus-client is not in the [proxy] extra but its Prometheus callback needs it."""
    cache = Path(os.environ.get("QUEUEGATE_CACHE", Path.home() / ".cache" / "queuegate"))
    venv = cache / f"litellm-venv-{LITELLM_VERSION}"
    if (venv / ".installed").exists():
        print(f"LiteLLM {LITELLM_VERSION}: cached in {venv}", flush=True)
        return venv
    print(f"LiteLLM {LITELLM_VERSION}: installing into {venv} (once: a few minutes, about 750 MB)", flush=True)
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}", "prometheus-client"], check=True)
    subprocess.run([str(venv / "bin" / "litellm"), "--version"], check=True, env=litellm_env())  # it must start
    (venv / ".installed").touch()
    print(f"LiteLLM {LITELLM_VERSION}: installed in {time.monotonic() - started:.0f} s", flush=True)
    return venv


def litellm_env() -> dict[str, str]:
    """Our environment, plus: use the cost map shipped in the package instead of fetching it."""
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def stop(process: subprocess.Popen) -> None:
    """Terminate a process we started; kill it if it has not exited 10 s later."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch(stack: contextlib.ExitStack, argv: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server that prints one of benchlib's ready lines, stopped when `stack` closes (even if it never got
    ready); the process and its base URL (without /v1)."""
    try:
        return start_server(argv, on_start=lambda process: stack.callback(stop, process))
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def start_queuegate(stack: contextlib.ExitStack, folder: Path, sim_url: str) -> tuple[subprocess.Popen, str]:
    """`queuegate run` in front of the upstream with a key (limits that never bind) and usage recording."""
    config = folder / "queuegate.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "{folder / "queuegate"}"\n'
        "[queue]\nmax_size = 4096\n"
        "[usage]\nenabled = true\n"
        f'[models.bench]\nupstreams = ["{sim_url}/v1"]\nkind = "openai"\nmax_concurrency = 512\n'
        f'[keys.bench]\nkey = "{SECRET}"\nrpm = 10000000\ntpm = 10000000000\n'
    )
    return launch(stack, [sys.executable, "-m", "queuegate.cli", "run", "--config", str(config)])


def start_litellm(stack: contextlib.ExitStack, folder: Path, venv: Path, sim_url: str) -> tuple[subprocess.Popen, str]:
    """LiteLLM's proxy in front of the upstream (model `bench` as an OpenAI-compatible provider) with a master key
    and its Prometheus callback, once /health/liveliness answers. Its output goes to litellm.log in `folder`."""
    config = folder / "litellm.yaml"  # JSON is YAML
    model = {"model": "openai/bench", "api_base": f"{sim_url}/v1", "api_key": "anything"}
    config.write_text(
        json.dumps(
            {
                "model_list": [{"model_name": "bench", "litellm_params": model}],
                "litellm_settings": {"callbacks": ["prometheus"]},
                "general_settings": {"master_key": SECRET},
            }
        )
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = folder / "litellm.log"
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=litellm_env())
    stack.callback(stop, process)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"LiteLLM exited with {process.returncode} before it was ready:\n{tail(log)}")
        with contextlib.suppress(OSError):
            if call(f"{url}/health/liveliness")[0] == 200:
                return process, url
        time.sleep(0.5)
    raise SystemExit(f"LiteLLM did not answer /health/liveliness within 180 s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    """The last lines of a log file."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request (POST with `data`, else GET), read in full: (status, body), also for an error status."""
    request = urllib.request.Request(url, data, {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check_answers(name: str, url: str, headers: dict[str, str]) -> None:
    """`name` answers a plain request with a choice and a streamed one with TOKENS content deltas and [DONE]."""
    code, plain = call(url + PATH, body(False), headers)
    if code != 200 or not json.loads(plain).get("choices"):
        raise SystemExit(f"{name} answered a plain request with {code}: {plain[:500]!r}")
    code, streamed = call(url + PATH, body(True), headers)
    payloads = [line[5:].strip() for line in streamed.decode().splitlines() if line.startswith("data:")]
    chunks = [json.loads(payload) for payload in payloads if payload != "[DONE]"]
    deltas = sum(1 for chunk in chunks for choice in chunk.get("choices", []) if choice["delta"].get("content"))
    if code != 200 or deltas != TOKENS or payloads[-1:] != ["[DONE]"]:
        raise SystemExit(f"{name} streamed {code} with {deltas} content deltas of {TOKENS}: {streamed[-500:]!r}")


def check_features(name: str, url: str, counter: str) -> int:
    """`name` refuses a request without a key and its /metrics counts the requests answered (in `counter`); the
    status of the refusal."""
    refused = call(url + PATH, body(False))[0]
    if refused == 200:
        raise SystemExit(f"{name} answered a request without a key: its authentication is off")
    code, metrics = call(url + "/metrics", None, AUTH)
    if code != 200 or f"\n{counter}{{".encode() not in metrics:
        raise SystemExit(f"{name} answered GET /metrics with {code} and no {counter} samples")
    return refused


async def measure(
    targets: dict[str, tuple[str, dict[str, str]]], seconds: float, rounds: int
) -> tuple[dict[str, dict[str, Rounds]], dict[str, int]]:
    """Warm every server up, then each scenario round by round, the servers in turn. Returns the rounds per scenario
    and server, and how many requests each server answered in all (warm-up included)."""
    answered = dict.fromkeys(targets, 0)

    async def run(name: str, stream: bool, concurrency: int, duration: float) -> Result:
        url, headers = targets[name]
        with trio.move_on_after(duration + 120) as scope:
            result = await drive(url, PATH, body(stream), concurrency, duration, headers)
        if scope.cancelled_caught:
            raise SystemExit(f"{name} left requests unanswered for 2 minutes (stream={stream}, c={concurrency})")
        answered[name] += result.requests
        return result

    for name in targets:
        for stream in (False, True):
            await run(name, stream, 16, 1.0)
    results: dict[str, dict[str, Rounds]] = {}
    for scenario, stream, concurrency in SCENARIOS:
        results[scenario] = {name: Rounds() for name in targets}
        for _ in range(rounds):
            for name in targets:
                results[scenario][name].runs.append(await run(name, stream, concurrency, seconds))
    return results, answered


def report(results: dict[str, dict[str, Rounds]]) -> None:
    """The table: throughput, ratios, p50 latencies and errors per scenario, and the range of QueueGate/LiteLLM."""
    print(
        f"\n{'scenario':<22}{'direct/s':>10}{'QueueGate/s':>13}{'LiteLLM/s':>11}{'QG/LiteLLM':>12}{'QG/direct':>11}"
        f"{'LL/direct':>11}{'p50 QG ms':>11}{'p50 LL ms':>11}{'errors':>8}"
    )
    ratios: dict[bool, list[float]] = {False: [], True: []}
    for scenario, stream, _ in SCENARIOS:
        direct, qg, ll = (results[scenario][name] for name in ("direct", "QueueGate", "LiteLLM"))
        ratio = qg.rps / ll.rps if ll.rps else float("inf")
        ratios[stream].append(ratio)
        errors = f"{qg.errors}/{ll.errors}"
        qg_p50, ll_p50 = qg.pct(0.5) * 1000, ll.pct(0.5) * 1000
        print(
            f"{scenario:<22}{direct.rps:>10,.0f}{qg.rps:>13,.0f}{ll.rps:>11,.1f}{ratio:>12.1f}"
            f"{qg.rps / direct.rps:>11.2f}{ll.rps / direct.rps:>11.3f}{qg_p50:>11.1f}{ll_p50:>11.1f}{errors:>8}"
        )
        if stream:
            print(
                f"{'':<22}tokens/s: direct {direct.rps * TOKENS:,.0f}, QueueGate {qg.rps * TOKENS:,.0f}, "
                f"LiteLLM {ll.rps * TOKENS:,.0f}"
            )
    print("(/s: answered requests per second; for streams: completed streams per second. errors: QueueGate/LiteLLM)")
    print(
        f"\nQueueGate / LiteLLM: non-stream requests/s {min(ratios[False]):.1f}-{max(ratios[False]):.1f}x, "
        f"streams/s {min(ratios[True]):.1f}-{max(ratios[True]):.1f}x"
    )


def usage_rows(url: str) -> int:
    """The requests QueueGate's usage store holds for the bench key."""
    code, data = call(url + "/v1/usage", None, AUTH)
    if code != 200:
        raise SystemExit(f"QueueGate answered GET /v1/usage with {code}: {data[:500]!r}")
    return int(json.loads(data)["totals"]["requests"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario (median is shown)")
    args = parser.parse_args()
    started = time.monotonic()
    venv = litellm_venv()
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        _, sim_url = launch(stack, [sys.executable, "-m", "queuegate.sim", "--port", "0", "--tokens-per-s", "0"])
        qg, qg_url = start_queuegate(stack, folder, sim_url)
        print("starting LiteLLM's proxy (about 15 s)", flush=True)
        ll, ll_url = start_litellm(stack, folder, venv, sim_url)
        targets = {"direct": (sim_url, {}), "QueueGate": (qg_url, AUTH), "LiteLLM": (ll_url, AUTH)}
        for name, (url, headers) in targets.items():
            check_answers(name, url, headers)
        refusals = {
            "QueueGate": check_features("QueueGate", qg_url, "queuegate_requests_total"),
            "LiteLLM": check_features("LiteLLM", ll_url, "litellm_proxy_total_requests_metric_total"),
        }
        print(
            f"QueueGate {importlib.metadata.version('queuegate')}, one process: client key with rpm/tpm limits "
            "(never binding), usage rows in SQLite, /metrics, default logging"
        )
        print(
            f"LiteLLM {LITELLM_VERSION}, 1 uvicorn worker (its default): master key, Prometheus callback, default "
            "logging; no database, so no virtual keys, rate limits or spend logs"
        )
        print(
            f"without a key: QueueGate answers {refusals['QueueGate']}, LiteLLM {refusals['LiteLLM']}; "
            f"measuring {len(SCENARIOS)} scenarios x {args.rounds} rounds x {args.seconds:g} s per server",
            flush=True,
        )
        results, answered = trio.run(measure, targets, args.seconds, args.rounds)
        report(results)
        if any(rounds["LiteLLM"].errors for rounds in results.values()):
            print(f"\nLiteLLM's log ends:\n{tail(folder / 'litellm.log')}\n")
        time.sleep(2)  # usage rows are committed every second
        answered_qg = answered["QueueGate"] + 2  # and the two answers check_answers read
        print(f"QueueGate usage rows: {usage_rows(qg_url):,} for {answered_qg:,} answered requests")
        print(
            f"resident memory after the run: QueueGate {rss_kb(qg.pid) / 1024:.0f} MiB, "
            f"LiteLLM {rss_kb(ll.pid) / 1024:.0f} MiB"
        )
    print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
