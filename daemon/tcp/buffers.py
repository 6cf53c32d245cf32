"""Bounded send and receive buffers.

RFCs to read first: RFC 9293 3.8.6 (window management), RFC 1122 4.2.2.13
(data lost on close is signalled by RST; the receive buffer must tell).

``SendBuffer`` holds the bytes the application handed us that the peer has
not acknowledged yet, starting at sequence number ``seq`` (SND.UNA once the
SYN is acked).  Transmission and retransmission read slices of it by
sequence offset; ACKs drop bytes from the front.  Its capacity is the
backpressure towards the application: ``write`` takes only what fits.

``RecvBuffer`` holds in-order bytes the application has not read.  Its free
space is what the connection may advertise as a window; because a window
once advertised must be honoured (RFC 9293 3.8.6.2.2), ``append`` never
refuses bytes -- the connection checks the window before appending.

Both use a bytearray: CPython deletes from the front of a bytearray in O(1)
(it moves the start pointer), so consuming from the head never shifts the
whole buffer.  Slices are copied out as ``bytes`` so the caller can keep
them while the buffer keeps changing (an exported memoryview would pin the
bytearray's size).
"""

from __future__ import annotations


class SendBuffer:
    __slots__ = ("_buf", "capacity", "seq")

    def __init__(self, capacity: int, seq: int) -> None:
        self._buf = bytearray()
        self.capacity = capacity
        self.seq = seq  # sequence number of the first byte held

    def __len__(self) -> int:
        return len(self._buf)

    def space(self) -> int:
        return max(self.capacity - len(self._buf), 0)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append as much of ``data`` as fits; return the count taken."""
        n = min(len(data), self.capacity - len(self._buf))
        if n <= 0:
            return 0
        if n == len(data):
            self._buf += data
        else:
            self._buf += memoryview(data)[:n]
        return n

    def consume(self, n: int) -> None:
        """The first ``n`` bytes were acknowledged."""
        del self._buf[:n]
        self.seq = (self.seq + n) & 0xFFFFFFFF

    def peek(self, offset: int, n: int) -> bytes:
        """Copy of ``n`` bytes starting ``offset`` bytes after ``seq``."""
        return bytes(memoryview(self._buf)[offset : offset + n])


class RecvBuffer:
    __slots__ = ("_buf", "capacity")

    def __init__(self, capacity: int) -> None:
        self._buf = bytearray()
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self._buf)

    def free(self) -> int:
        return max(self.capacity - len(self._buf), 0)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def read(self, max_bytes: int) -> bytes:
        if max_bytes >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(memoryview(self._buf)[:max_bytes])
        del self._buf[:max_bytes]
        return out
