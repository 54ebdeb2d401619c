"""Client conventions shared by the routes: absolute links, ``Prefer: wait``, callers, idempotency keys.

- **Links** are absolute: ``EQM_PUBLIC_URL`` when set, else the request's own scheme and host with a
  proxy's ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` / ``X-Forwarded-Prefix`` applied.
- **Waiting**: ``?wait=true`` waits up to ``EQM_WAIT_TIMEOUT_S``; ``Prefer: wait=N`` (RFC 7240) waits up
  to ``min(N, EQM_WAIT_TIMEOUT_S)`` and the answer says ``Preference-Applied: wait=N``.
- **Callers**: with API keys on, a caller is the key it sends (stored only as a hash); with keys off
  every request is the same anonymous caller. Listings and idempotency keys are per caller.
- **Idempotency**: a POST with ``Idempotency-Key: K`` records ``K -> (job id, fingerprint of the
  request)`` for the result TTL. The same key with the same request gives back the original job
  (200); with a different request it is a 422. The fingerprint is the route plus the body with JSON
  keys sorted (multipart: each field, files by their SHA-256), so formatting does not matter.
"""
from __future__ import annotations

import hashlib
import json
import re

from fastapi import Header, Query, Request
from starlette.datastructures import UploadFile

from service.api.deps import key_id
from service.api.errors import field_error
from service.settings import Settings

ANONYMOUS = "-"
IDEMPOTENCY_KEY_MAX = 255
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE)
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def public_base(request: Request, settings: Settings) -> str:
    """``scheme://host[:port][/prefix]`` that clients reach this API at, without a trailing slash."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    headers = request.headers
    scheme = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if scheme not in ("http", "https"):
        scheme = request.url.scheme
    host = headers.get("x-forwarded-host", "").split(",")[0].strip()
    if not host or not _HOST.match(host):
        host = request.url.netloc
    prefix = headers.get("x-forwarded-prefix", "").split(",")[0].strip().rstrip("/")
    if prefix and not re.fullmatch(r"(/[A-Za-z0-9._~\-]+)+", prefix):
        prefix = ""
    return f"{scheme}://{host}{prefix}"


def absolute(request: Request, settings: Settings, path: str) -> str:
    return public_base(request, settings) + path


def prefer_wait(request: Request) -> float | None:
    """Seconds asked for by ``Prefer: wait=N`` (RFC 7240), or None."""
    for value in request.headers.getlist("prefer"):
        match = _PREFER_WAIT.search(value)
        if match:
            return float(match.group(1))
    return None


def wait_seconds(request: Request, settings: Settings, wait: bool) -> tuple[float, dict[str, str]]:
    """How long to wait for the job (0 = answer at once) and the headers that say so."""
    preferred = prefer_wait(request)
    if preferred is not None:
        applied = min(preferred, settings.wait_timeout_s)
        return applied, {"Preference-Applied": f"wait={applied:g}"}
    return (settings.wait_timeout_s if wait else 0.0), {}


def caller(request: Request, settings: Settings) -> str:
    """Who is asking: a hash of the API key when keys are on, else the anonymous caller."""
    if not settings.api_keys and not settings.admin_keys:
        return ANONYMOUS
    _, _, token = request.headers.get("authorization", "").partition(" ")
    return key_id(token.strip())        # the same digest the job record keeps as its owner


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, checked; ``ValueError`` with a one-line reason when unusable."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise ValueError(f"the Idempotency-Key header must be 1..{IDEMPOTENCY_KEY_MAX} printable characters")
    return key


async def request_fingerprint(request: Request) -> str:
    """SHA-256 of the route and the request's content (JSON canonicalised, form files hashed)."""
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()           # parsed already by the route: cached on the request
        for name, value in sorted(form.multi_items(), key=lambda item: item[0]):
            if isinstance(value, UploadFile):
                await value.seek(0)
                content = hashlib.sha256(await value.read()).hexdigest()
                await value.seek(0)
                digest.update(f"{name}=file:{content}\n".encode())
            else:
                digest.update(f"{name}={value}\n".encode())
    else:
        body = await request.body()
        try:
            canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
        except ValueError:
            canonical = body
        digest.update(canonical)
    return digest.hexdigest()


INLINE_DOC = "with a finished job (waiting, or a replayed Idempotency-Key): each ready image's bytes as base64 in b64_json"


def client_options(request: Request, inline: bool = Query(False, description=INLINE_DOC),
                   prefer: str | None = Header(None, max_length=200, description="RFC 7240: 'wait=N' waits up to N "
                                               "seconds (at most EQM_WAIT_TIMEOUT_S) for the job to finish"),
                   idempotency_key: str | None = Header(None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX,
                                                        description="the same key and request within the result TTL "
                                                        "return the original job (200) instead of a new one")) -> bool:
    """Route dependency declaring the conventions' query and headers in the schema; returns ``inline``.
    Unknown query parameters are refused (``reject_unknown_query``)."""
    reject_unknown_query(request)
    return inline


def _query_names(dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def reject_unknown_query(request: Request) -> None:
    """Route dependency: a query parameter the route does not declare is a 422 (a typo such as ``?inlne``
    is reported, not ignored, as unknown body fields are)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = _query_names(dependant)
    for name in request.query_params.keys():
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise field_error(("query", name), f"unknown query parameter {name!r}; this route takes: {known}")
