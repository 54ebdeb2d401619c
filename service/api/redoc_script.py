"""ReDoc's script as this server serves it: the one ``fastapi-offline`` ships, less its remote logo.

ReDoc's side menu ends with an "API docs by Redocly" link whose logo is an ``<img>`` loading
``https://cdn.redoc.ly/redoc/logo-mini.svg``. The docs pages' Content-Security-Policy refuses it (a
console error and a broken image), and on an air-gapped machine it would hang. The script is read once
from the package and served with that image left out (the link keeps its text), at the same path the
package's static files use, so ``/redoc`` needs nothing from outside the server.
"""
from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Route

log = logging.getLogger("eqm.api")

SCRIPT_NAME = "redoc.standalone.js"
REMOTE_HOST = "cdn.redoc.ly"
# React's createElement("img", {alt: "redocly logo", ..., src: "https://cdn.redoc.ly/..."}) -> null
LOGO_IMAGE = re.compile(r'[\w$]+\.createElement\("img",\{alt:"redocly logo"[^{}]*\}\)')
REMOTE_URL = re.compile(r'"https://' + re.escape(REMOTE_HOST) + r'/[^"]*"')


def local_script(source: str) -> str:
    """``source`` with the logo image removed; any other URL on the CDN becomes an empty string."""
    script = LOGO_IMAGE.sub("null", source)
    if REMOTE_URL.search(script):         # a ReDoc release with another shape: no request is still the rule
        log.warning("ReDoc's script names %s outside the logo; those URLs are emptied", REMOTE_HOST)
        script = REMOTE_URL.sub('""', script)
    return script


@lru_cache(maxsize=1)
def _script_bytes() -> tuple[bytes, str]:
    path = Path(fastapi_offline.__file__).resolve().parent / "static" / SCRIPT_NAME
    body = local_script(path.read_text(encoding="utf-8")).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def serve_local_redoc_script(app: FastAPI, static_url: str) -> None:
    """Answer ``{static_url}/redoc.standalone.js`` with ``local_script`` ahead of the package's mount."""

    async def redoc_script(request: Request) -> Response:
        body, etag = _script_bytes()
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="text/javascript; charset=utf-8", headers=headers)

    app.router.routes.insert(0, Route(f"{static_url}/{SCRIPT_NAME}", redoc_script, methods=["GET", "HEAD"]))
