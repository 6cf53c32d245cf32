"""SACK-based loss recovery (RFC 6675): the scoreboard, and a sender driven by it.

The scoreboard is tested on its own (Update, IsLost, SetPipe, NextSeg); the
sender is a real TcpConnection fed the ACKs a receiver missing some
segments would send, against the same connection without SACK (NewReno,
RFC 6582) as the baseline.  No root.
"""

from __future__ import annotations

import pytest

from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.sack import Scoreboard
from daemon.tcp.state import TcpState
from daemon.wire.tcp import ACK, SYN, TcpOptions, TcpSegment

MSS = 1000
ISS, IRS = 5000, 90000
LOCAL = (bytes([198, 51, 100, 2]), 40000)
PEER = (bytes([203, 0, 113, 2]), 80)
T0 = 10.0


# --------------------------------------------------------------- the scoreboard


def test_update_merges_blocks_and_ignores_dsack_and_bogus_ones() -> None:
    b = Scoreboard()
    una = 1000
    assert b.update(una, 10 * MSS, ((una + 2000, una + 3000),))
    assert b.update(una, 10 * MSS, ((una + 4000, una + 5000), (una + 3000, una + 4000)))
    assert b.blocks == [(2000, 5000)]
    assert not b.update(una, 10 * MSS, ((una + 2500, una + 3500),))  # nothing new
    assert not b.update(una, 10 * MSS, ((una - 500, una),))  # a D-SACK (RFC 2883)
    assert not b.update(una, 10 * MSS, ((una + 9000, una + 11000),))  # beyond what was sent
    b.advance(2500)
    assert b.blocks == [(0, 2500)]


def test_sequence_numbers_wrap() -> None:
    b = Scoreboard()
    una = 0xFFFFFC00  # 1024 below the wrap
    assert b.update(una, 8 * MSS, (((una + 2000) & 0xFFFFFFFF, (una + 3000) & 0xFFFFFFFF),))
    assert b.blocks == [(2000, 3000)]


def test_a_hole_is_lost_with_three_blocks_or_more_than_two_mss_sacked_above_it() -> None:
    b = Scoreboard()
    b.update(0, 20 * MSS, ((1000, 2000),))
    assert not b.is_lost(0, MSS)
    b.update(0, 20 * MSS, ((2000, 3000),))
    assert not b.is_lost(0, MSS)  # 2 MSS above: not more than (3 - 1) MSS
    b.update(0, 20 * MSS, ((3000, 3100),))
    assert b.is_lost(0, MSS)  # 2.1 MSS above
    small = Scoreboard()
    small.update(0, 20 * MSS, ((100, 200), (300, 400), (500, 600)))
    assert small.is_lost(0, MSS)  # three blocks above
    assert not small.is_lost(200, MSS)  # two


def test_pipe_counts_what_is_neither_sacked_nor_lost_and_what_was_resent() -> None:
    # 10 segments out; 0 and 4 missing, the rest SACKed.
    b = Scoreboard()
    b.update(0, 10 * MSS, ((1000, 4000), (5000, 10000)))
    assert b.pipe(10 * MSS, 0, MSS) == 0  # both holes lost, nothing in flight
    assert b.pipe(10 * MSS, 1000, MSS) == 1000  # segment 0 resent
    assert b.pipe(12 * MSS, 1000, MSS) == 3000  # two new segments above the SACKs


def test_next_segment_is_the_lowest_lost_hole_not_resent_then_the_others() -> None:
    b = Scoreboard()
    b.update(0, 12 * MSS, ((1000, 4000), (5000, 8000), (9000, 9500)))
    assert b.next_retransmit(0, MSS) == (0, 1000)
    assert b.next_retransmit(1000, MSS) == (4000, 1000)
    # The hole at 8000 has one block (500 bytes) above it: not lost (rule 1) ...
    assert b.next_retransmit(5000, MSS) is None
    # ... but rule (3) may still resend it; never beyond the highest SACK.
    assert b.next_unsacked(5000, MSS) == (8000, 1000)
    assert b.next_unsacked(9000, MSS) is None


# ------------------------------------------------------------------- the sender


def sender(sack: bool, segments: int = 20) -> TcpConnection:
    cfg = TcpConfig(mss=MSS, max_tso_bytes=MSS, sack=sack, initial_cwnd_segments=segments)
    tcb = TcpConnection.connect(cfg, LOCAL, PEER, ISS, T0)
    tcb.poll_output(T0)  # the SYN
    opts = TcpOptions(mss=MSS, sack_permitted=sack)
    tcb.on_segment(TcpSegment(PEER[1], LOCAL[1], IRS, ISS + 1, SYN | ACK, 65535, opts), T0)
    tcb.poll_output(T0)
    assert tcb.state is TcpState.ESTABLISHED and tcb.sack_ok is sack
    tcb.send(b"".join(bytes([i]) * MSS for i in range(segments)))
    sent = tcb.poll_output(T0)
    assert [s.seq for s in sent] == [ISS + 1 + i * MSS for i in range(segments)]
    return tcb


def seg_no(tcb: TcpConnection, seq: int) -> int:
    return (seq - ISS - 1) // MSS


def ack_from_peer(
    tcb: TcpConnection, ack_seg: int, sacked: list[tuple[int, int]], now: float = T0 + 0.1
) -> list[int]:
    """The receiver acks up to segment ``ack_seg`` and SACKs [a, b) segment ranges."""
    blocks = tuple((ISS + 1 + a * MSS, ISS + 1 + b * MSS) for a, b in sacked)
    opts = TcpOptions(sack_blocks=blocks[:3])
    ack = ISS + 1 + ack_seg * MSS
    tcb.on_segment(TcpSegment(PEER[1], LOCAL[1], IRS + 1, ack, ACK, 65535, opts), now)
    return [seg_no(tcb, s.seq) for s in tcb.poll_output(now) if s.payload]


def test_sack_recovery_resends_every_lost_segment_within_one_round_trip() -> None:
    """Segments 2, 7 and 12 of 20 are lost; the ACKs of the rest SACK them."""
    tcb = sender(sack=True)
    got = [3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19]
    resent: list[int] = []
    sacked: list[tuple[int, int]] = []
    for n in got:
        # One ACK per arriving segment, the newest block first (RFC 2018 4).
        if sacked and sacked[0][1] == n:
            sacked[0] = (sacked[0][0], n + 1)
        else:
            sacked.insert(0, (n, n + 1))
        resent += ack_from_peer(tcb, 2, sacked)
    # All three holes went again before any cumulative ACK moved, in order,
    # and no SACKed segment was sent twice.
    assert resent == [2, 7, 12]
    assert tcb.stats.sack_recoveries == 1 and tcb.cc.sack_recovery
    # The resent segments arrive: the cumulative ACK reaches the recovery
    # point and recovery ends with cwnd at ssthresh, half of the 18 segments
    # outstanding when it began (RFC 6675 5 (4.2)).
    assert ack_from_peer(tcb, 20, [], T0 + 0.2) == []
    assert not tcb.cc.in_recovery
    assert tcb.cc.cwnd == tcb.cc.ssthresh == 9 * MSS


def test_newreno_without_sack_resends_one_hole_per_round_trip() -> None:
    tcb = sender(sack=False)
    resent: list[int] = []
    for _ in range(15):
        resent += ack_from_peer(tcb, 2, [])
    assert resent[:1] == [2] and 7 not in resent and 12 not in resent
    # The partial ACK after the first resend brings the next hole.
    assert ack_from_peer(tcb, 7, [], T0 + 0.2)[:1] == [7]


def test_the_first_hole_counts_as_lost_before_three_duplicates() -> None:
    """RFC 6675 5 (2.b): IsLost(HighACK + 1) starts recovery early (one ACK SACKs 3)."""
    tcb = sender(sack=True)
    assert ack_from_peer(tcb, 0, [(1, 4)]) == [0]
    assert tcb.stats.dup_acks == 1 and tcb.stats.sack_recoveries == 1


@pytest.mark.parametrize("sack", [True, False])
def test_an_rto_forgets_the_scoreboard_and_goes_back_to_snd_una(sack: bool) -> None:
    tcb = sender(sack=sack)
    ack_from_peer(tcb, 2, [(5, 9)])
    deadline = tcb.rto_deadline
    assert deadline is not None
    tcb.tlp_deadline = None  # this test is about the RTO, not the probe before it
    tcb.on_timer(deadline)
    out = tcb.poll_output(deadline)
    assert [seg_no(tcb, s.seq) for s in out if s.payload] == [2]  # one MSS of cwnd
    assert not tcb.cc.in_recovery
    if sack:
        assert tcb._sack is not None and tcb._sack.blocks == []


@pytest.mark.parametrize("sack", [True, False])
def test_limited_transmit_lets_a_small_window_reach_the_third_duplicate(sack: bool) -> None:
    """RFC 3042: with 3 segments in flight and the first lost, each of the first two
    duplicate ACKs sends one new segment, whose ACK is the third duplicate."""
    cfg = TcpConfig(mss=MSS, max_tso_bytes=MSS, sack=sack, initial_cwnd_segments=3)
    tcb = TcpConnection.connect(cfg, LOCAL, PEER, ISS, T0)
    tcb.poll_output(T0)
    opts = TcpOptions(mss=MSS, sack_permitted=sack)
    tcb.on_segment(TcpSegment(PEER[1], LOCAL[1], IRS, ISS + 1, SYN | ACK, 65535, opts), T0)
    tcb.poll_output(T0)
    tcb.send(bytes(10 * MSS))
    assert [seg_no(tcb, s.seq) for s in tcb.poll_output(T0)] == [0, 1, 2]
    sent: list[int] = []
    for got in (1, 2, 3, 4):  # segment 0 lost; each later one acked as it arrives
        sent += ack_from_peer(tcb, 0, [(1, got + 1)] if sack else [])
    assert sent[:2] == [3, 4]  # one new segment per early duplicate
    assert 0 in sent and tcb.cc.in_recovery  # the third duplicate: fast retransmit


def test_a_tail_loss_probe_comes_before_the_rto_and_an_ack_of_all_ends_it() -> None:
    """RFC 8985 7: the ACKs of a whole flight are lost; 2 SRTT later one probe
    (the last segment again: no new data) draws an ACK of everything, no RTO."""
    tcb = sender(sack=True, segments=10)
    assert tcb.tlp_deadline is not None and tcb.rto_deadline is not None
    assert tcb.tlp_deadline < tcb.rto_deadline
    tcb.on_timer(tcb.tlp_deadline)
    probe = tcb.poll_output(tcb.tlp_deadline)
    assert [seg_no(tcb, s.seq) for s in probe if s.payload] == [9]
    assert tcb.stats.tlp_probes == 1 and tcb.tlp_deadline is None  # one per tail
    cwnd = tcb.cc.cwnd
    assert ack_from_peer(tcb, 10, [], T0 + 0.1) == []
    assert tcb.snd_una == tcb.snd_max and tcb.stats.rto_count == 0 and tcb.cc.cwnd >= cwnd


def test_a_tail_loss_probe_sends_new_data_when_it_may() -> None:
    tcb = sender(sack=True, segments=5)
    tcb.send(bytes(3 * MSS))  # queued behind a full cwnd
    assert tcb.poll_output(T0) == []
    assert tcb.tlp_deadline is not None
    tcb.on_timer(tcb.tlp_deadline)
    probe = tcb.poll_output(tcb.tlp_deadline)
    assert [seg_no(tcb, s.seq) for s in probe if s.payload] == [5]


def test_a_lost_retransmission_is_resent_once_later_data_is_sacked() -> None:
    """RACK's rule by send order (RFC 8985 6.2): segment 2 and its first resend are
    lost; once segments sent after that resend are SACKed, it goes again, no RTO."""
    tcb = sender(sack=True, segments=20)
    tcb.send(bytes(10 * MSS))  # more to send once recovery's pipe allows
    sent: list[int] = []
    sacked: list[tuple[int, int]] = [(3, 3)]
    for n in range(3, 20):
        sacked[0] = (3, n + 1)
        sent += ack_from_peer(tcb, 2, sacked)
    assert sent.count(2) == 1 and tcb.cc.sack_recovery
    new = [n for n in sent if n >= 20]
    assert new, sent  # new data went out after the resend of 2
    # Those arrive, the resend of 2 does not: it is found lost and resent.
    again = ack_from_peer(tcb, 2, [(3, new[-1] + 1)], T0 + 0.2)
    assert again[:1] == [2] and tcb.stats.lost_retransmits == 1
    assert tcb.stats.rto_count == 0


def test_tsvals_never_step_back_when_the_loop_hands_an_older_now() -> None:
    """RFC 7323 5.4: a probe built at a timer's ``now`` and an ACK built next at
    the loop's older ``now`` (the daemon's order of events) carry ordered TSvals."""
    cfg = TcpConfig(mss=MSS, max_tso_bytes=MSS, initial_cwnd_segments=4)
    tcb = TcpConnection.connect(cfg, LOCAL, PEER, ISS, T0)
    tcb.poll_output(T0)
    opts = TcpOptions(mss=MSS, sack_permitted=True, timestamp=(100, 0))
    tcb.on_segment(TcpSegment(PEER[1], LOCAL[1], IRS, ISS + 1, SYN | ACK, 65535, opts), T0)
    tcb.poll_output(T0)
    tcb.send(bytes(4 * MSS))
    sent = tcb.poll_output(T0 + 0.010)
    later = [*tcb.poll_output(T0 + 0.005), tcb._make(tcb.snd_max, ACK, b"", T0 + 0.001)]
    tsvals = [s.options.timestamp[0] for s in sent + later if s.options.timestamp]
    assert len(tsvals) == 5 and tsvals == sorted(tsvals)
