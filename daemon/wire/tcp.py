"""TCP segment representation shared by the wire layer and the TCP endpoint.

This module holds the *repr* types (in smoltcp's sense): plain values that
``parse`` produces from bytes and ``emit`` turns back into bytes.  The TCP
endpoint (daemon/tcp) and the splice relay (daemon/splice) speak only these
types; only daemon/wire touches raw header bytes.

Below the repr types: ``TcpHeader``, a length-checked view for code that
rewrites headers in place (the splice relay), and ``parse_tcp`` /
``emit_tcp`` / ``build_ipv4_tcp`` between bytes and ``TcpSegment``.  The
options live in daemon.wire.tcp_options; ``TcpOptions`` is re-exported here.

RFCs: 9293 (TCP header), 7323 (window scale, timestamps), 2018 (SACK).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.error import WireError
from daemon.wire.ipv4 import HEADER_LEN as IPV4_HEADER_LEN
from daemon.wire.ipv4 import PROTO_TCP, Ipv4Repr
from daemon.wire.ipv6 import HEADER_LEN as IPV6_HEADER_LEN
from daemon.wire.ipv6 import Ipv6Repr
from daemon.wire.tcp_options import TcpOptions, emit_options, options_len, parse_options

__all__ = [
    "ACK",
    "CHECKSUM_OFFSET",
    "CWR",
    "ECE",
    "FIN",
    "HEADER_LEN",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "TcpHeader",
    "TcpOptions",
    "TcpSegment",
    "build_ipv4_tcp",
    "build_ipv6_tcp",
    "emit_tcp",
    "emit_tcp_into",
    "parse_tcp",
    "tcp_header_len",
]

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
    # The IP header's ECN field (RFC 3168 5: 0 Not-ECT, 1 ECT(1), 2 ECT(0),
    # 3 CE): not TCP's, but the endpoint's ECN logic reads it on arrival and
    # chooses it on departure, so it travels with the segment.
    ecn: int = 0

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus SYN and FIN (RFC 9293 3.4)."""
        return len(self.payload) + (self.flags & SYN != 0) + (self.flags & FIN != 0)


# --- header view, parse and emit -------------------------------------------
#
# Header layout (RFC 9293 3.1): ports, seq, ack, data offset (4 bits, in
# 32-bit words) + 4 reserved bits, flags byte, window, checksum, urgent
# pointer, then options up to the data offset.

HEADER_LEN = 20  # without options
CHECKSUM_OFFSET = 16  # virtio csum_offset for TCP
_HEADER = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_SEQ_MASK = 0xFFFFFFFF


class TcpHeader:
    """A length-checked view of a TCP segment at the start of ``buffer``.

    The buffer is the whole segment (header, options, payload), so the data
    offset can be checked against it; accessors read at fixed offsets and
    never copy the payload.
    """

    __slots__ = ("_buf", "_hlen")

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        buf = memoryview(buffer)
        if len(buf) < HEADER_LEN:
            raise WireError(f"TCP: {len(buf)} bytes, shorter than a header")
        hlen = (buf[12] >> 4) * 4
        if hlen < HEADER_LEN:
            raise WireError(f"TCP: data offset {hlen // 4} < 5")
        if hlen > len(buf):
            raise WireError(f"TCP: data offset {hlen} bytes > segment length {len(buf)}")
        self._buf = buf
        self._hlen = hlen

    @property
    def src_port(self) -> int:
        return int(_U16.unpack_from(self._buf, 0)[0])

    @property
    def dst_port(self) -> int:
        return int(_U16.unpack_from(self._buf, 2)[0])

    @property
    def seq(self) -> int:
        return int(_U32.unpack_from(self._buf, 4)[0])

    @property
    def ack(self) -> int:
        return int(_U32.unpack_from(self._buf, 8)[0])

    @property
    def header_len(self) -> int:
        """Data offset in bytes, options included."""
        return self._hlen

    @property
    def flags(self) -> int:
        return self._buf[13]

    @property
    def window(self) -> int:
        return int(_U16.unpack_from(self._buf, 14)[0])

    @property
    def checksum(self) -> int:
        return int(_U16.unpack_from(self._buf, CHECKSUM_OFFSET)[0])

    @property
    def urgent(self) -> int:
        return int(_U16.unpack_from(self._buf, 18)[0])

    @property
    def options(self) -> memoryview:
        return self._buf[HEADER_LEN : self._hlen]

    @property
    def payload(self) -> memoryview:
        return self._buf[self._hlen :]

    def verify_checksum(self, src_addr: bytes, dst_addr: bytes) -> bool:
        """True when the (complete) checksum is right; a full pass over the segment."""
        pseudo = pseudo_header_sum(src_addr, dst_addr, PROTO_TCP, len(self._buf))
        return internet_checksum(self._buf, pseudo) == 0


def parse_tcp(
    segment: bytes | bytearray | memoryview,
    src_addr: bytes,
    dst_addr: bytes,
    *,
    verify_checksum: bool,
) -> TcpSegment:
    """Parse a whole TCP segment; the payload is a memoryview slice of ``segment``.

    Pass ``verify_checksum=False`` for packets the TUN delivered with
    VIRTIO_NET_HDR_F_NEEDS_CSUM: their checksum field is only a partial sum.
    Raises ``WireError`` for anything malformed.
    """
    buf = memoryview(segment)
    if len(buf) < HEADER_LEN:
        raise WireError(f"TCP: {len(buf)} bytes, shorter than a header")
    src_port, dst_port, seq, ack, off, flags, window, _csum, urgent = _HEADER.unpack_from(buf)
    hlen = (off >> 4) * 4
    if hlen < HEADER_LEN:
        raise WireError(f"TCP: data offset {hlen // 4} < 5")
    if hlen > len(buf):
        raise WireError(f"TCP: data offset {hlen} bytes > segment length {len(buf)}")
    if verify_checksum:
        pseudo = pseudo_header_sum(src_addr, dst_addr, PROTO_TCP, len(buf))
        if internet_checksum(buf, pseudo) != 0:
            raise WireError("TCP: bad checksum")
    options = parse_options(buf[HEADER_LEN:hlen]) if hlen > HEADER_LEN else TcpOptions()
    return TcpSegment(
        src_port=src_port,
        dst_port=dst_port,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=options,
        payload=buf[hlen:],
        urgent=urgent,
    )


def tcp_header_len(seg: TcpSegment) -> int:
    """Header bytes ``emit_tcp`` writes for ``seg``: 20 plus the aligned options."""
    return HEADER_LEN + options_len(seg.options)


def emit_tcp_into(
    buffer: bytearray | memoryview,
    offset: int,
    seg: TcpSegment,
    src_addr: bytes,
    dst_addr: bytes,
    *,
    partial_checksum: bool = False,
) -> int:
    """Write ``seg`` (header, options, payload) at ``offset``; returns its length.

    Sequence and acknowledgment numbers are taken modulo 2**32 (RFC 9293
    3.4), so the endpoint may pass unwrapped sums.  With ``partial_checksum``
    the checksum field gets the uncomplemented pseudo-header sum over the
    full segment length, which is what the kernel expects together with
    VIRTIO_NET_HDR_F_NEEDS_CSUM (csum_start = this offset, csum_offset = 16);
    otherwise the complete checksum over the segment is computed.
    """
    hlen = HEADER_LEN + emit_options(seg.options, buffer, offset + HEADER_LEN)
    _HEADER.pack_into(
        buffer,
        offset,
        seg.src_port,
        seg.dst_port,
        seg.seq & _SEQ_MASK,
        seg.ack & _SEQ_MASK,
        (hlen // 4) << 4,
        seg.flags,
        seg.window,
        0,
        seg.urgent,
    )
    plen = len(seg.payload)
    end = offset + hlen + plen
    buffer[offset + hlen : end] = seg.payload
    total = hlen + plen
    pseudo = pseudo_header_sum(src_addr, dst_addr, PROTO_TCP, total)
    csum = pseudo
    if not partial_checksum:
        csum = internet_checksum(memoryview(buffer)[offset:end], pseudo)
    _U16.pack_into(buffer, offset + CHECKSUM_OFFSET, csum)
    return total


def emit_tcp(
    seg: TcpSegment, src_addr: bytes, dst_addr: bytes, *, partial_checksum: bool = False
) -> bytearray:
    """The bytes of ``seg``; see ``emit_tcp_into`` for the checksum modes."""
    buf = bytearray(tcp_header_len(seg) + len(seg.payload))
    emit_tcp_into(buf, 0, seg, src_addr, dst_addr, partial_checksum=partial_checksum)
    return buf


def build_ipv6_tcp(
    seg: TcpSegment,
    src_addr: bytes,
    dst_addr: bytes,
    *,
    hop_limit: int = 64,
    dscp_ecn: int = 0,
    flow_label: int = 0,
    partial_checksum: bool = False,
) -> bytearray:
    """A whole IPv6+TCP packet in one buffer; the checksum as in ``emit_tcp_into``.

    The TCP checksum's pseudo-header is IPv6's (RFC 8200 8.1), since the
    addresses are 16 bytes; ``dscp_ecn`` is the traffic class.
    """
    tcp_len = tcp_header_len(seg) + len(seg.payload)
    buf = bytearray(IPV6_HEADER_LEN + tcp_len)
    Ipv6Repr(
        src_addr=src_addr,
        dst_addr=dst_addr,
        next_header=PROTO_TCP,
        payload_len=tcp_len,
        hop_limit=hop_limit,
        traffic_class=dscp_ecn,
        flow_label=flow_label,
    ).emit(buf, 0)
    emit_tcp_into(buf, IPV6_HEADER_LEN, seg, src_addr, dst_addr, partial_checksum=partial_checksum)
    return buf


def build_ipv4_tcp(
    seg: TcpSegment,
    src_addr: bytes,
    dst_addr: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    dscp_ecn: int = 0,
    partial_checksum: bool = False,
) -> bytearray:
    """A whole IPv4+TCP packet in one buffer (one allocation, one payload copy).

    The IPv4 header checksum is always complete; the TCP checksum is
    complete or partial as in ``emit_tcp_into``.
    """
    tcp_len = tcp_header_len(seg) + len(seg.payload)
    buf = bytearray(IPV4_HEADER_LEN + tcp_len)
    Ipv4Repr(
        src_addr=src_addr,
        dst_addr=dst_addr,
        protocol=PROTO_TCP,
        payload_len=tcp_len,
        ttl=ttl,
        ident=ident,
        dscp_ecn=dscp_ecn,
    ).emit(buf, 0)
    emit_tcp_into(buf, IPV4_HEADER_LEN, seg, src_addr, dst_addr, partial_checksum=partial_checksum)
    return buf
