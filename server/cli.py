"""``rmt-serve``: flags (or RMT_* environment variables) -> settings -> uvicorn."""
from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from .app import Server, create_app, grpc_frontend
from .model_host import load_served_model
from .protocol import uvicorn_options
from .settings import parse_cli


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_cli(sys.argv[1:] if argv is None else argv)
    except (ValidationError, SettingsError) as exc:
        print(f"rmt-serve: {exc}", file=sys.stderr)
        return 2
    if settings.grpc_port is not None:
        if settings.ray is not None:    # every replica's lifespan would bind the same port; Serve proxies HTTP only
            print("rmt-serve: --grpc-port is not served through --ray (Ray Serve's proxy carries the HTTP API)",
                  file=sys.stderr)
            return 2
        try:
            grpc_frontend()
        except RuntimeError as exc:
            print(f"rmt-serve: {exc}", file=sys.stderr)
            return 2
    if settings.ray is not None:
        from .ray_serve import serve_on_ray     # Ray is optional: imported only here
        return serve_on_ray(settings)
    try:
        # Fail fast with a clean message (missing file, TensorRT absent, bad checkpoint) before binding;
        # the loaded model is handed to the app, so it is loaded once.
        served = load_served_model(settings)
    except Exception as exc:  # noqa: BLE001 -- ours (checkpoint, missing backend) or the runtime's (corrupt file)
        print(f"rmt-serve: cannot load the model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    Server(uvicorn.Config(create_app(settings, served), host=settings.host, port=settings.port,
                          log_level=settings.log_level, timeout_graceful_shutdown=settings.graceful_timeout_s,
                          **uvicorn_options(settings))).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
