"""Keep-alive (RFC 9293 3.8.4, RFC 1122 4.2.3.6) of the daemon's TCB, without root."""

from __future__ import annotations

from daemon.tcp.events import TcpEvent
from daemon.tcp.state import TcpState
from daemon.wire.tcp import ACK, PSH, RST, TcpOptions, TcpSegment
from tests.test_splice_relay import C_IRS, C_ISS, CLIENT_PEER, DAEMON_C, T0, client_tcb


def _ack_from_peer(seq: int, ack: int, ts: int) -> TcpSegment:
    return TcpSegment(
        CLIENT_PEER[1], DAEMON_C[1], seq, ack, ACK, 512, TcpOptions(timestamp=(ts, 0))
    )


def test_off_by_default_and_no_timer() -> None:
    tcb, _ = client_tcb(T0)
    assert tcb.keepalive is None and tcb.next_deadline() is None


def test_an_idle_connection_is_probed_below_snd_nxt_and_an_answer_resets_it() -> None:
    tcb, ts = client_tcb(T0)
    tcb.set_keepalive((10.0, 2.0, 3), T0)
    assert tcb.next_deadline() == T0 + 10.0
    tcb.on_timer(T0 + 10.0)
    (probe,) = tcb.poll_output(T0 + 10.0)
    assert probe.seq == C_ISS  # SND.NXT - 1: the peer must answer with an ACK
    assert probe.payload == b"" and probe.flags == ACK and probe.ack == C_IRS + 1
    assert tcb.stats.keepalive_probes == 1
    assert tcb.next_deadline() == T0 + 12.0
    # The peer answers: the idle time starts again.
    tcb.on_segment(_ack_from_peer(C_IRS + 1, C_ISS + 1, ts + 1), T0 + 10.1)
    assert tcb.next_deadline() == T0 + 20.1
    assert tcb.state is TcpState.ESTABLISHED


def test_count_unanswered_probes_time_the_connection_out_with_a_reset() -> None:
    tcb, _ = client_tcb(T0)
    tcb.set_keepalive((10.0, 2.0, 3), T0)
    now = T0
    probes = 0
    while tcb.state is TcpState.ESTABLISHED:
        deadline = tcb.next_deadline()
        assert deadline is not None
        now = deadline
        tcb.on_timer(now)
        out = tcb.poll_output(now)
        probes += sum(1 for seg in out if not seg.flags & RST)
        if tcb.state is not TcpState.ESTABLISHED:
            assert [seg.flags & RST for seg in out] == [RST]
    assert probes == 3 and now == T0 + 10.0 + 3 * 2.0
    assert TcpEvent.TIMED_OUT in tcb.events


def test_no_probe_while_data_is_outstanding() -> None:
    tcb, _ = client_tcb(T0)
    tcb.set_keepalive((1.0, 1.0, 1), T0)
    tcb.send(b"x" * 10)
    (data,) = tcb.poll_output(T0)
    assert data.flags & PSH and data.payload
    tcb.keepalive_deadline = T0 + 1.0  # before the RTO, to see it defer
    tcb.rto_deadline = T0 + 5.0
    tcb.on_timer(T0 + 1.0)
    assert tcb.poll_output(T0 + 1.0) == []  # the RTO watches the peer instead
    assert tcb.keepalive_deadline == T0 + 2.0


def test_turned_off_it_stops() -> None:
    tcb, _ = client_tcb(T0)
    tcb.set_keepalive((1.0, 1.0, 1), T0)
    tcb.set_keepalive(None, T0 + 0.5)
    assert tcb.next_deadline() is None
