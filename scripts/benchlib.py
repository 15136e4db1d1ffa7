"""Helpers shared by the benchmarks in this folder."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

# The lines each server the benchmarks start prints once it listens, followed by its URL.
APP_READY = "BENCH_APP_READY "
READY_PREFIXES = ("QUEUEGATE_SIM_READY ", "QueueGate listening on ", APP_READY)


def rss_kb(pid: int) -> int:
    """The process's resident memory in KiB (0 for one that holds none: a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_server(
    argv: list[str], on_start: Callable[[subprocess.Popen[str]], object] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start a server process and return it with its base URL (without /v1) once it says it is ready. `on_start`
    gets the process as soon as it exists (to have it stopped even if it never gets ready)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if on_start is not None:
        on_start(process)
    assert process.stdout is not None
    for line in process.stdout:
        for prefix in READY_PREFIXES:
            if line.startswith(prefix):
                return process, line[len(prefix) :].split()[0].removesuffix("/v1")
    raise RuntimeError(f"{argv} exited before it was ready")


class Servers:
    """Processes a benchmark starts (simulators, gateways from config text), each stopped when the `running()`
    block ends; gateway configs and state live in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._started: list[subprocess.Popen[str]] = []

    def sim(self, *args: str) -> str:
        """A `queuegate.sim` (an instant model unless `args` say otherwise); its base URL (without /v1)."""
        process, url = start_server([sys.executable, "-m", "queuegate.sim", "--port", "0", *args])
        self._started.append(process)
        return url

    def gateway(self, name: str, toml: str) -> str:
        """`queuegate run` with a config of [server] (loopback, state in the folder), no usage, and `toml`."""
        config = self.folder / f"{name}.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "{self.folder / name}"\n[usage]\nenabled = false\n{toml}'
        )
        process, url = start_server([sys.executable, "-m", "queuegate.cli", "run", "--config", str(config)])
        self._started.append(process)
        return url

    def stop(self) -> None:
        for process in self._started:
            process.terminate()
        for process in self._started:
            process.wait(10)


@contextlib.contextmanager
def running() -> Iterator[Servers]:
    with tempfile.TemporaryDirectory() as tmp:
        servers = Servers(Path(tmp))
        try:
            yield servers
        finally:
            servers.stop()


@contextlib.contextmanager
def instant_sim_behind_gateway(
    *, max_concurrency: int, log_level: str = "info", extra_toml: str = ""
) -> Iterator[tuple[str, str, Path]]:
    """A simulated upstream that answers at once, and `queuegate run` in front of it (model `bench`), each its own
    process, stopped on exit. Yields (sim base URL, gateway base URL, the gateway's folder: its state is there).
    `extra_toml`: more config tables (e.g. `[usage]` or `[keys.x]`)."""
    py = sys.executable
    servers: list[subprocess.Popen[str]] = []
    try:
        sim, sim_url = start_server([py, "-m", "queuegate.sim", "--port", "0", "--tokens-per-s", "0"])
        servers.append(sim)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "queuegate.toml"
            config.write_text(
                f'[server]\nlisten = "127.0.0.1:0"\nlog_level = "{log_level}"\n[queue]\nmax_size = 4096\n'
                f'[models.bench]\nupstreams = ["{sim_url}/v1"]\nkind = "llamacpp"\n'
                f"max_concurrency = {max_concurrency}\n{extra_toml}"
            )
            gateway, gateway_url = start_server([py, "-m", "queuegate.cli", "run", "--config", str(config)])
            servers.append(gateway)
            yield sim_url, gateway_url, Path(tmp)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)


def bare_asgi_app(*, hold: bool) -> Callable[..., Any]:
    """hypercorn's own floor, as a baseline: an ASGI app without a framework that reads the request's body, then
    answers a small JSON or (`hold`) waits for the client to hang up."""
    body = b'{"ok": true}'
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        if hold:
            await receive()  # http.disconnect, once the client hangs up
            return
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body})

    return app


def serve_app(app: Any, *, backlog: int = 100) -> None:
    """Serve a baseline ASGI app (quart-trio, or bare) with hypercorn on a free loopback port; print its URL after
    APP_READY once it listens."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.backlog = backlog

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
            print(APP_READY, binds[0], flush=True)

    trio.run(main)


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Rounds:
    """One server in one scenario measured over several interleaved rounds: median throughput, pooled latencies."""

    runs: list[Result] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def events_per_s(self) -> float:
        return statistics.median(r.events / r.elapsed for r in self.runs)

    def pct(self, q: float) -> float:
        return Result(latencies=[x for r in self.runs for x in r.latencies]).pct(q)


class Connection:
    """One keep-alive HTTP/1.1 connection that reads content-length and chunked responses."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.buffer = bytearray()

    async def request(self, raw: bytes) -> tuple[int, int]:
        """Send one request; return (status, number of events): the SSE events of a chunked (streamed) body,
        counted by their blank-line ends so how the server groups them into writes does not matter; 1 for a
        plain body."""
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.buffer.clear()
        await self.stream.send_all(raw)
        head = await self._read_until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"transfer-encoding") == b"chunked":
            body = bytearray()
            while True:
                size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
                body += (await self._read_exactly(size + 2))[:size]
                if size == 0:
                    break
            events = body.count(b"\n\n")
        else:
            await self._read_exactly(int(headers.get(b"content-length", b"0")))
            events = 1
        if headers.get(b"connection") == b"close":
            await self.close()
        return status, events

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def _fill(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    async def _read_until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            await self._fill()
        data = bytes(self.buffer[:end])
        del self.buffer[: end + len(marker)]
        return data

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


def post(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def drive(
    url: str, path: str, body: bytes, concurrency: int, seconds: float, headers: dict[str, str] | None = None
) -> Result:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    raw = post(host, int(port), path, body, headers)
    result = Result()
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker() -> None:
        conn = Connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    status, events = await conn.request(raw)
                except (OSError, ConnectionError, ValueError, IndexError):
                    result.errors += 1
                    await conn.close()
                    continue
                result.latencies.append(time.perf_counter() - t0)
                if status == 200:
                    result.requests += 1
                    result.events += events
                else:
                    result.errors += 1
        finally:
            await conn.close()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    result.elapsed = time.perf_counter() - start
    return result
