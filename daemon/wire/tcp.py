"""TCP segment representation shared by the wire layer and the TCP endpoint.

This module holds the *repr* types (in smoltcp's sense): plain values that
``parse`` produces from bytes and ``emit`` turns back into bytes.  The TCP
endpoint (daemon/tcp) and the splice relay (daemon/splice) speak only these
types; only daemon/wire touches raw header bytes.

RFCs: 9293 (TCP header), 7323 (window scale, timestamps), 2018 (SACK).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Flag bits of the TCP header's flags byte (RFC 9293 section 3.1, RFC 3168).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80


@dataclass(slots=True)
class TcpOptions:
    """The TCP options this project understands (RFC 9293 3.2, RFC 7323, RFC 2018).

    ``None`` / ``False`` / empty means the option is absent.  Unknown options
    are skipped by the parser (by their length byte) and not represented.
    """

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)


@dataclass(slots=True)
class TcpSegment:
    """One parsed TCP segment, addresses excluded (they live in the flow key).

    ``window`` is the raw 16-bit header field: scaling (RFC 7323 2.3) is the
    endpoint's business, never the wire layer's.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions = field(default_factory=TcpOptions)
    payload: bytes | memoryview = b""
    urgent: int = 0

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus SYN and FIN (RFC 9293 3.4)."""
        return len(self.payload) + (self.flags & SYN != 0) + (self.flags & FIN != 0)
