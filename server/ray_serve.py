"""``rmt-serve --ray``: the same FastAPI application (``create_app``) served by Ray Serve replicas.

Each replica builds the app itself (``__serve_build_asgi_app__``, evaluated on the replica) and Ray
Serve runs the app's lifespan there before the replica counts as RUNNING (ray/serve/_private/
replica.py, ``_initialize_asgi_callable``), so every replica loads its own runner and dynamic
batcher exactly as ``rmt-serve`` does; the lifespan's shutdown (drain) runs when Ray stops it.
What the replicas add: the ``X-RMT-Replica`` response header and ``rmt_replica_info`` in /metrics
(which replica answered, its PID), /readyz that also waits for every replica of the deployment, and
``check_health`` so Ray replaces a replica whose batcher or runner is broken.

Two ways in: ``rmt-serve --ray [ADDRESS] --replicas N`` (``serve_on_ray``), or Ray's own
``serve run rmt_deploy.server.ray_serve:app_builder model=rmt_t replicas=2`` (``app_builder``).
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from prometheus_client import Info

from rmt_deploy.cli_args import ray_address
from rmt_deploy.ray_cluster import RayMissing, connect, device_inside_ray, import_ray
from rmt_deploy.runners.registry import ARTIFACT_KINDS

from .app import create_app
from .model_host import load_served_model
from .settings import ServeSettings

APP_NAME = "rmt-serve"
DEPLOYMENT_NAME = "RMTServer"
REPLICA_HEADER = "x-rmt-replica"
HEALTH_CHECK_PERIOD_S = 5.0         # how soon Ray notices a dead or broken replica (its default: 10 s)
RUNNER_FAILURES_UNHEALTHY = 3       # runner calls failing in a row that make a replica unhealthy
STATUS_TTL_S = 1.0                  # /readyz asks the Serve controller at most this often per replica
PROXY_TIMEOUT_MARGIN_S = 5.0        # the replica's own 504 (--request-timeout-s) comes before the proxy's 408


class ReplicaHeader:
    """Every response names the replica that produced it."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_replica)


class ReplicasWaiting:
    """For /readyz: None when every replica of the deployment is RUNNING (Ray Serve's status, asked
    at most every STATUS_TTL_S), else what it waits for."""

    def __init__(self, app_name: str, deployment: str):
        self.app_name, self.deployment = app_name, deployment
        self._asked_at: float | None = None
        self._waiting: str | None = None

    async def __call__(self) -> str | None:
        if self._asked_at is None or time.monotonic() - self._asked_at > STATUS_TTL_S:
            self._waiting = await asyncio.to_thread(self._ask)      # a blocking call to the controller
            self._asked_at = time.monotonic()
        return self._waiting

    def _ask(self) -> str | None:
        from ray import serve
        try:
            status = serve.status().applications[self.app_name].deployments[self.deployment]
        except Exception as exc:  # noqa: BLE001 -- controller unreachable or app deleted: not ready, say why
            return f"Ray Serve status unavailable: {type(exc).__name__}: {exc}"
        states = {_name(state): count for state, count in status.replica_states.items() if count}
        if _name(status.status) == "HEALTHY" and set(states) == {"RUNNING"}:
            return None
        counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "no replicas"
        return f"replicas {_name(status.status)}: {counts}"


def _name(state) -> str:
    """Serve's status enums arrive as enum members or as their plain string values."""
    return getattr(state, "value", state)


class ReplicaServer:
    """One Ray Serve replica of rmt-serve: the app, its runner and batcher, built on the replica."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from ray import serve
        context = serve.get_replica_context()
        app = create_app(self.settings)
        app.state.replicas_waiting = ReplicasWaiting(context.app_name, context.deployment)
        Info("rmt_replica", "The Ray Serve replica that answered this scrape", registry=app.state.metrics.registry
             ).info({"replica": context.replica_tag, "pid": str(os.getpid())})
        app.add_middleware(ReplicaHeader, replica=context.replica_tag)
        return app

    async def check_health(self) -> None:
        """Ray calls this every HEALTH_CHECK_PERIOD_S once the replica runs; raising makes Ray replace it."""
        if problem := replica_health_problem(self.app):
            raise RuntimeError(problem)


def replica_health_problem(app) -> str | None:
    """Why the app's replica cannot serve (its batcher stopped, or its runner failed batch after
    batch: a lost device, a corrupted session), or None. Not judged while it starts or drains."""
    state = getattr(app.state, "server", None)
    if state is None or not state.ready:
        return None
    if not state.batcher.running:
        return "the dynamic batcher has stopped: this replica cannot infer"
    if state.batcher.failures_in_a_row >= RUNNER_FAILURES_UNHEALTHY:
        return f"the runner failed {state.batcher.failures_in_a_row} batches in a row"
    return None


def _for_replicas(settings: ServeSettings) -> ServeSettings:
    """Settings every replica can use wherever it runs: files by absolute path (a replica's working
    directory is not the caller's), the device as the replica sees it (its GPU request stays)."""
    # the checkpoint, and every file kind a backend loads (the registry's artifact kinds but "model")
    files = {name: Path(value).resolve() for name in ("checkpoint", *ARTIFACT_KINDS)
             if name != "model" and (value := getattr(settings, name)) is not None}
    if Path(settings.model).is_file():          # a config JSON, not a variant name
        files["model"] = str(Path(settings.model).resolve())
    return settings.model_copy(update={**files, "device": device_inside_ray(settings.device)})


def _cpus_per_replica(settings: ServeSettings) -> float:
    return settings.ray_num_cpus_per_replica or settings.threads or 1


def deployment_options(settings: ServeSettings) -> dict:
    """Ray Serve's deployment options from rmt-serve's settings."""
    actor = {"num_cpus": _cpus_per_replica(settings)}
    if settings.device.startswith("cuda"):
        actor["num_gpus"] = 1
    options = {
        "ray_actor_options": actor,
        # a replica takes what its own batcher can hold; more waits in Ray's queue, bounded like ours (503)
        "max_ongoing_requests": settings.max_queue_size + settings.max_batch_size,
        "max_queued_requests": settings.max_queue_size,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": settings.graceful_timeout_s,
    }
    if settings.min_replicas is None and settings.max_replicas is None:
        options["num_replicas"] = settings.replicas
        return options
    low = 1 if settings.min_replicas is None else settings.min_replicas
    high = max(settings.max_replicas or 0, settings.replicas, low)
    options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                     "initial_replicas": min(max(settings.replicas, low), high),
                                     # a replica with a full batch waiting is busy enough
                                     "target_ongoing_requests": settings.max_batch_size}
    return options


def build_app(settings: ServeSettings):
    """The Ray Serve application: one deployment of ReplicaServer, bound to portable settings."""
    import_ray("serve")
    from ray import serve
    deployment = serve.deployment(serve.ingress()(ReplicaServer), name=DEPLOYMENT_NAME,
                                  **deployment_options(settings))
    return deployment.bind(_for_replicas(settings))


def app_builder(args: dict[str, str]):
    """``serve run rmt_deploy.server.ray_serve:app_builder model=rmt_t checkpoint=rmt_t.pth replicas=2``:
    the arguments are rmt-serve's settings by name (``image_size=64`` or ``image-size=64``), RMT_*
    variables fill in the rest. Host and port are Serve's (``serve run``'s, or the config file's)."""
    given = {key.replace("-", "_"): value for key, value in args.items()}
    if unknown := sorted(set(given) - set(ServeSettings.model_fields)):
        raise ValueError(f"unknown rmt-serve setting(s) {', '.join(unknown)}; the settings are "
                         f"{', '.join(sorted(ServeSettings.model_fields))}")
    return build_app(ServeSettings(**{"ray": "auto", **given}))


def http_options(settings: ServeSettings) -> dict:
    return {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": settings.keep_alive_timeout_s,
            "request_timeout_s": settings.request_timeout_s + PROXY_TIMEOUT_MARGIN_S}


def _cannot_load(settings: ServeSettings) -> str | None:
    """Load the model once here, as rmt-serve does, so a bad file fails at once with its reason
    instead of in every replica Ray retries."""
    try:
        load_served_model(settings).close()
    except Exception as exc:  # noqa: BLE001 -- ours (checkpoint, missing backend) or the runtime's (corrupt file)
        return f"{type(exc).__name__}: {exc}"
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_on_ray(settings: ServeSettings) -> int:
    """Deploy on the cluster (joined, or a local one started here), serve until SIGTERM / Ctrl-C, then
    shut down what was started: Serve and the local cluster, or only this application on a joined one."""
    try:
        ray = import_ray("serve")
    except RayMissing as exc:
        print(f"rmt-serve: {exc}", file=sys.stderr)
        return 2
    local = ray_address(settings.ray) is None
    if local and (problem := _cannot_load(settings)):    # a joined cluster's nodes may have other devices
        print(f"rmt-serve: cannot load the model: {problem}", file=sys.stderr)
        return 1
    from ray import serve
    cpus = _cpus_per_replica(settings) * max(settings.replicas, settings.max_replicas or 0)
    try:
        started_cluster = connect(None if local else settings.ray, cpus, component="serve", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:     # no cluster there, or a bad address
        print(f"rmt-serve: cannot reach the Ray cluster at {settings.ray}: {exc}", file=sys.stderr)
        return 1
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options=http_options(settings))
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        print(f"rmt-serve: serving on Ray Serve at http://{settings.host}:{settings.port} "
              f"({deployment_summary(settings)}); Ctrl-C or SIGTERM stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("rmt-serve: shutting down Ray Serve", flush=True)
        return 0
    except RuntimeError as exc:         # the deployment failed (Ray's message names the replica's error)
        print(f"rmt-serve: Ray Serve could not deploy: {exc}", file=sys.stderr)
        return 1
    finally:
        for signum in previous:         # a second Ctrl-C or SIGTERM must not cut the shutdown short
            signal.signal(signum, signal.SIG_IGN)
        if started_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def deployment_summary(settings: ServeSettings) -> str:
    options = deployment_options(settings)
    scaling = options.get("autoscaling_config")
    count = (f"{scaling['min_replicas']}-{scaling['max_replicas']} replicas (autoscaling)" if scaling
             else f"{options['num_replicas']} replicas")
    return f"{count}, {options['ray_actor_options']['num_cpus']:g} CPUs each"
