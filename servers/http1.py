"""HTTP/1.0 message heads (RFC 1945), parsed and built without I/O.

Only what the origin server and the load generator exchange: a request line or
status line, header fields, and Content-Length framing. Bodies are the
callers' business. Malformed input raises :class:`HttpParseError`, which
carries the status code a server should answer with (RFC 1945 section 9.4).
"""

from __future__ import annotations

from dataclasses import dataclass

# A head larger than this is refused: ours are a few dozen bytes, and a bound
# keeps a misbehaving peer from growing a buffer forever.
MAX_HEAD = 16 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class HttpParseError(ValueError):
    """A head that cannot be parsed; ``status`` is the code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True, frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-cased names; a repeated field keeps its last value

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]


@dataclass(slots=True, frozen=True)
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: dict[str, str]


def head_end(buffer: bytes | bytearray) -> int:
    """Length of the head at the start of ``buffer`` including its blank line, or -1 if incomplete.

    RFC 1945 section 4.1 asks for CRLF but tolerant applications accept a bare
    LF; so do we.
    """
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def parse_request_head(head: bytes | bytearray) -> RequestHead:
    first, headers = _split_head(head)
    parts = first.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpParseError(400, f"malformed request line {first!r}")
    method, target, version = parts
    if not version.startswith("HTTP/"):
        raise HttpParseError(400, f"malformed request line {first!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpParseError(505, f"unsupported version {version!r}")
    if not target.startswith("/"):
        raise HttpParseError(400, f"target {target!r} is not an absolute path")
    return RequestHead(method, target, version, headers)


def parse_response_head(head: bytes | bytearray) -> ResponseHead:
    first, headers = _split_head(head)
    version, _, rest = first.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise HttpParseError(502, f"malformed status line {first!r}")
    return ResponseHead(version, int(code), reason, headers)


def content_length(headers: dict[str, str]) -> int | None:
    """The Content-Length value, None when absent; HttpParseError(400) when not a number."""
    value = headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise HttpParseError(400, f"bad Content-Length {value!r}")
    return int(value)


def response_head(status: int, length: int, extra: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.0 response head; the connection closes after the body (RFC 1945 section 7.2.2)."""
    lines = [
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Unknown')}",
        "Content-Type: application/octet-stream" if status == 200 else "Content-Type: text/plain",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_head(method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.0"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _split_head(head: bytes | bytearray) -> tuple[str, dict[str, str]]:
    if len(head) > MAX_HEAD:
        raise HttpParseError(431, f"head longer than {MAX_HEAD} bytes")
    # latin-1 never fails to decode, so odd bytes surface as a parse error below
    # rather than as a UnicodeDecodeError.
    lines = bytes(head).decode("latin-1").replace("\r\n", "\n").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HttpParseError(400, "empty head")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpParseError(400, f"malformed header line {line!r}")
        headers[name.lower()] = value.strip()
    return lines[0], headers
