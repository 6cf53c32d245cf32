"""Specification of daemon/splice/translator.py: the relay's per-segment rewrite (thesis 5.2-5.4).

Every test builds a packet with daemon.wire, translates it, and parses the
output with daemon.wire again, so the translator is checked against the
wire layer's reading of the bytes, not against its own.  No root needed.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.splice.translator import (
    SegmentInfo,
    Translator,
    TsMode,
    base_delta,
    peek,
    translate,
)
from daemon.wire.checksum import complete_partial_checksum, internet_checksum, pseudo_header_sum
from daemon.wire.ipv4 import PROTO_TCP, Ipv4Packet
from daemon.wire.tcp import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    URG,
    TcpOptions,
    TcpSegment,
    build_ipv4_tcp,
    parse_tcp,
)
from daemon.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    VnetHeader,
    vnet_header_for_tcp,
)

CLIENT = bytes([192, 0, 2, 1])
DAEMON_CLIENT_SIDE = bytes([192, 0, 2, 100])
DAEMON_SERVER_SIDE = bytes([198, 51, 100, 100])
SERVER = bytes([203, 0, 113, 2])
M32 = 0xFFFFFFFF

u32 = st.integers(0, M32)


def translator(**changes: object) -> Translator:
    """Client -> server direction; every field can be overridden."""
    fields: dict[str, object] = dict(
        src_addr=DAEMON_SERVER_SIDE,
        dst_addr=SERVER,
        src_port=40000,
        dst_port=80,
        seq_delta=1000,
        ack_delta=-500,
        ack_fixed=0,
        ts_mode=TsMode.MAP,
        tsval_delta=7,
        tsecr_delta=-3,
        sack=True,
        wnd_in_shift=0,
        wnd_out_shift=0,
        out_mss=1448,
        offload=False,
    )
    fields.update(changes)
    return Translator(**fields)  # type: ignore[arg-type]


def segment(
    *,
    seq: int = 5000,
    ack: int = 9000,
    flags: int = ACK | PSH,
    window: int = 500,
    options: TcpOptions | None = None,
    payload: bytes = b"hello",
    urgent: int = 0,
) -> TcpSegment:
    opts = TcpOptions(timestamp=(100, 200)) if options is None else options
    return TcpSegment(1234, 8080, seq, ack, flags, window, opts, payload, urgent)


def packet(seg: TcpSegment, *, partial: bool = False, dscp_ecn: int = 0) -> bytearray:
    return build_ipv4_tcp(
        seg,
        CLIENT,
        DAEMON_CLIENT_SIDE,
        ttl=63,
        ident=77,
        dscp_ecn=dscp_ecn,
        partial_checksum=partial,
    )


def raw_packet(
    options: bytes, *, payload: bytes = b"data", flags: int = ACK, seq: int = 1
) -> bytes:
    """A packet with option bytes exactly as given (layouts TcpOptions cannot express)."""
    assert len(options) % 4 == 0
    doff = 20 + len(options)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", 1234, 8080, seq, 2, (doff // 4) << 4, flags, 100, 0, 0)
    )
    tcp += options + payload
    pseudo = pseudo_header_sum(CLIENT, DAEMON_CLIENT_SIDE, PROTO_TCP, len(tcp))
    struct.pack_into("!H", tcp, 16, internet_checksum(tcp, pseudo))
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, CLIENT, DAEMON_CLIENT_SIDE
        )
    )
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    return bytes(ip + tcp)


def run(
    t: Translator, pkt: bytes | bytearray, vnet: VnetHeader | None = None
) -> list[tuple[bytes | None, bytes]]:
    buf = bytearray(pkt)
    return [(h, bytes(p)) for h, p in translate(t, vnet, memoryview(buf))]


def parse_checked(out: tuple[bytes | None, bytes], t: Translator) -> tuple[Ipv4Packet, TcpSegment]:
    """Parse one output packet and check both checksums the way a receiver would."""
    hdr, pkt = out
    ip = Ipv4Packet(pkt)
    assert ip.total_len == len(pkt)
    assert ip.verify_checksum()
    assert (ip.src_addr, ip.dst_addr) == (t.src_addr, t.dst_addr)
    assert not ip.has_options
    tcp = ip.payload
    if t.offload:
        assert hdr is not None
        v = VnetHeader.parse(hdr)
        assert v.flags == F_NEEDS_CSUM
        assert (v.csum_start, v.csum_offset) == (20, 16)
        pseudo = pseudo_header_sum(t.src_addr, t.dst_addr, PROTO_TCP, len(tcp))
        assert struct.unpack_from("!H", tcp, 16)[0] == pseudo
        done = bytearray(pkt)
        struct.pack_into("!H", done, 36, complete_partial_checksum(done, 20))
        tcp = Ipv4Packet(done).payload
    else:
        assert hdr is None
    return ip, parse_tcp(tcp, t.src_addr, t.dst_addr, verify_checksum=True)


def one(t: Translator, pkt: bytes | bytearray, vnet: VnetHeader | None = None) -> TcpSegment:
    outs = run(t, pkt, vnet)
    assert len(outs) == 1
    return parse_checked(outs[0], t)[1]


MODES = pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])


# --- IPv4 and TCP fixed fields (5.2) ------------------------------------------


@MODES
def test_addresses_ports_ttl_and_payload(offload: bool) -> None:
    t = translator(offload=offload)
    outs = run(t, packet(segment(payload=b"x" * 300)))
    ip, seg = parse_checked(outs[0], t)
    assert ip.ttl == 64
    assert ip.ident == 77
    assert ip.dont_fragment
    assert (seg.src_port, seg.dst_port) == (40000, 80)
    assert bytes(seg.payload) == b"x" * 300
    assert seg.flags == ACK | PSH


@MODES
@given(seq=u32, ack=u32, seq_delta=st.integers(-(2**33), 2**33), ack_delta=u32)
def test_seq_and_ack_are_mapped_modulo_2_32(
    offload: bool, seq: int, ack: int, seq_delta: int, ack_delta: int
) -> None:
    t = translator(offload=offload, seq_delta=seq_delta, ack_delta=ack_delta)
    seg = one(t, packet(segment(seq=seq, ack=ack)))
    assert seg.seq == (seq + seq_delta) % 2**32
    assert seg.ack == (ack + ack_delta) % 2**32


def test_segment_without_ack_flag_carries_ack_zero() -> None:
    t = translator()
    seg = one(t, packet(segment(flags=RST, ack=12345, payload=b"", options=TcpOptions())))
    assert seg.flags == RST
    assert seg.ack == 0


def test_ack_fixed_when_the_reverse_direction_is_not_spliced() -> None:
    t = translator(ack_delta=None, ack_fixed=0xDEADBEEF)
    assert one(t, packet(segment(ack=1))).ack == 0xDEADBEEF
    assert one(t, packet(segment(ack=99999))).ack == 0xDEADBEEF


@MODES
@pytest.mark.parametrize(
    ("in_shift", "out_shift", "window", "expected"),
    [
        (0, 0, 65535, 65535),
        (7, 7, 1000, 1000),  # equal shifts: the field passes unchanged
        (3, 0, 1000, 8000),  # unscaled for a peer without scaling...
        (7, 0, 511, 65408),
        (7, 0, 512, 65535),  # ...and clamped
        (0, 7, 65535, 511),  # 65535 bytes: 511 * 128 = 65408, never 512 * 128
        (2, 7, 1000, 31),  # 4000 bytes: 31 * 128 = 3968 <= 4000
        (0, 7, 127, 0),  # less than one unit of the output scale rounds to zero
        (7, 7, 0, 0),
        (3, 7, 0, 0),  # a zero window stays zero
        (14, 7, 65535, 65535),  # 2**30 bytes: the output field saturates
        (14, 14, 65535, 65535),
        (9, 14, 40000, 1250),
    ],
)
def test_window_rescaled_rounding_down_and_clamped(
    offload: bool, in_shift: int, out_shift: int, window: int, expected: int
) -> None:
    t = translator(offload=offload, wnd_in_shift=in_shift, wnd_out_shift=out_shift)
    assert one(t, packet(segment(window=window))).window == expected


@given(
    window=st.integers(0, 0xFFFF),
    in_shift=st.integers(0, 14),
    out_shift=st.integers(0, 14),
)
def test_window_never_offers_more_than_the_peer_allowed(
    window: int, in_shift: int, out_shift: int
) -> None:
    t = translator(wnd_in_shift=in_shift, wnd_out_shift=out_shift)
    out = one(t, packet(segment(window=window))).window
    allowed = window << in_shift
    assert out << out_shift <= allowed
    # ... and loses less than one unit of the output scale, unless clamped.
    assert out == 0xFFFF or allowed - (out << out_shift) < 1 << out_shift


@MODES
def test_ecn_codepoint_and_ece_cwr_are_cleared_dscp_kept(offload: bool) -> None:
    t = translator(offload=offload)
    pkt = packet(segment(flags=ACK | PSH | ECE | CWR), dscp_ecn=0xB8 | 0x03)  # EF + CE
    ip, seg = parse_checked(run(t, pkt)[0], t)
    assert ip.ecn == 0
    assert ip.dscp_ecn == 0xB8
    assert seg.flags == ACK | PSH


@MODES
@pytest.mark.parametrize("codepoint", [0, 1, 2, 3])
def test_with_ecn_on_both_sides_the_codepoint_ece_and_cwr_cross(
    offload: bool, codepoint: int
) -> None:
    """RFC 3168 end to end: both connections negotiated ECN, so the marks mean the same there."""
    t = translator(offload=offload, ecn=True)
    pkt = packet(segment(flags=ACK | PSH | ECE | CWR), dscp_ecn=0xB8 | codepoint)
    ip, seg = parse_checked(run(t, pkt)[0], t)
    assert ip.dscp_ecn == 0xB8 | codepoint
    assert seg.flags == ACK | PSH | ECE | CWR


def test_with_ecn_a_cwr_super_packet_keeps_gso_ecn() -> None:
    t = translator(offload=True, ecn=True)
    seg = segment(flags=ACK | CWR, payload=bytes(5000))
    vnet = vnet_header_for_tcp(20, 32, 5000, 1448, ecn=True)
    hdr, _ = run(t, packet(seg, partial=True), vnet)[0]
    assert hdr is not None
    assert VnetHeader.parse(hdr).gso_type == GSO_TCPV4 | GSO_ECN  # CWR on the first piece only
    hdr, _ = run(t, packet(segment(flags=ACK, payload=bytes(5000)), partial=True), vnet)[0]
    assert hdr is not None and VnetHeader.parse(hdr).gso_type == GSO_TCPV4


def test_with_ecn_a_cut_segment_carries_cwr_on_its_first_piece_only() -> None:
    t = translator(offload=False, ecn=True, out_mss=1000)
    out = run(t, packet(segment(flags=ACK | PSH | CWR, payload=bytes(2500)), dscp_ecn=2))
    assert len(out) == 3
    flags = [parse_checked(piece, t)[1].flags for piece in out]
    assert flags == [ACK | CWR, ACK, ACK | PSH]
    assert all(parse_checked(piece, t)[0].ecn == 2 for piece in out)  # ECT on every piece


def test_gso_ecn_is_not_passed_on_once_cwr_is_cleared() -> None:
    t = translator(offload=True)
    seg = segment(flags=ACK | CWR, payload=bytes(5000))
    vnet = vnet_header_for_tcp(20, 32, 5000, 1448, ecn=True)
    assert vnet.gso_type == GSO_TCPV4 | GSO_ECN
    hdr, _ = run(t, packet(seg, partial=True), vnet)[0]
    assert hdr is not None
    assert VnetHeader.parse(hdr).gso_type == GSO_TCPV4


@MODES
def test_urgent_pointer_and_flag_are_kept(offload: bool) -> None:
    t = translator(offload=offload)
    seg = one(t, packet(segment(flags=ACK | URG, urgent=3)))
    assert seg.flags == ACK | URG
    assert seg.urgent == 3


def with_ip_options(pkt: bytes | bytearray, options: bytes) -> bytearray:
    """Insert IPv4 options after the fixed header (RFC 791 3.1)."""
    out = bytearray(pkt[:20]) + options + pkt[20:]
    out[0] = 0x40 | (20 + len(options)) // 4
    struct.pack_into("!HH", out, 2, len(out), out[4] << 8 | out[5])
    struct.pack_into("!H", out, 10, 0)
    struct.pack_into("!H", out, 10, internet_checksum(out[: 20 + len(options)]))
    return out


@MODES
def test_ip_options_are_removed(offload: bool) -> None:
    t = translator(offload=offload)
    original = packet(segment(payload=bytes(range(200))))
    pkt = with_ip_options(original, bytes([0x94, 4, 0, 0, 1, 1, 1, 0]))  # router alert, NOPs, EOL
    assert Ipv4Packet(pkt).header_len == 28
    ip, seg = parse_checked(run(t, pkt)[0], t)
    assert ip.total_len == len(original)
    assert bytes(seg.payload) == bytes(range(200))
    assert seg.seq == 6000


def test_output_is_trimmed_to_the_ip_total_length() -> None:
    t = translator()
    pkt = packet(segment()) + b"\x00" * 6  # Ethernet-style padding
    outs = run(t, pkt)
    assert len(outs[0][1]) == len(pkt) - 6
    parse_checked(outs[0], t)


# --- timestamps (5.4.1) ----------------------------------------------------------


@MODES
@given(tsval=u32, tsecr=u32, dval=u32, decr=u32)
def test_timestamps_are_mapped(offload: bool, tsval: int, tsecr: int, dval: int, decr: int) -> None:
    t = translator(offload=offload, tsval_delta=dval, tsecr_delta=decr)
    seg = one(t, packet(segment(options=TcpOptions(timestamp=(tsval, tsecr)))))
    assert seg.options.timestamp == ((tsval + dval) % 2**32, (tsecr + decr) % 2**32)


@MODES
def test_tsecr_echoing_a_pre_splice_tsval_becomes_the_peers_newest_tsval(offload: bool) -> None:
    # The client echoes a TSval of the daemon's own client TCB (sent before
    # the splice, below the floor): the server never sent anything it maps to,
    # so it gets the newest TSval the server really sent.
    t = translator(offload=offload, tsecr_floor_in=5000, tsecr_floor_out=777)
    old = one(t, packet(segment(options=TcpOptions(timestamp=(100, 4999)))))
    assert old.options.timestamp == (107, 777)
    new = one(t, packet(segment(options=TcpOptions(timestamp=(100, 5000)))))
    assert new.options.timestamp == (107, 4997)
    # The floor holds across the 2**32 wrap, like PAWS (RFC 7323 5.3).
    t = translator(offload=offload, tsecr_floor_in=M32 - 10, tsecr_floor_out=777)
    wrapped = one(t, packet(segment(options=TcpOptions(timestamp=(100, 5)))))
    assert wrapped.options.timestamp == (107, 2)


def test_timestamps_mapped_in_a_non_linux_layout() -> None:
    # TS at an odd offset after a NOP, then EOL padding: the general scanner.
    opts = bytes([1, 8, 10]) + struct.pack("!II", 100, 200) + bytes([0])
    seg = one(translator(), raw_packet(opts))
    assert seg.options.timestamp == (107, 197)


def test_tsecr_is_zero_on_a_segment_without_ack() -> None:
    # RFC 7323 3.2: TSecr is only valid with ACK.
    t = translator()
    seg = one(t, packet(segment(flags=RST, options=TcpOptions(timestamp=(100, 200)), payload=b"")))
    assert seg.options.timestamp == (107, 0)


@MODES
def test_timestamps_stripped_to_nops(offload: bool) -> None:
    t = translator(offload=offload, ts_mode=TsMode.STRIP)
    hdr, out = run(t, packet(segment(payload=b"abc")))[0]
    ip, seg = parse_checked((hdr, out), t)
    assert seg.options.timestamp is None
    assert bytes(ip.payload[20:32]) == b"\x01" * 12
    assert bytes(seg.payload) == b"abc"


def test_timestamps_stripped_in_a_sack_segment_keeps_the_sack_blocks() -> None:
    opts = TcpOptions(timestamp=(1, 2), sack_blocks=((100, 200),))
    seg = one(translator(ts_mode=TsMode.STRIP, ack_delta=10), packet(segment(options=opts)))
    assert seg.options.timestamp is None
    assert seg.options.sack_blocks == ((110, 210),)


def test_timestamps_left_alone_when_absent_mode() -> None:
    t = translator(ts_mode=TsMode.ABSENT)
    seg = one(t, packet(segment(options=TcpOptions(timestamp=(100, 200)))))
    assert seg.options.timestamp == (100, 200)


# --- SACK (5.4.3) ------------------------------------------------------------------


@MODES
def test_sack_blocks_mapped_including_dsack_below_ack(offload: bool) -> None:
    # RFC 2883: the first block below the ack reports a duplicate.
    blocks = ((8000, 8500), (10000, 11000), (M32 - 99, 400))
    opts = TcpOptions(timestamp=(1, 2), sack_blocks=blocks)
    t = translator(offload=offload, ack_delta=200)
    seg = one(t, packet(segment(ack=9000, options=opts)))
    assert seg.ack == 9200
    assert seg.options.sack_blocks == ((8200, 8700), (10200, 11200), (100, 600))
    assert seg.options.timestamp == (8, M32)  # TSecr 2 - 3 wraps


def test_sack_blocks_mapped_without_timestamps() -> None:
    # NOP NOP SACK at the start of the options: the general scanner's path.
    opts = TcpOptions(sack_blocks=((100, 200),))
    seg = one(translator(ack_delta=-100), packet(segment(options=opts)))
    assert seg.options.sack_blocks == ((0, 100),)


@pytest.mark.parametrize("with_ts", [False, True], ids=["sack only", "ts+sack"])
@pytest.mark.parametrize(
    "changes", [{"sack": False}, {"ack_delta": None}], ids=["not negotiated", "ack fixed"]
)
def test_sack_stripped_to_nops(changes: dict[str, object], with_ts: bool) -> None:
    opts = TcpOptions(
        timestamp=(100, 200) if with_ts else None, sack_blocks=((100, 200), (300, 400))
    )
    t = translator(**changes)
    _, out = run(t, packet(segment(options=opts)))[0]
    ip, seg = parse_checked((None, out), t)
    assert seg.options.sack_blocks == ()
    assert seg.options.timestamp == ((107, 197) if with_ts else None)
    sack_at = 32 if with_ts else 20
    assert bytes(ip.payload[sack_at : sack_at + 20]) == b"\x01" * 20


# --- checksums ---------------------------------------------------------------------


@pytest.mark.parametrize("partial_in", [False, True], ids=["complete in", "partial in"])
def test_offload_checksum_is_the_pseudo_sum_whatever_came_in(partial_in: bool) -> None:
    t = translator(offload=True)
    pkt = packet(segment(payload=bytes(range(256)) * 4), partial=partial_in)
    vnet = vnet_header_for_tcp(20, 32, 1024, 1448) if partial_in else VnetHeader()
    one(t, pkt, vnet)  # parse_checked asserts the pseudo sum and completes it


@given(
    payload=st.binary(max_size=1448),
    seq=u32,
    ack=u32,
    window=st.integers(0, 0xFFFF),
    tsval=u32,
    tsecr=u32,
    flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | ECE | CWR]),
    sack=st.lists(st.tuples(u32, u32), max_size=3),
    shift=st.integers(0, 14),
)
def test_plain_incremental_checksum_equals_a_full_checksum(
    payload: bytes,
    seq: int,
    ack: int,
    window: int,
    tsval: int,
    tsecr: int,
    flags: int,
    sack: list[tuple[int, int]],
    shift: int,
) -> None:
    opts = TcpOptions(timestamp=(tsval, tsecr), sack_blocks=tuple(sack))
    t = translator(wnd_in_shift=shift, seq_delta=0x89ABCDEF, ack_delta=0x12345678)
    pkt = packet(
        segment(seq=seq, ack=ack, flags=flags, window=window, options=opts, payload=payload)
    )
    one(t, pkt)  # parse_tcp(verify_checksum=True) checks it


@MODES
def test_rst_without_options_or_payload(offload: bool) -> None:
    t = translator(offload=offload)
    seg = one(t, packet(segment(flags=RST | ACK, options=TcpOptions(), payload=b"")))
    assert seg.flags == RST | ACK


# --- segment size (5.4.4) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("gso_in", "payload_len", "out_mss", "gso_out"),
    [
        (None, 1000, 1448, (GSO_NONE, 0)),
        (None, 1448, 1448, (GSO_NONE, 0)),
        (None, 1449, 1448, (GSO_TCPV4, 1448)),  # a non-GSO oversize becomes GSO
        (1448, 64000, 1448, (GSO_TCPV4, 1448)),
        (1448, 64000, 9000, (GSO_TCPV4, 1448)),  # the sender's segment size is kept
        (1448, 64000, 1200, (GSO_TCPV4, 1200)),  # re-segmented for a smaller MSS
        (1448, 1000, 1200, (GSO_NONE, 0)),  # a GSO packet of one segment
        (1448, 1400, 1200, (GSO_TCPV4, 1200)),
    ],
)
def test_gso_size_selection(
    gso_in: int | None, payload_len: int, out_mss: int, gso_out: tuple[int, int]
) -> None:
    t = translator(offload=True, out_mss=out_mss)
    pkt = packet(segment(payload=bytes(payload_len)), partial=True)
    gso_type = GSO_NONE if gso_in is None else GSO_TCPV4
    vnet = VnetHeader(F_NEEDS_CSUM, gso_type, 0, gso_in or 0, 20, 16)
    outs = run(t, pkt, vnet)
    assert len(outs) == 1
    parse_checked(outs[0], t)
    hdr = outs[0][0]
    assert hdr is not None
    v = VnetHeader.parse(hdr)
    assert (v.gso_type, v.gso_size) == gso_out
    assert v.hdr_len == 52  # computed: 20 + 20 + NOP NOP TS


def test_plain_mode_splits_an_oversize_payload() -> None:
    payload = bytes(i % 251 for i in range(4000))
    t = translator(out_mss=1448, seq_delta=-5000 + M32 - 1000)
    outs = run(t, packet(segment(seq=5000, flags=ACK | PSH | FIN, payload=payload)))
    assert len(outs) == 3
    segs = [parse_checked(o, t) for o in outs]
    got = b""
    for i, (ip, seg) in enumerate(segs):
        assert seg.seq == (M32 - 1000 + len(got)) % 2**32  # the last piece wraps
        assert seg.options.timestamp == (107, 197)
        assert seg.ack == 8500
        last = i == 2
        assert seg.flags == (ACK | PSH | FIN if last else ACK)
        assert ip.ident == 77 + i
        got += bytes(seg.payload)
    assert [len(s.payload) for _, s in segs] == [1448, 1448, 1104]
    assert got == payload


def test_plain_split_rebases_the_urgent_pointer() -> None:
    t = translator(out_mss=100)
    outs = run(t, packet(segment(flags=ACK | URG, urgent=150, payload=bytes(250))))
    segs = [parse_checked(o, t)[1] for o in outs]
    assert [(s.flags & URG, s.urgent) for s in segs] == [(URG, 150), (URG, 50), (0, 0)]


# --- malformed input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        bytes([8, 10, 0, 0, 0, 0, 0, 0, 0, 0, 1, 5]),  # kind with no length byte
        bytes([1, 1, 8, 8, 0, 0, 0, 0]),  # TS of length 8
        bytes([5, 9]) + bytes(7) + bytes([0, 0, 0]),  # SACK not 2 + 8k
        bytes([1, 1, 5, 2]),  # SACK with no block
        bytes([30, 1, 0, 0]),  # length 1
        bytes([30, 0, 0, 0]),  # length 0
        bytes([1, 30, 8, 0]),  # runs past the end
        bytes([2, 5, 0, 0]),  # MSS of length 5
    ],
)
@MODES
def test_malformed_options_are_dropped(options: bytes, offload: bool) -> None:
    assert run(translator(offload=offload), raw_packet(options)) == []


def test_unknown_options_and_eol_padding_are_kept() -> None:
    opts = bytes([30, 4, 0xAB, 0xCD, 1, 0, 0xEE, 0xEE])  # experimental kind, NOP, EOL, padding
    t = translator()
    _, out = run(t, raw_packet(opts))[0]
    assert out[40:48] == opts
    parse_checked((None, out), t)


def bad(mutate: str) -> bytes:
    pkt = bytearray(packet(segment()))
    if mutate == "short":
        return bytes(pkt[:39])
    if mutate == "version":
        pkt[0] = 0x65
    elif mutate == "ihl":
        pkt[0] = 0x44
    elif mutate == "udp":
        pkt[9] = 17
    elif mutate == "fragment":
        pkt[6] |= 0x20  # MF
    elif mutate == "total over buffer":
        struct.pack_into("!H", pkt, 2, len(pkt) + 1)
    elif mutate == "data offset small":
        pkt[32] = 0x40
    elif mutate == "data offset past end":
        struct.pack_into("!H", pkt, 2, 50)
    return bytes(pkt)


BAD = [
    "short",
    "version",
    "ihl",
    "udp",
    "fragment",
    "total over buffer",
    "data offset small",
    "data offset past end",
]


@pytest.mark.parametrize("mutate", BAD)
@MODES
def test_malformed_packets_are_dropped(mutate: str, offload: bool) -> None:
    assert run(translator(offload=offload), bad(mutate)) == []


@pytest.mark.parametrize("mutate", BAD)
def test_peek_rejects_what_translate_rejects(mutate: str) -> None:
    assert peek(memoryview(bad(mutate))) is None


def test_peek_reads_the_fixed_fields() -> None:
    pkt = packet(segment(seq=M32, ack=3, flags=ACK | FIN, window=9, payload=b"12345"))
    info = peek(memoryview(pkt))
    assert info is not None
    assert (
        info[:9]
        == SegmentInfo(
            ip_header_len=20,
            tcp_header_len=32,
            flags=ACK | FIN,
            seq=M32,
            ack=3,
            window=9,
            payload_len=5,
            src_port=1234,
            dst_port=8080,
            tos=0,
            total=20 + 32 + 5,
            ident=0,
            frag=0,
            offset_byte=0x80,
            checksum=0,
            urgent=0,
        )[:9]
    )
    assert info.total == 57 and info.offset_byte >> 4 == 8 and info.frag & 0x3FFF == 0
    info = peek(memoryview(with_ip_options(pkt, bytes(4))))
    assert info is not None
    assert (info.ip_header_len, info.payload_len) == (24, 5)


# --- construction ------------------------------------------------------------------


@given(u32, u32, u32)
def test_base_delta_maps_in_base_to_out_base(in_base: int, out_base: int, offset: int) -> None:
    d = base_delta(in_base, out_base)
    assert (in_base + d) % 2**32 == out_base
    assert (in_base + offset + d) % 2**32 == (out_base + offset) % 2**32


def test_reverse_ack_delta_is_minus_the_forward_seq_delta() -> None:
    # 5.3: client->server seq uses (irs_client -> iss_server); server->client
    # ack uses (iss_server -> irs_client): the same base pair reversed.
    irs_client, iss_server = 0xFFFFFF00, 0x10
    seq_delta = base_delta(irs_client, iss_server)
    ack_delta_reverse = base_delta(iss_server, irs_client)
    assert (seq_delta + ack_delta_reverse) % 2**32 == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"src_addr": bytes(16)},
        {"dst_port": 65536},
        {"wnd_in_shift": 15},
        {"wnd_out_shift": -1},
        {"out_mss": 0},
    ],
)
def test_translator_rejects_impossible_parameters(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        translator(**changes)
