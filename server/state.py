"""What the lifespan builds and the routers use, reached through one dependency."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .batcher import DynamicBatcher, QueueFull
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


ServerStateDep = Annotated[ServerState, Depends(server_state)]


def accepting_state(state: ServerStateDep) -> ServerState:
    """The state, or 503 when the queue is full: a busy server refuses before the body is read."""
    try:
        state.batcher.check_room()
    except QueueFull as exc:
        raise ApiError(503, f"server busy: {exc}", {"Retry-After": "1"}) from exc
    return state


AcceptingState = Annotated[ServerState, Depends(accepting_state)]
