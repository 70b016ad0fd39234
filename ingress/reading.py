"""Reading a request body: bounded in size and nesting before it is decoded (pipeline/limits.py)."""

from __future__ import annotations

import anyio
import msgspec
from starlette.requests import Request

from ingress.errors import APIError, validation_error
from pipeline.limits import LARGE_MESSAGE, MAX_JSON_DEPTH, too_deep


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit` bytes (before reading it, when the
    client declared its length)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"The request body is {size} bytes or more; this server accepts at most {limit} bytes.",
                    None, "request_too_large")


async def read_request(request: Request, type_, limit: int):
    """The body decoded as `type_`, or OpenAI's 400/413 error naming what is wrong."""
    body = await read_body(request, limit)
    deep = await anyio.to_thread.run_sync(too_deep, body) if len(body) > LARGE_MESSAGE else too_deep(body)
    if deep:
        raise APIError(400, f"The JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.", None,
                       "nesting_too_deep")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.MsgspecError as exc:
        raise validation_error(exc)
    except RecursionError:  # not reachable past too_deep; kept so that no body can make a 500
        raise APIError(400, "The JSON body nests too deeply.", None, "nesting_too_deep")
