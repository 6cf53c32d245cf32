"""ICMPv4 destination-unreachable messages that concern our TCP connections.

RFC 792 (message format), RFC 1122 4.2.3.9 and RFC 5927: a "net/host/port
unreachable" quoting one of our SYNs tells a connecting endpoint why the
SYN went nowhere, so connect() can fail with ENETUNREACH / EHOSTUNREACH
at once instead of timing out.  We only read the quoted IP header and the
first 8 bytes of TCP (ports and sequence number), as RFC 792 guarantees.

"Fragmentation needed and DF set" (code 4) carries the next hop's MTU
(RFC 1191 4): path MTU discovery lowers the connection's segment size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.wire.error import WireError

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
    )
