"""SYN cookies (RFC 4987 3.6): a full SYN-RECEIVED queue answers statelessly, the ACK rebuilds."""

from __future__ import annotations

import pytest

from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection, ts_clock
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.listener import TcpListener
from daemon.tcp.seq import MASK
from daemon.tcp.state import TcpState
from daemon.tcp.syncookie import (
    MSS_TABLE,
    PERIOD,
    SynCookies,
    decode_ts_bits,
    mss_index,
    ts_bits,
)
from daemon.wire.tcp import ACK, RST, SYN, TcpOptions, TcpSegment

LOCAL = (bytes([198, 51, 100, 1]), 1080)
PEER = (bytes([192, 0, 2, 2]), 40000)
FLOOD = bytes([192, 0, 2, 200])


def full_listener(cfg: TcpConfig, now: float = 0.0) -> TcpListener:
    """A listener whose SYN-RECEIVED queue the flood (spoofed, silent sources) has filled."""
    lst = TcpListener(cfg, LOCAL, IsnGenerator(bytes(16)))
    for port in range(cfg.syn_backlog):
        syn = TcpSegment(port + 1, LOCAL[1], 7, 0, SYN, 65535, TcpOptions(mss=1460))
        assert lst.on_segment((FLOOD, port + 1), syn, now) is not None
    return lst


def deliver(conn: TcpConnection, segs: list[TcpSegment], now: float) -> None:
    for s in segs:
        conn.on_segment(s, now)


def handshake(
    client_cfg: TcpConfig, server_cfg: TcpConfig, now: float = 100.0
) -> tuple[TcpConnection, TcpConnection, TcpListener, TcpSegment]:
    """Linux-like client vs a full listener: returns (client, server, listener, SYN-ACK)."""
    lst = full_listener(server_cfg, now)
    client = TcpConnection.connect(client_cfg, PEER, LOCAL, 0x12345678, now)
    (syn,) = client.poll_output(now)
    assert lst.on_segment(PEER, syn, now) is None
    ((remote, synack),) = lst.poll_output()
    assert remote == PEER and synack.flags == SYN | ACK
    assert lst.cookies_sent == 1
    client.on_segment(synack, now + 0.001)
    assert client.state is TcpState.ESTABLISHED
    (ack,) = client.poll_output(now + 0.001)
    server = lst.on_segment(PEER, ack, now + 0.002)
    assert server is not None and server.state is TcpState.ESTABLISHED
    assert lst.cookies_accepted == 1 and lst.accept() is server
    return client, server, lst, synack


def exchange(a: TcpConnection, b: TcpConnection, data: bytes, now: float) -> bytes:
    """Send ``data`` from a to b through both TCBs until all of it arrives."""
    got = bytearray()
    sent = 0
    for step in range(2000):
        t = now + step * 0.001
        if sent < len(data):
            sent += a.send(data[sent : sent + 65536])
        deliver(b, a.poll_output(t), t)
        got += b.recv(1 << 20)
        deliver(a, b.poll_output(t), t)
        if len(got) == len(data):
            return bytes(got)
    raise AssertionError(f"only {len(got)} of {len(data)} bytes crossed")


def test_cookie_round_trip_and_what_it_rejects() -> None:
    c = SynCookies(bytes(32))
    cookie = c.make(LOCAL, PEER, 1000, 1400, 10.0)
    assert c.check(LOCAL, PEER, 1000, cookie, 10.0) == 1360  # largest table MSS <= 1400
    assert c.check(LOCAL, PEER, 1000, cookie, 10.0 + PERIOD) == 1360  # the next period too
    assert c.check(LOCAL, PEER, 1000, cookie, 10.0 + 2 * PERIOD) is None  # then it expires
    assert c.check(LOCAL, PEER, 1001, cookie, 10.0) is None  # another client ISN
    assert c.check(LOCAL, (PEER[0], PEER[1] + 1), 1000, cookie, 10.0) is None  # another port
    assert c.check(LOCAL, PEER, 1000, cookie ^ 1, 10.0) is None
    assert SynCookies(bytes([1]) * 32).check(LOCAL, PEER, 1000, cookie, 10.0) is None


def test_mss_table_and_ts_bits() -> None:
    assert MSS_TABLE[mss_index(100)] == 536  # below the table: its smallest
    assert MSS_TABLE[mss_index(1460)] == 1460
    assert MSS_TABLE[mss_index(65495)] == 8960
    for wscale in (None, 0, 7, 14):
        for sack in (False, True):
            assert decode_ts_bits(0xABCDEF00 | ts_bits(wscale, sack)) == (wscale, sack)


def test_a_full_syn_queue_answers_with_a_cookie_and_keeps_nothing() -> None:
    cfg = TcpConfig(syn_backlog=4)
    lst = full_listener(cfg)
    syn = TcpSegment(PEER[1], LOCAL[1], 5000, 0, SYN, 65535, TcpOptions(mss=1460))
    assert lst.on_segment(PEER, syn, 1.0) is None
    ((remote, synack),) = lst.poll_output()
    assert remote == PEER and (synack.flags, synack.ack) == (SYN | ACK, 5001)
    assert synack.options.mss == cfg.mss
    assert len(lst._embryonic) == 4 and lst.syn_drops == 0  # nothing kept for it


def test_without_cookies_a_full_syn_queue_drops() -> None:
    lst = full_listener(TcpConfig(syn_backlog=2, syn_cookies=False))
    syn = TcpSegment(PEER[1], LOCAL[1], 5000, 0, SYN, 65535, TcpOptions(mss=1460))
    assert lst.on_segment(PEER, syn, 1.0) is None
    assert lst.poll_output() == [] and lst.syn_drops == 1


def test_cookie_connection_with_timestamps_keeps_window_scale_and_sack() -> None:
    # Linux's SYN: MSS, SACK, TS, window scale 9; the cookie carries the last two.
    client, server, _, synack = handshake(TcpConfig(rcv_wscale=9), TcpConfig(syn_backlog=8))
    assert synack.options.wscale == 7 and synack.options.sack_permitted
    assert synack.options.timestamp is not None
    assert (server.wscale_ok, server.snd_wscale, server.rcv_wscale) == (True, 9, 7)
    assert (client.wscale_ok, client.snd_wscale) == (True, 7)
    assert server.sack_ok and server.ts_ok and client.ts_ok and client.sack_ok
    assert server.snd_mss == 1460 - 12 and server.iss == (synack.seq) & MASK
    data = bytes(range(256)) * 2048  # 512 KB: needs the scaled windows both ways
    assert exchange(client, server, data, 100.01) == data
    assert exchange(server, client, data[::-1], 103.0) == data[::-1]


def test_cookie_connection_without_timestamps_goes_without_scaling_and_sack() -> None:
    client, server, _, synack = handshake(TcpConfig(timestamps=False), TcpConfig(syn_backlog=8))
    assert synack.options.wscale is None and not synack.options.sack_permitted
    assert not server.wscale_ok and not client.wscale_ok and not server.sack_ok
    data = b"cookie" * 50000
    assert exchange(client, server, data, 100.01) == data


def test_cookie_connection_takes_no_rtt_sample_from_the_handshake() -> None:
    _, server, _, _ = handshake(TcpConfig(), TcpConfig(syn_backlog=8))
    # The cookie ACK came 2 ms after the SYN-ACK was built: a sample would be
    # ~0 and would make a spliced server side ack at once (issue 9's trap).
    assert server.rto.min_rtt is None
    assert server.rto_deadline is None  # nothing of ours is in flight


def test_data_on_the_cookie_ack_is_delivered() -> None:
    lst = full_listener(TcpConfig(syn_backlog=4, timestamps=False))
    syn = TcpSegment(PEER[1], LOCAL[1], 5000, 0, SYN, 65535, TcpOptions(mss=1460))
    lst.on_segment(PEER, syn, 1.0)
    ((_, synack),) = lst.poll_output()
    ack = TcpSegment(PEER[1], LOCAL[1], 5001, (synack.seq + 1) & MASK, ACK, 65535, payload=b"GET")
    server = lst.on_segment(PEER, ack, 1.001)
    assert server is not None and server.recv(100) == b"GET"


@pytest.mark.parametrize("why", ["wrong ack", "expired", "wrong source port"])
def test_a_bad_cookie_ack_gets_a_reset_and_no_connection(why: str) -> None:
    lst = full_listener(TcpConfig(syn_backlog=4, timestamps=False))
    syn = TcpSegment(PEER[1], LOCAL[1], 5000, 0, SYN, 65535, TcpOptions(mss=1460))
    lst.on_segment(PEER, syn, 1.0)
    ((_, synack),) = lst.poll_output()
    ack_no, now, peer = (synack.seq + 1) & MASK, 1.001, PEER
    if why == "wrong ack":
        ack_no = (ack_no + 1) & MASK
    elif why == "expired":
        now = 1.0 + 2 * PERIOD + 1  # also past the listener's cookie window
    else:
        peer = (PEER[0], PEER[1] + 1)
    ack = TcpSegment(peer[1], LOCAL[1], 5001, ack_no, ACK, 65535)
    assert lst.on_segment(peer, ack, now) is None
    ((_, rst),) = lst.poll_output()
    assert rst.flags & RST and lst.cookies_accepted == 0 and lst.accept() is None


def test_cookie_acks_are_ignored_by_a_listener_that_never_overflowed() -> None:
    lst = TcpListener(TcpConfig(), LOCAL, IsnGenerator(bytes(16)))
    # A valid cookie for this listener's secret cannot be forged from outside;
    # use the listener's own to show that the gate, not the MAC, refuses it.
    cookie = lst._cookies.make(LOCAL, PEER, 5000, 1460, 1.0)
    ack = TcpSegment(PEER[1], LOCAL[1], 5001, (cookie + 1) & MASK, ACK, 65535)
    assert lst.on_segment(PEER, ack, 1.001) is None
    ((_, rst),) = lst.poll_output()
    assert rst.flags & RST


def test_a_cookie_tsval_is_never_ahead_of_the_connections_clock() -> None:
    # The six option bits replace the clock's low bits; where they are larger
    # the TSval steps back 64 ms, or the peer's PAWS would drop what follows.
    lst = full_listener(TcpConfig(syn_backlog=4))
    opts = TcpOptions(mss=1460, wscale=14, sack_permitted=True, timestamp=(5, 0))
    for ms in range(128):
        now = 50.0 + ms / 1000
        lst.on_segment(PEER, TcpSegment(PEER[1], LOCAL[1], ms, 0, SYN, 65535, opts), now)
        ((_, synack),) = lst.poll_output()
        assert synack.options.timestamp is not None
        tsval = synack.options.timestamp[0]
        clock = ts_clock(LOCAL[0], PEER[0], now)
        assert 0 <= (clock - tsval) & MASK < 64, (ms, clock, tsval)
        assert decode_ts_bits(tsval) == (14, True)
