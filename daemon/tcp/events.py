"""What a connection reports to the application (the event loop drains them).

Events are enum members, not objects, so reporting one allocates nothing.
READABLE and SEND_SPACE are edge-triggered: READABLE is reported when data
arrives and none was reported since the last ``recv()``; SEND_SPACE when
ACKs free space after ``send()`` accepted less than it was offered.
"""

from __future__ import annotations

import enum


class TcpEvent(enum.Enum):
    ESTABLISHED = "established"  # handshake complete
    READABLE = "readable"  # in-order data waits in recv()
    PEER_CLOSED = "peer_closed"  # FIN received: EOF after the readable data
    RESET = "reset"  # the peer reset a synchronized connection
    REFUSED = "refused"  # RST in answer to our SYN
    TIMED_OUT = "timed_out"  # retransmissions gave up; we sent RST
    CLOSED = "closed"  # the connection is gone (TCB may be freed)
    SEND_SPACE = "send_space"  # send() will take bytes again
