"""IPv6 flow labels (RFC 6437): one per connection, from a keyed hash of its 4-tuple."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.io.daemon import _build
from daemon.splice.family import to_ipv6
from daemon.splice.session import Side, _translator
from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.wire import flowlabel
from daemon.wire.error import WireError
from daemon.wire.flowlabel import MASK, SECRET, flow_label, flow_label_with
from daemon.wire.ipv6 import Ipv6Packet
from daemon.wire.tcp import ACK, TcpSegment
from tests.test_tcp_restore import STATE

A = bytes.fromhex("20010db8000d00000000000000000002")
B = bytes.fromhex("20010db8000500000000000000000002")
addrs = st.binary(min_size=16, max_size=16)
ports = st.integers(0, 0xFFFF)


@given(addrs, ports, addrs, ports)
def test_a_label_is_20_bits_never_zero_and_the_same_for_the_same_flow(
    src: bytes, sport: int, dst: bytes, dport: int
) -> None:
    label = flow_label(src, sport, dst, dport)
    assert 1 <= label <= MASK
    assert label == flow_label_with(SECRET, src, sport, dst, dport)
    assert label == flow_label(src, sport, dst, dport)


def test_labels_differ_between_connections_and_secrets() -> None:
    # 4096 connections of one client to one server, ports apart: a uniform
    # 20-bit hash puts them in ~4088 distinct labels; a bad one in few.
    labels = {flow_label(A, port, B, 80) for port in range(40000, 44096)}
    assert len(labels) > 4000
    # Off-path observers cannot predict them: another secret, other labels.
    other = os.urandom(16)
    same = sum(flow_label_with(other, A, p, B, 80) == flow_label(A, p, B, 80) for p in range(256))
    assert same <= 2


def test_the_relay_writes_the_label_it_is_given() -> None:
    shaped = bytearray(40)
    shaped[0], shaped[1], shaped[3] = 0x45, 0xB8, 40  # TOS: DSCP 46, total length 40
    shaped[32] = 0x50  # TCP data offset 5
    _hdr, packet = to_ipv6(None, shaped, A, B, 0x12345)
    ip = Ipv6Packet(memoryview(packet))
    assert ip.flow_label == 0x12345 and ip.traffic_class == 0xB8


def test_a_taken_over_connection_keeps_the_kernels_label_in_all_it_sends() -> None:
    """RFC 6437: a flow keeps its label.  A connection the daemon takes over from the
    kernel was labelled by the kernel already: the restored TCB carries that label, its
    own segments go out with it, and so does what the splice relays toward that
    connection (the translator built from its base points); a connection of the
    daemon's own, or the other direction, gets the daemon's hash."""
    local, remote = (A, 40000), (B, 80)
    k = replace(STATE, local=local, remote=remote, flow_label=0xA094F)
    tcb = TcpConnection.restore(TcpConfig(), k, 1000.0)
    assert tcb.flow_label == 0xA094F
    seg = TcpSegment(40000, 80, 1, 1, ACK, 100)
    sent = Ipv6Packet(
        memoryview(_build(seg, local, remote, partial_checksum=False, label=tcb.flow_label))
    )
    assert sent.flow_label == 0xA094F
    ours = Ipv6Packet(memoryview(_build(seg, local, remote, partial_checksum=False)))
    assert ours.flow_label == flow_label(A, 40000, B, 80) != 0xA094F
    dst = Side.of(tcb, 1000.0)
    dst.iss = 1
    src = Side(local=(A, 1080), remote=(B, 50000), iss=7)
    assert _translator(src, dst, False).flow_label == 0xA094F  # toward the taken-over one
    dst.flow_label = None
    assert _translator(src, dst, False).flow_label == flow_label(A, 40000, B, 80)
    with pytest.raises(WireError, match="20 bits"):  # a label is 20 bits
        _build(seg, local, remote, partial_checksum=False, label=1 << 20)


def test_the_kernels_automatic_label_is_made_from_the_sockets_txhash() -> None:
    """Linux's ip6_make_flowlabel: the hash rotated by 16 bits, read as the header's
    big-endian word, its low 20 bits (and the stateless bit where the namespace asks
    for it).  The pair below is from the wire: sk_txhash 0x9a0c4f09, label 0xa094f."""
    if sys.byteorder != "little":
        pytest.skip("the pair was captured on a little-endian host")
    assert flowlabel.kernel_flow_label(0x9A0C4F09, False) == 0xA094F
    assert flowlabel.kernel_flow_label(0x5605A114, False) == 0x614A1
    assert flowlabel.kernel_flow_label(0x5605A114, True) == 0x614A1 | 0x80000
