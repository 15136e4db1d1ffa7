"""An OpenAPI tool server's document as OpenAI function tools, and a model's tool call as the HTTP request to make.

Tool servers (mcpo in front of an MCP server, any FastAPI app: what Open WebUI mounts) describe their tools as an
OpenAPI 3.x document. Each get/post/put/patch/delete operation becomes one function tool named as a person would name
it: mcpo serves the MCP tool `get_current_time` as `POST /get_current_time`, so the tool is `get_current_time`, not the
generated operationId. Path and query parameters and the JSON body's properties become the function's parameters; a
body that is not an object with properties is the one parameter `body`.

What cannot be a tool (a required header, cookie or non-JSON body, a $ref outside the document, a name clash between a
parameter and a body property, a malformed operation) is left out with a warning saying why: one bad operation or a
garbage document never costs the others. Pure code, no I/O: the caller fetches the document and makes the request.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote

import msgspec

METHODS = ("get", "post", "put", "patch", "delete")
NAME_LIMIT = 64  # OpenAI's limit on a function's name
DESCRIPTION_LIMIT = 1024
SCHEMA_NODE_LIMIT = 20_000  # per operation, after $ref expansion: a bound on documents whose refs fan out

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_TEMPLATE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of the document as a function tool, and how to call it."""

    name: str  # the tool's name as the model sees it
    description: str
    parameters: dict[str, Any]  # JSON schema, type object, $refs resolved (the function's "parameters")
    method: str  # lower case: "get", "post", ...
    path: str  # path template as in the document, e.g. "/items/{item_id}"
    path_params: tuple[str, ...]
    query_params: tuple[str, ...]
    body: str | None  # None: no body; "properties": merged into `parameters`; "whole": the parameter "body"

    def tool(self) -> dict[str, Any]:
        """The OpenAI function tool (it shares `parameters` with this operation)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


class ToolArgumentError(ValueError):
    """The model's arguments cannot make a request (the message says why, for the model to read)."""


@dataclass(frozen=True, slots=True)
class HttpCall:
    """The HTTP request a tool call makes, relative to the tool server's base URL."""

    method: str
    path: str  # path params substituted and percent-encoded
    query: dict[str, str | list[str]]
    json: Any  # the JSON body, or None when the operation has no body (send no body then)


class _LeftOut(Exception):
    """Why an operation cannot be a tool (the warning's text)."""


def operations(document: Any) -> tuple[list[Operation], list[str]]:
    """The operations of an OpenAPI document as tools, and warnings for the ones left out (with why)."""
    if not isinstance(document, dict):
        return [], ["the document is not a JSON object"]
    paths = document.get("paths")
    if not isinstance(paths, dict):
        return [], ["the document has no `paths` object"]
    drafts: list[tuple[Operation, str]] = []
    warnings: list[str] = []
    for path, item in paths.items():
        try:
            if not isinstance(path, str):
                raise _LeftOut("the path is not a string")
            item = _Refs(document).follow(item)
            if not isinstance(item, dict):
                raise _LeftOut("the path item is not an object")
        except _LeftOut as exc:
            warnings.append(f"{path}: left out: {exc}")
            continue
        for method, operation in item.items():
            if method in ("head", "options", "trace"):
                warnings.append(f"{method.upper()} {path}: left out: only {', '.join(METHODS)} are supported")
            if method not in METHODS:
                continue
            try:
                drafts.append(_draft(document, path, method, operation, item.get("parameters")))
            except _LeftOut as exc:
                warnings.append(f"{method.upper()} {path}: left out: {exc}")
            except RecursionError:
                warnings.append(f"{method.upper()} {path}: left out: its schema is nested too deeply")
    return _named(drafts), warnings


def http_call(operation: Operation, arguments: Any) -> HttpCall:
    """The request for a call with these arguments (ToolArgumentError: not an object, a required one missing, a path
    param not a scalar). Arguments not in the schema are ignored; a None value counts as absent."""
    if not isinstance(arguments, dict):
        raise ToolArgumentError("arguments must be a JSON object")
    given = {name: value for name, value in arguments.items() if value is not None}
    missing = [name for name in operation.parameters.get("required", ()) if name not in given]
    if missing:
        raise ToolArgumentError(f"missing required argument{'s' * (len(missing) > 1)}: {', '.join(missing)}")
    path = _TEMPLATE.sub(lambda match: _path_value(match.group(1), given), operation.path)
    query = {name: _query_value(given[name]) for name in operation.query_params if name in given}
    body: Any = None
    if operation.body == "properties":
        fixed = {*operation.path_params, *operation.query_params}
        properties = operation.parameters["properties"]
        body = {name: value for name, value in given.items() if name in properties and name not in fixed}
    elif operation.body == "whole":
        body = given.get("body")
    return HttpCall(method=operation.method, path=path, query=query, json=body)


class _Refs:
    """The document's local $refs, resolved; one per operation (it counts the nodes that operation expands)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.budget = SCHEMA_NODE_LIMIT

    def target(self, ref: str) -> Any:
        """What a local ref (a JSON pointer in the fragment: "#/components/schemas/X") points to."""
        if not ref.startswith("#"):
            raise _LeftOut(f"$ref {ref!r} points outside the document")
        pointer = unquote(ref[1:])
        if pointer and not pointer.startswith("/"):
            raise _LeftOut(f"$ref {ref!r} is not a JSON pointer")
        node: Any = self.document
        for token in pointer.split("/")[1:]:
            key = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                raise _LeftOut(f"$ref {ref!r} points to nothing")
        return node

    def follow(self, node: Any) -> Any:
        """The object a chain of refs leads to, not looking inside it (parameters, request bodies, path items)."""
        seen: set[str] = set()
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen:
                raise _LeftOut(f"$ref {ref!r} leads back to itself")
            seen.add(ref)
            node = self.target(ref)
        return node

    def expand(self, schema: Any, stack: tuple[str, ...] = ()) -> Any:
        """A fresh copy of schema with its refs replaced by what they point to. A ref met again inside its own
        expansion becomes {"type": "object"}; keys beside a $ref apply over its target (OpenAPI 3.1)."""
        self.budget -= 1
        if self.budget < 0:
            raise _LeftOut(f"its schema expands to more than {SCHEMA_NODE_LIMIT} nodes")
        if isinstance(schema, list):
            return [self.expand(value, stack) for value in schema]
        if not isinstance(schema, dict):
            return schema
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return {key: self.expand(value, stack) for key, value in schema.items()}
        if ref in stack:
            return {"type": "object"}
        target = self.expand(self.target(ref), (*stack, ref))
        siblings = {key: self.expand(value, stack) for key, value in schema.items() if key != "$ref"}
        if not siblings:
            return target
        return {**target, **siblings} if isinstance(target, dict) else siblings


def _draft(document: dict[str, Any], path: str, method: str, operation: Any, shared: Any) -> tuple[Operation, str]:
    """The operation as a tool named after its path (names are settled later), and its sanitized operationId."""
    if not isinstance(operation, dict):
        raise _LeftOut("the operation is not an object")
    refs = _Refs(document)
    properties: dict[str, Any] = {}
    required: list[str] = []
    path_params: list[str] = []
    query_params: list[str] = []
    for param in _parameters(refs, shared, operation.get("parameters")):
        name, where = param["name"], param["in"]
        if where not in ("path", "query"):
            if param.get("required") is True:
                raise _LeftOut(f"it needs the {where} parameter {name!r}, which a tool call cannot send")
            continue
        if name in properties:
            raise _LeftOut(f"two parameters are named {name!r}")
        properties[name] = _parameter_schema(refs, param)
        if where == "path":
            path_params.append(name)
            required.append(name)
        else:
            query_params.append(name)
            if param.get("required") is True:
                required.append(name)
    for name in _TEMPLATE.findall(path):
        if name not in path_params:  # undeclared in the document: still needed to fill the path
            if name in properties:
                raise _LeftOut(f"the path's {{{name}}} has the name of a query parameter")
            properties[name] = {"type": "string"}
            path_params.append(name)
            required.append(name)
    body = _body(refs, operation.get("requestBody"), properties, required)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = list(dict.fromkeys(required))
    draft = Operation(
        name=_clean("_".join(part for part in path.split("/") if part and "{" not in part)),
        description=_description(operation, method, path),
        parameters=parameters,
        method=method,
        path=path,
        path_params=tuple(path_params),
        query_params=tuple(query_params),
        body=body,
    )
    operation_id = operation.get("operationId")
    return draft, _clean(operation_id) if isinstance(operation_id, str) else ""


def _parameters(refs: _Refs, shared: Any, own: Any) -> list[dict[str, Any]]:
    """The path item's parameters overridden by the operation's (same name and `in`), refs followed."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for group in (shared, own):
        if group is None:
            continue
        if not isinstance(group, list):
            raise _LeftOut("its `parameters` is not a list")
        for param in map(refs.follow, group):
            if not (
                isinstance(param, dict) and isinstance(param.get("name"), str) and isinstance(param.get("in"), str)
            ):
                raise _LeftOut("a parameter has no `name` or no `in`")
            merged[param["name"], param["in"]] = param
    return list(merged.values())


def _parameter_schema(refs: _Refs, param: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema (a string when it has none) with the parameter's description."""
    schema = refs.expand(param.get("schema", {"type": "string"}))
    schema = schema if isinstance(schema, dict) else {}
    description = _text(param.get("description"))
    if description:
        schema["description"] = description
    return schema


def _body(refs: _Refs, request: Any, properties: dict[str, Any], required: list[str]) -> str | None:
    """Add the JSON request body to properties and required; the Operation's `body`."""
    request = refs.follow(request)
    if request is None:
        return None
    if not isinstance(request, dict):
        raise _LeftOut("its `requestBody` is not an object")
    body_required = request.get("required") is True
    media = _json_media(request.get("content"))
    if media is None:
        if body_required:
            raise _LeftOut("its request body is not JSON (application/json or */*+json)")
        return None
    schema = refs.expand(media.get("schema", {}))
    schema = schema if isinstance(schema, dict) else {}
    fields = schema.get("properties")
    # An object with named properties, or one that declares none (a tool without arguments: its body is {}).
    declared = isinstance(fields, dict) and (bool(fields) or "additionalProperties" not in schema)
    if schema.get("type", "object") == "object" and declared:
        clash = [name for name in fields if name in properties]
        if clash:
            raise _LeftOut(f"its body property {clash[0]!r} has the name of a path or query parameter")
        properties.update(fields)
        names = schema.get("required")
        if body_required and isinstance(names, list):
            required.extend(name for name in names if name in fields)
        return "properties"
    if "body" in properties:
        raise _LeftOut("a parameter is named 'body', the name its whole request body would take")
    description = _text(request.get("description"))
    if description and "description" not in schema:
        schema["description"] = description
    properties["body"] = schema
    if body_required:
        required.append("body")
    return "whole"


def _json_media(content: Any) -> dict[str, Any] | None:
    """The media type object for JSON in a `content` map (application/json first, then any */*+json), or None."""
    if not isinstance(content, dict):
        return None
    kinds = {str(kind).split(";")[0].strip().lower(): media for kind, media in content.items()}
    chosen = [kinds[kind] for kind in kinds if kind == "application/json"]
    chosen += [kinds[kind] for kind in kinds if kind.endswith("+json")]
    if not chosen:
        return None
    return chosen[0] if isinstance(chosen[0], dict) else {}


def _description(operation: dict[str, Any], method: str, path: str) -> str:
    """summary and description (one when they say the same), else "<METHOD> <path>"; at most DESCRIPTION_LIMIT."""
    summary, detail = _text(operation.get("summary")), _text(operation.get("description"))
    if summary and detail and summary.casefold() != detail.casefold():
        text = f"{summary}\n\n{detail}"
    else:
        text = detail or summary or f"{method.upper()} {path}"
    return text[:DESCRIPTION_LIMIT].rstrip()


def _named(drafts: list[tuple[Operation, str]]) -> list[Operation]:
    """Give each operation its tool name: its path's name; when names clash, the operationId (when unique), else
    the name plus "_<method>", plus "_2", "_3"... if even that is taken."""
    first = [draft.name or operation_id or draft.method for draft, operation_id in drafts]
    counts = Counter(first)
    ids = Counter(operation_id for _, operation_id in drafts if operation_id)
    taken = {name for name in first if counts[name] == 1}
    named = []
    for (draft, operation_id), name in zip(drafts, first, strict=True):
        if counts[name] > 1:
            if operation_id and ids[operation_id] == 1 and operation_id not in counts and operation_id not in taken:
                name = operation_id
            else:
                name = _fit(name, f"_{draft.method}")
            stem, number = name, 1
            while name in taken:
                number += 1
                name = _fit(stem, f"_{number}")
            taken.add(name)
        named.append(replace(draft, name=name))
    return named


def _clean(name: str) -> str:
    """A name OpenAI accepts: [A-Za-z0-9_-], at most NAME_LIMIT characters."""
    return _UNSAFE.sub("_", name)[:NAME_LIMIT]


def _fit(stem: str, suffix: str) -> str:
    """stem + suffix, the stem cut so the whole stays within NAME_LIMIT."""
    return stem[: NAME_LIMIT - len(suffix)] + suffix


def _text(value: Any) -> str:
    """A string field of the document, trimmed ("" when it is not a string)."""
    return value.strip() if isinstance(value, str) else ""


def _scalar(value: Any) -> str | None:
    """A JSON scalar as a URL value (bool as "true"/"false"); None when it is not one."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _path_value(name: str, given: dict[str, Any]) -> str:
    """A path parameter's argument, percent-encoded for its place in the path."""
    if name not in given:
        raise ToolArgumentError(f"missing required argument: {name}")
    text = _scalar(given[name])
    if text is None:
        raise ToolArgumentError(f"path parameter {name!r} must be a string or a number")
    if text in ("", ".", ".."):  # would name another path on the tool server
        raise ToolArgumentError(f"path parameter {name!r} cannot be {text!r}")
    return quote(text, safe="")


def _query_value(value: Any) -> str | list[str]:
    """A query argument: a scalar as a string, a list as strings (one `name=` each), anything else as JSON."""
    if isinstance(value, list):
        return [_query_item(item) for item in value if item is not None]
    return _query_item(value)


def _query_item(value: Any) -> str:
    """One query value as a string: a scalar as itself, an object or list as JSON."""
    text = _scalar(value)
    return msgspec.json.encode(value).decode() if text is None else text
