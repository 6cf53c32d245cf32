"""servers.pattern: the content every transfer test checks, and its verifier."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servers.pattern import (
    PERIOD,
    PatternVerifier,
    doubled_pattern,
    pattern_bytes,
    pattern_chunks,
    pattern_memfd,
    pattern_window,
)

SEED = 7


def first_difference(a: bytes, b: bytes) -> int:
    """Reference implementation, byte by byte, to hold the verifier against."""
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def feed_in_chunks(data: bytes, sizes: list[int], seed: int = SEED) -> PatternVerifier:
    verifier = PatternVerifier(seed)
    view = memoryview(data)
    pos = 0
    for size in sizes:
        verifier.feed(view[pos : pos + size])
        pos += size
    verifier.feed(view[pos:])
    return verifier


def test_period_is_prime() -> None:
    assert all(PERIOD % d for d in range(2, int(PERIOD**0.5) + 1))


def test_stream_repeats_with_the_period() -> None:
    period = bytes(doubled_pattern(SEED)[:PERIOD])
    stream = pattern_bytes(SEED, 2 * PERIOD + 100)
    assert stream[:PERIOD] == period
    assert stream[PERIOD : 2 * PERIOD] == period
    assert stream[2 * PERIOD :] == period[:100]


def test_window_at_any_offset_is_the_stream_slice() -> None:
    stream = pattern_bytes(SEED, 3 * PERIOD)
    for offset in (0, 1, PERIOD - 1, PERIOD, 2 * PERIOD - 5):
        assert bytes(pattern_window(SEED, offset, PERIOD)) == stream[offset : offset + PERIOD]


def test_window_longer_than_the_period_is_refused() -> None:
    with pytest.raises(ValueError):
        pattern_window(SEED, 0, PERIOD + 1)


def test_chunks_cover_exactly_the_requested_range() -> None:
    chunks = list(pattern_chunks(SEED, 2 * PERIOD + 3, offset=10))
    assert [len(c) for c in chunks] == [PERIOD, PERIOD, 3]
    assert b"".join(chunks) == pattern_bytes(SEED, 2 * PERIOD + 13)[10:]


def test_seeds_give_different_streams() -> None:
    assert pattern_bytes(1, 4096) != pattern_bytes(2, 4096)


def test_memfd_holds_the_doubled_pattern() -> None:
    fd = pattern_memfd(SEED)
    try:
        assert os.pread(fd, 2 * PERIOD + 10, 0) == bytes(doubled_pattern(SEED))
    finally:
        os.close(fd)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=PERIOD + 7), max_size=6))
def test_verifier_accepts_the_stream_in_chunks_of_any_size(sizes: list[int]) -> None:
    total = sum(sizes) + 11
    stream = pattern_bytes(SEED, total)
    verifier = feed_in_chunks(stream, sizes)
    assert verifier.ok
    assert verifier.first_bad_offset is None
    assert verifier.offset == total
    assert verifier.hexdigest() == hashlib.sha256(stream).hexdigest()


@pytest.mark.parametrize("position", [0, 1, 4095, PERIOD - 1, PERIOD, PERIOD + 1, 2 * PERIOD + 99])
def test_verifier_reports_the_offset_of_a_flipped_byte(position: int) -> None:
    stream = bytearray(pattern_bytes(SEED, 2 * PERIOD + 100))
    stream[position] ^= 0x01
    verifier = feed_in_chunks(bytes(stream), [1460] * 3 + [PERIOD])
    assert not verifier.ok
    assert verifier.first_bad_offset == position


@pytest.mark.parametrize("chunk", [1, 1448, 65536, 3 * PERIOD])
def test_verifier_finds_the_flip_whatever_the_chunk_size(chunk: int) -> None:
    stream = bytearray(pattern_bytes(SEED, 3 * 65536))
    stream[100_000] ^= 0x80
    verifier = PatternVerifier(SEED)
    for pos in range(0, len(stream), chunk):
        verifier.feed(bytes(stream[pos : pos + chunk]))
    assert verifier.first_bad_offset == 100_000


def test_verifier_detects_a_dropped_byte() -> None:
    expected = pattern_bytes(SEED, 300_000)
    dropped = expected[:123_456] + expected[123_457:]
    verifier = feed_in_chunks(dropped, [65536] * 4)
    assert verifier.first_bad_offset == first_difference(dropped, expected)
    assert verifier.first_bad_offset is not None and verifier.first_bad_offset >= 123_456


def test_verifier_detects_two_swapped_segments() -> None:
    # Two MSS-sized segments delivered out of order: the classic relay bug.
    mss = 1448
    expected = pattern_bytes(SEED, 20 * mss)
    a, b = 5 * mss, 6 * mss
    swapped = expected[:a] + expected[b : b + mss] + expected[a:b] + expected[b + mss :]
    verifier = feed_in_chunks(swapped, [mss] * 19)
    assert verifier.first_bad_offset == first_difference(swapped, expected)
    assert a <= verifier.first_bad_offset < a + mss


def test_verifier_detects_a_repeated_segment() -> None:
    expected = pattern_bytes(SEED, 50_000)
    repeated = expected[:20_000] + expected[18_552:20_000] + expected[20_000:]
    verifier = feed_in_chunks(repeated[:50_000], [4096] * 12)
    assert verifier.first_bad_offset == first_difference(repeated, expected)


def test_stream_shifted_by_the_period_is_indistinguishable_and_that_is_the_only_blind_spot() -> (
    None
):
    # Why the period is prime and ~1 MiB: only a shift by a multiple of it
    # goes unseen, and no TCP window or segment size is such a multiple.
    stream = pattern_bytes(SEED, PERIOD + 5000)
    assert stream[PERIOD:] == stream[:5000]
    for shift in (1, 1448, 65536, 1 << 20):
        assert stream[shift : shift + 5000] != stream[:5000]


def test_digest_keeps_covering_the_stream_after_a_mismatch() -> None:
    stream = bytearray(pattern_bytes(SEED, 10_000))
    stream[10] ^= 0xFF
    verifier = feed_in_chunks(bytes(stream), [100, 5000])
    assert verifier.first_bad_offset == 10
    assert verifier.offset == 10_000
    assert verifier.hexdigest() == hashlib.sha256(stream).hexdigest()


def test_verifier_accepts_bytes_bytearray_and_memoryview() -> None:
    stream = pattern_bytes(SEED, 3000)
    verifier = PatternVerifier(SEED)
    verifier.feed(stream[:1000])
    verifier.feed(bytearray(stream[1000:2000]))
    verifier.feed(memoryview(stream)[2000:])
    assert verifier.ok and verifier.offset == 3000


def test_verifier_with_another_seed_rejects_the_stream() -> None:
    verifier = PatternVerifier(SEED + 1)
    verifier.feed(pattern_bytes(SEED, 4096))
    assert verifier.first_bad_offset is not None and verifier.first_bad_offset < 16


def test_verifier_without_digest_refuses_to_give_one() -> None:
    verifier = PatternVerifier(SEED, digest=False)
    verifier.feed(pattern_bytes(SEED, 10))
    assert verifier.ok
    with pytest.raises(RuntimeError):
        verifier.hexdigest()
