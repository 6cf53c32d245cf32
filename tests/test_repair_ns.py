"""Taking a live kernel connection over (daemon/io/repair.py, daemon/fastpath/sockprobe.py).

Two namespaces joined by a veth pair, the kernel's TCP at both ends; the
connection is read from the server's end and every number is checked
against a packet capture of the same connection: sequence numbers, the
bytes the peer has not acknowledged and those the application did not read,
the peer's newest TSval, the options of the handshake.  Then the socket is
closed and the capture must show that it said nothing.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import os
import secrets
import socket
import struct
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import NetNS

from daemon.api.core import ApiError
from daemon.api.protocol import ErrorCode
from daemon.fastpath.loader import FastPathUnavailable
from daemon.fastpath.sockprobe import SockProbe
from daemon.io.daemon import Daemon, DaemonConfig
from daemon.io.repair import RepairError, close_silently, take_over
from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.kernel_state import KernelTcpState
from daemon.tcp.state import TcpState
from daemon.wire.tcp import FIN, RST, SYN, build_ipv4_tcp, build_ipv6_tcp
from daemon.wire.tcp_options import parse_options
from testbed import netns
from testbed.net import Capture
from testbed.pcap import Frame, tcp_frames
from tests.sockutil import wait_until

pytestmark = pytest.mark.root

ADDRS = {4: ("192.0.2.1", "192.0.2.2", 24), 6: ("2001:db8:7::1", "2001:db8:7::2", 64)}
PORT = 9000
TCP_CLOSE_WAIT, TCP_CLOSE = 8, 7  # linux/tcp_states.h


@dataclass
class Pair:
    a: str  # the client's namespace
    b: str  # the server's: the connection is taken over here


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    prefix = "trp" + secrets.token_hex(3)
    names = Pair(f"{prefix}-a", f"{prefix}-b")
    created: list[str] = []
    try:
        for name in (names.a, names.b):
            netns.create(name)
            created.append(name)
        with NetNS(names.a, flags=0) as a:
            a.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": names.b})
        for name, i in ((names.a, 0), (names.b, 1)):
            # No duplicate address detection: the IPv6 addresses are usable at once.
            netns.write_sysctl(name, "net/ipv6/conf/eth0/accept_dad", 0)
            with NetNS(name, flags=0) as ns:
                eth = ns.link_lookup(ifname="eth0")[0]
                for fam in (4, 6):
                    ns.addr("add", index=eth, address=ADDRS[fam][i], prefixlen=ADDRS[fam][2])
                ns.link("set", index=eth, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield names
    finally:
        for name in created:
            netns.remove(name)


@pytest.fixture(scope="module")
def probe() -> Iterator[SockProbe]:
    try:
        p = SockProbe.load()
    except FastPathUnavailable as exc:
        pytest.fail(f"the socket probe does not load: {exc}")
    with p:
        yield p


def _connected(pair: Pair, family: int) -> tuple[socket.socket, socket.socket]:
    """(client in a, server's accepted socket in b), with Nagle off on both."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    ca, sa, _ = ADDRS[family]

    def listen() -> socket.socket:
        s = socket.socket(af, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sa, PORT))
        s.listen(1)
        return s

    lsock = netns.call_in(pair.b, listen)
    try:
        client = netns.call_in(pair.a, lambda: socket.create_connection((sa, PORT), timeout=5))
        server, _ = lsock.accept()
    finally:
        lsock.close()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert client.getsockname()[0] == ca
    return client, server


def _queued(sock: socket.socket, request: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), request, buf)
    return buf[0]


def unread(sock: socket.socket) -> int:
    return _queued(sock, termios.FIONREAD)


def unacked(sock: socket.socket) -> int:
    return _queued(sock, termios.TIOCOUTQ)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]  # TCP_ESTABLISHED 1, ...


def take_over_unreachable(
    pair: Pair, probe: SockProbe, server: socket.socket, data: bytes
) -> KernelTcpState:
    """``data`` written by the server while its output is dropped (so it stays unsent and
    unacknowledged), the server's socket taken over and closed silently, output again.

    A netfilter DROP fails the transmission at once (the socket counts nothing as
    sent).  The link taken down instead only did so until the kernel's link watch,
    which runs asynchronously, had handled the lost carrier: after it the device takes
    the segment and drops it, and the socket counts it sent (a CI run read 14)."""
    tables = "ip6tables" if server.family == socket.AF_INET6 else "iptables"
    rule = ["OUTPUT", "-p", "tcp", "--sport", str(PORT), "-j", "DROP"]
    netns.run(pair.b, [tables, "-A", *rule], check=True)
    try:
        server.sendall(data)
        assert wait_until(lambda: unacked(server) == len(data))
        state: KernelTcpState = netns.call_in(pair.b, lambda: take_over(server, probe))
        close_silently(server)
    finally:
        netns.run(pair.b, [tables, "-D", *rule], check=True)
    return state


def _ts(f: Frame) -> int:
    ts = parse_options(f.options).timestamp
    assert ts is not None, f
    return ts[0]


@pytest.mark.parametrize("family", [4, 6])
def test_bytes_the_socket_transmitted_are_read_as_in_flight(
    pair: Pair, probe: SockProbe, family: int, tmp_path: Path
) -> None:
    """The probe's snd_nxt: bytes on the wire (the capture has them) are ``sent``."""
    pcap = tmp_path / "f.pcap"
    client, server = _connected(pair, family)
    try:
        # The client's side drops what arrives: the server's bytes leave, no ACK returns.
        tables = "iptables" if family == 4 else "ip6tables"
        rule = ["INPUT", "-p", "tcp", "-j", "DROP"]
        netns.run(pair.a, [tables, "-A", *rule], check=True)
        try:
            with Capture.start(pair.b, "eth0", pcap, snaplen=256):
                server.sendall(b"in flight")
                assert wait_until(lambda: unacked(server) == len(b"in flight"))
                assert wait_until(lambda: any(f.payload_len == 9 for f in tcp_frames(pcap)))
                state = netns.call_in(pair.b, lambda: take_over(server, probe))
                close_silently(server)
        finally:
            netns.run(pair.a, [tables, "-D", *rule], check=True)
    finally:
        client.close()
    assert state.unacked == b"in flight" and state.sent == len(b"in flight")


@pytest.mark.parametrize("family", [4, 6])
def test_what_take_over_reads_is_what_the_wire_carried(
    pair: Pair, probe: SockProbe, family: int, tmp_path: Path
) -> None:
    pcap = tmp_path / "b.pcap"
    with Capture.start(pair.b, "eth0", pcap, snaplen=256):
        client, server = _connected(pair, family)
        try:
            client.sendall(b"request")
            assert server.recv(100) == b"request"
            server.sendall(b"reply")
            assert client.recv(100) == b"reply"
            client.sendall(b"not read by the server")  # stays in its receive queue
            assert wait_until(lambda: unread(server) == 22 and unacked(client) == 0)
            state = take_over_unreachable(pair, probe, server, b"unacknowledged")
            # The server's kernel has no socket for it any more: it answers with a RST.
            client.sendall(b"after")
            assert wait_until(lambda: tcp_state(client) == TCP_CLOSE)
            # ... and the capture has it, written out before tcpdump stops.
            assert wait_until(lambda: any(f.flags & RST for f in tcp_frames(pcap)))
        finally:
            client.close()
    frames = tcp_frames(pcap)
    ca = ipaddress.ip_address(ADDRS[family][0]).packed
    after = next(i for i, f in enumerate(frames) if f.src == ca and f.payload_len == len("after"))
    from_client = [f for f in frames[:after] if f.src == ca]
    from_server = [f for f in frames[:after] if f.src != ca]
    syn = next(f for f in from_client if f.flags & SYN)
    syn_ack = next(f for f in from_server if f.flags & SYN)
    last = from_client[-1]
    assert state.local == (ipaddress.ip_address(ADDRS[family][1]).packed, PORT)
    assert state.remote == (ca, syn.sport)
    assert state.rcv_nxt == (last.seq + last.payload_len) & 0xFFFFFFFF
    assert state.unread == b"not read by the server"
    assert state.snd_una == max(f.ack for f in from_client if not f.flags & SYN)
    assert state.unacked == b"unacknowledged"
    assert state.snd_nxt == (state.snd_una + len(b"unacknowledged")) & 0xFFFFFFFF
    # Their output was dropped (netfilter): the socket never sent them.
    assert state.sent == 0
    assert state.srtt is not None and 0 < state.srtt < 0.5  # tcpi_rtt of a veth pair
    assert state.ts_ok and state.ts_recent == _ts(last)
    # The socket's clock is at or past every TSval it sent before the take-over (its
    # retransmission timer may still resend the unacknowledged bytes, later, while
    # the link is down: those leave with the link and are not the clock's past).
    earlier = [f for f in from_server if f.payload_len != len(b"unacknowledged")]
    assert earlier and all((state.ts_now - _ts(f)) & 0xFFFFFFFF < 1 << 31 for f in earlier)
    syn_opts, syn_ack_opts = parse_options(syn.options), parse_options(syn_ack.options)
    assert state.sack_ok and syn_opts.sack_permitted and syn_ack_opts.sack_permitted
    assert state.wscale_ok
    assert (state.snd_wscale, state.rcv_wscale) == (syn_opts.wscale, syn_ack_opts.wscale)
    assert state.peer_mss == syn_opts.mss
    assert state.fin_received is False
    # Closed in repair mode: no FIN, no RST, nothing from the server until the
    # client's next segment, which no socket owns any more.
    assert not [f for f in from_server if f.flags & (FIN | RST)], from_server[-3:]
    answers = [f for f in frames[after:] if f.src != ca]
    assert answers and answers[0].flags & RST, answers[:3]


@pytest.mark.parametrize("family", [4, 6])
def test_a_tcb_restored_from_it_carries_the_connection_on(
    pair: Pair, probe: SockProbe, family: int, tmp_path: Path
) -> None:
    """The daemon's TCB made from the state (TcpConnection.restore) resends what the peer
    never acknowledged; Linux accepts it (in window, in sequence, past PAWS) and ACKs it."""
    pcap = tmp_path / "b.pcap"
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with Capture.start(pair.b, "eth0", pcap, snaplen=256):
        client, server = _connected(pair, family)
        try:
            client.sendall(b"request")
            assert server.recv(100) == b"request"
            state = take_over_unreachable(pair, probe, server, b"lost with the link")
            tcb = TcpConnection.restore(TcpConfig(), state, time.monotonic())
            (seg,) = tcb.poll_output(time.monotonic())
            build = build_ipv4_tcp if family == 4 else build_ipv6_tcp
            packet = bytes(build(seg, state.local[0], state.remote[0]))
            raw = netns.call_in(
                pair.b, lambda: socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
            )
            with raw:
                raw.sendto(packet, (ADDRS[family][0], 0))
            # Linux took the bytes: in sequence, in window, past PAWS.
            assert wait_until(lambda: unread(client) == 18)
            assert client.recv(100, socket.MSG_PEEK) == b"lost with the link"
            ca = ipaddress.ip_address(ADDRS[family][0]).packed
            acked = (state.snd_una + len(b"lost with the link")) & 0xFFFFFFFF

            def acks() -> list[int]:
                return [f.ack for f in tcp_frames(pcap) if f.src == ca]

            assert wait_until(lambda: acked in acks()), acks()[-4:]
        finally:
            client.close()


def test_a_connection_in_close_wait_is_read_and_carried_on(pair: Pair, probe: SockProbe) -> None:
    """The peer sent its last words and closed; the TCB restored from the socket holds
    them before the end of stream, and what it sends Linux (half-closed, FIN_WAIT_2)
    takes: its sequence number is right and its ACK covers the FIN.  The socket sent
    nothing, so its congestion window is still the initial one (10, no ssthresh)."""
    client, server = _connected(pair, 4)
    try:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: tcp_state(server) == TCP_CLOSE_WAIT)
        state: KernelTcpState = netns.call_in(pair.b, lambda: take_over(server, probe))
        close_silently(server)
        assert state.fin_received and state.unread == b"last words"
        assert (state.snd_cwnd, state.snd_ssthresh) == (10, None)
        tcb = TcpConnection.restore(TcpConfig(), state, time.monotonic())
        assert tcb.state is TcpState.CLOSE_WAIT
        assert tcb.recv(100) == b"last words" and tcb.recv(100) == b""
        tcb.send(b"the answer")
        tcb.shutdown_write()
        segs = tcb.poll_output(time.monotonic())
        raw = netns.call_in(
            pair.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        )
        with raw:
            for seg in segs:
                raw.sendto(
                    bytes(build_ipv4_tcp(seg, state.local[0], state.remote[0])), (ADDRS[4][0], 0)
                )
        client.settimeout(5)
        assert client.recv(100) == b"the answer" and client.recv(100) == b""
    finally:
        client.close()


def test_a_socket_that_is_not_a_connection_is_refused(pair: Pair, probe: SockProbe) -> None:
    def listener() -> socket.socket:
        s = socket.socket()
        s.bind((ADDRS[4][1], 0))
        s.listen(1)
        return s

    for make in (listener, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)):
        s = netns.call_in(pair.b, make)
        try:
            with pytest.raises(RepairError):
                netns.call_in(pair.b, lambda s=s: take_over(s, probe))  # type: ignore[misc]
        finally:
            s.close()


def test_the_probe_finds_only_connections_of_its_own_namespace(
    pair: Pair, probe: SockProbe
) -> None:
    client, server = _connected(pair, 4)
    try:
        local = (ipaddress.ip_address(ADDRS[4][1]).packed, PORT)
        remote = (ipaddress.ip_address(ADDRS[4][0]).packed, client.getsockname()[1])
        assert netns.call_in(pair.b, lambda: probe.read(local, remote)) is not None
        assert netns.call_in(pair.a, lambda: probe.read(local, remote)) is None
        assert netns.call_in(pair.b, lambda: probe.read(local, (remote[0], remote[1] ^ 1))) is None
    finally:
        client.close()
        server.close()


class _RecordingTun:
    """The daemon's TUN as a list of what it wrote (plain mode: whole IP packets)."""

    mode = "plain"
    name = "tsp-none"

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self.written: list[bytes] = []

    def fileno(self) -> int:
        return self._r

    def read(self, buf: bytearray) -> object:
        raise BlockingIOError

    def write(self, hdr: bytes | None, pkt: bytes) -> None:
        self.written.append(bytes(pkt))

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class _RecordingFastPath:
    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[bytes, int, bytes, int]]] = []

    def hold(self, key: tuple[bytes, int, bytes, int], punt_ifindex: int) -> None:
        self.log.append(("hold", key))

    def remove(self, key: tuple[bytes, int, bytes, int]) -> tuple[int, int]:
        self.log.append(("remove", key))
        return 0, 0


def test_a_bug_after_the_sockets_are_closed_resets_both_peers(
    pair: Pair, probe: SockProbe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon.splice_sockets past its point of no return: the sockets are closed in repair
    mode, so the proxy cannot copy on; both peers get a RST Linux accepts, the proxy
    ECONNRESET, and the holds are undone."""
    tun = _RecordingTun()
    d = Daemon(DaemonConfig(socket_path=str(tmp_path / "api.sock"), fastpath="off"), tun=tun)  # type: ignore[arg-type]
    try:
        fp = _RecordingFastPath()
        d.splicer.fast_path = fp  # type: ignore[assignment]
        d._tun_index = 1
        d._sock_probe = probe

        def bug(*args: object) -> None:
            raise RuntimeError("a bug in the splicer")

        monkeypatch.setattr(d.splicer, "splice_sockets", bug)
        (peer_c, client), (peer_s, server) = _connected(pair, 4), _connected(pair, 4)
        ports = [peer.getsockname()[1] for peer in (peer_c, peer_s)]
        client.sendall(b"reply")
        assert peer_c.recv(100) == b"reply"
        with pytest.raises(ApiError) as err:
            netns.call_in(pair.b, lambda: d.splice_sockets(1, client, server))
        assert err.value.code is ErrorCode.ECONNRESET
        assert d.counters["internal_errors"] == 1
        held = [key for op, key in fp.log if op == "hold"]
        assert len(held) == 2 and fp.log == [("hold", k) for k in held] + [
            ("remove", k) for k in held
        ]
        # One RST per connection, each from the proxy host's end to its peer.
        rsts = [p for p in tun.written if p[33] & RST]
        sa, ca = (ipaddress.ip_address(a).packed for a in (ADDRS[4][1], ADDRS[4][0]))
        assert sorted(
            (p[12:16], *struct.unpack("!H", p[20:22]), p[16:20], *struct.unpack("!H", p[22:24]))
            for p in rsts
        ) == sorted((sa, PORT, ca, port) for port in ports)
        raw = netns.call_in(
            pair.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        )
        with raw:
            for p in rsts:
                raw.sendto(p, (ADDRS[4][0], 0))
        # Linux took them (in window): both peers see their connection reset.
        for peer in (peer_c, peer_s):
            peer.settimeout(5)
            with pytest.raises(ConnectionResetError):
                peer.recv(100)
            peer.close()
    finally:
        d.terminate()


def test_a_socket_closed_silently_stays_silent_while_another_descriptor_holds_it(
    pair: Pair, probe: SockProbe, tmp_path: Path
) -> None:
    """The daemon closes its copy of a taken-over socket; the proxy's copy lives on until
    the proxy closes it after the reply (milliseconds under load).  Meanwhile the socket
    must transmit nothing: its retransmission timer fired in repair mode and resent its
    oldest bytes (a capture: 4.7 ms after the take-over, after the connection had ended,
    with the socket's TSval; the client answered with a RST)."""
    pcap = tmp_path / "silent.pcap"
    client, server = _connected(pair, 4)
    proxys_copy = server.dup()
    try:
        netns.run(pair.a, ["iptables", "-A", "INPUT", "-p", "tcp", "-j", "DROP"], check=True)
        try:
            with Capture.start(pair.b, "eth0", pcap, snaplen=128):
                server.sendall(b"never acknowledged")
                assert wait_until(lambda: unacked(server) == len(b"never acknowledged"))
                netns.call_in(pair.b, lambda: take_over(server, probe))
                close_silently(server)
                taken_at = len(tcp_frames(pcap))
                # Disconnected, not only one descriptor closed: no timer is left to fire.
                assert tcp_state(proxys_copy) == TCP_CLOSE
                time.sleep(1.5)  # Linux's RTO starts at 1 s with no RTT sample, 0.2 s after
                frames = tcp_frames(pcap)
        finally:
            netns.run(pair.a, ["iptables", "-D", "INPUT", "-p", "tcp", "-j", "DROP"], check=True)
    finally:
        proxys_copy.close()
        client.close()
    sa = ipaddress.ip_address(ADDRS[4][1]).packed
    after = [f for f in frames[taken_at:] if f.src == sa]
    assert after == [], [(f.seq, f.payload_len, f.flags) for f in after]
