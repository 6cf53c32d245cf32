"""The IPv6 wire layer (RFC 8200): the header view, extension headers, the TCP pseudo-header.

Checksums are recomputed here from RFC 8200 8.1's pseudo-header layout
written out byte by byte, not with the code under test.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.wire.error import WireError
from daemon.wire.ipv6 import (
    DEST_OPTIONS,
    FRAGMENT,
    HOP_BY_HOP,
    MAX_EXTENSION_HEADERS,
    ROUTING,
    Ipv6Packet,
    Ipv6Repr,
)
from daemon.wire.tcp import (
    ACK,
    PSH,
    SYN,
    TcpOptions,
    TcpSegment,
    build_ipv6_tcp,
    emit_tcp,
    parse_tcp,
)
from daemon.wire.vnet import GSO_TCPV6, vnet_header_for_tcp

SRC = ipaddress.IPv6Address("2001:db8:c::2").packed
DST = ipaddress.IPv6Address("2001:db8:5::2").packed
TCP = 6


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(src: bytes, dst: bytes, length: int, next_header: int) -> bytes:
    """RFC 8200 8.1: source, destination, upper-layer length (32), zero (24), next header."""
    return src + dst + struct.pack("!I", length) + b"\0\0\0" + bytes([next_header])


def packet(payload: bytes, next_header: int = TCP, extensions: bytes = b"", tc: int = 0) -> bytes:
    body = extensions + payload
    head = Ipv6Repr(SRC, DST, next_header, len(body), 64, tc, 0x12345).to_bytes()
    return bytes(head) + body


def ext(next_header: int, length_units: int = 0) -> bytes:
    """An options-style extension header of (length_units + 1) * 8 bytes (PadN filled)."""
    size = (length_units + 1) * 8
    return bytes([next_header, length_units, 1, size - 4]) + bytes(size - 4)


def tcp_bytes(payload: bytes = b"hello") -> bytes:
    seg = TcpSegment(40000, 80, 1000, 2000, ACK | PSH, 512, TcpOptions(), payload)
    return bytes(emit_tcp(seg, SRC, DST))


def test_fixed_header_fields_round_trip() -> None:
    raw = packet(tcp_bytes(), tc=0xB8 | 0x02)
    p = Ipv6Packet(raw)
    assert p.src_addr == SRC and p.dst_addr == DST
    assert p.protocol == TCP and p.next_header == TCP and p.hop_limit == 64
    assert p.traffic_class == 0xBA and p.ecn == 2 and p.flow_label == 0x12345
    assert p.header_len == 40 and not p.has_extension_headers and not p.is_fragment
    assert bytes(p.payload) == tcp_bytes()
    assert Ipv6Repr.parse(p) == Ipv6Repr(SRC, DST, TCP, len(tcp_bytes()), 64, 0xBA, 0x12345)


def test_tcp_checksum_uses_the_rfc_8200_pseudo_header() -> None:
    seg = tcp_bytes(b"x" * 101)  # odd length: the pad byte counts
    assert ones_sum(pseudo_header(SRC, DST, len(seg), TCP) + seg) == 0xFFFF
    parsed = parse_tcp(seg, SRC, DST, verify_checksum=True)
    assert bytes(parsed.payload) == b"x" * 101
    damaged = bytearray(seg)
    damaged[-1] ^= 1
    with pytest.raises(WireError, match="checksum"):
        parse_tcp(bytes(damaged), SRC, DST, verify_checksum=True)


def test_hop_by_hop_routing_and_destination_options_are_skipped() -> None:
    # Hop-by-hop (8 bytes, next: routing), routing (16, next: destination
    # options), destination options (8, next: TCP).
    chain = ext(ROUTING) + ext(DEST_OPTIONS, 1) + ext(TCP)
    p = Ipv6Packet(packet(tcp_bytes(), HOP_BY_HOP, chain))
    assert p.protocol == TCP and p.header_len == 40 + 8 + 16 + 8
    assert p.has_extension_headers and bytes(p.payload) == tcp_bytes()
    assert p.next_header == HOP_BY_HOP


def test_a_fragment_header_marks_a_fragment() -> None:
    frag = bytes([TCP, 0]) + struct.pack("!HI", 0x0001, 77)  # offset 0, M=1
    p = Ipv6Packet(packet(tcp_bytes(), FRAGMENT, frag))
    assert p.is_fragment and p.protocol == TCP and p.header_len == 48


@pytest.mark.parametrize("stop", [50, 51, 59, 135, 253])  # ESP, AH, none, mobility, testing
def test_a_header_not_walked_ends_the_chain_as_the_protocol(stop: int) -> None:
    p = Ipv6Packet(packet(bytes(16), stop))
    assert p.protocol == stop and p.header_len == 40 and not p.is_fragment


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes(39), "shorter than a header"),
        (b"\x45" + bytes(60), "version 4"),
        (bytes(Ipv6Repr(SRC, DST, TCP, 100).to_bytes()) + bytes(20), "payload length 100 > 20"),
        (packet(b"", HOP_BY_HOP, bytes([TCP, 0, 1, 2])), "runs past the packet"),
        (packet(b"", HOP_BY_HOP, bytes([TCP, 3]) + bytes(14)), "of 32 bytes runs past"),
        (packet(b"", FRAGMENT, bytes([TCP, 0, 0, 1])), "fragment header runs past"),
        (
            packet(b"", HOP_BY_HOP, ext(HOP_BY_HOP) * MAX_EXTENSION_HEADERS),
            "more than 8 extension headers",
        ),
    ],
)
def test_malformed_headers_raise_a_wire_error(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        Ipv6Packet(raw)


def test_a_jumbogram_is_refused() -> None:
    raw = bytearray(packet(tcp_bytes()))
    raw[4:6] = b"\0\0"  # RFC 2675: the length is in a hop-by-hop option instead
    with pytest.raises(WireError, match="jumbogram"):
        Ipv6Packet(bytes(raw))


def test_a_longer_buffer_is_trimmed_to_the_payload_length() -> None:
    raw = packet(tcp_bytes())
    p = Ipv6Packet(raw + b"padding")
    assert p.total_len == len(raw) and bytes(p.payload) == tcp_bytes()


@pytest.mark.parametrize(
    "repr_",
    [
        Ipv6Repr(SRC[:4], DST, TCP, 20),
        Ipv6Repr(SRC, DST, TCP, 0),
        Ipv6Repr(SRC, DST, TCP, 0x10000),
        Ipv6Repr(SRC, DST, TCP, 20, flow_label=1 << 20),
    ],
)
def test_emit_refuses_what_does_not_fit(repr_: Ipv6Repr) -> None:
    with pytest.raises(WireError):
        repr_.to_bytes()


@given(st.binary(max_size=120))
def test_arbitrary_bytes_parse_or_raise_a_wire_error(data: bytes) -> None:
    raw = bytes([0x60]) + data
    try:
        p = Ipv6Packet(raw)
    except WireError:
        return
    assert 40 <= p.header_len <= p.total_len <= len(raw)


def test_a_syn_from_linux_layout_parses() -> None:
    """Linux's SYN over IPv6: MSS 1440 (1500 - 60), SACK-permitted, TS, window scale 7."""
    opts = TcpOptions(mss=1440, sack_permitted=True, timestamp=(1, 0), wscale=7)
    seg = TcpSegment(40000, 80, 7, 0, SYN, 64800, opts)
    raw = packet(bytes(emit_tcp(seg, SRC, DST)))
    p = Ipv6Packet(raw)
    parsed = parse_tcp(p.payload, p.src_addr, p.dst_addr, verify_checksum=True)
    assert parsed.options.mss == 1440 and parsed.options.wscale == 7 and parsed.flags == SYN


def test_build_ipv6_tcp_round_trips_with_a_full_or_partial_checksum() -> None:
    seg = TcpSegment(80, 40000, 5, 6, ACK | PSH, 1000, TcpOptions(timestamp=(9, 8)), b"y" * 3000)
    full = build_ipv6_tcp(seg, DST, SRC, dscp_ecn=0x02, flow_label=7)
    p = Ipv6Packet(full)
    assert p.protocol == TCP and p.ecn == 2 and p.flow_label == 7 and p.hop_limit == 64
    back = parse_tcp(p.payload, p.src_addr, p.dst_addr, verify_checksum=True)
    assert bytes(back.payload) == b"y" * 3000 and back.options.timestamp == (9, 8)
    # Partial (NEEDS_CSUM): the field holds the folded pseudo-header sum, uncomplemented.
    partial = build_ipv6_tcp(seg, DST, SRC, partial_checksum=True)
    tcp_len = len(partial) - 40
    field = struct.unpack_from("!H", partial, 40 + 16)[0]
    assert field == ones_sum(pseudo_header(DST, SRC, tcp_len, TCP))
    hdr = vnet_header_for_tcp(40, 32, 3000, 1428, ipv6=True)
    assert hdr.gso_type == GSO_TCPV6 and hdr.csum_start == 40 and hdr.gso_size == 1428
