"""Usage accounting end to end: the real daemon (in-process and as a subprocess), the `openai` client, a real SQLite
file read back directly. The upstream is the simulated server: it reports usage as llama.cpp does, and can be slowed
down so a stream can be cut or a burst kept going while the daemon is killed."""

from __future__ import annotations

import datetime
import signal
import sqlite3
import stat
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
import trio

from queuegate.accounting import UsageQuery, UsageRow, UsageStore
from queuegate.config import ConfigError, build_config
from queuegate.proxy import RequestRecord, usage_row
from tests.helpers import SECRETS, gather, in_thread, start_daemon

HI = [{"role": "user", "content": "hello there"}]


def rows_in(db: Path, sql: str = "SELECT request_id FROM requests") -> list[tuple]:
    """Read the usage file directly (read-only), as another program would."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def get(url: str, secret: str | None = None, **params: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    async with httpx.AsyncClient(timeout=20) as http:
        return await http.get(url, params=params, headers=headers)


async def test_usage_per_key_session_and_model_and_a_key_sees_only_its_own(start_sim, start_gateway, key_env, tmp_path):
    _, url = await start_sim(tokens_per_s=0)
    keys = {
        "alice": {"key_env": "QG_ALICE"},
        "bob": {"key_env": "QG_BOB"},
        "ops": {"key_env": "QG_OPS", "usage_admin": True},
    }
    state = tmp_path / "state"
    gw = await start_gateway(
        {"chat": {"upstreams": [url], "kind": "llamacpp"}, "other": {"upstreams": [url]}},
        keys=keys,
        server={"state_dir": str(state)},
    )
    alice_s1 = gw.client(api_key=SECRETS["QG_ALICE"], default_headers={"x-session-id": "s1"})
    seen = [await in_thread(lambda: alice_s1.chat.completions.create(model="chat", messages=HI, max_tokens=5))]
    seen.append(await in_thread(lambda: alice_s1.chat.completions.create(model="chat", messages=HI, max_tokens=7)))
    # The session in the path, streamed: QueueGate asks the upstream for the usage chunk and hides it.
    alice_s2 = gw.client(api_key=SECRETS["QG_ALICE"], base_url=gw.api + "/session/s2")
    chunks = await in_thread(
        lambda: list(alice_s2.chat.completions.create(model="chat", messages=HI, max_tokens=4, stream=True))
    )
    assert all(c.usage is None for c in chunks)
    bob = gw.client(api_key=SECRETS["QG_BOB"])
    seen_bob = await in_thread(lambda: bob.chat.completions.create(model="other", messages=HI, max_tokens=3))

    mine = await get(gw.api + "/usage", SECRETS["QG_ALICE"])
    assert mine.status_code == 200, mine.text
    report = mine.json()
    assert {row["key"] for row in report["data"]} == {"alice"}
    totals = report["totals"]
    assert totals["requests"] == 3 and totals["errors"] == totals["cancelled"] == totals["estimated"] == 0
    assert totals["prompt_tokens"] >= sum(a.usage.prompt_tokens for a in seen) + 1
    assert totals["completion_tokens"] == sum(a.usage.completion_tokens for a in seen) + 4
    assert totals["total_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"]
    by_session = (await get(gw.api + "/usage", SECRETS["QG_ALICE"], group_by="session")).json()["data"]
    assert {(r["session"], r["requests"]) for r in by_session} == {("s1", 2), ("s2", 1)}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_day = (await get(gw.api + "/usage", SECRETS["QG_ALICE"], group_by="day,model")).json()["data"]
    assert by_day == [{"day": today, "model": "chat", **totals}]

    sessions = (await get(gw.base_url + "/sessions/status", SECRETS["QG_ALICE"])).json()["sessions"]
    assert set(sessions) == {"s1", "s2"}
    s1 = sessions["s1"]
    assert s1["requests"] == 2
    assert s1["prompt_tokens"] == sum(a.usage.prompt_tokens for a in seen)
    assert s1["completion_tokens"] == sum(a.usage.completion_tokens for a in seen)
    assert s1["total_tokens"] == sum(a.usage.total_tokens for a in seen)
    assert (await get(gw.base_url + "/sessions/status", SECRETS["QG_BOB"])).json()["sessions"] == {}

    # Bob sees his own only, and may not ask for Alice's; the usage admin sees everyone's.
    forbidden = await get(gw.api + "/usage", SECRETS["QG_BOB"], key="alice")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["param"] == "key"
    bobs = (await get(gw.api + "/usage", SECRETS["QG_BOB"])).json()["totals"]
    assert bobs["requests"] == 1 and bobs["completion_tokens"] == seen_bob.usage.completion_tokens
    everyone = (await get(gw.api + "/usage", SECRETS["QG_OPS"], group_by="key")).json()["data"]
    assert {(r["key"], r["requests"]) for r in everyone} == {("alice", 3), ("bob", 1)}
    only_other = (await get(gw.api + "/usage", SECRETS["QG_OPS"], model="other")).json()["totals"]
    assert only_other["requests"] == 1
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert (await get(gw.api + "/usage", SECRETS["QG_OPS"], since=tomorrow)).json()["totals"]["requests"] == 0
    assert (await get(gw.api + "/usage", SECRETS["QG_OPS"], until=tomorrow)).json()["totals"]["requests"] == 4

    bad = await get(gw.api + "/usage", SECRETS["QG_OPS"], group_by="colour")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    assert (await get(gw.api + "/usage", None)).status_code == 401
    # The rows are in a real SQLite file in WAL mode under state_dir, with key names and never secrets.
    db = state / "usage.sqlite3"
    assert rows_in(db, "PRAGMA journal_mode") == [("wal",)]
    for name in ("usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm"):  # who asked what: owner only
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    stored = rows_in(db, "SELECT key, session, model, outcome FROM requests ORDER BY rowid")
    assert stored == [
        ("alice", "s1", "chat", "ok"),
        ("alice", "s1", "chat", "ok"),
        ("alice", "s2", "chat", "ok"),
        ("bob", None, "other", "ok"),
    ]
    assert not any(secret.encode() in db.read_bytes() for secret in SECRETS.values())


async def test_errors_cancelled_streams_and_estimates_are_counted(start_sim, start_gateway):
    _, url = await start_sim(tokens_per_s=20)
    _, quiet_url = await start_sim(tokens_per_s=0, report_usage=False)
    gw = await start_gateway({"slow": {"upstreams": [url]}, "quiet": {"upstreams": [quiet_url], "kind": "tgi"}})
    client = gw.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await in_thread(lambda: client.chat.completions.create(model="nope", messages=HI))
    body = {"model": "slow", "stream": True, "max_tokens": 200, "messages": HI}
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream("POST", gw.api + "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break  # the client leaves after the first token
        # A backend that reports no usage: QueueGate counts about four characters per token and says so.
        answer = await http.post(gw.api + "/chat/completions", json={"model": "quiet", "messages": HI, "max_tokens": 6})
    assert answer.status_code == 200 and "usage" not in answer.json()
    await trio.sleep(0.1)
    report = (await get(gw.api + "/usage", group_by="model,session")).json()
    rows = {r["model"]: r for r in report["data"]}
    assert rows[None]["errors"] == 1 and rows[None]["requests"] == 1
    assert rows["slow"]["cancelled"] == 1 and rows["slow"]["estimated"] == 1
    assert rows["slow"]["prompt_tokens"] == 3  # the sim reports usage only at the end, which never came
    assert rows["slow"]["completion_tokens"] < 200  # counted up to the disconnect, not the whole answer asked for
    quiet = rows["quiet"]
    assert quiet["estimated"] == 1 and quiet["prompt_tokens"] == 3  # "hello there": 11 characters
    assert quiet["completion_tokens"] >= 1


async def test_usage_survives_a_restart_of_the_daemon(start_sim, nursery, tmp_path):
    _, url = await start_sim(tokens_per_s=0)
    config = tmp_path / "queuegate.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[models.m]\nupstreams = ["{url}"]\n')
    first = await start_daemon(nursery, "--config", str(config))
    client = first.client()
    for _ in range(5):
        await in_thread(lambda: client.chat.completions.create(model="m", messages=HI, max_tokens=2))
    first.process.send_signal(signal.SIGTERM)  # graceful: the last rows are committed on the way out
    with trio.fail_after(10):
        await first.process.wait()
    assert first.process.returncode == 0, first.stderr
    second = await start_daemon(nursery, "--config", str(config))
    client = second.client()
    for _ in range(3):
        await in_thread(lambda: client.chat.completions.create(model="m", messages=HI, max_tokens=2))
    totals = (await get(second.url + "/v1/usage")).json()["totals"]
    assert totals["requests"] == 8
    assert len(rows_in(tmp_path / ".queuegate" / "usage.sqlite3")) == 8
    second.process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        await second.process.wait()


@pytest.mark.parametrize("durable", [False, True], ids=["batched", "durable"])
async def test_kill_9_during_a_burst_loses_no_acknowledged_row_and_corrupts_nothing(
    start_sim, nursery, tmp_path, durable
):
    """Six clients (two of them streaming) send requests without pause; meanwhile the file is read as another
    program would, and every committed row seen there is 'acknowledged'. SIGKILL mid-burst; then the file must hold
    all of them, pass SQLite's integrity check, and serve a restarted daemon that keeps counting. With durable
    usage, it also holds every request a client saw answered whole."""
    _, url = await start_sim(tokens_per_s=0)
    config = tmp_path / "queuegate.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[usage]\nflush_ms = 50\ndurable = {str(durable).lower()}\n'
        f'[models.m]\nupstreams = ["{url}"]\nkind = "llamacpp"\nmax_concurrency = 8\n'
    )
    db = tmp_path / ".queuegate" / "usage.sqlite3"
    daemon = await start_daemon(nursery, "--config", str(config))
    sent: set[str] = set()
    answered: set[str] = set()
    acknowledged: set[str] = set()

    async def client(n: int) -> None:
        stream = n < 2
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(100_000):
                rid = f"c{n}-{i}"
                sent.add(rid)
                body = {"model": "m", "messages": HI, "max_tokens": 2, "stream": stream}
                url = daemon.url + "/v1/chat/completions"
                try:
                    async with http.stream("POST", url, json=body, headers={"x-request-id": rid}) as r:
                        whole = (await r.aread()).rstrip().endswith(b"data: [DONE]") if stream else True
                except httpx.TransportError:
                    return  # the daemon is gone
                if r.status_code == 200 and whole:
                    answered.add(rid)

    async with trio.open_nursery() as burst:
        for n in range(6):
            burst.start_soon(client, n)
        with trio.fail_after(60):
            while len(acknowledged) < 150:
                await trio.sleep(0.03)
                if db.exists():
                    acknowledged |= {rid for (rid,) in await in_thread(lambda: rows_in(db))}
        daemon.process.send_signal(signal.SIGKILL)
        await daemon.process.wait()
    assert daemon.process.returncode == -signal.SIGKILL

    assert rows_in(db, "PRAGMA integrity_check") == [("ok",)]
    stored = {rid for (rid,) in rows_in(db)}
    assert acknowledged <= stored  # nothing acknowledged was lost
    assert stored <= sent  # and nothing else (a row may be committed just before its answer left)
    if durable:
        assert answered <= stored  # every answer a client received whole has its row
    else:
        assert len(answered - stored) < 100  # at most the last ~50 ms of answers were still in memory

    restarted = await start_daemon(nursery, "--config", str(config))
    client_ = restarted.client()
    await in_thread(lambda: client_.chat.completions.create(model="m", messages=HI, max_tokens=2))
    totals = (await get(restarted.url + "/v1/usage")).json()["totals"]
    assert totals["requests"] == len(stored) + 1
    restarted.process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        await restarted.process.wait()


def row(request_id: str) -> UsageRow:
    now = time.time()
    return UsageRow(request_id, now, "2026-11-23", "k", None, "m", "user", "chat", 200, "ok", 10, 5, False)


async def test_concurrent_writers_on_one_file_lose_nothing(tmp_path):
    """Two stores on the same file (two daemons sharing a state_dir by mistake, say) commit in separate threads
    while a reader reads: every row arrives once and the file stays sound."""
    db = tmp_path / "usage.sqlite3"
    stores = [UsageStore(db, flush_s=0.005), UsageStore(db, flush_s=0.005)]
    reads = 0

    async def write(store: UsageStore, name: str) -> None:
        for i in range(2000):
            store.record(row(f"{name}-{i}"))
            if i % 50 == 0:
                await trio.sleep(0.001)
        await store.flush()

    async def read_while_writing() -> None:
        nonlocal reads
        while True:
            await in_thread(lambda: rows_in(db, "SELECT COUNT(*) FROM requests"))
            reads += 1
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        for store in stores:
            await nursery.start(store.run)
        nursery.start_soon(read_while_writing)
        async with trio.open_nursery() as writers:
            writers.start_soon(write, stores[0], "a")
            writers.start_soon(write, stores[1], "b")
        nursery.cancel_scope.cancel()
    assert reads > 3
    assert rows_in(db, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests") == [(4000, 4000)]
    assert rows_in(db, "PRAGMA integrity_check") == [("ok",)]
    assert [s.statistics().committed for s in stores] == [2000, 2000]


async def test_an_unusable_usage_path_stops_the_start_with_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = tmp_path / "queuegate.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[usage]\npath = "not-a-dir/usage.sqlite3"\n'
        '[models.m]\nupstreams = ["http://127.0.0.1:9/v1"]\n'
    )
    done = await trio.run_process(
        [sys.executable, "-m", "queuegate.cli", "run", "--config", str(config)], capture_stderr=True, check=False
    )
    assert done.returncode == 2
    assert b"cannot open the usage database" in done.stderr and b"not-a-dir" in done.stderr


async def test_a_failing_write_keeps_the_rows_and_retries(tmp_path, monkeypatch, caplog):
    """Fault injection (the disk's failure is simulated: a real full disk cannot be made on demand here): the first
    commit fails, the rows stay in memory, the next commit writes them all, and the failure is counted and logged."""
    store = UsageStore(tmp_path / "usage.sqlite3", flush_s=0.01)
    real_insert = store._insert
    failures = []

    def failing_once(batch):
        if not failures:
            failures.append(len(batch))
            raise sqlite3.OperationalError("disk I/O error")
        real_insert(batch)

    monkeypatch.setattr(store, "_insert", failing_once)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(10):
            store.record(row(f"r{i}"))
        with trio.fail_after(5):
            await store.flush()
        nursery.cancel_scope.cancel()
    assert failures == [10]
    stats = store.statistics()
    assert (stats.committed, stats.pending, stats.write_errors, stats.dropped) == (10, 0, 1, 0)
    assert rows_in(tmp_path / "usage.sqlite3", "SELECT COUNT(*) FROM requests") == [(10,)]
    (logged,) = [r for r in caplog.records if r.getMessage() == "usage rows not written; retrying"]
    assert logged.fields == {"rows": 10, "error": "disk I/O error"}


def test_rows_beyond_the_backlog_bound_are_dropped_counted_and_warned_once(tmp_path, monkeypatch, caplog):
    """While the database cannot be written, memory stays bounded: the oldest rows go first."""
    monkeypatch.setattr("queuegate.accounting._store.MAX_PENDING", 3)
    store = UsageStore(tmp_path / "usage.sqlite3")  # its writer is not running: nothing is committed
    for i in range(5):
        store.record(row(f"r{i}"))
    stats = store.statistics()
    assert (stats.pending, stats.dropped, stats.committed) == (3, 2, 0)
    warnings = [r for r in caplog.records if r.getMessage().startswith("usage rows dropped")]
    assert len(warnings) == 1


async def test_usage_days_and_dates_follow_the_configured_time_zone():
    record = RequestRecord("r1", "chat", model="m")
    east, west = ZoneInfo("Pacific/Kiritimati"), ZoneInfo("Etc/GMT+12")  # UTC+14 and UTC-12: always two dates
    days = [usage_row(record, 200, tz).day for tz in (east, west)]
    assert days == [datetime.datetime.now(tz).strftime("%Y-%m-%d") for tz in (east, west)]
    assert days[0] != days[1]
    berlin = UsageQuery.from_params({"since": "2026-11-23", "until": "2026-11-23T12:00:00Z"}, ZoneInfo("Europe/Berlin"))
    assert berlin.since == datetime.datetime(2026, 11, 22, 23, tzinfo=datetime.UTC).timestamp()  # Berlin's midnight
    assert berlin.until == datetime.datetime(2026, 11, 23, 12, tzinfo=datetime.UTC).timestamp()  # an offset wins
    with pytest.raises(ConfigError, match=r"at `usage\.timezone`: no time zone 'Mars/Olympus'"):
        build_config({"usage": {"timezone": "Mars/Olympus"}})


async def test_durable_usage_on_a_locked_database_delays_answers_a_bounded_time_and_holds_no_slot(
    start_sim, start_gateway, tmp_path, monkeypatch
):
    monkeypatch.setattr("queuegate.accounting._store.DURABLE_WAIT_S", 1.0)
    _, url = await start_sim(tokens_per_s=0)
    state = tmp_path / "state"
    gw = await start_gateway(
        {"m": {"upstreams": [url], "kind": "llamacpp", "max_concurrency": 1}},
        server={"state_dir": str(state)},
        usage={"durable": True, "flush_ms": 50},
    )
    client = gw.client()
    await in_thread(lambda: client.chat.completions.create(model="m", messages=HI, max_tokens=2))
    locker = sqlite3.connect(state / "usage.sqlite3", timeout=0)
    locker.execute("BEGIN IMMEDIATE")  # another program holds the write lock: commits wait
    try:
        started = time.monotonic()
        results = await gather(
            lambda: list(client.chat.completions.create(model="m", messages=HI, max_tokens=2, stream=True)),
            lambda: client.chat.completions.create(model="m", messages=HI, max_tokens=2),
        )
        took = time.monotonic() - started
        assert results[0] and results[1].choices
        # Each waited for its commit at most the bound; the one slot was free meanwhile, so they did not queue
        # behind each other's wait.
        assert took < 1.9, took
        assert gw.daemon.usage.statistics().late_commits == 2
    finally:
        locker.rollback()
        locker.close()
    await gw.daemon.usage.flush()
    assert len(rows_in(state / "usage.sqlite3")) == 3  # committed once the lock was gone
