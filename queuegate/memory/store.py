"""The built-in memory store: remembered turns in a SQLite file, ranked by full-text relevance (FTS5, BM25).

One row per remembered turn, with its namespace (which chat of which key) and when. A query ranks the namespace's
turns by BM25 against the words of the question; a namespace never sees another's rows. Calls are blocking and run
in a worker thread (`Memory` bounds how long a request waits for them); one connection, used by one thread at a
time. The file is created 0600: it holds what users said.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS turns USING fts5(namespace UNINDEXED, at UNINDEXED, text);
"""
_WORD = re.compile(r"\w{2,}", re.UNICODE)
MAX_QUERY_WORDS = 32


class MemoryStore:
    """Remembered turns (see the module). `path`: the SQLite file; `retention_days`: 0 keeps rows for ever."""

    def __init__(self, path: Path, retention_days: float = 0.0) -> None:
        self.path = path
        self._retention_s = retention_days * 86400
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def remember(self, namespace: str, text: str) -> None:
        with self._lock:
            self._connection().execute("INSERT INTO turns VALUES (?, ?, ?)", (namespace, time.time(), text))

    def recall(self, namespace: str, question: str, k: int) -> list[str]:
        """The namespace's `k` turns most relevant to `question` (best first; none when it has no words)."""
        words = list(dict.fromkeys(w.lower() for w in _WORD.findall(question)))[:MAX_QUERY_WORDS]
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        with self._lock:
            rows = self._connection().execute(
                "SELECT text FROM turns WHERE turns MATCH ? AND namespace = ? ORDER BY bm25(turns) LIMIT ?",
                (match, namespace, k),
            )
            return [text for (text,) in rows]

    def forget(self, namespace: str) -> int:
        """Delete everything a namespace remembered; how many turns."""
        with self._lock:
            return self._connection().execute("DELETE FROM turns WHERE namespace = ?", (namespace,)).rowcount

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
            query = "SELECT at, text FROM turns WHERE namespace = ? ORDER BY at"
            rows = self._connection().execute(query, (namespace,))
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
