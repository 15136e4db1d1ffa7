"""The built-in memory store: remembered turns in a SQLite file, ranked by full-text relevance (FTS5, BM25) and,
when an embedding model is configured, by vector similarity too (sqlite-vec), the two fused into one ranking.

One row per remembered turn, with its namespace (which chat of which key) and when. The namespace is also indexed as
one token (`ns`, a hash of it): a query intersects the chat's rows with the rows that have any of the question's
words, inside the full-text index, and ranks those by BM25 computed over the chat itself (its own turn count and
word frequencies; FTS5's own bm25() would count each word's rows in the whole store, which costs what the store's
size does). A namespace never sees another's rows, and a recall's cost follows the chat's size.

Vectors: sqlite-vec's `vec0` table, partitioned by the namespace token (a nearest-neighbour search reads one chat's
vectors, not the store's), rowid = the turn's. Turns are stored at once and embedded later (`pending`, then
`add_vectors`), so a slow or missing embedding model never holds a turn back; a turn without a vector is still found
by its words. Keyword and vector rankings are fused by reciprocal rank (each list gives 1/(60 + rank)): a turn found
both ways ranks first, one that shares no word with the question can still be found by its meaning. A different
embedding model (or dimension) drops the vectors and embeds every turn again.

SQLite comes from `sqlean` (the stdlib module's API, with FTS5 and extension loading, which many Python builds lack).
Calls are blocking and run in a worker thread (`Memory` bounds how long a request waits for them); one connection,
used by one thread at a time. The file is created 0600: it holds what users said.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlean as sqlite3
import sqlite_vec

_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS turns USING fts5(ns, namespace UNINDEXED, at UNINDEXED, text);
CREATE TABLE IF NOT EXISTS pending (turn INTEGER PRIMARY KEY);  -- turns waiting for their vector
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
FUSION_K = 60  # reciprocal rank fusion's constant (the usual one): rank r scores 1 / (FUSION_K + r)
CANDIDATES = 4  # each ranking offers `CANDIDATES * k` turns to the fusion
MATCHED_MAX = 500  # a chat's turns with a word of the question that are ranked, at most (each word's latest)
BM25_K1, BM25_B = 1.2, 0.75  # the usual BM25 parameters (FTS5's too)
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

    def __init__(self, path: Path, retention_days: float = 0.0, embed_model: str = "") -> None:
        """`embed_model`: the model whose vectors are kept ("": keyword ranking only, no vectors)."""
        self.path = path
        self._retention_s = retention_days * 86400
        self._embed_model = embed_model
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._dimensions: int | None = None  # of the vectors table, once there is one

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
        db.enable_load_extension(True)
        sqlite_vec.load(db)
        db.enable_load_extension(False)
        self._db = db
        self._use_embed_model()

    def _use_embed_model(self) -> None:
        """Vectors are of one model: another (or none) drops them; a new one is owed every turn's vector."""
        db = self._connection()
        stored = dict(db.execute("SELECT name, value FROM settings").fetchall())
        if stored.get("embed_model", "") == self._embed_model:
            self._dimensions = int(stored["dimensions"]) if "dimensions" in stored else None
            return
        with self._transaction() as db:
            db.execute("DROP TABLE IF EXISTS vectors")
            db.execute("DELETE FROM settings WHERE name = 'dimensions'")
            db.execute("DELETE FROM pending")
            db.execute("INSERT OR REPLACE INTO settings VALUES ('embed_model', ?)", (self._embed_model,))
            if self._embed_model:
                db.execute("INSERT INTO pending SELECT rowid FROM turns")
        self._dimensions = None

    @property
    def has_vectors(self) -> bool:
        """Whether any turn has its vector (else a question's vector would find nothing)."""
        return self._dimensions is not None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def remember(self, turns: list[tuple[str, str]]) -> None:
        """Store (namespace, text) turns, in one transaction."""
        now = time.time()
        rows = [(_token(namespace), namespace, now, text) for namespace, text in turns]
        with self._lock, self._transaction() as db:
            for row in rows:
                rowid = db.execute("INSERT INTO turns VALUES (?, ?, ?, ?)", row).lastrowid
                if self._embed_model:
                    db.execute("INSERT OR REPLACE INTO pending VALUES (?)", (rowid,))

    def pending(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (turn, text) still waiting for their vector, oldest first."""
        with self._lock:
            query = "SELECT turn, text FROM pending JOIN turns ON turns.rowid = pending.turn ORDER BY turn LIMIT ?"
            return [(int(turn), text) for turn, text in self._connection().execute(query, (limit,))]

    def add_vectors(self, vectors: list[tuple[int, str, list[float] | None]]) -> None:
        """Store the vectors of pending turns, given as (turn, its text as `pending` gave it, vector); None: the
        model cannot embed it (it stays found by its words only). A turn that is no longer that text (forgotten
        meanwhile, its rowid taken by a new turn) gets nothing. A dimension other than the table's starts it again
        (every turn is owed its vector anew)."""
        with self._lock:
            dimensions = next((len(v) for _, _, v in vectors if v), self._dimensions)
            with self._transaction() as db:
                if dimensions != self._dimensions:
                    db.execute("DROP TABLE IF EXISTS vectors")
                    db.execute(
                        "CREATE VIRTUAL TABLE vectors USING vec0("
                        f"ns TEXT PARTITION KEY, embedding FLOAT[{dimensions}] DISTANCE_METRIC=cosine)"
                    )
                    db.execute("INSERT OR REPLACE INTO settings VALUES ('dimensions', ?)", (str(dimensions),))
                    db.execute("INSERT OR REPLACE INTO pending SELECT rowid FROM turns")
                for turn, text, vector in vectors:
                    found = db.execute("SELECT ns, text FROM turns WHERE rowid = ?", (turn,)).fetchone()
                    if found is None or found[1] != text:
                        continue  # (forgotten meanwhile; a new turn that took its rowid is still pending)
                    db.execute("DELETE FROM pending WHERE turn = ?", (turn,))
                    if vector is not None and len(vector) == dimensions:
                        db.execute("DELETE FROM vectors WHERE rowid = ?", (turn,))
                        blob = sqlite_vec.serialize_float32(vector)
                        db.execute("INSERT INTO vectors(rowid, ns, embedding) VALUES (?, ?, ?)", (turn, found[0], blob))
            self._dimensions = dimensions  # (once committed)

    def count(self, namespace: str) -> int:
        """How many turns a namespace remembers."""
        with self._lock:
            return self._count(self._connection(), f'ns : "{_token(namespace)}"')

    def _keyword_ranking(self, db: sqlite3.Connection, token: str, words: list[str], common: bool) -> list[int]:
        """The chat's turns that have a word of the question, best first by BM25 over the chat itself: a word's
        weight from how many of the chat's turns have it, a turn's score from the words it has and its length
        (every word counted once: what FTS5 matched, by its own tokenizer, accents and all). Each word brings its
        latest turns, a share of MATCHED_MAX (a word every turn has cannot crowd a rare one out). `common`: words
        most of the chat's turns have still rank (a little); else they rank nothing. Ties: the latest first."""
        chat = f'ns : "{token}"'
        total = self._count(db, chat)
        share = max(MATCHED_MAX // len(words), 20)
        having: dict[str, list[int]] = {}
        weights: dict[str, float] = {}
        for word in words:
            match = f'{chat} AND text : "{word}"'
            query = "SELECT rowid FROM turns WHERE turns MATCH ? ORDER BY rowid DESC LIMIT ?"
            rowids = [rowid for (rowid,) in db.execute(query, (match, share))]
            turns = len(rowids) if len(rowids) < share else self._count(db, match)
            if rowids and (common or turns <= total / 2):
                having[word] = rowids
                weights[word] = math.log(1 + (total - turns + 0.5) / (turns + 0.5))
        found = sorted({rowid for rowids in having.values() for rowid in rowids})
        if not found:
            return []
        lengths = dict(db.execute(f"SELECT rowid, length(text) FROM turns WHERE rowid IN ({_marks(found)})", found))
        average = sum(lengths.values()) / len(lengths) or 1.0
        scores = dict.fromkeys(found, 0.0)
        for word, rowids in having.items():
            for rowid in rowids:
                norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths.get(rowid, average) / average)
                scores[rowid] += weights[word] * (BM25_K1 + 1) / (1 + norm)
        return sorted(found, key=lambda rowid: (-scores[rowid], -rowid))

    @staticmethod
    def _count(db: sqlite3.Connection, match: str) -> int:
        """How many turns match."""
        return int(db.execute("SELECT count(*) FROM turns WHERE turns MATCH ?", (match,)).fetchone()[0])

    def recall(
        self, namespace: str, question: str, k: int, deadline: float = math.inf, vector: list[float] | None = None
    ) -> list[str]:
        """The namespace's `k` turns most relevant to `question` (best first): by its words, and by `vector` (the
        question's embedding) when given, fused (see the module). A query still running at `deadline`
        (time.monotonic) is interrupted (sqlite3.OperationalError)."""
        found = (w.lower() for w in _WORD.findall(question))
        words = list(dict.fromkeys(w for w in found if w not in STOP_WORDS))[:MAX_QUERY_WORDS]
        token = _token(namespace)
        with self._lock:
            db = self._connection()
            use_vector = vector is not None and len(vector) == self._dimensions
            if not words and not use_vector:
                return []
            db.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
            try:
                by_meaning: list[int] = []
                if use_vector:
                    query = "SELECT rowid FROM vectors WHERE embedding MATCH ? AND k = ? AND ns = ? ORDER BY distance"
                    blob = sqlite_vec.serialize_float32(vector)
                    by_meaning = [rowid for (rowid,) in db.execute(query, (blob, k * CANDIDATES, token))]
                # With turns found by meaning, words most of the chat's turns have rank nothing (the meaning decides).
                by_words = self._keyword_ranking(db, token, words, common=not by_meaning) if words else []
                best = _fused([by_words[: k * CANDIDATES], by_meaning])[:k]
                query = f"SELECT rowid, text FROM turns WHERE rowid IN ({_marks(best)}) AND namespace = ?"
                texts = dict(db.execute(query, (*best, namespace)))
                return [texts[rowid] for rowid in best if rowid in texts]
            finally:
                db.set_progress_handler(None, 0)

    def forget(self, namespace: str) -> int:
        """Delete everything a namespace remembered; how many turns."""
        with self._lock, self._transaction() as db:  # one transaction: all of it, or none
            found = db.execute("SELECT rowid FROM turns WHERE turns MATCH ?", (f'ns : "{_token(namespace)}"',))
            rowids = [rowid for (rowid,) in found]
            self._delete(db, rowids)
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
        with self._lock, self._transaction() as db:
            cutoff = time.time() - self._retention_s
            rowids = [rowid for (rowid,) in db.execute("SELECT rowid FROM turns WHERE at < ?", (cutoff,))]
            self._delete(db, rowids)
            return len(rowids)

    def _delete(self, db: sqlite3.Connection, rowids: list[int]) -> None:
        """Delete turns with their vectors and their place among the pending."""
        rows = [(rowid,) for rowid in rowids]
        db.executemany("DELETE FROM turns WHERE rowid = ?", rows)
        db.executemany("DELETE FROM pending WHERE turn = ?", rows)
        if self._dimensions is not None:
            db.executemany("DELETE FROM vectors WHERE rowid = ?", rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the memory store is not open")
        return self._db


def _marks(values: list[int]) -> str:
    """The placeholders of an SQL list of values: ?,?,?"""
    return ",".join("?" * len(values))


def _fused(rankings: list[list[int]]) -> list[int]:
    """Reciprocal rank fusion of rowid rankings (best first): ties keep the first ranking's order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, rowid in enumerate(ranking, 1):
            scores[rowid] = scores.get(rowid, 0.0) + 1.0 / (FUSION_K + rank)
    return sorted(scores, key=lambda rowid: -scores[rowid])


def _token(namespace: str) -> str:
    """A namespace as one full-text token (letters and digits only, so the tokenizer keeps it whole)."""
    return "ns" + hashlib.blake2b(namespace.encode(), digest_size=12).hexdigest()
