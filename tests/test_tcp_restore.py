"""TcpConnection.restore: a TCB that carries on a kernel connection (daemon/tcp/kernel_state.py).

Pure: a KernelTcpState as daemon/io/repair.py reads one, the TCB made
from it, and the segments it sends and accepts.  tests/test_repair_ns.py
shows a restored TCB's segment accepted by Linux's TCP.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.kernel_state import KernelTcpState
from daemon.tcp.state import TcpState
from daemon.wire.tcp import ACK, FIN, TcpOptions, TcpSegment

NOW = 1000.0
LOCAL = (bytes([192, 0, 2, 2]), 9000)
REMOTE = (bytes([192, 0, 2, 1]), 40000)
STATE = KernelTcpState(
    local=LOCAL,
    remote=REMOTE,
    snd_una=0xFFFFFFF0,  # the send space wraps inside the unacknowledged bytes
    snd_nxt=(0xFFFFFFF0 + 14) & 0xFFFFFFFF,
    rcv_nxt=5000,
    unacked=b"unacknowledged",
    unread=b"not read",
    fin_received=False,
    snd_wnd=64512,
    snd_wl1=4990,
    rcv_wnd=65536,
    rcv_wup=5000,
    max_window=64512,
    ts_ok=True,
    ts_now=123456789,
    ts_recent=987654321,
    sack_ok=True,
    wscale_ok=True,
    snd_wscale=10,
    rcv_wscale=7,
    ecn_ok=False,
    peer_mss=1460,
)


def restored(**changes: object) -> TcpConnection:
    return TcpConnection.restore(TcpConfig(), replace(STATE, **changes), NOW)  # type: ignore[arg-type]


def test_the_tcb_takes_the_connections_spaces_and_options() -> None:
    tcb = restored()
    assert tcb.state is TcpState.ESTABLISHED
    assert (tcb.snd_una, tcb.snd_nxt, tcb.rcv_nxt) == (STATE.snd_una, STATE.snd_una, 5000)
    assert (tcb.snd_wscale, tcb.rcv_wscale) == (10, 7)  # the kernel's, not the config's 7/7
    assert tcb.sack_ok and tcb.ts_ok and not tcb.ecn_ok
    assert tcb.snd_mss == 1460 - 12 and tcb.snd_wnd == 64512
    assert tcb.ts_now(NOW) == STATE.ts_now and tcb.ts_recent == STATE.ts_recent
    # IRS and ISS just before the queues: the unread bytes are the first the splice relays.
    assert tcb.irs == 5000 - len(b"not read") - 1
    assert tcb.readable() == len(b"not read") and tcb.recv(100) == b"not read"


def test_the_unacknowledged_bytes_go_out_again_first_in_the_sockets_clock() -> None:
    tcb = restored()
    (seg,) = tcb.poll_output(NOW + 0.002)
    assert (seg.seq, seg.ack, bytes(seg.payload)) == (STATE.snd_una, 5000, b"unacknowledged")
    assert seg.flags & ACK
    assert seg.options.timestamp == (STATE.ts_now + 2, STATE.ts_recent)
    # The window it advertises covers at least what the socket had offered.
    assert (seg.window << 7) + 5000 >= STATE.rcv_wup + STATE.rcv_wnd - (1 << 7)


def ack_of_all(tsecr: int) -> TcpSegment:
    """The peer's ACK of every unacknowledged byte, its TSval 5 past ``ts_recent``."""
    ack = (STATE.snd_una + len(STATE.unacked)) & 0xFFFFFFFF
    opts = TcpOptions(timestamp=(STATE.ts_recent + 5, tsecr))
    return TcpSegment(REMOTE[1], LOCAL[1], 5000, ack, ACK, 63, opts)


def test_the_peers_ack_of_them_completes_the_hand_over() -> None:
    tcb = restored()
    (seg,) = tcb.poll_output(NOW)
    tcb.on_segment(ack_of_all(seg.options.timestamp[0]), NOW + 0.001)  # type: ignore[index]
    assert tcb.all_acked() and tcb.state is TcpState.ESTABLISHED
    assert tcb.ts_recent == STATE.ts_recent + 5


def test_no_options_means_none_are_used() -> None:
    tcb = restored(ts_ok=False, sack_ok=False, wscale_ok=False, snd_wscale=0, rcv_wscale=0)
    (seg,) = tcb.poll_output(NOW)
    assert seg.options.timestamp is None and tcb.snd_mss == 1460
    assert (tcb.snd_wscale, tcb.rcv_wscale) == (0, 0)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"unread": bytes(1 << 20)}, "do not fit"),
        ({"unacked": bytes(1 << 20)}, "do not fit"),
    ],
)
def test_what_the_tcb_cannot_carry_on_is_refused(changes: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        restored(**changes)


def test_a_connection_whose_peer_closed_comes_back_in_close_wait() -> None:
    """RCV.NXT counts the FIN (as the socket's did), behind the unread bytes: IRS is one
    further back, the bytes read come before the end of stream, and the peer's FIN sent
    again is answered with an ACK of it (RFC 9293 3.10.7.4), not taken for new data."""
    tcb = restored(fin_received=True, rcv_nxt=5001)
    assert tcb.state is TcpState.CLOSE_WAIT and tcb.peer_closed
    assert tcb.irs == 5001 - 1 - len(b"not read") - 1
    assert tcb.recv(100) == b"not read" and tcb.recv(100) == b""
    tcb.poll_output(NOW)  # the unacknowledged bytes, resent
    again = TcpSegment(REMOTE[1], LOCAL[1], 5000, STATE.snd_una, ACK | FIN, 63,
                       TcpOptions(timestamp=(STATE.ts_recent + 1, STATE.ts_now)))  # fmt: skip
    tcb.on_segment(again, NOW + 0.001)
    (ack,) = tcb.poll_output(NOW + 0.001)
    assert ack.ack == 5001 and not ack.payload
    assert tcb.state is TcpState.CLOSE_WAIT and tcb.recv(100) == b""
    tcb.shutdown_write()  # our FIN after what is queued: LAST_ACK
    assert tcb.state is TcpState.LAST_ACK


def test_the_congestion_state_is_the_sockets() -> None:
    """A pair handed over mid-transfer drains at the window the kernel had reached (in
    segments, tcpi_snd_cwnd), not from a new initial window; unknown: the initial one."""
    tcb = restored(snd_cwnd=80, snd_ssthresh=40)
    assert (tcb.cc.cwnd, tcb.cc.ssthresh) == (80 * tcb.snd_mss, 40 * tcb.snd_mss)
    fresh = restored()
    assert fresh.cc.cwnd == TcpConfig().initial_cwnd_segments * fresh.snd_mss
    assert fresh.cc.ssthresh == restored(snd_cwnd=80).cc.ssthresh  # never set: arbitrarily high
    big = restored(
        snd_cwnd=40,
        unacked=bytes(100_000),
        snd_nxt=(STATE.snd_una + 100_000) & 0xFFFFFFFF,
        snd_wnd=1 << 20,
    )
    sent = sum(len(seg.payload) for seg in big.poll_output(NOW))
    assert sent == 40 * big.snd_mss  # what the window allows at once, not 10 segments


def test_bytes_the_socket_sent_wait_for_their_ack_under_its_rtt_estimate() -> None:
    """Sent bytes are in flight, not resent at once; the RTO (from tcpi_rtt) repairs a loss."""
    tcb = restored(sent=14, srtt=0.004, rttvar=0.002)
    assert (tcb.snd_nxt, tcb.snd_max) == ((STATE.snd_una + 14) & 0xFFFFFFFF,) * 2
    assert not [s for s in tcb.poll_output(NOW) if s.payload]
    assert tcb.rto.srtt == 0.004 and tcb.rto.rttvar == 0.002
    deadline = tcb.next_deadline()
    assert deadline == NOW + tcb.rto.current()
    tcb.on_timer(deadline)
    (seg,) = [s for s in tcb.poll_output(deadline) if s.payload]
    assert (seg.seq, bytes(seg.payload)) == (STATE.snd_una, b"unacknowledged")


def test_only_what_the_socket_had_not_sent_goes_out_at_once() -> None:
    tcb = restored(sent=4)
    (seg,) = tcb.poll_output(NOW)
    assert (seg.seq, bytes(seg.payload)) == ((STATE.snd_una + 4) & 0xFFFFFFFF, b"knowledged")


def test_an_ack_of_bytes_the_socket_sent_after_the_read_is_taken() -> None:
    """Until the proxy closes it, the socket may transmit queued bytes the read saw as unsent
    (its loss probe did, in a capture); the peer's ACK of them is an ACK of ours, not one
    of data never sent (which RFC 9293 3.10.7.4 drops: the TCB would stall for good)."""
    tcb = restored(sent=4, srtt=0.004, rttvar=0.002)
    tcb.on_segment(ack_of_all(STATE.ts_now), NOW)
    assert tcb.all_acked()
    assert not [s for s in tcb.poll_output(NOW) if s.payload]  # nothing left to send


def test_a_draining_tcbs_small_tail_is_probed_after_two_rtts_not_the_peers_delayed_ack() -> None:
    """A frozen TCB holds up its splice until its last byte is acknowledged; a small last
    segment is what Linux acknowledges only when its delayed-ACK timer fires (40 ms, a
    splice stalled meanwhile), a duplicate of it at once.  So the probe (RFC 8985 7) comes
    2 SRTT after the tail, with no delayed-ACK allowance: an unfrozen TCB waits 200 ms more."""
    for frozen in (True, False):
        tcb = restored(unacked=b"", unread=b"", srtt=0.002, rttvar=0.001,
                       snd_nxt=STATE.snd_una, snd_wnd=1 << 20)  # fmt: skip
        if frozen:
            tcb.freeze()
        tcb.send(b"the last 56 bytes of what the proxy had written".ljust(56, b"."))
        (tail,) = tcb.poll_output(NOW)
        if not frozen:  # the probe would come after the RTO (200 ms): none
            assert tcb.tlp_deadline is None or tcb.tlp_deadline - NOW >= 0.2
            continue
        assert tcb.tlp_deadline is not None
        assert tcb.tlp_deadline - NOW == pytest.approx(0.004)
        tcb.on_timer(tcb.tlp_deadline)
        (probe,) = tcb.poll_output(tcb.tlp_deadline)
        assert (probe.seq, bytes(probe.payload)) == (tail.seq, bytes(tail.payload))
