"""Bounded send/receive buffers: backpressure and sequence-indexed slices."""

from __future__ import annotations

from daemon.tcp.buffers import RecvBuffer, SendBuffer


def test_send_buffer_takes_only_what_fits() -> None:
    b = SendBuffer(10, seq=0xFFFFFFFE)
    assert b.write(b"0123456") == 7
    assert b.write(b"789abc") == 3
    assert b.write(b"x") == 0
    assert b.space() == 0 and len(b) == 10


def test_send_buffer_slices_by_offset_and_drops_acked_bytes_from_the_front() -> None:
    b = SendBuffer(100, seq=0xFFFFFFFE)
    b.write(b"0123456789")
    assert b.peek(3, 4) == b"3456"
    b.consume(4)
    assert b.seq == 2  # wrapped
    assert b.peek(0, 3) == b"456"
    assert b.space() == 94


def test_send_buffer_peek_is_a_copy_that_survives_later_changes() -> None:
    b = SendBuffer(100, seq=0)
    b.write(b"abcdef")
    p = b.peek(0, 3)
    b.consume(6)
    b.write(b"zzzzzz")
    assert p == b"abc"


def test_recv_buffer_reads_in_order_and_frees_space() -> None:
    r = RecvBuffer(8)
    r.append(b"hello")
    assert r.free() == 3
    assert r.read(2) == b"he"
    assert r.read(100) == b"llo"
    assert r.free() == 8 and len(r) == 0
