"""IPv4 header: a checked view over a buffer and a parsed repr (RFC 791).

``Ipv4Packet(buf)`` validates the lengths once (version, IHL, total length)
and then reads fields at fixed offsets with no copy; ``Ipv4Repr`` is the
plain value the daemon builds packets from.  Options (IHL > 5) are exposed
as bytes but not represented: the splice relay strips them (thesis 5.4).

Header layout (RFC 791 3.1)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    |Version|  IHL  |   DSCP/ECN    |          Total Length         |
    |         Identification        |Flags|      Fragment Offset    |
    |  Time to Live |    Protocol   |         Header Checksum       |
    |                       Source Address                          |
    |                    Destination Address                        |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.wire.checksum import internet_checksum
from daemon.wire.error import WireError

HEADER_LEN = 20  # without options
PROTO_TCP = 6
# The ECN field (RFC 3168 5), the low two bits of the old TOS byte.
ECN_NOT_ECT = 0
ECN_ECT1 = 1
ECN_ECT0 = 2
ECN_CE = 3

_FLAG_DF = 0x4000
_FLAG_MF = 0x2000
_FRAG_OFFSET_MASK = 0x1FFF

_HEADER = struct.Struct("!BBHHHBBH4s4s")
_U16 = struct.Struct("!H")


class Ipv4Packet:
    """A length-checked view of an IPv4 packet at the start of ``buffer``.

    A buffer longer than the total length (padding, or a read buffer larger
    than the packet) is accepted and trimmed to the total length.
    """

    __slots__ = ("_buf", "_ihl_bytes")

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        buf = memoryview(buffer)
        if len(buf) < HEADER_LEN:
            raise WireError(f"IPv4: {len(buf)} bytes, shorter than a header")
        vihl = buf[0]
        if vihl >> 4 != 4:
            raise WireError(f"IPv4: version {vihl >> 4}")
        ihl_bytes = (vihl & 0x0F) * 4
        if ihl_bytes < HEADER_LEN:
            raise WireError(f"IPv4: IHL {ihl_bytes // 4} < 5")
        total = _U16.unpack_from(buf, 2)[0]
        if total < ihl_bytes:
            raise WireError(f"IPv4: total length {total} < header length {ihl_bytes}")
        # A GSO super-packet from the TUN may carry total length 0 in theory
        # (len > 64 KB, "big TCP"); we never enable that, so 0 is malformed.
        if total > len(buf):
            raise WireError(f"IPv4: total length {total} > {len(buf)} bytes received")
        self._buf = buf[:total]
        self._ihl_bytes = ihl_bytes

    @property
    def buffer(self) -> memoryview:
        """The whole packet, trimmed to the total length."""
        return self._buf

    @property
    def version(self) -> int:
        return 4

    @property
    def header_len(self) -> int:
        """IHL in bytes, options included."""
        return self._ihl_bytes

    @property
    def dscp_ecn(self) -> int:
        return self._buf[1]

    @property
    def ecn(self) -> int:
        """The ECN codepoint (RFC 3168 5), the low two bits of the old TOS byte."""
        return self._buf[1] & 0x03

    @property
    def total_len(self) -> int:
        return len(self._buf)

    @property
    def ident(self) -> int:
        return int(_U16.unpack_from(self._buf, 4)[0])

    def _flags_frag(self) -> int:
        return int(_U16.unpack_from(self._buf, 6)[0])

    @property
    def dont_fragment(self) -> bool:
        return self._flags_frag() & _FLAG_DF != 0

    @property
    def more_fragments(self) -> bool:
        return self._flags_frag() & _FLAG_MF != 0

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes (the field counts 8-byte units)."""
        return (self._flags_frag() & _FRAG_OFFSET_MASK) * 8

    @property
    def is_fragment(self) -> bool:
        """True for any fragment, first or later (MF set or a nonzero offset)."""
        return self._flags_frag() & (_FLAG_MF | _FRAG_OFFSET_MASK) != 0

    @property
    def ttl(self) -> int:
        return self._buf[8]

    @property
    def protocol(self) -> int:
        return self._buf[9]

    @property
    def checksum(self) -> int:
        return int(_U16.unpack_from(self._buf, 10)[0])

    @property
    def src_addr(self) -> bytes:
        return bytes(self._buf[12:16])

    @property
    def dst_addr(self) -> bytes:
        return bytes(self._buf[16:20])

    @property
    def has_options(self) -> bool:
        return self._ihl_bytes > HEADER_LEN

    @property
    def options(self) -> memoryview:
        return self._buf[HEADER_LEN : self._ihl_bytes]

    @property
    def payload(self) -> memoryview:
        return self._buf[self._ihl_bytes :]

    def verify_checksum(self) -> bool:
        """True when the header checksum is right (a full pass over the header)."""
        return internet_checksum(self._buf[: self._ihl_bytes]) == 0


@dataclass(slots=True)
class Ipv4Repr:
    """The IPv4 header fields the daemon uses; options are not represented."""

    src_addr: bytes
    dst_addr: bytes
    protocol: int
    payload_len: int
    ttl: int = 64
    ident: int = 0
    dont_fragment: bool = True
    dscp_ecn: int = 0

    @classmethod
    def parse(cls, packet: Ipv4Packet, *, verify_checksum: bool = True) -> Ipv4Repr:
        """Repr of a checked view; raises ``WireError`` on a bad header checksum.

        Fragments are represented like any packet; the caller decides (the
        daemon drops them, it never sends anything that gets fragmented).
        """
        if verify_checksum and not packet.verify_checksum():
            raise WireError("IPv4: bad header checksum")
        return cls(
            src_addr=packet.src_addr,
            dst_addr=packet.dst_addr,
            protocol=packet.protocol,
            payload_len=packet.total_len - packet.header_len,
            ttl=packet.ttl,
            ident=packet.ident,
            dont_fragment=packet.dont_fragment,
            dscp_ecn=packet.dscp_ecn,
        )

    @property
    def header_len(self) -> int:
        return HEADER_LEN

    def emit(self, buffer: bytearray | memoryview, offset: int = 0) -> None:
        """Write the 20-byte header at ``offset`` with a correct header checksum."""
        if HEADER_LEN + self.payload_len > 0xFFFF:
            raise WireError(f"IPv4: payload of {self.payload_len} bytes does not fit")
        _HEADER.pack_into(
            buffer,
            offset,
            0x45,
            self.dscp_ecn,
            HEADER_LEN + self.payload_len,
            self.ident,
            _FLAG_DF if self.dont_fragment else 0,
            self.ttl,
            self.protocol,
            0,
            self.src_addr,
            self.dst_addr,
        )
        csum = internet_checksum(memoryview(buffer)[offset : offset + HEADER_LEN])
        _U16.pack_into(buffer, offset + 10, csum)

    def to_bytes(self) -> bytearray:
        buf = bytearray(HEADER_LEN)
        self.emit(buf)
        return buf
