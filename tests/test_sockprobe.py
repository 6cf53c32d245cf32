"""The socket probe's lookup frame (daemon/fastpath/sockprobe.py): pure, no kernel."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from daemon.fastpath.sockprobe import probe_frame
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.ipv6 import Ipv6Packet

V4 = (ipaddress.ip_address("192.0.2.2").packed, 9000)
V4_PEER = (ipaddress.ip_address("192.0.2.1").packed, 40000)
V6 = (ipaddress.ip_address("2001:db8::2").packed, 9000)
V6_PEER = (ipaddress.ip_address("2001:db8::1").packed, 40000)


def test_an_ipv4_frame_arrives_from_the_peer_with_room_for_the_answer() -> None:
    frame = probe_frame(V4, V4_PEER)
    assert frame[12:14] == b"\x08\x00"
    ip = Ipv4Packet(frame[14:])
    assert (ip.src_addr, ip.dst_addr, ip.protocol) == (V4_PEER[0], V4[0], 6)
    assert ip.total_len == len(frame) - 14
    sport, dport = struct.unpack_from("!HH", frame, 34)
    assert (sport, dport) == (V4_PEER[1], V4[1])
    assert len(frame) - 54 >= 24  # struct sock_probe


def test_an_ipv6_frame_arrives_from_the_peer() -> None:
    frame = probe_frame(V6, V6_PEER)
    assert frame[12:14] == b"\x86\xdd"
    ip = Ipv6Packet(frame[14:])
    assert (ip.src_addr, ip.dst_addr, ip.next_header) == (V6_PEER[0], V6[0], 6)
    assert struct.unpack_from("!HH", frame, 54) == (V6_PEER[1], V6[1])


@pytest.mark.parametrize(("local", "remote"), [(V4, V6_PEER), ((b"\x01\x02", 1), (b"\x01\x02", 2))])
def test_addresses_of_two_families_or_odd_lengths_are_refused(
    local: tuple[bytes, int], remote: tuple[bytes, int]
) -> None:
    with pytest.raises(ValueError):
        probe_frame(local, remote)
