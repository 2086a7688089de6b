"""Optional bearer-token auth. Keys are compared in constant time, against every key, so neither
the match position nor a shared prefix leaks through timing."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ERROR_TYPE_KEY, Unauthorized, error_response

_bearer = HTTPBearer(auto_error=False, description="An API key from HYDRA_RM_API_KEYS.")


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests: compare_digest on raw keys of different lengths leaks the length.
    return hashlib.sha256(value.encode("utf-8")).digest()


def key_matches(candidate: str, keys: Sequence[SecretStr]) -> bool:
    given = _digest(candidate)
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given, _digest(key.get_secret_value()))
    return ok


def key_problem(scheme: str | None, token: str, keys: Sequence[SecretStr]) -> str | None:
    """Why a request's credentials do not pass (None: they do): the one check the middleware and the
    route dependency both run."""
    if scheme is None or scheme.lower() != "bearer":
        return "missing API key: send `Authorization: Bearer <key>`"
    if not key_matches(token.strip(), keys):
        return "invalid API key"
    return None


class ApiKeyMiddleware:
    """Checks the key before the body is read: an unauthenticated client must not make the server
    buffer and parse up to max_body_bytes (FastAPI reads the body before running dependencies)."""

    def __init__(self, app: ASGIApp, keys: Sequence[SecretStr], protected: frozenset[str]) -> None:
        self.app = app
        self.keys = tuple(keys)
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.protected:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        message = key_problem(scheme if header is not None else None, token, self.keys)
        if message is None:
            await self.app(scope, receive, send)
            return
        scope[ERROR_TYPE_KEY] = "unauthorized"
        response = error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def api_key_dependency(
    keys: Sequence[SecretStr],
) -> Callable[[HTTPAuthorizationCredentials | None], Awaitable[None]]:
    """A route dependency that demands one of `keys`; it also documents the scheme in OpenAPI."""
    frozen = tuple(keys)

    async def require_api_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> None:
        scheme, token = (credentials.scheme, credentials.credentials) if credentials else (None, "")
        message = key_problem(scheme, token, frozen)
        if message is not None:
            raise Unauthorized(message)

    return require_api_key
