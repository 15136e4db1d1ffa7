"""The built-in memory store: remembered turns in a SQLite file, ranked by full-text relevance (FTS5, BM25).

One row per remembered turn, with its namespace (which chat of which key) and when. A query ranks the namespace's
turns by BM25 against the words of the question; a namespace never sees another's rows. The namespace is also
indexed as one token (`ns`, a hash of it), so a query intersects the chat's rows with the words' inside the full-text
index: its cost follows the chat's size, not the store's. Calls are blocking and run
in a worker thread (`Memory` bounds how long a request waits for them); one connection, used by one thread at a
time. The file is created 0600: it holds what users said.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS turns USING fts5(ns, namespace UNINDEXED, at UNINDEXED, text);
"""
_WORD = re.compile(r"\w{2,}", re.UNICODE)
MAX_QUERY_WORDS = 32
PROGRESS_STEPS = 1000  # SQLite steps between two looks at a query's deadline
# Words nearly every turn has: they rank nothing and make a query read most of the index.
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "about",
        "just",
        "like",
        "tell",
    ]
)


class MemoryStore:
    """Remembered turns (see the module). `path`: the SQLite file; `retention_days`: 0 keeps rows for ever."""

    def __init__(self, path: Path, retention_days: float = 0.0) -> None:
        self.path = path
        self._retention_s = retention_days * 86400
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (a new state folder: private)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        columns = [row[1] for row in db.execute("PRAGMA table_info(turns)")]
        if columns and "ns" not in columns:  # a file from before the namespace token: index its rows again
            db.create_function("namespace_token", 1, _token, deterministic=True)
            db.executescript(
                "BEGIN; ALTER TABLE turns RENAME TO turns_before; " + _SCHEMA
                + "INSERT INTO turns SELECT namespace_token(namespace), namespace, at, text FROM turns_before;"
                " DROP TABLE turns_before; COMMIT;"
            )  # fmt: skip
        db.executescript(_SCHEMA)
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def remember(self, turns: list[tuple[str, str]]) -> None:
        """Store (namespace, text) turns, in one transaction."""
        now = time.time()
        rows = [(_token(namespace), namespace, now, text) for namespace, text in turns]
        with self._lock:
            db = self._connection()
            db.execute("BEGIN")
            try:
                db.executemany("INSERT INTO turns VALUES (?, ?, ?, ?)", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def count(self, namespace: str) -> int:
        """How many turns a namespace remembers."""
        with self._lock:
            query = "SELECT count(*) FROM turns WHERE turns MATCH ?"
            return int(self._connection().execute(query, (f'ns : "{_token(namespace)}"',)).fetchone()[0])

    def recall(self, namespace: str, question: str, k: int, deadline: float = math.inf) -> list[str]:
        """The namespace's `k` turns most relevant to `question` (best first; none when it has no words). A query
        still running at `deadline` (time.monotonic) is interrupted (sqlite3.OperationalError)."""
        found = (w.lower() for w in _WORD.findall(question))
        words = list(dict.fromkeys(w for w in found if w not in STOP_WORDS))[:MAX_QUERY_WORDS]
        if not words:
            return []
        match = (
            f'ns : "{_token(namespace)}" AND text : ('
            + " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
            + ")"
        )
        with self._lock:
            db = self._connection()
            db.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
            try:
                rows = db.execute(
                    "SELECT text FROM turns WHERE turns MATCH ? ORDER BY bm25(turns, 0.0, 0.0, 0.0, 1.0) LIMIT ?",
                    (match, k),
                )
                return [text for (text,) in rows]
            finally:
                db.set_progress_handler(None, 0)

    def forget(self, namespace: str) -> int:
        """Delete everything a namespace remembered; how many turns."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN")  # one transaction: all of it, or none
            found = db.execute("SELECT rowid FROM turns WHERE turns MATCH ?", (f'ns : "{_token(namespace)}"',))
            rowids = [(rowid,) for (rowid,) in found]
            db.executemany("DELETE FROM turns WHERE rowid = ?", rowids)
            db.execute("COMMIT")
            return len(rowids)

    def namespaces(self) -> list[tuple[str, int, float]]:
        """(namespace, turns, last remembered at) for every namespace, the most recent first."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT namespace, count(*), max(at) FROM turns GROUP BY namespace ORDER BY max(at) DESC"
            )
            return [(ns, count, float(at)) for ns, count, at in rows]

    def turns(self, namespace: str) -> list[tuple[float, str]]:
        """(when, text) of every turn a namespace remembered, oldest first."""
        with self._lock:
            query = "SELECT at, text FROM turns WHERE turns MATCH ? ORDER BY at"
            rows = self._connection().execute(query, (f'ns : "{_token(namespace)}"',))
            return [(float(at), text) for at, text in rows]

    def expire(self) -> int:
        """Delete turns older than the retention; how many."""
        if not self._retention_s:
            return 0
        with self._lock:
            cutoff = time.time() - self._retention_s
            return self._connection().execute("DELETE FROM turns WHERE at < ?", (cutoff,)).rowcount

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the memory store is not open")
        return self._db


def _token(namespace: str) -> str:
    """A namespace as one full-text token (letters and digits only, so the tokenizer keeps it whole)."""
    return "ns" + hashlib.blake2b(namespace.encode(), digest_size=12).hexdigest()
