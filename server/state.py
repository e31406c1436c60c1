"""What the lifespan builds and the routers use, reached through one dependency."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from .batcher import DynamicBatcher
from .errors import ApiError
from .metrics import ServerMetrics
from .model_host import ServedModel
from .settings import ServeSettings


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: ServerMetrics
    model: ServedModel
    batcher: DynamicBatcher
    decode_pool: ThreadPoolExecutor
    ready: bool = False


def server_state(request: Request) -> ServerState:
    state: ServerState | None = getattr(request.app.state, "server", None)
    if state is None or not state.ready:
        raise ApiError(503, "model not ready", {"Retry-After": "1"})
    return state
