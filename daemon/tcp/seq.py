"""Sequence-number arithmetic modulo 2**32.

RFCs to read first: RFC 9293 section 3.4 (sequence numbers are compared
modulo 2**32), RFC 1982 (serial number arithmetic, the same idea).

Two numbers are compared through their signed 32-bit difference, so the
comparison is right as long as they are less than 2**31 apart; TCP windows
(at most 2**30 with window scale, RFC 7323 2.3) keep them that close.  These
are plain functions on ints because they sit on the per-segment hot path.
"""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
_HALF = 1 << 31


def seq_add(a: int, n: int) -> int:
    """``a + n`` wrapped into 32 bits (``n`` may be negative)."""
    return (a + n) & MASK


def seq_sub(a: int, b: int) -> int:
    """Signed distance ``a - b`` in the range [-2**31, 2**31)."""
    return ((a - b + _HALF) & MASK) - _HALF


def seq_lt(a: int, b: int) -> bool:
    """``a`` comes before ``b``."""
    return ((a - b) & MASK) >= _HALF


def seq_le(a: int, b: int) -> bool:
    return a == b or ((a - b) & MASK) >= _HALF


def seq_gt(a: int, b: int) -> bool:
    return ((b - a) & MASK) >= _HALF


def seq_ge(a: int, b: int) -> bool:
    return a == b or ((b - a) & MASK) >= _HALF


def seq_in_window(x: int, left: int, size: int) -> bool:
    """``left <= x < left + size`` modulo 2**32 (empty when ``size`` is 0)."""
    return ((x - left) & MASK) < size


def seq_max(a: int, b: int) -> int:
    return b if ((a - b) & MASK) >= _HALF else a


def seq_min(a: int, b: int) -> int:
    return a if ((a - b) & MASK) >= _HALF else b
