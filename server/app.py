"""The FastAPI application: routers, error handling, metrics middleware, and the lifespan that
loads and warms the model before the server reports ready and drains the batcher on shutdown."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from rmt_deploy import __version__

from .batcher import DynamicBatcher
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .model_host import ServedModel, load_served_model
from .routers import classify, features, health, metrics, v2
from .settings import ServeSettings
from .state import ServerState

log = logging.getLogger("uvicorn.error")     # the server's own log, shown next to uvicorn's startup lines


class RequestMetricsMiddleware:
    """Counts every response by route template (not raw path, so fuzzed URLs can't explode label
    cardinality) and status, and times it."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = 500, time.perf_counter()

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: ServeSettings = app.state.settings
    served = app.state.preloaded or await asyncio.to_thread(load_served_model, settings)
    app.state.preloaded = None
    max_batch_size = served.max_batch_size(settings.max_batch_size)
    if max_batch_size != settings.max_batch_size:
        log.info("the model file has a static batch of %d: batches of up to %d images, smaller ones padded "
                 "(--max-batch-size %d does not apply)", max_batch_size, max_batch_size, settings.max_batch_size)
    if settings.warmup:
        await asyncio.to_thread(served.warmup, max_batch_size)
    batcher = DynamicBatcher(served.instances(), app.state.metrics, max_batch_size=max_batch_size,
                             max_delay_ms=settings.max_delay_ms, max_queue_size=settings.max_queue_size)
    batcher.start()
    decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="rmt-decode")
    state = ServerState(settings, app.state.metrics, served, batcher, decode_pool, ready=True)
    app.state.server = state
    grpc_server = None
    try:
        if settings.grpc_port is not None:
            grpc_server, app.state.grpc_port = await grpc_frontend().start_grpc_server(
                app, settings.host, settings.grpc_port, settings.max_upload_bytes)
            log.info("KServe v2 gRPC on %s:%d", settings.host, app.state.grpc_port)
        yield
    finally:
        state.ready = False
        if grpc_server is not None:     # refuses new calls, lets running ones finish (the batcher still runs)
            await grpc_server.stop(settings.graceful_timeout_s)
        await batcher.drain(settings.graceful_timeout_s)
        decode_pool.shutdown(wait=True)
        served.close()


def grpc_frontend():
    """The gRPC module; grpcio and tritonclient's stubs are the optional ``grpc`` extra."""
    try:
        from . import grpc_api
    except ImportError as exc:
        raise RuntimeError(f"--grpc-port needs grpcio and tritonclient[grpc] ({exc.name} is missing): "
                           "pip install 'rmt-deploy[grpc]'") from exc
    return grpc_api


def create_app(settings: ServeSettings | None = None, served: ServedModel | None = None) -> FastAPI:
    """``served``: a model the caller already loaded (the CLI does, to fail before binding)."""
    settings = settings or ServeSettings()
    app = FastAPI(title="rmt-deploy", version=__version__, lifespan=lifespan,
                  description="RMT image classification and backbone features; KServe v2 (Triton) compatible.")
    app.state.settings, app.state.metrics, app.state.preloaded = settings, ServerMetrics(), served
    install_error_handlers(app)
    for router in (classify.router, features.router, v2.router, health.router, metrics.router):
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", v2.HEADER_LENGTH])
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    return app
