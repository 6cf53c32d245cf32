"""Out-of-order queue (RFC 9293 3.10.7.4) and SACK blocks (RFC 2018 4)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.tcp.reassembly import ReassemblyQueue
from daemon.tcp.seq import MASK

NXT = MASK - 100  # so the tests cross the 2**32 wrap


def s(off: int) -> int:
    return (NXT + off) & MASK


def test_segment_beyond_a_hole_is_held_until_the_hole_fills() -> None:
    q = ReassemblyQueue()
    assert q.insert(NXT, s(10), b"klmno", 1000) == 5
    assert q.pop_ready(NXT) is None
    # The application layer appends 10 in-order bytes, then asks again.
    assert q.pop_ready(s(10)) == bytearray(b"klmno")
    assert not q and q.bytes_queued == 0


def test_overlapping_segments_keep_the_bytes_already_queued() -> None:
    q = ReassemblyQueue()
    q.insert(NXT, s(10), b"AAAAA", 1000)
    assert q.insert(NXT, s(8), b"bbbbbbbbbb", 1000) == 5  # 8..18: 2 before, 3 after
    assert q.pop_ready(s(8)) == bytearray(b"bbAAAAAbbb")


def test_a_segment_bridging_two_blocks_merges_them() -> None:
    q = ReassemblyQueue()
    q.insert(NXT, s(10), b"AA", 1000)
    q.insert(NXT, s(20), b"CC", 1000)
    assert q.insert(NXT, s(11), b"xBBBBBBBBBy", 1000) == 8
    assert q.sack_blocks(4) == ((s(10), s(22)),)
    assert q.pop_ready(s(10)) == bytearray(b"AABBBBBBBBCC")


def test_data_outside_the_window_is_trimmed() -> None:
    q = ReassemblyQueue()
    assert q.insert(NXT, s(5), b"0123456789", 10) == 5
    assert q.sack_blocks(4) == ((s(5), s(10)),)
    assert q.insert(NXT, s(20), b"zz", 10) == 0
    assert q.insert(NXT, s(-5), b"old", 10) == 0


def test_in_order_data_that_covers_part_of_a_block_trims_it_on_pop() -> None:
    q = ReassemblyQueue()
    q.insert(NXT, s(10), b"0123456789", 1000)
    assert q.pop_ready(s(13)) == bytearray(b"3456789")
    q.insert(NXT, s(30), b"xy", 1000)
    assert q.pop_ready(s(40)) is None  # wholly covered: discarded
    assert not q


def test_sack_blocks_list_the_most_recently_changed_block_first() -> None:
    q = ReassemblyQueue()
    q.insert(NXT, s(10), b"a", 1000)
    q.insert(NXT, s(20), b"b", 1000)
    q.insert(NXT, s(30), b"c", 1000)
    q.insert(NXT, s(11), b"a", 1000)  # touches the first block again
    assert q.sack_blocks(4) == ((s(10), s(12)), (s(30), s(31)), (s(20), s(21)))
    assert q.sack_blocks(2) == ((s(10), s(12)), (s(30), s(31)))


@settings(max_examples=200)
@given(st.data())
def test_any_arrival_order_with_overlaps_reassembles_the_stream(data: st.DataObject) -> None:
    stream = bytes(range(256)) * 4
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=30)))
    bounds = [0, *cuts, len(stream)]
    pieces = list(itertools.pairwise(bounds))
    # Some duplicates and overlaps, then a random order.
    extra = data.draw(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 40)), max_size=10))
    pieces += [(a, min(a + n, len(stream))) for a, n in extra]
    order = data.draw(st.permutations(pieces))
    q = ReassemblyQueue()
    nxt = NXT
    out = bytearray()
    for a, b in order:
        seq = (NXT + a) & MASK
        q.insert(nxt, seq, stream[a:b], len(stream) - len(out))
        ready = q.pop_ready(nxt)
        while ready is not None:
            out += ready
            nxt = (nxt + len(ready)) & MASK
            ready = q.pop_ready(nxt)
    assert bytes(out) == stream
    assert not q
