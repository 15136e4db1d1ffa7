"""Reading the usage store: `GET /v1/usage` (grouped totals, filtered) and `GET /sessions/status` (per session).

Queries run in a worker thread on a read-only connection of their own, so they never wait for the writer (WAL).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from queuegate.accounting._store import connect
from queuegate.errors import BadRequest

GROUPS = ("day", "key", "session", "model")
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
_TOTALS = (
    "COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
    "COALESCE(SUM(outcome = 'error'), 0), COALESCE(SUM(outcome = 'cancelled'), 0), COALESCE(SUM(estimated), 0)"
)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    key: str | None = None
    session: str | None = None
    model: str | None = None
    since: float | None = None  # unix time, inclusive
    until: float | None = None  # unix time, exclusive
    group_by: tuple[str, ...] = GROUPS
    limit: int = DEFAULT_LIMIT

    @classmethod
    def from_params(cls, params: Mapping[str, str], timezone: datetime.tzinfo = datetime.UTC) -> UsageQuery:
        """From URL query parameters (dates and times without an offset are in `timezone`); BadRequest names the
        parameter that is wrong."""
        group_by = tuple(g.strip() for g in params.get("group_by", ",".join(GROUPS)).split(",") if g.strip())
        unknown = [g for g in group_by if g not in GROUPS]
        if unknown or len(set(group_by)) != len(group_by):
            raise BadRequest(f"group_by takes distinct names among {', '.join(GROUPS)}", param="group_by")
        return cls(
            key=params.get("key") or None,
            session=params.get("session") or None,
            model=params.get("model") or None,
            since=_time_param(params, "since", timezone),
            until=_time_param(params, "until", timezone),
            group_by=group_by,
            limit=_limit_param(params),
        )

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column in ("key", "session", "model"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("at >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("at < ?")
            args.append(self.until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def usage_report(path: Path, query: UsageQuery) -> dict[str, Any]:
    """Totals per group (default: per day, key, session and model), oldest day first, and over everything."""
    where, args = query.where()
    columns = ", ".join(query.group_by)
    rows: list[Any] = []
    totals: tuple[Any, ...] = (0, 0, 0, 0, 0, 0)
    with _reader(path) as conn:
        if conn is not None:
            select = f"SELECT {columns + ', ' if columns else ''}{_TOTALS} FROM requests{where}"
            if columns:
                select += f" GROUP BY {columns} ORDER BY {columns}"
            rows = conn.execute(select + " LIMIT ?", [*args, query.limit + 1]).fetchall()
            totals = conn.execute(f"SELECT {_TOTALS} FROM requests{where}", args).fetchone()
    width = len(query.group_by)
    data = [
        {**dict(zip(query.group_by, row[:width], strict=True)), **_counts(row[width:])}
        for row in rows[: query.limit]
        if row[width] > 0  # (no groups and no rows: SQLite still returns one row of zeros)
    ]
    return {"object": "list", "data": data, "totals": _counts(totals), "has_more": len(rows) > query.limit}


def sessions_status(path: Path, query: UsageQuery) -> dict[str, Any]:
    """Per session: prompt, completion and total tokens and the request count; most recently active first."""
    where, args = query.where()
    where += (" AND " if where else " WHERE ") + "session IS NOT NULL"
    rows: list[Any] = []
    with _reader(path) as conn:
        if conn is not None:
            select = (
                "SELECT session, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), MAX(at) "
                f"FROM requests{where} GROUP BY session ORDER BY MAX(at) DESC LIMIT ?"
            )
            rows = conn.execute(select, [*args, query.limit + 1]).fetchall()
    sessions = {
        session: {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "requests": requests,
            "last_at": round(last_at, 3),
        }
        for session, requests, prompt, completion, last_at in rows[: query.limit]
    }
    return {"object": "sessions.status", "sessions": sessions, "has_more": len(rows) > query.limit}


def _counts(row: tuple[Any, ...]) -> dict[str, int]:
    requests, prompt, completion, errors, cancelled, estimated = row
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "errors": errors,
        "cancelled": cancelled,
        "estimated": estimated,  # requests whose tokens QueueGate counted approximately
    }


@contextlib.contextmanager
def _reader(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection, or None when the store has not written its file yet (nothing to report)."""
    if not path.exists():
        yield None
        return
    conn = connect(path, read_only=True)
    try:
        yield conn
    finally:
        conn.close()


def _time_param(params: Mapping[str, str], name: str, timezone: datetime.tzinfo) -> float | None:
    """Unix seconds, a date (2026-11-23: midnight in `timezone`) or an ISO 8601 time (2026-11-23T10:00:00Z)."""
    raw = params.get(name)
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
        raise BadRequest(f"{name} must be a finite number of unix seconds", param=name)
    try:
        parsed = datetime.datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(
            f"{name} takes unix seconds, a date such as 2026-11-23 or a time such as 2026-11-23T10:00:00Z",
            param=name,
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone)
    return parsed.timestamp()


def _limit_param(params: Mapping[str, str]) -> int:
    raw = params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit takes a whole number from 1 to {MAX_LIMIT}", param="limit")
    return int(raw)
