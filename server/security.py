"""Optional bearer token (RMT_API_KEY) on the inference endpoints; health and metrics stay open
for orchestrators and scrapers."""
from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from .errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="required when the server runs with RMT_API_KEY set")


def check_token(given: str, expected: SecretStr | None) -> None:
    """401 unless ``given`` is the token (compared in constant time); no token set: anyone may call.
    HTTP's Authorization header and gRPC's ``authorization`` metadata both land here."""
    if expected is not None and not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    check_token(credentials.credentials if credentials else "", request.app.state.settings.api_key)
