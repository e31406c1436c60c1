"""POST /features: the four backbone stage outputs, summarised as JSON or complete as .npz."""
from __future__ import annotations

import io
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..errors import ApiError, error_responses
from ..pipeline import deadline, decode, infer, reserve
from ..schemas import FeaturesResponse, StageFeature, TimingMs
from ..security import require_api_key
from ..state import AcceptingState
from ..uploads import IMAGE_BODY_OPENAPI, read_images
from .classify import EMBEDDING

router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])
NPZ_TYPE = "application/x-npz"


@router.post("/features", response_model=FeaturesResponse, openapi_extra=IMAGE_BODY_OPENAPI,
             responses={200: {"content": {NPZ_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                              "description": "JSON summary, or with ?format=npz the arrays (numpy.load opens it)"},
                        **error_responses(400, 401, 409, 413, 415, 422, 503, 504)})
async def features(request: Request, state: AcceptingState, format: Literal["json", "npz"] | None = Query(
                       None, description=f"npz: full arrays (also chosen by Accept: {NPZ_TYPE})")):
    """Backbone features of one image: name, stride, NCHW shape and pooled vector per stage, and the
    classifier's embedding where the model has a head."""
    if not state.model.strides:
        raise ApiError(409, "this model file has the classification head only: use POST /classify "
                            "(export it with rmt-export --task all for both)")
    started = time.perf_counter()
    async with deadline(state):
        files = await read_images(request, state.settings.max_upload_bytes, state.settings.max_files)
        if len(files) != 1:
            raise ApiError(400, f"/features takes exactly one image, got {len(files)}")
        with reserve(state, 1) as reservation:
            images, decode_ms = await decode(state, files[0])
            [result] = await infer(request, reservation, [images])
    stages = {name: result.outputs[name] for name in state.model.strides}
    embedding = result.outputs.get(EMBEDDING)
    wants_npz = format == "npz" or (format is None and NPZ_TYPE in request.headers.get("accept", ""))
    if wants_npz:
        buffer = io.BytesIO()
        np.savez(buffer, **stages, **({} if embedding is None else {EMBEDDING: embedding}))
        return Response(buffer.getvalue(), media_type=NPZ_TYPE)
    runner = state.model.runner
    return FeaturesResponse(
        model=state.model.name, backend=runner.backend, precision=runner.precision,
        features=[StageFeature(name=name, stride=state.model.strides[name], shape=list(arr.shape),
                               pooled=arr[0].mean(axis=(1, 2)).tolist()) for name, arr in stages.items()],
        embedding=None if embedding is None else embedding[0].tolist(),
        timing_ms=TimingMs(decode=decode_ms, queue=result.queue_ms, infer=result.infer_ms,
                           total=(time.perf_counter() - started) * 1e3))
