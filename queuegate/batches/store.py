"""Where batch jobs live: uploaded and produced files under `<state_dir>/batches/files/`, and files, batches and
their lines in one SQLite database beside them (WAL, `synchronous = FULL`).

What makes a batch survive a `kill -9`: a line's result is committed (one transaction with its batch's counts)
before it counts as done, and nothing else says it is done. After a restart the lines not done run again: a line
that was in flight at the crash reaches its model twice (at least once upstream), but its row holds one result,
so the output file, written from the rows when the batch finalizes, has each `custom_id` once. Finalizing is
idempotent (files written whole under fixed names, then one transaction), so a crash in the middle of it is
finished at the next start.

Every method is blocking: the batch service calls them in a worker thread, one at a time (`BatchService` holds
the lock).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    key TEXT,                          -- the API key that owns it (NULL on an open gateway)
    purpose TEXT NOT NULL,             -- batch | batch_output
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    key TEXT,
    document TEXT NOT NULL,            -- the batch object as OpenAI shapes it (JSON), counts and times included
    status TEXT NOT NULL,              -- (also in document: here to find the unfinished ones)
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,             -- 1-based line number in the input file
    custom_id TEXT NOT NULL,
    model TEXT NOT NULL,               -- the model it asks for (its canonical name): lines run grouped by model
    body BLOB NOT NULL,                -- the request body (JSON)
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,                      -- NULL: to run; ok (output file) | error (error file)
    result BLOB,                       -- its output or error file line (JSON)
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX IF NOT EXISTS lines_todo ON lines (batch_id, outcome, model);
"""
_SELECT_FILE = "SELECT id, purpose, filename, bytes, created_at FROM files"  # (the columns `_file_document` reads)
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


class BatchStoreError(Exception):
    """The batch database cannot be opened (path, permissions, or a file from a newer QueueGate)."""


class Line(msgspec.Struct, frozen=True):
    """A line still to run."""

    batch_id: str
    line: int
    custom_id: str
    model: str
    body: bytes
    attempts: int


class BatchStore:
    def __init__(self, folder: Path) -> None:
        """Open (creating) the store in `folder`. BatchStoreError: it cannot be used."""
        self.folder = folder
        self.files_dir = folder / "files"
        try:
            for private in (folder.parent, folder, self.files_dir):  # (state_dir too: the admin socket's folder)
                private.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(folder / "batches.sqlite3", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BatchStoreError(f"{folder}: made by a newer QueueGate (schema {version})")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise BatchStoreError(f"{folder}: cannot open the batch store: {exc}") from None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- files ----------------------------------------------------------------------------------------------------

    def path_of(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, document: dict[str, Any], key: str | None, content: bytes) -> None:
        """Store a file whole (written, synced and renamed into place before its row is committed)."""
        _write_whole(self.path_of(document["id"]), content)
        with self._transaction() as db:
            _put_file(db, document, key)

    def file(self, file_id: str, key: str | None) -> dict[str, Any] | None:
        row = self._db.execute(_SELECT_FILE + " WHERE id = ? AND key IS ?", (file_id, key)).fetchone()
        return None if row is None else _file_document(row)

    def files(self, key: str | None, purpose: str | None, limit: int, after: str | None) -> list[dict[str, Any]]:
        """The key's files, newest first (after: from the one after that id)."""
        query = _SELECT_FILE + " WHERE key IS ?"
        args: list[Any] = [key]
        if purpose is not None:
            query += " AND purpose = ?"
            args.append(purpose)
        if after is not None:
            query += " AND (created_at, id) < (SELECT created_at, id FROM files WHERE id = ?)"
            args.append(after)
        rows = self._db.execute(query + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_file_document(row) for row in rows]

    def delete_file(self, file_id: str, key: str | None) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND key IS ?", (file_id, key)).rowcount
        if deleted:
            with contextlib.suppress(FileNotFoundError):
                self.path_of(file_id).unlink()
        return bool(deleted)

    # -- batches --------------------------------------------------------------------------------------------------

    def add_batch(self, document: dict[str, Any], key: str | None, lines: list[tuple[int, str, str, bytes]]) -> None:
        """A new batch and its lines (line number, custom_id, model, body), in one transaction."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                (document["id"], key, msgspec.json.encode(document).decode(), document["status"],
                 document["created_at"]),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO lines (batch_id, line, custom_id, model, body) VALUES (?, ?, ?, ?, ?)",
                [(document["id"], *line) for line in lines],
            )

    def batch(self, batch_id: str, key: str | None) -> dict[str, Any] | None:
        row = self._db.execute("SELECT document FROM batches WHERE id = ? AND key IS ?", (batch_id, key)).fetchone()
        return None if row is None else msgspec.json.decode(row[0])

    def batches(self, key: str | None, limit: int, after: str | None) -> list[dict[str, Any]]:
        query, args = "SELECT document FROM batches WHERE key IS ?", [key]
        if after is not None:
            query += " AND (created_at, id) < (SELECT created_at, id FROM batches WHERE id = ?)"
            args.append(after)
        rows = self._db.execute(query + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [msgspec.json.decode(row[0]) for row in rows]

    def find(self, batch_id: str) -> tuple[dict[str, Any], str | None] | None:
        """A batch, whoever's, with its key (for the operator)."""
        row = self._db.execute("SELECT document, key FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else (msgspec.json.decode(row[0]), row[1])

    def unfinished(self) -> list[tuple[dict[str, Any], str | None]]:
        """Every batch not finished yet, with its key, oldest first (what a restart resumes)."""
        rows = self._db.execute(
            f"SELECT document, key FROM batches WHERE status IN ({', '.join('?' * len(UNFINISHED))})"
            " ORDER BY created_at, id",
            UNFINISHED,
        ).fetchall()
        return [(msgspec.json.decode(document), key) for document, key in rows]

    def save_batch(self, document: dict[str, Any]) -> dict[str, int]:
        """Save the batch; its counts (see `_save`)."""
        with self._transaction() as db:
            return _save(db, document)

    def todo(self, batch_id: str, model: str, limit: int, skip: frozenset[int]) -> list[Line]:
        """Lines of the batch for `model` still to run, in file order, leaving out those in `skip` (running)."""
        rows = self._db.execute(
            "SELECT batch_id, line, custom_id, model, body, attempts FROM lines"
            " WHERE batch_id = ? AND outcome IS NULL AND model = ? ORDER BY line LIMIT ?",
            (batch_id, model, limit + len(skip)),
        ).fetchall()
        return [Line(*row) for row in rows if row[1] not in skip][:limit]

    def open_models(self, batch_id: str) -> dict[str, int]:
        """The models of the lines not done, with how many each."""
        rows = self._db.execute(
            "SELECT model, COUNT(*) FROM lines WHERE batch_id = ? AND outcome IS NULL GROUP BY model", (batch_id,)
        ).fetchall()
        return dict(rows)

    def set_attempts(self, batch_id: str, line: int, attempts: int) -> None:
        """The failed attempts a line has had (it is tried again: a restart keeps counting from there)."""
        with self._transaction() as db:
            db.execute("UPDATE lines SET attempts = ? WHERE batch_id = ? AND line = ?", (attempts, batch_id, line))

    def finish_line(self, document: dict[str, Any], line: int, outcome: str, result: bytes) -> dict[str, int]:
        """A line's result and its batch's new counts, in one transaction (the result counts once committed)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE lines SET outcome = ?, result = ? WHERE batch_id = ? AND line = ? AND outcome IS NULL",
                (outcome, result, document["id"], line),
            )
            return _save(db, document)

    def finish_rest(self, document: dict[str, Any], results: Iterator[tuple[int, bytes]]) -> dict[str, int]:
        """Lines that will not run (expired, cancelled) go to the error file, with the batch's new counts."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE lines SET outcome = 'error', result = ? WHERE batch_id = ? AND line = ? AND outcome IS NULL",
                [(result, document["id"], line) for line, result in results],
            )
            return _save(db, document)

    def open_lines(self, batch_id: str) -> list[tuple[int, str]]:
        """(line, custom_id) of the lines not done."""
        return self._db.execute(
            "SELECT line, custom_id FROM lines WHERE batch_id = ? AND outcome IS NULL ORDER BY line", (batch_id,)
        ).fetchall()

    def finalize(self, document: dict[str, Any], key: str | None, files: list[dict[str, Any]]) -> None:
        """Write the batch's output and error files from its lines' results, then record them and the batch's end
        in one transaction. Safe to repeat (a crash in the middle is finished at the next start)."""
        for file in files:
            outcome = "ok" if file["purpose_of"] == "output" else "error"
            rows = self._db.execute(
                "SELECT result FROM lines WHERE batch_id = ? AND outcome = ? ORDER BY line", (document["id"], outcome)
            )
            _write_whole(self.path_of(file["id"]), (row[0] + b"\n" for row in rows))
            file["bytes"] = self.path_of(file["id"]).stat().st_size
        with self._transaction() as db:
            for file in files:
                _put_file(db, {**file, "purpose": "batch_output"}, key)
            _save(db, document)

    def purge(self, before: int) -> int:
        """Delete finished batches (and their lines) and files created before `before` (unix time)."""
        finished = f"status NOT IN ({', '.join('?' * len(UNFINISHED))})"
        with self._transaction() as db:
            ids = [row[0] for row in db.execute(f"SELECT id FROM batches WHERE created_at < ? AND {finished}",
                                                (before, *UNFINISHED))]  # fmt: skip
            db.executemany("DELETE FROM lines WHERE batch_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM batches WHERE id = ?", [(i,) for i in ids])
            files = [row[0] for row in db.execute("SELECT id FROM files WHERE created_at < ?", (before,))]
            db.executemany("DELETE FROM files WHERE id = ?", [(f,) for f in files])
            known = {row[0] for row in db.execute("SELECT id FROM files")}
        # With them, files no row names (a crash between writing a file and its row, or its row and the unlink).
        stray = [p for p in self.files_dir.iterdir() if p.name not in known and p.stat().st_mtime < time.time() - 3600]
        for path in [self.path_of(f) for f in files] + stray:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return len(ids) + len(files) + len(stray)

    def integrity(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


def _put_file(db: sqlite3.Connection, file: dict[str, Any], key: str | None) -> None:
    """A file's row (its id, purpose, filename, bytes and created_at), new or replaced."""
    row = (file["id"], key, file["purpose"], file["filename"], file["bytes"], file["created_at"])
    db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", row)


def _save(db: sqlite3.Connection, document: dict[str, Any]) -> dict[str, int]:
    """Save the batch (its counts taken from its lines, in this transaction: they never count a line whose result
    is not committed with them); its counts."""
    done = dict(db.execute(
        "SELECT outcome, COUNT(*) FROM lines WHERE batch_id = ? AND outcome IS NOT NULL GROUP BY outcome",
        (document["id"],),
    ).fetchall())  # fmt: skip
    counts = {**document["request_counts"], "completed": done.get("ok", 0), "failed": done.get("error", 0)}
    db.execute(
        "UPDATE batches SET document = ?, status = ? WHERE id = ?",
        (msgspec.json.encode({**document, "request_counts": counts}).decode(), document["status"], document["id"]),
    )
    return counts


def _file_document(row: tuple[Any, ...]) -> dict[str, Any]:
    file_id, purpose, filename, size, created_at = row
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed"}  # fmt: skip


def _write_whole(path: Path, content: bytes | Iterable[bytes]) -> None:
    """Write a file (bytes, or pieces of it) so that it is there whole or not at all, even after a crash."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        if isinstance(content, bytes):
            out.write(content)
        else:
            out.writelines(content)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def now() -> int:
    return int(time.time())
