"""Soak: run QueueGate (the demo, or a config) for minutes the way users live with it, then check nothing broke.

Bursts of concurrent requests (random models, streams and plain answers, some aborted at a random point: while
queued, waiting for a swap or mid-stream) alternate with idle gaps longer than every timer in the stack (trio retires
idle worker threads after 10 s; keep-alives expire after 4-5 s; health checks run every few seconds). Models that
share the demo GPU are asked for in turn, so it swaps. One model server is killed with SIGKILL part-way through;
QueueGate must restart it by itself. At the end it reports, and exits 1 on any failure:

- unexpected exits: children of the daemon that died other than the one killed (or swapped out), and the daemon;
- requests by outcome as the clients saw them, and the usage rows the daemon wrote for them, request id by
  request id (a request answered 200 must have an `ok` row with the very token counts the client was told);
- memory (RSS) and open file descriptors of the daemon after warm-up and at the end, after an idle gap;
- requests in flight and waiting at the end (must be 0);
- tools (the demo's tool server): a share of the chat requests ask the time or a sum, so QueueGate runs a tool loop;
  each answered one must say it called a tool, each streamed answer must end with exactly one finish_reason, and
  every tool call the daemon logged must have gone well;
- chat memory (`[memory]`, on in the demo's config with keep_last 2): a share of the chat requests are turns of a few
  long-lived chats (`X-Chat-Id: soak-chat-N`, each sending its growing history as a client does; streamed, plain,
  aborted like the others; the first turn gives a codeword). The daemon must have remembered each chat answer the
  client got whole (a stream: up to [DONE]; every chat request goes through memory) and no aborted one (unless the
  daemon had sent it all: its usage row says ok), request by request for the soak's chats; it must count no recall
  or remember failure, and `queuegate admin memory list|show` must show each chat with its last question and
  codeword. Last, each chat is asked for its codeword with a history longer than keep_last: it must be answered, and
  the prompt the model got must be cut and hold the recalled codeword turn (the simulator counts the words it got).
- batch jobs: after warm-up a batch (`--batch-lines`, over the swapped models) runs in the lowest class through the
  bursts, gaps, swaps and the kill; at the end it must be completed with every line answered, each custom_id once
  in its output file, and a usage row per line (endpoint batch, the batch's id as session).

The demo runs from a config file the soak writes (the demo's, `queuegate/demo.toml`, with `[memory]` added and the
simulators `--demo` would start started by the soak), so `queuegate admin --config` reaches the daemon too.

    python scripts/soak.py                      # the demo, 10 minutes
    python scripts/soak.py --minutes 3 --gap 11:14 --memory-share 0
    python scripts/soak.py --config queuegate.toml --state-dir .queuegate --models a,b --swap a,b \\
        --launched model-a.gguf,model-b.gguf --kill-model model-a.gguf
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import tomli_w
import trio
from benchlib import rss_kb, start_server

from queuegate.admin.client import AdminClient
from queuegate.config import load_config
from queuegate.demo import demo_config_text, simulated_upstreams
from queuegate.memory.context import HINT, RECALLED_HEADER, cut_at, text_of, truncate, turn_text

LISTENING = "QueueGate listening on "
DEMO_MODELS = "chat,coder,writer,embed"
TOOL_QUESTIONS = ("What time is it in Europe/Berlin?", "What time is it?", "What is 12*7?", "What is (3+4)/2?")
MEMORY_CHATS = 4  # long-lived chats with memory
MEMORY_KEEP_LAST = 2  # [memory].keep_last in the demo's config: most of a long chat's history is cut and recalled
MEMORY_FAILURES = ("recall_failed", "recall_timeout", "remember_failed", "remember_dropped", "open_failed")
# What a memory chat's user says after its first turn (no time, no sum: the simulated model would call a tool).
CHAT_LINES = ("Tell me more about that.", "Why is that so?", "Can you give an example?", "And the other option?")
CODEWORDS = ("marigold", "obsidian", "lighthouse", "quokka", "saffron", "juniper", "tangerine", "nebula")


@dataclass
class Sent:
    request_id: str
    model: str
    stream: bool
    outcome: str = "pending"  # ok | error | aborted | broken (transport failure the gateway should not cause)
    status: int | None = None
    usage: tuple[int, int] | None = None  # (prompt, completion) as the client was told
    detail: str = ""
    at: float = 0.0
    tool: bool = False  # it asked something the demo's models answer with a tool call
    tool_ran: bool = False  # its answer says QueueGate ran a tool for it
    finishes: int = 0  # finish reasons in its stream (exactly one when it ended whole)
    whole: bool = False  # the client got the whole answer (a stream: up to [DONE], without an error event)
    answer: str = ""  # the answer's text (a stream's: its first choice's content deltas)
    chat: str = ""  # a memory chat's turn: the chat (X-Chat-Id)
    asked: str = ""  # and its user message


@dataclass
class Soak:
    url: str
    daemon: subprocess.Popen[bytes]
    state_dir: Path
    models: list[str]
    log_path: Path
    sent: list[Sent] = field(default_factory=list)
    killed: list[tuple[int, float]] = field(default_factory=list)  # (pid, when)
    counter: int = 0
    tool_share: float = 0.0
    memory: ChatMemory | None = None  # the memory chats (None: memory is not soaked)

    def new_request(self, model: str, stream: bool, tool: bool = False) -> Sent:
        self.counter += 1
        sent = Sent(f"soak-{self.counter}", model, stream, at=time.monotonic(), tool=tool)
        self.sent.append(sent)
        return sent


def child_pids(pid: int) -> dict[int, str]:
    """The daemon's children: pid -> command line."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    children = {}
    for child in found:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            continue
        children[int(child)] = cmdline
    return children


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def one_request(soak: Soak, http: httpx.AsyncClient, model: str, abort_after: float | None) -> None:
    """A request to `model`: an embedding, or a chat request (a turn of a memory chat, for a share of them)."""
    if model != "embed" and soak.memory is not None and (chat := soak.memory.take()) is not None:
        await soak.memory.turn(soak, http, chat, model, abort_after)
        return
    stream = model != "embed" and random.random() < 0.6
    tool = model != "embed" and random.random() < soak.tool_share
    sent = soak.new_request(model, stream, tool)
    headers = {"x-request-id": sent.request_id, "x-chat-id": f"chat-{random.randint(1, 5)}"}
    if model == "embed":
        path, body = "/v1/embeddings", {"model": model, "input": "soak"}
    else:
        question = random.choice(TOOL_QUESTIONS) if tool else f"soak {soak.counter}"
        path, body = "/v1/chat/completions", chat_body(model, [{"role": "user", "content": question}], stream)
    await send(soak, http, sent, path, body, headers, abort_after)


def chat_body(model: str, messages: list[dict[str, str]], stream: bool) -> dict:
    body = {"model": model, "max_tokens": random.randint(4, 40), "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    soak: Soak, http: httpx.AsyncClient, sent: Sent, path: str, body: dict, headers: dict, abort_after: float | None
) -> None:
    """Send one request and note in `sent` what its client saw; the client leaves after `abort_after` s if given."""
    try:
        with trio.move_on_after(abort_after if abort_after is not None else float("inf")) as aborting:
            if sent.stream:
                await _streamed(http, soak.url + path, body, headers, sent)
            else:
                response = await http.post(soak.url + path, json=body, headers=headers)
                sent.status = response.status_code
                if response.status_code == 200:
                    answer = response.json()
                    usage = answer.get("usage") or {}
                    sent.usage = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                    sent.outcome, sent.whole = "ok", True
                    if sent.model != "embed":
                        sent.answer = answer["choices"][0]["message"].get("content") or ""
                    if sent.tool and not (answer.get("queuegate") or {}).get("tool_calls"):
                        sent.outcome, sent.detail = "broken", "asked a tool question; the answer says no tool ran"
                else:
                    sent.outcome, sent.detail = "error", response.text[:200]
        if aborting.cancelled_caught:
            sent.outcome = "aborted"
    except httpx.HTTPError as exc:
        sent.outcome, sent.detail = "broken", f"{type(exc).__name__}: {exc}"


async def _streamed(http: httpx.AsyncClient, url: str, body: dict, headers: dict, sent: Sent) -> None:
    async with http.stream("POST", url, json=body, headers=headers) as response:
        sent.status = response.status_code
        if response.status_code != 200:
            sent.outcome, sent.detail = "error", (await response.aread())[:200].decode(errors="replace")
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = sent.whole = True
                break
            event = json.loads(payload)
            if "error" in event:
                sent.outcome, sent.detail = "error", event["error"].get("message", "")
                return
            if event.get("usage"):
                sent.usage = (event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                if choice.get("index", 0) == 0 and isinstance((choice.get("delta") or {}).get("content"), str):
                    sent.answer += choice["delta"]["content"]
            sent.finishes += sum(1 for c in event.get("choices") or [] if c.get("finish_reason"))
            sent.tool_ran = sent.tool_ran or bool((event.get("queuegate") or {}).get("tool_calls"))
        sent.outcome = "ok" if done and sent.finishes == 1 and sent.tool_ran >= sent.tool else "broken"
        if not done:
            sent.detail = "the stream ended without [DONE] or an error event"
        elif sent.finishes != 1:
            sent.detail = f"{sent.finishes} finish reasons in one stream"
        elif sent.tool and not sent.tool_ran:
            sent.detail = "asked a tool question; the stream says no tool ran"


async def burst(soak: Soak, http: httpx.AsyncClient, size: int, swap_to: str | None) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(size):
            model = swap_to if swap_to and random.random() < 0.5 else random.choice(soak.models)
            abort_after = random.uniform(0.05, 3.0) if random.random() < 0.2 else None
            nursery.start_soon(one_request, soak, http, model, abort_after)
            await trio.sleep(random.uniform(0, 0.3))


def kill_model_server(soak: Soak, name: str) -> int | None:
    for pid, cmdline in child_pids(soak.daemon.pid).items():
        if name in cmdline and "_reaper" not in cmdline:
            os.kill(pid, signal.SIGKILL)
            soak.killed.append((pid, time.monotonic()))
            return pid
    return None


async def admin_status(soak: Soak) -> dict:
    async with AdminClient(soak.state_dir / "admin.sock") as client:
        status = await client.status()
    return {
        "in_flight": status.scheduler.in_service,
        "waiting": status.scheduler.waiting,
        "requests": status.requests_total,
        "models": {m.name: (m.state, m.reason, m.crashes) for m in status.fleet.models},
    }


def swapping_models(args: argparse.Namespace) -> list[str]:
    return args.swap.split(",") if args.swap else args.models.split(",")[:2]


async def submit_batch(http: httpx.AsyncClient, url: str, models: list[str], count: int) -> str:
    """A batch of `count` chat lines over `models`; its id."""
    lines = [
        {"custom_id": f"soak-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": models[i % len(models)], "max_tokens": 8,
                  "messages": [{"role": "user", "content": f"batch line {i}"}]}}
        for i in range(count)
    ]  # fmt: skip
    content = "\n".join(json.dumps(line) for line in lines).encode()
    upload = await http.post(url + "/v1/files", files={"file": ("soak.jsonl", content)}, data={"purpose": "batch"})
    upload.raise_for_status()
    body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = (await http.post(url + "/v1/batches", json=body)).json()
    print(f"soak: batch {batch['id']} of {count} lines over {', '.join(models)}", flush=True)
    return str(batch["id"])


async def batch_done(http: httpx.AsyncClient, url: str, batch_id: str, count: int) -> list[str]:
    """Wait (up to 5 minutes) for the batch to end; what is wrong with it."""
    with trio.move_on_after(300):
        while (batch := (await http.get(f"{url}/v1/batches/{batch_id}")).json())["status"] not in (
            "completed", "failed", "expired", "cancelled"
        ):  # fmt: skip
            await trio.sleep(1)
    counts = batch["request_counts"]
    print(f"soak: batch {batch_id}: {batch['status']}, {counts}", flush=True)
    if batch["status"] != "completed" or counts["completed"] != count:
        return [f"batch {batch_id}: {batch['status']} {counts}, expected {count} lines completed"]
    output = (await http.get(f"{url}/v1/files/{batch['output_file_id']}/content")).text.splitlines()
    ids = sorted(json.loads(line)["custom_id"] for line in output)
    if ids != sorted(f"soak-{i}" for i in range(count)):
        return [f"batch {batch_id}: its output has {len(ids)} lines, {len(set(ids))} custom_ids, expected {count}"]
    return []


def batch_usage(state_dir: Path, batch_id: str | None, count: int) -> list[str]:
    """A usage row (ok) per line of the batch, as endpoint batch."""
    if batch_id is None:
        return []
    with sqlite3.connect(f"file:{state_dir / 'usage.sqlite3'}?mode=ro", uri=True) as db:
        found = db.execute(
            "SELECT COUNT(*) FROM requests WHERE session = ? AND endpoint = 'batch' AND outcome = 'ok'", (batch_id,)
        ).fetchone()[0]
    return [] if found == count else [f"batch {batch_id}: {found} ok usage rows for {count} lines"]


def usage_rows(state_dir: Path) -> dict[str, tuple[str, int, int, int]]:
    with sqlite3.connect(f"file:{state_dir / 'usage.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT request_id, outcome, status, prompt_tokens, completion_tokens FROM requests"
            " WHERE endpoint != 'batch'"  # (the batch's lines: checked by batch_usage)
        )
        return {rid: (outcome, status, prompt, completion) for rid, outcome, status, prompt, completion in rows}


def compare(sent: list[Sent], rows: dict[str, tuple[str, int, int, int]]) -> list[str]:
    """Client outcomes against usage rows, request by request; the list of miscounts."""
    problems = []
    for s in sent:
        row = rows.get(s.request_id)
        if row is None:
            problems.append(f"{s.request_id}: {s.outcome} for the client, no usage row")
            continue
        outcome, status, prompt, completion = row
        if s.outcome == "ok":
            if outcome != "ok":
                problems.append(f"{s.request_id}: ok for the client, {outcome} ({status}) in usage")
            elif s.usage is not None and s.model != "embed" and s.usage != (prompt, completion):
                problems.append(f"{s.request_id}: client was told {s.usage}, usage says {(prompt, completion)}")
        elif s.outcome == "error" and outcome != "error":
            problems.append(f"{s.request_id}: error {s.status} for the client, {outcome} in usage")
        elif s.outcome == "aborted" and outcome not in ("cancelled", "ok"):
            problems.append(f"{s.request_id}: aborted by the client, {outcome} ({status}) in usage")
    extra = set(rows) - {s.request_id for s in sent}
    problems += [f"{rid}: a usage row for a request nobody sent" for rid in sorted(extra)]
    return problems


@dataclass
class MemoryChat:
    """A long-lived chat as its client keeps it: the turns answered whole so far, one turn in flight at most."""

    name: str
    codeword: str
    history: list[dict[str, str]] = field(default_factory=list)
    busy: bool = False


class ChatMemory:
    """The memory part of the soak: a share of the chat requests are turns of a few long-lived chats; at the end,
    what the daemon remembered is checked against what their clients saw (see the module's docstring)."""

    def __init__(self, share: float, config_path: Path, keep_last: int, max_upsert_chars: int) -> None:
        self.share = share
        self.config_path = config_path
        self.keep_last = keep_last
        self.max_upsert_chars = max_upsert_chars
        self.chats = [
            MemoryChat(f"soak-chat-{i}", f"{random.choice(CODEWORDS)}{random.randint(10, 99)}")
            for i in range(1, MEMORY_CHATS + 1)
        ]
        self.counts: collections.Counter[str] = collections.Counter()  # the daemon's, by outcome, at the end
        self.lines: list[str] = []  # figures for the report
        self.problems: list[str] = []

    def take(self) -> MemoryChat | None:
        """A chat with no turn in flight, for a `share` of the chat requests (None: an ordinary request)."""
        idle = [chat for chat in self.chats if not chat.busy]
        return random.choice(idle) if idle and random.random() < self.share else None

    async def turn(
        self,
        soak: Soak,
        http: httpx.AsyncClient,
        chat: MemoryChat,
        model: str,
        abort_after: float | None,
        question: str = "",
        stream: bool | None = None,
    ) -> Sent:
        """One turn of `chat`: its history, then a question (the codeword, until a turn came back whole)."""
        chat.busy = True
        sent = soak.new_request(model, random.random() < 0.6 if stream is None else stream)
        if not question:
            question = random.choice(CHAT_LINES) if chat.history else f"Remember this: my codeword is {chat.codeword}."
        sent.chat, sent.asked = chat.name, f"{question} ({sent.request_id})"  # (the id: found again in the store)
        asked = {"role": "user", "content": sent.asked}
        body = chat_body(model, [*chat.history, asked], sent.stream)
        headers = {"x-request-id": sent.request_id, "x-chat-id": chat.name}
        try:
            await send(soak, http, sent, "/v1/chat/completions", body, headers, abort_after)
        finally:
            chat.busy = False
        if sent.whole:
            chat.history += [asked, {"role": "assistant", "content": sent.answer}]
        return sent

    async def finish(self, soak: Soak, http: httpx.AsyncClient) -> None:
        """The end: each chat grows past keep_last if it has not, then is asked for its codeword; then the daemon's
        counts, once its writer has stored every turn answered whole (or after 10 s)."""
        models = [m for m in soak.models if m != "embed"]
        for chat in self.chats:
            for _ in range(5):  # (a turn may fail: the killed model server)
                if len(chat.history) > self.keep_last:
                    break
                await self.turn(soak, http, chat, random.choice(models), None)
            sent = await self.turn(soak, http, chat, random.choice(models), None, "What was my codeword?", False)
            self._recalled_context(chat, sent)
        whole = sum(1 for s in soak.sent if s.model != "embed" and s.whole)
        with trio.move_on_after(10):
            while (await memory_counts(http, soak.url))["remembered"] < whole:
                await trio.sleep(0.2)
        self.counts = await memory_counts(http, soak.url)

    def _recalled_context(self, chat: MemoryChat, sent: Sent) -> None:
        """The codeword question, sent with a history longer than keep_last: it must be answered, and the model must
        have got the kept messages with recalled context instead of that history. The simulator counts the words it
        is sent: the history forwarded as it is (recall skipped: nothing is cut) is its own words, plus the
        memory_query hint's line at most; with the codeword's turn recalled, it is at least the kept words and that
        turn's (with the recalled context's header)."""
        if not sent.whole or sent.usage is None:
            self.problems.append(f"{chat.name}: the codeword question got {sent.outcome} {sent.status} {sent.detail}")
            return
        messages = chat.history[:-1]  # as sent: the history, then the question
        if len(messages) - 1 <= self.keep_last:
            self.problems.append(f"{chat.name}: its history never grew past keep_last (its turns failed)")
            return
        uncut = sum(len(text_of(m).split()) for m in messages)
        kept = sum(len(text_of(m).split()) for m in truncate(messages, cut_at(messages, self.keep_last)))
        first_turn = turn_text(chat.history[0]["content"], chat.history[1]["content"], self.max_upsert_chars)
        codeword_turn = len(RECALLED_HEADER.split()) + len(f"- {first_turn}".split())
        prompt = sent.usage[0]
        self.lines.append(
            f"  {chat.name}: codeword question with {len(messages)} messages answered {sent.status}; the model got "
            f"{prompt} words (uncut history: {uncut}; kept and the codeword's turn: {kept + codeword_turn} at least)"
        )
        if prompt in (uncut, uncut + len(HINT.split())) or prompt < kept + codeword_turn:
            self.problems.append(f"{chat.name}: the codeword question reached the model uncut or without its codeword")

    async def check(self, soak: Soak, rows: dict[str, tuple[str, int, int, int]]) -> None:
        """What the daemon remembered against what the clients saw: its counts, then each soak chat request by
        request, through `queuegate admin memory list|show` as an operator reads them."""
        chat_requests = [s for s in soak.sent if s.model != "embed"]
        whole = sum(1 for s in chat_requests if s.whole)
        # A client that left once the daemon had sent the whole answer (its usage row says ok): it may be remembered.
        late = {s.request_id for s in chat_requests if not s.whole and rows.get(s.request_id, ("",))[0] == "ok"}
        remembered = self.counts["remembered"]
        self.lines.append(
            "memory counts: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) + "; "
            f"chat answers the clients got whole: {whole} (and {len(late)} the client left once the daemon had sent it)"
        )
        if not whole <= remembered <= whole + len(late):
            self.problems.append(f"the daemon remembered {remembered} turns; the clients got {whole} answers whole")
        failed = {outcome: self.counts[outcome] for outcome in MEMORY_FAILURES if self.counts[outcome]}
        if failed:
            self.problems.append(f"memory failures counted: {failed}")
        listed = {
            match[2]: int(match[1])
            for match in re.finditer(r"(?m)^\s*(\d+) turns, last .+? UTC  (.+)$", await self.admin("list"))
        }
        if sum(listed.values()) != remembered:
            self.problems.append(f"memory list: {sum(listed.values())} turns; the daemon counted {remembered}")
        shown = 0
        for chat in self.chats:
            turns = [s for s in soak.sent if s.chat == chat.name]
            namespace = next((ns for ns in listed if ns.endswith(f" id:{chat.name}")), None)
            if namespace is None:
                if any(s.whole for s in turns):
                    self.problems.append(f"memory list: no {chat.name}, which got whole answers")
                continue
            text = await self.admin("show", namespace)
            ids = set(re.findall(r"\((soak-\d+)\)", text))
            for s in turns:
                if s.whole and s.request_id not in ids:
                    self.problems.append(f"{s.request_id} ({chat.name}): answered whole, not remembered")
                elif not s.whole and s.request_id in ids and s.request_id not in late:
                    self.problems.append(f"{s.request_id} ({chat.name}): {s.outcome} for the client, remembered")
            if listed[namespace] != len(ids):
                self.problems.append(f"{chat.name}: memory list says {listed[namespace]} turns, show has {len(ids)}")
            if chat.history and chat.history[-2]["content"] in text and chat.codeword in text:
                shown += 1
            else:
                self.problems.append(f"{chat.name}: memory show lacks its last question or its codeword")
        self.lines.append(
            f"memory list: {len(listed)} chats, {sum(listed.values())} turns; memory show: "
            f"{shown}/{len(self.chats)} soak chats with their last question and codeword"
        )

    async def admin(self, *words: str) -> str:
        """`queuegate admin memory WORDS` with the soak's --config, as an operator runs it: what it prints."""
        command = [sys.executable, "-m", "queuegate.cli", "admin", "memory", *words, "--config", str(self.config_path)]
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            self.problems.append(f"queuegate admin memory {words[0]} exited {done.returncode}: {done.stderr[:200]!r}")
        return done.stdout.decode(errors="replace")

    def report(self, soak: Soak) -> bool:
        turns = [s for s in soak.sent if s.chat]
        outcomes = collections.Counter(s.outcome for s in turns)
        print(
            f"memory chats: {len(self.chats)}, {len(turns)} turns ("
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
            + f"; {sum(s.stream for s in turns)} streamed), history up to "
            f"{max(len(c.history) for c in self.chats)} messages, keep_last {self.keep_last}"
        )
        for line in self.lines:
            print(line)
        print(f"memory problems: {len(self.problems)}")
        for problem in self.problems[:10]:
            print(f"  {problem}")
        return not self.problems


async def memory_counts(http: httpx.AsyncClient, url: str) -> collections.Counter[str]:
    """The daemon's memory operations by outcome, from /metrics."""
    text = (await http.get(url + "/metrics")).text
    found = re.finditer(r'(?m)^queuegate_memory_operations_total\{outcome="(\w+)"\} (\S+)$', text)
    return collections.Counter({match[1]: int(float(match[2])) for match in found})


def demo_config(workdir: Path, memory: bool) -> tuple[Path, list[subprocess.Popen[str]]]:
    """The demo's config as a file in `workdir`, `[memory]` on if asked. The simulators `--demo` would start are
    started here, their URLs written in (the caller stops them). Returns (the file, the simulators)."""
    raw = tomllib.loads(demo_config_text())
    simulator = [sys.executable, "-m", "queuegate.sim", "--port", "0", "--model"]
    sims: list[subprocess.Popen[str]] = []
    try:
        for name, i in simulated_upstreams(raw):
            sim, url = start_server([*simulator, name])
            sims.append(sim)
            raw["models"][name]["upstreams"][i] = url + "/v1"
        for name, server in raw.get("tools", {}).get("servers", {}).items():
            if urlsplit(server["url"]).port == 0:  # the demo tool server
                sim, server["url"] = start_server([*simulator, name, "--tool-server"])
                sims.append(sim)
    except BaseException:
        stop(sims)
        raise
    if memory:
        raw["memory"] = {"enabled": True, "keep_last": MEMORY_KEEP_LAST}
    path = workdir / "queuegate.toml"
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path, sims


def stop(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(10)


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="queuegate-soak-"))
    sims: list[subprocess.Popen[str]] = []
    if args.config:
        config_path = Path(args.config).resolve()
    else:
        config_path, sims = demo_config(workdir, memory=args.memory_share > 0)
    log_path = workdir / "daemon.log"
    command = [sys.executable, "-m", "queuegate.cli", "run", "--listen", "127.0.0.1:0", "--config", str(config_path)]
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=log)
    try:
        return await soak_daemon(args, daemon, config_path, workdir, log_path, sims)
    finally:
        stop([daemon, *sims])  # (the daemon is stopped already, unless the soak failed on its way)


async def soak_daemon(
    args: argparse.Namespace,
    daemon: subprocess.Popen[bytes],
    config_path: Path,
    workdir: Path,
    log_path: Path,
    sims: list[subprocess.Popen[str]],
) -> int:
    assert daemon.stdout is not None
    line = daemon.stdout.readline().decode()
    if LISTENING not in line:
        print(f"the daemon did not start; its log: {log_path}")
        return 1
    url = line.split(LISTENING, 1)[1].split()[0]
    state_dir = Path(args.state_dir) if args.state_dir else workdir / ".queuegate"
    models = args.models.split(",")
    soak = Soak(url, daemon, state_dir, models, log_path, tool_share=args.tool_share)
    memory = load_config(config_path).memory
    if args.memory_share > 0 and memory.enabled:
        soak.memory = ChatMemory(args.memory_share, config_path, memory.keep_last, memory.max_upsert_chars)
    elif args.memory_share > 0:
        print(f"soak: [memory] is off in {config_path}: memory is not soaked", flush=True)
    print(f"soak: {url}, {args.minutes:g} min, gaps {args.gap} s; log {log_path}", flush=True)

    gap_low, gap_high = (float(x) for x in args.gap.split(":"))
    deadline = time.monotonic() + args.minutes * 60
    kill_at = time.monotonic() + args.minutes * 60 / 3
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await burst(soak, http, 6, None)  # warm-up: every model loaded once
        await trio.sleep(3)
        start_rss, start_fds = rss_kb(daemon.pid), open_fds(daemon.pid)
        batch_id = await submit_batch(http, url, swapping_models(args), args.batch_lines) if args.batch_lines else None
        launched = args.launched.split(",")
        survivors = {pid: cmd for pid, cmd in child_pids(daemon.pid).items() if not any(n in cmd for n in launched)}
        swapping = args.swap.split(",") if args.swap else []
        bursts = 0
        while time.monotonic() < deadline and daemon.poll() is None:
            bursts += 1
            swap_to = swapping[bursts % len(swapping)] if swapping else None
            await burst(soak, http, random.randint(2, args.burst), swap_to)
            if soak.killed == [] and time.monotonic() >= kill_at:
                pid = kill_model_server(soak, args.kill_model)
                if pid is not None:  # (else it is not running now: swapped out; the next burst tries again)
                    print(f"soak: killed {args.kill_model} (pid {pid}) with SIGKILL", flush=True)
            gap = random.uniform(gap_low, gap_high)
            print(f"soak: burst {bursts} done ({len(soak.sent)} requests so far); idle {gap:.0f} s", flush=True)
            await trio.sleep(gap)
        # The end: one more request per model after a last idle gap, then the checks.
        for model in soak.models:
            await one_request(soak, http, model, None)
        if soak.memory is not None:
            await soak.memory.finish(soak, http)
        batch_problems = await batch_done(http, url, batch_id, args.batch_lines) if batch_id else []
        await http.get(url + "/v1/usage")  # waits for every finished request's row to be committed
        end_rss, end_fds = rss_kb(daemon.pid), open_fds(daemon.pid)
        status = await admin_status(soak)
    alive = daemon.poll() is None
    children = child_pids(daemon.pid)
    lost = {pid: cmd for pid, cmd in survivors.items() if pid not in children}
    lost |= {sim.pid: " ".join(sim.args) for sim in sims if sim.poll() is not None}  # (the demo's simulators)
    rows = usage_rows(state_dir)
    problems = compare(soak.sent, rows) + batch_usage(state_dir, batch_id, args.batch_lines)
    problems += batch_problems
    if soak.memory is not None:
        await soak.memory.check(soak, rows)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(30)
    text = log_path.read_text(errors="replace")
    failures = text.count("model server failed")
    return report(soak, args, alive, lost, failures, status, problems, (start_rss, end_rss), (start_fds, end_fds), text)


def report(soak, args, alive, lost, failures, status, problems, rss, fds, log_text) -> int:
    outcomes = collections.Counter(s.outcome for s in soak.sent)
    kill_time = soak.killed[0][1] if soak.killed else None
    errors = [s for s in soak.sent if s.outcome == "error"]
    near_kill = [s for s in errors if kill_time is not None and abs(s.at - kill_time) < 10]
    other_errors = [s for s in errors if s not in near_kill]
    broken = [s for s in soak.sent if s.outcome == "broken"]
    in_flight_zero = status["in_flight"] == 0 and status["waiting"] == 0 and status["requests"] == 0
    expected_failures = len(soak.killed)
    print("\n== soak report")
    print(f"daemon alive at the end: {alive}")
    print(f"children lost (other than swapped or killed model servers): {len(lost)} {list(lost.values())}")
    print(f"model server failures logged: {failures} (expected {expected_failures}: the SIGKILL)")
    print(f"requests: {len(soak.sent)} " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"errors within 10 s of the kill: {len(near_kill)}; other errors: {len(other_errors)}")
    for s in (other_errors + broken)[:10]:
        print(f"  {s.request_id} {s.model} stream={s.stream} {s.outcome} {s.status}: {s.detail}")
    tool_calls = collections.Counter(re.findall(r"tool call .*? outcome=(\w+)", log_text))
    asked = collections.Counter(s.outcome for s in soak.sent if s.tool)
    print(f"tool questions: {dict(asked)}; tool calls logged by outcome: {dict(tool_calls)}")
    print(f"usage rows vs answers: {len(problems)} miscounted")
    for problem in problems[:10]:
        print(f"  {problem}")
    print(f"RSS: {rss[0] / 1024:.1f} MB after warm-up, {rss[1] / 1024:.1f} MB at the end ({rss[1] / rss[0]:.2f}x)")
    print(f"open file descriptors: {fds[0]} after warm-up, {fds[1]} at the end")
    print(
        f"in flight / waiting / active at the end: {status['in_flight']} / {status['waiting']} / {status['requests']}"
    )
    print("models at the end: " + "; ".join(f"{n} {s} (crashes {c})" for n, (s, _, c) in status["models"].items()))
    memory_ok = soak.memory.report(soak) if soak.memory is not None else True
    ok = (
        memory_ok
        and alive
        and not lost
        and failures == expected_failures
        and not other_errors
        and not broken
        and not problems
        and in_flight_zero
        and fds[1] <= fds[0] + args.fd_slack
        and "Traceback" not in log_text
        and set(tool_calls) <= {"ok"}
    )
    print("RESULT: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--gap", default="12:20", help="idle gap between bursts, min:max seconds")
    parser.add_argument("--burst", type=int, default=8, help="at most this many requests per burst")
    parser.add_argument("--config", help="a config to run instead of the demo")
    parser.add_argument("--state-dir", help="its state_dir (with --config), where usage.sqlite3 and admin.sock are")
    parser.add_argument("--models", default=DEMO_MODELS, help="comma-separated models to ask")
    parser.add_argument("--swap", default="coder,writer", help="models asked for in turn, so their device swaps")
    parser.add_argument(
        "--launched",
        default="demo-coder,demo-writer",
        help="names in the command lines of model servers QueueGate starts and stops (they may come and go)",
    )
    parser.add_argument("--kill-model", default="demo-coder", help="a name in the command line of the server to kill")
    parser.add_argument(
        "--tool-share", type=float, default=0.25, help="share of chat requests that ask a tool question"
    )
    parser.add_argument(
        "--memory-share",
        type=float,
        default=0.3,
        help="share of chat requests that are turns of long-lived chats with memory (0: memory off)",
    )
    parser.add_argument("--batch-lines", type=int, default=200, help="lines of the batch run meanwhile (0: none)")
    parser.add_argument("--fd-slack", type=int, default=8, help="open descriptors allowed above the warm-up count")
    args = parser.parse_args()
    sys.exit(trio.run(run, args))


if __name__ == "__main__":
    main()
