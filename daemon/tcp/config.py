"""Settings of the userspace TCP endpoint, and the endpoint address type.

RFCs behind the defaults: RFC 9293 3.7.1 (MSS, default 536), RFC 7323
(window scale, timestamps), RFC 2018 (SACK), RFC 6298 (RTO bounds), RFC 1122
4.2.3.2 (delayed ACK), RFC 6928 (initial window of 10 segments), RFC 3465
(byte counting in slow start).  Thesis 5.4.2 had the client-facing endpoint
offer window scale 0 so that no window would ever need rescaling after a
splice; that caps the client's flight at 64 KB (26 Mbit/s over 20 ms), so
the endpoint offers 7, as Linux does for its default buffers, and the splice
translator rescales windows between the two shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

# An endpoint of a flow: (address bytes, 4 for IPv4 or 16 for IPv6; port).
Endpoint = tuple[bytes, int]


@dataclass(slots=True, frozen=True)
class TcpConfig:
    """Per-endpoint settings; one instance is shared by many connections."""

    mss: int = 1460
    """MSS we advertise: the largest payload we accept in one segment."""
    rcv_wscale: int | None = 7
    """Window scale shift we offer (0..14); None = don't send the option."""
    sack: bool = True
    """Offer/accept SACK-permitted and advertise SACK blocks (RFC 2018)."""
    sack_recovery: bool = True
    """Use received SACK blocks for loss recovery (RFC 6675); False: NewReno only."""
    timestamps: bool = True
    """Offer/accept the timestamps option (RFC 7323)."""
    ecn: bool = True
    """Request ECN on connect and accept it when a peer requests it (RFC 3168 6.1.1).

    On by default so that a splice of two connections that both negotiated
    it carries ECN end to end; a peer that does not answer the request
    simply leaves the connection without it.
    """
    rcv_buf: int = 256 * 1024
    """Receive buffer: in-order bytes not yet read plus the advertised window."""
    snd_buf: int = 256 * 1024
    """Send buffer: bytes accepted from the application and not yet acked."""
    msl: float = 30.0
    """Maximum segment lifetime; TIME-WAIT lasts 2*MSL (RFC 9293 3.4.2)."""
    min_rto: float = 0.2
    """Lower bound of the RTO; RFC 6298 2.4 says 1 s, Linux uses 200 ms."""
    max_rto: float = 60.0
    initial_rto: float = 1.0
    """RTO before the first RTT sample (RFC 6298 2.1)."""
    max_retries: int = 15
    """Consecutive RTOs on a synchronized connection before it times out."""
    syn_retries: int = 6
    """SYN (or SYN-ACK) retransmissions before the handshake times out."""
    user_timeout: float | None = None
    """If set, also time out when data stays unacked this long (RFC 5482)."""
    max_tso_bytes: int = 65000
    """Largest payload of one emitted segment; the I/O layer cuts it by GSO."""
    syn_backlog: int = 256
    """Listener: connections in SYN-RECEIVED at once; more get SYN cookies (or are dropped)."""
    syn_cookies: bool = True
    """Listener: answer SYNs with SYN cookies while the SYN-RECEIVED queue is full (RFC 4987)."""
    accept_backlog: int = 128
    """Listener: established connections waiting for accept()."""
    challenge_ack_limit: int | None = 10
    """Challenge ACKs per connection per second (RFC 5961 7); None = no limit.

    Per connection, not per host as RFC 5961 suggests: a shared budget is
    an off-path side channel (CVE-2016-5696) that tells a blind attacker
    when its guess hit a live connection's window.
    """
    delayed_ack: float | None = 0.04
    """Delayed-ACK timeout (RFC 1122 4.2.3.2 allows up to 0.5 s); None = ack at once."""
    initial_cwnd_segments: int = 10
    """Initial congestion window in segments (RFC 6928)."""
    abc_limit_segments: int = 2
    """Slow start grows cwnd by at most this many MSS per ACK (RFC 3465 2.2)."""
    persist_max: float = 60.0
    """Longest interval between zero-window probes."""
    min_ack_delay: float = 0.0
    """Acknowledge no sequence space received less than this long ago (0 = off).

    For the server side of a splice: the server times its RTT (and BBR its
    min-RTT filter, for 10 s) from our ACKs, but carries its traffic across
    the client's path too; an ACK from the proxy host would tell it the path
    is as short as the proxy link.  The daemon sets it to the client
    connection's RTT.  Data we send waits with it, since it carries the ACK.
    """
