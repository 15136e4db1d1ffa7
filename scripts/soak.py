"""Soak: run QueueGate (the demo, or a config) for minutes the way users live with it, then check nothing broke.

Bursts of concurrent requests (random models, streams and plain answers, some aborted at a random point: while
queued, waiting for a swap or mid-stream) alternate with idle gaps longer than every timer in the stack (trio retires
idle worker threads after 10 s; keep-alives expire after 4-5 s; health checks run every few seconds). Models that
share the demo GPU are asked for in turn, so it swaps. One model server is killed with SIGKILL part-way through;
QueueGate must restart it by itself. At the end it reports, and exits 1 on any failure:

- unexpected exits: children of the daemon that died other than the one killed (or swapped out), and the daemon;
- requests by outcome as the clients saw them, and the usage rows the daemon wrote for them, request id by
  request id (a request answered 200 must have an `ok` row with the very token counts the client was told);
- memory (RSS) and open file descriptors of the daemon after warm-up and at the end, after an idle gap;
- requests in flight and waiting at the end (must be 0);
- tools (the demo's tool server): a share of the chat requests ask the time or a sum, so QueueGate runs a tool loop;
  each answered one must say it called a tool, each streamed answer must end with exactly one finish_reason, and
  every tool call the daemon logged must have gone well.

    python scripts/soak.py                      # the demo, 10 minutes
    python scripts/soak.py --minutes 3 --gap 11:14
    python scripts/soak.py --config queuegate.toml --state-dir .queuegate --models a,b --swap a,b \\
        --launched model-a.gguf,model-b.gguf --kill-model model-a.gguf
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
from benchlib import rss_kb

from queuegate.admin.client import AdminClient

LISTENING = "QueueGate listening on "
DEMO_MODELS = "chat,coder,writer,embed"
TOOL_QUESTIONS = ("What time is it in Europe/Berlin?", "What time is it?", "What is 12*7?", "What is (3+4)/2?")


@dataclass
class Sent:
    request_id: str
    model: str
    stream: bool
    outcome: str = "pending"  # ok | error | aborted | broken (transport failure the gateway should not cause)
    status: int | None = None
    usage: tuple[int, int] | None = None  # (prompt, completion) as the client was told
    detail: str = ""
    at: float = 0.0
    tool: bool = False  # it asked something the demo's models answer with a tool call
    tool_ran: bool = False  # its answer says QueueGate ran a tool for it
    finishes: int = 0  # finish reasons in its stream (exactly one when it ended whole)


@dataclass
class Soak:
    url: str
    daemon: subprocess.Popen[bytes]
    state_dir: Path
    models: list[str]
    log_path: Path
    sent: list[Sent] = field(default_factory=list)
    killed: list[tuple[int, float]] = field(default_factory=list)  # (pid, when)
    counter: int = 0
    tool_share: float = 0.0


def child_pids(pid: int) -> dict[int, str]:
    """The daemon's children: pid -> command line."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    children = {}
    for child in found:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            continue
        children[int(child)] = cmdline
    return children


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def one_request(soak: Soak, http: httpx.AsyncClient, model: str, abort_after: float | None) -> None:
    soak.counter += 1
    stream = model != "embed" and random.random() < 0.6
    tool = model != "embed" and random.random() < soak.tool_share
    sent = Sent(f"soak-{soak.counter}", model, stream, at=time.monotonic(), tool=tool)
    soak.sent.append(sent)
    headers = {"x-request-id": sent.request_id, "x-chat-id": f"chat-{random.randint(1, 5)}"}
    if model == "embed":
        path, body = "/v1/embeddings", {"model": model, "input": "soak"}
    else:
        path = "/v1/chat/completions"
        body = {
            "model": model,
            "max_tokens": random.randint(4, 40),
            "messages": [
                {"role": "user", "content": random.choice(TOOL_QUESTIONS) if tool else f"soak {soak.counter}"}
            ],
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
    try:
        with trio.move_on_after(abort_after if abort_after is not None else float("inf")) as aborting:
            if stream:
                await _streamed(http, soak.url + path, body, headers, sent)
            else:
                response = await http.post(soak.url + path, json=body, headers=headers)
                sent.status = response.status_code
                if response.status_code == 200:
                    answer = response.json()
                    usage = answer.get("usage") or {}
                    sent.usage = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                    sent.outcome = "ok"
                    if tool and not (answer.get("queuegate") or {}).get("tool_calls"):
                        sent.outcome, sent.detail = "broken", "asked a tool question; the answer says no tool ran"
                else:
                    sent.outcome, sent.detail = "error", response.text[:200]
        if aborting.cancelled_caught:
            sent.outcome = "aborted"
    except httpx.HTTPError as exc:
        sent.outcome, sent.detail = "broken", f"{type(exc).__name__}: {exc}"


async def _streamed(http: httpx.AsyncClient, url: str, body: dict, headers: dict, sent: Sent) -> None:
    async with http.stream("POST", url, json=body, headers=headers) as response:
        sent.status = response.status_code
        if response.status_code != 200:
            sent.outcome, sent.detail = "error", (await response.aread())[:200].decode(errors="replace")
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                sent.outcome, sent.detail = "error", event["error"].get("message", "")
                return
            if event.get("usage"):
                sent.usage = (event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
            sent.finishes += sum(1 for c in event.get("choices") or [] if c.get("finish_reason"))
            sent.tool_ran = sent.tool_ran or bool((event.get("queuegate") or {}).get("tool_calls"))
        sent.outcome = "ok" if done and sent.finishes == 1 and sent.tool_ran >= sent.tool else "broken"
        if not done:
            sent.detail = "the stream ended without [DONE] or an error event"
        elif sent.finishes != 1:
            sent.detail = f"{sent.finishes} finish reasons in one stream"
        elif sent.tool and not sent.tool_ran:
            sent.detail = "asked a tool question; the stream says no tool ran"


async def burst(soak: Soak, http: httpx.AsyncClient, size: int, swap_to: str | None) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(size):
            model = swap_to if swap_to and random.random() < 0.5 else random.choice(soak.models)
            abort_after = random.uniform(0.05, 3.0) if random.random() < 0.2 else None
            nursery.start_soon(one_request, soak, http, model, abort_after)
            await trio.sleep(random.uniform(0, 0.3))


def kill_model_server(soak: Soak, name: str) -> int | None:
    for pid, cmdline in child_pids(soak.daemon.pid).items():
        if name in cmdline and "_reaper" not in cmdline:
            os.kill(pid, signal.SIGKILL)
            soak.killed.append((pid, time.monotonic()))
            return pid
    return None


async def admin_status(soak: Soak) -> dict:
    async with AdminClient(soak.state_dir / "admin.sock") as client:
        status = await client.status()
    return {
        "in_flight": status.scheduler.in_service,
        "waiting": status.scheduler.waiting,
        "requests": status.requests_total,
        "models": {m.name: (m.state, m.reason, m.crashes) for m in status.fleet.models},
    }


def usage_rows(state_dir: Path) -> dict[str, tuple[str, int, int, int]]:
    with sqlite3.connect(f"file:{state_dir / 'usage.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT request_id, outcome, status, prompt_tokens, completion_tokens FROM requests")
        return {rid: (outcome, status, prompt, completion) for rid, outcome, status, prompt, completion in rows}


def compare(sent: list[Sent], rows: dict[str, tuple[str, int, int, int]]) -> list[str]:
    """Client outcomes against usage rows, request by request; the list of miscounts."""
    problems = []
    for s in sent:
        row = rows.get(s.request_id)
        if row is None:
            problems.append(f"{s.request_id}: {s.outcome} for the client, no usage row")
            continue
        outcome, status, prompt, completion = row
        if s.outcome == "ok":
            if outcome != "ok":
                problems.append(f"{s.request_id}: ok for the client, {outcome} ({status}) in usage")
            elif s.usage is not None and s.model != "embed" and s.usage != (prompt, completion):
                problems.append(f"{s.request_id}: client was told {s.usage}, usage says {(prompt, completion)}")
        elif s.outcome == "error" and outcome != "error":
            problems.append(f"{s.request_id}: error {s.status} for the client, {outcome} in usage")
        elif s.outcome == "aborted" and outcome not in ("cancelled", "ok"):
            problems.append(f"{s.request_id}: aborted by the client, {outcome} ({status}) in usage")
    extra = set(rows) - {s.request_id for s in sent}
    problems += [f"{rid}: a usage row for a request nobody sent" for rid in sorted(extra)]
    return problems


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="queuegate-soak-"))
    log_path = workdir / "daemon.log"
    command = [sys.executable, "-m", "queuegate.cli", "run", "--listen", "127.0.0.1:0"]
    if args.config:
        command += ["--config", str(Path(args.config).resolve())]
    else:
        command += ["--demo"]
    log = log_path.open("wb")
    daemon = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=log)
    assert daemon.stdout is not None
    line = daemon.stdout.readline().decode()
    if LISTENING not in line:
        print(f"the daemon did not start; its log: {log_path}")
        return 1
    url = line.split(LISTENING, 1)[1].split()[0]
    state_dir = Path(args.state_dir) if args.state_dir else workdir / ".queuegate"
    models = args.models.split(",")
    soak = Soak(url, daemon, state_dir, models, log_path, tool_share=args.tool_share)
    print(f"soak: {url}, {args.minutes:g} min, gaps {args.gap} s; log {log_path}", flush=True)

    gap_low, gap_high = (float(x) for x in args.gap.split(":"))
    deadline = time.monotonic() + args.minutes * 60
    kill_at = time.monotonic() + args.minutes * 60 / 3
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await burst(soak, http, 6, None)  # warm-up: every model loaded once
        await trio.sleep(3)
        start_rss, start_fds = rss_kb(daemon.pid), open_fds(daemon.pid)
        launched = args.launched.split(",")
        survivors = {pid: cmd for pid, cmd in child_pids(daemon.pid).items() if not any(n in cmd for n in launched)}
        swapping = args.swap.split(",") if args.swap else []
        bursts = 0
        while time.monotonic() < deadline and daemon.poll() is None:
            bursts += 1
            swap_to = swapping[bursts % len(swapping)] if swapping else None
            await burst(soak, http, random.randint(2, args.burst), swap_to)
            if soak.killed == [] and time.monotonic() >= kill_at:
                pid = kill_model_server(soak, args.kill_model)
                print(f"soak: killed {args.kill_model} (pid {pid}) with SIGKILL", flush=True)
            gap = random.uniform(gap_low, gap_high)
            print(f"soak: burst {bursts} done ({len(soak.sent)} requests so far); idle {gap:.0f} s", flush=True)
            await trio.sleep(gap)
        # The end: one more request per model after a last idle gap, then the checks.
        for model in soak.models:
            await one_request(soak, http, model, None)
        await http.get(url + "/v1/usage")  # waits for every finished request's row to be committed
        end_rss, end_fds = rss_kb(daemon.pid), open_fds(daemon.pid)
        status = await admin_status(soak)
    alive = daemon.poll() is None
    children = child_pids(daemon.pid)
    lost = {pid: cmd for pid, cmd in survivors.items() if pid not in children}
    rows = usage_rows(state_dir)
    problems = compare(soak.sent, rows)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(30)
    log.close()
    text = log_path.read_text(errors="replace")
    failures = text.count("model server failed")
    return report(soak, args, alive, lost, failures, status, problems, (start_rss, end_rss), (start_fds, end_fds), text)


def report(soak, args, alive, lost, failures, status, problems, rss, fds, log_text) -> int:
    outcomes = collections.Counter(s.outcome for s in soak.sent)
    kill_time = soak.killed[0][1] if soak.killed else None
    errors = [s for s in soak.sent if s.outcome == "error"]
    near_kill = [s for s in errors if kill_time is not None and abs(s.at - kill_time) < 10]
    other_errors = [s for s in errors if s not in near_kill]
    broken = [s for s in soak.sent if s.outcome == "broken"]
    in_flight_zero = status["in_flight"] == 0 and status["waiting"] == 0 and status["requests"] == 0
    expected_failures = len(soak.killed)
    print("\n== soak report")
    print(f"daemon alive at the end: {alive}")
    print(f"children lost (other than swapped or killed model servers): {len(lost)} {list(lost.values())}")
    print(f"model server failures logged: {failures} (expected {expected_failures}: the SIGKILL)")
    print(f"requests: {len(soak.sent)} " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"errors within 10 s of the kill: {len(near_kill)}; other errors: {len(other_errors)}")
    for s in (other_errors + broken)[:10]:
        print(f"  {s.request_id} {s.model} stream={s.stream} {s.outcome} {s.status}: {s.detail}")
    tool_calls = collections.Counter(re.findall(r"tool call .*? outcome=(\w+)", log_text))
    asked = collections.Counter(s.outcome for s in soak.sent if s.tool)
    print(f"tool questions: {dict(asked)}; tool calls logged by outcome: {dict(tool_calls)}")
    print(f"usage rows vs answers: {len(problems)} miscounted")
    for problem in problems[:10]:
        print(f"  {problem}")
    print(f"RSS: {rss[0] / 1024:.1f} MB after warm-up, {rss[1] / 1024:.1f} MB at the end ({rss[1] / rss[0]:.2f}x)")
    print(f"open file descriptors: {fds[0]} after warm-up, {fds[1]} at the end")
    print(
        f"in flight / waiting / active at the end: {status['in_flight']} / {status['waiting']} / {status['requests']}"
    )
    print("models at the end: " + "; ".join(f"{n} {s} (crashes {c})" for n, (s, _, c) in status["models"].items()))
    ok = (
        alive
        and not lost
        and failures == expected_failures
        and not other_errors
        and not broken
        and not problems
        and in_flight_zero
        and fds[1] <= fds[0] + args.fd_slack
        and "Traceback" not in log_text
        and set(tool_calls) <= {"ok"}
    )
    print("RESULT: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--gap", default="12:20", help="idle gap between bursts, min:max seconds")
    parser.add_argument("--burst", type=int, default=8, help="at most this many requests per burst")
    parser.add_argument("--config", help="a config to run instead of the demo")
    parser.add_argument("--state-dir", help="its state_dir (with --config), where usage.sqlite3 and admin.sock are")
    parser.add_argument("--models", default=DEMO_MODELS, help="comma-separated models to ask")
    parser.add_argument("--swap", default="coder,writer", help="models asked for in turn, so their device swaps")
    parser.add_argument(
        "--launched",
        default="demo-coder,demo-writer",
        help="names in the command lines of model servers QueueGate starts and stops (they may come and go)",
    )
    parser.add_argument("--kill-model", default="demo-coder", help="a name in the command line of the server to kill")
    parser.add_argument(
        "--tool-share", type=float, default=0.25, help="share of chat requests that ask a tool question"
    )
    parser.add_argument("--fd-slack", type=int, default=8, help="open descriptors allowed above the warm-up count")
    args = parser.parse_args()
    sys.exit(trio.run(run, args))


if __name__ == "__main__":
    main()
