"""Reading a request: its body (capped), its JSON or multipart fields, its items, ``top_k`` and counts, and a watch
on its client hanging up. Every check here runs before work is spent on the request (STYLE rule 21)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .problems import Problem

if TYPE_CHECKING:  # app.py imports this module (through endpoints.py)
    from .app import ServeLimits

JSON_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")  # curl -d sends the last


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "BadRequest", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise Problem(413, "BodyTooLarge", f"the body ({declared} B) is over the limit of {limit} B")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "BodyTooLarge", f"the body is over the limit of {limit} B")
        chunks.append(chunk)
    return b"".join(chunks)


def json_value_limit(limits: ServeLimits) -> int:
    """The most JSON values a body may hold (counted by its commas, an upper bound): parsing costs per value, so a
    1 MB body of two-byte labels would cost more than its size suggests. Generous: a request's items and labels,
    with room for commas inside text and other fields."""
    return 16 * (limits.max_items + limits.max_labels) + 1024


def parse_json(body: bytes, limits: ServeLimits) -> dict:
    limit = json_value_limit(limits)
    if body.count(b",") > limit:  # bytes.count runs at memory speed: checked before any value is built
        raise Problem(
            413,
            "TooManyValues",
            f"the body holds over {limit} JSON values (by its commas); a request carries at most {limits.max_items} "
            f"items (--max-items) and {limits.max_labels} labels (--max-labels)",
        )
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Problem(400, "MalformedJSON", f"the body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise Problem(400, "MalformedJSON", "the body's JSON nests too deeply; requests need a few levels") from error
    if not isinstance(fields, dict):
        raise Problem(400, "MalformedJSON", "the body must be a JSON object")
    return fields


PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed in a worker thread, off the event loop


async def read_fields(request: Request, limits: ServeLimits) -> dict:
    """A JSON object or a multipart form -> {field: value}. Multipart: a repeated field is a list; a file is bytes."""
    body = await read_body(request, limits.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        if len(body) <= PARSE_INLINE_BYTES:
            return parse_json(body, limits)
        return await run_in_threadpool(parse_json, body, limits)
    if kind == "multipart/form-data":

        async def replay():  # the body was read (and capped) above; the form parser reads it again from here
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=limits.max_items * 3 + 1, max_fields=limits.max_items * 3 + limits.max_labels + 16
            )
        except HTTPException as error:
            raise Problem(400, "MalformedMultipart", str(error.detail)) from error
        fields: dict[str, list] = {}
        for key, value in form.multi_items():
            fields.setdefault(key, []).append(await value.read() if isinstance(value, UploadFile) else value)
        return {"multipart": True, **fields}
    raise Problem(415, "UnsupportedMediaType", f"send application/json or multipart/form-data, not {kind!r}")


def decode_items(modality: str, items, field: str, multipart: bool) -> list:
    """JSON: base64 strings (audio, image) or strings (text). Multipart: file bytes, or strings for text."""
    if isinstance(items, (str, bytes)):
        items = [items]
    if not isinstance(items, list):
        raise Problem(400, "BadRequest", f"{field} must be a list")
    out = []
    for i, item in enumerate(items):
        if modality == "text":
            if not isinstance(item, str):
                raise Problem(400, "BadRequest", f"{field}[{i}] must be a string (text)")
            out.append(item)
        elif isinstance(item, bytes):
            out.append(item)
        elif not isinstance(item, str):
            raise Problem(400, "BadRequest", f"{field}[{i}] must be a base64 string of a {modality} file")
        elif multipart:
            out.append(item.encode())  # a form field, not a file: let the decoder report it
        else:
            try:
                out.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError) as error:
                raise Problem(400, "BadBase64", f"{field}[{i}] is not valid base64: {error}") from error
    return out


def parse_top_k(value) -> int:
    """JSON: an integer (not 1.5, not true); multipart: its digits."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # bool first: True is an int
        raise Problem(400, "BadRequest", f"top_k must be an integer >= 1, got {value!r}")
    return value


@asynccontextmanager
async def watch_disconnect(request: Request):
    """A future done when the client hangs up, for as long as the block runs. After the body has been read, the
    next ``receive()`` returns only when the connection closes (``http.disconnect``)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait())
    try:
        yield watcher
    finally:
        watcher.cancel()


def check_count(count: int, limit: int) -> None:
    """A request's items: at least one, at most ``limit`` (``--max-items``)."""
    if count == 0:
        raise Problem(400, "BadRequest", "no items: send at least one")
    if count > limit:
        raise Problem(413, "TooManyItems", f"{count} items is over the limit of {limit} per request")


def check_label_count(count: int, limit: int) -> None:
    if count > limit:
        raise Problem(413, "TooManyLabels", f"{count} labels is over the limit of {limit} per request (--max-labels)")
