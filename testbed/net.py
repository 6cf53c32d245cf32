"""The testbed: build, inspect and remove the namespaces of the topology.

Mininet's shape, our names:

    with Testbed(prefix="tb1") as tb:          # up() ... down()
        tb.host("client").cmd(["curl", "-s", "http://203.0.113.2/bytes/1024"])
        tb.link("client-proxy").shape("delay=10ms loss=1%")

`up()` is idempotent and repairs what is missing; `down()` removes exactly
the namespaces named ``<prefix>-...`` of this topology, the processes the
testbed started (checked by PID *and* start time) and its run directory --
also after a crash, since everything it needs is derived from the prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import NetNS

from testbed import netns, process
from testbed.topology import (
    DEFAULT_PREFIX,
    SPLICE_NET,
    SPLICE_NET6,
    SPLICE_SERVICE,
    SPLICE_SERVICE6,
    SPLICE_SOURCE,
    SPLICE_SOURCE6,
    THESIS,
    WIRE_BRIDGE,
    WIRE_PORT_A,
    WIRE_PORT_B,
    LinkSpec,
    Topology,
    check_prefix,
    ifname,
    ns_name,
    tun_name,
    wire_ns_name,
)

RUN_ROOT = Path("/run/tcp-splice")

# TCP knobs the splice tests vary per host (thesis 5.4: every option combination).
TCP_SYSCTLS = {
    "timestamps": "net.ipv4.tcp_timestamps",
    "sack": "net.ipv4.tcp_sack",
    "window_scaling": "net.ipv4.tcp_window_scaling",
    "ecn": "net.ipv4.tcp_ecn",
}

ORIGIN_PORT = 80
SINK_PORT = 9000
# The testbed's names (RFC 6761 reserves .test): the server host with both
# addresses, and one name per family, in every host's /etc/hosts view
# (testbed/netns.py), so proxies resolve names as they would in real use
# (curl --socks5-hostname, an HTTP request for http://origin.test/).
SERVER_NAME, SERVER_NAME4, SERVER_NAME6 = "origin.test", "origin4.test", "origin6.test"
SOCKS_PORT = 1080
KERNEL_SOCKS_PORT = 1081
ENDPOINT_SOCKS_PORT = 1082
HTTP_PROXY_PORT = 3128
HTTP11_PROXY_PORT = 3129


class TestbedError(RuntimeError):
    """Bad use of the testbed (not root, unknown name, ...), with a clear message."""

    __test__ = False  # not a pytest test class, despite the name


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise TestbedError(
            f"testbed {action} needs root (it creates network namespaces): run it with sudo"
        )


@dataclass
class Host:
    """A host of the topology: a network namespace you can run things in."""

    role: str
    ns: str
    addrs: tuple[str, ...]
    addrs6: tuple[str, ...] = ()

    @property
    def addr(self) -> str:
        return self.addrs[0]

    @property
    def addr6(self) -> str:
        """The host's first IPv6 address (every link is dual-stack)."""
        return self.addrs6[0]

    def cmd(
        self, argv: Sequence[str] | str, *, check: bool = False, timeout: float | None = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in this host and wait for it (text output captured)."""
        args = shlex.split(argv) if isinstance(argv, str) else list(argv)
        return netns.run(self.ns, args, check=check, timeout=timeout)

    def popen(self, argv: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command in this host; the caller owns (and stops) the process."""
        args = shlex.split(argv) if isinstance(argv, str) else list(argv)
        return netns.popen(self.ns, args, **kwargs)

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read, or set and return, a sysctl of this host's namespace."""
        if value is not None:
            netns.write_sysctl(self.ns, key, value)
        return netns.read_sysctl(self.ns, key)


@dataclass
class Link:
    """A link of the topology, through its wire namespace."""

    spec: LinkSpec
    prefix: str
    run_dir: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def wire_ns(self) -> str:
        return wire_ns_name(self.prefix, self.spec)

    def endpoint(self, role: str) -> tuple[str, str]:
        """(namespace, interface) of the link's end in host `role`."""
        if role == self.spec.a:
            return ns_name(self.prefix, role), ifname(self.prefix, role, self.spec.b)
        if role == self.spec.b:
            return ns_name(self.prefix, role), ifname(self.prefix, role, self.spec.a)
        raise TestbedError(f"link {self.name} does not reach host {role!r}")

    def shape(self, shape: Any = None, **params: Any) -> None:
        """Impair the link mid-path: `shape("delay=10ms loss=1%")` or `shape(delay="10ms")`.

        Applies to both directions, like netem on both ends of a Mininet link.
        """
        from testbed.impair import LinkShape
        from testbed.shaping import shape_wire

        if isinstance(shape, LinkShape):
            spec = shape
        else:
            words = shlex.split(shape) if isinstance(shape, str) else list(shape or [])
            words += [f"{k}={v}" for k, v in params.items()]
            spec = LinkShape.parse(words)
        shape_wire(self.wire_ns, spec, self.run_dir)

    def clear(self) -> None:
        from testbed.shaping import clear_wire

        clear_wire(self.wire_ns, self.run_dir)

    def shape_status(self) -> tuple[Any, dict[str, Any]]:
        from testbed.shaping import wire_status

        shape, counters = wire_status(self.wire_ns, self.run_dir)
        return shape, counters

    def set_mtu(self, mtu: int) -> None:
        """Set the MTU of both ends and of the wire in between."""
        _set_link_mtu(self.prefix, self.spec, mtu)

    def capture(
        self, path: str | Path, *, side: str | None = None, snaplen: int = 0, bpf: str = ""
    ) -> Capture:
        """Start tcpdump on this link's end in host `side` (default: the proxy's end)."""
        role = side or ("proxy" if "proxy" in (self.spec.a, self.spec.b) else self.spec.a)
        ns, dev = self.endpoint(role)
        return Capture.start(ns, dev, Path(path), snaplen=snaplen, bpf=bpf)


@dataclass
class Capture:
    """A running tcpdump writing a pcap; `stop()` flushes and ends it."""

    proc: subprocess.Popen[bytes]
    path: Path
    stderr_path: Path

    @classmethod
    def start(cls, ns: str, dev: str, path: Path, *, snaplen: int = 0, bpf: str = "") -> Capture:
        # --immediate-mode: otherwise packets wait in the capture ring for a block
        # timeout and a stop right after the traffic loses them.
        argv = ["tcpdump", "-i", dev, "-w", str(path), "-U", "--immediate-mode", "-n", "-Z", "root"]
        argv += ["-s", str(snaplen)]
        argv += shlex.split(bpf)
        err = path.with_suffix(path.suffix + ".log")
        with open(err, "wb") as out:
            proc = netns.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + 10
        while "listening on" not in err.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise TestbedError(f"tcpdump on {ns}/{dev} failed: {err.read_text().strip()}")
            time.sleep(0.02)
        return cls(proc, path, err)

    def stop(self) -> Path:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _set_link_mtu(prefix: str, spec: LinkSpec, mtu: int) -> None:
    wire = wire_ns_name(prefix, spec)
    ends = [
        (ns_name(prefix, spec.a), ifname(prefix, spec.a, spec.b)),
        (ns_name(prefix, spec.b), ifname(prefix, spec.b, spec.a)),
        (wire, WIRE_PORT_A),
        (wire, WIRE_PORT_B),
    ]
    for ns, dev in ends:
        with NetNS(ns) as ipr:
            idx = _link_index(ipr, dev)
            if idx is None:
                raise TestbedError(f"interface {dev} missing in {ns}: run `testbed up` to repair")
            ipr.link("set", index=idx, mtu=mtu)
    # The bridge follows its ports' MTU unless set explicitly; set it too.
    with NetNS(wire) as ipr:
        idx = _link_index(ipr, WIRE_BRIDGE)
        if idx is not None:
            ipr.link("set", index=idx, mtu=mtu)


@dataclass
class Testbed:
    """The topology instantiated under one name prefix."""

    __test__ = False  # not a pytest test class, despite the name

    prefix: str = DEFAULT_PREFIX
    topology: Topology = THESIS
    mtu: Mapping[str, int] = field(default_factory=dict)  # link name -> MTU (default 1500)
    # host role -> {sysctl key or TCP_SYSCTLS alias: value}
    sysctls: Mapping[str, Mapping[str, str | int]] = field(default_factory=dict)
    services: bool = True
    msl: float = 30.0  # the splice daemon's MSL (TIME-WAIT = 2 MSL); tests shorten it
    fastpath: str = "auto"  # the daemon's kernel fast path for spliced flows: auto, on, off
    daemon_args: tuple[str, ...] = ()  # more options for `python -m daemon`
    origin_args: tuple[str, ...] = ()  # more options for `python -m servers.origin`
    # A command the daemon runs under, e.g. setpriv to bound its capabilities
    # (docs/operations.md): ("setpriv", "--bounding-set=-all,+net_admin,+bpf", "--").
    daemon_wrapper: tuple[str, ...] = ()
    run_root: Path = RUN_ROOT

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        for name in self.mtu:
            self.topology.link(name)
        for role in self.sysctls:
            self.topology.host(role)

    # -- names -------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.prefix

    def namespaces(self) -> list[str]:
        names = [ns_name(self.prefix, h.role) for h in self.topology.hosts]
        names += [wire_ns_name(self.prefix, link) for link in self.topology.links]
        return names

    def host(self, role: str) -> Host:
        try:
            self.topology.host(role)
        except KeyError as exc:
            raise TestbedError(str(exc.args[0])) from None
        links = [s for s in self.topology.links if role in (s.a, s.b)]
        addrs = [s.a_addr if s.a == role else s.b_addr for s in links]
        addrs6 = [s.a_addr6 if s.a == role else s.b_addr6 for s in links]
        return Host(role, ns_name(self.prefix, role), tuple(addrs), tuple(a for a in addrs6 if a))

    def link(self, name: str) -> Link:
        try:
            spec = self.topology.link(name)
        except KeyError as exc:
            raise TestbedError(str(exc.args[0])) from None
        return Link(spec, self.prefix, self.run_dir)

    @property
    def origin(self) -> tuple[str, int]:
        return (self.host("server").addr, ORIGIN_PORT)

    @property
    def sink(self) -> tuple[str, int]:
        return (self.host("server").addr, SINK_PORT)

    def hosts_file(self) -> str:
        """The /etc/hosts every host of the testbed sees: localhost and the testbed's names."""
        server = self.host("server")
        return (
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{server.addr}\t{SERVER_NAME} {SERVER_NAME4}\n"
            f"{server.addr6}\t{SERVER_NAME} {SERVER_NAME6}\n"
        )

    @property
    def origin6(self) -> tuple[str, int]:
        """The origin's HTTP service at its IPv6 address."""
        return (self.host("server").addr6, ORIGIN_PORT)

    @property
    def sink6(self) -> tuple[str, int]:
        return (self.host("server").addr6, SINK_PORT)

    @property
    def socks(self) -> tuple[str, int]:
        """The plain (copy-loop, kernel sockets) SOCKS5 proxy."""
        return (self.topology.gateways["client"], SOCKS_PORT)

    @property
    def socks6(self) -> tuple[str, int]:
        """The plain SOCKS5 proxy at the proxy's IPv6 address on the client link."""
        return (self.topology.gateways6["client"], SOCKS_PORT)

    @property
    def kernel_socks(self) -> tuple[str, int]:
        """SOCKS5 on kernel sockets that hands each pair to the daemon (splice_sockets)."""
        return (self.topology.gateways["client"], KERNEL_SOCKS_PORT)

    @property
    def kernel_socks6(self) -> tuple[str, int]:
        return (self.topology.gateways6["client"], KERNEL_SOCKS_PORT)

    @property
    def spliced_socks(self) -> tuple[str, int]:
        """The spliced SOCKS5 proxy (thesis Fig. 4.2): the daemon relays after the reply."""
        return (SPLICE_SERVICE, SOCKS_PORT)

    @property
    def endpoint_socks(self) -> tuple[str, int]:
        """SOCKS5 whose TCP connections the daemon terminates, copying (no splice)."""
        return (SPLICE_SERVICE, ENDPOINT_SOCKS_PORT)

    @property
    def spliced_socks6(self) -> tuple[str, int]:
        """The spliced SOCKS5 at the daemon's IPv6 address (the Python relay splices IPv6)."""
        return (SPLICE_SERVICE6, SOCKS_PORT)

    @property
    def endpoint_socks6(self) -> tuple[str, int]:
        """The endpoint SOCKS5 at the daemon's IPv6 address."""
        return (SPLICE_SERVICE6, ENDPOINT_SOCKS_PORT)

    @property
    def http_proxy(self) -> tuple[str, int]:
        """The spliced HTTP/1.0 proxy with a cache (thesis Fig. 4.3)."""
        return (SPLICE_SERVICE, HTTP_PROXY_PORT)

    @property
    def http11_proxy(self) -> tuple[str, int]:
        """The HTTP/1.1 proxy: persistent connections, each response body spliced."""
        return (SPLICE_SERVICE, HTTP11_PROXY_PORT)

    @property
    def splice_service6(self) -> str:
        """The daemon's IPv6 address for services: endpoint connections only, so far."""
        return SPLICE_SERVICE6

    @property
    def daemon_socket(self) -> Path:
        return self.run_dir / "spliced.sock"

    # -- lifecycle ---------------------------------------------------------

    def is_up(self) -> bool:
        return all(netns.exists(n) for n in self.namespaces())

    def up(self) -> list[str]:
        """Build (or repair) the testbed; return what was done, one line each."""
        require_root("up")
        done: list[str] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in self.namespaces():
            if not netns.exists(name):
                netns.create(name)
                done.append(f"namespace {name}")
        hosts = self.hosts_file()
        for h in self.topology.hosts:
            ns = ns_name(self.prefix, h.role)
            netns.write_etc(ns, "hosts", hosts)
            # Before any link exists, so that every interface inherits it: no
            # duplicate address detection (addresses usable at once, not after
            # ~2 s of DAD; nothing else is on these links).
            for conf in ("all", "default"):
                netns.write_sysctl(ns, f"net.ipv6.conf.{conf}.accept_dad", 0)
            with NetNS(ns) as ipr:
                idx = _link_index(ipr, "lo")
                ipr.link("set", index=idx, state="up")
            if h.forwarding:
                netns.write_sysctl(ns, "net.ipv4.ip_forward", 1)
                netns.write_sysctl(ns, "net.ipv6.conf.all.forwarding", 1)
        for spec in self.topology.links:
            if self._build_link(spec):
                done.append(f"link {spec.name}")
        for role, gw in self.topology.gateways.items():
            with NetNS(ns_name(self.prefix, role)) as ipr:
                if not ipr.get_default_routes(family=2):
                    ipr.route("add", dst="0.0.0.0/0", gateway=gw)
        for role, gw6 in self.topology.gateways6.items():
            with NetNS(ns_name(self.prefix, role)) as ipr:
                if not ipr.get_default_routes(family=socket.AF_INET6):
                    ipr.route("add", dst="::/0", gateway=gw6, family=socket.AF_INET6)
        for role, values in self.sysctls.items():
            for key, value in values.items():
                netns.write_sysctl(ns_name(self.prefix, role), TCP_SYSCTLS.get(key, key), value)
        self._save_state()
        if self.services:
            done += self.start_services()
        return done

    def _build_link(self, spec: LinkSpec) -> bool:
        """Create link `spec` if any piece is missing; return whether it was (re)built."""
        a_ns, b_ns = ns_name(self.prefix, spec.a), ns_name(self.prefix, spec.b)
        a_if, b_if = ifname(self.prefix, spec.a, spec.b), ifname(self.prefix, spec.b, spec.a)
        wire = wire_ns_name(self.prefix, spec)
        mtu = self.mtu.get(spec.name, self.mtu.get(spec.short, 1500))
        pieces = [(a_ns, a_if), (b_ns, b_if), (wire, WIRE_PORT_A), (wire, WIRE_PORT_B)]
        present = []
        for ns, dev in pieces:
            with NetNS(ns) as ipr:
                present.append(_link_index(ipr, dev) is not None)
        rebuilt = not all(present)
        if rebuilt:
            # Remove half-built remnants (a veth end vanishes with its peer).
            for (ns, dev), here in zip(pieces, present, strict=True):
                if here:
                    with NetNS(ns) as ipr:
                        idx = _link_index(ipr, dev)
                        if idx is not None:
                            ipr.link("del", index=idx)
            with NetNS(a_ns) as ipr:
                ipr.link(
                    "add", ifname=a_if, kind="veth", peer={"ifname": WIRE_PORT_A, "net_ns_fd": wire}
                )
            with NetNS(b_ns) as ipr:
                ipr.link(
                    "add", ifname=b_if, kind="veth", peer={"ifname": WIRE_PORT_B, "net_ns_fd": wire}
                )
        with NetNS(wire) as ipr:
            br = _link_index(ipr, WIRE_BRIDGE)
            if br is None:
                ipr.link("add", ifname=WIRE_BRIDGE, kind="bridge")
                br = _link_index(ipr, WIRE_BRIDGE)
            for port in (WIRE_PORT_A, WIRE_PORT_B):
                idx = _link_index(ipr, port)
                ipr.link("set", index=idx, master=br, mtu=mtu, state="up")
            ipr.link("set", index=br, mtu=mtu, state="up")
            lo = _link_index(ipr, "lo")
            ipr.link("set", index=lo, state="up")
        ends = ((a_ns, a_if, spec.a_addr, spec.a_addr6), (b_ns, b_if, spec.b_addr, spec.b_addr6))
        for ns, dev, addr, addr6 in ends:
            with NetNS(ns) as ipr:
                idx = _link_index(ipr, dev)
                ipr.link("set", index=idx, mtu=mtu, state="up")
                have = {a.get("address") for a in ipr.get_addr(index=idx, family=2)}
                if addr not in have:
                    ipr.addr("add", index=idx, address=addr, prefixlen=spec.prefixlen)
                if addr6 is None:
                    continue
                have6 = {a.get("address") for a in ipr.get_addr(index=idx, family=socket.AF_INET6)}
                if addr6 not in have6:
                    ipr.addr("add", index=idx, address=addr6, prefixlen=spec.prefixlen6)
        return rebuilt

    def start_services(self) -> list[str]:
        """Start the origin server and the plain SOCKS5 proxy unless already running."""
        started = []
        server_ns, proxy_ns = ns_name(self.prefix, "server"), ns_name(self.prefix, "proxy")
        origin, sink, socks = self.origin, self.sink, self.socks
        wanted = {
            "origin": (
                server_ns,
                [
                    sys.executable,
                    "-m",
                    "servers.origin",
                    "--quiet",
                    "--listen",
                    f"{origin[0]}:{origin[1]}",
                    "--listen",
                    "[{}]:{}".format(*self.origin6),
                    "--sink-listen",
                    f"{sink[0]}:{sink[1]}",
                    "--sink-listen",
                    "[{}]:{}".format(*self.sink6),
                    *self.origin_args,
                ],
            ),
            "socks5": (
                proxy_ns,
                [
                    sys.executable,
                    "-m",
                    "proxies.socks5",
                    "--listen",
                    f"{socks[0]}:{socks[1]}",
                    "--listen",
                    "[{}]:{}".format(*self.socks6),
                ],
            ),
        }
        # The splice daemon (its TUN routes SPLICE_NET in the proxy namespace)
        # and the SOCKS5 proxy that uses it as its TCP endpoint.
        wanted["daemon"] = (
            proxy_ns,
            [
                *self.daemon_wrapper,
                sys.executable,
                "-m",
                "daemon",
                "--tun",
                tun_name(self.prefix),
                "--prefix",
                SPLICE_NET,
                "--source",
                SPLICE_SOURCE,
                "--prefix6",
                SPLICE_NET6,
                "--source6",
                SPLICE_SOURCE6,
                "--socket",
                str(self.daemon_socket),
                "--msl",
                str(self.msl),
                "--fastpath",
                self.fastpath,
                *self.daemon_args,
            ],
        )
        daemon_args = ["--daemon", str(self.daemon_socket), "--source", SPLICE_SOURCE]
        for name, module, (addr, port) in (
            ("socks5-spliced", "proxies.socks5_spliced", self.spliced_socks),
            ("socks5-endpoint", "proxies.socks5_endpoint", self.endpoint_socks),
            ("http-proxy", "proxies.http_proxy", self.http_proxy),
            ("http11-proxy", "proxies.http11_proxy", self.http11_proxy),
        ):
            argv = [sys.executable, "-m", module, *daemon_args, "--listen", f"{addr}:{port}"]
            if name == "socks5-endpoint":
                # The daemon's IPv6 endpoint: connections it terminates, copied.
                argv += ["--listen", "[{}]:{}".format(*self.endpoint_socks6)]
            if name in ("socks5-spliced", "http-proxy", "http11-proxy"):
                argv += ["--listen", f"[{SPLICE_SERVICE6}]:{port}"]
            wanted[name] = (proxy_ns, argv)
        # On the proxy host's own addresses: kernel sockets, taken over at splice time.
        wanted["socks5-kernel"] = (
            proxy_ns,
            [
                sys.executable,
                "-m",
                "proxies.socks5_kernel",
                "--daemon",
                str(self.daemon_socket),
                "--listen",
                "{}:{}".format(*self.kernel_socks),
                "--listen",
                "[{}]:{}".format(*self.kernel_socks6),
            ],
        )
        for name, (ns, argv) in wanted.items():
            rec = process.load(self.run_dir, name)
            if rec is not None and rec.alive():
                continue
            process.start(self.run_dir, name, ns, argv, env=_service_env())
            started.append(f"service {name}")
        return started

    def down(self) -> list[str]:
        """Remove everything this prefix made; harmless when nothing is there.

        SIGINT and SIGTERM wait until it is done (they are held, then
        delivered): a Ctrl-C, a test run's time limit or a ``kill`` that
        lands mid-teardown would otherwise leave half a testbed behind.
        """
        require_root("down")
        with _stop_signals_held():
            return self._down()

    def _down(self) -> list[str]:
        done: list[str] = []
        for rec in process.records(self.run_dir):
            process.stop(self.run_dir, rec.name)
            done.append(f"stopped {rec.name} (pid {rec.pid})")
        for name in self.namespaces():
            killed = process.kill_namespace_members(name)
            if killed:
                done.append(f"killed {len(killed)} leftover process(es) in {name}")
            if netns.exists(name):
                netns.remove(name)
                done.append(f"removed namespace {name}")
            netns.remove_etc(name)
        if self.run_dir.exists():
            for path in sorted(self.run_dir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            self.run_dir.rmdir()
        return done

    def __enter__(self) -> Testbed:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- inspection ----------------------------------------------------------

    def _save_state(self) -> None:
        state = {
            "prefix": self.prefix,
            "mtu": dict(self.mtu),
            "sysctls": {k: dict(v) for k, v in self.sysctls.items()},
        }
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=1))

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {"prefix": self.prefix, "up": self.is_up(), "hosts": {}}
        for h in self.topology.hosts:
            host = self.host(h.role)
            info["hosts"][h.role] = {
                "namespace": host.ns,
                "present": netns.exists(host.ns),
                "addresses": list(host.addrs),
                "addresses6": list(host.addrs6),
            }
        info["links"] = {}
        for spec in self.topology.links:
            link = self.link(spec.name)
            entry: dict[str, Any] = {"wire": link.wire_ns, "present": netns.exists(link.wire_ns)}
            if entry["present"]:
                try:
                    shape, counters = link.shape_status()
                    entry["shape"] = str(shape) if shape is not None else None
                    entry["counters"] = counters
                except Exception as exc:  # status must never fail on a half-built wire
                    entry["shape_error"] = str(exc)
            info["links"][spec.name] = entry
        info["services"] = {
            rec.name: {
                "pid": rec.pid,
                "alive": rec.alive(),
                "namespace": rec.namespace,
                "log": rec.log,
            }
            for rec in process.records(self.run_dir)
        }
        return info

    def describe(self) -> str:
        """What is where, and commands to try (printed by `testbed up`)."""
        client, server, proxy = self.host("client"), self.host("server"), self.host("proxy")
        ox, ss, ox6, ss6 = self.origin, self.socks, self.origin6, self.socks6
        lines = [
            f"testbed {self.prefix!r} is up (run dir {self.run_dir})",
            f"  client  {client.ns:<22} {client.addr}, {client.addr6}",
            f"  proxy   {proxy.ns:<22} {' | '.join(proxy.addrs)}"
            f"  (forwarding both families; splice net {SPLICE_NET}, {SPLICE_NET6} endpoint only)",
            f"  {'':<30} {' | '.join(proxy.addrs6)}",
            f"  server  {server.ns:<22} {server.addr}, {server.addr6}",
            "  links   "
            + ", ".join(
                f"{s.name} (wire {wire_ns_name(self.prefix, s)})" for s in self.topology.links
            ),
            "services:",
            f"  origin HTTP/1.1  http://{ox[0]}:{ox[1]}/bytes/N, http://[{ox6[0]}]:{ox6[1]}/..."
            f"   (upload: POST /sink; raw sink :{SINK_PORT})",
            f"  plain SOCKS5     {ss[0]}:{ss[1]}, [{ss6[0]}]:{ss6[1]}",
            f"  splice daemon    TUN {tun_name(self.prefix)}, API {self.daemon_socket}",
            f"  spliced SOCKS5   {self.spliced_socks[0]}:{self.spliced_socks[1]}"
            "  (thesis Fig. 4.2: the daemon relays after the reply)",
            f"  kernel SOCKS5    {self.kernel_socks[0]}:{self.kernel_socks[1]},"
            f" [{self.kernel_socks6[0]}]:{self.kernel_socks6[1]}"
            "  (kernel sockets; each pair handed to the daemon: splice_sockets)",
            f"  spliced HTTP     {self.http_proxy[0]}:{self.http_proxy[1]}"
            "  (HTTP/1.0 proxy with a cache, thesis Fig. 4.3)",
            f"  spliced HTTP/1.1 {self.http11_proxy[0]}:{self.http11_proxy[1]}"
            "  (keep-alive; each response body spliced, deny list, cache)",
            f"  endpoint SOCKS5  {self.endpoint_socks[0]}:{self.endpoint_socks[1]},"
            f" [{self.endpoint_socks6[0]}]:{self.endpoint_socks6[1]}"
            "  (daemon-terminated TCP, copying: no splice)",
            "try:",
            f"  ip netns exec {client.ns} curl -s http://{ox[0]}/bytes/1048576 | sha256sum",
            f"  ip netns exec {client.ns} curl -s --socks5 {ss[0]}:{ss[1]}"
            f" http://{ox[0]}/bytes/1048576 | sha256sum",
            f"  ip netns exec {client.ns} curl -s -6 --socks5 [{ss6[0]}]:{ss6[1]}"
            f" 'http://[{ox6[0]}]/bytes/1048576' | sha256sum",
            f"  ip netns exec {client.ns} curl -s --socks5 {SPLICE_SERVICE}:{SOCKS_PORT}"
            f" http://{ox[0]}/bytes/1048576 | sha256sum",
            f"  ip netns exec {client.ns} curl -s -x http://{SPLICE_SERVICE}:{HTTP_PROXY_PORT}"
            f" http://{ox[0]}/bytes/1048576 | sha256sum",
            "  .venv/bin/python -m testbed shape client-proxy delay=10ms loss=1%",
        ]
        return "\n".join(lines)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for this thread; ones that came meanwhile arrive at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only anyway
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _service_env() -> dict[str, str]:
    """Services run from the repository with the same interpreter as the testbed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
