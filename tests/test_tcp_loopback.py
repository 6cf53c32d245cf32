"""Two TcpConnections talking through a simulated lossy network.

The network is pure Python with simulated time: every emitted segment is
cut into MSS pieces (as the kernel's GSO would), then each piece is lost,
duplicated and delayed (with jitter, so reordered) by a seeded RNG.  Both
sides transfer a few MB at once, half-close, and check content by sha256.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

import pytest

from daemon.tcp.config import Endpoint, TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.events import TcpEvent
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.listener import TcpListener
from daemon.tcp.state import TcpState
from daemon.wire.tcp import FIN, PSH, TcpOptions, TcpSegment

CLIENT: Endpoint = (bytes([192, 0, 2, 1]), 40000)
SERVER: Endpoint = (bytes([203, 0, 113, 2]), 80)


def gso_split(seg: TcpSegment, mss: int) -> list[TcpSegment]:
    """Cut a super-segment into MSS pieces; FIN and PSH stay on the last one."""
    payload = seg.payload
    if len(payload) <= mss:
        return [seg]
    pieces = []
    for off in range(0, len(payload), mss):
        last = off + mss >= len(payload)
        flags = seg.flags if last else seg.flags & ~(FIN | PSH)
        o = seg.options
        opts = TcpOptions(timestamp=o.timestamp, sack_blocks=o.sack_blocks)
        pieces.append(
            TcpSegment(
                seg.src_port,
                seg.dst_port,
                (seg.seq + off) & 0xFFFFFFFF,
                seg.ack,
                flags,
                seg.window,
                opts,
                bytes(payload[off : off + mss]),
            )
        )
    return pieces


@dataclass
class Network:
    rng: random.Random
    loss: float
    dup: float = 0.0
    delay: float = 0.01
    jitter: float = 0.0
    queue: list[tuple[float, int, str, TcpSegment]] = field(default_factory=list)
    counter: int = 0
    sent: int = 0
    dropped: int = 0

    def transmit(self, to: str, seg: TcpSegment, mss: int, now: float) -> None:
        for piece in gso_split(seg, mss):
            self.sent += 1
            copies = 2 if self.rng.random() < self.dup else 1
            for _ in range(copies):
                if self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                t = now + self.delay + self.rng.random() * self.jitter
                self.counter += 1
                heapq.heappush(self.queue, (t, self.counter, to, piece))


@dataclass
class App:
    """One side's application: writes ``data``, half-closes, reads to EOF."""

    conn: TcpConnection
    data: bytes
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    shut: bool = False

    def step(self) -> None:
        c = self.conn
        if c.state in (TcpState.CLOSED, TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            return
        while c.readable():
            self.received += c.recv(1 << 20)
        while c.events:
            if c.events.popleft() is TcpEvent.PEER_CLOSED:
                self.eof = True
        if not self.shut:
            while self.sent < len(self.data):
                n = c.send(memoryview(self.data)[self.sent : self.sent + 256 * 1024])
                if n == 0:
                    break
                self.sent += n
            if self.sent == len(self.data):
                c.shutdown_write()
                self.shut = True


def transfer(
    size_a: int,
    size_b: int,
    loss: float,
    seed: int,
    dup: float = 0.0,
    jitter: float = 0.0,
    config: TcpConfig | None = None,
    limit: float = 600.0,
) -> tuple[App, App, Network, float]:
    rng = random.Random(seed)
    cfg = config or TcpConfig(msl=1.0)
    net = Network(rng, loss, dup=dup, jitter=jitter)
    now = 0.0
    isn = IsnGenerator(bytes(range(16)))
    client = TcpConnection.connect(cfg, CLIENT, SERVER, isn.isn(CLIENT, SERVER, now), now)
    listener = TcpListener(cfg, SERVER, isn)
    data_a = rng.randbytes(size_a)
    data_b = rng.randbytes(size_b)
    app_a = App(client, data_a)
    app_b: App | None = None
    conns: dict[str, TcpConnection] = {"server": client}  # keyed by where segments go
    while now < limit:
        app_a.step()
        if app_b is None:
            acc = listener.accept()
            if acc is not None:
                app_b = App(acc, data_b)
        if app_b is not None:
            app_b.step()
        for to, conn in (("server", client), ("client", conns.get("client"))):
            if conn is None:
                continue
            for seg in conn.poll_output(now):
                net.transmit(to, seg, conn.snd_mss, now)
        for _remote, seg in listener.poll_output():
            net.transmit("client", seg, 1460, now)
        both_closed = client.state is TcpState.CLOSED and (
            "client" in conns and conns["client"].state is TcpState.CLOSED
        )
        if both_closed:
            break
        times = [t for t in (client.next_deadline(),) if t is not None]
        if "client" in conns:
            d = conns["client"].next_deadline()
            if d is not None:
                times.append(d)
        if net.queue:
            times.append(net.queue[0][0])
        if not times:
            break
        now = max(now, min(times))
        while net.queue and net.queue[0][0] <= now:
            _, _, to, seg = heapq.heappop(net.queue)
            if to == "client":
                client.on_segment(seg, now)
            elif "client" in conns:
                conns["client"].on_segment(seg, now)
            else:
                new = listener.on_segment(CLIENT, seg, now)
                if new is not None:
                    conns["client"] = new
        for conn in (client, conns.get("client")):
            if conn is not None:
                d = conn.next_deadline()
                if d is not None and d <= now:
                    conn.on_timer(now)
        if app_b is not None and app_a.eof and app_b.eof:
            # Both sides read to EOF: close them (FIN already sent).
            client.close()
            conns["client"].close()
    assert app_b is not None, "handshake never completed"
    return app_a, app_b, net, now


def check(app_a: App, app_b: App) -> None:
    assert hashlib.sha256(app_b.received).digest() == hashlib.sha256(app_a.data).digest()
    assert hashlib.sha256(app_a.received).digest() == hashlib.sha256(app_b.data).digest()
    assert app_a.eof and app_b.eof
    assert app_a.conn.state is TcpState.CLOSED
    assert app_b.conn.state is TcpState.CLOSED


def test_lossless_transfer_both_ways_with_half_close_arrives_intact() -> None:
    a, b, net, now = transfer(3_000_000, 2_000_000, loss=0.0, seed=1)
    check(a, b)
    assert a.conn.stats.retransmits == 0 and b.conn.stats.retransmits == 0
    assert net.dropped == 0
    # A 64 KB window over a 20 ms RTT moves ~3 MB/s; then TIME-WAIT (2 s).
    assert now < 1.5 + 2 * 1.0


@pytest.mark.parametrize("seed", [2, 3])
def test_transfer_with_2_percent_loss_and_reordering_arrives_intact(seed: int) -> None:
    a, b, net, _ = transfer(2_000_000, 2_000_000, loss=0.02, seed=seed, dup=0.01, jitter=0.004)
    check(a, b)
    assert net.dropped > 0
    assert a.conn.stats.retransmits + b.conn.stats.retransmits > 0


def test_transfer_with_10_percent_loss_duplication_and_reordering_arrives_intact() -> None:
    a, b, net, _ = transfer(1_000_000, 1_000_000, loss=0.10, seed=4, dup=0.02, jitter=0.005)
    check(a, b)
    assert net.dropped > 0


def test_transfer_without_options_uses_default_mss_and_still_arrives_intact() -> None:
    cfg = TcpConfig(msl=1.0, sack=False, timestamps=False, rcv_wscale=None)
    a, b, _, _ = transfer(500_000, 300_000, loss=0.02, seed=5, jitter=0.003, config=cfg)
    check(a, b)
    assert not a.conn.ts_ok and not a.conn.sack_ok and a.conn.snd_wscale == 0


def test_transfer_with_window_scale_and_small_receive_buffer_arrives_intact() -> None:
    cfg = TcpConfig(msl=1.0, rcv_wscale=7, rcv_buf=8 * 1024, snd_buf=32 * 1024)
    a, b, _, _ = transfer(400_000, 400_000, loss=0.02, seed=6, jitter=0.003, config=cfg)
    check(a, b)
    assert a.conn.snd_wscale == 7 and b.conn.rcv_wscale == 7
