"""Tools in the simulator: the simulated model calls tools when asked, and the demo tool server answers them.

The model (`tool_answer`): when a request offers tools, the last user message may script the calls, one line each:

    CALL <round> <tool name> <JSON arguments>      e.g.  CALL 1 get_current_time {"timezone": "UTC"}
    TOOLFORM structured | mistral | mistral11 | hermes   (how it writes them: OpenAI's tool_calls, or as text)
    UNOFFERED                                      (call them even when the request offers no such tool)
    SAY <text>                                     (write this text before the calls)

Round k is the k-th answer since that user message; its CALL lines (for tools still offered) are its calls. An
answer with no calls left says what the tools returned, so a test can see the results reached the model. Without
CALL lines, the demo's questions work as a person would ask them: "what time is it (in Europe/Berlin)?" calls
`get_current_time`, "what is 12*7?" calls `calculate`.

The demo tool server (`ToolServerRoutes`): an OpenAPI tool server as mcpo serves one (`/openapi.json`, one
`POST /<tool>` per tool): the time, a calculator, and for tests a tool that sleeps, one that fails, one that
answers garbage and one that answers a lot.
"""

from __future__ import annotations

import ast
import datetime
import operator
import re
import secrets
import zoneinfo
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

_CALL = re.compile(r"^CALL (\d+) ([A-Za-z0-9_-]+) (\{.*\})\s*$", re.M)
_SAY = re.compile(r"^SAY (.*)$", re.M)
_FORM = re.compile(r"^TOOLFORM (structured|mistral|mistral11|hermes)\s*$", re.M)
_TIME = re.compile(r"\btime\b", re.I)
_ZONE = re.compile(r"\b([A-Z][a-z]+/[A-Za-z_]+)\b")
_SUM = re.compile(r"([-(\d][-+*/().\d\s]*[-+*/][-+*/().\d\s]*[\d)])")  # numbers, + - * /, parentheses


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    """What the simulated model answers instead of its usual sentence."""

    calls: list[dict[str, Any]]  # OpenAI tool calls (structured form)
    form: str  # structured | mistral | mistral11 | hermes
    text: str  # the answer's text (the calls written out, for the text forms)


def tool_answer(body: dict[str, Any]) -> ToolAnswer | None:
    """The answer to a request that offers tools or carries tool results, or None (the usual sentence)."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return None
    since = messages[last_user + 1 :]
    prompt = _text(messages[last_user].get("content"))
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    offered = {
        t["function"]["name"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
    }
    round_no = 1 + sum(1 for m in since if m.get("role") == "assistant" and m.get("tool_calls"))
    form_match = _FORM.search(prompt)
    form = form_match.group(1) if form_match else "structured"
    scripted = _CALL.findall(prompt)
    if scripted:
        anyway = "\nUNOFFERED" in prompt
        wanted = [(n, a) for r, n, a in scripted if int(r) == round_no and (anyway or n in offered)]
    else:
        wanted = _demo_calls(prompt, offered) if round_no == 1 else []
    if wanted:
        calls = [_call(name, arguments) for name, arguments in wanted]
        said = say.group(1) if (say := _SAY.search(prompt)) else ""
        return ToolAnswer(calls, form, said + (_as_text(calls, form) if form != "structured" else ""))
    results = [_text(m.get("content")) for m in since if m.get("role") == "tool"]
    if results:
        return ToolAnswer([], form, "The tools said: " + " | ".join(results))
    return None


def _demo_calls(prompt: str, offered: set[str]) -> list[tuple[str, str]]:
    if "get_current_time" in offered and _TIME.search(prompt):
        zone = _ZONE.search(prompt)
        return [("get_current_time", msgspec.json.encode({"timezone": zone.group(1) if zone else "UTC"}).decode())]
    if "calculate" in offered and (found := _SUM.search(prompt)):
        return [("calculate", msgspec.json.encode({"expression": found.group(1)}).decode())]
    return []


def _call(name: str, arguments: str) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {"id": "call_" + secrets.token_hex(8), "type": "function", "function": function}


def _as_text(calls: list[dict[str, Any]], form: str) -> str:
    """The calls as a model without a tool-call parser writes them."""
    functions = [(c["function"]["name"], msgspec.json.decode(c["function"]["arguments"])) for c in calls]
    if form == "mistral":
        return "[TOOL_CALLS]" + msgspec.json.encode([{"name": n, "arguments": a} for n, a in functions]).decode()
    if form == "mistral11":
        return "".join(f"[TOOL_CALLS]{n}[ARGS]{msgspec.json.encode(a).decode()}" for n, a in functions)
    return "\n".join(
        "<tool_call>" + msgspec.json.encode({"name": n, "arguments": a}).decode() + "</tool_call>" for n, a in functions
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


# -- the demo tool server -----------------------------------------------------------------------------------------

_OPERATIONS: dict[str, dict[str, Any]] = {
    "get_current_time": {
        "summary": "Get Current Time",
        "description": "The current time in an IANA timezone.",
        "properties": {"timezone": {"type": "string", "description": "IANA timezone name, e.g. Europe/Berlin or UTC"}},
        "required": ["timezone"],
    },
    "calculate": {
        "summary": "Calculate",
        "description": "Evaluate an arithmetic expression (+ - * / and parentheses).",
        "properties": {"expression": {"type": "string", "description": "e.g. 12*7 or (3+4)/2"}},
        "required": ["expression"],
    },
}
_TEST_OPERATIONS: dict[str, dict[str, Any]] = {
    "sleep": {
        "summary": "Sleep",
        "description": "Wait, then answer (tests: timeouts and disconnects).",
        "properties": {"seconds": {"type": "number"}},
        "required": ["seconds"],
    },
    "fail": {"summary": "Fail", "description": "Answer 500.", "properties": {}, "required": []},
    "garbage": {"summary": "Garbage", "description": "Answer invalid JSON.", "properties": {}, "required": []},
    "big": {
        "summary": "Big",
        "description": "Answer `size` characters.",
        "properties": {"size": {"type": "integer"}},
        "required": ["size"],
    },
    # A chat memory in the shape QueueGate's `[memory] backend = "toolserver"` calls (kept in this process).
    "memory_query": {
        "summary": "Memory Query",
        "description": "The snippets of a namespace that share the most words with the query.",
        "properties": {"namespace": {"type": "string"}, "query": {"type": "string"}, "k": {"type": "integer"}},
        "required": ["namespace", "query"],
    },
    "memory_upsert": {
        "summary": "Memory Upsert",
        "description": "Remember a snippet in a namespace.",
        "properties": {"namespace": {"type": "string"}, "text": {"type": "string"}},
        "required": ["namespace", "text"],
    },
}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class ToolServerRoutes:
    """The demo tool server's routes (see the module); `calls` counts calls, `active` the ones running now and
    `cancelled` the ones whose client left before the answer."""

    def __init__(self, *, test_tools: bool = False) -> None:
        self._operations = {**_OPERATIONS, **(_TEST_OPERATIONS if test_tools else {})}
        self.calls: list[tuple[str, Any]] = []
        self.active = 0
        self.cancelled = 0
        self.memory: dict[str, list[str]] = {}  # namespace -> snippets (the memory tools)
        self.memory_delay_s = 0.0  # a slow memory, for tests

    def document(self) -> dict[str, Any]:
        """The OpenAPI document (as mcpo shapes it: one POST per tool, a JSON body schema per tool)."""
        paths = {}
        schemas = {}
        for name, op in self._operations.items():
            form = f"{name}_form_model"
            schemas[form] = {"type": "object", "properties": op["properties"], "required": op["required"]}
            paths[f"/{name}"] = {
                "post": {
                    "summary": op["summary"],
                    "description": op["description"],
                    "operationId": f"tool_{name}_post",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{form}"}}},
                    },
                    "responses": {"200": {"description": "Successful Response"}},
                }
            }
        info = {"title": "QueueGate demo tools", "version": "1.0"}
        return {"openapi": "3.1.0", "info": info, "paths": paths, "components": {"schemas": schemas}}

    def names(self) -> list[str]:
        return list(self._operations)

    async def call(self, name: str, body: Any) -> tuple[int, bytes, str]:
        """(status, body, content type) of one call."""
        self.calls.append((name, body))
        self.active += 1
        try:
            return await self._answer(name, body if isinstance(body, dict) else {})
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _answer(self, name: str, body: dict[str, Any]) -> tuple[int, bytes, str]:
        json = "application/json"
        if name == "get_current_time":
            try:
                zone = zoneinfo.ZoneInfo(str(body.get("timezone", "UTC")))
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                return 422, msgspec.json.encode({"detail": f"unknown timezone {body.get('timezone')!r}"}), json
            now = datetime.datetime.now(zone).isoformat(timespec="seconds")
            return 200, msgspec.json.encode({"timezone": str(zone), "datetime": now}), json
        if name == "calculate":
            try:
                value = _evaluate(ast.parse(str(body.get("expression", "")), mode="eval").body)
            except (SyntaxError, ValueError, ZeroDivisionError) as exc:
                return 422, msgspec.json.encode({"detail": f"cannot calculate: {exc}"}), json
            return 200, msgspec.json.encode({"expression": body.get("expression"), "result": value}), json
        if name == "sleep":
            await trio.sleep(float(body.get("seconds", 1)))
            return 200, msgspec.json.encode({"slept": body.get("seconds")}), json
        if name in ("memory_query", "memory_upsert"):
            await trio.sleep(self.memory_delay_s)
            snippets = self.memory.setdefault(str(body.get("namespace")), [])
            if name == "memory_upsert":
                snippets.append(str(body.get("text", "")))
                return 200, b'{"ok":true}', json
            words = set(str(body.get("query", "")).lower().split())
            ranked = sorted(snippets, key=lambda text: -len(words & set(text.lower().split())))
            return 200, msgspec.json.encode([{"text": t} for t in ranked[: int(body.get("k", 8))]]), json
        if name == "fail":
            return 500, msgspec.json.encode({"detail": "the tool failed"}), json
        if name == "garbage":
            return 200, b"{not json", json
        return 200, msgspec.json.encode("x" * int(body.get("size", 100))), json


def _evaluate(node: ast.AST) -> float:
    """An arithmetic expression's value: numbers, + - * / and parentheses only (never eval)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("only numbers, + - * / and parentheses")
