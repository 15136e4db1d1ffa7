"""Batch jobs as users run them: the `openai` SDK's files and batches against the real daemon on loopback, simulated
model servers (real processes or real HTTP servers in the test) as the fleet, a real daemon subprocess for kill -9,
and the real llama-server for one small batch."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import tempfile
from pathlib import Path

import httpx
import openai
import pytest
import trio

from queuegate.batches.store import BatchStore
from queuegate.config import usage_db_path
from tests.helpers import HI, SECRETS, in_thread, request_lines, start_daemon, wait_until

SIM = ["${PYTHON}", "-m", "queuegate.sim", "--port", "${PORT}", "--model", "${MODEL}", "--load-time", "0.3"]
FAST = {"batches": {"retry_base_s": 0.05}}


def jsonl(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def chat_line(custom_id: str, model: str, say: str = "hi", **body) -> dict:
    messages = [{"role": "user", "content": say}]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": messages, "max_tokens": 4, **body}}  # fmt: skip


async def submit(client: openai.OpenAI, lines: list[dict], window: str = "24h", endpoint: str = "/v1/chat/completions"):
    upload = await in_thread(
        lambda: client.files.create(file=("jobs.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    )
    return await in_thread(
        lambda: client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window=window)
    )


async def finished(client: openai.OpenAI, batch_id: str, timeout: float = 60):
    with trio.fail_after(timeout):
        while True:
            batch = await in_thread(lambda: client.batches.retrieve(batch_id))
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return batch
            await trio.sleep(0.1)


async def completed_at_least(client: openai.OpenAI, batch_id: str, count: int, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while (await in_thread(lambda: client.batches.retrieve(batch_id))).request_counts.completed < count:
            await trio.sleep(0.05)


async def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = await in_thread(lambda: client.files.content(file_id))
    return [json.loads(line) for line in content.text.splitlines()]


async def test_the_sdk_runs_a_1000_line_batch_over_two_models_sharing_one_device_with_one_swap(start_gateway, caplog):
    caplog.set_level("INFO", logger="queuegate")
    launched = {"launcher": "process", "kind": "llamacpp", "device": "gpu", "memory_gb": 10, "startup_timeout_s": 20}
    models = {name: {**launched, "cmd": [*SIM, "--tokens-per-s", "400"]} for name in ("a", "b")}
    gw = await start_gateway(models, devices={"gpu": {"memory_gb": 24, "exclusive": True}}, **FAST)
    client = gw.client(timeout=30)
    # 1,000 lines, the two models interleaved in the file (600 a, 400 b).
    lines = [chat_line(f"job-{i}", "a" if i % 5 < 3 else "b", f"question {i}") for i in range(1000)]
    batch = await submit(client, lines)
    assert batch.status == "in_progress" and batch.request_counts.total == 1000
    batch = await finished(client, batch.id, timeout=120)
    assert batch.status == "completed" and batch.request_counts.completed == 1000 and not batch.error_file_id
    output = await file_lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    by_id = {line["custom_id"]: line for line in output}
    assert all(by_id[f"job-{i}"]["response"]["body"]["model"] == ("a" if i % 5 < 3 else "b") for i in range(1000))
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
    # Grouped by model: a loaded, all its lines, then one swap to b; not a swap every few lines.
    fleet = gw.daemon.fleet.statistics()
    print(f"1,000 lines over two models on one exclusive device: {fleet.loads} loads, {fleet.swaps} swaps")
    assert (fleet.loads, fleet.swaps) == (2, 1)
    assert len([line for line in request_lines(caplog) if line["class"] == "batch"]) == 1000


async def test_a_user_waits_at_most_one_slot_behind_a_batch(start_sim, start_gateway, caplog):
    """Lines of 0.5 s on a model with 2 slots, 4 lines of the batch in flight (2 of them always waiting): a user's
    request goes before the waiting lines, so it waits for one slot (at most 0.5 s), where first come, first served
    would put it behind both waiting lines (0.5 to 1 s)."""
    caplog.set_level("INFO", logger="queuegate")
    _, url = await start_sim(tokens_per_s=8, model="m")  # (4 tokens: 0.5 s)
    gw = await start_gateway({"m": {"upstreams": [url], "max_concurrency": 2}}, batches={"max_concurrency": 4})
    client = gw.client()
    batch = await submit(client, [chat_line(f"l{i}", "m") for i in range(40)])
    await completed_at_least(client, batch.id, 2)
    for i in range(6):
        await trio.sleep(0.13 * (i % 4))  # (at different points of the lines' half second)
        asked = [{"role": "user", "content": f"user {i}"}]
        await in_thread(lambda: client.chat.completions.create(model="m", messages=asked, max_tokens=1))  # noqa: B023
    waits = [line["queue_ms"] for line in request_lines(caplog) if line["class"] == "user"]
    assert len(waits) == 6 and gw.stats().waiting >= 1  # (the batch kept lines waiting all along)
    print(f"user waits behind the batch (ms): {waits}")
    assert max(waits) < 650 and sum(waits) / len(waits) < 400, waits
    await in_thread(lambda: client.batches.cancel(batch.id))


async def test_a_batch_survives_kill_9_of_the_daemon_each_custom_id_once_in_its_output(start_sim, nursery, tmp_path):
    sim, url = await start_sim(tokens_per_s=100, model="m")
    folder = tempfile.mkdtemp(prefix="queuegate-batch-")
    config = Path(folder) / "queuegate.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n[batches]\nmax_concurrency = 8\n'
        f'[models.m]\nupstreams = ["{url}"]\nkind = "llamacpp"\n'
    )
    daemon = await start_daemon(nursery, "--config", str(config), cwd=folder)
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    lines = [chat_line(f"line-{i}", "m", max_tokens=10) for i in range(300)]  # (about 0.1 s each, 8 at once)
    batch = await submit(client, lines)
    await completed_at_least(client, batch.id, 60)
    os.kill(daemon.process.pid, signal.SIGKILL)
    await trio.sleep(0.3)
    daemon = await start_daemon(nursery, "--config", str(config), cwd=folder)
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    done = await finished(client, batch.id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 300 and done.error_file_id is None
    output = await file_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"line-{i}" for i in range(300))  # each once
    assert sim.stats.requests >= 300 + 1  # (the lines in flight at the kill ran again: at least once upstream)
    db = sqlite3.connect(Path(folder) / "state" / "batches" / "batches.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


async def test_retries_the_dead_letter_a_400_not_retried_and_a_malformed_file(start_sim, start_gateway):
    sim, url = await start_sim(tokens_per_s=0, model="m")
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}}, batches={"retry_base_s": 0.05,
                                                                                        "max_attempts": 3})  # fmt: skip
    client = gw.client()
    # The upstream answers 500 for a while: the lines are tried again, and succeed once it is back.
    sim.set_fault("status_500")
    batch = await submit(client, [chat_line(f"r{i}", "m") for i in range(3)])
    await wait_until(lambda: sim.stats.requests >= 3, timeout=10)
    sim.set_fault(None)
    batch = await finished(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    assert gw.daemon.batches.outcomes["retried"] >= 3
    # One that fails every time goes to the error file after max_attempts with what it got; a 400 is not retried.
    before = sim.stats.requests
    lines = [chat_line("ok", "m"), chat_line("down", "m", sim_fault="status_500"), chat_line("bad", "m")]
    lines[2]["body"]["messages"] = "not a list"
    batch = await finished(client, (await submit(client, lines)).id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 2)
    errors = {line["custom_id"]: line for line in await file_lines(client, batch.error_file_id)}
    assert errors["down"]["response"]["status_code"] == 502  # (an upstream 500, as the gateway answers it)
    assert errors["bad"]["response"]["status_code"] == 400 and "messages" in json.dumps(errors["bad"]["response"])
    assert sim.stats.requests - before == 1 + 3  # ok once, down three times, bad never (refused at the gateway)
    assert [line["custom_id"] for line in await file_lines(client, batch.output_file_id)] == ["ok"]
    # A malformed input file fails its batch with the line numbers; nothing runs.
    before = sim.stats.requests
    bad_lines = [chat_line("x", "m"), chat_line("x", "m"), chat_line("y", "nope"), {"custom_id": "z"}]
    upload = jsonl(bad_lines[:3]) + b"{not json\n" + jsonl(bad_lines[3:])
    file = await in_thread(lambda: client.files.create(file=("bad.jsonl", io.BytesIO(upload)), purpose="batch"))
    batch = await in_thread(lambda: client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                                          completion_window="24h"))  # fmt: skip
    assert batch.status == "failed" and batch.errors is not None
    found = [(e.line, e.code) for e in batch.errors.data]
    assert found == [(2, "duplicate_custom_id"), (3, "model_not_found"), (4, "invalid_json_line"),
                     (5, "invalid_json_line")]  # fmt: skip
    await trio.sleep(0.2)
    assert sim.stats.requests == before
    metrics = (await in_thread(lambda: httpx.get(gw.base_url + "/metrics"))).text
    assert 'queuegate_batch_lines_total{outcome="ok"} 4.0' in metrics
    assert 'queuegate_batch_lines_total{outcome="error"} 2.0' in metrics
    assert "queuegate_batch_lines_left 0.0" in metrics and "queuegate_batches_running 0.0" in metrics


async def test_batch_lines_are_not_chats_chat_memory_leaves_them_alone(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0, model="m")
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}}, memory={"enabled": True})
    client = gw.client()
    await in_thread(lambda: client.chat.completions.create(model="m", messages=HI))  # (a chat: remembered)
    await wait_until(lambda: gw.daemon.memory.counts.get("remembered", 0) == 1, timeout=10)
    batch = await finished(client, (await submit(client, [chat_line(f"n{i}", "m") for i in range(5)])).id)
    assert batch.status == "completed" and batch.request_counts.completed == 5
    await trio.sleep(0.5)
    assert gw.daemon.memory.counts.get("remembered", 0) == 1 and gw.daemon.memory.counts.get("recalled", 0) <= 1


async def test_cancel_and_expiry_end_a_batch_with_what_ran_and_the_rest_in_the_error_file(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=20, model="m")  # (a line takes about 0.2 s)
    gw = await start_gateway({"m": {"upstreams": [url], "kind": "llamacpp"}}, batches={"max_concurrency": 2})
    client = gw.client()
    batch = await submit(client, [chat_line(f"c{i}", "m") for i in range(40)])
    await completed_at_least(client, batch.id, 4)
    cancelling = await in_thread(lambda: client.batches.cancel(batch.id))
    assert cancelling.status in ("cancelling", "cancelled")
    batch = await finished(client, batch.id)
    counts = batch.request_counts
    assert batch.status == "cancelled" and counts.completed >= 4 and counts.completed + counts.failed == 40
    errors = await file_lines(client, batch.error_file_id)
    assert errors and all(line["error"]["code"] == "batch_cancelled" for line in errors)
    assert len(errors) + len(await file_lines(client, batch.output_file_id)) == 40
    await wait_until(lambda: gw.stats().in_service == 0 and gw.stats().waiting == 0, timeout=5)  # nothing left behind
    # A completion window that ends first: the lines not run are expired.
    batch = await finished(client, (await submit(client, [chat_line(f"e{i}", "m") for i in range(40)], "2s")).id)
    assert batch.status == "expired" and batch.expired_at is not None
    errors = await file_lines(client, batch.error_file_id)
    assert errors and {line["error"]["code"] for line in errors} == {"batch_expired"}


async def test_a_batch_and_its_files_belong_to_the_key_that_made_them(start_sim, start_gateway, key_env):
    _, url = await start_sim(tokens_per_s=0, model="m")
    keys = {"alice": {"key_env": "QG_ALICE"}, "bob": {"key_env": "QG_BOB", "models": ["other"]}}
    gw = await start_gateway({"m": {"upstreams": [url]}, "other": {"upstreams": [url]}}, keys=keys)
    alice, bob = gw.client(api_key=SECRETS["QG_ALICE"]), gw.client(api_key=SECRETS["QG_BOB"])
    batch = await finished(alice, (await submit(alice, [chat_line("one", "m")])).id)
    assert batch.status == "completed"
    for call in (
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.files.retrieve(batch.input_file_id),
        lambda: bob.files.content(batch.output_file_id),
        lambda: bob.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await in_thread(call)
    assert (await in_thread(lambda: bob.batches.list())).data == []
    assert [b.id for b in (await in_thread(lambda: alice.batches.list())).data] == [batch.id]
    # Bob's key may not use m: his batch naming it fails up front, as his chat would.
    refused = await submit(bob, [chat_line("two", "m")])
    assert refused.status == "failed" and refused.errors.data[0].code == "model_not_found"
    # Usage counts the lines for the key, as endpoint batch with the batch's id as session.
    query = "SELECT key, endpoint, class, outcome FROM requests WHERE session = ?"

    def rows() -> list:
        db = sqlite3.connect(usage_db_path(gw.daemon.config))
        try:
            return db.execute(query, (batch.id,)).fetchall()
        finally:
            db.close()

    await wait_until(lambda: rows(), timeout=10)
    assert rows() == [("alice", "batch", "batch", "ok")]


@pytest.mark.llama
async def test_a_small_batch_on_the_real_llama_server(llama_parts, start_gateway):
    binary, model = llama_parts
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", "${PORT}", "-c", "2048", "-t", "2", "--no-webui"]
    gw = await start_gateway(
        {
            "gemma": {
                "launcher": "process",
                "cmd": cmd,
                "kind": "llamacpp",
                "startup_timeout_s": 60,
                "defaults": {"temperature": 0},
            }
        }
    )
    client = gw.client(timeout=120)
    lines = [chat_line(f"q{i}", "gemma", f"Say the number {i} in one word.", max_tokens=8) for i in range(3)]
    batch = await finished(client, (await submit(client, lines)).id, timeout=240)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    output = await file_lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2"]
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in output)


async def test_uploads_are_bounded_and_checked(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=0, model="m")
    gw = await start_gateway({"m": {"upstreams": [url]}}, batches={"max_file_mb": 0.01})  # (10 KiB)
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as too_large:
        await in_thread(lambda: client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 20_000)), purpose="batch"))
    assert too_large.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="purpose must be 'batch'"):
        await in_thread(lambda: client.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="assistants"))

    def chunks():  # (no Content-Length: it could not be refused before it was all read)
        yield b"--b\r\ncontent-disposition: form-data; name=file; filename=a.jsonl\r\n\r\n"
        yield b"x" * 1000 + b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    chunked = await in_thread(lambda: httpx.post(gw.api + "/files", content=chunks(), headers=headers))
    assert chunked.status_code == 411 and chunked.json()["error"]["code"] == "length_required"
    missing = await in_thread(lambda: httpx.post(gw.api + "/files", data={"purpose": "batch"}))
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    # What was refused left nothing behind; the gateway serves on.
    assert (await in_thread(lambda: client.files.list())).data == []
    assert (await in_thread(lambda: client.chat.completions.create(model="m", messages=HI))).choices


def test_retention_deletes_old_finished_batches_their_files_and_stray_files(tmp_path):
    """The store alone (real SQLite and files): what `retention_days` deletes, and what it keeps."""
    store = BatchStore(tmp_path / "batches")
    try:
        old, new = 1_000, 2_000_000_000

        def batch(batch_id: str, status: str, created_at: int) -> dict:
            return {"id": batch_id, "status": status, "created_at": created_at, "request_counts": {"total": 1}}

        for batch_id, status, created in (("b-old", "completed", old), ("b-running", "in_progress", old),
                                          ("b-new", "completed", new)):  # fmt: skip
            store.add_batch(batch(batch_id, status, created), "k", [(1, "c", "m", b"{}")])
        for file_id, created in (("file-old", old), ("file-new", new)):
            doc = {"id": file_id, "purpose": "batch", "filename": "f.jsonl", "bytes": 2, "created_at": created}
            store.add_file(doc, "k", b"{}")
        stray = store.path_of("file-stray")  # (written, then the daemon died before its row)
        stray.write_bytes(b"x")
        os.utime(stray, (old, old))
        assert store.purge(before=10_000) == 3  # the old finished batch, the old file, the stray file
        assert store.batch("b-old", "k") is None and store.file("file-old", "k") is None and not stray.exists()
        assert store.batch("b-running", "k") is not None  # (unfinished: kept, however old)
        assert store.batch("b-new", "k") is not None and store.file("file-new", "k") is not None
        assert store.integrity() == "ok"
    finally:
        store.close()


async def test_a_batch_waits_for_idle_capacity_it_never_swaps_a_model_out_between_a_users_chats(start_gateway):
    """Two launched models (real simulator processes) on one exclusive device: a user chats with a, one chat every
    0.6 s; a batch wants b. The batch gets the device only once a has been left alone for swap_after_ms, so the
    user's chats never wait for a swap, and no line is sent to a server being stopped (none fails)."""
    launched = {"launcher": "process", "kind": "llamacpp", "device": "gpu", "memory_gb": 10, "startup_timeout_s": 20}
    models = {name: {**launched, "cmd": [*SIM, "--tokens-per-s", "0"]} for name in ("a", "b")}
    gw = await start_gateway(
        models, devices={"gpu": {"memory_gb": 24, "exclusive": True}}, fleet={"swap_after_ms": 2000}, **FAST
    )
    client = gw.client(timeout=30)
    ask = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    await in_thread(lambda: client.chat.completions.create(**ask))  # (a loaded)
    batch = await submit(client, [chat_line(f"b{i}", "b") for i in range(20)])
    waits = []
    for _ in range(8):
        started = trio.current_time()
        await in_thread(lambda: client.chat.completions.create(**ask))
        waits.append(trio.current_time() - started)
        await trio.sleep(0.6)
    assert gw.daemon.fleet.statistics().swaps == 0 and max(waits) < 0.5, waits  # (no swap while the user chats)
    batch = await finished(client, batch.id, timeout=30)  # the user left: the batch gets the device
    assert batch.status == "completed" and batch.request_counts.completed == 20 and batch.error_file_id is None
    assert gw.daemon.fleet.statistics().swaps == 1
