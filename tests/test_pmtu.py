"""Path MTU discovery (RFC 1191, RFC 5927 4.1): ICMP parsing, the TCB's rule and the
relay's, no root (tests/test_pmtu_ns.py: spliced flows against Linux)."""

from __future__ import annotations

import struct

import pytest

from daemon.splice.state import Iface
from daemon.tcp.connection import MIN_PATH_MTU
from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.error import WireError
from daemon.wire.icmp import (
    FRAG_NEEDED,
    HOST_UNREACH,
    frag_needed,
    packet_too_big,
    parse_unreachable,
    parse_unreachable6,
)
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.ipv6 import Ipv6Packet
from daemon.wire.tcp import ACK, PSH
from tests.test_splice_relay import (
    C_IRS,
    C_ISS,
    CLIENT_PEER,
    DAEMON_C,
    DAEMON_S,
    S_IRS,
    S_ISS,
    SERVER_PEER,
    T0,
    client_tcb,
    from_client,
    from_server,
    spliced,
    writes,
)

CLIENT, SERVER = Iface.CLIENT, Iface.SERVER


def icmp(code: int, mtu: int, seq: int) -> bytes:
    """A destination unreachable quoting our segment (daemon -> client peer)."""
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 1500, 1, 0x4000, 64, 6, 0, DAEMON_C[0], CLIENT_PEER[0]
    )
    tcp8 = struct.pack("!HHI", DAEMON_C[1], CLIENT_PEER[1], seq)
    return struct.pack("!BBHHH", 3, code, 0, 0, mtu) + ip + tcp8


def test_fragmentation_needed_carries_the_next_hop_mtu() -> None:
    msg = parse_unreachable(icmp(FRAG_NEEDED, 1200, 7))
    assert msg is not None and msg.mtu == 1200 and msg.seq == 7
    other = parse_unreachable(icmp(HOST_UNREACH, 1200, 7))
    assert other is not None and other.mtu == 0  # the field means nothing there


def test_the_segment_size_shrinks_and_the_flight_goes_again() -> None:
    tcb, _ = client_tcb(T0)
    tcb.send(b"x" * 5000)
    tcb.poll_output(T0)
    assert tcb.snd_nxt == C_ISS + 1 + 5000 and tcb.snd_mss == 1448
    assert tcb.on_path_mtu(1200, C_ISS + 1)
    assert tcb.snd_mss == 1200 - 40 - 12  # IPv4 + TCP headers, the TS option
    assert tcb.snd_nxt == tcb.snd_una  # resent at once, at the new size
    segs = tcb.poll_output(T0 + 0.001)
    assert segs and segs[0].seq == C_ISS + 1
    assert tcb.stats.pmtu_updates == 1


def test_a_quoted_sequence_number_outside_the_flight_is_ignored() -> None:
    # RFC 5927 4.1: a blind attacker does not know SND.UNA..SND.NXT.
    tcb, _ = client_tcb(T0)
    tcb.send(b"x" * 100)
    tcb.poll_output(T0)
    assert not tcb.on_path_mtu(1200, C_ISS + 5000)
    assert not tcb.on_path_mtu(1200, C_ISS - 10)
    assert tcb.snd_mss == 1448


def test_never_below_the_minimum_path_mtu_nor_upward() -> None:
    tcb, _ = client_tcb(T0)
    assert tcb.on_path_mtu(68, C_ISS + 1)
    assert tcb.snd_mss == MIN_PATH_MTU - 52
    assert not tcb.on_path_mtu(1500, C_ISS + 1)  # an ICMP never raises it
    assert tcb.snd_mss == MIN_PATH_MTU - 52


# --- spliced flows: the ICMP goes on to the peer whose segment it was ------------


def test_frag_needed_is_built_as_a_router_would_and_parses_back() -> None:
    icmp_packet = frag_needed(
        DAEMON_C[0], CLIENT_PEER[0], 1200, CLIENT_PEER, DAEMON_C, 0xFFFFFFF0, 1500
    )
    ip = Ipv4Packet(icmp_packet)
    assert ip.verify_checksum() and ip.protocol == 1
    assert ip.src_addr == DAEMON_C[0] and ip.dst_addr == CLIENT_PEER[0]
    assert internet_checksum(ip.payload) == 0
    msg = parse_unreachable(ip.payload)
    assert msg is not None and msg.code == FRAG_NEEDED and msg.mtu == 1200
    assert (msg.src_addr, msg.src_port) == CLIENT_PEER and (msg.dst_addr, msg.dst_port) == DAEMON_C
    assert msg.seq == 0xFFFFFFF0 and msg.quoted_len == 1500


def test_a_relayed_segments_icmp_reaches_its_sender_in_its_own_sequence_space() -> None:
    bed, _ = spliced(0)
    pkt = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, flags=ACK | PSH, payload=b"x" * 1000)
    ((_, relayed),) = writes(bed.relay.on_packet(CLIENT, None, pkt, T0 + 0.01))
    # The server's link answers the relayed segment (server space) ...
    icmp_packet = bed.relay.frag_needed(SERVER, relayed.seq, 1200, 1052)
    assert icmp_packet is not None
    ip = Ipv4Packet(icmp_packet)
    msg = parse_unreachable(ip.payload)
    assert msg is not None
    # ... and the client hears it from the address it connected to, about its own segment.
    assert ip.src_addr == DAEMON_C[0] and ip.dst_addr == CLIENT_PEER[0]
    assert (msg.src_addr, msg.src_port) == CLIENT_PEER and (msg.dst_addr, msg.dst_port) == DAEMON_C
    assert msg.seq == C_IRS + 1 and msg.mtu == 1200 and msg.quoted_len == 1052
    # The other way: a segment relayed to the client, its ICMP for the server.
    pkt = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1001, flags=ACK | PSH, payload=b"y" * 500)
    ((_, down),) = writes(bed.relay.on_packet(SERVER, None, pkt, T0 + 0.02))
    back = bed.relay.frag_needed(CLIENT, down.seq, 1100, 552)
    assert back is not None
    ip = Ipv4Packet(back)
    msg = parse_unreachable(ip.payload)
    assert msg is not None and ip.src_addr == DAEMON_S[0] and ip.dst_addr == SERVER_PEER[0]
    assert (msg.src_port, msg.dst_port, msg.seq) == (SERVER_PEER[1], DAEMON_S[1], S_IRS + 1)


def test_while_a_side_still_drains_its_own_tcb_answers() -> None:
    """PRE_SPLICED: what went out on that connection was the TCB's own (its PMTUD, above)."""
    bed, _ = spliced(length=10)  # the client side waits for the proxy's 10 bytes
    assert bed.relay.frag_needed(CLIENT, C_ISS + 1, 1200, 1500) is None


# --- IPv6 (RFC 4443, RFC 8201) -------------------------------------------------


SRC6 = bytes.fromhex("20010db8000d00000000000000000002")  # 2001:db8:d::2, the daemon
DST6 = bytes.fromhex("20010db8000500000000000000000002")  # 2001:db8:5::2


def icmp6(kind: int, code: int, field: int, seq: int, quote_payload: int = 8) -> bytes:
    """An ICMPv6 error quoting our segment (daemon -> server), cut after the TCP ports."""
    quoted = struct.pack("!IHBB16s16s", 6 << 28, 1400, 6, 64, SRC6, DST6)
    quoted += struct.pack("!HHI", 50000, 9000, seq)[:quote_payload]
    return struct.pack("!BBHI", kind, code, 0, field) + quoted


def test_packet_too_big_becomes_frag_needed_with_its_mtu() -> None:
    msg = parse_unreachable6(icmp6(2, 0, 1300, 99))
    assert msg is not None and msg.code == FRAG_NEEDED and msg.mtu == 1300
    assert (msg.src_addr, msg.src_port, msg.dst_addr, msg.dst_port) == (SRC6, 50000, DST6, 9000)
    assert msg.seq == 99 and msg.quoted_len == 40 + 1400


@pytest.mark.parametrize(
    ("code", "net"), [(0, True), (1, False), (3, False), (4, False), (6, False), (9, False)]
)
def test_destination_unreachable_codes_map_to_network_or_host(code: int, net: bool) -> None:
    msg = parse_unreachable6(icmp6(1, code, 0, 7))
    assert msg is not None and msg.net is net and msg.mtu == 0 and msg.code != FRAG_NEEDED


def test_other_icmpv6_and_bad_quotes() -> None:
    assert parse_unreachable6(icmp6(128, 0, 0, 1)) is None  # echo request
    with pytest.raises(WireError, match="too short"):
        parse_unreachable6(icmp6(2, 0, 1300, 1, quote_payload=4))
    with pytest.raises(WireError, match="not a whole IPv6 header"):
        parse_unreachable6(icmp6(2, 0, 1300, 1)[:40])


def test_an_ipv6_connection_never_goes_below_1280() -> None:
    tcb, _ = client_tcb(T0)
    tcb.local = (SRC6, tcb.local[1])  # the rule reads the family from the address length
    tcb.send(b"x" * 5000)
    tcb.poll_output(T0)
    assert tcb.on_path_mtu(1000, C_ISS + 1)
    assert tcb.snd_mss == 1280 - 60 - 12  # IPv6 + TCP headers, the TS option


def test_packet_too_big_is_built_as_a_router_would_and_parses_back() -> None:
    client6 = bytes.fromhex("20010db8000c00000000000000000002")
    daemon6 = bytes.fromhex("20010db8000d00000000000000000001")
    raw = packet_too_big(daemon6, client6, 1280, (client6, 50000), (daemon6, 1080), 77, 1500)
    ip = Ipv6Packet(raw)
    assert ip.protocol == 58 and ip.src_addr == daemon6 and ip.dst_addr == client6
    assert (
        internet_checksum(ip.payload, pseudo_header_sum(daemon6, client6, 58, len(ip.payload))) == 0
    )
    msg = parse_unreachable6(ip.payload)
    assert msg is not None and msg.code == FRAG_NEEDED and msg.mtu == 1280
    assert (msg.src_addr, msg.src_port, msg.dst_port, msg.seq) == (client6, 50000, 1080, 77)
    assert msg.quoted_len == 1500
