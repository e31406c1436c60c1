"""The HTTP/1.1 connection handling uvicorn runs for rmt-serve, with the two limits uvicorn lacks:
a deadline for a request's headers (slowloris connections that dribble a header byte at a time are
closed with 408) and a header size limit answered with 431 instead of a reset connection.

Both refusals are written straight to the socket, in the server's ``{"error"}`` shape, then the
connection lingers: what the client is still sending is read and dropped for a moment before
closing, because closing a socket with unread data resets it and the client would never see the
answer (nginx's lingering close).
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeSettings

END_OF_HEAD = re.compile(rb"\n\r?\n")       # h11 accepts bare LF line endings too
LINGER_S = 2.0


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_timer, self._refused = None, False
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:                # lingering after a refusal: drop what still arrives
            return
        if self.conn.their_state is h11.IDLE:          # (part of) a request head
            if self._head_size(data) > self.max_header_bytes:
                return self._refuse(431, f"request headers are above the limit of {self.max_header_bytes} bytes")
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def send_400_response(self, msg: str) -> None:
        """Malformed requests (h11 could not parse them) get the same JSON error shape."""
        self._refuse(400, f"invalid HTTP request: {msg}")

    def _head_size(self, data: bytes) -> int:
        buffered = self.conn.trailing_data[0] + data
        end = END_OF_HEAD.search(buffered)
        return end.start() if end else len(buffered)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._disarm_header_timer()
        self._unset_keepalive_if_required()
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def uvicorn_options(settings: ServeSettings) -> dict:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply the server's HTTP limits."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes})
    return {"http": protocol, "h11_max_incomplete_event_size": settings.max_header_bytes,
            "timeout_keep_alive": settings.keep_alive_timeout_s}
