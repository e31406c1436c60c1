"""Client errors as one JSON shape, ``{"error": "..."}``: the KServe v2 error format, so Triton's
clients show our messages, and the same everywhere else (FastAPI's own 404/405/422 included)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

CLIENT_CLOSED_REQUEST = 499     # nginx's status for a client that hung up before the answer: never sent


class ErrorResponse(BaseModel):
    error: str


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.message, self.headers = status_code, message, headers


async def api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=exc.headers)


async def http_error_handler(_: Request, exc: HTTPException) -> Response:
    """Routing errors (404 unknown path, 405 wrong method) in our shape, their headers (Allow) kept."""
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 for a parameter FastAPI could not validate, naming where: ``query.top_k: ...``."""
    problems = [f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()]
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


async def client_gone_handler(_: Request, exc: ClientDisconnect) -> Response:
    """The client hung up (mid-upload or while waiting): nothing to log, nobody to answer; the status
    only labels the request in the metrics."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ClientDisconnect, client_gone_handler)


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses=`` entry documenting the error codes an endpoint can return."""
    return {code: {"model": ErrorResponse} for code in codes}
