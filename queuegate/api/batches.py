"""The routes of OpenAI's Files and Batches APIs (`client.files.*`, `client.batches.*`): they translate HTTP to the
batch service and back. Every file and batch belongs to the API key that created it; another key gets 404."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException

from queuegate.accounting.keys import ApiKey, KeyRing
from queuegate.api._http import error_response, json_response, request_id
from queuegate.batches.service import BatchService
from queuegate.errors import BadRequest, GatewayError, NotFound

MAX_LIST = 100  # items per page of a list
CONTENT_PIECE = 2**16  # a file's content is sent in pieces of this size


class _CreateBatch(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def upload_request_class(upload_limit: int) -> type[TrioRequest]:
    """The app's request class: an upload (POST /v1/files) may be as large as `[batches].max_file_mb`, every other
    request as `[server].max_body_mb`."""

    class Request(TrioRequest):
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
            if method == "POST" and path == "/v1/files":
                kwargs["max_content_length"] = upload_limit
            super().__init__(method, scheme, path, *args, **kwargs)
            if method == "POST" and path == "/v1/files":
                self._max_content_length = upload_limit  # (what a 413 says the limit is)

    return Request


def add_batch_routes(
    app: QuartTrio, keyring: KeyRing, service: BatchService, read_body: Callable[[], Awaitable[bytes]]
) -> None:
    def route(path: str, method: str) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
        """A route answering the handler's document as JSON (a Response as it is), errors in OpenAI's envelope;
        the handler gets the caller's key first."""

        def decorate(handler: Callable[..., Awaitable[Any]]) -> Any:
            async def answer(**parts: str) -> Response:
                rid = request_id(request.headers.get("x-request-id"))
                try:
                    result = await handler(keyring.authenticate(request.headers), **parts)
                except GatewayError as exc:
                    return error_response(exc, rid)
                return result if isinstance(result, Response) else json_response(result)

            answer.__name__ = handler.__name__
            return app.route(path, methods=[method])(answer)

        return decorate

    @route("/v1/files", "POST")
    async def upload_file(key: ApiKey | None) -> Any:
        if request.content_length is None:  # (a chunked body could not be refused before it is all read)
            raise GatewayError("an upload needs a Content-Length", status=411, code="length_required")
        try:
            form, files = await request.form, await request.files
        except (HTTPException, ValueError) as exc:  # (a body too large, too slow, or not multipart)
            raise _http_error(exc) from None
        upload = files.get("file")
        if upload is None:
            raise BadRequest("send the file as multipart/form-data field `file` (and `purpose`)", param="file")
        content = await trio.to_thread.run_sync(upload.read)
        return await service.add_file(key, upload.filename or "", form.get("purpose", ""), content)

    @route("/v1/files", "GET")
    async def list_files(key: ApiKey | None) -> Any:
        limit, after = _page()
        found = await service.files(key, request.args.get("purpose"), limit + 1, after)
        return _list(found, limit)

    @route("/v1/files/<file_id>", "GET")
    async def get_file(key: ApiKey | None, file_id: str) -> Any:
        return await service.file(key, file_id)

    @route("/v1/files/<file_id>", "DELETE")
    async def delete_file(key: ApiKey | None, file_id: str) -> Any:
        return await service.delete_file(key, file_id)

    @route("/v1/files/<file_id>/content", "GET")
    async def file_content(key: ApiKey | None, file_id: str) -> Any:
        path = await service.file_path(key, file_id)
        try:
            opened = await trio.open_file(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"no file {file_id!r}", param="file_id") from None
        size = (await trio.Path(path).stat()).st_size

        async def pieces() -> AsyncIterator[bytes]:  # (an output file may be large: it is never read whole)
            async with opened:
                while piece := await opened.read(CONTENT_PIECE):
                    yield piece

        headers = {"content-type": "application/octet-stream", "content-length": str(size)}
        return Response(pieces(), headers=headers)

    @route("/v1/batches", "POST")
    async def create_batch(key: ApiKey | None) -> Any:
        try:
            asked = msgspec.json.decode(await read_body(), type=_CreateBatch)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"not a batch request: {exc}") from None
        return await service.create(key, asked.input_file_id, asked.endpoint, asked.completion_window, asked.metadata)

    @route("/v1/batches", "GET")
    async def list_batches(key: ApiKey | None) -> Any:
        limit, after = _page()
        return _list(await service.batches(key, limit + 1, after), limit)

    @route("/v1/batches/<batch_id>", "GET")
    async def get_batch(key: ApiKey | None, batch_id: str) -> Any:
        return await service.batch(key, batch_id)

    @route("/v1/batches/<batch_id>/cancel", "POST")
    async def cancel_batch(key: ApiKey | None, batch_id: str) -> Any:
        return await service.cancel(key, batch_id)


def _page() -> tuple[int, str | None]:
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit must be a number", param="limit") from None
    if not 1 <= limit <= MAX_LIST:
        raise BadRequest(f"limit must be from 1 to {MAX_LIST}", param="limit")
    return limit, request.args.get("after")


def _list(found: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page = found[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(found) > limit}


def _http_error(exc: Exception) -> GatewayError:
    code = getattr(exc, "code", None)
    if code == 413:
        return GatewayError("the file is larger than [batches].max_file_mb", status=413, code="file_too_large")
    if code == 408:
        return GatewayError("the file did not arrive in time", status=408)
    return BadRequest(f"not a multipart/form-data upload: {exc}")
