"""Optional bearer-token auth. Keys are compared in constant time, against every key, so neither
the match position nor a shared prefix leaks through timing."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key from HYDRA_RM_API_KEYS.")


def key_matches(candidate: str, keys: Sequence[SecretStr]) -> bool:
    given = candidate.encode("utf-8")
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given, key.get_secret_value().encode("utf-8"))
    return ok


def api_key_dependency(
    keys: Sequence[SecretStr],
) -> Callable[[HTTPAuthorizationCredentials | None], Awaitable[None]]:
    """A route dependency that demands one of `keys`; it also documents the scheme in OpenAPI."""
    frozen = tuple(keys)

    async def require_api_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        if not key_matches(credentials.credentials, frozen):
            raise Unauthorized("invalid API key")

    return require_api_key
