"""`GET /playground`: a page where a person scores candidate responses and sees what every head thinks.

Three static files (HTML, CSS, JS; no build step, nothing vendored) shipped as package data in
service/playground/. The page is only a client of the public API (`/v1/models`, `/v1/score`): it
holds no server data, so with API keys set it is served to anyone and asks for a key, which it sends
with each call as `Authorization: Bearer`. The Content-Security-Policy keeps it on this origin: the
browser refuses any script, style or connection elsewhere.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(tags=["playground"], include_in_schema=False)

_TYPES = {
    "playground.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
# What HYDRA_RM_PLAYGROUND=auth guards, besides the API routes the page calls (always guarded by keys).
PATHS = frozenset({"/playground", "/playground/playground.css", "/playground/playground.js"})

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server with a newer page is picked up at once
}


@cache
def _asset(name: str) -> bytes:
    return files("service").joinpath("playground", name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=_TYPES[name], headers=_HEADERS)


@router.get("/playground")
async def page() -> Response:
    return _serve("playground.html")


@router.get("/playground/playground.css")
async def stylesheet() -> Response:
    return _serve("playground.css")


@router.get("/playground/playground.js")
async def script() -> Response:
    return _serve("playground.js")
