"""OpenAPI documents as function tools and tool calls as HTTP requests (pure): mcpo's and FastAPI's shapes, name
clashes, $refs nested and recursive, what cannot be a tool, garbage documents, and every way arguments go wrong."""

from __future__ import annotations

import copy

import pytest

from queuegate.tools.openapi import (
    HttpCall,
    Operation,
    ToolArgumentError,
    http_call,
    operations,
)

VALIDATION_ERROR = {"$ref": "#/components/schemas/HTTPValidationError"}

TIMEZONE_HELP = (
    "IANA timezone name (e.g., 'America/New_York', 'Europe/London'). "
    "Use 'UTC' as local timezone if no timezone provided by the user."
)


def mcpo_post(tool: str, summary: str, description: str) -> dict:
    """One MCP tool as mcpo 0.0.20 serves it: POST /<tool> with a required JSON form model."""
    return {
        "post": {
            "summary": summary,
            "description": description,
            "operationId": f"tool_{tool}_post",
            "requestBody": {
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{tool}_form_model"}}},
                "required": True,
            },
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": {"application/json": {"schema": {"title": "Response Tool"}}},
                },
                "422": {
                    "description": "Validation Error",
                    "content": {"application/json": {"schema": VALIDATION_ERROR}},
                },
            },
        }
    }


MCPO_TIME = {
    "openapi": "3.1.0",
    "info": {"title": "mcp-time", "description": "mcp-time MCP Server", "version": "1.0"},
    "paths": {
        "/get_current_time": mcpo_post(
            "get_current_time", "Get Current Time", "Get current time in a specific timezones"
        ),
        "/convert_time": mcpo_post("convert_time", "Convert Time", "Convert time between timezones"),
    },
    "components": {
        "schemas": {
            "get_current_time_form_model": {
                "properties": {"timezone": {"type": "string", "title": "Timezone", "description": TIMEZONE_HELP}},
                "type": "object",
                "required": ["timezone"],
                "title": "get_current_time_form_model",
            },
            "convert_time_form_model": {
                "properties": {
                    "source_timezone": {
                        "type": "string",
                        "title": "Source Timezone",
                        "description": "Source IANA timezone name (e.g., 'America/New_York', 'Europe/London').",
                    },
                    "time": {"type": "string", "title": "Time", "description": "Time to convert in 24-hour format"},
                    "target_timezone": {
                        "type": "string",
                        "title": "Target Timezone",
                        "description": "Target IANA timezone name (e.g., 'Asia/Tokyo', 'America/San_Francisco').",
                    },
                },
                "type": "object",
                "required": ["source_timezone", "time", "target_timezone"],
                "title": "convert_time_form_model",
            },
            "HTTPValidationError": {
                "properties": {"detail": {"items": {"$ref": "#/components/schemas/ValidationError"}, "type": "array"}},
                "type": "object",
                "title": "HTTPValidationError",
            },
            "ValidationError": {
                "properties": {"msg": {"type": "string", "title": "Message"}},
                "type": "object",
                "required": ["msg"],
                "title": "ValidationError",
            },
        }
    },
}


def by_name(document) -> dict[str, Operation]:
    found, warnings = operations(document)
    assert warnings == []
    return {op.name: op for op in found}


# (1) mcpo


def test_mcpo_tools_are_named_after_their_paths_with_the_form_model_as_parameters():
    found, warnings = operations(MCPO_TIME)
    assert warnings == []
    assert [op.name for op in found] == ["get_current_time", "convert_time"]
    now = found[0]
    assert now.tool() == {
        "type": "function",
        "function": {
            "name": "get_current_time",
            "description": "Get Current Time\n\nGet current time in a specific timezones",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "title": "Timezone", "description": TIMEZONE_HELP}},
                "required": ["timezone"],
            },
        },
    }
    assert (now.method, now.path, now.path_params, now.query_params, now.body) == (
        "post",
        "/get_current_time",
        (),
        (),
        "properties",
    )
    convert = found[1]
    assert list(convert.parameters["properties"]) == ["source_timezone", "time", "target_timezone"]
    assert convert.parameters["required"] == ["source_timezone", "time", "target_timezone"]


def test_mcpo_call_becomes_a_post_with_the_form_as_json_body():
    now, convert = operations(MCPO_TIME)[0]
    call = http_call(convert, {"source_timezone": "Europe/London", "time": "16:30", "target_timezone": "Asia/Tokyo"})
    assert call == HttpCall(
        method="post",
        path="/convert_time",
        query={},
        json={"source_timezone": "Europe/London", "time": "16:30", "target_timezone": "Asia/Tokyo"},
    )
    invented = http_call(now, {"timezone": "UTC", "format": "iso", "verbose": None})
    assert invented.json == {"timezone": "UTC"}


def test_the_document_is_left_as_it_was():
    document = copy.deepcopy(MCPO_TIME)
    found, _ = operations(document)
    found[0].parameters["properties"]["timezone"]["description"] = "changed"
    assert document == MCPO_TIME


# (2) FastAPI


CALCULATOR = {
    "openapi": "3.1.0",
    "info": {"title": "Calculator", "version": "0.1.0"},
    "paths": {
        "/add": {
            "get": {
                "summary": "Add",
                "description": "Add two numbers.",
                "operationId": "add_add_get",
                "parameters": [
                    {"name": "a", "in": "query", "required": True, "schema": {"type": "number", "title": "A"}},
                    {
                        "name": "b",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "number", "title": "B"},
                        "description": "The second number",
                    },
                    {
                        "name": "round",
                        "in": "query",
                        "required": False,
                        "schema": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Round"},
                    },
                ],
                "responses": {"200": {"description": "Successful Response"}},
            }
        },
        "/items/{item_id}": {
            "get": {
                "summary": "Read Item",
                "operationId": "read_item_items__item_id__get",
                "parameters": [
                    {"name": "item_id", "in": "path", "required": True, "schema": {"type": "integer"}},
                    {"name": "q", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "tags", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
                ],
                "responses": {"200": {"description": "Successful Response"}},
            }
        },
        "/files/{path}": {
            "get": {
                "summary": "Read File",
                "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "ok"}},
            }
        },
    },
}


def test_fastapi_query_and_path_parameters_become_properties():
    tools = by_name(CALCULATOR)
    assert list(tools) == ["add", "items", "files"]
    add = tools["add"]
    assert add.description == "Add\n\nAdd two numbers."
    assert add.parameters == {
        "type": "object",
        "properties": {
            "a": {"type": "number", "title": "A"},
            "b": {"type": "number", "title": "B", "description": "The second number"},
            "round": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Round"},
        },
        "required": ["a", "b"],
    }
    assert (add.method, add.query_params, add.path_params, add.body) == ("get", ("a", "b", "round"), (), None)
    item = tools["items"]
    assert item.description == "Read Item"
    assert (item.path_params, item.query_params) == (("item_id",), ("q", "tags"))
    assert item.parameters["required"] == ["item_id"]


def test_fastapi_calls_fill_the_query_and_the_path():
    tools = by_name(CALCULATOR)
    assert http_call(tools["add"], {"a": 2, "b": 2.5, "round": None}) == HttpCall(
        method="get", path="/add", query={"a": "2", "b": "2.5"}, json=None
    )
    call = http_call(tools["items"], {"item_id": 42, "q": "red shoes", "tags": ["a", 1, True, None], "x": 1})
    assert call == HttpCall(
        method="get", path="/items/42", query={"q": "red shoes", "tags": ["a", "1", "true"]}, json=None
    )
    assert http_call(tools["files"], {"path": "a/b c?.txt"}).path == "/files/a%2Fb%20c%3F.txt"
    assert http_call(tools["files"], {"path": True}).path == "/files/true"


def test_query_objects_and_booleans_are_rendered_as_strings():
    tools = by_name(CALCULATOR)
    call = http_call(tools["items"], {"item_id": "x", "q": {"k": [1, "v"]}, "tags": [{"a": 1}, False]})
    assert call.query == {"q": '{"k":[1,"v"]}', "tags": ['{"a":1}', "false"]}


# (3) names


def test_clashing_names_take_the_operation_id_or_the_method():
    document = {
        "openapi": "3.0.3",
        "paths": {
            "/items": {
                "get": {"operationId": "list_items", "responses": {}},
                "post": {"operationId": "create item!", "responses": {}},
            },
            "/items/{id}": {
                "get": {"parameters": [{"name": "id", "in": "path", "required": True}], "responses": {}},
                "delete": {"operationId": "dup", "responses": {}},
            },
            "/other": {"get": {"operationId": "dup", "responses": {}}},
            "/": {"get": {"operationId": "root", "responses": {}}, "post": {"responses": {}}},
            "/notes": {"get": {"responses": {}}},
            "/v1/notes.search": {"get": {"operationId": "notes", "responses": {}}},
        },
    }
    found, warnings = operations(document)
    assert warnings == []
    names = [(op.method, op.path, op.name) for op in found]
    assert names == [
        ("get", "/items", "list_items"),
        ("post", "/items", "create_item_"),
        ("get", "/items/{id}", "items_get"),  # no operationId
        ("delete", "/items/{id}", "items_delete"),  # its operationId is not unique
        ("get", "/other", "other"),  # no clash: its path's name
        ("get", "/", "root"),
        ("post", "/", "post"),
        ("get", "/notes", "notes"),
        ("get", "/v1/notes.search", "v1_notes_search"),
    ]
    assert found[6].description == "POST /"
    # a path param undeclared in the document is still required, as a string
    assert found[3].parameters == {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}


def test_fallback_names_never_clash_and_stay_within_64_characters():
    long = "/" + "a" * 80
    document = {
        "paths": {
            "/items": {"get": {"responses": {}}},
            "/items/{id}": {"get": {"responses": {}}},
            "/items/get": {"get": {"responses": {}}},
            long: {"get": {}, "post": {}},
        }
    }
    found, _ = operations(document)
    names = [op.name for op in found]
    assert names[:3] == ["items_get_2", "items_get_3", "items_get"]
    assert names[3:] == ["a" * 60 + "_get", "a" * 59 + "_post"]
    assert len(set(names)) == len(names)
    assert all(len(name) <= 64 for name in names)


def test_description_prefers_description_over_the_same_summary_and_is_capped():
    document = {
        "paths": {
            "/a": {"get": {"summary": " Search the web ", "description": "search the web"}},
            "/b": {"get": {"summary": "Long", "description": "x" * 2000}},
            "/c": {"get": {"summary": 7, "description": ["no"]}},
        }
    }
    a, b, c = operations(document)[0]
    assert a.description == "search the web"
    assert b.description == "Long\n\n" + "x" * 1018
    assert c.description == "GET /c"


# (4) $refs


def test_nested_refs_and_escaped_pointers_resolve():
    document = {
        "paths": {
            "/orders/{order_id}": {
                "parameters": [{"$ref": "#/components/parameters/OrderId"}],
                "put": {
                    "parameters": [{"$ref": "#/components/parameters/Dry~1Run"}],
                    "requestBody": {"$ref": "#/components/requestBodies/Order"},
                },
            }
        },
        "components": {
            "parameters": {
                "OrderId": {"name": "order_id", "in": "path", "required": True, "schema": {"$ref": "#/$defs/Id"}},
                "Dry/Run": {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}},
            },
            "requestBodies": {
                "Order": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}},
                }
            },
            "schemas": {
                "Order": {
                    "type": "object",
                    "required": ["lines", "unknown"],
                    "properties": {
                        "lines": {"type": "array", "items": {"$ref": "#/components/schemas/Line"}},
                        "note": {"$ref": "#/components/schemas/Note", "description": "for the courier"},
                    },
                },
                "Line": {"type": "object", "properties": {"sku": {"$ref": "#/$defs/Id"}, "qty": {"type": "integer"}}},
                "Note": {"type": "string", "description": "free text"},
            },
        },
        "$defs": {"Id": {"type": "string", "pattern": "^[A-Z0-9]+$"}},
    }
    (order,) = by_name(document).values()
    assert order.name == "orders"
    assert order.parameters == {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z0-9]+$"},
            "dry_run": {"type": "boolean"},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "pattern": "^[A-Z0-9]+$"}, "qty": {"type": "integer"}},
                },
            },
            "note": {"type": "string", "description": "for the courier"},
        },
        "required": ["order_id", "lines"],
    }
    assert (order.path_params, order.query_params, order.body) == (("order_id",), ("dry_run",), "properties")
    call = http_call(order, {"order_id": "A1", "dry_run": False, "lines": [{"sku": "B2", "qty": 3}]})
    assert call == HttpCall(
        method="put",
        path="/orders/A1",
        query={"dry_run": "false"},
        json={"lines": [{"sku": "B2", "qty": 3}]},
    )


def test_a_recursive_ref_is_expanded_once_then_becomes_any_object():
    document = {
        "paths": {
            "/tree": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}},
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
                        "parent": {"$ref": "#/components/schemas/Parent"},
                    },
                    "required": ["name"],
                },
                "Parent": {"$ref": "#/components/schemas/Node"},
            }
        },
    }
    (tree,) = by_name(document).values()
    assert tree.parameters == {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "children": {"type": "array", "items": {"type": "object"}},
            "parent": {"type": "object"},
        },
        "required": ["name"],
    }


def test_refs_that_cannot_be_followed_leave_their_operation_out():
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    document = {
        "paths": {
            "/remote": {
                "post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "other.yaml#/X"}}}}}
            },
            "/missing": {"get": {"parameters": [{"$ref": "#/components/parameters/Nope"}]}},
            "/loop": {"get": {"parameters": [{"$ref": "#/components/parameters/Loop"}]}},
            "/ok": {"post": {"requestBody": {"content": {"application/json": {"schema": schema}}}}},
        },
        "components": {"parameters": {"Loop": {"$ref": "#/components/parameters/Loop"}}},
    }
    found, warnings = operations(document)
    assert [op.name for op in found] == ["ok"]
    assert warnings == [
        "POST /remote: left out: $ref 'other.yaml#/X' points outside the document",
        "GET /missing: left out: $ref '#/components/parameters/Nope' points to nothing",
        "GET /loop: left out: $ref '#/components/parameters/Loop' leads back to itself",
    ]


def test_refs_that_fan_out_exponentially_are_cut_off():
    schemas = {f"L{i}": {"type": "array", "items": [{"$ref": f"#/s/L{i + 1}"}] * 2} for i in range(30)}
    schemas["L30"] = {"type": "string"}
    document = {
        "s": schemas,
        "paths": {"/big": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/s/L0"}}}}}}},
    }
    found, warnings = operations(document)
    assert found == []
    assert warnings == ["POST /big: left out: its schema expands to more than 20000 nodes"]


# (5) what cannot be a tool


def test_header_and_cookie_parameters():
    document = {
        "paths": {
            "/search": {
                "get": {
                    "parameters": [
                        {"name": "q", "in": "query", "required": True, "schema": {"type": "string"}},
                        {"name": "X-Trace", "in": "header", "schema": {"type": "string"}},
                        {"name": "session", "in": "cookie", "required": False},
                    ]
                }
            },
            "/secure": {"get": {"parameters": [{"name": "X-Api-Key", "in": "header", "required": True}]}},
            "/legacy": {"post": {"parameters": [{"name": "data", "in": "body", "required": True}]}},
        }
    }
    found, warnings = operations(document)
    assert [op.name for op in found] == ["search"]
    assert found[0].parameters == {
        "type": "object",
        "properties": {"q": {"type": "string"}},
        "required": ["q"],
    }
    assert warnings == [
        "GET /secure: left out: it needs the header parameter 'X-Api-Key', which a tool call cannot send",
        "POST /legacy: left out: it needs the body parameter 'data', which a tool call cannot send",
    ]


def test_operation_parameters_override_the_path_items_by_name_and_place():
    document = {
        "paths": {
            "/users/{user_id}": {
                "parameters": [
                    {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "fields", "in": "query", "schema": {"type": "string"}},
                ],
                "get": {"parameters": [{"name": "fields", "in": "query", "required": True, "description": "csv"}]},
                "delete": {"deprecated": True},
            }
        }
    }
    found, warnings = operations(document)
    assert warnings == []
    get, delete = found
    assert (get.name, delete.name) == ("users_get", "users_delete")
    assert get.parameters["properties"]["fields"] == {"type": "string", "description": "csv"}
    assert get.parameters["required"] == ["user_id", "fields"]
    assert delete.parameters["required"] == ["user_id"]
    assert http_call(delete, {"user_id": "ann"}) == HttpCall(method="delete", path="/users/ann", query={}, json=None)


def test_request_bodies_json_or_not():
    form = {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}
    document = {
        "paths": {
            "/upload": {"post": {"requestBody": {"required": True, "content": {"multipart/form-data": {}}}}},
            "/form": {"post": {"requestBody": {"content": form}}},
            "/patch": {
                "patch": {
                    "requestBody": {
                        "required": True,
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/merge-patch+json; charset=utf-8": {
                                "schema": {"type": "object", "properties": {"title": {"type": "string"}}}
                            },
                        },
                    }
                }
            },
        }
    }
    found, warnings = operations(document)
    assert warnings == [
        "POST /upload: left out: its request body is not JSON (application/json or */*+json)",
    ]
    form_op, patch = found
    assert (form_op.name, form_op.body, form_op.parameters) == ("form", None, {"type": "object", "properties": {}})
    assert patch.body == "properties"
    assert patch.parameters == {"type": "object", "properties": {"title": {"type": "string"}}}
    assert http_call(patch, {}).json == {}


def test_a_body_that_is_not_an_object_with_properties_is_the_parameter_body():
    def post(schema, required=True, description=None):
        body = {"required": required, "content": {"application/json": {"schema": schema}}}
        if description:
            body["description"] = description
        return {"post": {"requestBody": body}}

    document = {
        "paths": {
            "/batch": post({"type": "array", "items": {"type": "integer"}}, description="ids to fetch"),
            "/echo": post({"type": "object", "additionalProperties": True}, required=False),
            "/either": post({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
        }
    }
    tools = by_name(document)
    batch = tools["batch"]
    assert batch.body == "whole"
    assert batch.parameters == {
        "type": "object",
        "properties": {"body": {"type": "array", "items": {"type": "integer"}, "description": "ids to fetch"}},
        "required": ["body"],
    }
    assert http_call(batch, {"body": [1, 2]}) == HttpCall(method="post", path="/batch", query={}, json=[1, 2])
    echo = tools["echo"]
    assert echo.body == "whole"
    assert "required" not in echo.parameters
    assert http_call(echo, {}).json is None
    assert http_call(echo, {"body": {"k": "v"}}).json == {"k": "v"}
    assert tools["either"].parameters["properties"]["body"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}


def test_clashes_between_parameters_and_the_body_leave_the_operation_out():
    body_with = {"content": {"application/json": {"schema": {"type": "object", "properties": {"id": {}, "n": {}}}}}}
    document = {
        "paths": {
            "/a/{id}": {"put": {"requestBody": body_with}},
            "/b": {
                "post": {
                    "parameters": [{"name": "body", "in": "query"}],
                    "requestBody": {"content": {"application/json": {"schema": {"type": "string"}}}},
                }
            },
            "/c/{id}": {"get": {"parameters": [{"name": "id", "in": "path"}, {"name": "id", "in": "query"}]}},
        }
    }
    found, warnings = operations(document)
    assert found == []
    assert warnings == [
        "PUT /a/{id}: left out: its body property 'id' has the name of a path or query parameter",
        "POST /b: left out: a parameter is named 'body', the name its whole request body would take",
        "GET /c/{id}: left out: two parameters are named 'id'",
    ]


def test_an_optional_body_does_not_require_its_properties():
    schema = {"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a"]}
    document = {"paths": {"/x": {"post": {"requestBody": {"content": {"application/json": {"schema": schema}}}}}}}
    (x,) = operations(document)[0]
    assert "required" not in x.parameters
    assert http_call(x, {"b": 1}).json == {"b": 1}


@pytest.mark.parametrize(
    ("document", "warning"),
    [
        (None, "the document is not a JSON object"),
        ([1, 2], "the document is not a JSON object"),
        ({"openapi": "3.1.0"}, "the document has no `paths` object"),
        ({"paths": ["/a"]}, "the document has no `paths` object"),
    ],
)
def test_garbage_documents_give_a_warning_not_an_exception(document, warning):
    assert operations(document) == ([], [warning])


def test_garbage_inside_a_document_costs_only_its_own_operations():
    document = {
        "paths": {
            "/a": "nope",
            "/b": {"get": 3, "post": {"parameters": {"name": "x"}}, "put": {"parameters": [{"in": "query"}]}},
            "/c": {"patch": {"requestBody": "yes"}, "head": {}, "x-extension": {}, "summary": "c"},
            "/d": {"get": {"parameters": [{"name": "n", "in": "query", "schema": 5}]}},
            "/e": {"get": {"responses": "whatever", "tags": 3}},
        }
    }
    found, warnings = operations(document)
    assert [op.name for op in found] == ["d", "e"]
    assert found[0].parameters == {"type": "object", "properties": {"n": {}}}
    assert warnings == [
        "/a: left out: the path item is not an object",
        "GET /b: left out: the operation is not an object",
        "POST /b: left out: its `parameters` is not a list",
        "PUT /b: left out: a parameter has no `name` or no `in`",
        "PATCH /c: left out: its `requestBody` is not an object",
        "HEAD /c: left out: only get, post, put, patch, delete are supported",
    ]


def test_a_deeply_nested_schema_is_left_out():
    schema: dict = {"type": "string"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    document = {"paths": {"/deep": {"post": {"requestBody": {"content": {"application/json": {"schema": schema}}}}}}}
    assert operations(document) == ([], ["POST /deep: left out: its schema is nested too deeply"])


# (6) arguments that cannot make a request


def test_arguments_must_be_an_object():
    (now, _) = operations(MCPO_TIME)[0]
    for arguments in (None, "UTC", ["UTC"], 3):
        with pytest.raises(ToolArgumentError, match=r"^arguments must be a JSON object$"):
            http_call(now, arguments)


def test_missing_required_arguments_are_named():
    tools = by_name(CALCULATOR)
    with pytest.raises(ToolArgumentError, match=r"^missing required arguments: a, b$"):
        http_call(tools["add"], {"c": 1})
    with pytest.raises(ToolArgumentError, match=r"^missing required argument: item_id$"):
        http_call(tools["items"], {"item_id": None, "q": "x"})
    (_, convert) = operations(MCPO_TIME)[0]
    with pytest.raises(ToolArgumentError, match=r"^missing required argument: time$"):
        http_call(convert, {"source_timezone": "UTC", "target_timezone": "UTC"})
    batch = Operation(
        name="batch",
        description="",
        parameters={"type": "object", "properties": {"body": {}}, "required": ["body"]},
        method="post",
        path="/batch",
        path_params=(),
        query_params=(),
        body="whole",
    )
    with pytest.raises(ToolArgumentError, match=r"^missing required argument: body$"):
        http_call(batch, {"body": None})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"id": 1}, "^path parameter 'item_id' must be a string or a number$"),
        ([1], "^path parameter 'item_id' must be a string or a number$"),
        ("", "^path parameter 'item_id' cannot be ''$"),
        ("..", r"^path parameter 'item_id' cannot be '\.\.'$"),
    ],
)
def test_path_parameters_must_be_scalars_that_stay_in_their_segment(value, message):
    item = by_name(CALCULATOR)["items"]
    with pytest.raises(ToolArgumentError, match=message):
        http_call(item, {"item_id": value})
    assert http_call(item, {"item_id": "../admin"}).path == "/items/..%2Fadmin"
    assert http_call(item, {"item_id": 1.5}).path == "/items/1.5"
