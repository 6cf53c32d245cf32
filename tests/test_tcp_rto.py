"""RFC 6298 RTO estimation and backoff."""

from __future__ import annotations

import pytest

from daemon.tcp.rto import RtoEstimator


def test_first_sample_sets_srtt_and_half_rttvar() -> None:
    r = RtoEstimator(min_rto=0.2, max_rto=60.0)
    r.on_rtt_sample(0.1)
    assert r.srtt == pytest.approx(0.1)
    assert r.rttvar == pytest.approx(0.05)
    assert r.rto == pytest.approx(0.3)  # R + 4 * R/2 (RFC 6298 2.2)


def test_later_samples_are_smoothed_with_alpha_one_eighth_and_beta_one_quarter() -> None:
    r = RtoEstimator(min_rto=0.0, max_rto=60.0)
    r.on_rtt_sample(0.1)
    r.on_rtt_sample(0.2)
    assert r.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)
    assert r.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)
    assert r.srtt is not None
    assert r.rto == pytest.approx(r.srtt + 4 * r.rttvar)


def test_rto_is_clamped_to_the_minimum() -> None:
    r = RtoEstimator(min_rto=1.0, max_rto=60.0)
    r.on_rtt_sample(0.01)
    assert r.rto == 1.0


def test_timeouts_double_the_rto_up_to_the_maximum() -> None:
    r = RtoEstimator(min_rto=1.0, max_rto=60.0, rto=1.0)
    seen = []
    for _ in range(8):
        seen.append(r.current())
        r.on_timeout()
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_a_new_ack_ends_the_backoff() -> None:
    r = RtoEstimator(min_rto=1.0, max_rto=60.0, rto=1.0)
    r.on_timeout()
    r.on_timeout()
    r.on_new_ack()
    assert r.current() == 1.0
