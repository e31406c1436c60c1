"""The FastAPI application: routers, error handling, metrics middleware, and the lifespan that
loads and warms the model before the server reports ready and drains the batcher on shutdown."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import uvicorn
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
    app.state.shutdown_deadline = app.state.grpc_server = app.state.grpc_stopped = None
    batcher = decode_pool = None
    try:
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
        app.state.server = ServerState(settings, app.state.metrics, served, batcher, decode_pool, ready=True)
        if settings.grpc_port is not None:
            app.state.grpc_server, app.state.grpc_port = await grpc_frontend().start_grpc_server(
                app, settings.host, settings.grpc_port, settings.max_upload_bytes)
            log.info("KServe v2 gRPC on %s:%d", settings.host, app.state.grpc_port)
        yield
    finally:
        deadline = begin_shutdown(app)      # already begun when Server (below) runs the app
        if (grpc_stopped := getattr(app.state, "grpc_stopped", None)) is not None:
            await grpc_stopped          # running gRPC calls finish (the batcher still runs)
        if batcher is not None:
            await batcher.drain(max(0.0, deadline - time.monotonic()))
        if decode_pool is not None:
            decode_pool.shutdown(wait=True)
        served.close()


def begin_shutdown(app: FastAPI) -> float:
    """Stop taking work at once: /readyz turns not-ready and gRPC refuses new calls (its running ones
    may finish). Returns the one deadline that every later step shares (HTTP drain, gRPC calls, the
    batcher), so shutdown takes --graceful-timeout-s at most, not once per step."""
    if getattr(app.state, "shutdown_deadline", None) is None:
        app.state.shutdown_deadline = time.monotonic() + app.state.settings.graceful_timeout_s
        if (state := getattr(app.state, "server", None)) is not None:
            state.ready = False
        if (grpc_server := getattr(app.state, "grpc_server", None)) is not None:
            app.state.grpc_stopped = asyncio.ensure_future(grpc_server.stop(app.state.settings.graceful_timeout_s))
    return app.state.shutdown_deadline


class Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown begins: uvicorn runs the lifespan's shutdown
    only after HTTP connections have drained, and until then the app would stay ready."""

    async def shutdown(self, sockets=None) -> None:
        begin_shutdown(self.config.app)
        await super().shutdown(sockets)


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
