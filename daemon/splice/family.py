"""IPv6 at the edges of the relay: the splice itself works on one packet shape.

The relay and its translator (thesis chapter 5) rewrite TCP and an IPv4
header in place.  TCP is the same in both families; only the IP header and
the checksum's pseudo-header differ (RFC 8200 8.1).  So a segment that
arrives on an IPv6 connection is given a 20-byte IPv4-shaped header
(``to_relay_shape``: placeholder addresses, the traffic class as TOS, the
hop limit as TTL) and goes through the relay like any other; a relayed
packet bound for an IPv6 connection gets its IPv6 header back
(``to_ipv6``: that connection's real addresses and flow label, its own
hop limit, the ECN field kept) and its TCP checksum redone for IPv6's
pseudo-header.  The same two functions make a splice across families (an
IPv4 client, an IPv6 server, or the reverse): each side converts on its
own.  What the IPv4 shape cannot hold: IPv6 extension headers (dropped, as
IPv4 options are, 5.2.1) and a TCP segment over 65515 bytes (never: GSO
packets stay under 64 KB).

The cost is a copy of the packet each way, on the Python path only: the
kernel fast path rewrites IPv4 headers and is not used for a splice with
an IPv6 side.
"""

from __future__ import annotations

import struct

from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.ipv6 import Ipv6Packet
from daemon.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    TCP_CSUM_OFFSET,
    VnetHeader,
)

# Stands for an IPv6 address inside the relay's IPv4 shape (TEST-NET-1's
# 192.0.2.0 network address, which no host uses); never on the wire.
V6_PLACEHOLDER = bytes([192, 0, 2, 0])
_V4_SHAPE = struct.Struct("!BBHHHBBH4s4s")
_V6_FIXED = struct.Struct("!IHBB16s16s")
_MAX_TCP = 0xFFFF - 20
_HOP_LIMIT = 64  # an endpoint of both connections, not a router (5.2.1)


def to_relay_shape(
    pkt: memoryview, vnet: VnetHeader | None
) -> tuple[memoryview, VnetHeader | None] | None:
    """An IPv6/TCP packet as the relay's IPv4-shaped packet, and its virtio header.

    None if it is not one the relay can carry (not TCP, a fragment, too
    long); the caller counts it as malformed, as for IPv4.
    """
    ip = Ipv6Packet(pkt)
    tcp = ip.payload
    if ip.protocol != 6 or ip.is_fragment or len(tcp) > _MAX_TCP or len(tcp) < 20:
        return None
    out = bytearray(20 + len(tcp))
    _V4_SHAPE.pack_into(
        out,
        0,
        0x45,
        ip.traffic_class,
        len(out),
        0,
        0x4000,
        ip.hop_limit,
        6,
        0,
        V6_PLACEHOLDER,
        V6_PLACEHOLDER,
    )
    out[20:] = tcp
    if vnet is None:
        # Plain mode: the translator updates the checksum incrementally
        # (RFC 1624), so it must be right for the shape's pseudo-header first.
        csum_at = 20 + TCP_CSUM_OFFSET
        out[csum_at : csum_at + 2] = b"\0\0"
        pseudo = pseudo_header_sum(V6_PLACEHOLDER, V6_PLACEHOLDER, 6, len(tcp))
        struct.pack_into("!H", out, csum_at, internet_checksum(memoryview(out)[20:], pseudo))
    else:
        gso = vnet.gso_type & ~GSO_ECN
        vnet = VnetHeader(
            flags=vnet.flags,
            gso_type=(GSO_TCPV4 if gso == GSO_TCPV6 else gso) | (vnet.gso_type & GSO_ECN),
            hdr_len=max(vnet.hdr_len - (ip.header_len - 20), 0) if vnet.hdr_len else 0,
            gso_size=vnet.gso_size,
            csum_start=20 if vnet.flags & F_NEEDS_CSUM else vnet.csum_start,
            csum_offset=vnet.csum_offset,
        )
    return memoryview(out), vnet


def to_ipv6(
    hdr: bytes | None, packet: memoryview | bytearray, src: bytes, dst: bytes, label: int = 0
) -> tuple[bytes | None, bytearray]:
    """A relayed IPv4-shaped packet as the IPv6 packet ``src`` -> ``dst``, and its header.

    ``label``: the output connection's flow label (daemon/wire/flowlabel.py).

    The TCP checksum is redone for IPv6's pseudo-header: completely without
    a virtio header (plain mode), else as the pseudo-header sum the kernel
    completes (NEEDS_CSUM).  GSO stays GSO, as TCPv6.
    """
    tos = packet[1]
    tcp = memoryview(packet)[20 : struct.unpack_from("!H", packet, 2)[0]]
    out = bytearray(40 + len(tcp))
    _V6_FIXED.pack_into(out, 0, 6 << 28 | tos << 20 | label, len(tcp), 6, _HOP_LIMIT, src, dst)
    out[40:] = tcp
    csum_at = 40 + TCP_CSUM_OFFSET
    pseudo = pseudo_header_sum(src, dst, 6, len(tcp))
    if hdr is None:
        out[csum_at : csum_at + 2] = b"\0\0"
        struct.pack_into("!H", out, csum_at, internet_checksum(memoryview(out)[40:], pseudo))
        return None, out
    vnet = VnetHeader.parse(hdr)
    struct.pack_into("!H", out, csum_at, pseudo)
    gso = vnet.gso_type & ~GSO_ECN
    v6 = VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_NONE if gso == GSO_NONE else GSO_TCPV6 | (vnet.gso_type & GSO_ECN),
        hdr_len=vnet.hdr_len + 20 if vnet.hdr_len else 0,
        gso_size=vnet.gso_size,
        csum_start=40,
        csum_offset=TCP_CSUM_OFFSET,
    )
    return v6.to_bytes(), out
