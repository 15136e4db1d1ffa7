"""Batch jobs (the OpenAI Batch API) run on the local fleet: files in, lines through QueueGate's own queue in the
lowest class, results durably out.

The service owns the batch store and one runner task per unfinished batch. A runner keeps up to
`[batches].max_concurrency` of its lines in flight, each through `Proxy.handle` like any request of the batch's key
(its model allowlist, its rate limits, usage counted as endpoint `batch` with the batch's id as session), in the
lowest class and a flow of its own (`batch:<id>`): lines use idle capacity, and the swap-aware scheduler groups
them by model. A line that fails in a way waiting may help (no connection, a timeout, 5xx, 429) is tried again
after `retry_base_s` doubled at each attempt, with jitter, up to `max_attempts`; then, and at once for any other
4xx, it goes to the error file with what it got. A batch's `completion_window` ends it: lines not run by then go to
the error file as `batch_expired`. Cancelling stops the lines in flight (their requests are withdrawn or cut) and
puts the rest in the error file as `batch_cancelled`. See `store.py` for what survives a crash.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import trio

from queuegate.accounting.keys import ApiKey
from queuegate.batches.lines import ENDPOINTS, check_input, error_line, output_line
from queuegate.batches.store import BatchStore, Line, now
from queuegate.config import BatchesConfig
from queuegate.errors import BadRequest, GatewayError, InternalError, NotFound, PayloadTooLarge, ServiceUnavailable
from queuegate.proxy import CLIENT_CLOSED, Reply, RequestRecord
from queuegate.statistics import BatchStatistics

log = logging.getLogger("queuegate.batches")

_T = TypeVar("_T")
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")  # OpenAI's is "24h"; locally any duration
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_METADATA = 16  # pairs, as OpenAI
PURGE_EVERY_S = 3600.0
FINAL = {"completed", "failed", "expired", "cancelled"}
# Errors of QueueGate's own queue (it was full, the wait ran out, a key's limit held it): waiting more may help, and
# they are not the line's failures, so they do not count against max_attempts (the completion window still ends it).
_QUEUE_WAITS = frozenset({"queue_full", "queue_timeout", "rate_limit_exceeded"})


@dataclass(frozen=True)
class _Attempt:
    """What one attempt at a line got."""

    status: int
    body: Any  # the answer (JSON, else its text), or the error envelope
    request_id: str
    retry: bool | None = None  # None: decide by status (connect errors, timeouts, 5xx, 429: try again)
    counts: bool = True  # it counts against max_attempts
    retry_after_s: float = 0.0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def __post_init__(self) -> None:
        if self.retry is None:
            object.__setattr__(self, "retry", self.status == 429 or self.status >= 500)


class Handles(Protocol):
    """What the service needs of the proxy (`proxy.Proxy`)."""

    async def handle(self, record: RequestRecord, raw_body: bytes, headers: Mapping[str, str]) -> Reply: ...


# (model, key, endpoint) -> its canonical name; ValueError: the key may not use it there (the message says why)
ResolveModel = Callable[[str, ApiKey | None, str], str]


@dataclass(eq=False)
class _Run:
    """A batch being run."""

    document: dict[str, Any]
    key: str | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: set[int] = field(default_factory=set)  # line numbers in flight
    paused: bool = False
    cancelling: bool = False
    finishing: bool = False  # its lines are done: a cancel changes nothing now
    wake: trio.Event = field(default_factory=trio.Event)
    started_at: float = field(default_factory=time.time)
    done_since_start: int = 0  # lines finished by this run (for its rate)


class BatchService:
    def __init__(
        self,
        config: BatchesConfig,
        store: BatchStore,
        proxy: Handles,
        key_named: Callable[[str], ApiKey | None],
        resolve_model: ResolveModel,
        serving: Callable[[str], bool],
        keys_open: Callable[[], bool],
        klass: str,
        on_finish: Callable[[RequestRecord, int], None] | None = None,
    ) -> None:
        """`key_named`: the API key of a name (a batch runs as the key that created it); `serving(model)`: whether
        a model takes requests now (lines of a loaded model go first); `klass`: the lowest class, the lines';
        `on_finish`: every finished line's request (metrics, usage), as the API's."""
        self.config = config
        self._store = store
        self._proxy = proxy
        self._key_named = key_named
        self._resolve_model = resolve_model
        self._serving = serving
        self._keys_open = keys_open  # (a batch made on an open gateway runs only while it is open)
        self._creating = trio.Semaphore(2)  # input files checked at once (each holds its file and lines in memory)
        self._klass = klass
        self._on_finish = on_finish
        self._lock = trio.Lock()  # one store call at a time (its connection is shared by the worker threads)
        self._runs: dict[str, _Run] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.outcomes: dict[str, int] = {"ok": 0, "error": 0, "retried": 0}  # lines, since start (metrics)

    async def _db(self, call: Callable[..., _T], *args: Any) -> _T:
        async with self._lock:
            if self._closed:
                raise ServiceUnavailable("QueueGate is shutting down: batches are not served now", retry_after_s=5)
            return await trio.to_thread.run_sync(call, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume the unfinished batches, then run those created, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for document, key in await self._db(self._store.unfinished):
                    self._start(document, key)
                if self._runs:
                    log.info("batches resumed", extra={"fields": {"batches": list(self._runs)}})
                task_status.started()
                if self.config.retention_days:
                    nursery.start_soon(self._purge_forever)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    self._closed = True
                    self._store.close()

    # -- files ----------------------------------------------------------------------------------------------------

    async def add_file(self, key: ApiKey | None, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise BadRequest(f"purpose must be 'batch' (the files QueueGate keeps are batch inputs), not {purpose!r}",
                             param="purpose")  # fmt: skip
        if len(content) > self.config.max_file_mb * 2**20:
            raise PayloadTooLarge(f"a batch input file may be at most {self.config.max_file_mb:g} MB")
        document = {"id": "file-" + secrets.token_hex(12), "object": "file", "bytes": len(content),
                    "created_at": now(), "filename": filename[:255] or "upload.jsonl", "purpose": purpose,
                    "status": "processed"}  # fmt: skip
        await self._db(self._store.add_file, document, _name(key), content)
        return document

    async def file(self, key: ApiKey | None, file_id: str) -> dict[str, Any]:
        document = await self._db(self._store.file, file_id, _name(key))
        if document is None:
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return document

    async def files(self, key: ApiKey | None, purpose: str | None, limit: int, after: str | None) -> list[Any]:
        return await self._db(self._store.files, _name(key), purpose, limit, after)

    async def delete_file(self, key: ApiKey | None, file_id: str) -> dict[str, Any]:
        if not await self._db(self._store.delete_file, file_id, _name(key)):
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    async def file_path(self, key: ApiKey | None, file_id: str) -> Path:
        """Where a file's content is (the key's own files only)."""
        await self.file(key, file_id)
        return self._store.path_of(file_id)

    # -- batches --------------------------------------------------------------------------------------------------

    async def create(
        self, key: ApiKey | None, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None
    ) -> dict[str, Any]:
        """A new batch: its input checked whole first (a bad file fails the batch, nothing runs), then run."""
        if endpoint not in ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        matched = _WINDOW.match(window)
        if matched is None:
            raise BadRequest('completion_window must be a duration such as "24h" (or 30m, 2d)',
                             param="completion_window")  # fmt: skip
        if metadata is not None and (
            len(metadata) > MAX_METADATA or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items())
        ):
            raise BadRequest("metadata: at most 16 pairs, keys up to 64 and values up to 512 characters",
                             param="metadata")  # fmt: skip
        path = await self.file_path(key, input_file_id)
        resolve = partial(self._resolve_model, key=key, endpoint=ENDPOINTS[endpoint])
        async with self._creating:
            content = await trio.Path(path).read_bytes()
            lines, errors = await trio.to_thread.run_sync(
                check_input, content, endpoint, self.config.max_lines, resolve
            )
            del content
        created = now()
        document: dict[str, Any] = {
            "id": "batch_" + secrets.token_hex(12), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": window, "status": "in_progress",
            "output_file_id": None, "error_file_id": None, "created_at": created,
            "in_progress_at": created, "expires_at": created + int(matched[1]) * _UNITS[matched[2]],
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": metadata,
        }  # fmt: skip
        if errors:
            document.update(status="failed", failed_at=created, in_progress_at=None,
                            errors={"object": "list", "data": errors})  # fmt: skip
            document["request_counts"]["total"] = 0
            lines = []
        await self._db(self._store.add_batch, document, _name(key), lines)
        fields = {"batch": document["id"], "key": _name(key), "lines": len(lines), "status": document["status"]}
        log.info("batch created", extra={"fields": fields})
        if not errors:
            self._start(document, _name(key))
        return document

    async def batch(self, key: ApiKey | None, batch_id: str) -> dict[str, Any]:
        run = self._runs.get(batch_id)
        if run is not None and run.key == _name(key):
            return run.document
        document = await self._db(self._store.batch, batch_id, _name(key))
        if document is None:
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        return document

    async def batches(self, key: ApiKey | None, limit: int, after: str | None) -> list[dict[str, Any]]:
        found = await self._db(self._store.batches, _name(key), limit, after)
        return [self._runs[d["id"]].document if d["id"] in self._runs else d for d in found]

    async def cancel(self, key: ApiKey | None, batch_id: str, *, operator: bool = False) -> dict[str, Any]:
        """Cancel a batch: its lines in flight stop, the rest go to the error file; it ends `cancelled`.
        `operator`: from the admin socket (any key's batch)."""
        run = self._runs.get(batch_id)
        if operator:
            found = (run.document, run.key) if run is not None else await self._db(self._store.find, batch_id)
            if found is None:
                raise NotFound(f"no batch {batch_id!r}", param="batch_id")
            document, owner = found
        else:
            document, owner = await self.batch(key, batch_id), _name(key)
        if document["status"] in FINAL or (run is not None and (run.cancelling or run.finishing)):
            return document  # (finished, or finishing, already: as OpenAI's, cancelling changes nothing then)
        cancelling = {**document, "status": "cancelling", "cancelling_at": now()}
        counts = await self._db(self._store.save_batch, cancelling)
        document.update(cancelling, request_counts=counts)
        log.info("batch cancelling", extra={"fields": {"batch": batch_id}})
        if run is None:  # (its runner failed: a cancel still ends it)
            self._start(document, owner)
        else:
            run.cancelling = True
            run.scope.cancel()
        return document

    def pause(self, batch_id: str, paused: bool) -> str:
        """An operator pauses a batch (its lines in flight finish; no new one starts) or resumes it.
        KeyError: no such batch running."""
        run = self._runs[batch_id]
        run.paused = paused
        run.wake.set()
        return f"{'paused' if paused else 'resumed'} batch {batch_id}"

    def statistics(self) -> list[BatchStatistics]:
        stats = []
        for batch_id, run in self._runs.items():
            counts = run.document["request_counts"]
            elapsed = max(time.time() - run.started_at, 1e-3)
            rate = run.done_since_start / elapsed
            left = counts["total"] - counts["completed"] - counts["failed"]
            stats.append(
                BatchStatistics(
                    id=batch_id,
                    key=run.key,
                    endpoint=run.document["endpoint"],
                    status=run.document["status"],
                    paused=run.paused,
                    total=counts["total"],
                    completed=counts["completed"],
                    failed=counts["failed"],
                    in_flight=len(run.running),
                    rate_per_s=round(rate, 3),
                    eta_s=round(left / rate, 1) if rate > 0 else None,
                )
            )
        return stats

    # -- running --------------------------------------------------------------------------------------------------

    def _start(self, document: dict[str, Any], key: str | None) -> None:
        assert self._nursery is not None, "the service runs"
        run = self._runs[document["id"]] = _Run(document, key, cancelling=document["status"] == "cancelling")
        self._nursery.start_soon(self._run_batch, run)

    async def _run_batch(self, run: _Run) -> None:
        document = run.document
        try:
            window_ended = False
            if document["status"] == "in_progress":
                deadline = trio.current_time() + document["expires_at"] - time.time()
                with trio.move_on_at(deadline) as window, run.scope:
                    await self._run_lines(run)
                window_ended = window.cancelled_caught
            run.finishing = True  # (from here a cancel changes nothing; a batch resumed as cancelling is cancelling)
            if run.cancelling:
                ended = "cancelled"
            elif window_ended and await self._db(self._store.open_lines, document["id"]):
                ended = "expired"  # (not when its last line finished just as the window ended)
            else:
                ended = "completed"
            await self._finish(run, ended)
        except Exception:
            log.exception(
                "batch runner failed; it resumes at the next start", extra={"fields": {"batch": document["id"]}}
            )
        finally:
            del self._runs[document["id"]]

    async def _run_lines(self, run: _Run) -> None:
        """Keep up to max_concurrency lines in flight until none is left to run, one model at a time: the lines of
        one model all go before those of the next, so a batch over models that share a device swaps once per model,
        not back and forth."""
        batch_id = run.document["id"]
        model: str | None = None  # the model whose lines run now
        async with trio.open_nursery() as lines:
            while True:
                wake = run.wake = trio.Event()
                free = self.config.max_concurrency - len(run.running)
                if not run.paused and free > 0:
                    todo = [] if model is None else await self._db(
                        self._store.todo, batch_id, model, free, frozenset(run.running)
                    )  # fmt: skip
                    if not todo and not run.running:  # this model's lines are done: the next model's
                        left = await self._db(self._store.open_models, batch_id)
                        if not left:
                            return
                        model = max(left, key=lambda m: (self._serving(m), left[m]))  # loaded first, then most lines
                        wake.set()
                    for line in todo:
                        run.running.add(line.line)
                        lines.start_soon(self._run_line, run, line)
                await wake.wait()

    async def _run_line(self, run: _Run, line: Line) -> None:
        document = run.document
        try:
            attempts = line.attempts
            while True:
                attempt = await self._call(run, line)
                attempts += attempt.counts  # (a wait in QueueGate's own queue is no failed attempt)
                if not attempt.ok and attempt.retry and attempts < self.config.max_attempts:
                    # Kept for a restart (the last attempt's outcome is committed with its result instead).
                    await self._db(self._store.set_attempts, document["id"], line.line, attempts)
                    self.outcomes["retried"] += 1
                    backoff = self.config.retry_base_s * 2 ** max(attempts - 1, 0) * random.uniform(0.5, 1.5)
                    await trio.sleep(max(backoff, attempt.retry_after_s))
                    continue
                break
            result = output_line(line.custom_id, attempt.status, attempt.request_id, attempt.body)
            outcome = "ok" if attempt.ok else "error"
            with trio.CancelScope(shield=True):  # (a result in hand is committed, even as the batch is cancelled)
                counts = await self._db(self._store.finish_line, document, line.line, outcome, result)
            document["request_counts"] = counts  # (what is committed, never ahead of it)
            self.outcomes[outcome] += 1
            run.done_since_start += 1
        finally:
            run.running.discard(line.line)
            run.wake.set()

    async def _call(self, run: _Run, line: Line) -> _Attempt:
        """One attempt at a line, through the proxy as the batch's key."""
        request_id = "batch-" + secrets.token_hex(8)
        key = self._key_named(run.key) if run.key is not None else None
        if (run.key is not None and key is None) or (run.key is None and not self._keys_open()):
            who = f"the API key {run.key!r}" if run.key else "no API key (the gateway had none then)"
            message = f"this batch was created with {who}, which this gateway no longer takes"
            return _Attempt(401, GatewayError(message, status=401, code="invalid_api_key").envelope(), request_id)
        record = RequestRecord(
            request_id,
            ENDPOINTS[run.document["endpoint"]],
            client="batch",
            key=key,
            klass=self._klass,
            flow=f"batch:{run.document['id']}",
            batch=run.document["id"],
            on_finish=self._on_finish,
        )
        try:
            reply = await self._proxy.handle(record, line.body, {})
        except GatewayError as exc:
            record.finish(exc.status, error=exc.message)
            waited = exc.code in _QUEUE_WAITS
            return _Attempt(exc.status, exc.envelope(), request_id, counts=not waited,
                            retry_after_s=exc.retry_after_s or 0.0)  # fmt: skip
        except Exception as exc:  # (a bug, not the line's doing: it goes to the error file, the batch goes on)
            record.finish(500, error="unexpected error")
            log.exception("batch line failed unexpectedly", extra={"fields": {"rid": request_id}})
            message = f"QueueGate failed to run this line (request id {request_id}): {type(exc).__name__}"
            return _Attempt(500, InternalError(message).envelope(), request_id, retry=False)
        except BaseException:
            record.finish(CLIENT_CLOSED, error="batch stopped")
            raise
        body = reply.body if isinstance(reply.body, bytes) else b""
        record.finish(reply.status)
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            answer = body.decode(errors="replace")
        return _Attempt(reply.status, answer, request_id)

    async def _finish(self, run: _Run, ended: str) -> None:
        """Put what did not run in the error file, write the files, and end the batch (`ended`). Each step is
        committed before it shows: `finalizing`, then the files and the end together."""
        document = run.document
        code = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(ended)
        if code is not None:
            rest = await self._db(self._store.open_lines, document["id"])
            message = "the batch was cancelled" if ended == "cancelled" else "the batch's completion window ended"
            results = iter([(number, error_line(custom_id, code, message)) for number, custom_id in rest])
            document["request_counts"] = await self._db(self._store.finish_rest, document, results)
        stamp = now()
        finalizing = {**document, "status": "finalizing", "finalizing_at": document["finalizing_at"] or stamp}
        document.update(finalizing, request_counts=await self._db(self._store.save_batch, finalizing))
        counts = document["request_counts"]
        suffix = document["id"].removeprefix("batch_")
        final = {**document, "status": ended, f"{ended}_at": stamp}
        files = []
        for purpose, count in (("output", counts["completed"]), ("error", counts["failed"])):
            if count:
                file_id = f"file-{purpose}-{suffix}"
                files.append({"id": file_id, "purpose_of": purpose, "filename": f"{document['id']}_{purpose}.jsonl",
                              "created_at": stamp})  # fmt: skip
                final[f"{purpose}_file_id"] = file_id
        await self._db(self._store.finalize, final, run.key, files)
        document.update(final)
        fields = {"batch": document["id"], "status": ended, **counts}
        log.info("batch finished", extra={"fields": fields})

    async def _purge_forever(self) -> None:
        while True:
            purged = await self._db(self._store.purge, now() - int(self.config.retention_days * 86400))
            if purged:
                log.info("old batches and files deleted", extra={"fields": {"deleted": purged}})
            await trio.sleep(PURGE_EVERY_S)


def _name(key: ApiKey | None) -> str | None:
    return key.name if key is not None else None
