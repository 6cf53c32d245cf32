"""The deterministic byte stream that the origin server sends and the clients check.

Theory of operation
-------------------
Stream byte ``i`` is ``pattern[i % PERIOD]``, where ``pattern`` is ``PERIOD``
bytes of SHAKE-256 output keyed by a seed. Because ``PERIOD`` is prime, no
power-of-two sized shift of the stream (a segment's worth of data delivered
twice, dropped, or swapped with its neighbour) lines up with the period, so a
relay that misplaces data produces bytes that do not match, and the receiver
can check a stream of any length while storing only the period.

Both directions use a *doubled* buffer, ``pattern + pattern``: the window of
``n <= PERIOD`` stream bytes starting at offset ``o`` is the single slice
``doubled[o % PERIOD : o % PERIOD + n]``. The sender hands such slices (or the
same ranges of a memfd, for ``os.sendfile``) to the kernel; the verifier
compares received chunks with them at ``memcmp`` speed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator

# 2**20 - 3, the largest prime below 1 MiB: big enough that every window a
# socket read returns is one slice, prime so no block-sized shift is invisible.
PERIOD = 1_048_573

DEFAULT_SEED = 1

_DOMAIN = b"tcp-splice pattern v1\x00"

# Once a mismatch is known, the exact offset is found by comparing blocks of
# this size and then bytes: a cost paid once per corrupt stream.
_SEARCH_BLOCK = 4096


@functools.cache
def doubled_pattern(seed: int = DEFAULT_SEED) -> bytearray:
    """``pattern + pattern`` for ``seed`` (2 * PERIOD bytes), computed once per process.

    A bytearray because ``bytearray == buffer`` is a plain ``memcmp`` against any
    buffer (bytes, bytearray, memoryview), which the verifier relies on.
    Callers must not modify it.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    period = hashlib.shake_256(_DOMAIN + seed.to_bytes(8, "big")).digest(PERIOD)
    return bytearray(period + period)


def pattern_window(seed: int, offset: int, length: int) -> memoryview:
    """The stream bytes ``[offset, offset + length)`` as one zero-copy slice.

    ``length`` may be at most ``PERIOD``; larger transfers take several windows
    (see :func:`pattern_chunks`).
    """
    if offset < 0 or not 0 <= length <= PERIOD:
        raise ValueError(f"window offset={offset} length={length} out of range")
    start = offset % PERIOD
    return memoryview(doubled_pattern(seed))[start : start + length]


def pattern_chunks(seed: int, total: int, offset: int = 0) -> Iterator[memoryview]:
    """Stream bytes ``[offset, offset + total)`` as a sequence of windows of at most PERIOD."""
    end = offset + total
    while offset < end:
        n = min(PERIOD, end - offset)
        yield pattern_window(seed, offset, n)
        offset += n


def pattern_bytes(seed: int, total: int, offset: int = 0) -> bytes:
    """Stream bytes ``[offset, offset + total)`` as one ``bytes`` (for small payloads and tests)."""
    return b"".join(pattern_chunks(seed, total, offset))


def pattern_memfd(seed: int = DEFAULT_SEED) -> int:
    """A sealed-size memfd holding the doubled pattern, for ``os.sendfile`` with any offset.

    The caller owns the returned file descriptor. ``os.sendfile`` from a memfd
    passes page references to the socket instead of copying through userspace.
    """
    fd = os.memfd_create(f"tcp-splice-pattern-{seed}", os.MFD_CLOEXEC)
    try:
        data = memoryview(doubled_pattern(seed))
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except BaseException:
        os.close(fd)
        raise
    return fd


class PatternVerifier:
    """Checks a received stream against the pattern, chunk by chunk, in order.

    ``feed`` accepts chunks of any size. The first offset whose byte differs
    from the pattern is kept in :attr:`first_bad_offset`; checking stops there
    (later bytes are meaningless once data is misplaced) but counting and the
    SHA-256 carry on, so the digest always covers the whole stream.
    """

    __slots__ = ("_doubled", "_sha", "first_bad_offset", "offset", "seed")

    def __init__(self, seed: int = DEFAULT_SEED, *, digest: bool = True) -> None:
        self.seed = seed
        self.offset = 0
        self.first_bad_offset: int | None = None
        self._doubled = doubled_pattern(seed)
        # SHA-256 costs ~0.5 ns/byte, the comparison ~0.05: callers that only
        # need a yes/no (the load generator) switch it off.
        self._sha = hashlib.sha256() if digest else None

    @property
    def ok(self) -> bool:
        """True while every byte fed so far matches the pattern."""
        return self.first_bad_offset is None

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else chunk
        if self._sha is not None:
            self._sha.update(view)
        if self.first_bad_offset is None:
            self._check(view)
        self.offset += len(view)

    def hexdigest(self) -> str:
        """Hex SHA-256 of every byte fed so far."""
        if self._sha is None:
            raise RuntimeError("PatternVerifier was created with digest=False")
        return self._sha.hexdigest()

    def _check(self, view: bytes | memoryview) -> None:
        pos = 0
        while pos < len(view):
            n = min(PERIOD, len(view) - pos)
            start = (self.offset + pos) % PERIOD
            # bytearray.__eq__ takes any buffer and is a memcmp; the slice of
            # the pattern is a memcpy, both far faster than the socket.
            if not _equal(self._doubled[start : start + n], view[pos : pos + n]):
                self.first_bad_offset = self.offset + pos + self._first_difference(view, pos, n)
                return
            pos += n

    def _first_difference(self, view: bytes | memoryview, pos: int, n: int) -> int:
        """Index (relative to ``pos``) of the first byte in ``view[pos:pos+n]`` that differs."""
        start = (self.offset + pos) % PERIOD
        block = 0
        while block < n:
            m = min(_SEARCH_BLOCK, n - block)
            expected = self._doubled[start + block : start + block + m]
            got = view[pos + block : pos + block + m]
            if not _equal(expected, got):
                for i in range(m):
                    if expected[i] != got[i]:
                        return block + i
            block += m
        raise AssertionError("chunk compared unequal but no differing byte found")


def _equal(expected: bytearray, got: object) -> bool:
    """``memcmp`` of a bytearray with any contiguous buffer.

    ``bytearray.__eq__`` accepts any buffer and compares with memcmp, whereas
    ``memoryview.__eq__`` unpacks item by item, ~40 times slower.
    """
    return expected == got
