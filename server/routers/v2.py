"""Open Inference Protocol (KServe v2), the HTTP API of Triton Inference Server, including its
binary tensor data extension, so ``tritonclient.http`` works against this server unchanged."""
from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from rmt_deploy import __version__
from rmt_deploy.runners import INPUT_NAME, get_backend

from ..errors import ApiError, error_responses
from ..pipeline import deadline, infer
from ..schemas import (InferOutputTensor, InferRequest, InferResponse, ModelMetadata, ServerMetadata,
                       TensorMetadata)
from ..security import require_api_key
from ..state import ServerState, server_state
from ..uploads import read_body

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
HEADER_LENGTH = "Inference-Header-Content-Length"
_DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}    # numpy dtype -> KServe v2 datatype


def _inlined_schema(model) -> dict:
    """JSON schema without $refs: the body is parsed by hand (binary extension), so FastAPI does not
    register its sub-models in the OpenAPI components for refs to point at."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node
    return inline(schema)


INFER_BODY_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined_schema(InferRequest)}}}}


def _model(state: ServerState, model_name: str) -> ServerState:
    if model_name != state.model.name:
        raise ApiError(404, f"unknown model {model_name!r}; this server serves {state.model.name!r}")
    return state


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="rmt-deploy", version=__version__, extensions=["binary_tensor_data"])


@router.get("/health/live", responses={200: {"description": "alive"}})
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", responses={200: {"description": "ready"}, 503: {"description": "not ready"}})
async def ready(request: Request) -> Response:
    state = getattr(request.app.state, "server", None)
    return Response(status_code=200 if state is not None and state.ready else 503)


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=error_responses(404, 503))
@router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata,
            responses=error_responses(404, 503), include_in_schema=False)
async def model_metadata(model_name: str, state: ServerState = Depends(server_state)) -> ModelMetadata:
    served = _model(state, model_name).model
    size = served.image_size
    dtypes = served.artifact.output_dtypes if served.artifact else ("float32",) * len(served.output_names)
    outputs = [TensorMetadata(name=n, datatype=_DATATYPES[dtype],
                              shape=[-1, c] if served.task == "classify" else [-1, c, -1, -1])
               for n, c, dtype in zip(served.output_names, served.output_channels, dtypes)]
    return ModelMetadata(name=served.name, versions=["1"], platform=get_backend(served.runner.backend).platform,
                         inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, 3, size, size])],
                         outputs=outputs)


@router.get("/models/{model_name}/ready", responses={200: {"description": "ready"}, **error_responses(404, 503)})
@router.get("/models/{model_name}/versions/{model_version}/ready", include_in_schema=False)
async def model_ready(model_name: str, state: ServerState = Depends(server_state)) -> Response:
    _model(state, model_name)
    return Response(status_code=200)


def _parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Split a binary-extension body into its JSON header and the raw tensor bytes after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        json_part, binary = body[:int(header_length)], body[int(header_length):]
    try:
        return InferRequest.model_validate_json(json_part), binary
    except ValidationError as exc:
        raise ApiError(400, f"invalid inference request: {exc.errors(include_url=False)[0]['msg']} "
                            f"at {'.'.join(map(str, exc.errors()[0]['loc'])) or 'body'}") from exc


def _input_array(request: InferRequest, binary: bytes, state: ServerState) -> np.ndarray:
    size, max_batch = state.model.image_size, state.batcher.max_batch_size
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        raise ApiError(400, f"expected exactly one input named {INPUT_NAME!r}, got {[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise ApiError(400, f"input {INPUT_NAME!r} has datatype {tensor.datatype}; the model expects FP32")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [3, size, size] or not 1 <= shape[0] <= max_batch:
        raise ApiError(400, f"input {INPUT_NAME!r} has shape {shape}; the model expects [N, 3, {size}, {size}] "
                            f"with 1 <= N <= {max_batch}")
    count = int(np.prod(shape))
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != count * 4 or len(binary) < binary_size:
            raise ApiError(400, f"binary data of input {INPUT_NAME!r}: {binary_size} bytes declared, {len(binary)} "
                                f"sent, shape {shape} FP32 needs {count * 4}")
        return np.frombuffer(binary[:binary_size], dtype="<f4").reshape(shape).copy()  # writable for torch
    if tensor.data is None:
        raise ApiError(400, f"input {INPUT_NAME!r} has neither 'data' nor binary_data_size")
    try:
        values = np.asarray(tensor.data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"input {INPUT_NAME!r} data is not a list of numbers: {exc}") from exc
    if values.size != count:
        raise ApiError(400, f"input {INPUT_NAME!r} has {values.size} values; shape {shape} needs {count}")
    return values.reshape(shape)


def _wants_binary(request: InferRequest) -> dict[str, bool]:
    """Output name -> send as binary, following Triton: per-output flag, else the request-wide default."""
    default = bool((request.parameters or {}).get("binary_data_output", False))
    return {o.name: bool((o.parameters or {}).get("binary_data", default)) for o in request.outputs or []}


@router.post("/models/{model_name}/infer", response_model=InferResponse, openapi_extra=INFER_BODY_OPENAPI,
             responses=error_responses(400, 401, 404, 413, 503, 504), dependencies=[Depends(require_api_key)])
@router.post("/models/{model_name}/versions/{model_version}/infer", include_in_schema=False,
             dependencies=[Depends(require_api_key)])
async def model_infer(model_name: str, request: Request, state: ServerState = Depends(server_state)) -> Response:
    """JSON tensors, or the binary tensor data extension (`Inference-Header-Content-Length`)."""
    served = _model(state, model_name).model
    async with deadline(state):
        body = await read_body(request, state.settings.max_upload_bytes)
        infer_request, binary = _parse_request(body, request.headers.get(HEADER_LENGTH))
        images = _input_array(infer_request, binary, state)
        binary_outputs = _wants_binary(infer_request)
        unknown = set(binary_outputs) - set(served.output_names)
        if unknown:
            raise ApiError(400, f"unknown outputs {sorted(unknown)}; the model has {served.output_names}")
        result = await infer(state, images)
    if not binary_outputs:
        default = bool((infer_request.parameters or {}).get("binary_data_output", False))
        binary_outputs = {name: default for name in served.output_names}
    tensors, blobs = [], []
    for name, as_binary in binary_outputs.items():
        array = np.ascontiguousarray(result.outputs[name], dtype="<f4")
        if as_binary:
            blobs.append(array.tobytes())
            tensors.append(InferOutputTensor(name=name, shape=list(array.shape), datatype="FP32",
                                             parameters={"binary_data_size": len(blobs[-1])}))
        else:
            tensors.append(InferOutputTensor(name=name, shape=list(array.shape), datatype="FP32",
                                             data=array.ravel().tolist()))
    response = InferResponse(model_name=served.name, model_version="1", id=infer_request.id, outputs=tensors)
    if not blobs:
        return JSONResponse(response.model_dump(exclude_none=True))
    header = json.dumps(response.model_dump(exclude_none=True)).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})
