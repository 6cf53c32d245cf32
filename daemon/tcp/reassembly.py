"""Out-of-order receive queue and the SACK blocks it implies.

RFCs to read first: RFC 9293 3.10.7.4 ("segments with higher beginning
sequence numbers may be held for later processing"), RFC 2018 section 4
(which SACK blocks to report, in which order), RFC 5681 4.2 (the ACK that
follows an out-of-order segment goes out at once).

Data is kept as a few contiguous blocks, each a bytearray with its starting
sequence number, sorted by sequence.  A segment that overlaps or touches
blocks merges with them, so there are never two adjacent blocks and the
block count equals the number of holes.  Where new and old bytes overlap
the old ones are kept (RFC 9293 leaves the choice open).  The common case
after a loss -- the next segment extends the newest block at its tail -- is
an in-place ``bytearray +=``.

Offsets are taken relative to RCV.NXT, which is always at or left of every
block, so plain int comparisons on offsets are safe across 2**32 wrap.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.tcp.seq import MASK, seq_sub


@dataclass(slots=True)
class _Block:
    seq: int
    data: bytearray
    touched: int  # arrival counter of the latest byte merged in (for RFC 2018 4)


class ReassemblyQueue:
    __slots__ = ("_blocks", "_clock", "bytes_queued")

    def __init__(self) -> None:
        self._blocks: list[_Block] = []
        self._clock = 0
        self.bytes_queued = 0

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def insert(self, rcv_nxt: int, seq: int, data: bytes | memoryview, limit: int) -> int:
        """Queue ``data`` starting at ``seq``, keeping only [rcv_nxt, rcv_nxt+limit).

        Returns the number of bytes that were not already queued.
        """
        off = seq_sub(seq, rcv_nxt)
        end = off + len(data)
        if off < 0:
            data = data[-off:]
            off = 0
        if end > limit:
            data = data[: max(limit - off, 0)]
            end = off + len(data)
        if off >= end:
            return 0
        self._clock += 1
        blocks = self._blocks
        # Find the blocks that overlap or touch [off, end).
        first = len(blocks)
        last = -1
        for i, b in enumerate(blocks):
            bo = seq_sub(b.seq, rcv_nxt)
            if bo > end:
                break
            if bo + len(b.data) >= off:
                if first > i:
                    first = i
                last = i
        if last < 0:
            # No neighbour: a new block, inserted in sequence order.
            pos = 0
            while pos < len(blocks) and seq_sub(blocks[pos].seq, rcv_nxt) < off:
                pos += 1
            blocks.insert(pos, _Block((rcv_nxt + off) & MASK, bytearray(data), self._clock))
            self.bytes_queued += end - off
            return end - off
        fb = blocks[first]
        fo = seq_sub(fb.seq, rcv_nxt)
        if first == last and fo <= off:
            # Extends (or is inside) one block: append the tail in place.
            fe = fo + len(fb.data)
            fb.touched = self._clock
            if end <= fe:
                return 0
            fb.data += data[fe - off :]
            self.bytes_queued += end - fe
            return end - fe
        # General case: stitch new bytes into the gaps between old blocks.
        merged = bytearray()
        pos = min(off, fo)
        old = 0
        for b in blocks[first : last + 1]:
            bo = seq_sub(b.seq, rcv_nxt)
            if bo > pos:
                merged += data[pos - off : bo - off]
            merged += b.data
            old += len(b.data)
            pos = bo + len(b.data)
        if end > pos:
            merged += data[pos - off :]
        start = min(off, fo)
        blocks[first : last + 1] = [_Block((rcv_nxt + start) & MASK, merged, self._clock)]
        added = len(merged) - old
        self.bytes_queued += added
        return added

    def pop_ready(self, rcv_nxt: int) -> bytearray | None:
        """Remove and return the bytes starting at ``rcv_nxt``, if queued.

        Blocks wholly at or left of ``rcv_nxt`` (covered by in-order data that
        arrived meanwhile) are discarded; a partly covered one is trimmed.
        """
        blocks = self._blocks
        while blocks:
            b = blocks[0]
            bo = seq_sub(b.seq, rcv_nxt)
            if bo > 0:
                return None
            del blocks[0]
            self.bytes_queued -= len(b.data)
            if bo + len(b.data) > 0:
                if bo < 0:
                    del b.data[:-bo]
                return b.data
        return None

    def sack_blocks(self, max_blocks: int) -> tuple[tuple[int, int], ...]:
        """SACK blocks (left, right) to report, the most recently changed first.

        RFC 2018 4: the first block must contain the most recently received
        segment; the others repeat recent blocks.  Ordering by last change
        satisfies both.
        """
        if not self._blocks:
            return ()
        ordered = sorted(self._blocks, key=lambda b: b.touched, reverse=True)
        return tuple((b.seq, (b.seq + len(b.data)) & MASK) for b in ordered[:max_blocks])
