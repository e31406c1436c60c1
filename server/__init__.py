"""rmt-serve: RMT classification and backbone features over HTTP (REST + KServe v2), with dynamic batching."""
from .app import create_app
from .settings import ServeSettings

__all__ = ["create_app", "ServeSettings"]
