"""API errors: one JSON shape, {"error": {"code", "message", ...}}, for every failure."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A request problem answered as {"error": {"code", "message", ...}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None, **details: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after_s = retry_after_s  # sent as Retry-After: when the client may try again

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        body = {"error": {"code": self.code, "message": self.message, **self.details}}
        return JSONResponse(body, status_code=self.status, headers=headers or None)


def overloaded(what: str, retry_after_s: int) -> ApiError:
    """The one answer to every full queue: 503 "overloaded", come back after Retry-After."""
    return ApiError(503, "overloaded", f"the server is at capacity ({what}); retry after {retry_after_s} s",
                    retry_after_s=retry_after_s)


def decode_error_to_api(message: str, **details: Any) -> ApiError:
    """facedist.images.ImageDecodeError messages -> status + code."""
    if message.startswith("image too large"):
        return ApiError(413, "too_large", message, **details)
    if message.startswith(("not an image", "empty file")):
        return ApiError(415, "not_an_image", message, **details)
    return ApiError(422, "invalid_image", message, **details)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    where = ".".join(str(p) for p in problems[0].get("loc", ())) if problems else "request"
    return ApiError(422, "invalid_request", f"{where}: {problems[0].get('msg') if problems else exc}").response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, code, str(exc.detail)).response()


async def _replica_lost(_: Request, exc: RayActorError) -> JSONResponse:
    # A replica died (its node was lost) with this request in it: the next request goes to a live
    # one, so the client is told to retry rather than given a bare 500.
    logger.warning("a replica was lost during a request: %s", exc)
    return ApiError(503, "replica_unavailable", "the model replica handling this request was lost "
                    "(node failure); retry the request", retry_after_s=1).response()


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return ApiError(500, "internal", f"{type(exc).__name__}: {exc}").response()


def install_error_handlers(api: FastAPI) -> None:
    """Every error the app can raise answers in the one JSON shape."""
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RayActorError, _replica_lost)
    api.add_exception_handler(Exception, _internal_error)
