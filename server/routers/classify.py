"""POST /classify: one or more images in, top-k ImageNet (or index) labels out."""
from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, Query, Request

from rmt_deploy.labels import top_k_scores

from ..errors import ApiError, error_responses
from ..pipeline import deadline, decode_all, infer, reserve
from ..schemas import ClassifyBatchResponse, ClassifyResponse, Prediction, TimingMs
from ..security import require_api_key
from ..state import AcceptingState
from ..uploads import IMAGE_BODY_OPENAPI, read_images

EMBEDDING = "embedding"
router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])


def top_predictions(logits: np.ndarray, labels: list[str], top_k: int) -> list[Prediction]:
    order, scores = top_k_scores(logits[None], top_k)
    return [Prediction(index=int(i), label=labels[i], score=float(p)) for i, p in zip(order[0], scores[0])]


@router.post("/classify", response_model=ClassifyResponse | ClassifyBatchResponse, openapi_extra=IMAGE_BODY_OPENAPI,
             responses=error_responses(400, 401, 409, 413, 415, 422, 503, 504))
async def classify(request: Request, state: AcceptingState,
                   top_k: int = Query(5, ge=1, le=1000, description="predictions per image"),
                   embedding: bool = Query(False, description="also return each image's pooled pre-head vector")):
    """Classify images sent as multipart field `file` (several allowed: `{"results": [...]}`) or a raw image body."""
    if not state.model.classifies:
        raise ApiError(409, "this server runs the backbone (features) model: use POST /features")
    if embedding and EMBEDDING not in state.model.output_names:
        raise ApiError(409, "this model file has no embedding output (export it with rmt-export --task all)")
    started = time.perf_counter()
    async with deadline(state):
        files = await read_images(request, state.settings.max_upload_bytes, state.settings.max_files)
        with reserve(state, len(files)) as reservation:
            decoded = await decode_all(state, files)
            results = await infer(request, reservation, [images for images, _ in decoded])
    top_k = min(top_k, len(state.model.labels))
    runner, total_ms = state.model.runner, (time.perf_counter() - started) * 1e3
    responses = [ClassifyResponse(
        model=state.model.name, backend=runner.backend, precision=runner.precision,
        predictions=top_predictions(result.outputs["logits"][0], state.model.labels, top_k),
        embedding=result.outputs[EMBEDDING][0].tolist() if embedding else None,
        timing_ms=TimingMs(decode=decode_ms, queue=result.queue_ms, infer=result.infer_ms, total=total_ms))
        for (_, decode_ms), result in zip(decoded, results)]
    return responses[0] if len(responses) == 1 else ClassifyBatchResponse(results=responses)
