"""OpenAI's error object, and the translation of msgspec validation errors into it."""

from __future__ import annotations

import re

import msgspec
from starlette.responses import Response

from schemas.openai import ErrorDetail, ErrorResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers
        default_type = "invalid_request_error" if status < 500 else "server_error"
        self.detail = ErrorDetail(message=message, type=type or default_type, param=param, code=code)

    @classmethod
    def from_detail(cls, status: int, detail: ErrorDetail) -> "APIError":
        """The error a worker reported (a `Failed` event), answered as it is."""
        return cls(status, detail.message, detail.param, detail.code, detail.type)


def error_response(status: int, detail: ErrorDetail, headers: dict | None = None) -> Response:
    return Response(msgspec.json.encode(ErrorResponse(error=detail)), status_code=status,
                    media_type="application/json", headers=headers)


_AT = r"(?: - at `\$(?P<path>[^`]*)`)?$"
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`" + _AT)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`" + _AT)
_TYPE = re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`" + _AT)
_ENUM = re.compile(r"Invalid enum value (?P<value>.+?)" + _AT)
_CONSTRAINT = re.compile(r"(?P<what>.+?)" + _AT)  # a value out of its bounds: "Expected `str` matching regex ..."


def _param(path: str | None, field: str | None = None) -> str | None:
    """msgspec's `$.messages[0].role` as OpenAI's `messages[0].role`."""
    parts = [p for p in ((path or "").lstrip("."), field) if p]
    return ".".join(parts) or None


def validation_error(exc: msgspec.MsgspecError) -> APIError:
    """A 400 in OpenAI's shape, naming the parameter at fault."""
    text = str(exc)
    # ValidationError subclasses DecodeError: only a plain DecodeError is unparseable JSON.
    if not isinstance(exc, msgspec.ValidationError):
        return APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                        "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) "
                        f"Parser error: {text}")
    if m := _MISSING.match(text):
        param = _param(m["path"], m["field"])
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if m := _UNKNOWN.match(text):
        param = _param(m["path"], m["field"])
        return APIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if m := _TYPE.match(text):
        param = _param(m["path"])
        expected = m["expected"].replace(" | null", "")
        if param is None:
            return APIError(400, f"The request body must be a JSON object, but got {m['got']}.", None, "invalid_type")
        return APIError(400, f"Invalid type for '{param}': expected {expected}, but got {m['got']} instead.",
                        param, "invalid_type")
    if m := _ENUM.match(text):
        param = _param(m["path"])
        return APIError(400, f"Invalid value for '{param}': {m['value']} is not supported.", param, "invalid_value")
    if (m := _CONSTRAINT.match(text)) and (param := _param(m["path"])) is not None:
        return APIError(400, f"Invalid value for '{param}': {m['what']}.", param, "invalid_value")
    return APIError(400, text, None, "invalid_request")
