"""A timer heap for the event loop: deadlines with lazy cancellation.

Timers are explicit state (smoltcp's habit): each owner keeps the token of
its one scheduled timer; re-arming pushes a new entry and bumps the token,
and stale entries are skipped when they surface.  No threads, and no
callback held past its cancellation: a stale entry waits in the heap for
its deadline, but what its callback referenced (a connection, its TCB and
buffers) is freed at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("daemon.timers")


@dataclass(order=True, slots=True)
class _Entry:
    deadline: float
    seq: int
    fire: Callable[[], None] = field(compare=False)
    live: bool = field(default=True, compare=False)


@dataclass(slots=True)
class Timer:
    """A handle: `cancel()` makes the pending entry a no-op."""

    _entry: _Entry | None = None

    def cancel(self) -> None:
        if self._entry is not None:
            _kill(self._entry)
            self._entry = None

    @property
    def deadline(self) -> float | None:
        return self._entry.deadline if self._entry is not None else None


def _nothing() -> None:
    pass


def _kill(entry: _Entry) -> None:
    """Make ``entry`` a no-op and let go of its callback (and all it references)."""
    entry.live = False
    entry.fire = _nothing


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._seq = itertools.count()

    def schedule(self, timer: Timer, deadline: float, fire: Callable[[], None]) -> None:
        """(Re-)arm `timer` for `deadline`; a no-op if already armed for it."""
        if timer._entry is not None:
            if timer._entry.live and timer._entry.deadline == deadline:
                return
            _kill(timer._entry)
        entry = _Entry(deadline, next(self._seq), fire)
        timer._entry = entry
        heapq.heappush(self._heap, entry)

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and not heap[0].live:
            heapq.heappop(heap)
        return heap[0].deadline if heap else None

    def run_due(self, now: float) -> int:
        """Fire every live timer whose deadline has come; returns how many."""
        fired = 0
        heap = self._heap
        while heap and heap[0].deadline <= now:
            entry = heapq.heappop(heap)
            if entry.live:
                entry.live = False
                try:
                    entry.fire()
                except Exception:
                    # One failing timer must not stop the loop or the others.
                    log.exception("timer callback failed")
                fired += 1
        return fired

    def __len__(self) -> int:
        return sum(1 for e in self._heap if e.live)
