"""RFC 9293 state machine of TcpConnection, driven with hand-built segments.

The peer is played by the test: it builds TcpSegments and inspects what
``poll_output`` returns.  Timestamps are off unless a test is about them.
"""

from __future__ import annotations

import dataclasses
import itertools

from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.events import TcpEvent
from daemon.tcp.state import TcpState
from daemon.wire.tcp import ACK, CWR, ECE, FIN, PSH, RST, SYN, TcpOptions, TcpSegment

L = (bytes([198, 51, 100, 1]), 33000)
R = (bytes([203, 0, 113, 9]), 80)
ISS = 0xFFFFFF00  # our ISS: the tests cross the 2**32 wrap
PISS = 5000  # the peer's ISS
CFG = TcpConfig(timestamps=False, sack=True, msl=1.0, min_rto=0.2, initial_rto=1.0)
S = TcpState


def seg(
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    window: int = 65535,
    opts: TcpOptions | None = None,
) -> TcpSegment:
    return TcpSegment(
        R[1], L[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window, opts or TcpOptions(), payload
    )


def established(cfg: TcpConfig = CFG, synack: TcpOptions | None = None) -> TcpConnection:
    conn = TcpConnection.connect(cfg, L, R, iss=ISS, now=0.0)
    conn.poll_output(0.0)
    opts = synack or TcpOptions(mss=1460, sack_permitted=True)
    conn.on_segment(seg(PISS, ISS + 1, SYN | ACK, opts=opts), 0.01)
    conn.poll_output(0.01)
    conn.events.clear()
    return conn


def state(conn: TcpConnection) -> TcpState:
    """The state, read through a call so mypy does not narrow it across calls."""
    return conn.state


def out(conn: TcpConnection, now: float = 0.02) -> list[TcpSegment]:
    return conn.poll_output(now)


def only(conn: TcpConnection, now: float = 0.02) -> TcpSegment:
    segs = out(conn, now)
    assert len(segs) == 1, segs
    return segs[0]


# --- opening -----------------------------------------------------------------


def test_active_open_sends_syn_with_our_options_and_syn_ack_establishes() -> None:
    conn = TcpConnection.connect(TcpConfig(rcv_wscale=3), L, R, iss=ISS, now=0.0)
    assert state(conn) is S.SYN_SENT
    syn = only(conn, 0.0)
    assert syn.flags == SYN | ECE | CWR and syn.seq == ISS  # ECE|CWR: RFC 3168 6.1.1
    assert syn.options.mss == 1460 and syn.options.wscale == 3 and syn.options.sack_permitted
    assert syn.options.timestamp is not None
    tsval = syn.options.timestamp[0]
    conn.on_segment(
        seg(
            PISS,
            ISS + 1,
            SYN | ACK,
            opts=TcpOptions(mss=1400, wscale=2, sack_permitted=True, timestamp=(777, tsval)),
        ),
        0.05,
    )
    assert state(conn) is S.ESTABLISHED
    assert list(conn.events) == [TcpEvent.ESTABLISHED]
    ack = only(conn, 0.05)
    assert ack.flags == ACK and ack.seq == (ISS + 1) & 0xFFFFFFFF and ack.ack == PISS + 1
    assert ack.options.timestamp is not None and ack.options.timestamp[1] == 777
    assert conn.snd_wscale == 2 and conn.rcv_wscale == 3 and conn.sack_ok and conn.ts_ok
    assert conn.snd_mss == 1400 - 12  # the TS option comes out of the peer's MSS
    assert conn.rto.srtt is not None  # the SYN was timed (not retransmitted)


def test_missing_mss_option_means_536() -> None:
    conn = TcpConnection.connect(CFG, L, R, iss=ISS, now=0.0)
    out(conn, 0.0)
    conn.on_segment(seg(PISS, ISS + 1, SYN | ACK), 0.01)
    assert conn.snd_mss == 536


def test_window_scale_is_off_unless_both_syns_carry_it() -> None:
    conn = established(TcpConfig(timestamps=False, rcv_wscale=7))
    assert conn.snd_wscale == 0 and conn.rcv_wscale == 0
    conn2 = established(
        TcpConfig(timestamps=False, rcv_wscale=None), TcpOptions(mss=1460, wscale=5)
    )
    assert conn2.snd_wscale == 0 and conn2.rcv_wscale == 0


def test_peer_window_is_scaled_after_the_handshake_but_not_in_the_syn() -> None:
    conn = established(TcpConfig(timestamps=False, rcv_wscale=0), TcpOptions(wscale=4))
    assert conn.snd_wnd == 65535  # SYN window unscaled (RFC 7323 2.2)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, window=1000), 0.1)
    assert conn.snd_wnd == 16000


def test_syn_sent_rst_with_acceptable_ack_is_connection_refused() -> None:
    conn = TcpConnection.connect(CFG, L, R, iss=ISS, now=0.0)
    out(conn, 0.0)
    conn.on_segment(seg(0, ISS + 1, RST | ACK), 0.01)
    assert state(conn) is S.CLOSED
    assert list(conn.events) == [TcpEvent.REFUSED, TcpEvent.CLOSED]


def test_syn_sent_rst_without_ack_is_ignored() -> None:
    conn = TcpConnection.connect(CFG, L, R, iss=ISS, now=0.0)
    out(conn, 0.0)
    conn.on_segment(seg(0, 0, RST), 0.01)
    assert state(conn) is S.SYN_SENT and out(conn) == []


def test_syn_sent_unacceptable_ack_gets_rst_with_seq_of_that_ack() -> None:
    conn = TcpConnection.connect(CFG, L, R, iss=ISS, now=0.0)
    out(conn, 0.0)
    conn.on_segment(seg(PISS, ISS + 50, SYN | ACK), 0.01)
    rst = only(conn)
    assert rst.flags == RST and rst.seq == (ISS + 50) & 0xFFFFFFFF
    assert state(conn) is S.SYN_SENT


def test_simultaneous_open_goes_through_syn_received() -> None:
    conn = TcpConnection.connect(CFG, L, R, iss=ISS, now=0.0)
    out(conn, 0.0)
    conn.on_segment(seg(PISS, 0, SYN, opts=TcpOptions(mss=1460)), 0.01)
    assert state(conn) is S.SYN_RECEIVED
    synack = only(conn, 0.01)
    assert synack.flags == SYN | ACK and synack.seq == ISS and synack.ack == PISS + 1
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK), 0.02)
    assert state(conn) is S.ESTABLISHED and TcpEvent.ESTABLISHED in conn.events


def test_syn_retransmissions_back_off_then_time_out_without_rst() -> None:
    cfg = TcpConfig(timestamps=False, syn_retries=2, initial_rto=1.0)
    conn = TcpConnection.connect(cfg, L, R, iss=ISS, now=0.0)
    out(conn, 0.0)
    times = []
    now = 0.0
    while state(conn) is S.SYN_SENT:
        d = conn.next_deadline()
        assert d is not None
        now = d
        conn.on_timer(now)
        segs = out(conn, now)
        if state(conn) is S.SYN_SENT:
            assert [s.flags for s in segs] == [SYN]
            times.append(now)
        else:
            assert segs == []
    assert times == [1.0, 3.0]
    assert now == 7.0
    assert list(conn.events) == [TcpEvent.TIMED_OUT, TcpEvent.CLOSED]


# --- data ----------------------------------------------------------------------


def test_in_order_data_is_readable_and_acked_after_the_delayed_ack_timer() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"hello"), 0.1)
    assert conn.readable() == 5 and list(conn.events) == [TcpEvent.READABLE]
    assert out(conn, 0.1) == []  # delayed
    assert conn.next_deadline() == 0.1 + 0.04
    conn.on_timer(0.14)
    ack = only(conn, 0.14)
    assert ack.ack == PISS + 6
    assert conn.recv(100) == b"hello"


def test_every_second_segment_is_acked_at_once() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"a" * 100), 0.1)
    assert out(conn, 0.1) == []
    conn.on_segment(seg(PISS + 101, ISS + 1, ACK, b"b" * 100), 0.1)
    assert only(conn, 0.1).ack == PISS + 201


def test_out_of_order_data_gets_an_immediate_ack_with_sack_blocks() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 11, ISS + 1, ACK, b"later"), 0.1)
    ack = only(conn, 0.1)
    assert ack.ack == PISS + 1
    assert ack.options.sack_blocks == ((PISS + 11, PISS + 16),)
    assert conn.readable() == 0
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"0123456789"), 0.2)
    ack = only(conn, 0.2)
    assert ack.ack == PISS + 16 and ack.options.sack_blocks == ()
    assert conn.recv(100) == b"0123456789later"


def test_send_emits_data_up_to_the_peer_window_in_mss_multiples() -> None:
    conn = established(TcpConfig(timestamps=False, initial_cwnd_segments=100))
    data = bytes(range(256)) * 40  # 10240 bytes
    assert conn.send(data) == len(data)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, window=5000), 0.1)
    segs = out(conn, 0.1)
    assert [len(s.payload) for s in segs] == [4380]  # 3 * 1460 within 5000
    assert segs[0].payload == data[:4380]


def test_big_sends_become_tso_sized_segments() -> None:
    conn = established(
        TcpConfig(timestamps=False, rcv_wscale=7, initial_cwnd_segments=200),
        TcpOptions(mss=1460, wscale=7),
    )
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, window=4000), 0.05)  # 512000 bytes
    conn.send(b"x" * 200_000)
    sizes = [len(s.payload) for s in out(conn, 0.1)]
    assert sizes[0] == (65000 // 1460) * 1460 and sum(sizes) == 200_000


def test_send_buffer_full_returns_short_count_then_reports_send_space() -> None:
    conn = established(TcpConfig(timestamps=False, snd_buf=3000))
    assert conn.send(b"a" * 5000) == 3000 and conn.send(b"b") == 0
    out(conn, 0.1)
    conn.on_segment(seg(PISS + 1, ISS + 1 + 1460, ACK), 0.2)
    assert TcpEvent.SEND_SPACE in conn.events and conn.send_space() == 1460


# --- retransmission ----------------------------------------------------------------


def test_rto_retransmits_from_snd_una_with_backoff_and_gives_up_with_rst() -> None:
    conn = established(TcpConfig(timestamps=False, max_retries=3, initial_rto=1.0))
    conn.rto.srtt = None
    conn.send(b"data")
    first = only(conn, 1.0)
    fires = []
    now = 1.0
    while state(conn) is S.ESTABLISHED:
        d = conn.next_deadline()
        assert d is not None
        now = d
        conn.on_timer(now)
        segs = out(conn, now)
        if state(conn) is S.ESTABLISHED:
            assert [(s.seq, s.payload) for s in segs] == [(first.seq, b"data")]
            fires.append(round(now - 1.0, 6))
        else:
            assert [s.flags for s in segs] == [RST]
    rto = conn.rto.rto
    assert fires == [round(rto, 6), round(3 * rto, 6), round(7 * rto, 6)]
    assert TcpEvent.TIMED_OUT in conn.events and conn.stats.rto_count == 4


def test_three_duplicate_acks_trigger_fast_retransmit_of_the_first_segment() -> None:
    conn = established(TcpConfig(timestamps=False, initial_cwnd_segments=10))
    conn.send(bytes(1460 * 6))
    out(conn, 0.1)
    una = (ISS + 1) & 0xFFFFFFFF
    for i in range(2):
        conn.on_segment(seg(PISS + 1, una, ACK), 0.2 + i / 100)
        assert out(conn, 0.2) == []
    conn.on_segment(seg(PISS + 1, una, ACK), 0.23)
    rtx = out(conn, 0.23)
    assert [(s.seq, len(s.payload)) for s in rtx] == [(una, 1460)]
    assert conn.stats.fast_retransmits == 1 and conn.stats.dup_acks == 3


def test_partial_ack_in_recovery_retransmits_the_next_hole() -> None:
    conn = established(TcpConfig(timestamps=False, initial_cwnd_segments=10))
    conn.send(bytes(1460 * 6))
    out(conn, 0.1)
    una = (ISS + 1) & 0xFFFFFFFF
    for _ in range(3):
        conn.on_segment(seg(PISS + 1, una, ACK), 0.2)
    out(conn, 0.2)
    conn.on_segment(seg(PISS + 1, una + 2 * 1460, ACK), 0.3)  # partial
    rtx = out(conn, 0.3)
    assert rtx[0].seq == (una + 2 * 1460) & 0xFFFFFFFF and len(rtx[0].payload) == 1460
    assert conn.cc.in_recovery


# --- closing ---------------------------------------------------------------------


def test_active_close_fin_wait_1_fin_wait_2_time_wait_then_closed_after_2msl() -> None:
    conn = established()
    conn.shutdown_write()
    assert state(conn) is S.FIN_WAIT_1
    fin = only(conn, 0.1)
    assert fin.flags & FIN and fin.seq == (ISS + 1) & 0xFFFFFFFF
    conn.on_segment(seg(PISS + 1, ISS + 2, ACK), 0.2)
    assert state(conn) is S.FIN_WAIT_2
    # Half-close: the peer keeps sending.
    conn.on_segment(seg(PISS + 1, ISS + 2, ACK, b"more"), 0.3)
    assert conn.recv(10) == b"more"
    conn.on_segment(seg(PISS + 5, ISS + 2, FIN | ACK), 0.4)
    assert state(conn) is S.TIME_WAIT and TcpEvent.PEER_CLOSED in conn.events
    assert only(conn, 0.4).ack == PISS + 6
    assert conn.next_deadline() == 0.4 + 2.0
    conn.on_timer(2.4)
    assert state(conn) is S.CLOSED and conn.events[-1] is TcpEvent.CLOSED


def test_a_new_syn_beyond_the_old_sequence_space_reopens_time_wait() -> None:
    # RFC 9293 3.10.7.4 / RFC 6191: the caller frees the TCB and gives the SYN
    # to the listener; an old duplicate SYN, or one with ACK, does not reopen.
    conn = established()
    conn.shutdown_write()
    conn.poll_output(0.1)
    conn.on_segment(seg(PISS + 1, ISS + 2, FIN | ACK), 0.2)
    assert state(conn) is S.TIME_WAIT
    assert conn.reopens_with(seg(PISS + 100_000, 0, SYN))
    assert not conn.reopens_with(seg(PISS - 10, 0, SYN))
    assert not conn.reopens_with(seg(PISS + 100_000, ISS, SYN | ACK))
    assert not established().reopens_with(seg(PISS + 100_000, 0, SYN))


def test_fin_with_ack_of_our_fin_goes_from_fin_wait_1_straight_to_time_wait() -> None:
    conn = established()
    conn.shutdown_write()
    out(conn, 0.1)
    conn.on_segment(seg(PISS + 1, ISS + 2, FIN | ACK), 0.2)
    assert state(conn) is S.TIME_WAIT


def test_simultaneous_close_goes_through_closing() -> None:
    conn = established()
    conn.shutdown_write()
    out(conn, 0.1)
    conn.on_segment(seg(PISS + 1, ISS + 1, FIN | ACK), 0.2)  # FIN crossing ours
    assert state(conn) is S.CLOSING
    conn.on_segment(seg(PISS + 2, ISS + 2, ACK), 0.3)
    assert state(conn) is S.TIME_WAIT


def test_passive_close_close_wait_then_last_ack_then_closed() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS + 1, FIN | ACK), 0.1)
    assert state(conn) is S.CLOSE_WAIT and list(conn.events) == [TcpEvent.PEER_CLOSED]
    assert only(conn, 0.1).ack == PISS + 2
    conn.send(b"reply")  # half-close: we still send
    conn.shutdown_write()
    assert state(conn) is S.LAST_ACK
    last = only(conn, 0.2)
    assert last.payload == b"reply" and last.flags & FIN
    conn.on_segment(seg(PISS + 2, ISS + 7, ACK), 0.3)
    assert state(conn) is S.CLOSED and conn.events[-1] is TcpEvent.CLOSED


def test_retransmitted_fin_in_time_wait_is_acked_and_restarts_2msl() -> None:
    conn = established()
    conn.shutdown_write()
    out(conn, 0.1)
    conn.on_segment(seg(PISS + 1, ISS + 2, FIN | ACK), 0.2)
    out(conn, 0.2)
    conn.on_segment(seg(PISS + 1, ISS + 2, FIN | ACK), 1.5)
    assert only(conn, 1.5).ack == PISS + 2
    assert conn.next_deadline() == 1.5 + 2.0


def test_fin_beyond_a_hole_waits_for_the_missing_data() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 4, ISS + 1, FIN | ACK, b"def"), 0.1)
    assert state(conn) is S.ESTABLISHED
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"abc"), 0.2)
    assert state(conn) is S.CLOSE_WAIT and conn.recv(10) == b"abcdef"
    assert out(conn, 0.2)[-1].ack == PISS + 8


def test_close_with_unread_data_sends_rst() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"unread"), 0.1)
    out(conn, 0.1)
    conn.close()
    assert state(conn) is S.CLOSED
    assert [s.flags for s in out(conn, 0.2)] == [RST]


def test_data_arriving_after_close_is_answered_with_rst() -> None:
    conn = established()
    conn.close()
    out(conn, 0.1)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"late"), 0.2)
    assert state(conn) is S.CLOSED and [s.flags for s in out(conn, 0.2)] == [RST]


def test_abort_sends_rst_at_snd_nxt() -> None:
    conn = established()
    conn.abort()
    rst = only(conn)
    assert rst.flags == RST and rst.seq == (ISS + 1) & 0xFFFFFFFF
    assert conn.events[-1] is TcpEvent.CLOSED


# --- resets and blind attacks (RFC 5961) ------------------------------------------------


def test_rst_exactly_at_rcv_nxt_resets_the_connection() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, 0, RST), 0.1)
    assert state(conn) is S.CLOSED
    assert list(conn.events) == [TcpEvent.RESET, TcpEvent.CLOSED]
    assert out(conn) == []  # never a RST in answer to a RST


def test_rst_with_seq_not_at_rcv_nxt_gets_challenge_ack() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 100, 0, RST), 0.1)
    assert state(conn) is S.ESTABLISHED
    ack = only(conn)
    assert ack.flags == ACK and ack.ack == PISS + 1 and conn.stats.challenge_acks == 1


def test_rst_outside_the_window_is_dropped_silently() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1_000_000, 0, RST), 0.1)
    assert state(conn) is S.ESTABLISHED and out(conn) == []


def test_syn_in_synchronized_state_gets_challenge_ack() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, 0, SYN), 0.1)
    assert state(conn) is S.ESTABLISHED
    assert only(conn).flags == ACK and conn.stats.challenge_acks == 1


def test_challenge_acks_have_a_budget_per_second() -> None:
    """RFC 5961 7: a flood of forged in-window RSTs gets at most `limit` ACKs a second."""
    limit = CFG.challenge_ack_limit
    assert limit is not None
    conn = established()
    acks = 0
    for i in range(200):  # 200 RSTs within 0.2 s
        conn.on_segment(seg(PISS + 100 + i, 0, RST), 0.1 + i * 0.001)
        acks += len(out(conn, 0.1 + i * 0.001))
    assert state(conn) is S.ESTABLISHED
    assert acks == limit == conn.stats.challenge_acks
    assert conn.stats.challenge_acks_suppressed == 200 - limit
    # A second later the budget is back: a legitimate peer can resynchronise.
    conn.on_segment(seg(PISS + 1, 0, SYN), 1.2)
    assert only(conn, 1.2).flags == ACK and conn.stats.challenge_acks == limit + 1


def test_challenge_acks_unlimited_when_configured_so() -> None:
    conn = established(dataclasses.replace(CFG, challenge_ack_limit=None))
    for i in range(50):
        conn.on_segment(seg(PISS + 100 + i, 0, RST), 0.1)
    assert len(out(conn, 0.1)) >= 1 and conn.stats.challenge_acks == 50
    assert conn.stats.challenge_acks_suppressed == 0


def test_ack_of_unsent_data_is_acked_and_dropped() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS + 1000, ACK, b"x"), 0.1)
    assert conn.readable() == 0 and conn.snd_una == (ISS + 1) & 0xFFFFFFFF
    assert only(conn).ack == PISS + 1


def test_ack_older_than_the_max_window_gets_challenge_ack() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS - 200_000, ACK, b"x"), 0.1)
    assert conn.readable() == 0 and conn.stats.challenge_acks == 1


def test_segment_outside_the_window_is_acked_not_accepted() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 100_000, ISS + 1, ACK, b"far"), 0.1)
    assert conn.readable() == 0 and only(conn).ack == PISS + 1


def test_segment_in_closed_state_gets_reset_for_unknown() -> None:
    conn = established()
    conn.abort()
    out(conn)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"x"), 0.1)
    assert [(s.flags, s.seq) for s in out(conn)] == [(RST, (ISS + 1) & 0xFFFFFFFF)]
    conn.on_segment(seg(PISS + 1, ISS + 1, RST), 0.1)
    assert out(conn) == []


# --- windows ---------------------------------------------------------------------------


def test_receive_window_shrinks_to_zero_without_moving_the_right_edge_left() -> None:
    conn = established(TcpConfig(timestamps=False, rcv_buf=4000))
    edges = []
    seq = PISS + 1
    for _ in range(4):
        conn.on_segment(seg(seq, ISS + 1, ACK, b"z" * 1000), 0.1)
        seq += 1000
        for s in out(conn, 0.1):
            edges.append(s.ack + s.window)
    assert edges == sorted(edges) and edges[-1] == PISS + 1 + 4000
    # Window full: the next byte is not accepted, but the ACK says window 0.
    conn.on_segment(seg(seq, ISS + 1, ACK, b"y"), 0.2)
    ack = only(conn, 0.2)
    assert ack.window == 0 and conn.readable() == 4000


def test_reading_reopens_the_window_with_a_window_update() -> None:
    conn = established(TcpConfig(timestamps=False, rcv_buf=4000))
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"z" * 4000), 0.1)
    assert only(conn, 0.1).window == 0
    conn.recv(100)
    assert out(conn, 0.2) == []  # too small to announce (SWS avoidance)
    conn.recv(3000)
    upd = only(conn, 0.2)
    assert upd.window == 3100 and upd.ack == PISS + 4001


def test_reading_a_request_with_the_window_wide_open_sends_no_pure_ack() -> None:
    # The peer can keep sending: the window update waits for an ACK that
    # leaves anyway (here the reply), instead of a segment of its own.
    conn = established(TcpConfig(timestamps=False, rcv_buf=1 << 20, rcv_wscale=7))
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK | PSH, b"\x05\x01\x00"), 0.1)
    conn.recv(3)
    assert out(conn, 0.1) == []
    conn.send(b"\x05\x00")
    (reply,) = out(conn, 0.1)
    assert reply.ack == PISS + 4 and bytes(reply.payload) == b"\x05\x00"


def test_zero_peer_window_is_probed_with_backoff_until_it_opens() -> None:
    conn = established()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, window=0), 0.1)
    conn.send(b"waiting")
    assert out(conn, 0.1) == []
    probes = []
    now = 0.1
    for _ in range(3):
        d = conn.next_deadline()
        assert d is not None
        now = d
        conn.on_timer(now)
        p = only(conn, now)
        assert p.seq == ISS & 0xFFFFFFFF and p.payload == b""  # SND.UNA - 1
        probes.append(now)
        conn.on_segment(seg(PISS + 1, ISS + 1, ACK, window=0), now)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[1] > gaps[0]
    assert state(conn) is S.ESTABLISHED and conn.stats.window_probes == 3
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, window=1000), now + 0.01)
    assert only(conn, now + 0.01).payload == b"waiting"


# --- timestamps ------------------------------------------------------------------------


def test_timestamps_echo_the_peer_tsval_and_paws_drops_old_ones() -> None:
    cfg = TcpConfig(msl=1.0)
    conn = TcpConnection.connect(cfg, L, R, iss=ISS, now=0.0)
    syn = only(conn, 0.0)
    assert syn.options.timestamp is not None
    conn.on_segment(
        seg(PISS, ISS + 1, SYN | ACK, opts=TcpOptions(timestamp=(1000, syn.options.timestamp[0]))),
        0.01,
    )
    out(conn, 0.01)
    conn.on_segment(
        seg(PISS + 1, ISS + 1, ACK, b"a" * 10, opts=TcpOptions(timestamp=(1005, 0))), 0.02
    )
    conn.on_timer(0.1)
    ack = only(conn, 0.1)
    assert ack.options.timestamp is not None and ack.options.timestamp[1] == 1005
    # An old duplicate with an older TSval: dropped by PAWS, but ACKed.
    conn.on_segment(
        seg(PISS + 11, ISS + 1, ACK, b"b" * 10, opts=TcpOptions(timestamp=(900, 0))), 0.2
    )
    assert conn.readable() == 10 and conn.stats.paws_drops == 1
    assert only(conn, 0.2).ack == PISS + 11


# --- min_ack_delay: a spliced server's RTT sample covers the client's path ---------

HELD = TcpConfig(timestamps=False, sack=True, msl=1.0, min_ack_delay=0.02)


def held_open() -> TcpConnection:
    conn = TcpConnection.connect(HELD, L, R, iss=ISS, now=0.0)
    (syn,) = conn.poll_output(0.0)
    assert syn.flags & ~(ECE | CWR) == SYN  # the SYN itself is never held
    conn.on_segment(seg(PISS, ISS + 1, SYN | ACK, opts=TcpOptions(mss=1460)), 1.0)
    return conn


def test_the_handshake_ack_waits_min_ack_delay_after_the_syn_ack() -> None:
    conn = held_open()
    assert conn.state is S.ESTABLISHED and TcpEvent.ESTABLISHED in conn.events
    assert conn.poll_output(1.0) == [] and conn.poll_output(1.019) == []
    assert conn.next_deadline() == 1.02
    conn.on_timer(1.02)
    ack = only(conn, 1.02)
    assert ack.flags == ACK and ack.ack == PISS + 1


def test_data_written_before_the_handshake_ack_may_leave_waits_with_it() -> None:
    conn = held_open()
    conn.send(b"GET / HTTP/1.0\r\n\r\n")
    assert conn.poll_output(1.005) == []
    conn.on_timer(1.02)
    (data,) = conn.poll_output(1.02)
    assert bytes(data.payload).startswith(b"GET") and data.ack == PISS + 1


def test_received_data_is_acknowledged_only_min_ack_delay_after_it_arrived() -> None:
    conn = held_open()
    conn.on_timer(1.02)
    conn.poll_output(1.02)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"a" * 100), 2.0)
    conn.on_segment(seg(PISS + 101, ISS + 1, ACK, b"b" * 100), 2.01)
    assert conn.poll_output(2.01) == []
    conn.on_timer(2.02)
    first = only(conn, 2.02)
    assert first.ack == PISS + 101  # the second segment is 10 ms younger
    conn.on_timer(2.03)
    second = only(conn, 2.03)
    assert second.ack == PISS + 201
    # Held back or not, the right edge advertised never moves left.
    assert (second.ack + second.window) >= (first.ack + first.window)


def test_a_data_segment_sent_during_the_hold_carries_the_older_ack() -> None:
    conn = held_open()
    conn.on_timer(1.02)
    conn.poll_output(1.02)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"banner"), 2.0)
    conn.send(b"hello")
    (data,) = conn.poll_output(2.001)
    assert data.ack == PISS + 1 and bytes(data.payload) == b"hello"
    # The window still reaches as far as the received bytes allowed.
    assert data.ack + data.window >= PISS + 7


def test_without_min_ack_delay_the_handshake_ack_leaves_at_once() -> None:
    conn = TcpConnection.connect(CFG, L, R, iss=ISS, now=0.0)
    conn.poll_output(0.0)
    conn.on_segment(seg(PISS, ISS + 1, SYN | ACK, opts=TcpOptions(mss=1460)), 1.0)
    assert only(conn, 1.0).ack == PISS + 1
