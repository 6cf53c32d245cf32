"""RFC 6528 ISNs: clock-driven, keyed per 4-tuple, unpredictable across tuples."""

from __future__ import annotations

import pytest

from daemon.tcp.isn import IsnGenerator
from daemon.tcp.seq import seq_sub

A = (bytes([192, 0, 2, 1]), 40000)
B = (bytes([203, 0, 113, 2]), 80)
SECRET = bytes(range(16))


def test_isn_for_one_four_tuple_advances_with_the_4_microsecond_clock() -> None:
    g = IsnGenerator(SECRET)
    assert seq_sub(g.isn(A, B, 1.0), g.isn(A, B, 0.0)) == 250_000
    assert seq_sub(g.isn(A, B, 0.000004), g.isn(A, B, 0.0)) == 1


def test_isn_differs_between_four_tuples_at_the_same_time() -> None:
    g = IsnGenerator(SECRET)
    other_port = (A[0], A[1] + 1)
    isns = {g.isn(A, B, 5.0), g.isn(other_port, B, 5.0), g.isn(B, A, 5.0)}
    assert len(isns) == 3


def test_isn_depends_on_the_secret() -> None:
    assert IsnGenerator(SECRET).isn(A, B, 0.0) != IsnGenerator(bytes(16)).isn(A, B, 0.0)


def test_default_secret_is_random_per_generator() -> None:
    assert IsnGenerator().isn(A, B, 0.0) != IsnGenerator().isn(A, B, 0.0)


def test_isn_secret_shorter_than_128_bits_is_refused() -> None:
    with pytest.raises(ValueError):
        IsnGenerator(b"short")


def test_isn_wraps_modulo_2_32() -> None:
    g = IsnGenerator(SECRET)
    assert 0 <= g.isn(A, B, 1e6) <= 0xFFFFFFFF


def test_timestamp_offset_is_the_same_for_every_incarnation_of_an_address_pair() -> None:
    # RFC 7323 5.3: a new connection on a 4-tuple a peer holds in TIME-WAIT
    # must carry newer TSvals, so the offset may not be random per connection.
    from daemon.tcp.config import TcpConfig
    from daemon.tcp.connection import TcpConnection

    a, b, c = bytes([198, 51, 100, 2]), bytes([203, 0, 113, 2]), bytes([203, 0, 113, 3])
    first = TcpConnection.connect(TcpConfig(), (a, 40000), (b, 80), 1, 0.0)
    again = TcpConnection.connect(TcpConfig(), (a, 40000), (b, 80), 2, 10.0)
    other = TcpConnection.connect(TcpConfig(), (a, 40000), (c, 80), 3, 10.0)
    assert first.ts_offset == again.ts_offset
    assert other.ts_offset != first.ts_offset
