"""NewReno congestion control, RFC 5681 + RFC 6582, and RFC 6675's recovery window.

RFCs to read first: RFC 5681 section 3.1 (slow start, congestion avoidance,
loss window after RTO), 3.2 (fast retransmit / fast recovery), RFC 6582
section 3.2 (NewReno: ``recover``, partial and full ACKs), RFC 3465 (byte
counting), RFC 6928 (initial window).

The controller knows nothing of segments: the connection tells it how many
bytes an ACK newly acknowledged, when a duplicate ACK arrived, and when the
retransmission timer fired.  Its answers say whether to retransmit the first
unacknowledged segment.  Windows are in bytes.

With SACK (RFC 6675 5) recovery starts from ``enter_sack_recovery``: cwnd
and ssthresh both become half the flight, nothing inflates or deflates
during recovery (the sender counts ``pipe`` instead, daemon/tcp/sack.py),
and a cumulative ACK at ``recover`` ends it.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.tcp.seq import seq_ge

DUPACK_THRESHOLD = 3  # RFC 5681 3.2


@dataclass(slots=True)
class NewReno:
    mss: int
    cwnd: int
    ssthresh: int = 1 << 30  # RFC 5681 3.1: "arbitrarily high"
    abc_limit: int = 2  # segments per ACK in slow start (RFC 3465 2.2, L)
    dupacks: int = 0
    in_recovery: bool = False
    sack_recovery: bool = False  # this recovery is RFC 6675's (pipe), not NewReno's
    recover: int = 0  # RFC 6582: snd_max when recovery started (exclusive end)
    ecn_recover: int = 0  # RFC 3168 6.1.2: snd_max at the last ECN reduction
    _ca_acked: int = 0  # bytes acked since the last cwnd step in CA

    @classmethod
    def create(cls, mss: int, initial_segments: int, abc_limit: int, iss: int) -> NewReno:
        return cls(
            mss=mss,
            cwnd=initial_segments * mss,
            abc_limit=abc_limit,
            recover=iss,
            ecn_recover=iss,
        )

    def on_new_ack(self, acked: int, ack: int, flight_before: int) -> bool:
        """``acked`` new bytes acknowledged up to ``ack``; True = retransmit at ``ack``.

        ``flight_before`` is the amount outstanding before this ACK.
        """
        self.dupacks = 0
        if self.in_recovery and self.sack_recovery:
            if seq_ge(ack, self.recover):
                # RFC 6675 5 (A): recovery ends; cwnd is ssthresh already.
                self.in_recovery = self.sack_recovery = False
                self._ca_acked = 0
            return False  # partial ACKs: the pipe decides what is sent
        if self.in_recovery:
            if seq_ge(ack, self.recover):
                # RFC 6582 3.2 step 3, full ACK: deflate, option (1).
                flight_after = max(flight_before - acked, 0)
                self.cwnd = min(self.ssthresh, max(flight_after, self.mss) + self.mss)
                self.in_recovery = False
                self._ca_acked = 0
                return False
            # RFC 6582 3.2 step 3, partial ACK: retransmit the next hole,
            # deflate by the amount acked, add back one MSS if >= MSS acked.
            self.cwnd = max(self.cwnd - acked, self.mss)
            if acked >= self.mss:
                self.cwnd += self.mss
            return True
        if self.cwnd < self.ssthresh:
            # RFC 5681 3.1 slow start with RFC 3465 byte counting, L = abc_limit.
            self.cwnd += min(acked, self.abc_limit * self.mss)
        else:
            # RFC 5681 3.1 congestion avoidance: +1 MSS per cwnd of acked bytes.
            self._ca_acked += acked
            if self._ca_acked >= self.cwnd:
                self._ca_acked -= self.cwnd
                self.cwnd += self.mss
        return False

    def on_dup_ack(self, snd_una: int, snd_max: int, flight: int) -> bool:
        """One duplicate ACK (RFC 5681 2 definition); True = fast retransmit now."""
        if self.in_recovery:
            if not self.sack_recovery:
                self.cwnd += self.mss  # RFC 5681 3.2 step 4: inflate
            return False
        self.dupacks += 1
        if self.dupacks != DUPACK_THRESHOLD:
            return False
        # RFC 6582 3.2 step 2: only enter recovery when the ACK covers more
        # than ``recover``; otherwise these dupacks are from before an RTO.
        if not seq_ge(snd_una, self.recover):
            return False
        self.ssthresh = max(flight // 2, 2 * self.mss)  # RFC 5681 eq. (4)
        self.recover = snd_max
        self.cwnd = self.ssthresh + DUPACK_THRESHOLD * self.mss
        self.in_recovery = True
        return True

    def enter_sack_recovery(self, snd_una: int, snd_max: int, flight: int) -> bool:
        """RFC 6675 5 (4.1, 4.2): start loss recovery; False if it may not start now.

        As RFC 6582 3.2 step 2: not for losses from before an RTO's
        retransmissions (``snd_una`` below ``recover``).
        """
        if self.in_recovery or not seq_ge(snd_una, self.recover):
            return False
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self.recover = snd_max
        self.in_recovery = self.sack_recovery = True
        self.dupacks = 0
        return True

    def on_ecn_echo(self, snd_una: int, snd_max: int, flight: int) -> bool:
        """An ACK with ECE (RFC 3168 6.1.2): halve the window; False if not now.

        At most once per window of data (until what was outstanding at the
        last reduction is acknowledged), and not during loss recovery, which
        has reduced the window for this flight already.  No retransmission:
        nothing was lost.
        """
        if self.in_recovery or not seq_ge(snd_una, self.ecn_recover):
            return False
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self.ecn_recover = snd_max
        self._ca_acked = 0
        return True

    def on_rto(self, flight: int, snd_max: int, first: bool) -> None:
        """RFC 5681 3.1 / eq. (4) and RFC 6582 4: collapse to one segment.

        ``first`` is False when the same data times out again: RFC 5681 3.1
        says ssthresh is then left alone rather than halved once more.
        """
        if first:
            self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.in_recovery = self.sack_recovery = False
        self.dupacks = 0
        self._ca_acked = 0
        self.recover = snd_max
