"""The API wire protocol: every op parses, every malformed request is an error value."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.api import protocol
from daemon.api.protocol import (
    Abort,
    Accept,
    BadRequest,
    Close,
    CloseListener,
    Connect,
    ConnectSplice,
    ErrorCode,
    Hello,
    Inline,
    IntendSplice,
    Keepalive,
    LineFramer,
    Listen,
    ListObjects,
    Shutdown,
    Splice,
    Stats,
    parse_request,
)


def req(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def bad(line: bytes) -> BadRequest:
    result = parse_request(line)
    assert isinstance(result, BadRequest), result
    return result


# -- every op, well-formed ---------------------------------------------------


def test_hello() -> None:
    assert parse_request(req(id=1, op="hello", version=1)) == Hello(1, 1)


def test_listen_with_default_backlog() -> None:
    got = parse_request(req(id=2, op="listen", addr=["192.0.2.1", 1080]))
    assert got == Listen(2, ("192.0.2.1", 1080), protocol.DEFAULT_BACKLOG)


def test_listen_port_zero_and_explicit_backlog() -> None:
    got = parse_request(req(id=2, op="listen", addr=["192.0.2.1", 0], backlog=5))
    assert got == Listen(2, ("192.0.2.1", 0), 5)


def test_accept() -> None:
    assert parse_request(req(id=3, op="accept", listener=7)) == Accept(3, 7)


def test_connect_defaults() -> None:
    got = parse_request(req(id=4, op="connect", remote=["203.0.113.2", 80]))
    assert got == Connect(4, ("203.0.113.2", 80), None, protocol.DEFAULT_CONNECT_TIMEOUT, None)


def test_connect_with_everything() -> None:
    line = req(
        id=4,
        op="connect",
        remote=["203.0.113.2", 80],
        local=["198.51.100.1", 0],
        timeout=2.5,
        conn=9,
    )
    assert parse_request(line) == Connect(4, ("203.0.113.2", 80), ("198.51.100.1", 0), 2.5, 9)


def test_connect_may_size_its_receive_buffering() -> None:
    got = parse_request(req(id=4, op="connect", remote=["203.0.113.2", 80], rcvbuf=65536))
    assert isinstance(got, Connect) and got.rcvbuf == 65536
    for bad in (4095, 16 << 20 | 1, "64k", True):
        parsed = parse_request(req(id=4, op="connect", remote=["203.0.113.2", 80], rcvbuf=bad))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ, bad


def test_bounded_splice_limits_tap_and_paired_intend() -> None:
    got = parse_request(req(id=5, op="splice", client=1, server=2, len=0, server_limit=7))
    assert isinstance(got, Splice) and got.limits == (7, 0) and not got.tap
    got = parse_request(
        req(id=5, op="splice", client=1, server=2, len=0, client_limit=3, tap="server")
    )
    assert isinstance(got, Splice) and got.limits == (0, 3) and got.tap
    plain = parse_request(req(id=5, op="splice", client=1, server=2, len=0))
    assert isinstance(plain, Splice) and plain.limits is None
    for bad in ({"server_limit": -1}, {"client_limit": 2**31}, {"tap": "client"}):
        parsed = parse_request(req(id=5, op="splice", client=1, server=2, len=0, **bad))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ, bad
    assert parse_request(req(id=6, op="intend_splice", conn=1, server=2)) == IntendSplice(6, 1, 2)
    same = parse_request(req(id=6, op="intend_splice", conn=1, server=1))
    assert isinstance(same, BadRequest) and same.code is ErrorCode.EBADREQ


def test_keepalive_takes_rfc_1122_defaults_and_turns_off_with_null() -> None:
    got = parse_request(req(id=7, op="keepalive", conn=3, idle=60))
    assert got == Keepalive(7, 3, (60.0, 75.0, 9))
    got = parse_request(req(id=7, op="keepalive", conn=3, idle=0.5, interval=0.2, count=2))
    assert got == Keepalive(7, 3, (0.5, 0.2, 2))
    assert parse_request(req(id=7, op="keepalive", conn=3, idle=None)) == Keepalive(7, 3, None)
    assert parse_request(req(id=7, op="keepalive", conn=3)) == Keepalive(7, 3, None)
    for bad in ({"idle": 0}, {"idle": -1}, {"idle": 1, "interval": 0}, {"idle": 1, "count": 0},
                {"idle": "1"}, {"idle": 1e9}):  # fmt: skip
        parsed = parse_request(req(id=7, op="keepalive", conn=3, **bad))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ, bad


def test_connect_ipv6_is_canonicalised() -> None:
    got = parse_request(req(id=4, op="connect", remote=["2001:DB8:0:0::1", 443], local=None))
    assert isinstance(got, Connect)
    assert got.remote == ("2001:db8::1", 443)


def test_close_conn_and_close_listener() -> None:
    assert parse_request(req(id=5, op="close", conn=1)) == Close(5, 1)
    assert parse_request(req(id=5, op="close", listener=1)) == CloseListener(5, 1)


def test_shutdown_stats_list() -> None:
    assert parse_request(req(id=6, op="shutdown", conn=3)) == Shutdown(6, 3)
    assert parse_request(req(id=7, op="stats")) == Stats(7, None)
    assert parse_request(req(id=7, op="stats", conn=3)) == Stats(7, 3)
    assert parse_request(req(id=8, op="list")) == ListObjects(8)


def test_part_two_splice_ops() -> None:
    assert parse_request(req(id=9, op="intend_splice", conn=1)) == IntendSplice(9, 1)
    assert parse_request(req(id=9, op="splice", client=1, server=2, len=0)) == Splice(9, 1, 2, 0)


def test_connect_splice_carries_client_remote_and_len() -> None:
    parsed = parse_request(
        req(id=3, op="connect_splice", client=7, remote=["203.0.113.2", 80], len=10, timeout=2)
    )
    assert parsed == ConnectSplice(3, 7, ("203.0.113.2", 80), None, 2.0, 10)
    for bad in (
        {"remote": ["203.0.113.2", 80], "len": 10},  # no client
        {"client": 7, "len": 10},  # no remote
        {"client": 7, "remote": ["203.0.113.2", 0], "len": 10},  # port 0
        {"client": 7, "remote": ["203.0.113.2", 80]},  # no len
        {"client": 7, "remote": ["203.0.113.2", 80], "len": -1},
    ):
        parsed = parse_request(req(id=3, op="connect_splice", **bad))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ, bad


def test_abort_names_one_conn() -> None:
    assert parse_request(req(id=4, op="abort", conn=9)) == Abort(4, 9)
    for wrong in ({}, {"conn": "9"}, {"conn": -1}):
        parsed = parse_request(req(id=4, op="abort", **wrong))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ, wrong


def test_connect_splice_may_carry_its_len_bytes_inline() -> None:
    base = {"id": 3, "op": "connect_splice", "client": 7, "remote": ["203.0.113.2", 80]}
    reply = b"\x05\x00\x00\x01" + bytes(6)
    data = base64.b64encode(reply).decode()
    parsed = parse_request(req(**base, data=data, local_at=4, release=True))
    assert parsed == ConnectSplice(
        3, 7, ("203.0.113.2", 80), None, 10.0, 10, Inline(reply, 4, True)
    )
    # len may be given too, and must then agree; local_at and release are optional.
    assert parse_request(req(**base, data=data, len=10)) == ConnectSplice(
        3, 7, ("203.0.113.2", 80), None, 10.0, 10, Inline(reply)
    )
    for wrong, field in (
        ({"data": data, "len": 9}, "len"),
        ({"data": "not base64!"}, "data"),
        ({"data": 5}, "data"),
        ({"data": data, "local_at": 5}, "local_at"),  # 5 + 6 > 10
        ({"data": data, "local_at": -1}, "local_at"),
        ({"data": base64.b64encode(b"short").decode(), "local_at": 0}, "local_at"),
        ({"data": data, "release": "yes"}, "release"),
        ({"len": 10, "release": True}, "release"),  # nothing to send, nothing to release after
        ({"len": 10, "local_at": 0}, "local_at"),
    ):
        parsed = parse_request(req(**base, **wrong))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ, wrong
        assert field in parsed.message, (wrong, parsed.message)


def test_splice_carries_the_unread_bytes_as_base64() -> None:
    parsed = parse_request(req(id=9, op="splice", client=1, server=2, len=10, unread="R0VUIC8="))
    assert parsed == Splice(9, 1, 2, 10, b"GET /")
    for bad in ("not base64!", 5):
        parsed = parse_request(req(id=9, op="splice", client=1, server=2, len=0, unread=bad))
        assert isinstance(parsed, BadRequest) and parsed.code is ErrorCode.EBADREQ
        assert "unread" in parsed.message


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert parse_request(req(id=1, op="list", admin=True)) == ListObjects(1)


def test_trailing_newline_is_accepted() -> None:
    assert parse_request(req(id=1, op="list") + b"\n") == ListObjects(1)


def test_every_op_has_a_parser() -> None:
    assert set(protocol.OPS) == {
        "hello",
        "listen",
        "accept",
        "connect",
        "close",
        "abort",
        "keepalive",
        "shutdown",
        "stats",
        "list",
        "intend_splice",
        "splice",
        "connect_splice",
        "splice_sockets",
    }


# -- malformed envelopes: the id is unknown, so it is null in the reply -------


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"{",
        b"",
        b'"a string"',
        b"[1, 2]",
        b"\xff\xfe",
        b'{"id": NaN, "op": "list"}',
        b'{"op": "list"}',
        b'{"id": "1", "op": "list"}',
        b'{"id": true, "op": "list"}',
        b'{"id": -1, "op": "list"}',
        b'{"id": 1.0, "op": "list"}',
        b'{"id": 9223372036854775808, "op": "list"}',
        b"[" * 100_000,
    ],
)
def test_unreadable_request_is_ebadreq_with_null_id(line: bytes) -> None:
    result = bad(line)
    assert result.id is None
    assert result.code is ErrorCode.EBADREQ


def test_missing_op_keeps_the_id() -> None:
    assert bad(req(id=4)) == BadRequest(4, ErrorCode.EBADREQ, "'op' must be a string")


def test_unknown_op_is_eunknownop() -> None:
    result = bad(req(id=4, op="frobnicate"))
    assert (result.id, result.code) == (4, ErrorCode.EUNKNOWNOP)


# -- malformed arguments: the id is known -------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "hello"},
        {"op": "hello", "version": 0},
        {"op": "hello", "version": "1"},
        {"op": "listen"},
        {"op": "listen", "addr": "192.0.2.1:80"},
        {"op": "listen", "addr": ["192.0.2.1"]},
        {"op": "listen", "addr": ["192.0.2.1", 80, 1]},
        {"op": "listen", "addr": ["192.0.2.1", "80"]},
        {"op": "listen", "addr": ["192.0.2.1", 65536]},
        {"op": "listen", "addr": ["192.0.2.1", -1]},
        {"op": "listen", "addr": ["192.0.2.1", True]},
        {"op": "listen", "addr": ["example.com", 80]},
        {"op": "listen", "addr": ["192.0.2.256", 80]},
        {"op": "listen", "addr": ["fe80::1%eth0", 80]},
        {"op": "listen", "addr": [None, 80]},
        {"op": "listen", "addr": ["192.0.2.1", 80], "backlog": 0},
        {"op": "listen", "addr": ["192.0.2.1", 80], "backlog": 1.5},
        {"op": "accept"},
        {"op": "accept", "listener": "1"},
        {"op": "accept", "listener": -3},
        {"op": "connect"},
        {"op": "connect", "remote": ["203.0.113.2", 0]},
        {"op": "connect", "remote": ["203.0.113.2", 80], "local": ["x", 1]},
        {"op": "connect", "remote": ["203.0.113.2", 80], "timeout": 0},
        {"op": "connect", "remote": ["203.0.113.2", 80], "timeout": -1},
        {"op": "connect", "remote": ["203.0.113.2", 80], "timeout": "5"},
        {"op": "connect", "remote": ["203.0.113.2", 80], "timeout": True},
        {"op": "connect", "remote": ["203.0.113.2", 80], "timeout": 1e9},
        {"op": "connect", "remote": ["203.0.113.2", 80], "conn": "2"},
        {"op": "close"},
        {"op": "close", "conn": 1, "listener": 2},
        {"op": "close", "conn": "1"},
        {"op": "shutdown"},
        {"op": "stats", "conn": [1]},
        {"op": "intend_splice"},
        {"op": "splice", "client": 1, "server": 2},
        {"op": "splice", "client": 1, "server": 1, "len": 0},
        {"op": "splice", "client": 1, "server": 2, "len": -1},
        {"op": "splice", "client": 1, "server": 2, "len": 2**31},
        {"op": "splice", "server": 2, "len": 0},
    ],
)
def test_bad_arguments_are_ebadreq_with_the_request_id(fields: dict[str, object]) -> None:
    result = bad(req(id=42, **fields))
    assert (result.id, result.code) == (42, ErrorCode.EBADREQ)
    assert str(fields["op"]) in result.message


@given(st.binary(max_size=200))
def test_parse_request_never_raises(line: bytes) -> None:
    parse_request(line)


@given(st.dictionaries(st.sampled_from(["id", "op", "addr", "conn", "len"]), st.from_type(object)))
def test_parse_request_never_raises_on_odd_json(fields: dict[str, object]) -> None:
    try:
        line = json.dumps(fields).encode()
    except (TypeError, ValueError):
        return
    parse_request(line)


# -- encoders -------------------------------------------------------------------


def test_reply_is_one_compact_line() -> None:
    line = protocol.encode_reply(3, {"conn": 4, "peer": ["192.0.2.9", 5000]}, fd=True)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "id": 3,
        "ok": True,
        "conn": 4,
        "peer": ["192.0.2.9", 5000],
        "fd": True,
    }


def test_result_fields_cannot_forge_the_envelope() -> None:
    line = protocol.encode_reply(3, {"id": 99, "ok": False, "fd": True})
    assert json.loads(line) == {"id": 3, "ok": True}


def test_error_and_event_encoding() -> None:
    err = json.loads(protocol.encode_error(None, ErrorCode.EBADREQ, "bad"))
    assert err == {"id": None, "ok": False, "error": "EBADREQ", "message": "bad"}
    assert json.loads(protocol.encode_event("reset", {"conn": 5})) == {"event": "reset", "conn": 5}


def test_non_ascii_text_is_escaped() -> None:
    line = protocol.encode_error(1, ErrorCode.EINTERNAL, "kaputt \u00fc")
    assert line.isascii()
    assert json.loads(line)["message"] == "kaputt \u00fc"


# -- framing ------------------------------------------------------------------------


def test_framer_splits_lines_and_keeps_the_tail() -> None:
    framer = LineFramer()
    assert framer.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert framer.pending == 4
    assert framer.feed(b":2}\n\n") == [b'{"b":2}', b""]
    assert framer.pending == 0


def test_framer_byte_by_byte_equals_all_at_once() -> None:
    stream = b"".join(req(id=i, op="list") + b"\n" for i in range(20))
    framer = LineFramer()
    lines = [line for i in range(len(stream)) for line in framer.feed(stream[i : i + 1])]
    assert lines == LineFramer().feed(stream)
    assert [parse_request(line) for line in lines] == [ListObjects(i) for i in range(20)]


@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=10), st.data()
)
def test_framer_is_independent_of_chunking(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    framer = LineFramer(limit=64)
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += framer.feed(stream[start:end])
    assert got == lines


def test_line_of_exactly_the_limit_passes() -> None:
    framer = LineFramer(limit=10)
    assert framer.feed(b"123456789\n") == [b"123456789"]
    assert not framer.overflowed


def test_line_one_over_the_limit_overflows_even_before_its_newline() -> None:
    framer = LineFramer(limit=10)
    assert framer.feed(b"ok\n1234567890") == [b"ok"]
    assert framer.overflowed
    assert framer.feed(b"\nmore\n") == []  # no resynchronisation inside a stream


def test_overflow_across_chunks() -> None:
    framer = LineFramer(limit=10)
    assert framer.feed(b"12345") == []
    assert framer.feed(b"67890") == []
    assert framer.overflowed


def test_default_limit_is_64_kib() -> None:
    framer = LineFramer()
    assert framer.feed(b"x" * (64 * 1024 - 1) + b"\n") != []
    assert framer.feed(b"x" * (64 * 1024)) == [] and framer.overflowed
