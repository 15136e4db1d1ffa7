"""The lifeline's reaper and the lifeline itself, with real processes: what it stops, what it must never stop, and
children started while its reaper is being replaced.

(The daemon-level behaviour, children outliving an idle daemon and dying with a `kill -9`ed one, is in
test_cli_run.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from queuegate.fleet.launchers._reaper import start_time
from queuegate.fleet.launchers.lifeline import REAPER, Lifeline
from queuegate.fleet.launchers.process import ChildProcess
from tests.helpers import in_thread, running, wait_until

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)


async def test_the_reaper_stops_what_is_registered_and_nothing_else():
    polite = subprocess.Popen(["sleep", "60"], start_new_session=True)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", IGNORES_SIGTERM], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)  # registered under a stale start time
    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    assert stubborn.stdout is not None
    with trio.fail_after(10):
        assert await in_thread(stubborn.stdout.readline) == "ready\n"  # its SIGTERM handler is set
    reaper = subprocess.Popen([sys.executable, "-I", "-S", str(REAPER)], stdin=subprocess.PIPE)
    assert reaper.stdin is not None
    lines = [
        f"+{polite.pid} 3 {start_time(polite.pid)}",
        f"+{stubborn.pid} 0.5 {start_time(stubborn.pid)}",
        f"+{stranger.pid} 3 {start_time(stranger.pid) - 1}",  # the id now belongs to another process
        f"+{gone.pid} 3 12345",  # a child whose exec failed: never struck off
        f"+{os.getpid()} 3 1",  # garbage that must not hurt us
        "-999999",
        "nonsense",
    ]
    reaper.stdin.write(("\n".join(lines) + "\n").encode())
    reaper.stdin.flush()
    await trio.sleep(0.2)
    assert running(polite.pid) and running(stubborn.pid)  # nothing happens while the pipe is open
    reaper.stdin.close()  # what the kernel does when QueueGate dies
    await wait_until(lambda: reaper.poll() is not None, timeout=5)
    assert polite.wait(1) == -signal.SIGTERM
    assert stubborn.wait(1) == -signal.SIGKILL  # after its 0.5 s grace
    stubborn.stdout.close()
    assert running(stranger.pid)
    stranger.kill()
    stranger.wait()


async def test_a_child_started_while_the_reaper_is_replaced_lives_and_is_registered_again(nursery):
    lifeline = await nursery.start(Lifeline().run)
    first_reaper = lifeline.reaper_pid
    os.kill(first_reaper, signal.SIGKILL)
    # Right after the reaper died: registering from the child must not kill it (no SIGPIPE before exec).
    child = ChildProcess("sleeper", ["sleep", "60"], lifeline=lifeline)
    await nursery.start(child.run)
    await wait_until(lambda: lifeline.respawns == 1 and lifeline.reaper_pid != first_reaper, timeout=5)
    assert child.process is not None and running(child.process.pid)
    assert lifeline.statistics().groups == [child.process.pid]
