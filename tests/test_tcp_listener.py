"""Listener (RFC 9293 3.10.7.2) and resets for unknown connections (3.10.7.1)."""

from __future__ import annotations

from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.events import TcpEvent
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.listener import TcpListener, reset_for_unknown
from daemon.tcp.state import TcpState
from daemon.wire.tcp import ACK, FIN, RST, SYN, TcpOptions, TcpSegment

LOCAL = (bytes([192, 0, 2, 1]), 1080)
PEER = (bytes([192, 0, 2, 77]), 50000)
CFG = TcpConfig(timestamps=False)


def seg(
    seq: int, ack: int, flags: int, payload: bytes = b"", opts: TcpOptions | None = None
) -> TcpSegment:
    return TcpSegment(PEER[1], LOCAL[1], seq, ack, flags, 65535, opts or TcpOptions(), payload)


def state(conn: TcpConnection) -> TcpState:
    """Read through a call so mypy does not narrow the state across calls."""
    return conn.state


def listener(cfg: TcpConfig = CFG) -> TcpListener:
    return TcpListener(cfg, LOCAL, IsnGenerator(bytes(16)))


def test_reset_for_segment_without_ack_acks_its_whole_length() -> None:
    rst = reset_for_unknown(seg(100, 0, SYN | FIN, b"abc"))
    assert rst is not None
    assert (rst.flags, rst.seq, rst.ack) == (RST | ACK, 0, 105)
    assert (rst.src_port, rst.dst_port) == (LOCAL[1], PEER[1])


def test_reset_for_segment_with_ack_takes_its_seq_from_that_ack() -> None:
    rst = reset_for_unknown(seg(100, 777, ACK))
    assert rst is not None and (rst.flags, rst.seq) == (RST, 777)


def test_no_reset_in_answer_to_a_reset() -> None:
    assert reset_for_unknown(seg(100, 777, RST | ACK)) is None


def test_syn_creates_syn_received_connection_that_answers_with_syn_ack() -> None:
    lst = listener()
    conn = lst.on_segment(
        PEER, seg(9000, 0, SYN, opts=TcpOptions(mss=1400, sack_permitted=True)), 0.0
    )
    assert conn is not None and state(conn) is TcpState.SYN_RECEIVED
    (synack,) = conn.poll_output(0.0)
    assert synack.flags == SYN | ACK and synack.ack == 9001
    assert synack.options.sack_permitted and synack.options.wscale is None  # not offered
    assert synack.options.mss == 1460
    conn.on_segment(seg(9001, (synack.seq + 1) & 0xFFFFFFFF, ACK), 0.01)
    assert state(conn) is TcpState.ESTABLISHED
    assert lst.accept() is conn and lst.accept() is None


def test_ack_for_unknown_connection_gets_rst() -> None:
    lst = listener()
    assert lst.on_segment(PEER, seg(1, 4242, ACK), 0.0) is None
    assert [(r, s.flags, s.seq) for r, s in lst.poll_output()] == [(PEER, RST, 4242)]


def test_rst_to_listener_is_ignored() -> None:
    lst = listener()
    assert lst.on_segment(PEER, seg(1, 0, RST), 0.0) is None
    assert lst.poll_output() == []


def test_syn_beyond_the_syn_backlog_is_dropped_without_cookies() -> None:
    lst = listener(TcpConfig(syn_backlog=2, syn_cookies=False))
    conns = [lst.on_segment((PEER[0], 1000 + i), seg(1, 0, SYN), 0.0) for i in range(3)]
    assert conns[0] is not None and conns[1] is not None and conns[2] is None
    assert lst.syn_drops == 1


def test_final_ack_is_dropped_while_the_accept_queue_is_full() -> None:
    lst = listener(TcpConfig(timestamps=False, accept_backlog=1, syn_backlog=4))
    a = lst.on_segment((PEER[0], 1), seg(1, 0, SYN), 0.0)
    b = lst.on_segment((PEER[0], 2), seg(1, 0, SYN), 0.0)
    assert a is not None and b is not None
    a.poll_output(0.0)
    b.poll_output(0.0)
    a.on_segment(seg(2, (a.iss + 1) & 0xFFFFFFFF, ACK), 0.1)
    b.on_segment(seg(2, (b.iss + 1) & 0xFFFFFFFF, ACK), 0.1)
    assert state(a) is TcpState.ESTABLISHED and state(b) is TcpState.SYN_RECEIVED
    assert lst.accept() is a
    b.on_segment(seg(2, (b.iss + 1) & 0xFFFFFFFF, ACK), 0.2)  # the peer retransmits
    assert state(b) is TcpState.ESTABLISHED and lst.accept() is b


def test_retransmitted_syn_in_syn_received_resends_the_syn_ack() -> None:
    lst = listener()
    conn = lst.on_segment(PEER, seg(9000, 0, SYN), 0.0)
    assert conn is not None
    conn.poll_output(0.0)
    conn.on_segment(seg(9000, 0, SYN), 0.5)
    (again,) = conn.poll_output(0.5)
    assert again.flags == SYN | ACK and again.seq == conn.iss


def test_rst_in_syn_received_from_passive_open_frees_the_backlog_slot() -> None:
    lst = listener(TcpConfig(syn_backlog=1))
    conn = lst.on_segment(PEER, seg(9000, 0, SYN), 0.0)
    assert conn is not None
    conn.on_segment(seg(9001, 0, RST), 0.1)
    assert state(conn) is TcpState.CLOSED
    assert list(conn.events) == [TcpEvent.CLOSED]  # not "refused": back to LISTEN
    assert lst.on_segment(PEER, seg(9500, 0, SYN), 0.2) is not None


def test_syn_received_with_unacceptable_ack_gets_rst() -> None:
    lst = listener()
    conn = lst.on_segment(PEER, seg(9000, 0, SYN), 0.0)
    assert conn is not None
    conn.poll_output(0.0)
    conn.on_segment(seg(9001, 12345, ACK), 0.1)
    (rst,) = conn.poll_output(0.1)
    assert rst.flags == RST and rst.seq == 12345
    assert state(conn) is TcpState.SYN_RECEIVED
