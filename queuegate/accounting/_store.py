"""The usage store: one row per finished request in a SQLite file, written in batches off the request path.

A request's end only appends its row to a list in memory (`record`, no I/O). The writer task (`run`) commits the
list every `flush_ms` in one transaction, in a worker thread. A row counts as acknowledged once committed: reads go
to the file, so whatever `GET /v1/usage` has shown survives a crash. SQLite in WAL mode with `synchronous = FULL`
makes each commit atomic and durable; a daemon killed mid-write loses at most the rows of the last `flush_ms` that
were not committed yet, never a committed one, and never leaves a broken file. On shutdown the writer commits what
is left. If the disk fails, rows stay in memory (up to MAX_PENDING, then the oldest are dropped and counted) and the
writer retries.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import trio

log = logging.getLogger("queuegate.usage")

SCHEMA_VERSION = 1
MAX_PENDING = 100_000  # rows kept in memory while the disk cannot take them
DURABLE_WAIT_S = 5.0  # durable usage: the longest an answer waits for its row's commit
_PURGE_EVERY_S = 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT NOT NULL,
    at REAL NOT NULL,                  -- unix time it ended
    day TEXT NOT NULL,                 -- its UTC date, YYYY-MM-DD
    key TEXT,                          -- API key name (never the secret); NULL on an open gateway
    session TEXT,
    model TEXT,                        -- NULL when refused before a model was known
    class TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,             -- ok | error | cancelled
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    estimated INTEGER NOT NULL         -- 1: the backend reported no usage; QueueGate counted approximately
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
CREATE INDEX IF NOT EXISTS requests_key_at ON requests (key, at);
CREATE INDEX IF NOT EXISTS requests_session_at ON requests (session, at);
"""
_INSERT = "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


class UsageStoreError(Exception):
    """The usage database cannot be opened (path, permissions, or a file from a newer QueueGate)."""


class UsageRow(msgspec.Struct, array_like=True, frozen=True):
    """One finished request, as stored (the field order is the table's column order)."""

    request_id: str
    at: float
    day: str
    key: str | None
    session: str | None
    model: str | None
    klass: str
    endpoint: str
    status: int
    outcome: str
    prompt_tokens: int
    completion_tokens: int
    estimated: bool


class UsageStoreStatistics(msgspec.Struct, frozen=True):
    pending: int  # recorded, not committed yet
    committed: int  # rows committed since start
    dropped: int  # rows lost because the disk failed for too long
    write_errors: int
    late_commits: int = 0  # durable usage: answers sent before their row could be committed in time


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the usage database with the settings every user of it needs."""
    uri = f"file:{path}?mode=ro" if read_only else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _private_file(path: Path) -> None:
    """Create `path` readable by its owner only (SQLite gives its -wal and -shm files the database file's mode, and
    `[usage].path` may lie outside the private state folder: usage says who asked what, and how much). A file that
    exists keeps the mode its owner gave it (never changed), with a warning when others may read it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "the usage database may be read by other users",
                extra={"fields": {"path": str(path), "mode": f"{mode:o}"}},
            )


class UsageStore:
    def __init__(
        self,
        path: Path,
        *,
        flush_s: float = 1.0,
        retention_days: float = 0.0,
        timezone: datetime.tzinfo = datetime.UTC,
        durable: bool = False,
    ) -> None:
        """`durable`: requests wait (`flush`) for their row's commit before their answer's last byte is sent."""
        self.path = path
        self.durable = durable
        self.timezone = timezone  # usage days start at its midnight
        self._flush_s = flush_s
        self._retention_s = retention_days * 86400
        self._pending: list[UsageRow] = []
        self._recorded = 0  # rows ever recorded
        self._settled = 0  # of those, rows committed or dropped (in order)
        self._dropped = 0
        self._write_errors = 0
        self._late_commits = 0  # durable answers that went out before their row was committed
        self._late = False  # since the last commit in time (to warn once per outage)
        self._dropping = False  # since the last successful write (to warn once per outage)
        self._wake = trio.Event()
        self._committed_changed = trio.Event()
        self._conn: sqlite3.Connection | None = None  # the writer's; used by one worker thread at a time
        self._purged_at = 0.0

    def record(self, row: UsageRow) -> None:
        """Queue a row for the next batch (called on the request's way out: no I/O)."""
        self._pending.append(row)
        self._recorded += 1
        if len(self._pending) > MAX_PENDING:
            del self._pending[0]
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "usage rows dropped: the database has failed too long", extra={"fields": {"kept": MAX_PENDING}}
                )
            self._dropped += 1
            self._settled += 1  # it will never be written: whoever waits for it may go
            self._committed_changed.set()
            self._committed_changed = trio.Event()

    async def flush(self) -> None:
        """Return once every row recorded before the call is committed (a read after it sees them)."""
        target = self._recorded
        while self._settled < target:
            self._wake.set()
            await self._committed_changed.wait()

    async def commit_within(self) -> None:
        """Durable usage: wait for the rows recorded so far to be committed, at most DURABLE_WAIT_S. A database
        that cannot keep up (locked, failing) delays answers that long, never longer; such answers are counted
        (`late_commits`) and warned about once per outage."""
        with trio.move_on_after(DURABLE_WAIT_S) as late:
            await self.flush()
        if late.cancelled_caught:
            self._late_commits += 1
            if not self._late:
                self._late = True
                log.warning("usage rows are committed late: answers no longer wait for them", extra={"fields": {}})
        else:
            self._late = False

    def statistics(self) -> UsageStoreStatistics:
        written = self._settled - self._dropped
        return UsageStoreStatistics(len(self._pending), written, self._dropped, self._write_errors, self._late_commits)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database (UsageStoreError if it cannot), then commit batches until cancelled, and the rest."""
        await trio.to_thread.run_sync(self._open)
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self._flush_s):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._write_pending()
        finally:
            with trio.CancelScope(shield=True):
                await self._write_pending()
                await trio.to_thread.run_sync(self._close)

    async def _write_pending(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await trio.to_thread.run_sync(self._insert, batch)
        except sqlite3.Error as exc:
            self._pending[:0] = batch  # keep them, in order, for the next try
            self._write_errors += 1
            log.error("usage rows not written; retrying", extra={"fields": {"rows": len(batch), "error": str(exc)}})
            return
        self._settled += len(batch)
        self._dropping = False
        self._committed_changed.set()
        self._committed_changed = trio.Event()

    # -- in the worker thread ------------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private_file(self.path)
            conn = connect(self.path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise UsageStoreError(
                    f"{self.path}: usage database of a newer QueueGate (schema {version}, this one knows "
                    f"{SCHEMA_VERSION})"
                )
            conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        except (OSError, sqlite3.Error) as exc:
            raise UsageStoreError(f"{self.path}: cannot open the usage database: {exc}") from None
        self._conn = conn

    def _insert(self, batch: list[UsageRow]) -> None:
        assert self._conn is not None
        with _transaction(self._conn):
            self._conn.executemany(_INSERT, (msgspec.structs.astuple(row) for row in batch))
        now = time.time()
        if self._retention_s and now - self._purged_at >= _PURGE_EVERY_S:
            self._purged_at = now
            with _transaction(self._conn):
                self._conn.execute("DELETE FROM requests WHERE at < ?", (now - self._retention_s,))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: one atomic batch. A writer in another process makes
    it wait its turn (busy_timeout) rather than fail."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
