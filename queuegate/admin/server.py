"""The daemon's side of the admin socket.

The socket lives in a directory only the owner may enter, with mode 0600: QueueGate creates that directory 0700, and
refuses one others may enter rather than change the mode of a directory it did not create. A socket file left by a
crashed daemon is replaced; one a live daemon answers on is refused (`SocketInUse`). The socket is claimed
(`claim_admin_socket`) before anything else starts. Each connection has its own task: a slow or broken client never
holds up another one or the request path, and subscribers share one snapshot per moment.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from queuegate.admin._stream import LineStream, LineTooLong
from queuegate.admin.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Cancel,
    DaemonStatus,
    Drain,
    Error,
    Evict,
    Hello,
    Memory,
    Ok,
    Pause,
    Preload,
    Reload,
    Reply,
    Request,
    Resume,
    Snapshot,
    Status,
    Subscribe,
    Undrain,
    encode_line,
    request_decoder,
)
from queuegate.batches.service import BatchService
from queuegate.config import ConfigError
from queuegate.errors import GatewayError
from queuegate.fleet.manager import Fleet
from queuegate.memory.service import Memory as MemoryService
from queuegate.nodes.registry import NodeRegistry
from queuegate.proxy import ActiveRequests
from queuegate.scheduler import Admission

log = logging.getLogger("queuegate.admin")

_HEARTBEAT_S = 1.0  # subscribers get a snapshot at least this often (elapsed times move)


class AdminSocketError(Exception):
    """The admin socket cannot be used; the message says why and what to do."""


class SocketInUse(AdminSocketError):
    """Another daemon is serving on this admin socket (or the path is something else than a socket)."""


async def claim_admin_socket(path: Path) -> trio.SocketListener:
    """Bind the admin socket at `path` (replacing a stale one) and listen; AdminSocketError if it cannot be ours."""
    _private_directory(path.parent)
    if path.exists() or path.is_symlink():
        await _replace_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600: no window where others may connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(64)
    return trio.SocketListener(sock)


def _private_directory(directory: Path) -> None:
    """Create `directory` 0700, or check that an existing one is a real folder of ours, closed to others (never
    change its mode)."""
    try:
        directory.mkdir(mode=0o700, parents=True)
        return
    except FileExistsError:
        pass
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise AdminSocketError(
            f"the admin socket's folder {directory} is not a folder of this user's (a link, or another user's); "
            "set [server].admin_socket to a path in a folder only you may enter"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise AdminSocketError(
            f"the admin socket's folder {directory} is open to other users (mode {mode:o}); QueueGate keeps its "
            "admin socket only in a folder only you may enter. Set [server].admin_socket to a path in such a folder, "
            f"or make this one private (chmod 700 {directory})"
        )


async def _replace_stale(path: Path) -> None:
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; QueueGate will not replace it")
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("replacing a stale admin socket", extra={"fields": {"path": str(path)}})
        path.unlink()
        return
    await stream.aclose()
    raise SocketInUse(f"another QueueGate is running with the admin socket {path}")


class AdminServer:
    def __init__(
        self,
        listener: trio.SocketListener,
        path: Path,
        status: Callable[[], DaemonStatus],
        fleet: Fleet,
        admission: Admission,
        active: ActiveRequests,
        reload: Callable[[], str],
        memory: MemoryService | None = None,
        nodes: NodeRegistry | None = None,
        batches: BatchService | None = None,
    ) -> None:
        self._listener = listener  # from `claim_admin_socket`
        self.path = path
        self._status = status
        self._fleet = fleet
        self._admission = admission
        self._active = active
        self._reload = reload
        self._memory = memory
        self._nodes = nodes  # preload and evict of a model nodes serve are passed on to them
        self._batches = batches
        self._version = 0  # bumped on every change worth showing
        self._changed = trio.Event()
        self._cached: tuple[int, float, DaemonStatus] | None = None

    def note_change(self) -> None:
        """Something subscribers should see changed (called by the scheduler on every queue change)."""
        self._version += 1
        self._changed.set()  # wakes the subscribers waiting now; later ones wait for the next change
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve, [self._listener])
                task_status.started(self.path)
        finally:
            with trio.CancelScope(shield=True):
                await self._listener.aclose()
            self.path.unlink(missing_ok=True)

    # -- connections ----------------------------------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> None:
        lines = LineStream(stream)
        try:
            async with trio.open_nursery() as nursery:
                await lines.send(encode_line(Hello(version=PROTOCOL_VERSION, pid=os.getpid())))
                while True:
                    try:
                        line = await lines.receive_line()
                    except LineTooLong as exc:
                        await lines.send(encode_line(Error(message=str(exc))))
                        continue
                    if line is None:
                        break
                    if not line.strip():
                        continue
                    await self._answer(line, lines, nursery)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except* Exception as group:  # one client's trouble never takes the daemon down
            log.error("admin connection failed", exc_info=group)
        finally:
            await stream.aclose()

    async def _answer(self, line: bytes, lines: LineStream, nursery: trio.Nursery) -> None:
        try:
            request = request_decoder.decode(line)
        except msgspec.DecodeError as exc:
            await lines.send(encode_line(Error(message=f"bad message: {exc}")))
            return
        if isinstance(request, Memory):
            reply = await self._memory_reply(request)
        elif isinstance(request, Batch):
            reply = await self._batch_reply(request)
        else:
            reply = self._handle(request)
        await lines.send(encode_line(reply))
        if isinstance(request, Subscribe):
            nursery.start_soon(self._push_updates, lines, request.interval_ms / 1000)

    async def _batch_reply(self, request: Batch) -> Reply:
        if self._batches is None:
            return Error(id=request.id, message="batch jobs are off ([batches] enabled = false)")
        try:
            if request.action == "cancel":
                document = await self._batches.cancel(None, request.batch_id, operator=True)
                return Ok(id=request.id, message=f"batch {request.batch_id}: {document['status']}")
            return Ok(id=request.id, message=self._batches.pause(request.batch_id, request.action == "pause"))
        except KeyError:
            return Error(id=request.id, message=f"no batch {request.batch_id!r} is running")
        except GatewayError as exc:
            return Error(id=request.id, message=exc.message)

    async def _memory_reply(self, request: Memory) -> Reply:
        if self._memory is None:
            return Error(id=request.id, message="chat memory is off ([memory] enabled = false)")
        try:
            return Ok(id=request.id, message=await self._memory.answer(request.action, request.namespace))
        except (ValueError, sqlite3.Error) as exc:
            return Error(id=request.id, message=str(exc))

    def _load(self, model: str, *, load: bool) -> str:
        """Preload (`load`) or evict a model: this daemon's planner does it, or the nodes that serve it."""
        if self._nodes is not None and self._nodes.serves(model):
            return self._nodes.ask(model, load=load)
        (self._fleet.preload if load else self._fleet.evict)(model)
        return f"{'preloading' if load else 'evicting'} {model}"

    def _handle(self, request: Request) -> Reply:
        try:
            if isinstance(request, Status | Subscribe):
                return Snapshot(id=request.id, status=self.snapshot())
            if isinstance(request, Preload | Evict):
                return Ok(id=request.id, message=self._load(request.model, load=isinstance(request, Preload)))
            if isinstance(request, Drain | Undrain):
                drain = isinstance(request, Drain)
                self._admission.set_drained(request.upstream, drain)
                return Ok(id=request.id, message=f"{'drained' if drain else 'undrained'} {request.upstream}")
            if isinstance(request, Cancel):
                count = self._active.cancel(request.request_id)
                times = f" ({count} requests had this id)" if count > 1 else ""
                return Ok(id=request.id, message=f"cancelled {request.request_id}{times}")
            if isinstance(request, Reload):
                return Ok(id=request.id, message=self._reload())
            if isinstance(request, Pause | Resume):
                pause = isinstance(request, Pause)
                self._admission.set_paused(request.klass, pause)
                return Ok(id=request.id, message=f"{'paused' if pause else 'resumed'} class {request.klass}")
        except (KeyError, ValueError, ConfigError) as exc:
            return Error(id=request.id, message=exc.args[0] if exc.args else str(exc))
        return Error(id=request.id, message=f"unsupported request {type(request).__name__}")

    async def _push_updates(self, lines: LineStream, interval_s: float) -> None:
        sent_version, sent_at = self._version, time.monotonic()
        while True:
            await trio.sleep(interval_s)
            if self._version == sent_version:
                with trio.move_on_after(max(0.0, sent_at + _HEARTBEAT_S - time.monotonic())):
                    await self._changed.wait()
            sent_version, sent_at = self._version, time.monotonic()
            await lines.send(encode_line(Snapshot(status=self.snapshot())))

    def snapshot(self) -> DaemonStatus:
        """The status now; subscribers asking at the same moment and version share one."""
        now = time.monotonic()
        cached = self._cached
        if cached is not None and cached[0] == self._version and now - cached[1] < 0.05:
            return cached[2]
        status = self._status()
        self._cached = (self._version, now, status)
        return status
