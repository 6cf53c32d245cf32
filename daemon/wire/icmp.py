"""ICMPv4 destination-unreachable messages that concern our TCP connections.

RFC 792 (message format), RFC 1122 4.2.3.9 and RFC 5927: a "net/host/port
unreachable" quoting one of our SYNs tells a connecting endpoint why the
SYN went nowhere, so connect() can fail with ENETUNREACH / EHOSTUNREACH
at once instead of timing out.  We only read the quoted IP header and the
first 8 bytes of TCP (ports and sequence number), as RFC 792 guarantees.

"Fragmentation needed and DF set" (code 4) carries the next hop's MTU
(RFC 1191 4): path MTU discovery lowers the connection's segment size.
For a spliced flow the segment was the other connection's peer's, so the
daemon sends that peer its own fragmentation-needed (``frag_needed``),
quoting the segment as the peer sent it, as a router on its path would.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.error import WireError
from daemon.wire.ipv6 import Ipv6Packet

ICMP_DEST_UNREACH = 3
# Codes (RFC 792, RFC 1122 3.2.2.1, RFC 1812 5.2.7.1).
NET_UNREACH = 0
HOST_UNREACH = 1
PROTO_UNREACH = 2
PORT_UNREACH = 3
FRAG_NEEDED = 4
ADMIN_PROHIBITED = 13

_NET_CODES = frozenset({0, 6, 9, 11})  # net unreachable / unknown / prohibited / for TOS


@dataclass(frozen=True, slots=True)
class Unreachable:
    """A destination unreachable quoting a TCP segment we sent."""

    code: int
    src_addr: bytes  # the quoted packet's source: our address
    dst_addr: bytes
    src_port: int
    dst_port: int
    seq: int
    mtu: int = 0  # code 4: the next-hop MTU (RFC 1191 4); 0 from an old router
    quoted_len: int = 0  # the quoted packet's IPv4 total length

    @property
    def net(self) -> bool:
        """True for network-level codes (ENETUNREACH), else host (EHOSTUNREACH)."""
        return self.code in _NET_CODES


def parse_unreachable(icmp: bytes | bytearray | memoryview) -> Unreachable | None:
    """Parse an ICMPv4 message; None unless it is a dest-unreachable quoting TCP.

    Raises WireError if it claims to be one but is truncated.
    """
    buf = memoryview(icmp)
    if len(buf) < 8 or buf[0] != ICMP_DEST_UNREACH:
        return None
    inner = buf[8:]
    if len(inner) < 20 or inner[0] >> 4 != 4:
        raise WireError("ICMP: quoted packet is not a whole IPv4 header")
    ihl = (inner[0] & 0x0F) * 4
    if ihl < 20 or len(inner) < ihl + 8:
        raise WireError("ICMP: quoted packet too short for ports and sequence")
    if inner[9] != 6:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", inner, ihl)
    (mtu,) = struct.unpack_from("!H", buf, 6)
    return Unreachable(
        code=buf[1],
        src_addr=bytes(inner[12:16]),
        dst_addr=bytes(inner[16:20]),
        src_port=sport,
        dst_port=dport,
        seq=seq,
        mtu=mtu if buf[1] == FRAG_NEEDED else 0,
        quoted_len=struct.unpack_from("!H", inner, 2)[0],
    )


# ICMPv6 (RFC 4443): the errors that concern a TCP endpoint, normalized to
# the ICMPv4 codes above so that one handler serves both families.
ICMP6_DEST_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
MIN_IPV6_MTU = 1280  # RFC 8200 5: every IPv6 link carries this much
_ICMP6_CODES = {
    0: NET_UNREACH,  # no route to destination
    1: ADMIN_PROHIBITED,  # communication administratively prohibited
    3: HOST_UNREACH,  # address unreachable
    4: PORT_UNREACH,  # port unreachable
    5: ADMIN_PROHIBITED,  # source address failed ingress/egress policy
    6: ADMIN_PROHIBITED,  # reject route to destination
}


def parse_unreachable6(icmp: bytes | bytearray | memoryview) -> Unreachable | None:
    """Parse an ICMPv6 message (checksum checked by the caller); None unless it is a
    destination unreachable or packet too big quoting TCP.

    Packet Too Big (RFC 4443 3.2, RFC 8201) becomes ``FRAG_NEEDED`` with its
    MTU; Destination Unreachable codes map to their ICMPv4 equivalents (no
    route is a network error, the rest host errors).  The quoted packet's
    extension headers are walked as far as the quote goes.  Raises
    WireError if it is one of those but is truncated.
    """
    buf = memoryview(icmp)
    if len(buf) < 8 or buf[0] not in (ICMP6_DEST_UNREACH, ICMP6_PACKET_TOO_BIG):
        return None
    inner = bytearray(buf[8:])
    if len(inner) < 40 or inner[0] >> 4 != 6:
        raise WireError("ICMPv6: quoted packet is not a whole IPv6 header")
    quoted_len = 40 + struct.unpack_from("!H", inner, 4)[0]
    # The quote is cut short of the packet it quotes: view it as if whole.
    inner[4:6] = struct.pack("!H", len(inner) - 40)
    try:
        quoted = Ipv6Packet(inner)
    except WireError as exc:
        raise WireError(f"ICMPv6: quoted packet: {exc}") from None
    if quoted.protocol != 6 or quoted.is_fragment:
        return None
    if len(quoted.payload) < 8:
        raise WireError("ICMPv6: quoted packet too short for ports and sequence")
    sport, dport, seq = struct.unpack_from("!HHI", quoted.payload)
    if buf[0] == ICMP6_PACKET_TOO_BIG:
        code, mtu = FRAG_NEEDED, struct.unpack_from("!I", buf, 4)[0]
    else:
        code, mtu = _ICMP6_CODES.get(buf[1], HOST_UNREACH), 0
    return Unreachable(
        code=code,
        src_addr=quoted.src_addr,
        dst_addr=quoted.dst_addr,
        src_port=sport,
        dst_port=dport,
        seq=seq,
        mtu=min(mtu, 0xFFFF),
        quoted_len=quoted_len,
    )


_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6_FIXED = struct.Struct("!IHBB16s16s")


def _ipv4_header(src: bytes, dst: bytes, total: int, protocol: int, df: bool) -> bytes:
    """A 20-byte IPv4 header, TTL 64, with its checksum."""
    frag = 0x4000 if df else 0
    head = bytearray(_IPV4.pack(0x45, 0, total, 0, frag, 64, protocol, 0, src, dst))
    struct.pack_into("!H", head, 10, internet_checksum(head))
    return bytes(head)


def frag_needed(
    src: bytes,
    dst: bytes,
    mtu: int,
    quoted_src: tuple[bytes, int],
    quoted_dst: tuple[bytes, int],
    quoted_seq: int,
    quoted_len: int,
) -> bytes:
    """An IPv4 ICMP "fragmentation needed and DF set" (RFC 792, RFC 1191 4), from src to dst.

    It quotes a TCP segment from ``quoted_src`` to ``quoted_dst`` with
    sequence number ``quoted_seq`` and IPv4 total length ``quoted_len``:
    its IP header and the first 8 bytes of TCP (ports and sequence number),
    which is all RFC 792 promises and all a receiver (RFC 5927 4.1, Linux's
    tcp_v4_err) reads.
    """
    # DF: the quoted segment had it, or there would be no such ICMP.
    quoted = _ipv4_header(quoted_src[0], quoted_dst[0], quoted_len, 6, True) + struct.pack(
        "!HHI", quoted_src[1], quoted_dst[1], quoted_seq & 0xFFFFFFFF
    )
    icmp = bytearray(struct.pack("!BBHHH", ICMP_DEST_UNREACH, FRAG_NEEDED, 0, 0, mtu) + quoted)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    return _ipv4_header(src, dst, 20 + len(icmp), 1, False) + bytes(icmp)


def packet_too_big(
    src: bytes,
    dst: bytes,
    mtu: int,
    quoted_src: tuple[bytes, int],
    quoted_dst: tuple[bytes, int],
    quoted_seq: int,
    quoted_len: int,
) -> bytes:
    """An ICMPv6 Packet Too Big (RFC 4443 3.2, RFC 8201), from ``src`` to ``dst``.

    The IPv6 twin of ``frag_needed``: it quotes the fixed header of a TCP
    segment of IPv6 length ``quoted_len`` and its first 8 TCP bytes, which
    is what Linux's tcp_v6_err reads; the checksum covers RFC 8200 8.1's
    pseudo-header.
    """
    quoted = _IPV6_FIXED.pack(
        6 << 28, max(quoted_len - 40, 8), 6, 64, quoted_src[0], quoted_dst[0]
    ) + struct.pack("!HHI", quoted_src[1], quoted_dst[1], quoted_seq & 0xFFFFFFFF)
    icmp = bytearray(struct.pack("!BBHI", ICMP6_PACKET_TOO_BIG, 0, 0, mtu) + quoted)
    pseudo = pseudo_header_sum(src, dst, 58, len(icmp))
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp, pseudo))
    return _IPV6_FIXED.pack(6 << 28, len(icmp), 58, 255, src, dst) + bytes(icmp)
