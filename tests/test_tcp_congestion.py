"""NewReno (RFC 5681, RFC 6582) driven directly."""

from __future__ import annotations

from daemon.tcp.congestion import NewReno

MSS = 1000


def fresh(cwnd_segments: int = 10) -> NewReno:
    return NewReno.create(MSS, cwnd_segments, 2, iss=0)


def test_slow_start_grows_by_bytes_acked_capped_at_two_mss_per_ack() -> None:
    cc = fresh()
    cc.on_new_ack(MSS, 1001, 10 * MSS)
    assert cc.cwnd == 11 * MSS
    cc.on_new_ack(8 * MSS, 9001, 10 * MSS)
    assert cc.cwnd == 13 * MSS  # RFC 3465 L = 2


def test_congestion_avoidance_adds_one_mss_per_window_of_acked_bytes() -> None:
    cc = fresh()
    cc.ssthresh = 5 * MSS
    cc.cwnd = 10 * MSS
    for i in range(9):
        cc.on_new_ack(MSS, (i + 1) * MSS, 10 * MSS)
    assert cc.cwnd == 10 * MSS
    cc.on_new_ack(MSS, 10 * MSS, 10 * MSS)
    assert cc.cwnd == 11 * MSS


def test_third_duplicate_ack_starts_fast_retransmit_and_recovery() -> None:
    cc = fresh()
    flight = 10 * MSS
    assert not cc.on_dup_ack(1000, 11000, flight)
    assert not cc.on_dup_ack(1000, 11000, flight)
    assert cc.on_dup_ack(1000, 11000, flight)
    assert cc.in_recovery
    assert cc.ssthresh == 5 * MSS
    assert cc.cwnd == 8 * MSS  # ssthresh + 3 MSS
    assert not cc.on_dup_ack(1000, 11000, flight)
    assert cc.cwnd == 9 * MSS  # inflated per extra dupack


def test_partial_ack_retransmits_and_full_ack_deflates_to_ssthresh() -> None:
    cc = fresh()
    for _ in range(3):
        cc.on_dup_ack(1000, 11000, 10 * MSS)
    # Partial: acks up to 4000 < recover (11000).
    assert cc.on_new_ack(3 * MSS, 4000, 10 * MSS)
    assert cc.in_recovery
    assert cc.cwnd == 8 * MSS - 3 * MSS + MSS
    # Full: acks everything.
    assert not cc.on_new_ack(7 * MSS, 11000, 7 * MSS)
    assert not cc.in_recovery
    assert cc.cwnd <= cc.ssthresh


def test_rto_collapses_cwnd_to_one_segment_and_halves_ssthresh_once() -> None:
    cc = fresh()
    cc.on_rto(10 * MSS, 11000, first=True)
    assert cc.cwnd == MSS and cc.ssthresh == 5 * MSS
    cc.on_rto(MSS, 11000, first=False)
    assert cc.ssthresh == 5 * MSS


def test_duplicate_acks_below_recover_after_rto_do_not_restart_fast_retransmit() -> None:
    cc = fresh()
    cc.on_rto(10 * MSS, 11000, first=True)
    assert not any(cc.on_dup_ack(3000, 11000, 8 * MSS) for _ in range(3))
    assert not cc.in_recovery
