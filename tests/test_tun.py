"""Specification of daemon/io/tun.py against the real kernel (root, namespaces).

Each test builds its own namespace ``tbe<hex>``, opens the TUN in it, routes
198.51.100.0/24 into the TUN and plays the remote TCP peer by hand (SYN-ACK,
ACKs) with the wire layer, while a kernel socket in the namespace is the
other end.  The namespace is removed in the fixture teardown.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from daemon.io.tun import TunDevice, configure_tun, new_read_buffer
from daemon.wire.checksum import complete_partial_checksum, pseudo_header_sum
from daemon.wire.ipv4 import PROTO_TCP, Ipv4Packet
from daemon.wire.tcp import (
    ACK,
    PSH,
    SYN,
    TcpOptions,
    TcpSegment,
    build_ipv4_tcp,
    parse_tcp,
    tcp_header_len,
)
from daemon.wire.vnet import GSO_TCPV4, VnetHeader, vnet_header_for_tcp

pytestmark = pytest.mark.root

LOCAL = "192.0.2.1"  # the kernel socket's address, on the TUN
PEER = "198.51.100.1"  # the hand-played peer, routed into the TUN
LOCAL_B = socket.inet_aton(LOCAL)
PEER_B = socket.inet_aton(PEER)
TUN_NAME = "tbetun0"
PEER_ISN = 2**32 - 20000  # our 60 KB write crosses the 2**32 wrap
MSS = 1460
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run this thread in namespace ``name``; fds made inside stay bound to it."""
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        yield
    finally:
        _setns(saved)
        os.close(saved)


@pytest.fixture
def netns_name() -> Iterator[str]:
    name = "tbe" + secrets.token_hex(4)
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)


@dataclass
class Peer:
    """The hand-played remote end: the TUN, its read buffer, the kernel socket."""

    tun: TunDevice
    sock: socket.socket
    buf: bytearray
    local_port: int = 0
    rcv_nxt: int = 0  # next byte expected from the kernel socket
    snd_nxt: int = PEER_ISN
    ts_recent: int = 0

    def read_tcp(self, timeout: float = 5.0) -> tuple[VnetHeader | None, bytes]:
        """The next IPv4 TCP packet from the TUN (copied), skipping IPv6 noise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no TCP packet from the kernel in time"
            readable, _, _ = select.select([self.tun], [], [], left)
            if not readable:
                continue
            try:
                vnet, pkt = self.tun.read(self.buf)
            except BlockingIOError:
                continue
            if pkt[0] >> 4 == 4 and Ipv4Packet(pkt).protocol == PROTO_TCP:
                return vnet, bytes(pkt)

    def send(self, seg: TcpSegment, *, offload_write: bool) -> None:
        if offload_write:
            pkt = build_ipv4_tcp(seg, PEER_B, LOCAL_B, partial_checksum=True)
            hdr = vnet_header_for_tcp(20, tcp_header_len(seg), len(seg.payload), MSS - 12)
            self.tun.write(hdr.to_bytes(), pkt)
        else:
            self.tun.write(None, build_ipv4_tcp(seg, PEER_B, LOCAL_B))
        self.snd_nxt = (self.snd_nxt + seg.seg_len) % 2**32

    def ack(self) -> TcpSegment:
        return TcpSegment(
            80,
            self.local_port,
            self.snd_nxt,
            self.rcv_nxt,
            ACK,
            0xFFFF,
            TcpOptions(timestamp=(1, self.ts_recent)),
        )


def check_and_parse(vnet: VnetHeader | None, pkt: bytes) -> TcpSegment:
    """Parse a packet from the kernel, checking its checksum by the offload rules."""
    ip = Ipv4Packet(pkt)
    tcp = ip.payload
    assert (ip.src_addr, ip.dst_addr) == (LOCAL_B, PEER_B)
    if vnet is not None and vnet.needs_csum:
        assert (vnet.csum_start, vnet.csum_offset) == (ip.header_len, 16)
        field = int.from_bytes(tcp[16:18], "big")
        assert field == pseudo_header_sum(LOCAL_B, PEER_B, PROTO_TCP, len(tcp))
        completed = bytearray(pkt)
        csum = complete_partial_checksum(completed, vnet.csum_start)
        completed[ip.header_len + 16 : ip.header_len + 18] = csum.to_bytes(2, "big")
        parse_tcp(completed[ip.header_len :], LOCAL_B, PEER_B, verify_checksum=True)
        return parse_tcp(tcp, LOCAL_B, PEER_B, verify_checksum=False)
    return parse_tcp(tcp, LOCAL_B, PEER_B, verify_checksum=True)


@contextmanager
def handshake(ns: str, *, offload: bool) -> Iterator[Peer]:
    """Open the TUN in ``ns``, let a kernel socket connect() to PEER:80 and answer it."""
    with inside(ns):
        tun = TunDevice(TUN_NAME, offload=offload)
        with IPRoute() as ipr:
            configure_tun(ipr, TUN_NAME, addresses=[(LOCAL, 32)], routes=["198.51.100.0/24"])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert tun.mode == ("offload" if offload else "plain")
        sock.setblocking(False)
        assert sock.connect_ex((PEER, 80)) == 115  # EINPROGRESS
        peer = Peer(tun, sock, new_read_buffer())
        vnet, pkt = peer.read_tcp()
        assert (vnet is not None) == offload
        syn = check_and_parse(vnet, pkt)
        assert syn.flags == SYN and syn.dst_port == 80
        assert syn.options.mss == MSS and syn.options.timestamp is not None
        peer.local_port = syn.src_port
        peer.rcv_nxt = (syn.seq + 1) % 2**32
        peer.ts_recent = syn.options.timestamp[0]
        syn_ack = TcpSegment(
            80,
            syn.src_port,
            PEER_ISN,
            peer.rcv_nxt,
            SYN | ACK,
            0xFFFF,
            TcpOptions(mss=MSS, sack_permitted=True, timestamp=(1, peer.ts_recent), wscale=7),
        )
        peer.send(syn_ack, offload_write=offload)

        vnet, pkt = peer.read_tcp()
        final_ack = check_and_parse(vnet, pkt)
        assert final_ack.flags == ACK and final_ack.ack == (PEER_ISN + 1) % 2**32
        _, writable, _ = select.select([], [sock], [], 5)
        assert writable and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert sock.getpeername() == (PEER, 80)
        yield peer
    finally:
        sock.close()
        tun.close()


def pattern(n: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 64
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_kernel_connect_completes_against_a_handshake_built_by_the_wire_layer(
    netns_name: str, offload: bool
) -> None:
    with handshake(netns_name, offload=offload) as peer:
        assert peer.sock.fileno() >= 0


def test_offload_mode_carries_gso_super_packets_both_ways(netns_name: str) -> None:
    with handshake(netns_name, offload=True) as peer:
        # Kernel -> TUN: 200 KB, acknowledged as it arrives; expect GSO packets.
        data = pattern(200_000, 1)
        sent = 0
        received = bytearray()
        biggest = 0
        gso_sizes: set[int] = set()
        deadline = time.monotonic() + 20
        while len(received) < len(data):
            assert time.monotonic() < deadline, f"only {len(received)} bytes arrived"
            if sent < len(data):
                with suppress(BlockingIOError):
                    sent += peer.sock.send(data[sent:])
            vnet, pkt = peer.read_tcp()
            seg = check_and_parse(vnet, pkt)
            if not seg.payload:
                continue
            assert vnet is not None
            if vnet.gso_type & GSO_TCPV4:
                gso_sizes.add(vnet.gso_size)
            biggest = max(biggest, len(pkt))
            offset = (peer.rcv_nxt - seg.seq) % 2**32  # > 0 for a retransmission
            if offset < len(seg.payload):
                received += seg.payload[offset:]
                peer.rcv_nxt = (seg.seq + len(seg.payload)) % 2**32
            assert seg.options.timestamp is not None
            peer.ts_recent = seg.options.timestamp[0]
            peer.send(peer.ack(), offload_write=False)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert biggest > 1500, "no super-packet larger than the MTU"
        assert gso_sizes == {MSS - 12}  # MSS minus the timestamp option

        # TUN -> kernel: one 60 KB GSO packet, partial checksum, seq crossing 2**32.
        blob = pattern(60_000, 2)
        seg = TcpSegment(
            80,
            peer.local_port,
            peer.snd_nxt,
            peer.rcv_nxt,
            ACK | PSH,
            0xFFFF,
            TcpOptions(timestamp=(2, peer.ts_recent)),
            blob,
        )
        assert peer.snd_nxt + len(blob) > 2**32
        peer.send(seg, offload_write=True)
        got = bytearray()
        peer.sock.settimeout(5)
        while len(got) < len(blob):
            chunk = peer.sock.recv(65536)
            assert chunk, "kernel socket closed early"
            got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()


def test_plain_mode_refuses_a_virtio_header(netns_name: str) -> None:
    with inside(netns_name):
        tun = TunDevice(TUN_NAME, offload=False)
    try:
        with pytest.raises(ValueError, match="plain mode"):
            tun.write(VnetHeader().to_bytes(), b"\x45" + bytes(19))
    finally:
        tun.close()
