"""KServe v2 (Triton's GRPCInferenceService) over gRPC, on ``--grpc-port``.

The service definition is the one tritonclient ships generated (``service_pb2``/``service_pb2_grpc``),
so ``tritonclient.grpc`` and other KServe clients work unchanged. It runs on ``grpc.aio`` in the
FastAPI lifespan, on the same event loop as HTTP, and answers through the same pieces: the model
checks and tensor validation of `kserve_v2`, the same dynamic batcher with its queue bound, the same
request deadline and bearer token. The protocol's core calls and Triton's
streaming inference are implemented; the rest (shared memory, repository, statistics) answer
UNIMPLEMENTED, as the generated base class does.
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import grpc
import numpy as np
from fastapi import FastAPI
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from rmt_deploy.runners import INPUT_NAME

from . import kserve_v2
from .batcher import QueueFull
from .errors import ApiError
from .pipeline import deadline, off_loop
from .security import check_token
from .state import ServerState

log = logging.getLogger("uvicorn.error")     # the server's log, as in app.py

# HTTP status of an ApiError -> gRPC status (queue full is QueueFull, RESOURCE_EXHAUSTED, not a 503)
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
                413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
EXTENSIONS = ["binary_tensor_data"]     # raw_input_contents / raw_output_contents


def _input_images(request: pb.ModelInferRequest, size: int, max_batch: int) -> np.ndarray:
    """The request's (N, 3, S, S) FP32 input from raw or typed (fp32_contents) contents, validated."""
    tensor = request.inputs[0] if request.inputs else None
    shape = list(tensor.shape) if tensor else []
    count = kserve_v2.check_input([t.name for t in request.inputs], tensor.datatype if tensor else "", shape, size,
                                  max_batch)
    if request.raw_input_contents:
        values = kserve_v2.raw_values(request.raw_input_contents[0], tensor.name, count)
    elif tensor.HasField("contents"):
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    else:
        raise ApiError(400, f"input {INPUT_NAME!r} has neither raw_input_contents nor fp32_contents")
    return kserve_v2.finite_float32(values, tensor.name, count).reshape(shape).copy()   # writable for torch


def _tensor_metadata(tensors) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: FastAPI):
        self.app = app
        self.metrics = app.state.metrics

    async def _answer(self, method: str, context: grpc.aio.ServicerContext, work):
        """Run ``work`` and return its response, or end the call with the gRPC status of its error."""
        response, code, message = await self._outcome(method, work)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)
        return response

    async def _outcome(self, method: str, work) -> tuple[object | None, grpc.StatusCode, str]:
        """Run ``work``, count the call by method and status code: (its response, OK, "") or (None, the
        gRPC status of our error, its message)."""
        code, message, started = grpc.StatusCode.OK, "", time.perf_counter()
        try:
            return await work(), code, message
        except QueueFull as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}"
        except ApiError as exc:
            code, message = STATUS_CODES.get(exc.status_code, grpc.StatusCode.UNKNOWN), exc.message
        except asyncio.CancelledError:      # the client cancelled or its deadline passed: its work is withdrawn
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # noqa: BLE001 -- a bug or the runtime's failure: logged, and the client sees INTERNAL
            # (re-raised, grpc.aio would send UNKNOWN while the metrics count INTERNAL)
            log.exception("gRPC %s failed", method)
            code, message = grpc.StatusCode.INTERNAL, "internal server error"
        finally:
            self.metrics.grpc_requests.labels(method, code.name).inc()
            self.metrics.request_seconds.labels(f"grpc:{method}").observe(time.perf_counter() - started)
        return None, code, message

    def _state(self) -> ServerState:
        state: ServerState | None = getattr(self.app.state, "server", None)
        if state is None or not state.ready:
            raise ApiError(503, "model not ready")
        return state

    async def ServerLive(self, request, context):
        async def live():
            return pb.ServerLiveResponse(live=True)
        return await self._answer("ServerLive", context, live)

    async def ServerReady(self, request, context):
        async def ready():
            state = getattr(self.app.state, "server", None)
            return pb.ServerReadyResponse(ready=state is not None and state.ready)
        return await self._answer("ServerReady", context, ready)

    async def ModelReady(self, request, context):
        async def ready():
            kserve_v2.check_model(self._state().model, request.name, request.version)
            return pb.ModelReadyResponse(ready=True)
        return await self._answer("ModelReady", context, ready)

    async def ServerMetadata(self, request, context):
        async def metadata():
            meta = kserve_v2.server_metadata(EXTENSIONS)
            return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)
        return await self._answer("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request, context):
        async def metadata():
            served = self._state().model
            kserve_v2.check_model(served, request.name, request.version)
            meta = kserve_v2.model_metadata(served)
            return pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform,
                                            inputs=_tensor_metadata(meta.inputs), outputs=_tensor_metadata(meta.outputs))
        return await self._answer("ModelMetadata", context, metadata)

    async def ModelInfer(self, request, context):
        return await self._answer("ModelInfer", context, lambda: self._infer(request, context))

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming inference: every request goes the ModelInfer way and is answered in order,
        a failed one by its ``error_message`` (the stream goes on). Up to --max-batch-size requests of a
        stream run at once, so the batcher can group them; past that the stream is read no further
        (gRPC flow control holds the client back) until the oldest is answered."""
        running, slots = asyncio.Queue(), asyncio.Semaphore(self.app.state.settings.max_batch_size)
        reader = asyncio.ensure_future(self._start_each(request_iterator, context, running, slots))
        try:
            while (task := await running.get()) is not None:
                response, code, message = await task
                slots.release()
                yield (pb.ModelStreamInferResponse(infer_response=response) if code is grpc.StatusCode.OK
                       else pb.ModelStreamInferResponse(error_message=message))
            await reader            # the client's stream broke: say so
        finally:                    # the client went away: its requests still running are withdrawn
            reader.cancel()
            while not running.empty():
                if (task := running.get_nowait()) is not None:
                    task.cancel()

    async def _start_each(self, request_iterator, context, running: asyncio.Queue, slots: asyncio.Semaphore):
        """Start every request of a stream as it arrives, in order, into ``running`` (each takes one of
        ``slots``); None once the stream ends."""
        try:
            async for request in request_iterator:
                await slots.acquire()
                running.put_nowait(asyncio.ensure_future(
                    self._outcome("ModelStreamInfer", partial(self._infer, request, context))))
        finally:
            running.put_nowait(None)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        scheme, _, token = dict(context.invocation_metadata() or ()).get("authorization", "").partition(" ")
        check_token(token if scheme.lower() == "bearer" else "", self.app.state.settings.api_key)
        state = self._state()
        served = state.model
        kserve_v2.check_model(served, request.model_name, request.model_version)
        state.batcher.check_room()          # a busy server refuses before decoding
        wanted = kserve_v2.requested_outputs([o.name for o in request.outputs], served.output_names)
        async with deadline(state):
            images = await off_loop(state, _input_images, request, served.image_size, state.batcher.max_batch_size)
            try:
                reservation = state.batcher.reserve(len(images))
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
            with reservation:
                [result] = await reservation.submit([images])
        response = pb.ModelInferResponse(model_name=served.name, model_version=kserve_v2.MODEL_VERSION, id=request.id)
        for name in wanted:
            array = kserve_v2.finite_output(result.outputs, name)
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


async def start_grpc_server(app: FastAPI, host: str, port: int, max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """The gRPC server, started on the running event loop; and the port it bound (``port`` 0: any free one)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", -1)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
