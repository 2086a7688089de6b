"""HTTP-level errors in the documented error shape.

A request the HTTP parser rejects (an unknown method, a bad or duplicated Content-Length, an illegal
request line or header) never reaches the app: uvicorn answers it itself with a plain-text
`400 Invalid HTTP request received.`, which clients that parse `{"error": ...}` choke on (found by an
outside attack). These protocol classes are uvicorn's own, with only that answer reshaped: same
status, `Connection: close` (after a parse error nobody knows where the next request would start),
and the body every other error has, naming the parser's reason and, where it can tell, the field.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import error_body

BAD_REQUEST_TYPE = "bad_request"


def bad_request_body(detail: str | None) -> bytes:
    reason = f" ({detail})" if detail else ""
    message = f"malformed HTTP request{reason}; the connection is closed"
    return json.dumps(error_body(BAD_REQUEST_TYPE, message, _field(detail))).encode()


def _field(detail: str | None) -> str | None:
    text = (detail or "").lower()
    if "content-length" in text:
        return "Content-Length"
    if "transfer-encoding" in text:
        return "Transfer-Encoding"
    if "method" in text:
        return "method"
    if "header" in text:
        return "headers"
    if "request line" in text or "url" in text or "version" in text:
        return "request_line"
    return None


def _response_head(body: bytes, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [
        *extra,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"connection", b"close"),
    ]


class ShapedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol (used where httptools is missing) with the JSON 400."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parse_error: str | None = None
        next_event = self.conn.next_event

        def recording_next_event() -> Any:
            import h11

            try:
                return next_event()
            except h11.RemoteProtocolError as e:
                self._parse_error = str(e)
                raise

        self.conn.next_event = recording_next_event  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        import h11

        body = bad_request_body(self._parse_error)
        event = h11.Response(status_code=400, headers=_response_head(body, []), reason=b"Bad Request")
        self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def _httptools_protocol() -> type | None:
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in the lock; h11 is the fallback
        return None

    class _RecordingParser:
        """Forwards to the C parser and remembers why it refused the bytes."""

        __slots__ = ("_owner", "_parser")

        def __init__(self, parser: Any, owner: Any) -> None:
            self._parser = parser
            self._owner = owner

        def feed_data(self, data: bytes) -> None:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                self._owner._parse_error = str(e)
                raise

        def __getattr__(self, name: str) -> Any:
            return getattr(self._parser, name)

    class ShapedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol (the default here) with the JSON 400."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._parse_error: str | None = None
            self.parser = _RecordingParser(self.parser, self)  # type: ignore[assignment]

        def send_400_response(self, msg: str) -> None:
            body = bad_request_body(self._parse_error)
            head = _response_head(body, list(self.server_state.default_headers))
            lines = [
                b"HTTP/1.1 400 Bad Request\r\n",
                *(name + b": " + value + b"\r\n" for name, value in head),
            ]
            self.transport.write(b"".join([*lines, b"\r\n", body]))
            self.transport.close()

    return ShapedHttpToolsProtocol


ShapedHttpToolsProtocol = _httptools_protocol()


def shaped_protocol(http: str) -> type | str:
    """The protocol class for uvicorn's `http` setting: ours where we know theirs, else unchanged."""
    if http == "h11":
        return ShapedH11Protocol
    if http in {"auto", "httptools"} and ShapedHttpToolsProtocol is not None:
        return ShapedHttpToolsProtocol
    if http == "auto":
        return ShapedH11Protocol
    return http
