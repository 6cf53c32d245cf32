"""The reset a segment gets when no connection wants it, RFC 9293 3.10.7.1.

RFCs to read first: RFC 9293 3.10.7.1 (CLOSED state) and 3.5.2 (reset
generation): "an incoming segment containing a RST is discarded"; otherwise,
if the segment has no ACK the reset is <SEQ=0><ACK=SEG.SEQ+SEG.LEN>
<CTL=RST,ACK>, and if it has one the reset is <SEQ=SEG.ACK><CTL=RST>, so
that it is acceptable to the sender.
"""

from __future__ import annotations

from daemon.tcp.seq import MASK
from daemon.wire.tcp import ACK, RST, TcpSegment


def reset_for_unknown(seg: TcpSegment) -> TcpSegment | None:
    """The RST to answer ``seg`` with, or None if ``seg`` is itself a RST."""
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
    return TcpSegment(seg.dst_port, seg.src_port, 0, (seg.seq + seg.seg_len) & MASK, RST | ACK, 0)
