"""IPv6 flow labels (RFC 6437): one per connection, from a keyed hash of its 4-tuple."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from daemon.splice.family import to_ipv6
from daemon.wire.flowlabel import MASK, SECRET, flow_label, flow_label_with
from daemon.wire.ipv6 import Ipv6Packet

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
