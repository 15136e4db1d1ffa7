"""`queuegate run` as a user runs it: a real subprocess, real signals, the demo fleet, the official client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from tests.helpers import (
    IDLE_PAST_EVERY_TIMER_S,
    children,
    in_thread,
    pids_named,
    running,
    start_daemon,
    stream_signalling_at_first_event,
    stuck_stream,
    wait_until,
)


async def test_demo_fleet_serves_the_openai_client_survives_idling_and_stops_on_sigint(nursery):
    daemon = await start_daemon(nursery, "--demo", "--listen", "127.0.0.1:0")
    client = daemon.client()
    models = {m.id for m in await in_thread(lambda: list(client.models.list()))}
    assert {"demo-chat", "chat", "planner", "demo-coder", "coder", "demo-writer", "writer", "embed"} <= models
    messages = [{"role": "user", "content": "hello"}]

    def ask(model: str) -> str:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=4).choices[0].message.content

    for model in ("coder", "writer"):  # the writer does not fit beside the coder: QueueGate swaps them
        assert await in_thread(lambda model=model: ask(model))
    fleet = children(daemon.process.pid)
    # two chat upstreams, the embedder, the demo tool server, the writer (the coder was swapped out), the reaper
    assert len(fleet) == 6
    writer = pids_named(fleet, b"demo-writer")

    # Idle longer than any timer in the stack: every child (simulators and the launched writer) lives on.
    await trio.sleep(IDLE_PAST_EVERY_TIMER_S)
    assert children(daemon.process.pid) == fleet, daemon.stderr
    assert await in_thread(lambda: ask("writer"))
    assert pids_named(children(daemon.process.pid), b"demo-writer") == writer  # answered without a new launch
    # The tool loop after the idle gap: the model calls the demo tool server through QueueGate.
    timed = await in_thread(
        lambda: client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "What time is it?"}])
    )
    assert '"timezone":"UTC"' in timed.choices[0].message.content and timed.model_extra["queuegate"]["tool_calls"] == 1
    assert "exited" not in daemon.stderr

    streamed = await in_thread(
        lambda: list(client.chat.completions.create(model="chat", messages=messages, max_tokens=4, stream=True))
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    vectors = await in_thread(lambda: client.embeddings.create(model="embed", input="hi"))
    assert len(vectors.data[0].embedding) == 8  # the simulator's default dimension
    # A demo upstream that dies takes only itself down: the gateway goes on serving the others.
    embedder = pids_named(fleet, b"demo-embed")[0]
    os.kill(int(embedder), signal.SIGTERM)
    await wait_until(lambda: "demo upstream exited" in daemon.stderr, timeout=10)
    assert (await in_thread(lambda: client.chat.completions.create(model="chat", messages=messages))).choices

    daemon.process.send_signal(signal.SIGINT)
    with trio.fail_after(10):
        await daemon.process.wait()
    assert daemon.process.returncode == 0, daemon.stderr
    for pid in fleet:  # the simulated fleet (and the reaper) went down with the daemon
        assert not running(pid), f"demo child {pid} outlived the daemon"
    assert "status=200" in daemon.stderr and "rid=qg-" in daemon.stderr


async def test_kill_9_of_the_daemon_leaves_no_child_behind_even_after_its_reaper_was_killed(nursery):
    daemon = await start_daemon(nursery, "--demo", "--listen", "127.0.0.1:0")
    client = daemon.client()
    answer = await in_thread(
        lambda: client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi"}])
    )
    assert answer.choices[0].message.content
    fleet = children(daemon.process.pid)
    reaper = pids_named(fleet, b"_reaper.py")
    assert len(reaper) == 1 and len(pids_named(fleet, b"queuegate.sim")) == 5  # (and the demo tool server)
    # Somebody kills the reaper: the daemon starts another, which learns every running child.
    os.kill(int(reaper[0]), signal.SIGKILL)
    await wait_until(
        lambda: pids_named(children(daemon.process.pid), b"_reaper.py") not in ([], reaper), timeout=10, interval=0.05
    )
    assert "reaper exited" in daemon.stderr
    fleet = children(daemon.process.pid)

    daemon.process.kill()  # SIGKILL: the daemon runs no code of its own from here
    with trio.fail_after(10):
        await daemon.process.wait()
    # Each child gets SIGTERM at once, SIGKILL after its grace period (3 s).
    await wait_until(lambda: not any(running(pid) for pid in fleet), timeout=6, interval=0.05)


async def test_a_busy_port_or_a_live_admin_socket_is_one_clear_line_before_anything_starts(nursery, tmp_path):
    first = await start_daemon(nursery, "--demo", "--listen", "127.0.0.1:0")
    address = first.url.removeprefix("http://")

    async def second(listen: str, cwd: Path | str) -> tuple[int, list[str], float]:
        started = time.monotonic()
        done = await trio.run_process(
            [sys.executable, "-m", "queuegate.cli", "run", "--demo", "--listen", listen],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
        )
        return done.returncode, done.stderr.decode().strip().splitlines(), time.monotonic() - started

    started = time.monotonic()
    await trio.run_process([sys.executable, "-m", "queuegate.cli", "--help"], capture_stdout=True)
    plain_start = time.monotonic() - started  # what starting the CLI costs on this machine now
    code, lines, _ = await second(address, tmp_path)
    assert code == 2 and lines == [
        f"queuegate: cannot listen on {address}: the address is already in use (another QueueGate or server?); "
        "choose another address with --listen HOST:PORT or [server].listen in the config"
    ]
    # Another port, but the first daemon's folder: its admin socket is live.
    code, lines, took = await second("127.0.0.1:0", first.cwd)
    socket_path = Path(first.cwd) / ".queuegate" / "admin.sock"
    assert code == 2 and lines == [f"queuegate: another QueueGate is running with the admin socket {socket_path}"]
    # No simulator was started: the demo starts four, one after another, each taking most of a second.
    assert took < plain_start + 1.5
    first.process.send_signal(signal.SIGINT)
    with trio.fail_after(10):
        await first.process.wait()


def one_model_config(tmp_path: Path, url: str, server: str, model: str = "") -> Path:
    """A queuegate.toml on a free port with one model "m" at `url`, plus the given [server] and model lines."""
    config = tmp_path / "queuegate.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\n{server}\n[models.m]\nupstreams = ["{url}"]\n{model}\n')
    return config


async def test_sigterm_lets_in_flight_stream_finish_and_keeps_secrets_out_of_logs(start_sim, nursery, tmp_path):
    sim, url = await start_sim(tokens_per_s=20)
    config = one_model_config(tmp_path, url, "shutdown_grace_s = 10", 'api_key_env = "QG_TEST_BACKEND_KEY"')
    secret = "sk-test-very-secret-4242"
    daemon = await start_daemon(nursery, "--config", str(config), env={"QG_TEST_BACKEND_KEY": secret})
    body = {"model": "m", "stream": True, "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    events = await stream_signalling_at_first_event(daemon.url + "/v1/chat/completions", body, daemon.process)
    assert events[-1] == "data: [DONE]" and len(events) >= 31  # the whole stream, after the signal
    assert time.monotonic() - started > 1.0
    with trio.fail_after(10):
        await daemon.process.wait()
    assert daemon.process.returncode == 0
    assert sim.stats.received[-1].headers["authorization"] == f"Bearer {secret}"
    assert secret not in daemon.stderr and secret not in daemon.stdout
    assert "status=200" in daemon.stderr


async def test_shutdown_grace_period_ends_streams_with_the_truth(start_sim, nursery, tmp_path):
    sim, url = await start_sim(tokens_per_s=5)
    config = one_model_config(tmp_path, url, "shutdown_grace_s = 0.5", "max_concurrency = 1")
    daemon = await start_daemon(nursery, "--config", str(config))
    body = {"model": "m", "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    queued: list[httpx.Response] = []

    async def wait_in_the_queue() -> None:  # behind the stream, for the one slot
        async with httpx.AsyncClient(timeout=20) as http:
            plain = {**body, "stream": False, "max_tokens": 1}
            queued.append(
                await http.post(daemon.url + "/v1/chat/completions", json=plain, headers={"x-request-id": "q"})
            )

    started = time.monotonic()
    async with trio.open_nursery() as clients:
        clients.start_soon(wait_in_the_queue)
        events = await stream_signalling_at_first_event(daemon.url + "/v1/chat/completions", body, daemon.process)
    with trio.fail_after(10):
        await daemon.process.wait()
    assert time.monotonic() - started < 5
    # The stream ended cleanly, with an error event that says why (the openai client raises it).
    last = json.loads(events[-1].removeprefix("data:"))
    assert last["error"]["code"] == "shutting_down" and last["error"]["message"] == "the server is shutting down"
    # The queued one was told the same, as an answer; both log lines (and usage rows) say so.
    assert queued[0].status_code == 503 and queued[0].json()["error"]["code"] == "shutting_down"
    assert daemon.stderr.count("status=503 stream=") == 2
    assert daemon.stderr.count('error="the server is shutting down"') == 2
    assert "client closed" not in daemon.stderr and "client disconnected" not in daemon.stderr
    await wait_until(lambda: not sim.stats.active, timeout=2)  # the upstream stream was closed too, not left generating


async def test_a_second_signal_stops_at_once_even_with_a_client_that_reads_nothing(start_sim, nursery, tmp_path):
    sim, url = await start_sim(tokens_per_s=0)
    config = one_model_config(tmp_path, url, "shutdown_grace_s = 60\nwrite_timeout_s = 600")
    daemon = await start_daemon(nursery, "--config", str(config))
    stuck = await stuck_stream(daemon.url)
    await trio.sleep(1.5)  # it reads nothing: the daemon's writes to it are blocked by now
    daemon.process.send_signal(signal.SIGTERM)
    await trio.sleep(0.5)
    assert daemon.process.returncode is None  # the first signal waits for the request (60 s of grace)
    daemon.process.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        await daemon.process.wait()
    assert daemon.process.returncode == 0, daemon.stderr
    await wait_until(lambda: not sim.stats.active, timeout=2)
    await stuck.aclose()


def test_small_frictions_of_the_command_line(tmp_path):
    """Real `queuegate` subprocesses in an empty folder: what a user meets before anything runs."""

    def queuegate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "queuegate.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    run, check = queuegate("run"), queuegate("check")
    assert run.returncode == check.returncode == 2 and run.stderr == check.stderr  # the same words, the same advice
    assert "no config at queuegate.toml" in check.stderr and "queuegate run --demo" in check.stderr
    admin = queuegate("admin", "status")
    assert str(tmp_path / ".queuegate" / "admin.sock") in admin.stderr and "--socket PATH" in admin.stderr
    for argv in (("admin", "--config", "missing.toml", "status"), ("top", "--config", "missing.toml")):
        missing = queuegate(*argv)  # a config asked for by name must be there (not another daemon's socket)
        assert missing.returncode == 2 and "no config at missing.toml" in missing.stderr, missing.stderr
    top = queuegate("top")  # (no terminal here: it says so rather than drawing into a pipe for ever)
    assert top.returncode == 2 and "needs a terminal" in top.stderr and "admin status" in top.stderr
    # Typos: the closest key or section; zero models: an error for run, a warning for check.
    (tmp_path / "typo.toml").write_text('[sever]\nlisten = "127.0.0.1:0"\n')
    assert "unknown section [sever]; did you mean [server]?" in queuegate("check", "--config", "typo.toml").stderr
    (tmp_path / "empty.toml").write_text("[queue]\nmax_size = 3\n")
    assert "warning: the config has no [models.*]" in queuegate("check", "--config", "empty.toml").stdout
    refused = queuegate("run", "--config", "empty.toml")
    assert refused.returncode == 2 and "there is nothing to serve" in refused.stderr
    (tmp_path / "bare.toml").write_text('[models.m]\nupstreams = ["http://127.0.0.1:9"]\n')
    assert "does not end in /v1" in queuegate("check", "--config", "bare.toml").stdout
    # A reader that stops early (`| head`) ends the output quietly, without a traceback.
    writer = subprocess.Popen([sys.executable, "-m", "queuegate.cli", "init", "--stdout"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert writer.stdout is not None and writer.stderr is not None
    writer.stdout.close()  # (before it writes a byte)
    assert writer.wait(60) == 0 and b"Traceback" not in writer.stderr.read()
