"""The daemon's I/O shell: TUN, Unix API, socketpairs and timers around the TCP core.

Theory of operation
-------------------
One thread, one selector.  Three kinds of file descriptors are in it:

* the TUN: every readable event reads packets until EAGAIN (bounded batch);
  each IPv4/TCP packet is demultiplexed by its 4-tuple to a connection, or
  to a listener, or answered with a RST (RFC 9293 3.10.7.1);
* the API server's sockets (daemon/api/server.py), which call the ``Core``
  methods below;
* one end of a socketpair per connection handed to a proxy (the proxy holds
  the other end): the *pump* moves bytes between it and the TcpConnection.

The TCP logic (daemon/tcp) never does I/O.  After anything touches a
connection it is marked dirty; at the end of each loop turn every dirty
connection is *serviced*: its events are handled, the pump runs, its
output segments are written to the TUN and its timer is re-armed.

Backpressure is end to end.  The pump reads from the proxy's socket only
while the TCP send buffer has room, and takes bytes out of the TCP receive
buffer only when the socket accepts them, so a proxy that stops reading
closes the TCP window instead of growing a buffer in the daemon.

Offloads (DESIGN.md, "Performance"): in offload mode received segments may
be 64 KB GSO super-packets (one TcpSegment for the TCP code) and emitted
data segments carry up to ``max_tso_bytes`` with a virtio header asking the
kernel to cut them at the connection's MSS and to complete the checksum
(NEEDS_CSUM: the TCP checksum field holds the pseudo-header sum only).  In
plain mode every segment fits the MSS and carries a full checksum.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import selectors
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from daemon.api.core import ApiError, Done, ObjectKind, Result
from daemon.api.protocol import Address, ErrorCode, Inline
from daemon.api.server import ApiServer
from daemon.fastpath import DEFAULT_OBJECT, FastPathUnavailable
from daemon.fastpath.sockprobe import SockProbe
from daemon.io.fastpath import FastPathMode, start_fast_path
from daemon.io.repair import (
    RepairError,
    bind_port,
    close_silently,
    endpoints,
    forward_unread,
    give_back,
    hold_port,
    take_over,
)
from daemon.io.splicer import Splice, Splicer
from daemon.io.timers import Timer, TimerHeap
from daemon.io.tun import TunDevice, new_read_buffer
from daemon.splice.state import Iface
from daemon.tcp.config import Endpoint, TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.events import TcpEvent
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.listener import TcpListener
from daemon.tcp.reset import reset_for_unknown
from daemon.tcp.state import TcpState
from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.error import WireError
from daemon.wire.flowlabel import flow_label
from daemon.wire.icmp import FRAG_NEEDED, Unreachable, parse_unreachable, parse_unreachable6
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.ipv6 import HEADER_LEN as IPV6_HEADER_LEN
from daemon.wire.ipv6 import Ipv6Packet
from daemon.wire.tcp import CWR, TcpSegment, build_ipv4_tcp, build_ipv6_tcp, parse_tcp
from daemon.wire.vnet import F_DATA_VALID, F_NEEDS_CSUM, VnetHeader, vnet_header_for_tcp

log = logging.getLogger("daemon")

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_ICMPV6 = 58
IPV4_HEADER_LEN = 20
TUN_BATCH = 256  # packets per readable event before other fds get a turn
PUMP_CHUNK = 256 * 1024  # bytes moved per socket call
SOCKPAIR_BUF = 1 << 20
EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range
ADDRESSES_SHARED = 65536  # distinct peer addresses whose bytes connections share

_PORTS = struct.Struct("!HH")
_FRAG = struct.Struct("!H")
# NEEDS_CSUM: the field holds a partial sum (locally made, never on a wire);
# DATA_VALID: the kernel checked it.  Either way it is not ours to verify.
_VOUCHED = F_NEEDS_CSUM | F_DATA_VALID

FlowKey = tuple[bytes, int, bytes, int]  # local addr, local port, remote addr, remote port


def _build(
    seg: TcpSegment,
    local: Endpoint,
    remote: Endpoint,
    *,
    partial_checksum: bool,
    label: int | None = None,
) -> bytearray:
    """One segment of the connection local -> remote as an IP packet of its family.

    ``label``: the connection's own IPv6 flow label (``TcpConnection.flow_label``);
    None: the daemon's hash of the 4-tuple.
    """
    if len(local[0]) == 16:
        # RFC 6437: every segment of a connection carries its own flow label.
        if label is None:
            label = flow_label(local[0], local[1], remote[0], remote[1])
        return build_ipv6_tcp(
            seg, local[0], remote[0], dscp_ecn=seg.ecn, flow_label=label,
            partial_checksum=partial_checksum,
        )  # fmt: skip
    return build_ipv4_tcp(
        seg, local[0], remote[0], dscp_ecn=seg.ecn, partial_checksum=partial_checksum
    )


@dataclass
class DaemonConfig:
    tun_name: str = "tsplice0"
    socket_path: str = "/run/tcp-splice/spliced.sock"
    socket_mode: int = 0o660
    socket_group: str | None = None
    prefix: str = "198.51.100.0/24"  # routed into the TUN: every address in it is ours
    source: str = "198.51.100.2"  # default local address of outgoing connections
    # The same for IPv6 (None: IPv4 only).  IPv6 connections are endpoint
    # connections for now: splice() refuses them (the relay is IPv4's).
    prefix6: str | None = None
    source6: str | None = None
    offload: bool = True
    mtu: int = 1500
    tcp: TcpConfig = field(default_factory=TcpConfig)
    # Window scale we offer on connections we open.  A splice's server side
    # is offered the client's own scale instead (thesis 5.4.2), so that client
    # windows pass unchanged; the client side offers tcp.rcv_wscale and the
    # translator rescales server windows for it.
    connect_rcv_wscale: int | None = 7
    # A splice's server side acknowledges nothing sooner than the client
    # path's RTT, at most this (daemon/splice/relay.py, Relay.intend).
    max_server_ack_delay: float = 0.25
    # The kernel fast path for spliced flows (daemon/io/fastpath.py).
    fastpath: FastPathMode = "auto"
    fastpath_object: Path = DEFAULT_OBJECT


@dataclass(eq=False)
class Conn:
    """One TCP connection of the daemon and, once handed out, its socketpair end."""

    tcp: TcpConnection
    owner: int
    id: int | None = None  # API id, assigned when the proxy gets the fd
    sock: socket.socket | None = None  # the daemon's end of the socketpair
    listener: Listening | None = None  # accepted from this listener (until handed out)
    connect_done: Done | None = None  # pending API connect
    pending: memoryview | None = None  # bytes taken from TCP, not yet written to sock
    proxy_eof: bool = False  # the proxy shut down its writing side (EOF on sock)
    shut_to_proxy: bool = False  # we shut down the sock's writing side (peer FIN)
    peer_fin: bool = False
    want_fin: bool = False  # API shutdown: FIN once the socket is drained
    mask: int = 0  # current selector interest of sock
    timer: Timer = field(default_factory=Timer)
    connect_timer: Timer = field(default_factory=Timer)
    tcp_gone: bool = False  # TCB closed; draining what is left to the proxy
    to_proxy: int = 0  # bytes written into the proxy's fd
    from_proxy: int = 0  # bytes read from the proxy's fd
    outbox: deque[bytes] = field(default_factory=deque)  # proxy bytes not yet in the TCB
    # Splice (daemon/io/splicer.py, daemon/splice/relay.py).
    splice: Splice | None = None
    is_client: bool = True  # the client side of its splice
    reserved_id: int | None = None  # server side: the id intend_splice handed out
    hold_rx: bool = False  # deliver nothing more to the proxy (thesis 4.1)
    frozen: bool = False  # splice() called: the relay owns the TCB and the 4-tuple
    close_pending: bool = False  # API close: close the TCB once the outbox is sent
    # connect_splice with release: the proxy will never hold this conn's fd,
    # so none is made unless the splice is left to the proxy after all.
    want_fd: bool = True
    sock_buf: int = SOCKPAIR_BUF  # the socketpair's buffers (connect's rcvbuf)

    @property
    def api_id(self) -> int | None:
        return self.id

    @property
    def key(self) -> FlowKey:
        t = self.tcp
        return (t.local[0], t.local[1], t.remote[0], t.remote[1])


@dataclass(eq=False)
class Listening:
    id: int
    owner: int
    tcp: TcpListener
    waiters: deque[Done] = field(default_factory=deque)


def _addr_text(ep: Endpoint) -> list[object]:
    return [str(ipaddress.ip_address(ep[0])), ep[1]]


class Daemon:
    """The splice daemon: TCP endpoint for the TUN's prefix, driven over the API."""

    def __init__(self, config: DaemonConfig, *, tun: TunDevice | None = None) -> None:
        self.config = config
        self.net = ipaddress.ip_network(config.prefix)
        self.net6 = ipaddress.ip_network(config.prefix6) if config.prefix6 else None
        self.tun = tun if tun is not None else TunDevice(config.tun_name, offload=config.offload)
        self._tun_index: int | None = None  # if_nametoindex costs a socket and an ioctl
        self.offload = self.tun.mode == "offload"
        tcp_cfg = config.tcp
        if not self.offload:
            # Without GSO every segment we emit must fit the MSS on its own.
            tcp_cfg = _replace(tcp_cfg, max_tso_bytes=tcp_cfg.mss)
        self.tcp_config = tcp_cfg
        # Connections we open acknowledge at once (a splice's server side sets
        # its own min_ack_delay); tcp.min_ack_delay is for accepted ones.
        self.connect_config = _replace(
            tcp_cfg, rcv_wscale=config.connect_rcv_wscale, min_ack_delay=0.0
        )
        # IPv6's fixed header is 20 bytes longer (RFC 8200 3): the MSS we
        # offer is that much smaller (RFC 9293 3.7.1; Linux offers 1440).
        self.tcp_config6 = _replace(self.tcp_config, mss=self.tcp_config.mss - 20)
        self.connect_config6 = _replace(self.connect_config, mss=self.connect_config.mss - 20)
        self.sel = selectors.DefaultSelector()
        self.timers = TimerHeap()
        self.isn = IsnGenerator()
        self.flows: dict[FlowKey, Conn] = {}
        self.conns: dict[int, Conn] = {}
        self.listeners: dict[tuple[bytes, int], Listening] = {}
        self.listener_ids: dict[int, Listening] = {}
        self.dirty: set[Conn] = set()
        self._port_cursor: dict[tuple[bytes, Endpoint | None], int] = {}
        self._addresses: dict[bytes, bytes] = {}  # see _intern
        self._next_id = 1
        self._buf = new_read_buffer()
        self._sock_probe: SockProbe | None = None  # splice_sockets: loaded on first use
        self.counters: dict[str, int] = {
            "packets_in": 0,
            "packets_out": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "gso_in": 0,
            "gso_out": 0,
            "malformed": 0,
            "bad_checksum": 0,
            "not_ip": 0,  # neither IPv4 nor IPv6
            "icmp6": 0,  # ICMPv6 messages (their errors count in icmp_unreachable too)
            "fragments": 0,
            "not_tcp": 0,
            "not_ours": 0,
            "to_kernel": 0,  # segments of the host's own addresses handed back to the kernel
            "resets_sent": 0,
            "icmp_unreachable": 0,
            "pmtu_updates": 0,  # connections whose segment size ICMP lowered (RFC 1191)
            "icmp_frag_needed_relayed": 0,  # for spliced flows: sent on to the peer
            "tun_write_drops": 0,
            "connections_opened": 0,
            "internal_errors": 0,
        }
        self.sel.register(self.tun.fileno(), selectors.EVENT_READ, self._on_tun)
        self.api = ApiServer(
            config.socket_path, self, mode=config.socket_mode, group=config.socket_group
        )
        self.api.defer_flush = True  # run_once flushes after the pass's packets
        self.api.register(self.sel)
        try:
            self.fast_path, self.fast_path_reason = start_fast_path(
                config.fastpath,
                config.tun_name,
                config.fastpath_object,
                prefixes=[n for n in (self.net, self.net6) if n is not None],
                offload=self.offload,
            )
        except FastPathUnavailable:
            self.api.close()
            self.tun.close()
            raise
        fp = self.fast_path
        self.splicer = Splicer(self, fp, fp.egress if fp is not None else None)
        if fp is not None and fp.inherited:
            if any(inh.client_value.punt_ifindex for inh in fp.inherited):
                self._let_host_sources_out()  # adopted kernel-socket splices
            self.splicer.adopt(fp.inherited, time.monotonic())
            fp.inherited = []
        self.stopping = False
        log.info(
            "TUN %s in %s mode; fast path %s; API on %s",
            config.tun_name,
            self.tun.mode,
            "on" if fp is not None else "off",
            config.socket_path,
        )

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        while not self.stopping:
            self.run_once()

    def run_once(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        deadline = self.timers.next_deadline()
        wait = max_wait if deadline is None else min(max(deadline - now, 0.0), max_wait)
        for key, mask in self.sel.select(0.0 if self.dirty else wait):
            key.data(mask)
        now = time.monotonic()
        self.timers.run_due(now)
        self._service_dirty(now)
        self.splicer.run_installs()  # before the replies wake the proxies
        self.api.flush()  # replies last: the packets of this pass are out (ApiServer.defer_flush)

    def terminate(self, handover: bool = False) -> None:
        """Abort every connection (RST to the peers), close the API, the TUN.

        ``handover`` (SIGUSR1): splices wholly in the kernel fast path are
        left flowing there, filters attached, for the next daemon to adopt
        (docs/operations.md); everything else is reset as on any stop.
        """
        self.stopping = True
        now = time.monotonic()
        self.splicer.terminate(now, handover)
        for conn in list(self.flows.values()):
            conn.tcp.abort()
            self._emit_output(conn, now)
            self._free(conn)
        self.api.close()
        self.sel.close()
        if self.fast_path is not None:
            self.fast_path.close(detach=not handover)
        self.tun.close()

    def _intern(self, addr: bytes) -> bytes:
        """One bytes object per address, shared by every connection that names it.

        A connection's endpoints outlive it in its splice (base points,
        translators, flow keys): without this each kept its own copy of the
        same 4 bytes (~37 B each).  Bounded, since clients' addresses are
        theirs to choose: past the bound an address is simply not shared.
        """
        known = self._addresses.get(addr)
        if known is not None:
            return known
        if len(self._addresses) < ADDRESSES_SHARED:
            self._addresses[addr] = addr
        return addr

    def _new_id(self) -> int:
        n = self._next_id
        self._next_id += 1
        return n

    # ------------------------------------------------------------ TUN input

    def _on_tun(self, mask: int, draining: bool = False) -> bool:
        """Read and handle up to TUN_BATCH packets; True if the queue ran dry.

        A batch ends early once a splice waits for its install (see
        Splicer.run_installs), unless it is that wait's own read.
        """
        now = time.monotonic()
        for _ in range(TUN_BATCH):
            try:
                vnet, pkt = self.tun.read(self._buf)
            except BlockingIOError:
                return True
            except WireError:
                self.counters["malformed"] += 1
                continue
            self.counters["packets_in"] += 1
            self.counters["bytes_in"] += len(pkt)
            try:
                self._input(vnet, pkt, now)
                if self.splicer.installs and not draining:
                    return False  # to run_installs, which reads on (bounded) first
            except WireError as exc:
                self.counters["malformed"] += 1
                if __debug__:
                    log.debug("malformed packet: %s", exc)
            except Exception:
                # A bug must cost one packet (TCP retransmits it), never the
                # daemon and every connection it carries.
                self.counters["internal_errors"] += 1
                log.exception("internal error on an incoming packet")
        return False

    def drain_tun(self, limit: int = 4 * TUN_BATCH) -> None:
        """Handle what the TUN holds now (bounded: other fds wait meanwhile)."""
        for _ in range(0, limit, TUN_BATCH):
            if self._on_tun(selectors.EVENT_READ, draining=True):
                return

    def _input(self, vnet: VnetHeader | None, pkt: memoryview, now: float) -> None:
        # Fast path for a spliced flow: a plain 20-byte IPv4 header, TCP, not
        # a fragment, a checksum the kernel vouches for.  The IPv4 header
        # checksum is not recomputed here: every packet the TUN delivers came
        # through the kernel's ip_rcv, which drops bad header checksums
        # before forwarding (the slow path below still checks).
        if (
            vnet is not None
            and vnet.flags & _VOUCHED
            and len(pkt) >= 40
            and pkt[0] == 0x45
            and pkt[9] == PROTO_TCP
            and not _FRAG.unpack_from(pkt, 6)[0] & 0x3FFF
        ):
            sport, dport = _PORTS.unpack_from(pkt, 20)
            hit = self.splicer.flows.get((bytes(pkt[16:20]), dport, bytes(pkt[12:16]), sport))
            if hit is not None:
                if vnet.gso_size:
                    self.counters["gso_in"] += 1
                if self.splicer.on_packet(hit[0], hit[1], vnet, pkt, now):
                    return
        version = pkt[0] >> 4 if pkt else 0
        if version == 6:
            self._input6(vnet, pkt, now)
            return
        if version != 4:
            self.counters["not_ip"] += 1
            return
        ip = Ipv4Packet(pkt)
        if not ip.verify_checksum():
            self.counters["bad_checksum"] += 1
            return
        if ip.is_fragment:
            # We never send fragments (DF is set) and do no reassembly.
            self.counters["fragments"] += 1
            return
        proto = ip.protocol
        if proto == PROTO_ICMP:
            self._on_icmp(ip.payload, now)
            return
        if proto != PROTO_TCP:
            self.counters["not_tcp"] += 1
            return
        # With NEEDS_CSUM the field holds a partial sum, and DATA_VALID means
        # the kernel checked it: either way the kernel vouches (DESIGN.md).
        flags = getattr(vnet, "flags", 0)
        verify = not flags & (F_NEEDS_CSUM | F_DATA_VALID)
        if getattr(vnet, "gso_size", 0):
            self.counters["gso_in"] += 1
        self._tcp_input(vnet, pkt, ip.src_addr, ip.dst_addr, ip.payload, verify, ip.ecn, now)

    def _input6(self, vnet: VnetHeader | None, pkt: memoryview, now: float) -> None:
        """An IPv6 packet (RFC 8200): an endpoint connection's, or a SYN for a listener."""
        ip = Ipv6Packet(pkt)
        if ip.is_fragment:
            self.counters["fragments"] += 1
            return
        if ip.protocol == PROTO_ICMPV6:
            self.counters["icmp6"] += 1
            payload = ip.payload
            # RFC 4443 2.3: the checksum covers the IPv6 pseudo-header too.
            if internet_checksum(
                payload, pseudo_header_sum(ip.src_addr, ip.dst_addr, PROTO_ICMPV6, len(payload))
            ):
                self.counters["bad_checksum"] += 1
                return
            msg6 = parse_unreachable6(payload)
            if msg6 is not None:
                self._on_unreachable(msg6, now)
            return
        if ip.protocol != PROTO_TCP:
            self.counters["not_tcp"] += 1
            return
        flags = getattr(vnet, "flags", 0)
        if getattr(vnet, "gso_size", 0):
            self.counters["gso_in"] += 1
        verify = not flags & (F_NEEDS_CSUM | F_DATA_VALID)
        self._tcp_input(vnet, pkt, ip.src_addr, ip.dst_addr, ip.payload, verify, ip.ecn, now)

    def _tcp_input(
        self,
        vnet: VnetHeader | None,
        pkt: memoryview,
        src: bytes,
        dst: bytes,
        payload: memoryview,
        verify: bool,
        ecn: int,
        now: float,
    ) -> None:
        """A TCP segment (``payload``) of ``pkt``, either family: a splice's, or the endpoint's."""
        if len(payload) >= 4:
            sport, dport = _PORTS.unpack_from(payload)
            hit = self.splicer.flows.get((dst, dport, src, sport))
            if hit is not None:
                # Spliced: verify (unless the kernel vouches), then relay as is
                # (IPv6 ones in Python: the kernel program is IPv4's).
                if verify and internet_checksum(
                    payload, pseudo_header_sum(src, dst, PROTO_TCP, len(payload))
                ):
                    self.counters["bad_checksum"] += 1
                    return
                if self.splicer.on_packet(hit[0], hit[1], vnet, pkt, now):
                    return
        try:
            seg = parse_tcp(payload, src, dst, verify_checksum=verify)
        except WireError as exc:
            self.counters["bad_checksum" if "checksum" in str(exc) else "malformed"] += 1
            return
        seg.ecn = ecn
        conn = self.flows.get((dst, seg.dst_port, src, seg.src_port))
        if conn is not None and conn.tcp.reopens_with(seg):
            self._free(conn)  # RFC 6191: TIME-WAIT ends, the SYN goes to the listener
            conn = None
        if conn is not None:
            conn.tcp.on_segment(seg, now)
            self.dirty.add(conn)
            return
        lst = self.listeners.get((dst, seg.dst_port))
        if lst is not None:
            child = lst.tcp.on_segment((self._intern(src), seg.src_port), seg, now)
            for remote, rst in lst.tcp.poll_output():
                self._write_segment((dst, seg.dst_port), remote, rst, 0)
            if child is not None:
                c = Conn(child, lst.owner, listener=lst)
                self.flows[c.key] = c
                self.counters["connections_opened"] += 1
                self.dirty.add(c)
            return
        if not self._serves(dst):
            # The host's own address, not the daemon's: a taken-over kernel
            # connection's segment that the fast path sent here (its splice is
            # gone, or it is a SYN reusing the 4-tuple of one in TIMEWAIT, RFC
            # 6191).  It is the kernel's, whose listener or RST answers it: back
            # in through the TUN, virtio header and all (a veth SYN may carry a
            # partial checksum the kernel must not verify).
            self.counters["to_kernel"] += 1
            self.tun_write(None if vnet is None else vnet.to_bytes(), pkt)
            return
        self.counters["not_ours"] += 1
        reply = reset_for_unknown(seg)
        if reply is not None:
            self._write_segment((dst, seg.dst_port), (src, seg.src_port), reply, 0)

    def _on_icmp(self, payload: memoryview, now: float) -> None:
        msg = parse_unreachable(payload)
        if msg is not None:
            self._on_unreachable(msg, now)

    def _on_unreachable(self, msg: Unreachable, now: float) -> None:
        """An ICMP or ICMPv6 error quoting one of our segments (either family, normalized)."""
        self.counters["icmp_unreachable"] += 1
        key = (msg.src_addr, msg.src_port, msg.dst_addr, msg.dst_port)
        conn = self.flows.get(key)
        if msg.code == FRAG_NEEDED:
            # RFC 1191: path MTU discovery, not an error.  A relayed segment
            # was a peer's: the peer gets the news (Relay.frag_needed).
            icmp = self.splicer.frag_needed(key, msg, now)
            if icmp is not None:
                self.counters["icmp_frag_needed_relayed"] += 1
                self.tun_write(None, icmp)
                return
            if conn is None:
                return
            if conn.tcp.on_path_mtu(msg.mtu, msg.seq):
                self.counters["pmtu_updates"] += 1
                self.dirty.add(conn)
            return
        # RFC 5927 / RFC 1122 4.2.3.9: act only while connecting, and only on
        # an ICMP quoting our SYN's sequence number (blind-attack check).
        if conn is None or conn.tcp.state is not TcpState.SYN_SENT or conn.connect_done is None:
            return
        if msg.seq != conn.tcp.iss:
            return
        code = ErrorCode.ENETUNREACH if msg.net else ErrorCode.EHOSTUNREACH
        self._fail_connect(conn, ApiError(code, f"ICMP destination unreachable (code {msg.code})"))

    # ----------------------------------------------------------- TUN output

    def _write_segment(
        self,
        local: Endpoint,
        remote: Endpoint,
        seg: TcpSegment,
        mss: int,
        label: int | None = None,
    ) -> None:
        """One segment out; ``label``: its connection's own flow label (``_build``)."""
        payload_len = len(seg.payload)
        six = len(local[0]) == 16
        ip_hlen = IPV6_HEADER_LEN if six else IPV4_HEADER_LEN
        if self.offload:
            pkt = _build(seg, local, remote, partial_checksum=True, label=label)
            tcp_hlen = len(pkt) - ip_hlen - payload_len
            hdr = vnet_header_for_tcp(
                ip_hlen,
                tcp_hlen,
                payload_len,
                mss or payload_len or 1,
                ipv6=six,
                ecn=bool(seg.flags & CWR),  # SKB_GSO_TCP_ECN: CWR on the first piece only
            ).to_bytes()
            if mss and payload_len > mss:
                self.counters["gso_out"] += 1
        else:
            pkt = _build(seg, local, remote, partial_checksum=False, label=label)
            hdr = None
        try:
            self.tun.write(hdr, pkt)
        except BlockingIOError:
            # The TUN queue is full: like a drop on the wire, TCP recovers.
            self.counters["tun_write_drops"] += 1
            return
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(pkt)
        if seg.flags & 0x04:
            self.counters["resets_sent"] += 1

    def tun_write(self, hdr: bytes | None, pkt: memoryview | bytearray | bytes) -> None:
        """A relayed packet out; a full TUN queue drops it like a wire would."""
        try:
            self.tun.write(hdr, pkt)
        except BlockingIOError:
            self.counters["tun_write_drops"] += 1

    def _emit_output(self, conn: Conn, now: float) -> None:
        tcp = conn.tcp
        for seg in tcp.poll_output(now):
            self._write_segment(tcp.local, tcp.remote, seg, tcp.snd_mss, tcp.flow_label)

    # -------------------------------------------------------------- service

    def _service_dirty(self, now: float) -> None:
        rounds = 0
        while self.dirty and rounds < 8:
            rounds += 1
            batch, self.dirty = self.dirty, set()
            for conn in batch:
                try:
                    self._service(conn, now)
                except Exception:
                    self.counters["internal_errors"] += 1
                    log.exception("internal error servicing a connection; aborting it")
                    self._abort_after_bug(conn, now)

    def _service(self, conn: Conn, now: float) -> None:
        tcp = conn.tcp
        if conn.frozen:
            # The relay drives the TCB; the pump only watches the proxy's fd.
            if conn.sock is not None:
                self._pump_in(conn)
            if conn.sock is not None:
                self._update_interest(conn)
            return
        events = tcp.events
        while events:
            self._on_event(conn, events.popleft(), now)
        if conn.outbox:
            self.feed_outbox(conn)
        if conn.close_pending and not conn.outbox and not conn.tcp_gone:
            conn.close_pending = False
            tcp.close()
        if conn.sock is not None:
            self._pump(conn)
            events = tcp.events
            while events:  # the pump's send/recv may have caused events
                self._on_event(conn, events.popleft(), now)
        if not conn.tcp_gone:
            self._emit_output(conn, now)
            if tcp.state is TcpState.CLOSED:
                self._tcp_closed(conn)
            else:
                deadline = tcp.next_deadline()
                if deadline is None:
                    conn.timer.cancel()
                else:
                    self.timers.schedule(conn.timer, deadline, lambda: self._on_timer(conn))
        if conn.tcp_gone and conn.sock is not None:
            self._pump(conn)
        if conn.sock is not None:
            self._update_interest(conn)

    def _abort_after_bug(self, conn: Conn, now: float) -> None:
        """Reset a connection whose servicing failed, so it cannot fail again forever."""
        try:
            if not conn.tcp_gone:
                conn.tcp.abort()
                for seg in conn.tcp.poll_output(now):
                    self._write_segment(
                        conn.tcp.local, conn.tcp.remote, seg, 0, conn.tcp.flow_label
                    )
            self._free(conn)
        except Exception:
            log.exception("could not abort the connection either")
            self.flows.pop(conn.key, None)

    def _on_timer(self, conn: Conn) -> None:
        if conn.tcp_gone:
            return
        now = time.monotonic()
        deadline = conn.tcp.next_deadline()
        if deadline is not None and deadline <= now:
            conn.tcp.on_timer(now)
        self.dirty.add(conn)

    def _on_event(self, conn: Conn, ev: TcpEvent, now: float) -> None:
        if ev is TcpEvent.ESTABLISHED:
            if conn.connect_done is not None:
                self._complete_connect(conn)
            elif conn.listener is not None:
                self._serve_accepts(conn.listener)
        elif ev is TcpEvent.PEER_CLOSED:
            conn.peer_fin = True
        elif ev is TcpEvent.REFUSED:
            self._fail_connect(conn, ApiError(ErrorCode.ECONNREFUSED, "connection refused"))
        elif ev is TcpEvent.RESET:
            if conn.connect_done is not None:
                self._fail_connect(conn, ApiError(ErrorCode.ECONNRESET, "reset by peer"))
            elif conn.id is not None:
                self.api.push_event(conn.owner, {"event": "reset", "conn": conn.id})
                self._drop_socket(conn)
        elif ev is TcpEvent.TIMED_OUT:
            if conn.connect_done is not None:
                self._fail_connect(conn, ApiError(ErrorCode.ETIMEDOUT, "connection timed out"))
            elif conn.id is not None:
                self.api.push_event(conn.owner, {"event": "timed_out", "conn": conn.id})
                self._drop_socket(conn)

    def _tcp_closed(self, conn: Conn) -> None:
        """The TCB is gone; what it received still goes to the proxy, then we free."""
        conn.tcp_gone = True
        conn.timer.cancel()
        conn.connect_timer.cancel()
        self.flows.pop(conn.key, None)
        if conn.connect_done is not None:
            self._fail_connect(conn, ApiError(ErrorCode.ECONNRESET, "connection closed"))
        if conn.sock is None:
            self._free(conn)

    def _free(self, conn: Conn) -> None:
        if conn.splice is not None:
            self.splicer.conn_freed(conn)
        conn.timer.cancel()
        conn.connect_timer.cancel()
        if self.flows.get(conn.key) is conn:
            del self.flows[conn.key]
        self._drop_socket(conn)
        if conn.id is not None and self.conns.pop(conn.id, None) is not None:
            self.api.forget(ObjectKind.CONN, conn.id)

    def _drop_socket(self, conn: Conn) -> None:
        if conn.sock is not None:
            if conn.mask:
                self.sel.unregister(conn.sock)
                conn.mask = 0
            conn.sock.close()
            conn.sock = None
            conn.pending = None

    # ----------------------------------------------------------------- pump

    def _on_sock(self, conn: Conn, mask: int) -> None:
        if conn.sock is None:
            return
        if mask & selectors.EVENT_READ:
            self._pump_in(conn)
        self.dirty.add(conn)

    def _pump_in(self, conn: Conn) -> None:
        """Proxy -> TCP: read what the send buffer can take."""
        sock, tcp = conn.sock, conn.tcp
        assert sock is not None
        if conn.frozen:
            self._pump_in_spliced(conn)
            return
        while not conn.proxy_eof and not conn.tcp_gone:
            room = tcp.send_space()
            if room <= 0:
                return
            try:
                data = sock.recv(min(room, PUMP_CHUNK))
            except BlockingIOError:
                if conn.want_fin:
                    self._proxy_shutdown(conn)
                return
            except OSError:
                data = b""
            if not data:
                self._proxy_shutdown(conn)
                return
            conn.from_proxy += len(data)
            try:
                tcp.send(data)
            except BrokenPipeError:
                # The TCP side is closing or reset: the proxy's bytes have
                # nowhere to go (like write(2) after a RST: EPIPE).
                conn.proxy_eof = True
                return

    def _pump_in_spliced(self, conn: Conn) -> None:
        """After splice: the proxy's bytes go to the splicer, its EOF sends no FIN."""
        sock = conn.sock
        assert sock is not None
        while not conn.proxy_eof:
            try:
                data = sock.recv(PUMP_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # Thesis 4.2: closing a spliced descriptor does not FIN the
                # connection; the daemon just lets go of the socket.
                conn.proxy_eof = True
                self._drop_socket(conn)
                self.splicer.proxy_done(conn)
                return
            conn.from_proxy += len(data)
            self.splicer.proxy_data(conn, data)

    def feed_outbox(self, conn: Conn) -> None:
        """Move queued bytes into the TCB's send buffer as far as it has room."""
        tcp = conn.tcp
        while conn.outbox and tcp.send_space() > 0:
            chunk = conn.outbox[0]
            try:
                n = tcp.send(chunk)
            except BrokenPipeError:
                conn.outbox.clear()
                return
            if n < len(chunk):
                conn.outbox[0] = chunk[n:]
                return
            conn.outbox.popleft()

    def _drain_proxy(self, conn: Conn) -> None:
        """Take everything the proxy already wrote into the socket (before splice)."""
        sock = conn.sock
        if sock is None or conn.proxy_eof:
            return
        while True:
            try:
                data = sock.recv(PUMP_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                conn.proxy_eof = True
                return
            conn.from_proxy += len(data)
            conn.outbox.append(data)

    def _proxy_shutdown(self, conn: Conn) -> None:
        conn.proxy_eof = True
        if conn.tcp.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.SYN_RECEIVED):
            conn.tcp.shutdown_write()

    def _pump(self, conn: Conn) -> None:
        """TCP -> proxy: move in-order data into the socket as far as it takes it."""
        sock, tcp = conn.sock, conn.tcp
        assert sock is not None
        if not conn.proxy_eof and conn.want_fin:
            self._pump_in(conn)
        if conn.hold_rx:
            return
        while True:
            if conn.pending is None:
                n = 0 if tcp is None else tcp.readable()
                if not n:
                    break
                conn.pending = memoryview(tcp.recv(min(n, PUMP_CHUNK)))
            try:
                sent = sock.send(conn.pending)
                conn.to_proxy += sent
            except BlockingIOError:
                break
            except OSError:
                # The proxy closed its end: received data can no longer be
                # delivered, so the peer must learn it was lost (RFC 1122
                # 4.2.2.13: RST).
                conn.pending = None
                if not conn.tcp_gone:
                    tcp.abort()
                self._drop_socket(conn)
                if conn.tcp_gone:
                    self._free(conn)
                return
            conn.pending = conn.pending[sent:] if sent < len(conn.pending) else None
        if conn.pending is None and not tcp.readable() and (conn.peer_fin or conn.tcp_gone):
            if not conn.shut_to_proxy:
                conn.shut_to_proxy = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            if conn.tcp_gone:
                self._free(conn)

    def _update_interest(self, conn: Conn) -> None:
        sock = conn.sock
        if sock is None:
            return
        want = 0
        if conn.frozen:
            want = 0 if conn.proxy_eof else selectors.EVENT_READ
        elif not conn.proxy_eof and not conn.tcp_gone and conn.tcp.send_space() > 0:
            want |= selectors.EVENT_READ
        if conn.pending is not None:
            want |= selectors.EVENT_WRITE
        if want == conn.mask:
            return
        if conn.mask == 0:
            self.sel.register(sock, want, lambda mask: self._on_sock(conn, mask))
        elif want == 0:
            self.sel.unregister(sock)
        else:
            self.sel.modify(sock, want, lambda mask: self._on_sock(conn, mask))
        conn.mask = want

    def attach_socket(self, conn: Conn) -> socket.socket:
        """Give `conn` its socketpair; return the proxy's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, conn.sock_buf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, conn.sock_buf)
        ours.setblocking(False)
        conn.sock = ours
        return theirs

    def _hand_out(self, conn: Conn) -> tuple[Result, socket.socket | None]:
        """Give `conn` an API id and (unless it wants none) a socketpair.

        Returns the reply and the proxy's end of the socketpair.
        """
        theirs = self.attach_socket(conn) if conn.want_fd else None
        conn.id = conn.reserved_id if conn.reserved_id is not None else self._new_id()
        conn.listener = None
        self.conns[conn.id] = conn
        self.dirty.add(conn)
        result: Result = {
            "conn": conn.id,
            "local": _addr_text(conn.tcp.local),
            "peer": _addr_text(conn.tcp.remote),
        }
        return result, theirs

    # ------------------------------------------------------------ Core: API

    def _local_endpoint(self, addr: Address, what: str) -> Endpoint:
        host, port = addr
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ApiError(ErrorCode.EBADREQ, f"{what}: {host!r} is not an IP address") from None
        net = self.net if ip.version == 4 else self.net6
        if net is None or ip not in net:
            prefixes = " or ".join(str(n) for n in (self.net, self.net6) if n is not None)
            raise ApiError(
                ErrorCode.EADDRNOTAVAIL,
                f"{what}: {host} is not in the daemon's prefix {prefixes}",
            )
        return self._intern(ip.packed), port

    def listen(self, owner: int, addr: Address, backlog: int) -> Result:
        local = self._local_endpoint(addr, "listen")
        if local[1] == 0:
            local = (local[0], self._free_port(local[0], None))
        if local in self.listeners:
            raise ApiError(ErrorCode.EADDRINUSE, f"{addr[0]}:{local[1]} is already listening")
        base = self.tcp_config6 if len(local[0]) == 16 else self.tcp_config
        cfg = _replace(base, accept_backlog=max(1, min(backlog, 4096)))
        lst = Listening(self._new_id(), owner, TcpListener(cfg, local, self.isn))
        self.listeners[local] = lst
        self.listener_ids[lst.id] = lst
        return {"listener": lst.id, "addr": _addr_text(local)}

    def accept(self, owner: int, listener: int, done: Done) -> None:
        lst = self.listener_ids.get(listener)
        if lst is None:
            done(ApiError(ErrorCode.ENOENT, f"no listener {listener}"), None)
            return
        lst.waiters.append(done)
        self._serve_accepts(lst)

    def _serve_accepts(self, lst: Listening) -> None:
        while lst.waiters:
            tcp = lst.tcp.accept()
            if tcp is None:
                return
            conn = self.flows.get((tcp.local[0], tcp.local[1], tcp.remote[0], tcp.remote[1]))
            if conn is None or conn.tcp is not tcp:
                continue  # it died in the accept queue
            result, theirs = self._hand_out(conn)
            lst.waiters.popleft()(result, theirs)

    def connect(
        self,
        owner: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        conn: int | None,
        done: Done,
        rcvbuf: int | None = None,
    ) -> None:
        if conn is not None:
            self.splicer.connect(owner, conn, remote, local, timeout, done)
            return
        config = self.connect_config
        if rcvbuf is not None:
            config = _replace(config, rcv_buf=rcvbuf)
        c = self._open(owner, remote, local, timeout, done, config)
        if c is not None and rcvbuf is not None:
            c.sock_buf = rcvbuf

    def _open(
        self,
        owner: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        done: Done,
        config: TcpConfig,
    ) -> Conn | None:
        """Start an active open; `done` gets the outcome. None if it failed at once."""
        try:
            rip = ipaddress.ip_address(remote[0])
        except ValueError:
            done(ApiError(ErrorCode.EBADREQ, f"{remote[0]!r} is not an IP address"), None)
            return None
        source = self.config.source if rip.version == 4 else self.config.source6
        if local is None and source is None:
            done(ApiError(ErrorCode.ENETUNREACH, "no IPv6 prefix configured (--prefix6)"), None)
            return None
        try:
            src = self._local_endpoint(local or (source or "", 0), "connect local")
            if len(src[0]) != len(rip.packed):
                raise ApiError(
                    ErrorCode.EBADREQ,
                    f"connect local: {local[0] if local else source} and {remote[0]}"
                    " are of different address families",
                )
            if rip.version == 6 and config is self.connect_config:
                config = self.connect_config6
            dst = (self._intern(rip.packed), remote[1])
            port = src[1] or self._free_port(src[0], dst)
        except ApiError as exc:
            done(exc, None)
            return None
        key = (src[0], port, dst[0], dst[1])
        if key in self.flows or key in self.splicer.flows or (src[0], port) in self.listeners:
            # A spliced flow's 4-tuple lives in the splicer's table, not ours.
            done(ApiError(ErrorCode.EADDRINUSE, "that 4-tuple is in use"), None)
            return None
        now = time.monotonic()
        local_ep = (src[0], port)
        iss = self.isn.isn(local_ep, dst, now)
        tcp = TcpConnection.connect(config, local_ep, dst, iss, now)
        c = Conn(tcp, owner, connect_done=done)
        self.flows[c.key] = c
        self.counters["connections_opened"] += 1
        self.timers.schedule(
            c.connect_timer,
            now + timeout,
            lambda: self._fail_connect(c, ApiError(ErrorCode.ETIMEDOUT, "connect timed out")),
        )
        self.dirty.add(c)
        return c

    def _complete_connect(self, conn: Conn) -> None:
        done, conn.connect_done = conn.connect_done, None
        conn.connect_timer.cancel()
        assert done is not None
        result, theirs = self._hand_out(conn)
        if conn.splice is not None:
            self.splicer.server_connected(conn)
        done(result, theirs)

    def _fail_connect(self, conn: Conn, err: ApiError) -> None:
        done, conn.connect_done = conn.connect_done, None
        conn.connect_timer.cancel()
        if done is None:
            return
        if conn.splice is not None:
            self.splicer.connect_failed(conn)
            conn.splice = None
        if not conn.tcp_gone and conn.tcp.state is not TcpState.CLOSED:
            conn.tcp.abort()
        self.dirty.add(conn)
        done(err, None)

    def _free_port(self, local_addr: bytes, remote: Endpoint | None) -> int:
        """An ephemeral port, walking the range from a random start per peer.

        Walking (as Linux's port allocation does) rather than drawing at random
        keeps a just-closed 4-tuple out of use for as long as possible: the
        peer may hold it in TIME-WAIT for a minute (RFC 9293 3.4.2).
        """
        lo, hi = EPHEMERAL
        span = hi - lo + 1
        key = (local_addr, remote)
        start = self._port_cursor.get(key)
        if start is None:
            start = random.randrange(span)
        for step in range(span):
            port = lo + (start + step) % span
            if (local_addr, port) in self.listeners:
                continue
            flow = (local_addr, port, remote[0], remote[1]) if remote is not None else None
            if flow is None or (flow not in self.flows and flow not in self.splicer.flows):
                self._port_cursor[key] = (start + step + 1) % span
                return port
        raise ApiError(ErrorCode.ELIMIT, "no free local port")

    def _conn(self, conn_id: int) -> Conn:
        conn = self.conns.get(conn_id)
        if conn is None:
            raise ApiError(ErrorCode.ENOENT, f"no connection {conn_id}")
        return conn

    def close(self, owner: int, conn: int) -> Result:
        c = self._conn(conn)
        self._close_conn(c)
        return {}

    def keepalive(self, owner: int, conn: int, params: tuple[float, float, int] | None) -> Result:
        c = self._conn(conn)
        if c.frozen:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn} is spliced: its segments are relayed")
        if c.tcp_gone:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn} is closed")
        c.tcp.set_keepalive(params, time.monotonic())
        self.dirty.add(c)  # the service loop re-arms the conn's timer
        return {"conn": conn, "keepalive": None if params is None else list(params)}

    def abort(self, owner: int, conn: int) -> Result:
        c = self._conn(conn)
        if c.frozen:
            # Its segments are the relay's now; the proxy's part ends with close.
            raise ApiError(
                ErrorCode.ESTATE, f"conn {conn} is spliced: close releases it, the splice goes on"
            )
        # RFC 9293 3.10.5: RST, and everything queued either way is dropped
        # (the proxy's unsent bytes die with the socketpair, which _free closes
        # with the id).
        if not c.tcp_gone:
            c.tcp.abort()
            self._emit_output(c, time.monotonic())
            c.tcp_gone = True
        self._free(c)
        self.dirty.discard(c)  # nothing left to service
        return {}

    def _close_conn(self, c: Conn) -> None:
        if c.frozen:
            # Thesis 4.2: closing a spliced descriptor frees it, sends no FIN.
            # The proxy wrote its len bytes before asking to close: they are
            # in the socket and must still be taken.
            if c.sock is not None:
                self._pump_in_spliced(c)
            self._drop_socket(c)
            self.splicer.proxy_done(c)
            self._release_id(c)
            self.splicer.released(c)
            return
        if not c.tcp_gone:
            # What the proxy wrote before asking to close is in the socket
            # already: it is sent before the FIN, like close(2) on a socket.
            self._drain_proxy(c)
            if c.hold_rx:
                # An intended but never spliced client: its held bytes were
                # never the proxy's to read.  Drop them so that the proxy's
                # last words (a SOCKS error reply) go out with a FIN, not
                # lost under a RST.
                c.tcp.recv(c.tcp.readable())
            c.close_pending = True
            self.dirty.add(c)
        self._drop_socket(c)
        self._release_id(c)
        if c.tcp_gone:
            self._free(c)

    def _release_id(self, c: Conn) -> None:
        """The proxy closed ``c``: its API id and the server's record of it go now.

        (The TCB may live on, draining or spliced, but no API call can name it.)
        """
        if c.id is not None:
            self.conns.pop(c.id, None)
            self.api.forget(ObjectKind.CONN, c.id)
            c.id = None

    def close_listener(self, owner: int, listener: int) -> Result:
        lst = self.listener_ids.get(listener)
        if lst is None:
            raise ApiError(ErrorCode.ENOENT, f"no listener {listener}")
        self._drop_listener(lst)
        return {}

    def _drop_listener(self, lst: Listening) -> None:
        self.listener_ids.pop(lst.id, None)
        self.listeners.pop(lst.tcp.local, None)
        for done in lst.waiters:
            done(ApiError(ErrorCode.ECANCELED, "listener closed"), None)
        lst.waiters.clear()
        # Connections not yet handed out die with the listener (RST), as on close(2).
        for c in list(self.flows.values()):
            if c.listener is lst:
                c.tcp.abort()
                self.dirty.add(c)

    def shutdown(self, owner: int, conn: int) -> Result:
        c = self._conn(conn)
        c.want_fin = True
        self.dirty.add(c)
        return {}

    def _listener_counters(self) -> dict[str, int]:
        """SYN queue overflow, summed over listeners (RFC 4987: cookies or drops)."""
        ls = [lst.tcp for lst in self.listeners.values()]
        return {
            "syn_drops": sum(t.syn_drops for t in ls),
            "syn_cookies_sent": sum(t.cookies_sent for t in ls),
            "syn_cookies_accepted": sum(t.cookies_accepted for t in ls),
        }

    def stats(self, owner: int, conn: int | None) -> Result:
        if conn is None:
            return {
                "mode": self.tun.mode,
                "connections": len(self.flows),
                "listeners": len(self.listeners),
                "counters": dict(self.counters) | self._listener_counters(),
                "splice_counters": self.splicer.counters.as_dict()
                | {"dormant": self.splicer.dormant(), "port_holds": len(self.splicer.port_holds)},
                "fast_path": self._fast_path_status(),
                "splices": self.splicer.stats(),
            }
        c = self._conn(conn)
        t = c.tcp
        s = t.stats
        return {
            "conn": conn,
            "state": "CLOSED" if c.tcp_gone else t.state.name,
            "local": _addr_text(t.local),
            "peer": _addr_text(t.remote),
            "bytes_in": s.bytes_received,
            "bytes_out": s.bytes_sent,
            "segments_in": s.segments_received,
            "segments_out": s.segments_sent,
            "retransmits": s.retransmits,
            "fast_retransmits": s.fast_retransmits,
            "rto_count": s.rto_count,
            "dup_acks": s.dup_acks,
            "challenge_acks": s.challenge_acks,
            "challenge_acks_suppressed": s.challenge_acks_suppressed,
            "keepalive_probes": s.keepalive_probes,
            "pmtu_updates": s.pmtu_updates,
            "sack_recoveries": s.sack_recoveries,
            "sack_retransmits": s.sack_retransmits,
            "lost_retransmits": s.lost_retransmits,
            "tlp_probes": s.tlp_probes,
            "ecn_ce_received": s.ecn_ce_received,
            "ecn_reductions": s.ecn_reductions,
            "retransmitted_bytes": s.retransmitted_bytes,
            "mss": t.snd_mss,
            "bytes_to_proxy": c.to_proxy,
            "bytes_from_proxy": c.from_proxy,
            "spliced": c.frozen,
            "splice_state": (
                None
                if c.splice is None
                else c.splice.relay.pair.state(Iface.CLIENT if c.is_client else Iface.SERVER).name
            ),
            "options": {
                "wscale": [t.snd_wscale, t.rcv_wscale] if t.wscale_ok else None,
                "sack": t.sack_ok,
                "timestamps": t.ts_ok,
                "ecn": t.ecn_ok,
            },
        }

    def _fast_path_status(self) -> dict[str, object]:
        if self.fast_path is None:
            return {"running": False, "reason": self.fast_path_reason}
        st: dict[str, object] = self.fast_path.status()
        st["errors"] = self.splicer.fast_path_errors
        return st

    def intend_splice(self, owner: int, conn: int, server: int | None = None) -> Result:
        return self.splicer.intend_splice(owner, conn, server)

    def splice(
        self,
        owner: int,
        client: int,
        server: int,
        length: int,
        unread: bytes = b"",
        limits: tuple[int, int] | None = None,
        server_unread: bytes = b"",
        tap: bool = False,
    ) -> Result:
        return self.splicer.splice(
            owner, client, server, length, unread, limits, server_unread, tap
        )

    def connect_splice(
        self,
        owner: int,
        client: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        length: int,
        done: Done,
        inline: Inline | None = None,
    ) -> None:
        self.splicer.connect_splice(owner, client, remote, local, timeout, length, done, inline)

    def splice_sockets(self, owner: int, client: socket.socket, server: socket.socket) -> Result:
        """Take the proxy's two kernel connections over and splice them (docs/api.md).

        First the fast path holds both connections' segments (they come to
        the TUN from now on, never to the sockets being read), then what the
        client sent and the proxy did not read goes to the server by the
        server socket's own send (``forward_unread``: the kernel transmits
        the first request at once), then each socket is read in repair mode
        (daemon/io/repair.py) and closed without a sound, and TCBs restored
        from what was read carry the connections on into an ordinary
        splice.  Any failure before the sockets are closed undoes the holds
        and leaves repair mode: the connections are the proxy's as before,
        except that bytes may have been forwarded as a copying proxy would.
        """
        fp = self.splicer.fast_path
        if fp is None:
            raise ApiError(
                ErrorCode.EOPNOTSUPP, "splice_sockets needs the kernel fast path (it is off here)"
            )
        probe = self._probe()
        if self._tun_index is None:
            self._tun_index = socket.if_nametoindex(self.tun.name)
        tun_index = self._tun_index
        try:
            sides = [endpoints(sock) for sock in (client, server)]
        except RepairError as exc:
            raise ApiError(ErrorCode.ESTATE, f"splice_sockets: {exc}") from None
        for local, remote in sides:
            key = (local[0], local[1], remote[0], remote[1])
            if key in self.flows or key in self.splicer.flows:
                raise ApiError(ErrorCode.EADDRINUSE, "the daemon has that 4-tuple already")
        held: list[FlowKey] = []
        try:
            for local, remote in sides:
                incoming = (remote[0], remote[1], local[0], local[1])
                fp.hold(incoming, tun_index)
                held.append(incoming)
            forward_unread(client, server)
            pairs = zip((client, server), sides, strict=True)
            states = [take_over(sock, probe, ends) for sock, ends in pairs]
            now = time.monotonic()
            tcbs = [
                TcpConnection.restore(
                    self.tcp_config6 if len(k.local[0]) == 16 else self.tcp_config, k, now
                )
                for k in states
            ]
        except (RepairError, ValueError, OSError) as exc:
            for sock in (client, server):
                give_back(sock)
            for key in held:
                with contextlib.suppress(OSError, KeyError):
                    fp.remove(key)
            # What the holds sent to the TUN meanwhile is the kernel's again
            # (``_tcp_input``: no owner): back now, not when the loop next
            # reads the TUN.  Under load that was milliseconds later: the
            # socket waited for the peer to resend what the hold had taken,
            # or the proxy had finished and closed it and the kernel answered
            # the segment with a RST (rounds of refused hand-overs, captured).
            self.drain_tun()
            raise ApiError(ErrorCode.ESTATE, f"splice_sockets: {exc}") from None
        # The server side's local port stays taken while the splice lives
        # (Splicer.port_holds), by a socket bound to it (repair.hold_port).
        try:
            port_hold: socket.socket | None = hold_port(server)
        except OSError:
            port_hold = None  # another user's socket, say: bound after it lets go, below
        try:
            for sock in (client, server):
                close_silently(sock)
            if port_hold is None:
                # SO_REUSEPORT beside a live socket is its own user's only (a
                # proxy running as another user than the daemon, as in
                # docs/operations.md); disconnected, the socket no longer has
                # the port, and a plain bind takes it.
                try:
                    port_hold = bind_port(sides[1][0])
                except OSError as exc:  # out of descriptors: the splice works, the port is free
                    log.warning("splice_sockets: cannot hold the server side's port: %s", exc)
            c, s = (Conn(tcb, owner, want_fd=False) for tcb in tcbs)
            self.splicer.splice_sockets(owner, c, s, tun_index, held, port_hold)
        except Exception:
            # Past the point of no return: the sockets are in repair mode
            # (they transmit nothing), so the proxy cannot go on copying
            # through them, and no splice carries the connections.  Both
            # peers get a RST (RFC 9293 3.10.5, as for an ABORT) rather
            # than a connection that hangs, and the proxy a distinct error.
            self.counters["internal_errors"] += 1
            log.exception("splice_sockets failed after the take-over; resetting both connections")
            self._reset_taken_over(tcbs, held, port_hold)
            raise ApiError(
                ErrorCode.ECONNRESET,
                "splice_sockets failed after the take-over (a daemon bug, logged): "
                "both connections were reset; close the sockets",
            ) from None
        return {
            "client": {"local": _addr_text(c.tcp.local), "peer": _addr_text(c.tcp.remote)},
            "server": {"local": _addr_text(s.tcp.local), "peer": _addr_text(s.tcp.remote)},
        }

    def _reset_taken_over(
        self, tcbs: list[TcpConnection], held: list[FlowKey], port_hold: socket.socket | None
    ) -> None:
        """Undo a take-over that failed after the sockets were closed: RST both, forget them."""
        now = time.monotonic()
        if not self.splicer.reset_pair(tcbs, now):  # no splice yet: the TCBs say it themselves
            for tcb in tcbs:
                tcb.abort()
                for seg in tcb.poll_output(now):
                    self._write_segment(tcb.local, tcb.remote, seg, tcb.snd_mss, tcb.flow_label)
        fp = self.splicer.fast_path
        assert fp is not None  # splice_sockets refuses to start without it
        for key in held:  # gone already if the splice was torn down
            with contextlib.suppress(OSError, KeyError):
                fp.remove(key)
        if port_hold is not None:
            port_hold.close()

    def _serves(self, addr: bytes) -> bool:
        """Is ``addr`` in the daemon's prefixes (not the host's own addresses)?"""
        net = self.net if len(addr) == 4 else self.net6
        return net is not None and ipaddress.ip_address(addr) in net

    def _probe(self) -> SockProbe:
        """The socket probe, loaded on first use (and IPv4's accept_local on the TUN)."""
        if self._sock_probe is None:
            try:
                self._sock_probe = SockProbe.load()
            except FastPathUnavailable as exc:
                raise ApiError(ErrorCode.EOPNOTSUPP, f"splice_sockets: {exc}") from None
            self._let_host_sources_out()
        return self._sock_probe

    def _let_host_sources_out(self) -> None:
        """IPv4's accept_local on the TUN, for the segments of taken-over connections.

        They leave through the TUN with the host's own addresses as source:
        IPv4 drops those as martians unless told (IPv6 forwards them).  Set
        at the first ``splice_sockets``, or at start when splices of a dead
        daemon's are adopted (their FINs were lost without it, captured).
        """
        path = Path(f"/proc/sys/net/ipv4/conf/{self.tun.name}/accept_local")
        try:
            path.write_text("1")
        except OSError as exc:
            log.warning("cannot set %s: %s (IPv4 splice_sockets will not flow)", path, exc)

    def client_gone(self, owner: int) -> None:
        self.splicer.client_gone(owner)
        for lst in [lst for lst in self.listener_ids.values() if lst.owner == owner]:
            lst.waiters.clear()  # their done callbacks must not be called now
            self._drop_listener(lst)
        for c in [c for c in self.flows.values() if c.owner == owner and not c.frozen]:
            if c.connect_done is not None:
                c.connect_done = None
                c.connect_timer.cancel()
                c.tcp.abort()
                self.dirty.add(c)
            elif c.id is not None or c.sock is not None:
                self._close_conn(c)
        for c in [c for c in self.conns.values() if c.owner == owner]:
            self._close_conn(c)


def _replace(cfg: TcpConfig, **changes: object) -> TcpConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
