"""IPv6 at the relay's edges (daemon/splice/family.py): the IPv4 shape in, IPv6 out.

Every converted packet is parsed back with the wire layer and its TCP
checksum verified against the output family's pseudo-header.
"""

from __future__ import annotations

import ipaddress
import struct

from daemon.splice.family import V6_PLACEHOLDER, to_ipv6, to_relay_shape
from daemon.splice.translator import Translator, peek, translate
from daemon.wire.checksum import pseudo_header_sum
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.ipv6 import Ipv6Packet, Ipv6Repr
from daemon.wire.tcp import (
    ACK,
    PSH,
    TcpOptions,
    TcpSegment,
    build_ipv6_tcp,
    parse_tcp,
)
from daemon.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    VnetHeader,
    vnet_header_for_tcp,
)
from tests.test_splice_translator import translator as base_translator

CLIENT6 = ipaddress.IPv6Address("2001:db8:c::2").packed
DAEMON6_C = ipaddress.IPv6Address("2001:db8:d::1").packed
DAEMON6_S = ipaddress.IPv6Address("2001:db8:d::2").packed
SERVER6 = ipaddress.IPv6Address("2001:db8:5::2").packed
DAEMON4_S = bytes([198, 51, 100, 2])
SERVER4 = bytes([203, 0, 113, 2])


def translator(v6_out: bool, offload: bool, out_mss: int = 1428) -> Translator:
    """Client -> server; the output addresses are placeholders for an IPv6 server side."""
    return base_translator(
        src_addr=V6_PLACEHOLDER if v6_out else DAEMON4_S,
        dst_addr=V6_PLACEHOLDER if v6_out else SERVER4,
        out_mss=out_mss,
        offload=offload,
    )


def from_client(payload: bytes, *, partial: bool = False, tc: int = 0) -> bytearray:
    seg = TcpSegment(50000, 1080, 5000, 9000, ACK | PSH, 512, TcpOptions(timestamp=(1, 2)), payload)
    return build_ipv6_tcp(seg, CLIENT6, DAEMON6_C, dscp_ecn=tc, partial_checksum=partial)


def test_plain_mode_ipv6_to_ipv6_maps_the_segment_and_checks_out() -> None:
    shaped = to_relay_shape(memoryview(from_client(b"GET /", tc=0xB8 | 2)), None)
    assert shaped is not None
    pkt, vnet = shaped
    assert vnet is None and bytes(pkt[12:20]) == V6_PLACEHOLDER * 2 and pkt[1] == 0xBA
    ((hdr, out),) = translate(translator(True, False), None, pkt)
    hdr6, packet6 = to_ipv6(hdr, out, DAEMON6_S, SERVER6)
    assert hdr6 is None
    ip = Ipv6Packet(packet6)
    assert (ip.src_addr, ip.dst_addr, ip.hop_limit) == (DAEMON6_S, SERVER6, 64)
    assert ip.traffic_class == 0xB8  # DSCP kept; ECN cleared: this translator has no ecn
    seg = parse_tcp(ip.payload, ip.src_addr, ip.dst_addr, verify_checksum=True)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (40000, 80, 6000, 8500)
    assert bytes(seg.payload) == b"GET /" and seg.options.timestamp == (8, 2 - 3 & 0xFFFFFFFF)


def test_plain_mode_ipv6_client_to_ipv4_server_checks_out() -> None:
    shaped = to_relay_shape(memoryview(from_client(b"x" * 700)), None)
    assert shaped is not None
    ((hdr, out),) = translate(translator(False, False), None, shaped[0])
    assert hdr is None
    ip = Ipv4Packet(out)
    assert ip.verify_checksum() and (ip.src_addr, ip.dst_addr) == (DAEMON4_S, SERVER4)
    seg = parse_tcp(ip.payload, ip.src_addr, ip.dst_addr, verify_checksum=True)
    assert bytes(seg.payload) == b"x" * 700


def test_plain_mode_cuts_to_the_output_mss_and_each_piece_checks_out() -> None:
    shaped = to_relay_shape(memoryview(from_client(b"z" * 3000)), None)
    assert shaped is not None
    pieces = translate(translator(True, False, out_mss=1000), None, shaped[0])
    assert len(pieces) == 3
    got = b""
    for hdr, out in pieces:
        _, packet6 = to_ipv6(hdr, out, DAEMON6_S, SERVER6)
        ip = Ipv6Packet(packet6)
        got += bytes(parse_tcp(ip.payload, ip.src_addr, ip.dst_addr, verify_checksum=True).payload)
    assert got == b"z" * 3000


def test_offload_gso_keeps_gso_and_the_kernel_completes_the_checksum() -> None:
    raw = from_client(b"g" * 5000, partial=True)
    vnet_in = vnet_header_for_tcp(40, 32, 5000, 1428, ipv6=True)
    shaped = to_relay_shape(memoryview(raw), vnet_in)
    assert shaped is not None
    pkt, vnet = shaped
    assert vnet is not None and vnet.gso_type == GSO_TCPV4 and vnet.csum_start == 20
    assert vnet.hdr_len == 20 + 32 and vnet.gso_size == 1428
    ((hdr, out),) = translate(translator(True, True), vnet, pkt)
    hdr6, packet6 = to_ipv6(hdr, out, DAEMON6_S, SERVER6)
    assert hdr6 is not None
    v6 = VnetHeader.parse(hdr6)
    assert v6.flags == F_NEEDS_CSUM and v6.gso_type == GSO_TCPV6 and v6.gso_size == 1428
    assert v6.csum_start == 40 and v6.hdr_len == 40 + 32
    ip = Ipv6Packet(packet6)
    field = struct.unpack_from("!H", packet6, 40 + 16)[0]
    assert field == pseudo_header_sum(DAEMON6_S, SERVER6, 6, len(ip.payload))


def test_extension_headers_are_dropped_and_non_tcp_refused() -> None:
    tcp = bytes(from_client(b"hi"))[40:]
    hop_by_hop = bytes([6, 0, 1, 4]) + bytes(4)
    head = Ipv6Repr(CLIENT6, DAEMON6_C, 0, len(hop_by_hop) + len(tcp)).to_bytes()
    shaped = to_relay_shape(memoryview(bytes(head) + hop_by_hop + tcp), None)
    assert shaped is not None
    info = peek(shaped[0])
    assert info is not None and info.payload_len == 2 and info.ip_header_len == 20
    udp = Ipv6Repr(CLIENT6, DAEMON6_C, 17, 8).to_bytes() + bytes(8)
    assert to_relay_shape(memoryview(bytes(udp)), None) is None
    frag = bytes([6, 0, 0, 1]) + bytes(4)
    fragment = Ipv6Repr(CLIENT6, DAEMON6_C, 44, 8 + len(tcp)).to_bytes() + frag + tcp
    assert to_relay_shape(memoryview(bytes(fragment)), None) is None
