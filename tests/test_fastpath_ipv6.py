"""The kernel fast path in IPv6 and across families: the tc program is the Python relay.

tests/test_fastpath.py holds the program to translate() for IPv4; here the
reference for a packet of either family bound for a connection of either
family is what the Python relay writes: daemon/splice/family.py's
``to_relay_shape`` for an IPv6 input, ``translate`` in plain mode, and
``to_ipv6`` for an IPv6 output.  The program must write the same bytes
(the TCP checksum may differ only between the two encodings of zero, and
must verify against the output family's pseudo-header), give verdict
TC_ACT_REDIRECT, and for a change of family also retype the frame and
count it.  What it does not handle in IPv6 (extension headers, jumbograms,
lengths that do not add up) comes out untouched with its punt counter.
Needs root (BPF_PROG_TEST_RUN).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.fastpath import DEFAULT_OBJECT, FastPath, FlowKey
from daemon.fastpath.loader import TC_ACT_OK, TC_ACT_REDIRECT
from daemon.splice.family import V6_PLACEHOLDER, to_ipv6, to_relay_shape
from daemon.splice.translator import Translator, TsMode, translate
from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.flowlabel import flow_label
from daemon.wire.tcp import ACK, CWR, ECE, FIN, PSH, SYN
from tests.test_fastpath import (
    CLIENT,
    DAEMON_CLIENT_SIDE,
    DAEMON_SERVER_SIDE,
    EGRESS,
    ETH,
    GOLDEN,
    M32,
    SERVER,
    ip_tcp,
    option_layouts,
    sack_option,
    translator,
    ts_option,
)

pytestmark = pytest.mark.root

CLIENT6 = bytes.fromhex("20010db8000c00000000000000000001")
DAEMON_CLIENT_SIDE6 = bytes.fromhex("20010db8000d00000000000000000001")
DAEMON_SERVER_SIDE6 = bytes.fromhex("20010db8000d00000000000000000002")
SERVER6 = bytes.fromhex("20010db8000500000000000000000002")
ETH_IP, ETH_IPV6 = b"\x08\x00", b"\x86\xdd"

# (input family, output family): the four ways a splice may join connections.
COMBOS = ["4to4", "6to6", "4to6", "6to4"]


def addresses(combo: str) -> tuple[FlowKey, tuple[bytes, bytes]]:
    """The key of the arriving packets and the output connection's (src, dst)."""
    six_in, six_out = combo[0] == "6", combo[-1] == "6"
    key: FlowKey = (
        CLIENT6 if six_in else CLIENT,
        1234,
        DAEMON_CLIENT_SIDE6 if six_in else DAEMON_CLIENT_SIDE,
        8080,
    )
    out = (DAEMON_SERVER_SIDE6, SERVER6) if six_out else (DAEMON_SERVER_SIDE, SERVER)
    return key, out


def as_ipv6(packet4: bytes, src: bytes, dst: bytes, *, hop: int = 63, flow: int = 0x12345) -> bytes:
    """``packet4``'s TCP segment in an IPv6 packet (its TOS as the traffic class)."""
    tcp = bytearray(packet4[20:])
    tcp[16:18] = b"\0\0"
    struct.pack_into(
        "!H", tcp, 16, internet_checksum(tcp, pseudo_header_sum(src, dst, 6, len(tcp)))
    )
    first = 6 << 28 | packet4[1] << 20 | flow
    return struct.pack("!IHBB16s16s", first, len(tcp), 6, hop, src, dst) + bytes(tcp)


def packet_in(combo: str, **fields: object) -> bytes:
    key, _out = addresses(combo)
    if combo[0] == "4":
        return ip_tcp(key=key, **fields)  # type: ignore[arg-type]
    v4 = ip_tcp(key=(CLIENT, key[1], DAEMON_CLIENT_SIDE, key[3]), **fields)  # type: ignore[arg-type]
    return as_ipv6(v4, key[0], key[2])


def relay_translator(combo: str, **changes: object) -> Translator:
    """The relay's translator toward the output: placeholders for an IPv6 connection."""
    _key, out = addresses(combo)
    if combo[-1] == "6":
        t = translator(src_addr=V6_PLACEHOLDER, dst_addr=V6_PLACEHOLDER, **changes)
        # The label session.py gives an IPv6 output connection.
        return replace(t, flow_label=flow_label(out[0], t.src_port, out[1], t.dst_port))
    return translator(src_addr=out[0], dst_addr=out[1], **changes)


def reference(combo: str, t: Translator, packet: bytes) -> bytes:
    """What the Python relay writes for ``packet`` (plain mode, one segment)."""
    _key, out = addresses(combo)
    buf = memoryview(bytearray(packet))
    if combo[0] == "6":
        shaped = to_relay_shape(buf, None)
        assert shaped is not None
        buf = memoryview(bytearray(shaped[0]))
    written = translate(t, None, buf)
    assert len(written) == 1, "the reference cut the segment: not a fast-path case"
    result = written[0][1]
    if combo[-1] == "6":
        result = to_ipv6(None, result, out[0], out[1], t.flow_label)[1]
    return bytes(result)


def tcp_checksum_verifies(packet: bytes) -> bool:
    if packet[0] >> 4 == 6:
        src, dst, tcp = packet[8:24], packet[24:40], packet[40:]
    else:
        src, dst, tcp = packet[12:16], packet[16:20], packet[20:]
    return internet_checksum(tcp, pseudo_header_sum(src, dst, 6, len(tcp))) == 0


def frame(packet: bytes) -> bytes:
    return ETH[:12] + (ETH_IPV6 if packet[0] >> 4 == 6 else ETH_IP) + packet


def assert_same_as_the_relay(
    fp: FastPath, combo: str, t: Translator, packet: bytes, gso: int = 0
) -> None:
    key, out = addresses(combo)
    fp.install(key, t, EGRESS, out=out)
    before = fp.global_stats()["redirected_family_changed"]
    verdict, got_frame = fp.test_run(frame(packet), gso_size=gso)
    assert verdict == TC_ACT_REDIRECT
    want = reference(combo, t, packet)
    # The MACs are bpf_redirect_neigh's to fill; the type is the output's.
    assert got_frame[:14] == frame(want)[:14]
    got = got_frame[14:]
    assert len(got) == len(want)
    csum_at = (40 if combo[-1] == "6" else 20) + 16
    assert got[:csum_at] + got[csum_at + 2 :] == want[:csum_at] + want[csum_at + 2 :]
    got_csum, want_csum = got[csum_at : csum_at + 2], want[csum_at : csum_at + 2]
    assert got_csum == want_csum or {got_csum, want_csum} == {b"\0\0", b"\xff\xff"}
    if combo[-1] == "4":
        assert internet_checksum(got[:20]) == 0
    assert tcp_checksum_verifies(got)
    assert tcp_checksum_verifies(want)
    changed = fp.global_stats()["redirected_family_changed"] - before
    assert changed == (combo[0] != combo[-1])


@pytest.fixture(scope="module")
def fp() -> Iterator[FastPath]:
    if not DEFAULT_OBJECT.is_file():
        pytest.fail(f"{DEFAULT_OBJECT} is not built: run `make fastpath`")
    with FastPath.load_only() as loaded:
        yield loaded


# --- parity with the Python relay ------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_packets_are_rewritten_as_the_relay_does(
    fp: FastPath, combo: str, case: str
) -> None:
    packet = packet_in(combo, **GOLDEN[case])
    assert_same_as_the_relay(fp, combo, relay_translator(combo), packet)


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("ecn", [True, False])
def test_the_traffic_class_crosses_with_ecn_only_where_both_negotiated_it(
    fp: FastPath, combo: str, ecn: bool
) -> None:
    # DSCP 46 (0xB8) with CE: the DSCP passes, CE and ECE/CWR only with ecn.
    packet = packet_in(combo, options=ts_option(1, 2), flags=ACK | ECE | CWR, tos=0xB8 | 0x03)
    assert_same_as_the_relay(fp, combo, relay_translator(combo, ecn=ecn), packet)


@pytest.mark.parametrize("combo", COMBOS)
def test_a_gso_packet_changes_family_whole(fp: FastPath, combo: str) -> None:
    # The kernel cuts it at gso_size after the redirect: the segment size
    # (TCP payload, the MSS) must fit out_mss, not the packet.
    t = relay_translator(combo, out_mss=1440)
    packet = packet_in(combo, options=ts_option(100, 200), payload=os.urandom(2900))
    key, out = addresses(combo)
    fp.install(key, t, EGRESS, out=out)
    verdict, got = fp.test_run(frame(packet), gso_size=1440)
    assert verdict == TC_ACT_REDIRECT
    want = reference(combo, relay_translator(combo, out_mss=0xFFFF), packet)
    assert len(got) - 14 == len(want)
    assert tcp_checksum_verifies(got[14:])
    hlen = 40 if combo[-1] == "6" else 20
    assert got[14 + hlen + 20 :] == want[hlen + 20 :]  # options and payload intact


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    combo=st.sampled_from(COMBOS),
    options=option_layouts(),
    payload_len=st.integers(0, 1440),
    seq=st.integers(0, M32),
    ack=st.integers(0, M32),
    window=st.integers(0, 0xFFFF),
    extra_flags=st.sets(st.sampled_from([PSH, ECE, CWR])),
    tos=st.integers(0, 255),
    seq_delta=st.integers(-(2**32), 2**33),
    ack_delta=st.integers(-(2**32), 2**33),
    ts_mode=st.sampled_from(list(TsMode)),
    tsval_delta=st.integers(0, M32),
    tsecr_delta=st.integers(0, M32),
    sack=st.booleans(),
    shifts=st.tuples(st.integers(0, 14), st.integers(0, 14)),
    ecn=st.booleans(),
)
def test_random_segments_are_rewritten_as_the_relay_does(
    fp: FastPath,
    combo: str,
    options: bytes,
    payload_len: int,
    seq: int,
    ack: int,
    window: int,
    extra_flags: set[int],
    tos: int,
    seq_delta: int,
    ack_delta: int,
    ts_mode: TsMode,
    tsval_delta: int,
    tsecr_delta: int,
    sack: bool,
    shifts: tuple[int, int],
    ecn: bool,
) -> None:
    flags = ACK
    for f in extra_flags:
        flags |= f
    packet = packet_in(
        combo,
        options=options,
        payload=os.urandom(payload_len),
        flags=flags,
        seq=seq,
        ack=ack,
        window=window,
        tos=tos,
    )
    t = relay_translator(
        combo,
        seq_delta=seq_delta,
        ack_delta=ack_delta,
        ts_mode=ts_mode,
        tsval_delta=tsval_delta,
        tsecr_delta=tsecr_delta,
        sack=sack,
        wnd_in_shift=shifts[0],
        wnd_out_shift=shifts[1],
        out_mss=1440,
        ecn=ecn,
    )
    assert_same_as_the_relay(fp, combo, t, packet)


# --- what IPv6 leaves to the daemon ------------------------------------------------------


def with_extension_header(packet6: bytes, nexthdr: int) -> bytes:
    """``packet6`` with an 8-byte extension header of type ``nexthdr`` before TCP."""
    tcp = packet6[40:]
    ext = bytes([6, 0]) + bytes(6)  # next header TCP, length 0 (8 bytes)
    head = bytearray(packet6[:40])
    struct.pack_into("!H", head, 4, len(ext) + len(tcp))
    head[6] = nexthdr
    return bytes(head) + ext + tcp


def _set_payload_len(packet6: bytes, value: int) -> bytes:
    return packet6[:4] + struct.pack("!H", value) + packet6[6:]


EXT = "punt_ip_options_or_fragment"
PUNTS6: dict[str, tuple[bytes, str]] = {
    "hop-by-hop options": (with_extension_header(packet_in("6to4"), 0), EXT),
    "routing header": (with_extension_header(packet_in("6to4"), 43), EXT),
    "fragment header": (with_extension_header(packet_in("6to4"), 44), EXT),
    "destination options": (with_extension_header(packet_in("6to4"), 60), EXT),
    "SYN": (packet_in("6to4", flags=SYN | ACK, payload=b""), "punt_flags"),
    "FIN": (packet_in("6to4", flags=FIN | ACK), "punt_flags"),
    "unknown flow": (as_ipv6(ip_tcp(), CLIENT6, SERVER6), "punt_no_flow"),
    "payload length past the frame": (
        (lambda p: _set_payload_len(p, len(p) - 40 + 1))(packet_in("6to4")),
        "punt_malformed",
    ),
    "jumbogram (payload length 0)": (_set_payload_len(packet_in("6to4"), 0), "punt_malformed"),
    "payload over out_mss": (packet_in("6to4", payload=b"p" * 1441), "punt_mss"),
}


@pytest.mark.parametrize("case", list(PUNTS6))
def test_what_the_program_does_not_handle_in_ipv6_is_punted_untouched(
    fp: FastPath, case: str
) -> None:
    packet, counter = PUNTS6[case]
    key, out = addresses("6to4")
    fp.install(key, relay_translator("6to4", out_mss=1440), EGRESS, out=out)
    before = fp.global_stats()
    verdict, got = fp.test_run(frame(packet))
    after = fp.global_stats()
    assert (verdict, got) == (TC_ACT_OK, frame(packet))
    moved = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    assert moved == {counter: 1}
    assert fp.counters(key) == (0, 0)


def _chain(packet6: bytes, headers: list[tuple[int, bytes]]) -> bytes:
    """``packet6`` with extension headers (type, whole header) before its TCP header."""
    tcp = packet6[40:]
    body = b""
    nexts = [t for t, _ in headers[1:]] + [6]
    for (_t, header), nxt in zip(headers, nexts, strict=True):
        body += bytes([nxt]) + header[1:]
    head = bytearray(packet6[:40])
    struct.pack_into("!H", head, 4, len(body) + len(tcp))
    head[6] = headers[0][0]
    return bytes(head) + body + tcp


@pytest.mark.parametrize(
    ("case", "headers", "looked_up"),
    [
        ("hop-by-hop", [(0, bytes(8))], True),
        ("16-byte destination options", [(60, bytes([0, 1]) + bytes(14))], True),
        (
            "hop-by-hop, routing, first fragment",
            [(0, bytes(8)), (43, bytes(8)), (44, bytes(8))],
            True,
        ),
        ("a later fragment", [(44, bytes([0, 0, 0, 0x08]) + bytes(4))], False),
        ("five headers", [(60, bytes(8))] * 5, False),
    ],
)
def test_extension_headers_of_a_kernel_connection_go_to_its_punt_interface(
    fp: FastPath, case: str, headers: list[tuple[int, bytes]], looked_up: bool
) -> None:
    """A taken-over kernel connection's entry (a punt interface) gets its segments with
    IPv6 extension headers too: the program finds the TCP header behind them (up to
    four, RFC 8200 4.1) and redirects the packet, untouched, to the daemon.  Left to
    the kernel, which has no socket for the connection, it would be answered with a
    RST.  A later fragment carries no ports and stays the kernel's."""
    packet = _chain(packet_in("6to4"), headers)
    key, out = addresses("6to4")
    fp.install(key, relay_translator("6to4", out_mss=1440), EGRESS, out=out, punt_ifindex=1)
    before = fp.global_stats()
    verdict, got = fp.test_run(frame(packet))
    after = fp.global_stats()
    assert got == frame(packet), case
    moved = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    if looked_up:
        assert (verdict, moved) == (TC_ACT_REDIRECT, {EXT: 1, "punt_redirected": 1}), case
    else:
        assert (verdict, moved) == (TC_ACT_OK, {EXT: 1}), case


def test_ipv6_that_is_not_tcp_passes_without_a_trace(fp: FastPath) -> None:
    icmp6 = bytearray(packet_in("6to4"))
    icmp6[6] = 58  # ICMPv6: the kernel's, never a splice's
    before = fp.global_stats()
    assert fp.test_run(frame(bytes(icmp6))) == (TC_ACT_OK, frame(bytes(icmp6)))
    assert fp.global_stats() == before


def test_an_ipv4_key_never_matches_an_ipv6_packet(fp: FastPath) -> None:
    # The family is part of the key: an IPv6 address whose first 4 bytes
    # are an IPv4 address's, the rest zero, is another flow.
    v4_key: FlowKey = (CLIENT, 1234, DAEMON_CLIENT_SIDE, 8080)
    fp.install(v4_key, relay_translator("4to4"), EGRESS)
    lookalike = as_ipv6(ip_tcp(), CLIENT + bytes(12), DAEMON_CLIENT_SIDE + bytes(12))
    before = fp.global_stats()["punt_no_flow"]
    assert fp.test_run(frame(lookalike))[0] == TC_ACT_OK
    assert fp.global_stats()["punt_no_flow"] == before + 1


def test_sack_blocks_cross_families_mapped(fp: FastPath) -> None:
    packet = packet_in("6to4", options=sack_option([(1, 2), (3, 4), (5, 6), (7, 8)]), payload=b"")
    assert_same_as_the_relay(fp, "6to4", relay_translator("6to4"), packet)
