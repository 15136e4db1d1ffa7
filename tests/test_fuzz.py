"""Fuzzing the HTTP API (hypothesis, fixed budget): whatever a client sends, QueueGate answers in OpenAI's envelope
and never with a 500 of its own, logs no traceback, and never counts a request it answered as a disconnect.

A real daemon (`queuegate run`) in front of a real simulated upstream, both subprocesses, started once for the
module; the requests are sent by httpx from the test's thread. Known field names are drawn often (with values of
every JSON type) so the fuzz reaches the code that reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import LISTENING

BUDGET = int(os.environ.get("QUEUEGATE_FUZZ_EXAMPLES", "300"))
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "content", "text", "role", "temperature", "tools", "include_usage", "chat_id", "metadata"]  # fmt: skip
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/agent/chat/completions",
         "/v1/session/s1/chat/completions", "/v1/models", "/v1/usage", "/sessions/status", "/healthz",
         "/readyz"]  # fmt: skip
PRINTABLE = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars | st.sampled_from(["m", "user", "hi", "text"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)
bodies = (
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=7).map(lambda d: {"model": "m", **d}) | json_values
)
# Requests shaped like the real thing, with any JSON at each place QueueGate reads.
parts = st.lists(json_values | st.fixed_dictionaries({"type": st.just("text"), "text": json_values}), max_size=3)
messages = st.lists(
    json_values | st.fixed_dictionaries({"role": st.just("user"), "content": json_values | parts}), max_size=3
)
shaped = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "e"]), "messages": json_values | messages, "prompt": json_values | parts},
    optional={name: json_values for name in ("stream", "stream_options", "max_tokens", "max_completion_tokens")}
    | {"input": json_values | parts},
)
headers = st.dictionaries(
    st.sampled_from(["x-priority", "x-session-id", "x-chat-id", "x-request-id", "content-type", "authorization"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30),  # what HTTP allows
    max_size=3,
)
params = st.dictionaries(
    st.sampled_from(["limit", "since", "until", "group_by", "key", "model"]), st.text(max_size=10), max_size=3
)


@pytest.fixture(scope="module")
def live():
    """(base URL, the daemon's stderr file): a daemon and its upstream, for the whole module."""
    work = Path(tempfile.mkdtemp(prefix="queuegate-fuzz-"))
    sim = subprocess.Popen(
        [sys.executable, "-m", "queuegate.sim", "--port", "0", "--model", "m", "--tokens-per-s", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sim.stdout is not None
    upstream = sim.stdout.readline().split()[1]
    config = work / "queuegate.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[models.m]\nupstreams = ["{upstream}"]\nkind = "llamacpp"\n'
        f'[models.e]\nupstreams = ["{upstream}"]\nkind = "tgi"\n'
    )
    stderr = (work / "stderr.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "queuegate.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=work,
    )
    assert daemon.stdout is not None
    line = daemon.stdout.readline()
    assert LISTENING in line, (work / "stderr.log").read_text()
    yield line.split(LISTENING, 1)[1].split()[0], work / "stderr.log"
    daemon.terminate()
    daemon.wait(10)
    sim.terminate()
    sim.wait(10)
    stderr.close()


def check(response: httpx.Response) -> None:
    assert response.status_code != 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and len(error["message"]) < 2000
        assert {"type", "param", "code"} <= set(error)


@settings(max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(PATHS) | st.text(PRINTABLE, max_size=15).map(lambda t: "/" + t),
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
    body=bodies,
    raw=st.none() | st.binary(max_size=60),
    header=headers,
    query=params,
)
def test_whatever_a_client_sends_it_gets_an_envelope_and_never_a_500(live, path, method, body, raw, header, query):
    url, _ = live
    content = raw if raw is not None else json.dumps(body).encode()
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.request(method, path, content=content, headers=header, params=query)
    check(response)


@settings(max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS[:5]), body=shaped)
def test_what_queuegate_reads_in_a_request_is_checked_whatever_its_type(live, path, body):
    url, _ = live
    with httpx.Client(base_url=url, timeout=30) as http:
        check(http.post(path, json=body))


def test_pathological_bodies_and_upgrades_get_clear_answers(live):
    url, log_path = live
    with httpx.Client(base_url=url, timeout=30) as http:
        deep = b"[" * 5000 + b"]" * 5000
        for body in (deep, b'{"model": "m", "messages": ' + deep + b"}"):
            answer = http.post("/v1/chat/completions", content=body)
            assert answer.status_code == 400, answer.text
        huge_name = "x" * 5_000_000
        answer = http.post("/v1/chat/completions", json={"model": huge_name, "messages": []})
        assert answer.status_code == 404 and len(answer.content) < 2000  # the name is not echoed in full
        upgrade = {"connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                   "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
        answer = http.get("/v1/models", headers=upgrade)
        assert answer.status_code == 400 and "websocket" in answer.json()["error"]["message"]
    time.sleep(0.5)
    log = log_path.read_text()
    assert "Traceback" not in log and "status=500" not in log
    assert "status=499" not in log  # every request here was answered: none may count as a disconnect
    assert huge_name not in log
