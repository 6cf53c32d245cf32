"""``struct tcp_info`` (linux/tcp.h ``TCP_INFO``), the fields this project reads.

One layout for the daemon's take-over of a kernel connection
(daemon/io/repair.py) and for the kernel SOCKS5's choice of when to hand a
pair over (proxies/socks5_kernel.py).
"""

from __future__ import annotations

import socket
import struct

__all__ = ["HEAD", "METRICS", "METRICS_AT", "SIZE", "smoothed_rtt_us"]

HEAD = struct.Struct("BBBBBBBB")  # tcpi_state .. tcpi_snd/rcv_wscale, then u32s
# tcpi_rtt, tcpi_rttvar (us), tcpi_snd_ssthresh, tcpi_snd_cwnd (segments):
# the 16th to 19th u32 of the struct.
METRICS = struct.Struct("IIII")
METRICS_AT = HEAD.size + 15 * 4
SIZE = 104  # as far as the fields above and a little more (tcpi_rcv_space)


def smoothed_rtt_us(sock: socket.socket) -> int:
    """The kernel's smoothed RTT of ``sock``'s connection, in us (0 before any sample)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, METRICS_AT + METRICS.size)
    return int(METRICS.unpack_from(info, METRICS_AT)[0])
