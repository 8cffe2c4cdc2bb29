"""The server's HTTP connections: a header size limit and a read deadline, so a slow or endless request cannot hold a
connection (and its file descriptor and buffers) forever.

uvicorn offers two HTTP/1.1 parsers. httptools (its default when installed) has no limit on the request head: a
100 MB header line is buffered whole, and uvicorn's ``h11_max_incomplete_event_size`` does not apply to it. h11
refuses a head that grows past that size before it ends with a 400, so the server runs h11 with the limit set
explicitly (``HEADER_LIMIT``). h11 is the slower parser: measured here (keep-alive, uvloop), a bare ``/healthz``
takes about 190 us with h11 against 115-150 us with httptools, which an embedding request, milliseconds in the
towers, does not notice. h11 checks only a head still incomplete, so one that arrives whole in a single read (up to
a read's size, some 256 KB) passes it; ``limit_headers`` answers those 431.

Neither parser has a read timeout: ``timeout_keep_alive`` only closes a connection idle *between* requests. So each
connection gets a deadline (``read_timeout`` seconds) by which its request's head and body must have arrived, armed
when the connection opens and again after each response. A connection still sending then (slow headers, a slow
body, a Content-Length above what is sent) is closed and logged in one line; a handler that was reading its body
sees the client gone (``ClientDisconnect``). nginx's ``client_header_timeout`` / ``client_body_timeout`` are the
model, as a total instead of a per-read gap so that a trickle of one byte a second is bounded too.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_LIMIT = 16 * 1024  # bytes of request line + headers; h11's default, set here so that it is a choice

logger = logging.getLogger("synergy.serve")


def bounded_h11(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a per-request read deadline of ``read_timeout`` seconds (pass as ``http=``)."""

    class BoundedH11Protocol(H11Protocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_read_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_read_deadline()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            self._disarm_read_deadline()
            super().connection_lost(exc)

        def _arm_read_deadline(self) -> None:
            self._disarm_read_deadline()
            self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm_read_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            # IDLE: the head has not arrived (or not all of it); SEND_BODY: the body has not. DONE: the request is
            # in and the handler's own timeout applies.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                where = "body" if self.conn.their_state is h11.SEND_BODY else "headers"
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                logger.warning("closed %s: its request %s did not arrive within %g s", client, where, read_timeout)
                self.transport.close()

    return BoundedH11Protocol


def limit_headers(app, limit: int = HEADER_LIMIT):
    """ASGI middleware: a request whose headers (names, values and separators) exceed ``limit`` bytes -> 431 JSON."""

    async def bounded(scope, receive, send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
            if size > limit:
                message = f"the request's headers are {size} B, over the limit of {limit} B"
                body = json.dumps({"error": {"type": "HeadersTooLarge", "message": message}}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 431, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return bounded
