"""Client errors as one JSON shape, ``{"error": "..."}``: the KServe v2 error format, so Triton's
clients show our messages, and the same everywhere else for simplicity."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ErrorResponse(BaseModel):
    error: str


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.message, self.headers = status_code, message, headers


async def api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=exc.headers)


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses=`` entry documenting the error codes an endpoint can return."""
    return {code: {"model": ErrorResponse} for code in codes}
