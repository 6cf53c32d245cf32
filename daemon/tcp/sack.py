"""The SACK scoreboard of RFC 6675: what the receiver holds above SND.UNA.

Read first: RFC 6675 sections 2 (definitions), 4 (Update, IsLost, SetPipe,
NextSeg) and 5 (the algorithm; daemon/tcp/connection.py drives it), RFC
2018 (the option).

The scoreboard keeps the SACKed ranges as *offsets from SND.UNA*, disjoint
and ascending, so no comparison here is modular: ``advance`` shifts them
when the cumulative ACK moves.  Everything is in bytes; an offset range is
``[start, end)``.

IsLost is constant over a hole (no SACKed byte lies inside one), so the
routines work hole by hole: a hole is lost when ``DUP_THRESH`` SACKed
blocks, or more than ``(DUP_THRESH - 1) * SMSS`` SACKed bytes, lie above
it (RFC 6675 4, IsLost).  Pure, no I/O; tests/test_tcp_sack.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.tcp.seq import MASK

__all__ = ["DUP_THRESH", "Scoreboard"]

DUP_THRESH = 3  # RFC 6675 2: DupThresh


@dataclass(slots=True)
class Scoreboard:
    """SACKed ranges above SND.UNA, as offsets from it."""

    blocks: list[tuple[int, int]] = field(default_factory=list)

    def clear(self) -> None:
        """Forget everything (after an RTO: the receiver may renege, RFC 2018 8)."""
        self.blocks.clear()

    def advance(self, acked: int) -> None:
        """SND.UNA moved up by ``acked`` bytes: shift, and drop what it covers."""
        if not self.blocks or acked <= 0:
            return
        out = []
        for start, end in self.blocks:
            if end > acked:
                out.append((max(start - acked, 0), end - acked))
        self.blocks = out

    def update(self, snd_una: int, flight: int, sack: tuple[tuple[int, int], ...]) -> bool:
        """RFC 6675 Update(): record an ACK's SACK blocks; True if any byte is newly SACKed.

        Blocks are absolute sequence numbers.  A block at or below SND.UNA
        is a D-SACK (RFC 2883) and one reaching past what was sent is bogus:
        both are ignored.
        """
        grew = False
        for left, right in sack:
            start, end = (left - snd_una) & MASK, (right - snd_una) & MASK
            if not 0 <= start < end <= flight:
                continue
            if self._add(start, end):
                grew = True
        return grew

    def _add(self, start: int, end: int) -> bool:
        merged: list[tuple[int, int]] = []
        before = sum(e - s for s, e in self.blocks)
        placed = False
        for s, e in self.blocks:
            if e < start:
                merged.append((s, e))
            elif end < s:
                if not placed:
                    merged.append((start, end))
                    placed = True
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            merged.append((start, end))
        merged.sort()
        self.blocks = merged
        return sum(e - s for s, e in merged) > before

    @property
    def highest(self) -> int:
        """The end of the highest SACKed range (0 with nothing SACKed)."""
        return self.blocks[-1][1] if self.blocks else 0

    def sacked_bytes(self) -> int:
        return sum(e - s for s, e in self.blocks)

    def holes(self, flight: int, mss: int) -> list[tuple[int, int, bool]]:
        """(start, end, lost) of every unSACKed range in [0, flight), lowest first."""
        out: list[tuple[int, int, bool]] = []
        above_blocks = len(self.blocks)
        above_bytes = self.sacked_bytes()
        pos = 0
        for s, e in self.blocks:
            if s > pos:
                lost = above_blocks >= DUP_THRESH or above_bytes > (DUP_THRESH - 1) * mss
                out.append((pos, s, lost))
            above_blocks -= 1
            above_bytes -= e - s
            pos = e
        if pos < flight:
            out.append((pos, flight, False))  # nothing SACKed above: never lost
        return out

    def unsacked_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that are not SACKed, lowest first."""
        out: list[tuple[int, int]] = []
        pos = start
        for s, e in self.blocks:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            if pos >= end:
                return out
        if pos < end:
            out.append((pos, end))
        return out

    def is_lost(self, offset: int, mss: int) -> bool:
        """RFC 6675 IsLost() of the byte at ``offset`` (False if it is SACKed)."""
        for start, end, lost in self.holes(max(offset + 1, self.highest), mss):
            if start <= offset < end:
                return lost
        return False

    def pipe(self, flight: int, high_rxt: int, mss: int) -> int:
        """RFC 6675 SetPipe(): bytes presumed in the network.

        An unSACKed byte counts once if it is not lost, and once more if it
        was retransmitted in this recovery (below ``high_rxt``).
        """
        pipe = 0
        for start, end, lost in self.holes(flight, mss):
            if not lost:
                pipe += end - start
            if high_rxt > start:
                pipe += min(end, high_rxt) - start
        return pipe

    def next_retransmit(
        self, high_rxt: int, mss: int, limit: int | None = None
    ) -> tuple[int, int] | None:
        """RFC 6675 NextSeg() rule (1): (offset, length) of a lost hole not yet resent.

        At most ``limit`` bytes (default one ``mss``): a sender with
        segmentation offload may resend a whole hole as one super-packet.
        Rules (2), new data, and (3), below, are the caller's to order.
        """
        return self._next(high_rxt, mss, limit or mss, lost_only=True)

    def next_unsacked(
        self, high_rxt: int, mss: int, limit: int | None = None
    ) -> tuple[int, int] | None:
        """NextSeg() rule (3): an unSACKed range below the highest SACK, not yet resent."""
        return self._next(high_rxt, mss, limit or mss, lost_only=False)

    def _next(self, high_rxt: int, mss: int, limit: int, lost_only: bool) -> tuple[int, int] | None:
        for start, end, lost in self.holes(self.highest, mss):
            if lost_only and not lost:
                continue
            start = max(start, high_rxt)
            if start < end:
                return start, min(end - start, limit)
        return None
