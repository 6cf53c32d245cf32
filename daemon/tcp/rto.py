"""Retransmission timeout estimator, RFC 6298.

RFCs to read first: RFC 6298 sections 2 (SRTT/RTTVAR/RTO), 3 (Karn's rule:
no samples from retransmitted segments, the caller enforces it), 5
(exponential backoff); RFC 7323 4 (samples from timestamps).

Pure arithmetic on floats in seconds; the connection owns the timer.
"""

from __future__ import annotations

from dataclasses import dataclass

_ALPHA = 0.125  # RFC 6298 2.3
_BETA = 0.25
_K = 4
_GRANULARITY = 0.001  # G: our clock is float seconds; ms like the TS clock


@dataclass(slots=True)
class RtoEstimator:
    min_rto: float = 1.0
    max_rto: float = 60.0
    rto: float = 1.0
    srtt: float | None = None
    rttvar: float = 0.0
    backoff: int = 0
    min_rtt: float | None = None  # the smallest sample seen (what a path is at best)

    def on_rtt_sample(self, rtt: float) -> None:
        """Fold in one RTT measurement (RFC 6298 2.2 first, 2.3 later)."""
        if rtt < 0:
            return
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            # RFC 6298 2.3: RTTVAR is updated with the old SRTT.
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt
        self._set_rto()
        # RFC 6298 5.7 lets a fresh sample end the backoff.
        self.backoff = 0

    def seed(self, srtt: float, rttvar: float) -> None:
        """Carry on another stack's estimate (a connection taken over from the kernel)."""
        if srtt <= 0:
            return
        self.srtt, self.rttvar = srtt, max(rttvar, 0.0)
        self.min_rtt = srtt if self.min_rtt is None else min(self.min_rtt, srtt)
        self._set_rto()

    def _set_rto(self) -> None:
        assert self.srtt is not None
        rto = self.srtt + max(_GRANULARITY, _K * self.rttvar)
        # RFC 6298 2.4/2.5: clamp to [min, max].
        self.rto = min(self.max_rto, max(self.min_rto, rto))

    def current(self) -> float:
        """The timeout to arm now, backoff included (RFC 6298 5.5, capped 2.5)."""
        return min(self.max_rto, self.rto * (1 << self.backoff))

    def on_timeout(self) -> None:
        """RFC 6298 5.5: back off the timer."""
        if self.rto * (1 << self.backoff) < self.max_rto:
            self.backoff += 1

    def on_new_ack(self) -> None:
        """An ACK for new data ends the backoff (as Linux does)."""
        self.backoff = 0
