"""How uvicorn serves the API: request header and body timeouts, header size, keep-alive.

uvicorn has no request-header timeout: a client that sends its headers a byte at a time (or never
finishes them) holds a connection, and its slot, for as long as it likes. ``TimedH11Protocol`` is
uvicorn's h11 protocol plus one timer per connection: the headers of each request must be complete
within ``header_timeout_s`` of the connection opening (or of the previous response), else the
connection is closed. Body timeouts are per chunk and live with the body limits
(``service.api.uploads``): a body that stops arriving for ``body_timeout_s`` gets 408.
"""
from __future__ import annotations

import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

MAX_HEADER_BYTES = 64 * 1024         # h11 refuses (400) a request head larger than this
KEEP_ALIVE_S = 5                     # idle keep-alive connections are closed after this


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    def __init__(self, *args, header_timeout_s: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()                      # the next request's headers get the same deadline

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:   # a request's headers are complete
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %.0fs", self.header_timeout_s)
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (a partial, so it pickles to workers)."""
    return {"http": functools.partial(TimedH11Protocol, header_timeout_s=settings.header_timeout_s),
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "timeout_keep_alive": KEEP_ALIVE_S}
