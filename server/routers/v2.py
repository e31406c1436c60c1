"""Open Inference Protocol (KServe v2), the HTTP API of Triton Inference Server, including its
binary tensor data extension, so ``tritonclient.http`` works against this server unchanged."""
from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError

from .. import kserve_v2
from ..errors import ApiError, error_responses
from ..model_host import ServedModel
from ..pipeline import deadline, infer, off_loop, reserve
from ..schemas import InferInputTensor, InferOutputTensor, InferRequest, InferResponse, ModelMetadata, ServerMetadata
from ..security import require_api_key
from ..state import AcceptingState, ServerState, ServerStateDep
from ..uploads import read_body

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_SLICE = 65536


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


def _model(state: ServerState, request: Request) -> ServerState:
    """404 unless the path names this server's model (and its only version, "1")."""
    kserve_v2.check_model(state.model, request.path_params["model_name"], request.path_params.get("model_version"))
    return state


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return kserve_v2.server_metadata(["binary_tensor_data"])


@router.get("/health/live", response_class=PlainTextResponse, responses={200: {"description": "alive"}})
async def live() -> PlainTextResponse:
    return PlainTextResponse("")


@router.get("/health/ready", response_class=PlainTextResponse,
            responses={200: {"description": "ready"}, 503: {"description": "not ready", "content": {
                "text/plain": {"schema": {"type": "string"}}}}})
async def ready(request: Request) -> PlainTextResponse:
    state = getattr(request.app.state, "server", None)
    return PlainTextResponse("", status_code=200 if state is not None and state.ready else 503)


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=error_responses(404, 503))
@router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata,
            responses=error_responses(404, 503), include_in_schema=False)
async def model_metadata(model_name: str, request: Request, state: ServerStateDep) -> ModelMetadata:
    return kserve_v2.model_metadata(_model(state, request).model)


@router.get("/models/{model_name}/ready", responses={200: {"description": "ready", "content": {
    "text/plain": {"schema": {"type": "string"}}}}, **error_responses(404, 503)})
@router.get("/models/{model_name}/versions/{model_version}/ready", include_in_schema=False)
async def model_ready(model_name: str, request: Request, state: ServerStateDep) -> PlainTextResponse:
    _model(state, request)
    return PlainTextResponse("")


def _header_length(value: str, body_size: int) -> int:
    """The JSON header's length: ASCII digits only (``"²".isdigit()`` is true, and int() refuses
    strings of over 4300 digits), within the body."""
    if not (value.isascii() and value.isdigit() and len(value) <= 18) or int(value) > body_size:
        raise ApiError(400, f"{HEADER_LENGTH} {value!r} is not a byte count within the body of {body_size} bytes")
    return int(value)


def _parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Split a binary-extension body into its JSON header and the raw tensor bytes after it."""
    split = len(body) if header_length is None else _header_length(header_length, len(body))
    try:
        return InferRequest.model_validate_json(body[:split]), body[split:]
    except ValidationError as exc:
        raise ApiError(400, f"invalid inference request: {exc.errors(include_url=False)[0]['msg']} "
                            f"at {'.'.join(map(str, exc.errors()[0]['loc'])) or 'body'}") from exc


def _tensor_data(tensor: InferInputTensor, binary: bytes, count: int) -> np.ndarray:
    """The tensor's values, flat: from the binary part or from JSON ``data``."""
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if type(binary_size) is not int or binary_size != count * 4 or len(binary) < binary_size:
            raise ApiError(400, f"binary data of input {tensor.name!r}: {binary_size} bytes declared, {len(binary)} "
                                f"sent, shape {tensor.shape} FP32 needs {count * 4}")
        values = kserve_v2.raw_values(binary[:binary_size], tensor.name, count)
    elif tensor.data is None:
        raise ApiError(400, f"input {tensor.name!r} has neither 'data' nor binary_data_size")
    else:
        try:
            values = np.asarray(tensor.data).ravel()
        except (ValueError, OverflowError) as exc:
            raise ApiError(400, f"input {tensor.name!r} data is not a (nested) list of numbers: {exc}") from exc
    return kserve_v2.finite_float32(values, tensor.name, count)


def _input_array(request: InferRequest, binary: bytes, size: int, max_batch: int) -> np.ndarray:
    tensor = request.inputs[0] if request.inputs else None
    count = kserve_v2.check_input([t.name for t in request.inputs], tensor.datatype if tensor else "",
                                  tensor.shape if tensor else [], size, max_batch)
    return _tensor_data(tensor, binary, count).reshape(tensor.shape).copy()   # writable for torch


def _wants_binary(request: InferRequest, output_names: list[str]) -> dict[str, bool]:
    """Output name -> send as binary, following Triton: per-output flag, else the request-wide default;
    no outputs named: all of them."""
    default = bool((request.parameters or {}).get("binary_data_output", False))
    flags = {o.name: bool((o.parameters or {}).get("binary_data", default)) for o in request.outputs or []}
    return {name: flags.get(name, default) for name in kserve_v2.requested_outputs(list(flags), output_names)}


def _read_request(body: bytes, header_length: str | None, served: ServedModel,
                  max_batch: int) -> tuple[InferRequest, np.ndarray, dict[str, bool]]:
    """Everything the request asks for, validated (runs in the worker pool: large JSON is slow)."""
    infer_request, binary = _parse_request(body, header_length)
    images = _input_array(infer_request, binary, served.image_size, max_batch)
    return infer_request, images, _wants_binary(infer_request, served.output_names)


def _json_floats(array: np.ndarray) -> str:
    """A JSON list of the values, encoded in slices so no single call holds the GIL for long."""
    flat = array.ravel()
    return "[" + ",".join(json.dumps(flat[i:i + JSON_SLICE].tolist())[1:-1]
                          for i in range(0, flat.size, JSON_SLICE)) + "]"


def _render(response: InferResponse, outputs: dict[str, np.ndarray], binary_outputs: dict[str, bool]) -> Response:
    """The v2 response; 422 for an output that is not finite (absurd inputs such as 3e38 overflow)."""
    tensors, blobs, json_data = [], [], []
    for name, as_binary in binary_outputs.items():
        array = kserve_v2.finite_output(outputs, name)
        parameters = {"binary_data_size": array.nbytes} if as_binary else None
        tensors.append(InferOutputTensor(name=name, shape=list(array.shape), datatype="FP32", parameters=parameters))
        (blobs if as_binary else json_data).append(array.tobytes() if as_binary else _json_floats(array))
    head = response.model_copy(update={"outputs": tensors}).model_dump(exclude_none=True)
    rendered = [json.dumps(t) for t in head.pop("outputs")]
    for i, tensor in enumerate(tensors):   # splice the data lists into the JSON-only tensors, in order
        if tensor.parameters is None:
            rendered[i] = rendered[i][:-1] + ', "data": ' + json_data.pop(0) + "}"
    header = (json.dumps(head)[:-1] + ', "outputs": [' + ", ".join(rendered) + "]}").encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


@router.post("/models/{model_name}/infer", response_model=InferResponse, openapi_extra=INFER_BODY_OPENAPI,
             responses=error_responses(400, 401, 404, 413, 422, 503, 504), dependencies=[Depends(require_api_key)])
@router.post("/models/{model_name}/versions/{model_version}/infer", include_in_schema=False,
             dependencies=[Depends(require_api_key)])
async def model_infer(model_name: str, request: Request, state: AcceptingState) -> Response:
    """JSON tensors, or the binary tensor data extension (`Inference-Header-Content-Length`)."""
    served = _model(state, request).model
    async with deadline(state):
        body = await read_body(request, state.settings.max_upload_bytes)
        infer_request, images, binary_outputs = await off_loop(
            state, _read_request, body, request.headers.get(HEADER_LENGTH), served, state.batcher.max_batch_size)
        del body
        with reserve(state, len(images)) as reservation:
            [result] = await infer(request, reservation, [images])
    response = InferResponse(model_name=served.name, model_version=kserve_v2.MODEL_VERSION, id=infer_request.id, outputs=[])
    return await off_loop(state, _render, response, result.outputs, binary_outputs)
