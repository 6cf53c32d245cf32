"""IPv6 header: a checked view over a buffer and a parsed repr (RFC 8200).

``Ipv6Packet(buf)`` validates the fixed header and walks the extension
headers once, so that ``protocol`` and ``payload`` name the upper layer the
way ``Ipv4Packet``'s do.  Hop-by-Hop Options, Routing and Destination
Options headers are skipped (RFC 8200 4: a host processes them in order;
none of their options concerns TCP); a Fragment header marks the packet a
fragment (``is_fragment``: the daemon counts and drops those, as it never
sends anything that gets fragmented and does no reassembly); ESP, AH and
any header this module does not know end the walk, so that ``protocol`` is
not TCP and the packet is counted as such, never misread.

Fixed header (RFC 8200 3)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    |Version| Traffic Class |           Flow Label                  |
    |         Payload Length        |  Next Header  |   Hop Limit   |
    |                Source Address (128 bits)                      |
    |             Destination Address (128 bits)                    |

The traffic class holds DSCP and ECN like IPv4's old TOS byte (RFC 2474,
RFC 3168 5).  There is no header checksum: the upper layer's pseudo-header
(``checksum.pseudo_header_sum`` with 16-byte addresses, RFC 8200 8.1)
covers the addresses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.wire.error import WireError

HEADER_LEN = 40
# Next Header values (IANA "Assigned Internet Protocol Numbers").
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
DEST_OPTIONS = 60
NO_NEXT_HEADER = 59
# Headers skipped on the way to the upper layer: (hdr ext len + 1) * 8 bytes.
_SKIPPED = frozenset({HOP_BY_HOP, ROUTING, DEST_OPTIONS})
# A longer chain is not a packet anyone sends: refused, not walked.
MAX_EXTENSION_HEADERS = 8

_FIXED = struct.Struct("!IHBB16s16s")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Ipv6Packet:
    """A length-checked view of an IPv6 packet at the start of ``buffer``.

    A buffer longer than 40 + the payload length is accepted and trimmed.
    Raises ``WireError`` for a short buffer, another version, a jumbogram
    (payload length 0, RFC 2675: never enabled here) and extension headers
    that run past the packet.
    """

    __slots__ = ("_buf", "_fragment", "_offset", "_proto")

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        buf = memoryview(buffer)
        if len(buf) < HEADER_LEN:
            raise WireError(f"IPv6: {len(buf)} bytes, shorter than a header")
        if buf[0] >> 4 != 6:
            raise WireError(f"IPv6: version {buf[0] >> 4}")
        payload_len = _U16.unpack_from(buf, 4)[0]
        if payload_len == 0 and buf[6] != NO_NEXT_HEADER:
            raise WireError("IPv6: payload length 0 (a jumbogram, or nothing to carry)")
        total = HEADER_LEN + payload_len
        if total > len(buf):
            raise WireError(f"IPv6: payload length {payload_len} > {len(buf) - 40} bytes received")
        self._buf = buf[:total]
        self._proto, self._offset, self._fragment = _walk(self._buf)

    @property
    def buffer(self) -> memoryview:
        """The whole packet, trimmed to 40 + the payload length."""
        return self._buf

    @property
    def total_len(self) -> int:
        return len(self._buf)

    @property
    def traffic_class(self) -> int:
        return (int(_U16.unpack_from(self._buf, 0)[0]) >> 4) & 0xFF

    @property
    def ecn(self) -> int:
        """The ECN codepoint (RFC 3168 5), the low two bits of the traffic class."""
        return self.traffic_class & 0x03

    @property
    def flow_label(self) -> int:
        return int(_U32.unpack_from(self._buf, 0)[0]) & 0xFFFFF

    @property
    def next_header(self) -> int:
        """The fixed header's Next Header (an extension header's type, maybe)."""
        return self._buf[6]

    @property
    def hop_limit(self) -> int:
        return self._buf[7]

    @property
    def src_addr(self) -> bytes:
        return bytes(self._buf[8:24])

    @property
    def dst_addr(self) -> bytes:
        return bytes(self._buf[24:40])

    @property
    def protocol(self) -> int:
        """The upper-layer protocol after the extension headers (or the header that
        ended the walk: ESP, AH, a fragment's, one unknown here, 59)."""
        return self._proto

    @property
    def header_len(self) -> int:
        """Fixed header plus the extension headers before the upper layer."""
        return self._offset

    @property
    def has_extension_headers(self) -> bool:
        return self._offset > HEADER_LEN

    @property
    def is_fragment(self) -> bool:
        """A Fragment header was in the chain (first fragment or later, RFC 8200 4.5)."""
        return self._fragment

    @property
    def payload(self) -> memoryview:
        """The upper-layer bytes (after every extension header walked)."""
        return self._buf[self._offset :]


def _walk(buf: memoryview) -> tuple[int, int, bool]:
    """(upper-layer protocol, its offset, fragment?) of a packet's header chain."""
    proto = buf[6]
    offset = HEADER_LEN
    for _ in range(MAX_EXTENSION_HEADERS):
        if proto == FRAGMENT:
            if offset + 8 > len(buf):
                raise WireError("IPv6: fragment header runs past the packet")
            # The rest is a fragment of something; what it carries is not
            # readable here (a later fragment has no upper-layer header).
            return buf[offset], offset + 8, True
        if proto not in _SKIPPED:
            return proto, offset, False
        if offset + 8 > len(buf):
            raise WireError(f"IPv6: extension header {proto} runs past the packet")
        length = (buf[offset + 1] + 1) * 8
        if offset + length > len(buf):
            raise WireError(
                f"IPv6: extension header {proto} of {length} bytes runs past the packet"
            )
        proto = buf[offset]
        offset += length
    raise WireError(f"IPv6: more than {MAX_EXTENSION_HEADERS} extension headers")


@dataclass(slots=True)
class Ipv6Repr:
    """The IPv6 fixed header the daemon builds packets with; no extension headers."""

    src_addr: bytes
    dst_addr: bytes
    next_header: int
    payload_len: int
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0

    @classmethod
    def parse(cls, packet: Ipv6Packet) -> Ipv6Repr:
        """The fixed header of a checked view; ``next_header`` is the upper layer's."""
        return cls(
            src_addr=packet.src_addr,
            dst_addr=packet.dst_addr,
            next_header=packet.protocol,
            payload_len=packet.total_len - packet.header_len,
            hop_limit=packet.hop_limit,
            traffic_class=packet.traffic_class,
            flow_label=packet.flow_label,
        )

    @property
    def header_len(self) -> int:
        return HEADER_LEN

    def emit(self, buffer: bytearray | memoryview, offset: int = 0) -> None:
        """Write the 40-byte fixed header at ``offset``."""
        if len(self.src_addr) != 16 or len(self.dst_addr) != 16:
            raise WireError("IPv6: addresses are 16 bytes")
        if not 0 < self.payload_len <= 0xFFFF:
            raise WireError(f"IPv6: payload of {self.payload_len} bytes does not fit")
        if not 0 <= self.flow_label <= 0xFFFFF:
            raise WireError(f"IPv6: flow label {self.flow_label:#x} is not 20 bits")
        first = 6 << 28 | (self.traffic_class & 0xFF) << 20 | self.flow_label
        _FIXED.pack_into(
            buffer,
            offset,
            first,
            self.payload_len,
            self.next_header,
            self.hop_limit,
            self.src_addr,
            self.dst_addr,
        )

    def to_bytes(self) -> bytearray:
        buf = bytearray(HEADER_LEN)
        self.emit(buf)
        return buf
