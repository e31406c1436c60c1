"""Liveness and readiness for orchestrators (Kubernetes probes, Docker HEALTHCHECK)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus)
async def healthz() -> HealthStatus:
    """The process answers."""
    return HealthStatus(status="alive")


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def readyz(request: Request):
    """The model is loaded and warmed up, and the server is not shutting down (on Ray Serve: and
    every replica of the deployment runs)."""
    state = getattr(request.app.state, "server", None)
    if state is None or not state.ready:
        return JSONResponse({"status": "draining" if state else "loading"}, status_code=503)
    replicas_waiting = getattr(request.app.state, "replicas_waiting", None)    # set by ray_serve.py
    if replicas_waiting is not None and (waiting := await replicas_waiting()):
        return JSONResponse({"status": waiting}, status_code=503)
    return HealthStatus(status="ready")
