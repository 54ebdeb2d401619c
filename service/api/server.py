"""How uvicorn serves the API: request head and body deadlines, head size, keep-alive, Nagle, a connection cap.

uvicorn has no request-header timeout: a client that sends its headers a byte at a time (or never
finishes them) holds a connection, and its slot, for as long as it likes. ``TimedH11Protocol`` is
uvicorn's h11 protocol plus, per connection:

- a head deadline: the headers of each request must be complete within ``header_timeout_s`` of the
  connection opening (or of the previous response), else the connection is closed;
- a body deadline: a request body must be complete within ``body_deadline_s`` of its headers. The routes
  that read bodies answer 408 at that deadline (``service.api.uploads``, which also cuts a body whose
  next chunk takes over ``body_timeout_s``); this protocol closes the connection a little later in case
  nothing read the body;
- a head limit checked on every write, not only on a head that arrives in pieces (h11's own limit):
  a head over ``MAX_HEADER_BYTES`` gets 431 and the connection is closed;
- a request with both ``Content-Length`` and ``Transfer-Encoding`` gets 400 and the connection is closed
  (RFC 9112 6.3: the framing is ambiguous, a proxy in front may have read it the other way);
- ``TCP_NODELAY``: a response is written in pieces (head, body), and with Nagle's algorithm on, each
  reused connection waits ~40 ms for the client's delayed ACK between them.

``max_connections`` caps the open connections of the process: past it, a request gets a JSON 503 with
``Retry-After`` at once and its connection is closed, instead of the process running out of descriptors
or memory. The operations endpoints (``/healthz``, ``/readyz``, ``/metrics``) are answered past the cap,
up to ``OPERATIONS_RESERVE`` more connections, so a liveness probe never restarts an API that is only
busy. (uvicorn's own ``limit_concurrency`` answers everything alike in plain text, health checks
included, and counts the asking connection and requests in flight against the limit.)
"""
from __future__ import annotations

import functools
import json
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

MAX_HEADER_BYTES = 64 * 1024         # a request head larger than this is refused (431)
OPERATIONS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
OPERATIONS_RESERVE = 64              # connections past max_connections that only the operations paths may use
RETRY_AT_CAP_S = 1
KEEP_ALIVE_S = 5                     # idle keep-alive connections are closed after this
BODY_DEADLINE_GRACE_S = 5.0          # the protocol's own cut comes this long after the routes' 408


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with head and body deadlines, a head limit per write and no Nagle delay."""

    def __init__(self, *args, header_timeout_s: float = 10.0, body_deadline_s: float = 120.0,
                 max_connections: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_deadline_s = body_deadline_s
        if max_connections is not None:      # every request goes through the cap (see ``_capped``)
            self.app = functools.partial(_capped, self.app, self.connections, max_connections)
        self._header_timer = None
        self._body_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            refusal = _refuse_head(self.conn.trailing_data[0] + data)
            if refusal is not None:
                self._refuse(*refusal)
                return
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()                      # the next request's headers get the same deadline

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is not h11.IDLE:            # a request's headers are complete
            self._disarm()
        if state is h11.SEND_BODY and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.body_deadline_s + BODY_DEADLINE_GRACE_S, self._body_too_slow)
        elif state is not h11.SEND_BODY:
            self._disarm_body()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %.0fs", self.header_timeout_s)
            self.transport.close()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.logger.info("closing a connection whose request body took over %.0fs", self.body_deadline_s)
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer a request h11 has not parsed (raw bytes), then close the connection."""
        self.logger.info("refused a request head: %s", message)
        body = (message + "\n").encode()
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()


async def _capped(app, connections: set, max_connections: int, scope, receive, send) -> None:
    """``app``, unless this process holds more than ``max_connections`` open connections (this one
    included): then a JSON 503 with ``Retry-After``, and the connection is closed. The operations paths
    get ``OPERATIONS_RESERVE`` connections more."""
    open_now = len(connections)
    limit = max_connections + (OPERATIONS_RESERVE if scope.get("path") in OPERATIONS_PATHS else 0)
    if open_now <= limit:
        await app(scope, receive, send)
        return
    body = json.dumps({"detail": f"the API holds {open_now - 1} connections, its limit (EQM_MAX_CONNECTIONS = "
                                 f"{max_connections}); retry in a moment"}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AT_CAP_S).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _refuse_head(head: bytes) -> tuple[int, str, str] | None:
    """(status, reason, message) when the start of a request (the bytes so far) must be refused, else None."""
    end = head.find(b"\r\n\r\n")
    if (end < 0 and len(head) > MAX_HEADER_BYTES) or end + 4 > MAX_HEADER_BYTES:
        return 431, "Request Header Fields Too Large", (f"the request head is over {MAX_HEADER_BYTES} bytes; "
                                                         f"send fewer or shorter headers")
    if end < 0:
        return None
    names = {line.split(b":", 1)[0].strip().lower() for line in head[:end].split(b"\r\n")[1:]}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, "Bad Request", "the request has both Content-Length and Transfer-Encoding; send only one"
    return None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (a partial, so it pickles to workers);
    also raises the open-file limit the connection cap needs."""
    raise_open_file_limit(settings)
    return {"http": functools.partial(TimedH11Protocol, header_timeout_s=settings.header_timeout_s,
                                      body_deadline_s=settings.body_deadline_s,
                                      max_connections=settings.max_connections),
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "timeout_keep_alive": KEEP_ALIVE_S}


def raise_open_file_limit(settings: Settings) -> None:
    """Raise this process' soft limit on open files towards what the connection cap needs (each
    connection is a descriptor; Redis, logs and the model take some more), within the hard limit."""
    try:
        import resource
    except ImportError:                     # not on POSIX: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + OPERATIONS_RESERVE + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
