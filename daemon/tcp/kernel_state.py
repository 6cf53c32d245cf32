"""A kernel TCP connection's state as the daemon takes it over (read by daemon/io/repair.py).

Plain data between the reader (TCP_REPAIR and a BPF probe, in the I/O
layer) and ``TcpConnection.restore``, which carries the connection on.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.tcp.config import Endpoint

__all__ = ["KernelTcpState"]


@dataclass(frozen=True, slots=True)
class KernelTcpState:
    """One kernel connection as the socket saw it when read (sequence numbers mod 2**32)."""

    local: Endpoint  # packed address (4 or 16 bytes), port
    remote: Endpoint
    snd_una: int
    snd_nxt: int  # write_seq: every byte before it was written by the application
    rcv_nxt: int
    unacked: bytes  # snd_una .. snd_nxt: sent and unacknowledged, or not sent yet
    unread: bytes  # rcv_nxt - len(unread) .. rcv_nxt: arrived, not read
    fin_received: bool  # CLOSE_WAIT: rcv_nxt counts the peer's FIN
    snd_wnd: int  # bytes, unscaled
    snd_wl1: int
    rcv_wnd: int  # bytes, what was last advertised
    rcv_wup: int  # rcv_nxt when it was advertised
    max_window: int
    ts_ok: bool
    ts_now: int  # the socket's timestamp clock: the TSval it would send now
    ts_recent: int  # the peer's newest TSval (RFC 7323 4.3)
    sack_ok: bool
    wscale_ok: bool
    snd_wscale: int  # the peer's shift: its window fields mean field << snd_wscale
    rcv_wscale: int  # ours
    ecn_ok: bool
    peer_mss: int  # the MSS the peer offered (rx_opt.mss_clamp)
    # How much of ``unacked`` the socket had transmitted (snd_nxt - snd_una);
    # the rest it had not sent yet (window- or congestion-limited).
    sent: int = 0
    srtt: float | None = None  # the socket's RTT estimate (tcpi_rtt), seconds
    rttvar: float = 0.0
    # The socket's congestion state (tcpi_snd_cwnd, tcpi_snd_ssthresh), in
    # segments: 0 / None when unknown or, for ssthresh, never set (infinite).
    snd_cwnd: int = 0
    snd_ssthresh: int | None = None
    # An IPv6 socket's flow label as the kernel sent it (RFC 6437: the
    # connection keeps it); None for IPv4.
    flow_label: int | None = None
