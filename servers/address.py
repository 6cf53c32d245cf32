"""``HOST:PORT`` command-line addresses, IPv6 literals in brackets as in RFC 3986 section 3.2.2."""

from __future__ import annotations

import ipaddress
import socket


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``"192.0.2.1:80"``, ``"[2001:db8::1]:80"`` or ``"example.org:80"`` into (host, port).

    Raises ValueError with a message naming the bad part.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise ValueError(f"bad address {text!r}: empty host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad address {text!r}: port must be 0-65535")
    return host, int(port_text)


def format_host_port(host: str, port: int) -> str:
    """The inverse of :func:`parse_host_port`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, AF_INET otherwise (names resolve to IPv4 here)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET
