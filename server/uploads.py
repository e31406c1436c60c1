"""Request bodies read with the size limit enforced while streaming (413 before the whole upload
is buffered), and images taken from multipart field ``file`` or from a raw image body.

FastAPI's ``UploadFile`` parameters would parse the whole multipart body before our code runs, so
the limit could only be checked afterwards; feeding Starlette's parser a counting stream avoids that.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .errors import ApiError

IMAGE_FIELD = "file"
RAW_TYPES = ("image/", "application/octet-stream")

IMAGE_BODY_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": f"one or more images as multipart field `{IMAGE_FIELD}`, or one image as the raw body",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": [IMAGE_FIELD],
                "properties": {IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is above the limit of {limit} bytes")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limit)])


async def read_images(request: Request, limit: int, max_files: int) -> list[bytes]:
    """The uploaded image files, in order. Raises ApiError for a wrong field or content type."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        parser = MultiPartParser(request.headers, limited_stream(request, limit), max_files=max_files,
                                 max_fields=max_files, max_part_size=limit)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, f"malformed multipart body: {exc.message}") from exc
        try:
            files = [v for v in form.getlist(IMAGE_FIELD) if isinstance(v, UploadFile)]
            if not files:
                raise ApiError(400, f"no file in multipart field '{IMAGE_FIELD}' (fields sent: {sorted(set(form.keys()))})")
            return [await f.read() for f in files]
        finally:
            await form.close()
    if content_type.startswith(RAW_TYPES):
        return [await read_body(request, limit)]
    raise ApiError(415, f"unsupported content type {content_type or 'none'!r}: send multipart/form-data with field "
                        f"'{IMAGE_FIELD}' or a raw body with an image/* content type")
