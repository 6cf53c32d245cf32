"""Path MTU discovery (RFC 1191, RFC 5927 4.1): ICMP parsing and the TCB's rule, no root."""

from __future__ import annotations

import struct

from daemon.tcp.connection import MIN_PATH_MTU
from daemon.wire.icmp import FRAG_NEEDED, HOST_UNREACH, parse_unreachable
from tests.test_splice_relay import C_ISS, CLIENT_PEER, DAEMON_C, T0, client_tcb


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
