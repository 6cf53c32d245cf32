"""Sequence arithmetic modulo 2**32 (RFC 9293 3.4), including wrap-around."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.tcp.seq import (
    MASK,
    seq_add,
    seq_ge,
    seq_gt,
    seq_in_window,
    seq_le,
    seq_lt,
    seq_max,
    seq_min,
    seq_sub,
)

u32 = st.integers(min_value=0, max_value=MASK)
dist = st.integers(min_value=1, max_value=(1 << 31) - 1)


@given(u32, dist)
def test_a_number_is_before_any_number_up_to_2_31_ahead_even_across_wrap(a: int, d: int) -> None:
    b = seq_add(a, d)
    assert seq_lt(a, b) and seq_le(a, b)
    assert seq_gt(b, a) and seq_ge(b, a)
    assert not seq_lt(b, a) and not seq_gt(a, b)
    assert seq_max(a, b) == b and seq_min(a, b) == a


@given(u32, st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1))
def test_sub_inverts_add(a: int, n: int) -> None:
    assert seq_sub(seq_add(a, n), a) == n


@given(u32)
def test_equal_numbers_are_le_and_ge_but_not_lt_or_gt(a: int) -> None:
    assert seq_le(a, a) and seq_ge(a, a)
    assert not seq_lt(a, a) and not seq_gt(a, a)


@given(u32, u32, st.integers(min_value=0, max_value=1 << 30))
def test_in_window_means_offset_from_left_edge_below_size(x: int, left: int, size: int) -> None:
    assert seq_in_window(x, left, size) == ((x - left) % (1 << 32) < size)


def test_comparisons_at_the_wrap_point() -> None:
    assert seq_lt(MASK, 0)
    assert seq_lt(0xFFFFFF00, 0x100)
    assert seq_sub(0x10, 0xFFFFFFF0) == 0x20
    assert seq_add(MASK, 1) == 0
    assert seq_in_window(5, MASK - 5, 20)
    assert not seq_in_window(MASK - 6, MASK - 5, 20)
    assert not seq_in_window(7, 7, 0)
