"""The thesis's three-host topology (Fig. 6.1) as plain data.

    client ===[wire cp]=== proxy ===[wire ps]=== server
  192.0.2.2          192.0.2.1 | 203.0.113.1         203.0.113.2
  2001:db8:c::2   2001:db8:c::1 | 2001:db8:5::1     2001:db8:5::2

Every link is dual-stack: an IPv4 /24 and an IPv6 /64 of the documentation
prefixes (RFC 5737, RFC 3849), and the proxy forwards both families.

Every link runs through a *wire*: a namespace holding a Linux bridge with
two veth ports.  The wire is where link shaping happens (delay, loss, rate,
...), mid-path, so neither sender's qdisc or socket is touched.  (tc netem
would be the usual tool, but this kernel is built without sch_netem; see
docs/testbed.md and testbed/shaping.py.)

The proxy forwards between its links: it is the thesis's "router" baseline.
The splice daemon's TUN (198.51.100.0/24) is routed from the proxy too, and
its addresses are deliberately not local to the proxy namespace (DESIGN.md).

Names: every namespace is ``<prefix>-<role>``; every host-side interface is
``<prefix>-<xy>`` (x the host, y the peer), so cleanup can remove exactly what
a testbed made and several testbeds can live side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_PREFIX = "tsplice"
# IFNAMSIZ is 16 including the NUL: "<prefix>-tun" must fit in 15 characters.
MAX_PREFIX_LEN = 11
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*$")

# Addresses: documentation ranges only (RFC 5737).
CLIENT_NET = "192.0.2.0/24"
SERVER_NET = "203.0.113.0/24"
SPLICE_NET = "198.51.100.0/24"  # routed into the splice daemon's TUN
SPLICE_SERVICE = "198.51.100.1"  # where proxies attached to the daemon listen
SPLICE_SOURCE = "198.51.100.2"  # source address of the daemon's server-side connections
# IPv6 (RFC 3849): one /64 per link, beside the IPv4 /24.
CLIENT_NET6 = "2001:db8:c::/64"
SERVER_NET6 = "2001:db8:5::/64"
SPLICE_NET6 = "2001:db8:d::/64"  # routed into the TUN too: the daemon's IPv6 endpoint
SPLICE_SERVICE6 = "2001:db8:d::1"
SPLICE_SOURCE6 = "2001:db8:d::2"


@dataclass(frozen=True, slots=True)
class HostSpec:
    role: str  # "client", "proxy", "server"
    forwarding: bool = False


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A link between two hosts, with its two addresses in each family (a /24, a /64)."""

    name: str  # "client-proxy"
    short: str  # "cp": names the wire namespace and the interfaces
    a: str  # host role on side A
    b: str  # host role on side B
    a_addr: str
    b_addr: str
    prefixlen: int = 24
    a_addr6: str | None = None
    b_addr6: str | None = None
    prefixlen6: int = 64


@dataclass(frozen=True, slots=True)
class Topology:
    hosts: tuple[HostSpec, ...]
    links: tuple[LinkSpec, ...]
    # Default gateways: host role -> gateway address, per family.
    gateways: dict[str, str] = field(default_factory=dict)
    gateways6: dict[str, str] = field(default_factory=dict)

    def link(self, name: str) -> LinkSpec:
        for spec in self.links:
            if name in (spec.name, spec.short):
                return spec
        names = ", ".join(s.name for s in self.links)
        raise KeyError(f"unknown link {name!r} (links: {names})")

    def host(self, role: str) -> HostSpec:
        for spec in self.hosts:
            if spec.role == role:
                return spec
        roles = ", ".join(h.role for h in self.hosts)
        raise KeyError(f"unknown host {role!r} (hosts: {roles})")


THESIS = Topology(
    hosts=(HostSpec("client"), HostSpec("proxy", forwarding=True), HostSpec("server")),
    links=(
        LinkSpec(
            "client-proxy",
            "cp",
            "client",
            "proxy",
            "192.0.2.2",
            "192.0.2.1",
            a_addr6="2001:db8:c::2",
            b_addr6="2001:db8:c::1",
        ),
        LinkSpec(
            "proxy-server",
            "ps",
            "proxy",
            "server",
            "203.0.113.1",
            "203.0.113.2",
            a_addr6="2001:db8:5::1",
            b_addr6="2001:db8:5::2",
        ),
    ),
    gateways={"client": "192.0.2.1", "server": "203.0.113.1"},
    gateways6={"client": "2001:db8:c::1", "server": "2001:db8:5::1"},
)


def check_prefix(prefix: str) -> str:
    """Validate a name prefix: short, lowercase, so derived names stay legal."""
    if not _PREFIX_RE.match(prefix) or len(prefix) > MAX_PREFIX_LEN:
        raise ValueError(
            f"bad prefix {prefix!r}: use 1-{MAX_PREFIX_LEN} lowercase letters/digits, "
            "starting with a letter"
        )
    return prefix


def ns_name(prefix: str, role: str) -> str:
    return f"{prefix}-{role}"


def tun_name(prefix: str) -> str:
    """The splice daemon's TUN in the proxy namespace."""
    return f"{prefix}-tun"


def wire_ns_name(prefix: str, link: LinkSpec) -> str:
    return f"{prefix}-wire-{link.short}"


def ifname(prefix: str, host: str, peer: str) -> str:
    """Host-side interface of the link from `host` toward `peer`: <prefix>-<h><p>."""
    return f"{prefix}-{host[0]}{peer[0]}"


# Inside a wire namespace the names are fixed (the namespace itself is prefixed).
WIRE_BRIDGE = "br0"
WIRE_PORT_A = "wa"  # toward the link's host A
WIRE_PORT_B = "wb"  # toward the link's host B
