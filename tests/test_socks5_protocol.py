"""SOCKS5 server protocol (RFC 1928, RFC 1929) without I/O: golden bytes in, values out."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from proxies.socks5_protocol import (
    NEED_MORE,
    AddressType,
    AuthStatus,
    Command,
    Connect,
    Credentials,
    Greeting,
    Method,
    Negotiation,
    ProtocolError,
    Reject,
    Reply,
    Request,
    SendToClient,
    Stage,
    build_auth_reply,
    build_method_selection,
    build_reply,
    parse_auth,
    parse_greeting,
    parse_request,
    reply_for_connect_error,
    reply_for_errno,
    select_method,
)

IPV4_REQUEST = b"\x05\x01\x00\x01" + bytes([192, 0, 2, 7]) + struct.pack("!H", 80)
IPV6_REQUEST = b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x01\xbb"
DOMAIN_REQUEST = b"\x05\x01\x00\x03\x0bexample.org" + struct.pack("!H", 8080)
AUTH_MESSAGE = b"\x01\x05alice\x06s3cret"


def every_proper_prefix(message: bytes) -> list[bytes]:
    return [message[:n] for n in range(len(message))]


# --- greeting (RFC 1928 s.3) ---


def test_greeting_parses_methods_and_consumed_length() -> None:
    assert parse_greeting(b"\x05\x02\x00\x02extra") == Greeting(methods=(0, 2), consumed=4)


def test_greeting_with_zero_methods_is_valid_and_empty() -> None:
    assert parse_greeting(b"\x05\x00") == Greeting(methods=(), consumed=2)


@pytest.mark.parametrize("prefix", every_proper_prefix(b"\x05\x03\x00\x01\x02"))
def test_greeting_needs_more_on_every_proper_prefix(prefix: bytes) -> None:
    assert parse_greeting(prefix) is NEED_MORE


@pytest.mark.parametrize("first", [b"\x04", b"G", b"\x00"])
def test_greeting_with_wrong_version_is_error_without_reply(first: bytes) -> None:
    result = parse_greeting(first + b"\x01\x00")
    assert isinstance(result, ProtocolError)
    assert result.reply is None


def test_no_auth_selected_when_offered_and_not_required() -> None:
    assert select_method((0x02, 0x00), auth_required=False) is Method.NO_AUTH


def test_no_auth_refused_when_credentials_are_required() -> None:
    assert select_method((0x00,), auth_required=True) is Method.NO_ACCEPTABLE
    assert select_method((0x00, 0x02), auth_required=True) is Method.USERNAME_PASSWORD


def test_only_gssapi_offered_is_not_acceptable() -> None:
    assert select_method((0x01,), auth_required=False) is Method.NO_ACCEPTABLE


def test_method_selection_bytes() -> None:
    assert build_method_selection(Method.NO_AUTH) == b"\x05\x00"
    assert build_method_selection(Method.NO_ACCEPTABLE) == b"\x05\xff"


# --- username/password (RFC 1929 s.2) ---


def test_auth_parses_username_and_password() -> None:
    parsed = parse_auth(AUTH_MESSAGE + b"next")
    assert parsed == Credentials(b"alice", b"s3cret", consumed=len(AUTH_MESSAGE))


@pytest.mark.parametrize("prefix", every_proper_prefix(AUTH_MESSAGE))
def test_auth_needs_more_on_every_proper_prefix(prefix: bytes) -> None:
    assert parse_auth(prefix) is NEED_MORE


def test_auth_with_wrong_subnegotiation_version_is_error() -> None:
    result = parse_auth(b"\x05\x05alice\x06s3cret")
    assert isinstance(result, ProtocolError)


def test_auth_with_empty_fields_parses() -> None:
    assert parse_auth(b"\x01\x00\x00") == Credentials(b"", b"", consumed=3)


def test_credentials_match_only_when_both_fields_equal() -> None:
    configured = Credentials(b"alice", b"s3cret")
    assert configured.matches(Credentials(b"alice", b"s3cret", consumed=15))
    assert not configured.matches(Credentials(b"alice", b"s3creT"))
    assert not configured.matches(Credentials(b"alicE", b"s3cret"))


def test_auth_reply_bytes() -> None:
    assert build_auth_reply(AuthStatus.SUCCESS) == b"\x01\x00"
    assert build_auth_reply(AuthStatus.FAILURE) == b"\x01\x01"


# --- request (RFC 1928 s.4, s.5) ---


def test_request_ipv4() -> None:
    assert parse_request(IPV4_REQUEST) == Request(
        Command.CONNECT, AddressType.IPV4, "192.0.2.7", 80, consumed=10
    )


def test_request_ipv6() -> None:
    assert parse_request(IPV6_REQUEST) == Request(
        Command.CONNECT, AddressType.IPV6, "2001:db8::1", 443, consumed=22
    )


def test_request_domain_name() -> None:
    assert parse_request(DOMAIN_REQUEST + b"GET /") == Request(
        Command.CONNECT, AddressType.DOMAINNAME, "example.org", 8080, consumed=18
    )


@pytest.mark.parametrize(
    "prefix",
    every_proper_prefix(IPV4_REQUEST)
    + every_proper_prefix(IPV6_REQUEST)
    + every_proper_prefix(DOMAIN_REQUEST),
)
def test_request_needs_more_on_every_proper_prefix(prefix: bytes) -> None:
    assert parse_request(prefix) is NEED_MORE


def test_request_with_wrong_version_gets_general_failure() -> None:
    result = parse_request(b"\x04" + IPV4_REQUEST[1:])
    assert result == ProtocolError("request version 0x04", Reply.GENERAL_FAILURE)


@pytest.mark.parametrize("command", [Command.BIND, Command.UDP_ASSOCIATE, 0x09])
def test_request_other_than_connect_gets_command_not_supported(command: int) -> None:
    result = parse_request(bytes([5, command]) + IPV4_REQUEST[2:])
    assert isinstance(result, ProtocolError)
    assert result.reply is Reply.COMMAND_NOT_SUPPORTED


def test_unsupported_command_waits_for_the_whole_request() -> None:
    # So the shell can read it all before closing (no RST over the reply).
    bind = b"\x05\x02" + IPV4_REQUEST[2:]
    assert parse_request(bind[:-1]) is NEED_MORE


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_unknown_address_type_gets_address_type_not_supported(atyp: int) -> None:
    result = parse_request(bytes([5, 1, 0, atyp]))
    assert isinstance(result, ProtocolError)
    assert result.reply is Reply.ADDRESS_TYPE_NOT_SUPPORTED


def test_reserved_byte_is_ignored() -> None:
    result = parse_request(IPV4_REQUEST[:2] + b"\x7f" + IPV4_REQUEST[3:])
    assert isinstance(result, Request)


@pytest.mark.parametrize("name", [b"", "bücher.example".encode()])
def test_unusable_domain_name_gets_host_unreachable(name: bytes) -> None:
    result = parse_request(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")
    assert isinstance(result, ProtocolError)
    assert result.reply is Reply.HOST_UNREACHABLE


# --- replies (RFC 1928 s.6) ---


def test_success_reply_carries_ipv4_bound_address() -> None:
    assert build_reply(Reply.SUCCEEDED, ("203.0.113.1", 40000)) == (
        b"\x05\x00\x00\x01\xcb\x00\x71\x01" + struct.pack("!H", 40000)
    )


def test_success_reply_carries_ipv6_bound_address() -> None:
    packed = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    assert build_reply(Reply.SUCCEEDED, ("2001:db8::2%eth0", 1)) == (
        b"\x05\x00\x00\x04" + packed + b"\x00\x01"
    )


def test_failure_reply_has_zero_address() -> None:
    assert build_reply(Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"


# --- connect errors -> reply codes ---


@pytest.mark.parametrize(
    ("number", "reply"),
    [
        (errno.ECONNREFUSED, 0x05),
        (errno.EHOSTUNREACH, 0x04),
        (errno.ENETUNREACH, 0x03),
        (errno.ETIMEDOUT, 0x06),
        (errno.EACCES, 0x01),
        (None, 0x01),
    ],
)
def test_errno_maps_to_reply_code(number: int | None, reply: int) -> None:
    assert reply_for_errno(number) == reply
    assert reply_for_connect_error(OSError(number, "x")) == reply


def test_timeout_exception_maps_to_ttl_expired() -> None:
    assert reply_for_connect_error(TimeoutError("timed out")) is Reply.TTL_EXPIRED


def test_name_resolution_failure_maps_to_host_unreachable() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert reply_for_connect_error(error) is Reply.HOST_UNREACHABLE


def test_non_os_error_maps_to_general_failure() -> None:
    assert reply_for_connect_error(ValueError("bug")) is Reply.GENERAL_FAILURE


# --- negotiation: the three messages in order ---


def test_negotiation_without_auth_byte_by_byte() -> None:
    negotiation = Negotiation()
    events = []
    for byte in b"\x05\x01\x00" + IPV4_REQUEST:
        events += negotiation.receive(bytes([byte]))
    assert events[0] == SendToClient(b"\x05\x00")
    assert isinstance(events[1], Connect)
    assert events[1].request.host == "192.0.2.7"
    assert events[1].early_data == b""
    assert negotiation.stage is Stage.DONE


def test_negotiation_pipelined_greeting_request_and_early_data() -> None:
    events = Negotiation().receive(b"\x05\x01\x00" + DOMAIN_REQUEST + b"GET / HTTP/1.0\r\n")
    request = parse_request(DOMAIN_REQUEST)
    assert isinstance(request, Request)
    assert events == [SendToClient(b"\x05\x00"), Connect(request, b"GET / HTTP/1.0\r\n")]


def test_negotiation_with_auth_success() -> None:
    negotiation = Negotiation(Credentials(b"alice", b"s3cret"))
    assert negotiation.receive(b"\x05\x02\x00\x02") == [SendToClient(b"\x05\x02")]
    assert negotiation.receive(AUTH_MESSAGE) == [SendToClient(b"\x01\x00")]
    (event,) = negotiation.receive(IPV6_REQUEST)
    assert isinstance(event, Connect)


def test_negotiation_with_wrong_password_sends_failure_and_closes() -> None:
    negotiation = Negotiation(Credentials(b"alice", b"right"))
    events = negotiation.receive(b"\x05\x01\x02" + b"\x01\x05alice\x05wrong" + IPV4_REQUEST)
    assert events == [SendToClient(b"\x05\x02"), Reject(b"\x01\x01", "bad credentials")]
    assert negotiation.stage is Stage.DONE


def test_negotiation_refuses_no_auth_when_auth_required() -> None:
    events = Negotiation(Credentials(b"a", b"b")).receive(b"\x05\x01\x00")
    assert events == [Reject(b"\x05\xff", "no acceptable method")]


def test_negotiation_bad_greeting_closes_without_reply() -> None:
    (event,) = Negotiation().receive(b"\x04\x01\x00\x50")
    assert isinstance(event, Reject)
    assert event.data == b""


def test_negotiation_bad_auth_version_closes_without_reply() -> None:
    negotiation = Negotiation(Credentials(b"a", b"b"))
    events = negotiation.receive(b"\x05\x01\x02\x02\x01a\x01b")
    assert isinstance(events[-1], Reject)
    assert events[-1].data == b""


def test_negotiation_bind_gets_reply_0x07() -> None:
    events = Negotiation().receive(b"\x05\x01\x00" + b"\x05\x02" + IPV4_REQUEST[2:])
    assert events[-1] == Reject(build_reply(Reply.COMMAND_NOT_SUPPORTED), "command 0x02")


def test_negotiation_refuses_bytes_after_it_is_done() -> None:
    negotiation = Negotiation()
    negotiation.receive(b"\x05\x01\x00" + IPV4_REQUEST)
    with pytest.raises(RuntimeError):
        negotiation.receive(b"more")
