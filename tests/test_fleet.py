"""The fleet through the real daemon with the process launcher: real child processes, each a simulated server
(`python -m queuegate.sim`, a real HTTP server with a llama-server-like load time), started and stopped by QueueGate.

The simulator stands in for llama-server because these tests need load times, crashes and answers that say which
server produced them (`system_fingerprint` is the server's own model name). The real llama-server swap is in
test_llama_e2e.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import httpx
import openai
import pytest
import trio

from queuegate.config import build_config
from queuegate.fleet.catalog import Catalog, make_upstream
from queuegate.fleet.health import HealthMonitor, probe_health
from queuegate.scheduler import UpstreamState
from tests.helpers import (
    EXCLUSIVE,
    ask,
    assert_never_together,
    fingerprint,
    gather,
    in_thread,
    model_stats,
    sim_model,
    sim_stats,
    state,
    wait_until,
)


async def test_requests_for_a_stopped_model_join_one_load_and_go_out_once_it_is_healthy(start_gateway):
    # A long health interval: only the fine polling while loading can get the first request out quickly.
    gw = await start_gateway({"a": sim_model(0.5)}, devices=EXCLUSIVE, upstream={"health_interval_s": 30})
    async with httpx.AsyncClient() as http:
        listed = (await http.get(gw.api + "/models")).json()["data"]
        ready = await http.get(gw.base_url + "/readyz")
    assert [(m["id"], m["loaded"], m["state"]) for m in listed] == [("a", False, "stopped")]
    assert ready.status_code == 200  # not loaded, but it loads on demand
    assert ready.json()["models"][0]["ready"] is True and ready.json()["models"][0]["loaded"] is False
    answers = await gather(*[lambda: ask(gw, "a")] * 4)
    assert [fingerprint(a) for a in answers] == ["a"] * 4
    assert [e for e, _ in gw.daemon.fleet.launch_history("a")] == ["spawning"]  # one load for all four
    stats = await sim_stats(gw, "a")
    assert 0 <= stats["first_request_at"] - stats["healthy_at"] < 1.0
    async with httpx.AsyncClient() as http:
        assert (await http.get(gw.api + "/models")).json()["data"][0]["loaded"] is True
        assert (await http.get(gw.base_url + "/readyz")).json()["models"][0]["loaded"] is True


async def test_alternating_requests_through_an_exclusive_device_do_not_thrash(start_gateway):
    gw = await start_gateway({"a": sim_model(), "b": sim_model()}, devices=EXCLUSIVE, fleet={"swap_after_ms": 3000})
    answers: dict[int, str] = {}

    async def send(i: int, model: str) -> None:
        answers[i] = fingerprint(await in_thread(lambda: ask(gw, model)))

    async with trio.open_nursery() as nursery:
        for i in range(12):  # a b a b ... arriving 50 ms apart
            nursery.start_soon(send, i, "ab"[i % 2])
            await trio.sleep(0.05)
    assert answers == {i: "ab"[i % 2] for i in range(12)}  # every answer from the right server
    stats = gw.daemon.fleet.statistics()
    assert stats.swaps <= 2  # a per-request swapper would swap 11 times
    assert_never_together(gw, "a", "b")


async def test_a_user_request_swaps_before_the_bound_when_only_agent_work_holds_the_device(start_gateway):
    slow_a = sim_model(0.1, "--tokens-per-s", "5", max_concurrency=1)
    gw = await start_gateway({"a": slow_a, "b": sim_model(0.1)}, devices=EXCLUSIVE, fleet={"swap_after_ms": 60000})
    async with trio.open_nursery() as nursery:
        for _ in range(6):  # agent work for a: about 0.4 s each, one at a time
            nursery.start_soon(in_thread, lambda: ask(gw, "a", "/agent/chat/completions"))
        await wait_until(lambda: state(gw, "a") == "ready", timeout=10)
        with trio.fail_after(10):  # far less than swap_after_ms: the user's class wins the device
            answer = await in_thread(lambda: ask(gw, "b"))
        assert fingerprint(answer) == "b"
    assert_never_together(gw, "a", "b")


async def test_swap_progress_is_published_as_events_and_statistics(start_gateway):
    gw = await start_gateway({"a": sim_model(), "b": sim_model(0.5)}, devices=EXCLUSIVE)
    await in_thread(lambda: ask(gw, "a"))
    seen: list[tuple[str, str, str]] = []
    progress = []
    async with gw.daemon.fleet.events() as events, trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, lambda: ask(gw, "b"))
        with trio.fail_after(10):
            async for event in events:
                seen.append((event.model, event.state.value, event.reason))
                swap = gw.daemon.fleet.statistics().devices[0].swap
                if swap is not None:
                    progress.append(swap.phase)
                if (event.model, event.state.value) == ("b", "ready"):
                    break
    assert ("a", "stopping", "making room for b") in seen
    assert ("a", "stopped", "stopped") in seen
    assert ("b", "starting", "waiting for health") in seen
    assert "waiting for health of b" in progress
    assert seen.index(("a", "stopped", "stopped")) < seen.index(("b", "starting", "launching"))
    b = next(m for m in gw.daemon.fleet.statistics().models if m.name == "b")
    assert b.load_s is not None and b.load_s >= 0.5


async def test_a_crashed_server_is_restarted_for_the_requests_waiting(start_gateway):
    gw = await start_gateway({"a": sim_model()}, devices=EXCLUSIVE, fleet={"restart_backoff_s": 0.1})
    await in_thread(lambda: ask(gw, "a"))
    pid = gw.daemon.launchers["a"].process.pid
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: state(gw, "a") != "ready", timeout=5)  # noticed from the exit, not a poll
    answer = await in_thread(lambda: ask(gw, "a"))
    assert fingerprint(answer) == "a"
    assert gw.daemon.launchers["a"].process.pid != pid


async def test_a_preloaded_server_that_crashes_comes_back_with_no_request_and_a_crash_loop_stops(start_gateway, caplog):
    gw = await start_gateway(
        {"a": sim_model(preload=True)},
        devices=EXCLUSIVE,
        fleet={"restart_backoff_s": 0.2, "restart_attempts": 2, "failure_hold_s": 60},
    )
    await wait_until(lambda: state(gw, "a") == "ready", timeout=10)
    launcher = gw.daemon.launchers["a"]
    first = launcher.process.pid
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: state(gw, "a") == "stopped", timeout=5)
    crash = model_stats(gw, "a")
    assert crash.reason.startswith("crashed, restart 1 of 2 in 0.2 s: a exited with -9") and crash.crashes == 1
    await wait_until(lambda: state(gw, "a") == "ready", timeout=10)  # back, though nobody asked for it
    assert launcher.process.pid != first
    assert any(
        r.levelname == "WARNING" and "crashed, restart 1 of 2" in r.fields.get("reason", "") for r in caplog.records
    )
    for _ in range(2):  # it keeps crashing right after each start: a crash loop
        pid = launcher.process.pid
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda pid=pid: launcher.process.pid != pid or state(gw, "a") == "failed", timeout=10)
        await wait_until(lambda: state(gw, "a") in ("ready", "failed"), timeout=10)
    assert state(gw, "a") == "failed"  # the bound: no more restarts, and the reason says why
    assert model_stats(gw, "a").reason.startswith("crashed 3 times in a row, not restarted for 60 s")
    assert len([e for e, _ in gw.daemon.fleet.launch_history("a") if e == "spawning"]) == 3


async def test_a_server_that_cannot_start_fails_its_requests_with_the_reason(start_gateway):
    broken = {
        "launcher": "process",
        "cmd": [sys.executable, "-c", "import sys; print('CUDA error: out of memory'); sys.exit(3)"],
        "upstreams": ["http://127.0.0.1:${PORT}/v1"],
    }
    gw = await start_gateway({"x": broken}, fleet={"restart_attempts": 1, "restart_backoff_s": 0.1})
    with pytest.raises(openai.APIStatusError) as info:
        await in_thread(lambda: ask(gw, "x"))
    assert info.value.status_code == 503
    message = info.value.body["message"]
    assert "exited with 3" in message and "CUDA error: out of memory" in message
    assert info.value.response.headers["retry-after"]
    assert len([e for e, _ in gw.daemon.fleet.launch_history("x") if e == "spawning"]) == 2  # one restart
    assert state(gw, "x") == "failed"
    with pytest.raises(openai.APIStatusError):  # refused at once while failed
        await in_thread(lambda: ask(gw, "x"))


@pytest.mark.parametrize("policy", ["abort", "finish"])
async def test_a_load_whose_only_client_left(start_gateway, policy):
    gw = await start_gateway({"a": sim_model(1.5)}, devices=EXCLUSIVE, fleet={"abandoned_load": policy})
    with pytest.raises(openai.APITimeoutError):
        await in_thread(lambda: ask(gw, "a", timeout=0.5))
    await wait_until(lambda: gw.stats().waiting == 0)
    if policy == "abort":
        await wait_until(lambda: state(gw, "a") == "stopped", timeout=5)
        assert [e for e, _ in gw.daemon.fleet.launch_history("a")] == ["spawning", "exited"]
    else:
        await wait_until(lambda: state(gw, "a") == "ready", timeout=5)


async def test_a_client_that_leaves_while_queued_behind_a_swap_leaves_nothing_behind(start_gateway):
    gw = await start_gateway({"a": sim_model(), "b": sim_model(1.0)}, devices=EXCLUSIVE)
    await in_thread(lambda: ask(gw, "a"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, lambda: ask(gw, "b"))  # a stays: it waits for b's load
        await wait_until(lambda: state(gw, "b") == "starting", timeout=5)
        with pytest.raises(openai.APITimeoutError):
            await in_thread(lambda: ask(gw, "b", timeout=0.3))
        # The gateway sees the disconnect a moment after the client gave up; then only the first request waits.
        await wait_until(lambda: next(m for m in gw.stats().models if m.name == "b").waiting == 1)
    assert gw.stats().waiting == 0 and gw.stats().in_service == 0


async def test_idle_models_unload_after_ttl_and_preload_loads_at_start(start_gateway):
    gw = await start_gateway(
        {"a": sim_model(ttl_s=0.5), "b": sim_model(preload=True, device="big")},
        devices={**EXCLUSIVE, "big": {"memory_gb": 80}},
    )
    await wait_until(lambda: state(gw, "b") == "ready", timeout=10)
    await in_thread(lambda: ask(gw, "a"))
    assert state(gw, "a") == "ready"
    await wait_until(lambda: state(gw, "a") == "stopped", timeout=5)
    assert [e for e, _ in gw.daemon.fleet.launch_history("a")] == ["spawning", "exited"]


async def test_operator_preload_and_evict(start_gateway):
    gw = await start_gateway({"a": sim_model(), "b": sim_model()}, devices=EXCLUSIVE)
    fleet = gw.daemon.fleet
    fleet.preload("a")
    await wait_until(lambda: state(gw, "a") == "ready", timeout=10)
    fleet.preload("b")  # the device is exclusive: a makes room
    await wait_until(lambda: state(gw, "b") == "ready", timeout=10)
    assert state(gw, "a") == "stopped"
    fleet.evict("b")
    await wait_until(lambda: state(gw, "b") == "stopped", timeout=10)
    assert_never_together(gw, "a", "b")
    with pytest.raises(KeyError):
        fleet.preload("nope")


async def test_evicting_a_busy_model_drains_it_first(start_gateway):
    gw = await start_gateway({"a": sim_model(0.1, "--tokens-per-s", "4")}, devices=EXCLUSIVE)
    await in_thread(lambda: ask(gw, "a"))
    answers: list = []

    async def slow_request() -> None:
        answers.append(await in_thread(lambda: ask(gw, "a")))  # 0.5 s of tokens

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)
        await wait_until(lambda: gw.stats().in_service == 1)
        gw.daemon.fleet.evict("a")
        await wait_until(lambda: state(gw, "a") == "draining")
    assert fingerprint(answers[0]) == "a"  # the request in flight finished
    await wait_until(lambda: state(gw, "a") == "stopped", timeout=5)


async def test_a_health_check_that_ends_as_its_upstream_is_unwatched_reports_nothing(nursery):
    """A report wakes the watch, and the upstream is unwatched before the watch runs (a node leaving then)."""
    states = []
    catalog = Catalog.from_config(build_config({"models": {}}))
    async with httpx.AsyncClient() as client:
        health = HealthMonitor(catalog, client, lambda *state: states.append(state), interval_s=5, timeout_s=1)
        await nursery.start(health.run)
        upstream = make_upstream("m@box1", "m", "http://127.0.0.1:9/v1", "", 1)  # (no health path: no await)
        health.watch(upstream)
        await wait_until(lambda: states == [("m@box1", UpstreamState.READY, "no health check configured")])
        health.report_failure(upstream, "refused")
        health.unwatch("m@box1")
        await trio.sleep(0.2)
        assert [state for _, state, _ in states] == [UpstreamState.READY, UpstreamState.DOWN]  # nothing after
        health.report_failure(upstream, "refused again")  # (unwatched: not news)
        assert len(states) == 2


async def test_a_health_check_timed_out_by_the_gateways_own_stall_is_asked_again(start_sim, nursery, caplog):
    """The upstream (a simulated server) answers at once, but the gateway's event loop is stalled: a fake, a task
    blocking it 0.3 s at a time, the way thousands of clients hanging up at once keep it busy. The check times out
    on our side, is asked again, and the upstream is ready once the stall ends. A server that takes the connection
    and never answers is still called down after one timeout when the loop is free."""
    _, url = await start_sim()
    answering = make_upstream("m#0", "m", url, "/health", 1)
    silent_listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]  # never accepts, never answers
    silent_port = silent_listener.socket.getsockname()[1]
    silent = make_upstream("s#0", "s", f"http://127.0.0.1:{silent_port}/v1", "/health", 1)

    async def stall_the_loop() -> None:
        for _ in range(6):
            time.sleep(0.3)  # (blocking on purpose)
            await trio.sleep(0)

    async with httpx.AsyncClient() as client:
        nursery.start_soon(stall_the_loop)
        with caplog.at_level(logging.INFO, logger="queuegate.health"):
            assert await probe_health(client, answering, 0.4) == (UpstreamState.READY, "ok")
        asked_again = [r for r in caplog.records if r.getMessage().startswith("health check timed out while")]
        assert asked_again and asked_again[0].fields["upstream"] == "m#0"
        started = trio.current_time()
        state, reason = await probe_health(client, silent, 0.4)
        assert (state, reason) == (UpstreamState.DOWN, "health check timed out after 0.4 s")
        assert trio.current_time() - started < 0.7  # asked once
        assert not [r for r in caplog.records if getattr(r, "fields", {}).get("upstream") == "s#0"]
    await silent_listener.aclose()
