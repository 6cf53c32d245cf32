"""Specification of daemon/wire: checksums, IPv4, TCP, options, virtio_net_hdr.

No root needed.  Golden frames were captured from Linux 6.18 through a TUN
in plain mode (complete checksums) in a test namespace.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from daemon.wire.checksum import (
    complete_partial_checksum,
    fold,
    internet_checksum,
    ones_complement_sum,
    pseudo_header_sum,
    update_checksum16,
    update_checksum32,
    update_checksum_bytes,
    update_partial_checksum16,
    update_partial_checksum_bytes,
)
from daemon.wire.error import WireError
from daemon.wire.ipv4 import PROTO_TCP, Ipv4Packet, Ipv4Repr
from daemon.wire.tcp import (
    ACK,
    SYN,
    TcpHeader,
    TcpOptions,
    TcpSegment,
    build_ipv4_tcp,
    emit_tcp,
    parse_tcp,
)
from daemon.wire.tcp_options import emit_options, options_len, options_to_bytes, parse_options
from daemon.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    VnetHeader,
    vnet_header_for_tcp,
)

CLIENT = bytes([192, 0, 2, 1])
SERVER = bytes([198, 51, 100, 1])

# Linux SYN, 192.0.2.1:36118 -> 198.51.100.1:80 (MSS, SACK-perm+TS, NOP WS 10).
GOLDEN_SYN = bytes.fromhex(
    "4500003c6df340004006e092c0000201c63364018d1600500b004efe00000000"
    "a002faf01f6d0000020405b40402080ac62993da000000000103030a"
)
# Linux SYN-ACK, 192.0.2.1:8080 -> 198.51.100.1:40000, answering ISN 1000, TSval 12345.
GOLDEN_SYN_ACK = bytes.fromhex(
    "4500003c0000400040064e86c0000201c63364011f909c40d5145bd5000003e9"
    "a012fe88ed6b0000020405b40402080a9b05b3df000030390103030a"
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)


def reference_sum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: add words with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


# --- checksum -----------------------------------------------------------------


@given(st.binary(max_size=3000))
def test_fast_sum_equals_word_by_word_sum(data: bytes) -> None:
    assert ones_complement_sum(data) == reference_sum(data)


@pytest.mark.parametrize("size", [2049, 8191, 65535, 65536, 200_001])
def test_fast_sum_on_large_buffers(size: int) -> None:
    data = os.urandom(size)
    assert ones_complement_sum(data) == reference_sum(data)
    assert ones_complement_sum(b"\xff" * size) == reference_sum(b"\xff" * size)


@pytest.mark.parametrize(
    "data", [b"", b"\0\0", b"\xff\xff", b"\xff\xff\xff\xff", b"\xff", b"\x00\x01\xff\xfe"]
)
def test_sum_edge_cases_zero_and_negative_zero(data: bytes) -> None:
    assert ones_complement_sum(data) == reference_sum(data)


def test_rfc1071_example() -> None:
    # RFC 1071 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert ones_complement_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@given(st.binary(min_size=20, max_size=200).map(lambda b: b[: len(b) & ~1]), st.data())
def test_incremental_16bit_update_equals_full_checksum(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data)
    buf[0:2] = b"\0\0"
    csum = internet_checksum(buf, 0x1234)
    buf[0:2] = csum.to_bytes(2, "big")
    pos = draw.draw(st.integers(1, len(buf) // 2 - 1)) * 2
    new = draw.draw(u16)
    old = int.from_bytes(buf[pos : pos + 2], "big")
    buf[pos : pos + 2] = new.to_bytes(2, "big")
    buf[0:2] = b"\0\0"
    assert update_checksum16(csum, old, new) == internet_checksum(buf, 0x1234)


@given(st.binary(min_size=24, max_size=200), u32, st.integers(0, 4))
def test_incremental_32bit_update_equals_full_checksum(data: bytes, new: int, word: int) -> None:
    buf = bytearray(data)
    pos = 4 + word * 4
    buf[0:2] = b"\0\0"
    csum = internet_checksum(buf, PROTO_TCP)  # never all zero, as with a real pseudo-header
    old = int.from_bytes(buf[pos : pos + 4], "big")
    buf[pos : pos + 4] = new.to_bytes(4, "big")
    assert update_checksum32(csum, old, new) == internet_checksum(buf, PROTO_TCP)


@given(st.binary(max_size=300), addr4, addr4, addr4, st.integers(0, 0xFFFF), u16, u16)
def test_address_rewrite_updates_tcp_checksum_incrementally(
    payload: bytes, src: bytes, dst: bytes, new_src: bytes, seq: int, sport: int, dport: int
) -> None:
    seg = TcpSegment(sport, dport, seq, 0, ACK, 1000, TcpOptions(), payload)
    before = emit_tcp(seg, src, dst)
    after = emit_tcp(seg, new_src, dst)
    old_csum = int.from_bytes(before[16:18], "big")
    new_csum = int.from_bytes(after[16:18], "big")
    assert update_checksum_bytes(old_csum, src, new_src) == new_csum


@given(st.binary(max_size=300), addr6, addr6, addr6)
def test_ipv6_pseudo_header_address_rewrite(
    payload: bytes, src: bytes, dst: bytes, new_dst: bytes
) -> None:
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, TcpOptions(), payload)
    before = emit_tcp(seg, src, dst)
    after = emit_tcp(seg, src, new_dst)
    old = int.from_bytes(before[16:18], "big")
    assert update_checksum_bytes(old, dst, new_dst) == int.from_bytes(after[16:18], "big")


@given(st.binary(max_size=2000), addr4, addr4, addr4, addr4, u32, u32)
def test_partial_checksum_update_then_kernel_completion_equals_full_checksum(
    payload: bytes,
    src: bytes,
    dst: bytes,
    new_src: bytes,
    new_dst: bytes,
    new_seq: int,
    new_tsval: int,
) -> None:
    """The NEEDS_CSUM rule: pseudo-header changes add the delta uncomplemented;
    header changes need no update; the kernel's completion then yields the
    checksum of the changed packet."""
    seg = TcpSegment(1000, 80, 7, 9, ACK, 512, TcpOptions(timestamp=(1, 2)), payload)
    pkt = build_ipv4_tcp(seg, src, dst, partial_checksum=True)
    tcp = memoryview(pkt)[20:]
    partial = int.from_bytes(tcp[16:18], "big")
    assert partial == pseudo_header_sum(src, dst, PROTO_TCP, len(tcp))
    # Rewrite like the splice relay: addresses (pseudo-header) and seq + TSval (header).
    partial = update_partial_checksum_bytes(partial, src, new_src)
    partial = update_partial_checksum_bytes(partial, dst, new_dst)
    tcp[4:8] = new_seq.to_bytes(4, "big")
    tcp[24:28] = new_tsval.to_bytes(4, "big")
    tcp[16:18] = partial.to_bytes(2, "big")
    completed = complete_partial_checksum(pkt, 20)

    expected = emit_tcp(
        TcpSegment(1000, 80, new_seq, 9, ACK, 512, TcpOptions(timestamp=(new_tsval, 2)), payload),
        new_src,
        new_dst,
    )
    assert completed == int.from_bytes(expected[16:18], "big")


@given(st.binary(max_size=500), addr4, addr4, st.integers(0, 40))
def test_partial_checksum_length_change(payload: bytes, src: bytes, dst: bytes, cut: int) -> None:
    """Trimming payload (e.g. a retransmission cut) changes the pseudo-header length."""
    assume(cut <= len(payload))
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, TcpOptions(), payload)
    seg_bytes = emit_tcp(seg, src, dst, partial_checksum=True)
    partial = int.from_bytes(seg_bytes[16:18], "big")
    new_len = len(seg_bytes) - cut
    partial = update_partial_checksum16(partial, len(seg_bytes), new_len)
    trimmed = bytearray(seg_bytes[:new_len])
    trimmed[16:18] = partial.to_bytes(2, "big")
    shorter = TcpSegment(1, 2, 3, 4, ACK, 5, TcpOptions(), payload[: len(payload) - cut])
    full = emit_tcp(shorter, src, dst)
    assert complete_partial_checksum(trimmed, 0) == int.from_bytes(full[16:18], "big")


def test_complete_update_on_a_partial_field_is_wrong() -> None:
    """Why two flavours exist: RFC 1624 on a NEEDS_CSUM field corrupts it."""
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, TcpOptions(), b"data" * 10)
    seg_bytes = emit_tcp(seg, CLIENT, SERVER, partial_checksum=True)
    partial = int.from_bytes(seg_bytes[16:18], "big")
    new_src = bytes([203, 0, 113, 9])
    wrong = update_checksum_bytes(partial, CLIENT, new_src)
    right = update_partial_checksum_bytes(partial, CLIENT, new_src)
    assert wrong != right
    assert right == pseudo_header_sum(new_src, SERVER, PROTO_TCP, len(seg_bytes))


def test_fold_keeps_negative_zero_distinct_from_zero() -> None:
    assert fold(0) == 0
    assert fold(0xFFFF) == 0xFFFF
    assert fold(0x1FFFE) == 0xFFFF


# --- IPv4 -----------------------------------------------------------------------

ipv4_reprs = st.builds(
    Ipv4Repr,
    src_addr=addr4,
    dst_addr=addr4,
    protocol=st.integers(0, 255),
    payload_len=st.integers(0, 0xFFFF - 20),
    ttl=st.integers(0, 255),
    ident=u16,
    dont_fragment=st.booleans(),
    dscp_ecn=st.integers(0, 255),
)


@given(ipv4_reprs)
def test_ipv4_repr_round_trip(r: Ipv4Repr) -> None:
    pkt = r.to_bytes() + bytes(r.payload_len)
    view = Ipv4Packet(pkt)
    assert view.verify_checksum()
    assert not view.is_fragment
    assert not view.has_options
    assert Ipv4Repr.parse(view) == r


def test_ipv4_buffer_longer_than_total_length_is_trimmed() -> None:
    view = Ipv4Packet(GOLDEN_SYN + b"\xaa" * 30)
    assert view.total_len == 60
    assert len(view.payload) == 40


def test_ipv4_fragment_and_options_are_exposed() -> None:
    pkt = bytearray(GOLDEN_SYN)
    pkt[6:8] = (0x2000 | 0).to_bytes(2, "big")  # MF, offset 0: a first fragment
    assert Ipv4Packet(pkt).is_fragment
    pkt[6:8] = (185).to_bytes(2, "big")  # a later fragment, MF clear
    view = Ipv4Packet(pkt)
    assert view.is_fragment and view.frag_offset == 1480
    with_opts = bytearray(b"\x46" + GOLDEN_SYN[1:20] + b"\x01\x01\x01\x00" + GOLDEN_SYN[20:])
    with_opts[2:4] = (64).to_bytes(2, "big")
    view = Ipv4Packet(with_opts)
    assert view.has_options and bytes(view.options) == b"\x01\x01\x01\x00"
    assert view.header_len == 24 and len(view.payload) == 40


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p[:19], "shorter than a header"),
        (lambda p: b"\x65" + p[1:], "version"),
        (lambda p: b"\x44" + p[1:], "IHL"),
        (lambda p: p[:2] + (61).to_bytes(2, "big") + p[4:], "total length 61 >"),
        (lambda p: p[:2] + (19).to_bytes(2, "big") + p[4:], "total length 19 <"),
        (lambda p: b"\x4f\x00" + (40).to_bytes(2, "big") + p[4:], "40 < header length 60"),
    ],
)
def test_ipv4_malformed_header_is_a_wire_error(mutate: object, reason: str) -> None:
    assert callable(mutate)
    with pytest.raises(WireError, match=reason):
        Ipv4Packet(mutate(GOLDEN_SYN))


def test_ipv4_bad_header_checksum() -> None:
    pkt = bytearray(GOLDEN_SYN)
    pkt[8] = 63  # TTL changed, checksum not updated
    with pytest.raises(WireError, match="checksum"):
        Ipv4Repr.parse(Ipv4Packet(pkt))
    assert Ipv4Repr.parse(Ipv4Packet(pkt), verify_checksum=False).ttl == 63


# --- TCP options ------------------------------------------------------------------

sack_blocks = st.lists(st.tuples(u32, u32), min_size=0, max_size=4).map(tuple)
tcp_options = st.builds(
    TcpOptions,
    mss=st.none() | u16,
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    sack_blocks=sack_blocks,
    timestamp=st.none() | st.tuples(u32, u32),
).filter(lambda o: options_len(o) <= 40)


@given(tcp_options)
def test_options_round_trip_every_combination(opts: TcpOptions) -> None:
    raw = options_to_bytes(opts)
    assert len(raw) % 4 == 0 and len(raw) <= 40
    assert parse_options(raw) == opts


def test_options_use_linux_layout() -> None:
    syn = TcpOptions(mss=1460, sack_permitted=True, timestamp=(0x01020304, 0), wscale=7)
    assert options_to_bytes(syn).hex() == "020405b40402080a01020304000000000103030" + "7"
    data = TcpOptions(timestamp=(1, 2), sack_blocks=((10, 20),))
    assert options_to_bytes(data).hex() == ("0101080a0000000100000002" + "0101050a0000000a00000014")
    no_ts = TcpOptions(mss=536, sack_permitted=True, wscale=0)
    assert options_to_bytes(no_ts).hex() == "02040218" + "01030300" + "01010402"


def test_options_that_cannot_fit_are_refused() -> None:
    too_many = TcpOptions(timestamp=(1, 2), sack_blocks=((1, 2),) * 4)
    with pytest.raises(WireError):
        emit_options(too_many, bytearray(64))


def test_unknown_option_is_skipped_and_eol_ends_the_list() -> None:
    raw = bytes([30, 4, 0xAB, 0xCD, 2, 4, 0x05, 0xB4, 0, 2, 0, 0])  # MPTCP-ish, MSS, EOL, junk
    assert parse_options(raw) == TcpOptions(mss=1460)


@pytest.mark.parametrize(
    "raw",
    [
        bytes([30, 0, 0, 0]),  # length 0
        bytes([30, 1, 0, 0]),  # length 1
        bytes([30, 8, 0, 0]),  # past the end
        bytes([1, 1, 1, 2]),  # kind without a length byte
        bytes([2, 3, 5, 0]),  # MSS with length 3
        bytes([3, 4, 7, 0]),  # window scale with length 4
        bytes([4, 3, 0, 0]),  # SACK-permitted with length 3
        bytes([8, 8, 0, 0, 0, 0, 0, 0]),  # timestamps with length 8
        bytes([5, 2, 1, 1]),  # SACK with 0 blocks
        bytes([5, 11]) + bytes(9),  # SACK, length not 2 + 8n
        bytes([5, 42]) + bytes(40),  # SACK with 5 blocks
    ],
)
def test_malformed_options_are_a_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        parse_options(raw)


# --- TCP --------------------------------------------------------------------------

tcp_segments = st.builds(
    TcpSegment,
    src_port=u16,
    dst_port=u16,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 255),
    window=u16,
    options=tcp_options,
    payload=st.binary(max_size=1500),
    urgent=u16,
)


def as_plain(seg: TcpSegment) -> TcpSegment:
    seg.payload = bytes(seg.payload)
    return seg


@given(tcp_segments, addr4, addr4)
def test_tcp_round_trip(seg: TcpSegment, src: bytes, dst: bytes) -> None:
    raw = emit_tcp(seg, src, dst)
    parsed = parse_tcp(raw, src, dst, verify_checksum=True)
    assert isinstance(parsed.payload, memoryview)
    assert as_plain(parsed) == seg
    assert emit_tcp(parsed, src, dst) == raw


@given(tcp_segments, addr4, addr4)
def test_ipv4_tcp_packet_round_trip(seg: TcpSegment, src: bytes, dst: bytes) -> None:
    pkt = build_ipv4_tcp(seg, src, dst, ttl=17)
    ip = Ipv4Packet(pkt)
    r = Ipv4Repr.parse(ip)
    assert (r.src_addr, r.dst_addr, r.protocol, r.ttl) == (src, dst, PROTO_TCP, 17)
    assert as_plain(parse_tcp(ip.payload, src, dst, verify_checksum=True)) == seg


@given(st.integers(0, 2**33), st.integers(0, 2**33))
def test_seq_and_ack_wrap_modulo_2_to_the_32(seq: int, ack: int) -> None:
    seg = TcpSegment(1, 2, seq, ack, ACK, 0)
    parsed = parse_tcp(emit_tcp(seg, CLIENT, SERVER), CLIENT, SERVER, verify_checksum=True)
    assert (parsed.seq, parsed.ack) == (seq % 2**32, ack % 2**32)


def test_payload_is_a_view_not_a_copy() -> None:
    raw = emit_tcp(TcpSegment(1, 2, 3, 4, ACK, 5, TcpOptions(), b"abcdef"), CLIENT, SERVER)
    parsed = parse_tcp(raw, CLIENT, SERVER, verify_checksum=False)
    raw[-1] = ord("z")
    assert bytes(parsed.payload) == b"abcdez"


def test_tcp_header_view_reads_the_fields() -> None:
    ip = Ipv4Packet(GOLDEN_SYN)
    hdr = TcpHeader(ip.payload)
    assert (hdr.src_port, hdr.dst_port, hdr.seq, hdr.ack) == (36118, 80, 0x0B004EFE, 0)
    assert (hdr.header_len, hdr.flags, hdr.window, hdr.checksum) == (40, SYN, 64240, 0x1F6D)
    assert hdr.urgent == 0 and len(hdr.payload) == 0 and len(hdr.options) == 20
    assert hdr.verify_checksum(ip.src_addr, ip.dst_addr)
    assert not hdr.verify_checksum(ip.src_addr, SERVER[::-1])


@pytest.mark.parametrize(
    ("segment", "reason"),
    [
        (GOLDEN_SYN[20:39], "shorter than a header"),
        (GOLDEN_SYN[20:32] + b"\x40" + GOLDEN_SYN[33:], "data offset 4 < 5"),
        (GOLDEN_SYN[20:32] + b"\xf0" + GOLDEN_SYN[33:], "data offset 60 bytes > segment"),
        (GOLDEN_SYN[20:-1] + b"\x0b", "checksum"),  # WS 11 instead of 10
    ],
)
def test_malformed_tcp_is_a_wire_error(segment: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        parse_tcp(segment, CLIENT, SERVER, verify_checksum=True)
    if reason != "checksum":
        with pytest.raises(WireError, match=reason):
            TcpHeader(segment)


@given(st.binary(max_size=120), st.booleans())
def test_random_bytes_give_a_segment_or_a_wire_error(data: bytes, verify: bool) -> None:
    try:
        seg = parse_tcp(data, CLIENT, SERVER, verify_checksum=verify)
    except WireError:
        return
    assert isinstance(seg, TcpSegment)


@given(st.binary(min_size=20, max_size=80), st.binary(max_size=60))
def test_random_headers_with_valid_offset_give_a_segment_or_a_wire_error(
    header: bytes, rest: bytes
) -> None:
    """Steer the fuzz past the data-offset check so the option parser gets exercised."""
    raw = bytearray(header + rest)
    raw[12] = (min(len(header), 60) // 4) << 4
    try:
        seg = parse_tcp(raw, CLIENT, SERVER, verify_checksum=False)
    except WireError:
        return
    assert isinstance(seg, TcpSegment)


@given(st.binary(max_size=120))
def test_random_bytes_give_an_ipv4_view_or_a_wire_error(data: bytes) -> None:
    try:
        view = Ipv4Packet(data)
    except WireError:
        return
    assert view.total_len <= len(data)


# --- golden frames -----------------------------------------------------------------


def test_golden_linux_syn() -> None:
    ip = Ipv4Packet(GOLDEN_SYN)
    r = Ipv4Repr.parse(ip)
    assert (r.src_addr, r.dst_addr, r.ttl, r.ident, r.dont_fragment) == (
        CLIENT,
        SERVER,
        64,
        0x6DF3,
        True,
    )
    seg = parse_tcp(ip.payload, r.src_addr, r.dst_addr, verify_checksum=True)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (36118, 80, 184569598, 0)
    assert (seg.flags, seg.window, len(seg.payload)) == (SYN, 64240, 0)
    assert seg.options == TcpOptions(
        mss=1460, wscale=10, sack_permitted=True, timestamp=(3324613594, 0)
    )
    assert build_ipv4_tcp(seg, r.src_addr, r.dst_addr, ident=r.ident) == GOLDEN_SYN


def test_golden_linux_syn_ack() -> None:
    ip = Ipv4Packet(GOLDEN_SYN_ACK)
    r = Ipv4Repr.parse(ip)
    assert (r.src_addr, r.dst_addr, r.ident) == (CLIENT, SERVER, 0)
    seg = parse_tcp(ip.payload, r.src_addr, r.dst_addr, verify_checksum=True)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (8080, 40000, 3574881237, 1001)
    assert (seg.flags, seg.window) == (SYN | ACK, 65160)
    assert seg.options == TcpOptions(
        mss=1460, wscale=10, sack_permitted=True, timestamp=(2600842207, 12345)
    )
    assert build_ipv4_tcp(seg, r.src_addr, r.dst_addr) == GOLDEN_SYN_ACK


# --- virtio_net_hdr -------------------------------------------------------------------


@given(st.integers(0, 255), st.integers(0, 255), u16, u16, u16, u16)
def test_vnet_header_round_trip(a: int, b: int, c: int, d: int, e: int, f: int) -> None:
    hdr = VnetHeader(a, b, c, d, e, f)
    raw = hdr.to_bytes()
    assert len(raw) == 10
    assert VnetHeader.parse(raw + b"ip packet") == hdr


def test_vnet_header_is_little_endian_on_x86() -> None:
    hdr = VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    assert hdr.to_bytes().hex() == "0101" + "3400" + "a805" + "1400" + "1000"


def test_vnet_header_too_short() -> None:
    with pytest.raises(WireError):
        VnetHeader.parse(b"\x01" * 9)


def test_vnet_header_for_tcp_sets_gso_only_above_mss() -> None:
    big = vnet_header_for_tcp(20, 32, 60000, 1448)
    assert (big.flags, big.gso_type, big.gso_size) == (F_NEEDS_CSUM, GSO_TCPV4, 1448)
    assert (big.hdr_len, big.csum_start, big.csum_offset) == (52, 20, 16)
    small = vnet_header_for_tcp(20, 32, 1448, 1448)
    assert (small.gso_type, small.gso_size, small.needs_csum) == (GSO_NONE, 0, True)
    assert not small.is_gso and big.is_gso
