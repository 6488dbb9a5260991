"""One error shape for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.chat.templates import ChatTemplateError
from ember.chat.tokenizer import InvalidTextError
from ember.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    RequestTimeoutError,
    ServerShuttingDownError,
)
from ember.engine.core import PromptError
from ember.engine.request import SamplingParamsError


class APIError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )
        self.headers = headers


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict:
    # A message may quote the client's input, lone surrogates included (a model name such
    # as "\ud800"), which UTF-8 cannot carry: those are written as their escapes.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def to_api_error(exc: Exception) -> APIError:
    """Errors a client can cause, as the 4xx they deserve."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return APIError(str(exc), param=exc.param)
    if isinstance(exc, PromptError):
        return APIError(str(exc), param=exc.param)
    if isinstance(exc, ChatTemplateError):
        return APIError(str(exc), param="messages")
    if isinstance(exc, InvalidTextError):
        return APIError(str(exc), code="invalid_unicode")
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            str(exc),
            503,
            "server_error",
            code="overloaded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, RequestTimeoutError):
        return APIError(str(exc), 504, "server_error", code="timeout")
    if isinstance(exc, ServerShuttingDownError):
        return APIError(
            str(exc), 503, "server_error", code="shutting_down", headers={"Retry-After": "1"}
        )
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), 503, "server_error", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(
            f"Internal error while handling this request: {exc}", 500, "internal_server_error"
        )
    return APIError("Internal server error.", 500, "internal_server_error")


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}
_UNION_TAG = re.compile(r"[a-z-]+\[.*\]|(constrained|function-[a-z]+)-?.*|[A-Z]\w*")


def _is_union_tag(part: object) -> bool:
    """Pydantic names each member of a union in the error location ('constrained-str',
    'list[int]', 'ContentPart'); the client's field path does not contain them."""
    if isinstance(part, int):
        return False
    return str(part) in _TYPE_NAMES or _UNION_TAG.fullmatch(str(part)) is not None


def _loc_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path") and not _is_union_tag(p)]
    return ".".join(parts) or None


def _is_type_mismatch(error: dict) -> bool:
    """The input is not of the kind this union member takes. A fractional number where an
    integer goes is of its kind (a number), so that member's complaint is the one to show."""
    kind = str(error.get("type", ""))
    if kind == "int_type" and isinstance(error.get("input"), float):
        return False
    return kind.endswith(("_type", "_parsing"))


def validation_message(errors: list) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: the first field at fault, its most specific
    complaint, and how many other fields are wrong."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        at = first.get("loc", ())[-1] if first.get("loc") else None
        where = f" (at character {at})" if isinstance(at, int) else ""
        return f"The request body is not valid JSON: {reason}{where}.", None
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "The request body is empty: send a JSON object.", None
    by_field: dict[str | None, list] = {}
    for e in errors:
        param = _loc_param(tuple(e.get("loc", ())))
        by_field.setdefault(param.split(".")[0] if param else None, []).append(e)
    group = next(iter(by_field.values()))
    # Of a union's members, the one whose type the input had (its complaint is a constraint,
    # not "should be a valid string" or "unable to parse string as an integer"), then the one
    # that got furthest into it.
    deepest = max(group, key=lambda e: (not _is_type_mismatch(e), len(e.get("loc", ()))))
    param = _loc_param(tuple(deepest.get("loc", ())))
    msg = deepest.get("msg", "Invalid request.")
    message = f"{param}: {msg}" if param else msg
    if len(by_field) > 1:
        message += f" (and {len(by_field) - 1} more fields with problems)"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(ValidationError)  # a model built from request fields in a handler
    @app.exception_handler(RequestValidationError)
    async def _validation(
        _: Request, exc: RequestValidationError | ValidationError
    ) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        cause = exc.__cause__  # of FastAPI's "There was an error parsing the body"
        if isinstance(cause, UnicodeDecodeError):
            message = (
                f"The request body is not {cause.encoding} text: {cause.reason} "
                f"at byte {cause.start}."
            )
        elif isinstance(cause, RecursionError):
            message = "The request body nests too deeply to be read as JSON."
        return error_response(exc.status_code, message, kind, headers=exc.headers)

    async def _client_error(_: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    for kind in (SamplingParamsError, PromptError, ChatTemplateError, InvalidTextError):
        app.add_exception_handler(kind, _client_error)

    async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, EngineOverloadedError):
            count_rejected(request.app.state.ember, "overloaded")
        return await _client_error(request, exc)

    for kind in (
        EngineOverloadedError,
        RequestTimeoutError,
        EngineDeadError,
        RequestFailedError,
        ServerShuttingDownError,
    ):
        app.add_exception_handler(kind, _engine_error)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "Internal server error.", "internal_server_error")


def count_rejected(state, reason: str) -> None:
    """ember:num_requests_rejected, by reason (overloaded, shutting_down)."""
    if state.metrics is not None:
        state.metrics.rejected.labels(state.model_name, reason).inc()
